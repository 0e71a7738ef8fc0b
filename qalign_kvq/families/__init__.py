"""Model families: one small adapter module per family, looked up by name or ``model_type``."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from qalign_kvq.families.base import ANSWER_PREFIX, DEFAULT_QUESTION, QUESTIONS, Family, ModelInputs

#: family name -> "module:Class" of its adapter.
_ADAPTERS = {
    "qwen2_vl": "qalign_kvq.families.qwen_vl:Qwen2VLFamily",
    "qwen2_5_vl": "qalign_kvq.families.qwen_vl:Qwen25VLFamily",
    "qwen3_vl": "qalign_kvq.families.qwen_vl:Qwen3VLFamily",
    "llava_onevision": "qalign_kvq.families.llava_onevision:LlavaOneVisionFamily",
    "internvl": "qalign_kvq.families.internvl:InternVLFamily",
    "mplug_owl2": "qalign_kvq.families.mplug_owl2:MPLUGOwl2Family",
}

FAMILY_NAMES = tuple(_ADAPTERS)


def family_class(name: str) -> type[Family]:
    """The adapter class of a family by name."""
    if name not in _ADAPTERS:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(_ADAPTERS)}")
    module_name, class_name = _ADAPTERS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def family_option_names(name: str) -> tuple[str, ...]:
    """The constructor options a family takes (``clip_fps`` for Qwen-VL, ``prompt_layout`` for
    mPLUG-Owl2, ...)."""
    return tuple(inspect.signature(family_class(name)).parameters)


def get_family(name: str, **options: Any) -> Family:
    """The adapter of a family by name (``qwen2_5_vl``, ``mplug_owl2``, ...), built with ``options``
    (its constructor arguments, as stored in ``CheckpointMeta.family_options``)."""
    known = family_option_names(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"model family {name!r} has no option {', '.join(map(repr, unknown))}; "
                         f"its options: {', '.join(known) or 'none'}")
    return family_class(name)(**options)


def family_for_model_type(model_type: str) -> Family:
    """The adapter that handles a ``config.model_type``."""
    for name in _ADAPTERS:
        if model_type in family_class(name).model_types:
            return get_family(name)
    raise ValueError(f"no qalign-kvq family handles model_type {model_type!r}; known families: {', '.join(_ADAPTERS)}")


__all__ = ["ANSWER_PREFIX", "DEFAULT_QUESTION", "FAMILY_NAMES", "QUESTIONS", "Family", "ModelInputs",
           "family_class", "family_for_model_type", "family_option_names", "get_family"]
