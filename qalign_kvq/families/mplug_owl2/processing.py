"""mPLUG-Owl2 processor: the checkpoint's LLaMA tokenizer plus the CLIP image processor (PIL path,
as the original) with padding to square in the CLIP mean colour.

Each ``<|image|>`` in a text is one media slot. A slot takes one image, or all frames of a video
(the original's video path): ``num_image_tokens`` placeholder ids are written per image or frame,
and ``pixel_values`` holds every image and frame of the batch in slot order. Text around the
slots is tokenized chunk by chunk, as the original ``tokenizer_image_token`` does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from PIL import Image
from tokenizers import AddedToken
from transformers import BatchFeature, ProcessorMixin
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

IMAGE_TOKEN = "<|image|>"
#: Visual tokens per image of the public checkpoints (64 queries + the end token).
DEFAULT_NUM_IMAGE_TOKENS = 65


def expand_to_square(image: np.ndarray, background: Sequence[int]) -> np.ndarray:
    """Pad an ``(H, W, 3)`` uint8 image to a centred square filled with ``background`` (as
    Q-Align's ``expand2square``: the offset is ``(long - short) // 2``)."""
    height, width = image.shape[:2]
    if height == width:
        return image
    side = max(height, width)
    out = np.empty((side, side, image.shape[2]), dtype=image.dtype)
    out[...] = np.asarray(background, dtype=image.dtype)
    top, left = (side - height) // 2, (side - width) // 2
    out[top : top + height, left : left + width] = image
    return out


class MPLUGOwl2ImageProcessor(CLIPImageProcessorPil):
    """CLIP preprocessing (PIL bicubic resize, centre crop, CLIP normalisation) after padding every
    image to square in the mean colour ``int(mean * 255)``, the way Q-Align feeds mPLUG-Owl2."""

    @property
    def background(self) -> tuple[int, ...]:
        return tuple(int(x * 255) for x in self.image_mean)

    #: Images per thread when a call holds many (the 60 views x frames of a scored video): PIL's
    #: resize and numpy release the GIL, so chunks run in parallel; the result is the same.
    chunk_size = 8
    #: Most threads a call uses; fewer where torch's intra-op threads are fewer (1 in a DataLoader
    #: worker: the workers are the parallelism there, as for the video reader).
    max_threads = 8

    def preprocess(self, images, *args, **kwargs) -> BatchFeature:
        """``images``: one or a list of ``(H, W, 3)`` uint8 arrays or PIL images."""
        if isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim == 3):
            images = [images]
        images = list(images)
        chunks = [images[i : i + self.chunk_size] for i in range(0, len(images), self.chunk_size)]
        threads = min(self.max_threads, torch.get_num_threads(), len(chunks))
        if threads < 2:
            return self._preprocess_chunk(images, *args, **kwargs)
        with ThreadPoolExecutor(threads) as pool:
            parts = list(pool.map(lambda chunk: self._preprocess_chunk(chunk, *args, **kwargs), chunks))
        return BatchFeature({"pixel_values": _concat([part["pixel_values"] for part in parts])},
                            tensor_type=None)

    def _preprocess_chunk(self, images: list, *args, **kwargs) -> BatchFeature:
        padded = [expand_to_square(_rgb(image), self.background) for image in images]
        return super().preprocess(padded, *args, **kwargs)


def _concat(parts: list):
    """Join the chunks' ``pixel_values`` (tensors, arrays or lists) along the image axis."""
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    return [image for part in parts for image in part]


def _rgb(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"an image must be an (H, W, 3) uint8 RGB array; got {image.shape} {image.dtype}")
    return image


def _frames(media: Any) -> list[np.ndarray]:
    """One slot's media -> its frames: an ``(H, W, 3)`` image, a ``(T, H, W, 3)`` clip, a PIL image
    or a list of frames."""
    if isinstance(media, Image.Image):
        return [_rgb(media)]
    if isinstance(media, torch.Tensor):
        media = media.numpy()
    if isinstance(media, np.ndarray):
        if media.ndim == 3:
            return [media]
        if media.ndim == 4:
            return list(media)
        raise ValueError(f"an image must be (H, W, 3) and a video (T, H, W, 3); got shape {media.shape}")
    return [f for item in media for f in _frames(item)]


class MPLUGOwl2Processor(ProcessorMixin):
    """Tokenizer + image processor for mPLUG-Owl2 (see the module docstring)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_token: str = IMAGE_TOKEN,
                 num_image_tokens: int = DEFAULT_NUM_IMAGE_TOKENS, **kwargs):
        if image_processor is not None and not isinstance(image_processor, MPLUGOwl2ImageProcessor):
            # The public checkpoints name CLIPFeatureExtractor; keep its settings, use the PIL path.
            settings = {k: v for k, v in image_processor.to_dict().items()
                        if k in MPLUGOwl2ImageProcessor.valid_kwargs.__annotations__}
            image_processor = MPLUGOwl2ImageProcessor(**settings)
        if image_token not in tokenizer.get_vocab():
            tokenizer.add_tokens([AddedToken(image_token, special=True, normalized=False)], special_tokens=True)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.unk_token  # Q-Align pads with the LLaMA unk token
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.num_image_tokens = num_image_tokens
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]

    def _text_ids(self, text: str, frame_counts: Iterator[int]) -> list[int]:
        """BOS + the first chunk, then per slot its placeholders and the next chunk (no BOS)."""
        chunks = text.split(self.image_token)
        ids = list(self.tokenizer(chunks[0])["input_ids"])
        for chunk in chunks[1:]:
            ids += [self.image_token_id] * (self.num_image_tokens * next(frame_counts))
            ids += list(self.tokenizer(chunk, add_special_tokens=False)["input_ids"])
        return ids

    def __call__(self, text: str | list[str] | None = None, images=None, videos=None, return_tensors="pt",
                 padding: bool | str = True, **kwargs) -> BatchFeature:
        """``images``/``videos``: one entry per ``<|image|>`` slot of the batch, in order (an image,
        a ``(T, H, W, 3)`` clip or a list of frames). Give either, not both: with both the slot
        order would be ambiguous."""
        if text is None:
            raise ValueError("MPLUGOwl2Processor needs text with one <|image|> per image or video")
        texts = [text] if isinstance(text, str) else list(text)
        if images is not None and videos is not None:
            raise ValueError("pass images or videos, not both: media fill the <|image|> slots in order")
        media = images if images is not None else videos
        if isinstance(media, (np.ndarray, Image.Image, torch.Tensor)):  # a single image or clip
            media = [media]
        slots = [_frames(m) for m in (media or [])]
        n_slots = sum(t.count(self.image_token) for t in texts)
        if n_slots != len(slots):
            raise ValueError(f"the texts hold {n_slots} {self.image_token} slots but {len(slots)} "
                             "images/videos were given")
        frames = [f for slot in slots for f in slot]
        frame_counts = iter([len(slot) for slot in slots])
        rows = [self._text_ids(t, frame_counts) for t in texts]
        batch = self.tokenizer.pad({"input_ids": rows}, padding=padding, return_tensors=return_tensors)
        data = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if frames:
            data["pixel_values"] = self.image_processor(frames, return_tensors=return_tensors)["pixel_values"]
        return BatchFeature(data=data, tensor_type=return_tensors)
