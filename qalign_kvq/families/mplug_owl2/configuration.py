"""mPLUG-Owl2 configuration: the LLaMA-2 fields at top level, the ViT and the visual abstractor
under ``visual_config`` (as the public Q-Align / OneAlign ``config.json`` files have them)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig


@dataclass(frozen=True)
class VisionSettings:
    """The ViT part of ``visual_config["visual_model"]`` (defaults: one-align's ViT-L/14 at 448)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 448
    patch_size: int = 14
    layer_norm_eps: float = 1e-6


@dataclass(frozen=True)
class AbstractorSettings:
    """The visual abstractor part of ``visual_config["visual_abstractor"]`` (defaults: one-align)."""

    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_hidden_layers: int = 6
    num_attention_heads: int = 16
    num_learnable_queries: int = 64
    encoder_hidden_size: int = 1024
    grid_size: int = 32
    layer_norm_eps: float = 1e-6


def _settings(cls, values: dict[str, Any] | None):
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in (values or {}).items() if k in names})


@strict
class MPLUGOwl2Config(LlamaConfig):
    """LLaMA-2 decoder settings plus ``visual_config`` (``visual_model`` and ``visual_abstractor``
    dicts). ``image_token_index`` is the placeholder id the processor expands per image; it defaults to
    ``vocab_size`` (one past the LLaMA vocabulary, where the processor adds ``<|image|>``)."""

    model_type = "mplug_owl2"

    visual_config: dict | None = None
    image_token_index: int | None = None

    def __post_init__(self, **kwargs):
        if self.visual_config is None:
            self.visual_config = {"visual_model": {}, "visual_abstractor": {}}
        if self.image_token_index is None:
            self.image_token_index = self.vocab_size
        super().__post_init__(**kwargs)

    @property
    def vision_settings(self) -> VisionSettings:
        return _settings(VisionSettings, self.visual_config.get("visual_model"))

    @property
    def abstractor_settings(self) -> AbstractorSettings:
        return _settings(AbstractorSettings, self.visual_config.get("visual_abstractor"))

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens per image (or video frame): the learnable queries plus the end token."""
        return self.abstractor_settings.num_learnable_queries + 1
