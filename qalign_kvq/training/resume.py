"""Which Trainer checkpoint a run resumes from: the newest *complete* ``checkpoint-N``.

``Trainer._save_checkpoint`` (transformers 5.24) writes, in this order: the weights
(``save_model``: ``model.safetensors`` or its shards + index, or the peft adapter; under DeepSpeed
ZeRO-3 the 16-bit gathered weights), the optimizer (``optimizer.pt``; under DeepSpeed its
``global_stepN/`` folder and the ``latest`` tag, ending in a barrier of all processes), the scheduler,
the RNG states, and last ``trainer_state.json`` (process 0). So a checkpoint is complete when
``trainer_state.json`` parses and names step N, its weights are there (safetensors headers consistent
with the file sizes, every shard of an index present) and, unless ``save_only_model``, so is the
optimizer state. A job killed during a multi-GB save leaves a folder that fails one of these;
``transformers.trainer_utils.get_last_checkpoint`` would pick it anyway.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

logger = logging.getLogger(__name__)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _safetensors_problem(path: Path) -> str | None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):  # checks the header against the file size
            pass
    except (SafetensorError, OSError) as err:
        return f"{path.name} is not a complete safetensors file ({type(err).__name__}: {err})"
    return None


def _weights_problem(folder: Path, step: int) -> str | None:
    for index in ("model.safetensors.index.json", "adapter_model.safetensors.index.json"):
        if (folder / index).is_file():
            try:
                shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            except (ValueError, KeyError) as err:
                return f"{index} is unreadable ({err})"
            for shard in shards:
                if not (folder / shard).is_file():
                    return f"shard {shard} of {index} is missing"
                if problem := _safetensors_problem(folder / shard):
                    return problem
            return None
    for name in ("model.safetensors", "adapter_model.safetensors"):
        if (folder / name).is_file():
            return _safetensors_problem(folder / name)
    if any((folder / name).is_file() and (folder / name).stat().st_size for name in
           ("pytorch_model.bin", "adapter_model.bin")):
        return None
    if (folder / f"global_step{step}").is_dir():  # ZeRO-3 without gathered 16-bit weights: only DeepSpeed's
        return None
    return "no model weights"


def _optimizer_problem(folder: Path, step: int) -> str | None:
    if (folder / "optimizer.pt").is_file() and (folder / "optimizer.pt").stat().st_size:
        return None
    tag = f"global_step{step}"
    if (folder / tag).is_dir():
        latest = (folder / "latest").read_text().strip() if (folder / "latest").is_file() else None
        if latest != tag:
            return f"DeepSpeed's 'latest' tag does not name {tag}"
        if not any((folder / tag).glob("*optim_states.pt")):
            return f"{tag} holds no optimizer states"
        return None
    return "no optimizer state (optimizer.pt or DeepSpeed's global_step folder)"


def checkpoint_problem(folder: str | Path, save_only_model: bool = False) -> str | None:
    """Why ``folder`` (a ``checkpoint-N``) cannot be resumed from, or None when it is complete."""
    folder = Path(folder)
    match = _CHECKPOINT.match(folder.name)
    if not match or not folder.is_dir():
        return "not a checkpoint-N folder"
    step = int(match.group(1))
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
    except FileNotFoundError:
        return "no trainer_state.json (the Trainer writes it last)"
    except ValueError as err:
        return f"trainer_state.json is incomplete ({err})"
    if state.get("global_step") != step:
        return f"trainer_state.json is at step {state.get('global_step')}, not {step}"
    return _weights_problem(folder, step) or (None if save_only_model else _optimizer_problem(folder, step))


def last_complete_checkpoint(output_dir: str | Path, save_only_model: bool = False) -> str | None:
    """The newest complete ``checkpoint-N`` in ``output_dir`` (None when there is none); each newer
    incomplete one is logged with its reason and left in place."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    for _, folder in sorted(found, reverse=True):
        problem = checkpoint_problem(folder, save_only_model)
        if problem is None:
            return str(folder)
        logger.warning("not resuming from %s: %s", folder, problem)
    return None
