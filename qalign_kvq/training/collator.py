"""Batch clip examples into model inputs with the family's chat template (right padding, labels
on the answer only) plus the targets the losses and the evaluation need."""

from __future__ import annotations

import numpy as np
import torch

from qalign_kvq.families.base import ANSWER_PREFIX, Family
from qalign_kvq.levels import LEVEL_SCORES, soft_label

#: Keys the collator adds beside the model inputs; the trainer removes them before ``model(**batch)``.
TARGET_KEYS = ("level_positions", "soft_labels", "level_scores", "mos", "source_ids")


class QualityCollator:
    """``collator(examples) -> dict``: the family's ``build_inputs(..., level_words=...,
    padding_side="right", timings=...)`` batch (``input_ids``, pixels, ``labels``, ...) and
    ``level_positions`` (B,), ``soft_labels`` (B, N levels; the example's own or a two-level split of
    its level score), ``level_scores`` (B,), ``mos`` (B,) and, when the examples have a source,
    ``source_ids`` (B,)."""

    def __init__(self, family: Family, processor, level_scores=LEVEL_SCORES, answer_prefix: str = ANSWER_PREFIX):
        self.family = family
        self.processor = processor
        self.level_scores = tuple(float(v) for v in level_scores)
        self.answer_prefix = answer_prefix

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        inputs = self.family.build_inputs(
            self.processor,
            [ex["clip"] for ex in examples],
            [ex["question"] for ex in examples],
            level_words=[ex["level_word"] for ex in examples],
            padding_side="right",
            timings=[ex.get("timing") for ex in examples],
            answer_prefix=self.answer_prefix,
        )
        batch = dict(inputs.batch)
        batch["level_positions"] = inputs.level_positions.long()
        soft = [ex["soft_label"] if "soft_label" in ex else soft_label(ex["level_score"], scores=self.level_scores)
                for ex in examples]
        batch["soft_labels"] = torch.tensor(np.stack(soft), dtype=torch.float32)
        batch["level_scores"] = torch.tensor([ex["level_score"] for ex in examples], dtype=torch.float32)
        batch["mos"] = torch.tensor([ex["mos"] for ex in examples], dtype=torch.float32)
        if all("source_id" in ex for ex in examples):
            batch["source_ids"] = torch.tensor([ex["source_id"] for ex in examples], dtype=torch.long)
        return batch
