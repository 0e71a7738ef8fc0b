"""mPLUG-Owl2 (Q-Align / OneAlign): the native port and its family adapter.

Importing this package registers ``model_type`` ``"mplug_owl2"`` with ``AutoConfig``,
``AutoModelForImageTextToText``, ``AutoModelForCausalLM``, ``AutoImageProcessor`` and
``AutoProcessor``, so the public checkpoints load with the Auto classes and no remote code.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from qalign_kvq.families.base import ANSWER_PREFIX, Family, answer_text, check_vision_attention, load_model_strict
from qalign_kvq.families.mplug_owl2.configuration import MPLUGOwl2Config
from qalign_kvq.families.mplug_owl2.modeling import MPLUGOwl2ForConditionalGeneration, MPLUGOwl2Model
from qalign_kvq.families.mplug_owl2.processing import IMAGE_TOKEN, MPLUGOwl2ImageProcessor, MPLUGOwl2Processor

AutoConfig.register(MPLUGOwl2Config.model_type, MPLUGOwl2Config, exist_ok=True)
AutoModelForImageTextToText.register(MPLUGOwl2Config, MPLUGOwl2ForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(MPLUGOwl2Config, MPLUGOwl2ForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(MPLUGOwl2Config, image_processor_classes={"pil": MPLUGOwl2ImageProcessor}, exist_ok=True)
AutoProcessor.register(MPLUGOwl2Config, MPLUGOwl2Processor, exist_ok=True)

#: Q-Align's defaults: LoRA on ``q_proj`` and the visual branch of ``v_proj`` of the decoder.
LORA_TARGETS = r".*\.layers\.\d+\.self_attn\.(q_proj|v_proj\.multiway\.1)"


#: Q-Align's training conversation (``--version v1``: ``conv_vicuna_v1`` of q_align/conversation.py,
#: separator style TWO with sep " " and sep2 "</s>", the image moved before the question by
#: ``preprocess_multimodal``): the system text, then ``USER: <|image|>\n{question} ASSISTANT:``.
VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                    "helpful, detailed, and polite answers to the user's questions.")

#: Where the question goes: ``vicuna_v1`` is Q-Align's training conversation (the default, what
#: OneAlign was trained on); ``question_first`` is Q-Align's public scorer
#: (``USER: {question}\n<|image|>\nASSISTANT:``, no system text); ``image_first`` is the training
#: layout without the system text (what qalign-kvq before 0.2 trained: kept for those checkpoints).
PROMPT_LAYOUTS = ("vicuna_v1", "question_first", "image_first")


class MPLUGOwl2Family(Family):
    """Q-Align's conversation (by default its training conversation, ``vicuna_v1``: system text,
    ``USER: <|image|>\n{question} ASSISTANT: {answer}</s>``), video frames in the single image slot,
    LoRA on ``q_proj`` and the visual ``v_proj`` branch. Training and scoring use the same layout;
    a public checkpoint is scored the way Q-Align's scorer asks, question first
    (:attr:`zero_shot_options`). Every frame is fed at the vision tower's 448x448."""

    name = "mplug_owl2"
    model_types = ("mplug_owl2",)
    lora_targets = LORA_TARGETS
    #: An unfrozen ViT's LoRA targets: its layers' attention and MLP.
    vision_lora_targets = (r"model\.vision_model\.encoder\.layers\.\d+\."
                           r"(self_attn\.(query_key_value|dense)|mlp\.(fc1|fc2))")
    vision_prefixes = ("model.vision_model.",)
    projector_prefixes = ("model.visual_abstractor.",)
    language_prefixes = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")
    zero_shot_options = {"prompt_layout": "question_first"}
    processor_takes_device = False  # a PIL image processor

    def __init__(self, prompt_layout: str = "vicuna_v1", frame_pixels: int | None = None) -> None:
        super().__init__(frame_pixels)
        if prompt_layout not in PROMPT_LAYOUTS:
            raise ValueError(f"mplug_owl2: prompt_layout must be one of {', '.join(PROMPT_LAYOUTS)}, "
                             f"not {prompt_layout!r}")
        self.prompt_layout = prompt_layout

    def _own_options(self) -> dict[str, Any]:
        return {"prompt_layout": self.prompt_layout}

    def tokens_per_frame(self, processor) -> int:
        return int(processor.num_image_tokens)

    def default_frame_pixels(self, processor) -> int:
        crop = processor.image_processor.crop_size
        return int(crop["height"]) * int(crop["width"])

    def load(self, path: str, *, dtype: torch.dtype | None = None, processor_path: str | None = None,
             vision_attention: str = "packed", **kwargs: Any):
        """``(model, processor)`` from a directory or hub id (the processor from ``processor_path``
        when given); missing weights are an error; the processor's placeholder count and id are
        checked against the model config. ``vision_attention`` is only checked (the ViT attends in
        one call)."""
        check_vision_attention(vision_attention)
        try:
            processor = AutoProcessor.from_pretrained(processor_path or path)
        except ValueError as err:
            # Without sentencepiece, transformers falls back to reading tokenizer.model as tiktoken.
            if "tiktoken" in str(err) and importlib.util.find_spec("sentencepiece") is None:
                raise RuntimeError(
                    f"{path}: cannot read the LLaMA tokenizer.model (as q-future/one-align ships it) "
                    "without the sentencepiece package: pip install sentencepiece"
                ) from err
            raise
        model = load_model_strict(AutoModelForImageTextToText, path, dtype=dtype, **kwargs)
        self.set_vision_attention(model, vision_attention)
        self.resolve_frame_pixels(processor)
        processor.num_image_tokens = model.config.num_image_tokens
        if processor.image_token_id != model.config.image_token_index:
            raise ValueError(
                f"{path}: the tokenizer's {IMAGE_TOKEN} id is {processor.image_token_id} but config.json has "
                f"image_token_index {model.config.image_token_index}"
            )
        return model, processor

    def chat_texts(self, processor, question: str, clip: np.ndarray, level_word: str | None,
                   answer_prefix: str = ANSWER_PREFIX) -> tuple[str, str]:
        if self.prompt_layout == "question_first":
            head = f"USER: {question}\n{IMAGE_TOKEN}\nASSISTANT: "
        elif self.prompt_layout == "vicuna_v1":
            head = f"{VICUNA_V1_SYSTEM} USER: {IMAGE_TOKEN}\n{question} ASSISTANT: "
        else:
            head = f"USER: {IMAGE_TOKEN}\n{question} ASSISTANT: "
        prompt = head + answer_prefix
        if level_word is None:
            return prompt, prompt
        return prompt, f"{head}{answer_text(level_word, answer_prefix)}{processor.tokenizer.eos_token}"

    def answer_head(self, prompt: str, answer_prefix: str = ANSWER_PREFIX) -> str:
        # "ASSISTANT: " would end in a lone "▁" token; Q-Align's answer starts at "▁The".
        return super().answer_head(prompt, answer_prefix).rstrip(" ")

    def processor_call(self, processor, texts: list[str], clips: Sequence[np.ndarray],
                       timings=None, device=None) -> dict[str, torch.Tensor]:
        """Every clip fills its text's single slot: an image when ``T == 1``, else all its frames
        (mPLUG-Owl2 has no notion of time: ``timings`` are not used; its PIL image processor has
        no ``device``)."""
        self.check_processor_device(device)
        self.resolve_frame_pixels(processor)
        return dict(processor(text=texts, images=list(clips), return_tensors="pt", padding=True))


__all__ = [
    "LORA_TARGETS",
    "VICUNA_V1_SYSTEM",
    "PROMPT_LAYOUTS",
    "MPLUGOwl2Config",
    "MPLUGOwl2Family",
    "MPLUGOwl2ForConditionalGeneration",
    "MPLUGOwl2ImageProcessor",
    "MPLUGOwl2Model",
    "MPLUGOwl2Processor",
]
