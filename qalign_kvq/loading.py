"""Load a scoring model: a qalign-kvq checkpoint directory (full weights or a peft adapter), a hub
id, or a plain transformers model directory (a public checkpoint such as ``q-future/one-align``).

``load_checkpoint(path_or_id) -> (model, processor, family, meta)``; the model is in eval mode on
``device`` with ``dtype`` (defaults: the first CUDA device in bfloat16, else the CPU in float32).
Weights the model needs and the checkpoint lacks are an error, not a warning.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from qalign_kvq.bare_parameters import load_bare_parameters
from qalign_kvq.checkpoint import FORMAT_VERSION, META_FILE, CheckpointMeta
from qalign_kvq.families import Family, family_class, family_for_model_type, get_family
from qalign_kvq.resolve import is_adapter, resolve_base_model, resolve_checkpoint

logger = logging.getLogger(__name__)

#: The public checkpoint ``python -m qalign_kvq.infer`` scores with when no ``--model`` is given.
DEFAULT_MODEL = "q-future/one-align"
#: Files that make a directory hold its own processor (a training run saves it beside the adapter).
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json")


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


def load_meta(directory: Path, family_overrides: dict[str, Any] | None = None) -> tuple[CheckpointMeta, Family]:
    """The checkpoint metadata and family of a model directory, the family built with
    ``meta.family_options`` and ``family_overrides`` on top. A plain transformers directory (a
    public checkpoint) gets its family from ``config.model_type`` with the family's
    ``zero_shot_options``, the nominal 1..5 range and the ``authors`` scoring protocol."""
    overrides = dict(family_overrides or {})
    if (directory / META_FILE).is_file():
        meta = CheckpointMeta.load(directory)
        options = dict(meta.family_options)
        if meta.format_version < 2 and meta.family == "mplug_owl2":
            options.setdefault("prompt_layout", "image_first")  # the default those checkpoints trained with
        options.update(overrides)
        try:
            family = get_family(meta.family, **options)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{directory / META_FILE}: {err}") from err
        return replace(meta, family_options=options), family
    name = family_for_model_type(_read_model_type(directory)).name
    options = {**family_class(name).zero_shot_options, **overrides}
    logger.info("%s: a public checkpoint (no %s): family %r%s, scored the authors' way", directory, META_FILE, name,
                f" with {options}" if options else "")
    return CheckpointMeta(family=name, family_options=options, protocol="authors"), get_family(name, **options)


def has_processor(directory: str | os.PathLike) -> bool:
    """Whether a directory holds processor / tokenizer files of its own."""
    return any((Path(directory) / name).is_file() for name in PROCESSOR_FILES)


def load_merged_adapter(directory: str | os.PathLike, meta: CheckpointMeta, family: Family,
                        dtype: torch.dtype | None = None, **load_kwargs):
    """``(model, processor)``: the base model of the peft adapter in ``directory`` (resolved by path
    or hub id from ``meta.base_model`` or the adapter config, at ``meta.base_revision``) with the
    adapter merged into it and the bare parameters saved beside it restored. The processor is the
    one saved beside the adapter (what training used), the base's only when the adapter directory
    has none. ``load_kwargs`` go to ``from_pretrained``."""
    from peft import PeftModel

    processor_path = str(directory) if has_processor(directory) else None
    model, processor = family.load(str(resolve_base_model(directory, meta)), dtype=dtype,
                                   processor_path=processor_path, **load_kwargs)
    merged = PeftModel.from_pretrained(model, str(directory)).merge_and_unload()
    load_bare_parameters(merged, directory)  # what peft's adapter file cannot hold (image_newline)
    return merged, processor


def load_checkpoint(
    path_or_id: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
    family_overrides: dict[str, Any] | None = None,
    vision_attention: str = "packed",
):
    """``(model, processor, family, meta)`` from a directory or hub id, ready for scoring.

    A directory holding ``adapter_config.json`` is a peft adapter: the base model named by
    ``meta.base_model`` (or the adapter config) is loaded, the adapter attached and merged, with the
    processor and family options saved beside the adapter. ``attn_implementation`` (``sdpa``,
    ``eager``, ``flash_attention_2``...) goes to ``from_pretrained``; None keeps transformers'
    default. ``family_overrides`` replace stored family options (e.g. ``{"frame_pixels": N}``).
    The returned ``meta.family_options`` are the family's options as resolved (budget included).
    ``vision_attention``: ``packed`` (Qwen-VL vision attention in one call per layer) or ``stock``
    (see :meth:`Family.load`).
    """
    directory = resolve_checkpoint(path_or_id)
    meta, family = load_meta(directory, family_overrides)
    dev, dt = default_device_dtype(device, dtype)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    kwargs["vision_attention"] = vision_attention
    if is_adapter(directory):
        model, processor = load_merged_adapter(directory, meta, family, dtype=dt, **kwargs)
    else:
        model, processor = family.load(str(directory), dtype=dt, **kwargs)
    model.to(dev).eval()
    return model, processor, family, replace(meta, family_options=family.options(), format_version=FORMAT_VERSION)
