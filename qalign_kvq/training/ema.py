"""Exponential moving average (EMA) of the trainable weights, as a ``TrainerCallback``.

After every optimizer step ``ema = d * ema + (1 - d) * w`` for each trainable parameter ``w``
(LoRA adapters and ``modules_to_save``, or every unfrozen weight), kept in float32, starting from
the weights training starts with. ``d`` is ``decay``, or with ``warmup`` ``min(decay, (1 + t) /
(10 + t))`` at update ``t`` (1, 2, ...), so that the first steps do not pin the average to the
untrained weights.

What uses the EMA weights: every evaluation during training (they are swapped in just before it
and the trained weights put back right after, so training itself never sees them), hence the
best-checkpoint selection; and the model at the end of training, which the recipe saves: the EMA
of the last step, or with ``load_best_model_at_end`` the EMA stored in the best checkpoint. Each
``checkpoint-*`` folder holds the trained weights (what resuming continues from) and the EMA in
``ema.safetensors``; resuming restores it. Every process keeps its own copy (DDP and DeepSpeed
ZeRO-2 hold whole parameters on every rank, so the copies agree); ZeRO-3 and FSDP, whose ranks
hold only shards, are refused.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

EMA_FILE = "ema.safetensors"


class EMAError(RuntimeError):
    """The EMA cannot run in this setup, or a checkpoint's EMA does not fit the model."""


class EMACallback(TrainerCallback):
    """Keeps the EMA of the trainable parameters; see the module docstring."""

    def __init__(self, decay: float, warmup: bool = False, on_cpu: bool = False,
                 resume_from_checkpoint: str | os.PathLike | None = None):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay, self.warmup, self.on_cpu = float(decay), bool(warmup), bool(on_cpu)
        self.resume_from = resume_from_checkpoint
        self.params: dict[str, torch.nn.Parameter] = {}
        self.shadow: dict[str, torch.Tensor] = {}
        self._trained: dict[str, torch.Tensor] | None = None  # the trained weights while the EMA is swapped in

    def decay_at(self, update: int) -> float:
        """The decay of update ``update`` (1 = the first optimizer step)."""
        return min(self.decay, (1.0 + update) / (10.0 + update)) if self.warmup else self.decay

    @property
    def swapped(self) -> bool:
        return self._trained is not None

    # ----- the callback ---------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if args.fsdp:
            raise EMAError("ema_decay with FSDP: each process holds only shards of the weights; use DDP or "
                           "DeepSpeed ZeRO-2")
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise EMAError("ema_decay: the model has no trainable parameters")
        if any(hasattr(p, "ds_tensor") for p in self.params.values()):
            raise EMAError("ema_decay with DeepSpeed ZeRO-3: each process holds only shards of the weights; use "
                           "ZeRO-2 (ds_configs/zero2.json) or DDP")
        device = torch.device("cpu") if self.on_cpu else None
        if self.resume_from is not None:
            self.shadow = load_ema(self.resume_from, self.params, expected_step=state.global_step, device=device)
        else:
            self.shadow = {name: p.detach().to(device=device or p.device, dtype=torch.float32, copy=True)
                           for name, p in self.params.items()}

    @torch.no_grad()
    def on_step_end(self, args, state, control, **kwargs):
        self._put_back()
        d = self.decay_at(state.global_step)
        for name, p in self.params.items():
            avg = self.shadow[name]
            avg.mul_(d).add_(p.detach().to(device=avg.device, dtype=torch.float32), alpha=1.0 - d)
        if control.should_evaluate:  # the Trainer evaluates right after this event
            self._swap_in()

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_evaluate and not self.swapped:
            self._swap_in()

    def on_evaluate(self, args, state, control, **kwargs):
        self._put_back()

    def on_save(self, args, state, control, **kwargs):
        self._put_back()
        if args.should_save:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if folder.is_dir():
                save_ema(folder, self.shadow, self.decay, state.global_step)

    @torch.no_grad()
    def on_train_end(self, args, state, control, **kwargs):
        self._put_back()
        final = self.shadow
        if args.load_best_model_at_end and state.best_model_checkpoint:
            final = load_ema(state.best_model_checkpoint, self.params)
        for name, p in self.params.items():
            p.copy_(final[name].to(device=p.device, dtype=p.dtype))

    # ----- swapping ---------------------------------------------------------------------------
    @torch.no_grad()
    def _swap_in(self) -> None:
        self._trained = {name: p.detach().clone() for name, p in self.params.items()}
        for name, p in self.params.items():
            p.copy_(self.shadow[name].to(device=p.device, dtype=p.dtype))

    @torch.no_grad()
    def _put_back(self) -> None:
        if self._trained is None:
            return
        for name, p in self.params.items():
            p.copy_(self._trained[name])
        self._trained = None


def save_ema(folder: str | os.PathLike, shadow: dict[str, torch.Tensor], decay: float, step: int) -> Path:
    """Write ``folder/ema.safetensors`` atomically (tensors by parameter name; decay and step as metadata)."""
    from safetensors.torch import save_file

    path = Path(folder) / EMA_FILE
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({name: t.detach().cpu().contiguous() for name, t in shadow.items()}, tmp,
                  metadata={"decay": repr(decay), "step": str(step)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_ema(folder: str | os.PathLike, params: dict[str, torch.nn.Parameter], expected_step: int | None = None,
             device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The EMA stored in ``folder`` (float32, on each parameter's device or ``device``), checked
    against the trainable parameters (names, shapes) and, when given, the step resumed from."""
    from safetensors import safe_open

    path = Path(folder) / EMA_FILE
    if not path.is_file():
        raise EMAError(f"{folder}: no {EMA_FILE}: the checkpoint was saved without ema_decay (or its run stopped "
                       "while saving); resume from an earlier checkpoint or without ema_decay")
    with safe_open(str(path), framework="pt") as handle:
        step = int((handle.metadata() or {}).get("step", -1))
        keys = set(handle.keys())
        if keys != set(params):
            missing, extra = sorted(set(params) - keys), sorted(keys - set(params))
            raise EMAError(f"{path}: holds other parameters than the trainable ones (missing {missing[:3]}, "
                           f"unexpected {extra[:3]})")
        out = {}
        for name, p in params.items():
            tensor = handle.get_tensor(name)
            if tuple(tensor.shape) != tuple(p.shape):
                raise EMAError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model's {tuple(p.shape)}")
            out[name] = tensor.to(device=device or p.device, dtype=torch.float32)
    if expected_step is not None and step != expected_step:
        raise EMAError(f"{path}: the EMA is of step {step}, the checkpoint resumes at step {expected_step}")
    return out
