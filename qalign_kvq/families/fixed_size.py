"""Families whose vision tower takes one input size (LLaVA-OneVision's SigLIP at 384 px, InternVL's
InternViT at 448 px): frames fed as the tower's images, images held to one frame, and the authors'
training conversation as a prompt layout.

**Frames.** The tower was trained on what the image processor makes: its size, mean and std. A video
processor configured otherwise feeds frames the tower cannot take (the InternVL3.5 -HF repos ship a
``video_preprocessor_config.json`` at 384 px with CLIP mean/std for a 448-px tower normalised with
ImageNet values, public InternVL issues 1184 and 1222: the forward pass then fails in the pixel
shuffle). Every processor call therefore passes the image processor's size, mean, std and
resampling for the video frames (the processor is left as loaded); loading checks the image size
against the vision config and says when the video processor disagrees.

**Budget.** :attr:`~qalign_kvq.families.base.Family.frame_pixels` is the tower's input size, the
only one these models take; images are held to it by the subclasses (one tile, no high-resolution
tiling).

**Conversation.** ``prompt_layout`` is ``chat_template`` (the processor's chat template, the
training default) or the authors' training conversation :attr:`authors_layout`: ChatML with the
authors' system message, which the Hub chat templates leave out. Public checkpoints are scored in
it (:attr:`zero_shot_options`); a fine-tuned checkpoint stores the layout it trained with.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from qalign_kvq.families.base import ANSWER_PREFIX, Family, answer_text

logger = logging.getLogger(__name__)

CHAT_TEMPLATE = "chat_template"


def _height_width(size) -> tuple[int, int]:
    """``(height, width)`` of a processor ``size`` (a ``SizeDict`` or a dict; a square when it only
    gives ``shortest_edge``)."""
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    height, width = get("height"), get("width")
    if height is None:
        height = width = get("shortest_edge")
    return int(height), int(width)


def tower_size(processor) -> tuple[int, int]:
    """``(height, width)`` of the image processor's output: what the vision tower takes."""
    return _height_width(processor.image_processor.size)


def _config_size(value) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _floats(values) -> list[float]:
    return [round(float(v), 8) for v in (values if isinstance(values, (list, tuple)) else [values] * 3)]


def fit_within(clip: np.ndarray, height: int, width: int) -> np.ndarray:
    """The clip shrunk (aspect kept, bicubic with antialiasing, as the processors resize) to fit a
    ``height`` x ``width`` box; unchanged when it fits already."""
    h, w = clip.shape[1:3]
    if h <= height and w <= width:
        return clip
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2.functional import resize

    scale = min(height / h, width / w)
    size = [max(1, min(height, round(h * scale))), max(1, min(width, round(w * scale)))]
    frames = torch.from_numpy(np.ascontiguousarray(clip)).permute(0, 3, 1, 2)
    out = resize(frames, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
    return out.permute(0, 2, 3, 1).contiguous().numpy()


class FixedSizeFamily(Family):
    """A family whose frames and images are fed at the vision tower's one input size."""

    #: The authors' training conversation (a ``prompt_layout`` value) and its system message.
    authors_layout: str = ""
    system_message: str = ""

    def __init__(self, prompt_layout: str = CHAT_TEMPLATE, frame_pixels: int | None = None) -> None:
        super().__init__(frame_pixels)
        layouts = (CHAT_TEMPLATE, self.authors_layout)
        if prompt_layout not in layouts:
            raise ValueError(f"{self.name}: prompt_layout must be one of {', '.join(layouts)}, not {prompt_layout!r}")
        self.prompt_layout = prompt_layout

    def _own_options(self) -> dict[str, Any]:
        return {"prompt_layout": self.prompt_layout}

    # ----- frames at the tower's size ---------------------------------------------------------
    def default_frame_pixels(self, processor) -> int:
        height, width = tower_size(processor)
        return height * width

    def frame_kwargs(self, processor) -> dict[str, Any]:
        """Video-processor arguments that make frames exactly what the image processor makes."""
        image = processor.image_processor
        height, width = tower_size(processor)
        return {"size": {"height": height, "width": width}, "image_mean": _floats(image.image_mean),
                "image_std": _floats(image.image_std), "resample": image.resample}

    def image_kwargs(self, processor) -> dict[str, Any]:
        """Image-processor arguments that hold an image to one frame (None by default)."""
        return {}

    def media_kwargs(self, processor, images: list[np.ndarray], videos: list[np.ndarray]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if videos:
            out["videos_kwargs"] = self.frame_kwargs(processor)
        if images and self.image_kwargs(processor):
            out["images_kwargs"] = self.image_kwargs(processor)
        return out

    def load(self, path: str, *, dtype: torch.dtype | None = None, processor_path: str | None = None,
             **kwargs: Any):
        model, processor = super().load(path, dtype=dtype, processor_path=processor_path, **kwargs)
        self.check_processor(processor, model.config, processor_path or path)
        return model, processor

    def check_processor(self, processor, config, source: str) -> None:
        """The image processor must make what the vision tower takes; a video processor that
        disagrees is overridden on every call (and said so here)."""
        height, width = tower_size(processor)
        tower = _config_size(config.vision_config.image_size)
        if (height, width) != tower:
            raise ValueError(f"{source}: the image processor makes {height}x{width} images but the vision tower "
                             f"takes {tower[0]}x{tower[1]} (config.json vision_config.image_size)")
        video, image = processor.video_processor, processor.image_processor
        differs = {
            "size": (_height_width(video.size), (height, width)),
            "mean": (_floats(video.image_mean), _floats(image.image_mean)),
            "std": (_floats(video.image_std), _floats(image.image_std)),
        }
        differs = {k: v for k, v in differs.items() if v[0] != v[1]}
        if differs:
            said = ", ".join(f"{k} {v[0]} (the image processor's: {v[1]})" for k, v in differs.items())
            logger.warning("%s: the video processor's %s; %s feeds video frames as the image processor makes "
                           "images, the vision tower's input", source, said, self.name)

    # ----- the conversation ---------------------------------------------------------------------
    def chat_texts(self, processor, question: str, clip: np.ndarray, level_word: str | None,
                   answer_prefix: str = ANSWER_PREFIX) -> tuple[str, str]:
        if self.prompt_layout == CHAT_TEMPLATE:
            return self.template_texts(processor, question, clip, level_word, answer_prefix)
        media = processor.image_token if clip.shape[0] == 1 else processor.video_token
        head = (f"<|im_start|>system\n{self.system_message}<|im_end|>\n"
                f"<|im_start|>user\n{media}\n{question}<|im_end|>\n<|im_start|>assistant\n")
        prompt = head + answer_prefix
        if level_word is None:
            return prompt, prompt
        return prompt, f"{head}{answer_text(level_word, answer_prefix)}<|im_end|>\n"

    def template_texts(self, processor, question: str, clip: np.ndarray, level_word: str | None,
                       answer_prefix: str = ANSWER_PREFIX) -> tuple[str, str]:
        """``(prompt, full)`` rendered with the processor's chat template."""
        return super().chat_texts(processor, question, clip, level_word, answer_prefix)
