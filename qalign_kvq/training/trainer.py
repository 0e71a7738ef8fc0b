"""The Trainer subclass: the quality losses (Q-Align CE, DeQA-style soft-label KL + fidelity rank
loss) and a vision-side learning rate; plus the challenge metrics for ``compute_metrics``."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import EvalPrediction, Trainer

from qalign_kvq.bare_parameters import load_bare_parameters, save_bare_parameters
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


def fidelity_rank_loss(level_logits: torch.Tensor, level_scores: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Thurstone fidelity loss over all in-batch pairs: ``P(i > j) = Phi((s_i - s_j) / sqrt(2))`` with
    ``s`` the expected level score; target 1, 0 or 0.5 (tie) from the true level scores. 0 without pairs."""
    probs = F.softmax(level_logits.float(), dim=-1)
    scores = probs @ torch.as_tensor(LEVEL_SCORES, dtype=probs.dtype, device=probs.device)
    n = scores.shape[0]
    if n < 2:
        return scores.sum() * 0.0
    i, j = torch.triu_indices(n, n, offset=1, device=scores.device)
    p = 0.5 * (1 + torch.erf((scores[i] - scores[j]) / 2.0))  # Phi(d / sqrt(2)) = (1 + erf(d / 2)) / 2
    truth = level_scores.to(scores.device).float()
    target = (torch.sign(truth[i] - truth[j]) + 1) / 2
    return (1 - torch.sqrt(target * p + eps) - torch.sqrt((1 - target) * (1 - p) + eps)).mean()


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
            loss = loss + self.weights["rank"] * fidelity_rank_loss(level_logits, targets["level_scores"])
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
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            load_bare_parameters(target, resume_from_checkpoint)
            return
        self._reload_weights(resume_from_checkpoint, target)

    def _load_best_model(self):
        if not self._plain_weights(self.model):
            super()._load_best_model()
            load_bare_parameters(self.model, self.state.best_model_checkpoint)
            return
        self._reload_weights(self.state.best_model_checkpoint, self.model)

    def _save(self, output_dir=None, state_dict=None):
        """Also writes the bare trainable parameters peft's adapter file leaves out (LLaVA-OneVision's
        ``image_newline``), for the final output and every checkpoint (:mod:`qalign_kvq.bare_parameters`)."""
        super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save:
            save_bare_parameters(self.model, output_dir or self.args.output_dir, state_dict or None)

    def create_optimizer(self, model=None):
        """The default optimizer, with ``vision_learning_rate`` on the parameters the filter selects."""
        if self.vision_learning_rate is None or self.vision_param_filter is None or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        groups: dict[tuple[bool, bool], list] = {}
        for name, param in opt_model.named_parameters():
            if param.requires_grad:
                groups.setdefault((name in decay, self.vision_param_filter(name)), []).append(param)
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
    expected score -> MOS scale -> SROCC, PLCC, Rank1, Rank2, Final (those that can be computed)."""
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
        result = compute_metrics(dict(zip(names, mos.tolist())), true, homologous_pairs, nonhomologous_pairs)
        return {k: float(v) for k, v in result.items() if v is not None and math.isfinite(v)}

    return metrics
