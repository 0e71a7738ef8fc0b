"""Load a scoring model: a qalign-kvq checkpoint directory (full weights or a peft adapter), a hub
id, or a plain transformers model directory.

``load_checkpoint(path_or_id) -> (model, processor, family, meta)``; the model is in eval mode on
``device`` with ``dtype`` (defaults: the first CUDA device in bfloat16, else the CPU in float32).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from qalign_kvq.checkpoint import META_FILE, CheckpointMeta
from qalign_kvq.families import Family, family_class, family_for_model_type, get_family
from qalign_kvq.hub import is_adapter, resolve_base_model, resolve_checkpoint

logger = logging.getLogger(__name__)


def default_device_dtype(device: str | torch.device | None = None,
                         dtype: torch.dtype | str | None = None) -> tuple[torch.device, torch.dtype]:
    """CUDA + bfloat16 when a GPU is there, else CPU + float32; explicit values win."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dev, dtype


def _read_model_type(directory: Path) -> str:
    config = directory / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{directory}: neither a qalign-kvq checkpoint ({META_FILE}) nor a transformers "
                                f"model directory (config.json)")
    model_type = json.loads(config.read_text()).get("model_type")
    if not model_type:
        raise ValueError(f"{config}: no model_type")
    return model_type


def load_meta(directory: Path) -> tuple[CheckpointMeta, Family]:
    """The checkpoint metadata and family of a model directory, the family built with
    ``meta.family_options``. A plain transformers directory gets a warning, its family from
    ``config.model_type`` with the family's ``zero_shot_options`` (how its authors score it) and the
    nominal 1..5 range."""
    if (directory / META_FILE).is_file():
        meta = CheckpointMeta.load(directory)
        try:
            family = get_family(meta.family, **meta.family_options)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{directory / META_FILE}: {err}") from err
        return meta, family
    name = family_for_model_type(_read_model_type(directory)).name
    options = dict(family_class(name).zero_shot_options)
    logger.warning("%s: no %s; scoring as family %r%s on the nominal 1..5 MOS range", directory, META_FILE, name,
                   f" with {options}" if options else "")
    return CheckpointMeta(family=name, family_options=options), get_family(name, **options)


def load_merged_adapter(directory: str | os.PathLike, meta: CheckpointMeta, family: Family,
                        dtype: torch.dtype | None = None, **load_kwargs):
    """``(model, processor)``: the base model of the peft adapter in ``directory`` (resolved by path
    or hub id from ``meta.base_model`` or the adapter config) with the adapter merged into it.
    ``load_kwargs`` go to the base model's ``from_pretrained``."""
    from peft import PeftModel

    model, processor = family.load(str(resolve_base_model(directory, meta)), dtype=dtype, **load_kwargs)
    return PeftModel.from_pretrained(model, str(directory)).merge_and_unload(), processor


def load_checkpoint(
    path_or_id: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
    vision_attention: str = "packed",
):
    """``(model, processor, family, meta)`` from a directory or hub id, ready for scoring.

    A directory holding ``adapter_config.json`` is a peft adapter: the base model named by
    ``meta.base_model`` (or the adapter config) is loaded with its processor, and the adapter is
    attached and merged. ``attn_implementation`` (``sdpa``, ``eager``, ``flash_attention_2``...)
    goes to ``from_pretrained``; None keeps transformers' default. ``vision_attention``: ``packed``
    (Qwen-VL vision attention in one call per layer) or ``stock`` (see :meth:`Family.load`).
    """
    directory = resolve_checkpoint(path_or_id)
    meta, family = load_meta(directory)
    dev, dt = default_device_dtype(device, dtype)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    kwargs["vision_attention"] = vision_attention
    if is_adapter(directory):
        model, processor = load_merged_adapter(directory, meta, family, dtype=dt, **kwargs)
    else:
        model, processor = family.load(str(directory), dtype=dt, **kwargs)
    model.to(dev).eval()
    return model, processor, family, meta

