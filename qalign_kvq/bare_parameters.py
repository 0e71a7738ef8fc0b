"""Parameters trained beside a peft adapter that the adapter file cannot hold.

peft saves LoRA weights and whole modules (``modules_to_save``); a bare ``nn.Parameter`` attribute of
a larger module, such as LLaVA-OneVision's ``model.image_newline`` (the projector group's learned
row separator), is neither. When training makes one trainable, its value is written to
``bare_parameters.safetensors`` in the adapter directory (the final output and every Trainer
checkpoint) under its plain model name, and restored wherever the adapter is loaded: scoring
(``load_checkpoint``), continued training and the Trainer's resume and best-model reload.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

BARE_PARAMETERS_FILE = "bare_parameters.safetensors"
#: Name parts of the parameters a peft adapter file holds (LoRA and DoRA weights, saved modules).
_ADAPTER_PARTS = (".lora_", ".modules_to_save.", ".token_adapter.")
_WRAPPERS = ("module.", "base_model.model.")


def plain_name(name: str) -> str:
    """A parameter name without the DDP / peft wrapper prefixes (``model.image_newline``)."""
    for prefix in _WRAPPERS:
        name = name.removeprefix(prefix)
    return name


def bare_trainable_names(model) -> list[str]:
    """Plain names of the trainable parameters of a peft model that its adapter file does not hold
    (none for a model that is not a ``PeftModel``)."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return []
    return [plain_name(name) for name, param in model.named_parameters()
            if param.requires_grad and not any(part in name for part in _ADAPTER_PARTS)
            and "original_module" not in name]


def save_bare_parameters(model, directory: str | os.PathLike, state_dict: Mapping[str, torch.Tensor] | None = None
                         ) -> Path | None:
    """Write the bare trainable parameters of ``model`` into ``directory`` (from ``state_dict`` when
    given, e.g. the one DeepSpeed gathered); None when there are none."""
    from safetensors.torch import save_file

    names = set(bare_trainable_names(model))
    if not names:
        return None
    source = state_dict if state_dict is not None else dict(model.named_parameters())
    tensors = {plain_name(key): value.detach().to("cpu").contiguous().clone()
               for key, value in source.items() if plain_name(key) in names and value.numel() > 0}
    missing = names - set(tensors)
    if missing:  # e.g. ZeRO-3 without a gathered state dict: its own checkpoint holds them
        logger.warning("not saved beside the adapter (absent or partitioned): %s", ", ".join(sorted(missing)))
    if not tensors:
        return None
    path = Path(directory) / BARE_PARAMETERS_FILE
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
    return path


def load_bare_parameters(model, directory: str | os.PathLike, trainable: bool | None = None) -> list[str]:
    """Copy the values saved in ``directory`` into ``model`` (plain or peft-wrapped); every saved
    name must be a parameter of the same shape. ``trainable`` sets their ``requires_grad`` (None
    leaves it). Returns the names restored (none without the file)."""
    from safetensors.torch import load_file

    path = Path(directory) / BARE_PARAMETERS_FILE
    if not path.is_file():
        return []
    saved = load_file(str(path))
    params = {plain_name(name): param for name, param in model.named_parameters()}
    unknown = sorted(set(saved) - set(params))
    if unknown:
        raise ValueError(f"{path}: the model has no parameter {', '.join(unknown)}")
    for name, value in saved.items():
        param = params[name]
        if tuple(param.shape) != tuple(value.shape):
            raise ValueError(f"{path}: {name} has shape {tuple(value.shape)}, the model's {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(value.to(param.device, param.dtype))
        if trainable is not None:
            param.requires_grad_(trainable)
    return sorted(saved)
