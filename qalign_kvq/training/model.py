"""Load a model for fine-tuning and make its trainable set: LoRA (peft) or full fine-tuning, with
freeze switches for the vision tower, the projector/abstractor and the language model."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from qalign_kvq.bare_parameters import load_bare_parameters
from qalign_kvq.checkpoint import META_FILE, CheckpointMeta
from qalign_kvq.families import Family, family_for_model_type, get_family

_WRAPPERS = ("module.", "base_model.model.")


def _strip(name: str) -> str:
    for prefix in _WRAPPERS:
        name = name.removeprefix(prefix)
    return name


def in_group(name: str, prefixes: Sequence[str]) -> bool:
    """Whether a parameter/module name (plain, peft- or DDP-wrapped) lies under one of the prefixes."""
    name = _strip(name)
    return any(name.startswith(p) or name + "." == p for p in prefixes)


def resolve_dtype(dtype: str, method: str) -> torch.dtype:
    """``auto``: bfloat16 on GPU for LoRA (the base stays frozen), float32 otherwise (full fine-tuning
    keeps float32 master weights; bf16 autocast or DeepSpeed's bf16 handle the compute)."""
    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and method == "lora" else torch.float32
    return getattr(torch, dtype)


@dataclass
class TrainingModel:
    """What :func:`load_for_training` returns: the model and processor, the family (its
    ``options()`` are what the new checkpoint stores, frame budget resolved), and the base model's
    id or path with its Hub commit (None for a local base)."""

    model: Any
    processor: Any
    family: Family
    base_model: str
    base_revision: str | None


def load_for_training(model_name_or_path: str, family_name: str | None = None, dtype: torch.dtype = torch.float32,
                      family_options: dict | None = None, **load_kwargs) -> TrainingModel:
    """Load the model to fine-tune. A qalign-kvq LoRA output directory (adapter + ``qalign_kvq.json``)
    loads its base (at the revision it was trained on) and keeps the adapter trainable (two-stage
    training), with the processor saved beside it; ``base_model`` is then the base's path or id,
    else ``model_name_or_path``. The family is built with ``family_options`` on top of those a
    qalign-kvq checkpoint stores (same family). A public checkpoint trains with the family's
    defaults (its ``zero_shot_options`` are for scoring only)."""
    from qalign_kvq.loading import has_processor, load_meta
    from qalign_kvq.resolve import adapter_base_model, is_adapter, resolve_base_model, resolve_checkpoint, snapshot_revision

    directory = resolve_checkpoint(model_name_or_path)
    meta = None
    inherited: dict = {}
    if (directory / META_FILE).is_file():
        meta, stored = load_meta(directory)
        family_name = family_name or meta.family
        inherited = stored.options() if stored.name == family_name else {}
    elif family_name is None:
        config = directory / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"{directory}: no config.json or {META_FILE}; pass family explicitly")
        family_name = family_for_model_type(json.loads(config.read_text()).get("model_type", "")).name
    options = {**inherited, **(family_options or {})}
    try:
        family = get_family(family_name, **options)
    except (ValueError, TypeError) as err:
        raise ValueError(f"family_options {options}: {err}") from err
    if is_adapter(directory):
        from peft import PeftModel

        meta = meta or CheckpointMeta(family=family.name)
        model, processor = family.load(str(resolve_base_model(directory, meta)), dtype=dtype,
                                       processor_path=str(directory) if has_processor(directory) else None,
                                       **load_kwargs)
        model = PeftModel.from_pretrained(model, str(directory), is_trainable=True)
        load_bare_parameters(model, directory, trainable=True)
        return TrainingModel(model, processor, family, adapter_base_model(directory, meta), meta.base_revision)
    model, processor = family.load(str(directory), dtype=dtype, **load_kwargs)
    return TrainingModel(model, processor, family, str(model_name_or_path), snapshot_revision(directory))


def _existing_modules(model, prefixes: Sequence[str]) -> list[str]:
    """Names of the modules the prefixes name (a ``ModuleList`` stands for its items)."""
    modules = dict(model.named_modules())
    names = []
    for prefix in prefixes:
        name = prefix.rstrip(".")
        module = modules.get(name)
        if isinstance(module, torch.nn.ModuleList):
            names += [f"{name}.{child}" for child, _ in module.named_children()]
        elif module is not None:
            names.append(name)
    return names


def _prefix_regex(prefixes: Sequence[str]) -> str:
    return "^(" + "|".join(re.escape(p.rstrip(".")) for p in prefixes) + r")(\..*)?$"


def _vision_inputs_require_grad(model, prefixes: Sequence[str]) -> None:
    """Reentrant checkpointing gives the parameters of a checkpointed block gradients only when an
    input of the block requires grad. ``enable_input_require_grads`` sees to that for the embeddings
    that (sub-)models expose with ``get_input_embeddings``; not every vision tower does (mPLUG-Owl2's
    does not), and its adapters would silently get no gradient. This makes the floating-point inputs
    (pixels) of each vision module named by ``prefixes`` require grad while gradients are on."""

    def hook(module, args, kwargs):
        if torch.is_grad_enabled():
            for value in (*args, *kwargs.values()):
                if isinstance(value, torch.Tensor) and value.is_floating_point() and value.is_leaf:
                    value.requires_grad_(True)

    modules = dict(model.named_modules())
    for prefix in prefixes:
        module = modules.get(prefix.rstrip("."))
        if module is not None and not isinstance(module, torch.nn.ModuleList):
            module.register_forward_pre_hook(hook, with_kwargs=True)


def prepare_model(model, family: Family, method: str = "lora", *, lora_r: int = 16, lora_alpha: int = 32,
                  lora_dropout: float = 0.05, lora_targets: Sequence[str] | str | None = None,
                  freeze_vision: bool = True, freeze_projector: bool | None = None, freeze_language: bool = False,
                  gradient_checkpointing: bool = False):
    """Set which parameters train and return the model (a ``PeftModel`` for ``method="lora"``).

    Full: every parameter trains except the frozen groups (parameters outside the family's three
    groups follow the language switch). LoRA: adapters on ``lora_targets`` outside frozen groups;
    by default the family's language-model targets unless ``freeze_language``, plus its vision-tower
    targets (``Family.vision_lora_targets``) when the tower is unfrozen (a family without them
    refuses). An unfrozen projector is trained fully and saved with the adapter (peft
    ``modules_to_save``; bare parameters such as LLaVA-OneVision's ``image_newline`` are made
    trainable and saved beside it, :mod:`qalign_kvq.bare_parameters`).
    ``freeze_projector=None`` means trained for full fine-tuning, frozen for LoRA."""
    if freeze_projector is None:
        freeze_projector = method == "lora"
    frozen = {"vision": freeze_vision, "projector": freeze_projector, "language": freeze_language}
    groups = {"vision": family.vision_prefixes, "projector": family.projector_prefixes,
              "language": family.language_prefixes}

    def group_of(name: str) -> str:
        for group in ("vision", "projector", "language"):
            if in_group(name, groups[group]):
                return group
        return "language"

    if method == "full":
        for name, param in model.named_parameters():
            param.requires_grad_(not frozen[group_of(name)])
        return model
    if method != "lora":
        raise ValueError(f"method must be lora or full, not {method!r}")

    from peft import LoraConfig, PeftModel, get_peft_model

    if isinstance(model, PeftModel):  # continuing an adapter (two-stage): keep its configuration
        return model
    for param in model.parameters():
        param.requires_grad_(False)
    if gradient_checkpointing:
        model.enable_input_require_grads()
        if not frozen["vision"]:
            _vision_inputs_require_grad(model, groups["vision"])
    excluded = [p for g in ("vision", "projector", "language") if frozen[g] or g == "projector" for p in groups[g]]
    save = _existing_modules(model, groups["projector"]) if not frozen["projector"] else []
    bare = _bare_parameters(model, groups["projector"]) if not frozen["projector"] else []
    targets = lora_targets if lora_targets is not None else default_lora_targets(
        family, vision=not frozen["vision"], language=not frozen["language"])
    config = LoraConfig(
        r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        target_modules=list(targets) if not isinstance(targets, str) else targets,
        exclude_modules=_prefix_regex(excluded) if excluded else None,
        modules_to_save=save or None,
    )
    model = get_peft_model(model, config)
    for name, param in model.named_parameters():
        if _strip(name) in bare:
            param.requires_grad_(True)
    return model


def default_lora_targets(family: Family, vision: bool, language: bool) -> Sequence[str] | str:
    """The family's LoRA targets for the unfrozen groups: its language-model targets and, for an
    unfrozen vision tower, its vision-tower targets (a regex). Refuses what LoRA cannot train."""
    if vision and not family.vision_lora_targets:
        raise ValueError(f"{family.name}: LoRA has no vision-tower targets for this family, so freeze_vision: false "
                         "would train nothing in the tower; fine-tune it with method: full, or name its modules "
                         "in lora_target_modules")
    if not vision and not language:
        raise ValueError(f"{family.name}: LoRA with freeze_vision and freeze_language both true has no module to "
                         "adapt; to train the projector alone use method: full with both frozen")
    if not vision:
        return family.lora_targets
    if not language:
        return family.vision_lora_targets
    text = family.lora_targets
    if not isinstance(text, str):  # peft's list semantics: the name, or a name ending in ".<target>"
        text = r"(.*\.)?(" + "|".join(re.escape(t) for t in text) + ")"
    return f"(?:{text})|(?:{family.vision_lora_targets})"


def _bare_parameters(model, prefixes: Sequence[str]) -> set[str]:
    """Prefixes that name a parameter rather than a module (``model.image_newline``): peft's
    ``modules_to_save`` cannot hold them."""
    names = {name for name, _ in model.named_parameters()}
    return {p.rstrip(".") for p in prefixes if p.rstrip(".") in names}


def drop_frozen_input_grad_hooks(model) -> int:
    """Remove the hooks that make the input embeddings of a frozen sub-model (a frozen vision tower)
    require gradients; returns how many were removed.

    With gradient checkpointing, transformers' ``enable_input_require_grads`` (called by the Trainer)
    hooks the input embeddings of every sub-model: for a Qwen-VL model also the vision tower's patch
    embedding, so the backward pass (and the checkpoint recompute) runs through the whole vision
    tower even when nothing in it trains (LoRA with ``freeze_vision``), where that gradient is never
    used. The language model's hook, which LoRA under checkpointing needs, stays."""
    from transformers import PreTrainedModel

    keep = model.get_input_embeddings()
    removed = 0
    for module in model.modules():
        if not isinstance(module, PreTrainedModel) or any(p.requires_grad for p in module.parameters()):
            continue
        try:
            embeddings = module.get_input_embeddings()
        except NotImplementedError:
            continue
        if embeddings is None or embeddings is keep or not hasattr(embeddings, "_forward_hooks"):
            continue
        for key, hook in list(embeddings._forward_hooks.items()):
            if "make_inputs_require_grad" in getattr(hook, "__qualname__", ""):
                del embeddings._forward_hooks[key]
                removed += 1
    return removed


class FrozenInputGradHooks(TrainerCallback):
    """At the start of training (after the Trainer has enabled gradient checkpointing), apply
    :func:`drop_frozen_input_grad_hooks` to the model."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            drop_frozen_input_grad_hooks(model)


def _numel(param: torch.nn.Parameter) -> int:
    """Elements of ``param``, also when DeepSpeed ZeRO-3 has partitioned it (then ``numel()`` is 0 and
    the full count is in ``ds_numel``)."""
    return getattr(param, "ds_numel", None) or param.numel()


def trainable_summary(model) -> str:
    """``"trainable N / total M parameters (x%)"``, counting ZeRO-3-partitioned parameters in full."""
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(_numel(p) for p in model.parameters())
    return f"trainable {trainable:,} / total {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)"


def save_outputs(trainer, processor, meta: CheckpointMeta, output_dir: str | Path) -> Path:
    """Write what scoring needs into ``output_dir``: weights (safetensors) or the peft adapter, the
    processor and ``qalign_kvq.json``. Call on every process (DeepSpeed gathers ZeRO-3 shards)."""
    output_dir = Path(output_dir)
    trainer.save_model(str(output_dir))
    if trainer.is_world_process_zero():
        processor.save_pretrained(str(output_dir))
        meta.save(output_dir)
    trainer.accelerator.wait_for_everyone()
    return output_dir
