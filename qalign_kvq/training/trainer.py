"""The Trainer subclass: the quality losses (Q-Align CE, DeQA-style soft-label KL + fidelity rank
loss) and a vision-side learning rate; plus the challenge metrics for ``compute_metrics``."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import EvalPrediction, Trainer

from qalign_kvq.levels import LEVEL_SCORES, LevelScale, expected_score
from qalign_kvq.training.collator import TARGET_KEYS


def answer_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy averaged over the answer tokens (labels != -100) of the batch."""
    shifted = logits[:, :-1].float()
    targets = labels[:, 1:].to(shifted.device)
    return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=-100)


def soft_label_kl(level_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax over the five level logits), averaged over the batch."""
    return F.kl_div(F.log_softmax(level_logits.float(), dim=-1), targets.float(), reduction="batchmean")


def _expected_scores(level_logits: torch.Tensor) -> torch.Tensor:
    probs = F.softmax(level_logits.float(), dim=-1)
    return probs @ torch.as_tensor(LEVEL_SCORES, dtype=probs.dtype, device=probs.device)


def _pair_fidelity(scores: torch.Tensor, truth: torch.Tensor, eps: float) -> torch.Tensor:
    n = scores.shape[0]
    if n < 2:
        return scores.sum() * 0.0
    i, j = torch.triu_indices(n, n, offset=1, device=scores.device)
    p = 0.5 * (1 + torch.erf((scores[i] - scores[j]) / 2.0))  # Phi(d / sqrt(2)) = (1 + erf(d / 2)) / 2
    truth = truth.to(scores.device).float()
    target = (torch.sign(truth[i] - truth[j]) + 1) / 2
    return (1 - torch.sqrt(target * p + eps) - torch.sqrt((1 - target) * (1 - p) + eps)).mean()


def fidelity_rank_loss(level_logits: torch.Tensor, level_scores: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Thurstone fidelity loss over all in-batch pairs: ``P(i > j) = Phi((s_i - s_j) / sqrt(2))`` with
    ``s`` the expected level score; target 1, 0 or 0.5 (tie) from the true level scores. 0 without pairs."""
    return _pair_fidelity(_expected_scores(level_logits), level_scores, eps)


def global_fidelity_rank_loss(level_logits: torch.Tensor, level_scores: torch.Tensor,
                              eps: float = 1e-8) -> torch.Tensor:
    """:func:`fidelity_rank_loss` over the pairs of the global micro-batch (every process's clips of
    this step, in rank order), as one process with the whole batch would compute it. Each process's
    gradient flows through its own clips and is scaled by the world size, so the average that DDP or
    DeepSpeed takes is the single-process gradient; the value is the same on every process."""
    import torch.distributed as dist

    scores = _expected_scores(level_logits)
    truth = level_scores.to(scores.device).float()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return _pair_fidelity(scores, truth, eps)
    world, rank = dist.get_world_size(), dist.get_rank()
    size = torch.tensor([scores.shape[0]], device=scores.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    padded = F.pad(torch.stack([scores.detach(), truth]), (0, max(sizes) - scores.shape[0]))
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    all_scores = torch.cat([scores if r == rank else part[0, :n] for r, (part, n) in enumerate(zip(parts, sizes))])
    all_truth = torch.cat([part[1, :n] for part, n in zip(parts, sizes)])
    loss = _pair_fidelity(all_scores, all_truth, eps)
    return loss + (world - 1) * (loss - loss.detach())


#: ``optim`` values DeepSpeed's CPU AdamW stands for where the optimizer is offloaded
_ADAMW = {"adamw_torch", "adamw_torch_fused"}


def offloads_optimizer(ds_config: dict) -> bool:
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device") in ("cpu", "nvme")


def deepspeed_optimizer_problem(ds_config: dict, vision_learning_rate: float | None, optim) -> str | None:
    """What a DeepSpeed config would silently not honour, or None. Its ``optimizer`` block makes
    DeepSpeed build the optimizer from every trainable parameter (``create_optimizer`` never runs),
    so ``vision_learning_rate`` would not apply; without the block, an offloaded optimizer runs
    DeepSpeed's CPU AdamW (see ``create_optimizer``), which stands only for the AdamW ``optim``s."""
    if vision_learning_rate is not None and "optimizer" in ds_config:
        return ("its 'optimizer' block makes DeepSpeed build the optimizer, which would train the vision tower at "
                "learning_rate, not vision_learning_rate: remove the block (the Trainer then builds the optimizer "
                "with the vision parameter group, DeepSpeed's CPU AdamW where the optimizer is offloaded)")
    optim = getattr(optim, "value", optim)
    if offloads_optimizer(ds_config) and "optimizer" not in ds_config and optim not in _ADAMW:
        return f"the offloaded optimizer runs DeepSpeed's CPU AdamW: optim {optim} cannot be honoured; use adamw_torch"
    return None


class QualityTrainer(Trainer):
    """``Trainer`` whose loss is ``ce_weight * CE(answer)`` (``loss="ce"``), or with ``loss="deqa"``
    ``ce_weight * CE + kl_weight * KL(soft label) + rank_weight * fidelity``. Evaluation returns the
    five level logits at the level position as predictions (``label_names=["mos"]``)."""

    loss_is_scaled_for_ga = False  # per-batch means: the Trainer divides by the accumulation steps

    def __init__(self, *args, level_token_ids: Sequence[int], loss: str = "ce", ce_weight: float = 1.0,
                 kl_weight: float = 1.0, rank_weight: float = 1.0, vision_learning_rate: float | None = None,
                 vision_param_filter: Callable[[str], bool] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.level_token_ids = list(level_token_ids)
        self.loss_kind = loss
        self.weights = {"ce": ce_weight, "kl": kl_weight, "rank": rank_weight}
        self.vision_learning_rate = vision_learning_rate
        self.vision_param_filter = vision_param_filter
        self._check_optimizer_settings()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        targets = {key: inputs.pop(key, None) for key in TARGET_KEYS}
        labels = inputs.pop("labels", None)
        outputs = model(**inputs)
        logits = outputs.logits
        rows = torch.arange(logits.shape[0], device=logits.device)
        positions = targets["level_positions"].to(logits.device)
        level_logits = logits[rows, positions][:, self.level_token_ids].float()
        loss = logits.new_zeros((), dtype=torch.float32)
        if labels is not None and (self.loss_kind == "ce" or self.weights["ce"] > 0):
            loss = loss + self.weights["ce"] * answer_ce(logits, labels)
        if self.loss_kind == "deqa":
            loss = loss + self.weights["kl"] * soft_label_kl(level_logits, targets["soft_labels"].to(logits.device))
            loss = loss + self.weights["rank"] * global_fidelity_rank_loss(level_logits, targets["level_scores"])
        return (loss, {"level_logits": level_logits.detach()}) if return_outputs else loss

    # transformers issue 43701: the Trainer reloads full-weight checkpoints (resume, best model) with
    # ``load_state_dict`` on the saved keys, but ``save_pretrained`` writes VLMs (Qwen-VL, LLaVA, ...)
    # in their original key format, so nothing matches and the weights silently stay as they are.
    # Reload such checkpoints with ``from_pretrained`` (which converts the keys) and load strictly.
    def _plain_weights(self, model) -> bool:
        from peft import PeftModel

        return not (self.is_deepspeed_enabled or self.is_fsdp_enabled or isinstance(model, PeftModel))

    def _reload_weights(self, checkpoint: str, model) -> None:
        loaded = type(model).from_pretrained(checkpoint, dtype=next(model.parameters()).dtype)
        model.load_state_dict(loaded.state_dict(), strict=True)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        target = self.model if model is None else model
        if not self._plain_weights(target):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._reload_weights(resume_from_checkpoint, target)

    def _load_best_model(self):
        if not self._plain_weights(self.model):
            return super()._load_best_model()
        self._reload_weights(self.state.best_model_checkpoint, self.model)

    def _optimizer_offloaded(self) -> bool:
        config = getattr(self.args, "hf_deepspeed_config", None)
        return bool(self.is_deepspeed_enabled and config is not None and offloads_optimizer(config.config))

    def _check_optimizer_settings(self) -> None:
        config = getattr(self.args, "hf_deepspeed_config", None)
        if self.is_deepspeed_enabled and config is not None:
            problem = deepspeed_optimizer_problem(config.config, self.vision_learning_rate, self.args.optim)
            if problem:
                raise ValueError(f"DeepSpeed config {self.args.deepspeed}: {problem}")

    def create_optimizer(self, model=None):
        """The default optimizer, with ``vision_learning_rate`` on the parameters the filter selects;
        DeepSpeed's CPU AdamW (same groups and hyper-parameters) where DeepSpeed offloads the optimizer."""
        split = self.vision_learning_rate is not None and self.vision_param_filter is not None
        offload = self._optimizer_offloaded()
        if self.optimizer is not None or not (split or offload):
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        groups: dict[tuple[bool, bool], list] = {}
        for name, param in opt_model.named_parameters():
            if param.requires_grad:
                groups.setdefault((name in decay, split and self.vision_param_filter(name)), []).append(param)
        if offload:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer_cls, kwargs = DeepSpeedCPUAdam, {
                "lr": self.args.learning_rate, "betas": (self.args.adam_beta1, self.args.adam_beta2),
                "eps": self.args.adam_epsilon, "adamw_mode": True}
        else:
            optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        param_groups = []
        for (decays, vision), params in groups.items():
            group = {"params": params, "weight_decay": self.args.weight_decay if decays else 0.0}
            if vision:
                group["lr"] = self.vision_learning_rate
            param_groups.append(group)
        self.optimizer = optimizer_cls(param_groups, **kwargs)
        return self.optimizer


def make_compute_metrics(filenames: Sequence[str], truth: Sequence[float], scale: LevelScale,
                         homologous_pairs=None, nonhomologous_pairs=None) -> Callable[[EvalPrediction], dict]:
    """``compute_metrics`` for the Trainer: level logits of the validation rows (in table order) ->
    expected score -> MOS scale -> SROCC, PLCC, Rank1, Rank2, Final (those that can be computed).
    The function keeps its latest MOS-scale predictions (filename -> score) in ``last_predictions``
    and the truth in ``truth``: the run's validation scatter draws them."""
    from qalign_kvq.evaluate import compute_metrics

    names = list(filenames)
    true = {n: float(s) for n, s in zip(names, truth)}

    def metrics(prediction: EvalPrediction) -> dict[str, float]:
        logits = np.asarray(prediction.predictions, dtype=np.float64)
        if logits.shape != (len(names), 5):
            raise ValueError(f"expected level logits of shape ({len(names)}, 5), got {logits.shape}")
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        mos = scale.to_mos(expected_score(probs))
        metrics.last_predictions = dict(zip(names, mos.tolist()))
        result = compute_metrics(dict(zip(names, mos.tolist())), true, homologous_pairs, nonhomologous_pairs)
        return {k: float(v) for k, v in result.items() if v is not None and math.isfinite(v)}

    metrics.last_predictions, metrics.truth = None, true
    return metrics
