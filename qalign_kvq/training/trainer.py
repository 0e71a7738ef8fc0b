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
from qalign_kvq.training.answer_logits import answer_logits
from qalign_kvq.training.collator import TARGET_KEYS
from qalign_kvq.training.model import FrozenInputGradHooks
from qalign_kvq.training.ranking import rank_loss

#: Losses that add the pairwise rank term (``rank_weight`` x ``rank_loss`` over ``rank_pairs``).
RANKED_LOSSES = ("deqa", "ce_rank")


def soft_label_kl(level_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax over the level logits), averaged over the batch."""
    return F.kl_div(F.log_softmax(level_logits.float(), dim=-1), targets.float(), reduction="batchmean")


def fidelity_rank_loss(level_logits: torch.Tensor, level_scores: torch.Tensor) -> torch.Tensor:
    """Thurstone fidelity loss over all in-batch pairs: ``P(i > j) = Phi((s_i - s_j) / sqrt(2))`` with
    ``s`` the expected level score; target 1, 0 or 0.5 (tie) from the true level scores. 0 without
    pairs. These rows only (the training loss pairs across processes, see ``rank_loss``)."""
    return rank_loss(level_logits, level_scores, LEVEL_SCORES, kind="fidelity", across_processes=False)


def global_fidelity_rank_loss(level_logits: torch.Tensor, level_scores: torch.Tensor) -> torch.Tensor:
    """:func:`fidelity_rank_loss` over the pairs of the global micro-batch (every process's clips of
    this step), as one process with the whole batch would compute it."""
    return rank_loss(level_logits, level_scores, LEVEL_SCORES, kind="fidelity")


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
    """``Trainer`` whose loss is ``ce_weight * CE(answer)`` (``loss="ce"``), with ``loss="deqa"``
    ``ce_weight * CE + kl_weight * KL(soft label) + rank_weight * rank``, with ``loss="ce_rank"``
    ``ce_weight * CE + rank_weight * rank``; ``rank`` is the ``rank_loss`` (fidelity or margin) over
    the batch's pairs (``rank_pairs="homologous"``: same-source pairs only). Evaluation returns the
    five level logits at the level position as predictions (``label_names=["mos"]``). A
    ``train_batch_sampler`` (rank-aware, e.g. :class:`~qalign_kvq.training.batching.GroupedBatchSampler`)
    replaces the random sampler."""

    loss_is_scaled_for_ga = False  # per-batch means: the Trainer divides by the accumulation steps

    def __init__(self, *args, level_token_ids: Sequence[int], loss: str = "ce", ce_weight: float = 1.0,
                 kl_weight: float = 1.0, rank_weight: float = 1.0, vision_learning_rate: float | None = None,
                 vision_param_filter: Callable[[str], bool] | None = None, rank_loss: str = "fidelity",
                 rank_pairs: str = "all", rank_margin: float = 0.5, train_batch_sampler=None,
                 level_scores: Sequence[float] = tuple(LEVEL_SCORES), **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(FrozenInputGradHooks())  # no backward through a frozen vision tower
        self.level_token_ids = list(level_token_ids)
        self.level_scores = tuple(float(v) for v in level_scores)
        if len(self.level_scores) != len(self.level_token_ids):
            raise ValueError(f"{len(self.level_token_ids)} level tokens but {len(self.level_scores)} level scores")
        self.loss_kind = loss
        self.weights = {"ce": ce_weight, "kl": kl_weight, "rank": rank_weight}
        self.rank = {"kind": rank_loss, "pairs": rank_pairs, "margin": rank_margin}
        self.train_batch_sampler = train_batch_sampler
        self.vision_learning_rate = vision_learning_rate
        self.vision_param_filter = vision_param_filter
        self._check_optimizer_settings()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        targets = {key: inputs.pop(key, None) for key in TARGET_KEYS}
        labels = inputs.pop("labels", None)
        with_ce = labels is not None and (self.loss_kind == "ce" or self.weights["ce"] > 0)
        # logits only at the answer positions (CE) and the level position (all losses)
        _, kept = answer_logits(model, inputs, labels if with_ce else None, targets["level_positions"])
        level_logits = kept.level_logits(self.level_token_ids)
        logits = kept.logits
        loss = logits.new_zeros((), dtype=torch.float32)
        if with_ce:
            loss = loss + self.weights["ce"] * kept.answer_ce()
        if self.loss_kind == "deqa":
            loss = loss + self.weights["kl"] * soft_label_kl(level_logits, targets["soft_labels"].to(logits.device))
        if self.loss_kind in RANKED_LOSSES:
            sources = targets["source_ids"] if self.rank["pairs"] == "homologous" else None
            if self.rank["pairs"] == "homologous" and sources is None:
                raise ValueError("rank_pairs=homologous needs the source column in the training table")
            loss = loss + self.weights["rank"] * rank_loss(level_logits, targets["level_scores"], self.level_scores,
                                                           self.rank["kind"], self.rank["margin"], sources)
        return (loss, {"level_logits": level_logits.detach()}) if return_outputs else loss

    def get_train_dataloader(self):
        """The Trainer's dataloader, or with ``train_batch_sampler`` one over its batches; that sampler
        already yields this process's share, so accelerate's shard wrapper is made a pass-through
        (as the Trainer does for its own rank-aware ``BatchRebalanceSampler``)."""
        if self.train_batch_sampler is None:
            return super().get_train_dataloader()
        from functools import partial

        from transformers.trainer_utils import seed_worker

        args = self.args
        params = {"batch_sampler": self.train_batch_sampler, "collate_fn": self.data_collator,
                  "num_workers": args.dataloader_num_workers, "pin_memory": args.dataloader_pin_memory,
                  "persistent_workers": args.dataloader_persistent_workers,
                  "multiprocessing_context": args.dataloader_multiprocessing_context,
                  "prefetch_factor": args.dataloader_prefetch_factor,
                  "worker_init_fn": partial(seed_worker, num_workers=args.dataloader_num_workers,
                                            rank=args.process_index)}
        loader = self.accelerator.prepare(torch.utils.data.DataLoader(self.train_dataset, **params))
        shard = getattr(loader, "batch_sampler", None)
        if shard is not None and getattr(shard, "batch_sampler", None) is self.train_batch_sampler:
            shard.num_processes, shard.process_index = 1, 0
        return loader

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

    def _optimizer_offloaded(self) -> bool:
        config = getattr(self.args, "hf_deepspeed_config", None)
        return bool(self.is_deepspeed_enabled and config is not None and offloads_optimizer(config.config))

    def _check_optimizer_settings(self) -> None:
        config = getattr(self.args, "hf_deepspeed_config", None)
        if self.is_deepspeed_enabled and config is not None:
            problem = deepspeed_optimizer_problem(config.config, self.vision_learning_rate, self.args.optim)
            if problem:
                raise ValueError(f"DeepSpeed config {self.args.deepspeed}: {problem}")
    def _save(self, output_dir=None, state_dict=None):
        """Also writes the bare trainable parameters peft's adapter file leaves out (LLaVA-OneVision's
        ``image_newline``), for the final output and every checkpoint (:mod:`qalign_kvq.bare_parameters`)."""
        super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save:
            save_bare_parameters(self.model, output_dir or self.args.output_dir, state_dict or None)

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
    """``compute_metrics`` for the Trainer: level logits of the validation rows (in table order, one
    per level of ``scale``) -> expected score -> MOS scale -> SROCC, PLCC, Rank1, Rank2, Final (those
    that can be computed). The function keeps its latest MOS-scale predictions (filename -> score)
    in ``last_predictions`` and the truth in ``truth``: the run's validation scatter draws them."""
    from qalign_kvq.evaluate import compute_metrics

    names = list(filenames)
    true = {n: float(s) for n, s in zip(names, truth)}

    def metrics(prediction: EvalPrediction) -> dict[str, float]:
        logits = np.asarray(prediction.predictions, dtype=np.float64)
        if logits.shape != (len(names), scale.levels):
            raise ValueError(f"expected level logits of shape ({len(names)}, {scale.levels}), got {logits.shape}")
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        mos = scale.to_mos(expected_score(probs, scale.scores))
        metrics.last_predictions = dict(zip(names, mos.tolist()))
        result = compute_metrics(dict(zip(names, mos.tolist())), true, homologous_pairs, nonhomologous_pairs)
        return {k: float(v) for k, v in result.items() if v is not None and math.isfinite(v)}

    metrics.last_predictions, metrics.truth = None, true
    return metrics
