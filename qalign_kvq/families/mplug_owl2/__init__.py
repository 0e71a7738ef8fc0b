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

from qalign_kvq.families.base import ANSWER_PREFIX, Family, answer_text, check_vision_attention
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


#: Where the question goes: ``image_first`` as in Q-Align's training conversations
#: (``USER: <|image|>\n{question} ASSISTANT:``), ``question_first`` as in Q-Align's public scorer
#: (``USER: {question}\n<|image|>\nASSISTANT:``).
PROMPT_LAYOUTS = ("image_first", "question_first")


class MPLUGOwl2Family(Family):
    """Q-Align's conversation (``USER: <|image|>\\n{question} ASSISTANT: {answer}</s>``, or with
    ``prompt_layout="question_first"`` the question before the image, as Q-Align's scorer asks), video
    frames in the single image slot, LoRA on ``q_proj`` and the visual ``v_proj`` branch. Training
    and scoring use the same layout; a public checkpoint is scored question first
    (:attr:`zero_shot_options`)."""

    name = "mplug_owl2"
    model_types = ("mplug_owl2",)
    lora_targets = LORA_TARGETS
    vision_prefixes = ("model.vision_model.",)
    projector_prefixes = ("model.visual_abstractor.",)
    language_prefixes = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")
    zero_shot_options = {"prompt_layout": "question_first"}

    def __init__(self, prompt_layout: str = "image_first") -> None:
        if prompt_layout not in PROMPT_LAYOUTS:
            raise ValueError(f"mplug_owl2: prompt_layout must be one of {', '.join(PROMPT_LAYOUTS)}, "
                             f"not {prompt_layout!r}")
        self.prompt_layout = prompt_layout

    def load(self, path: str, *, dtype: torch.dtype | None = None, vision_attention: str = "packed", **kwargs: Any):
        """``(model, processor)`` from a directory or hub id; the processor's placeholder count and
        id are checked against the model config. ``vision_attention`` is only checked (the ViT
        attends in one call)."""
        check_vision_attention(vision_attention)
        try:
            processor = AutoProcessor.from_pretrained(path)
        except ValueError as err:
            # Without sentencepiece, transformers falls back to reading tokenizer.model as tiktoken.
            if "tiktoken" in str(err) and importlib.util.find_spec("sentencepiece") is None:
                raise RuntimeError(
                    f"{path}: cannot read the LLaMA tokenizer.model (as q-future/one-align ships it) "
                    "without the sentencepiece package: pip install sentencepiece"
                ) from err
            raise
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, **kwargs)
        self.set_vision_attention(model, vision_attention)
        processor.num_image_tokens = model.config.num_image_tokens
        if processor.image_token_id != model.config.image_token_index:
            raise ValueError(
                f"{path}: the tokenizer's {IMAGE_TOKEN} id is {processor.image_token_id} but config.json has "
                f"image_token_index {model.config.image_token_index}"
            )
        return model, processor

    def chat_texts(self, processor, question: str, clip: np.ndarray, level_word: str | None) -> tuple[str, str]:
        if self.prompt_layout == "question_first":
            prompt = f"USER: {question}\n{IMAGE_TOKEN}\nASSISTANT: {ANSWER_PREFIX}"
        else:
            prompt = f"USER: {IMAGE_TOKEN}\n{question} ASSISTANT: {ANSWER_PREFIX}"
        if level_word is None:
            return prompt, prompt
        head = prompt[: -len(ANSWER_PREFIX)]
        return prompt, f"{head}{answer_text(level_word)}{processor.tokenizer.eos_token}"

    def answer_head(self, prompt: str) -> str:
        # "ASSISTANT: " would end in a lone "▁" token; Q-Align's answer starts at "▁The".
        return super().answer_head(prompt).rstrip(" ")

    def processor_call(self, processor, texts: list[str], clips: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        """Every clip fills its text's single slot: an image when ``T == 1``, else all its frames."""
        return dict(processor(text=texts, images=list(clips), return_tensors="pt", padding=True))


__all__ = [
    "LORA_TARGETS",
    "PROMPT_LAYOUTS",
    "MPLUGOwl2Config",
    "MPLUGOwl2Family",
    "MPLUGOwl2ForConditionalGeneration",
    "MPLUGOwl2ImageProcessor",
    "MPLUGOwl2Model",
    "MPLUGOwl2Processor",
]
