"""Answer-only logits in training (qalign_kvq.training.answer_logits): a training step projects onto
the vocabulary only the positions the losses read (each row's answer positions, the level position
among them), and the CE, DeQA KL and fidelity losses equal those of the full-vocabulary logits of
every position, for every family."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data as skdata
from transformers import TrainingArguments

from qalign_kvq.families import FAMILY_NAMES, QUESTIONS, get_family
from qalign_kvq.levels import soft_label
from qalign_kvq.training import answer_logits as answer_logits_module
from qalign_kvq.training.answer_logits import loss_positions
from qalign_kvq.training.collator import TARGET_KEYS, QualityCollator
from qalign_kvq.training.model import prepare_model
from qalign_kvq.training.trainer import QualityTrainer, fidelity_rank_loss, soft_label_kl


def _examples() -> list[dict]:
    """Two real 4-frame clips of different sizes, different questions (so right padding differs)
    and levels."""
    photo = skdata.astronaut()
    clips = [np.stack([photo[30:30 + h, 10 + 8 * i:10 + 8 * i + w] for i in range(4)]) for h, w in ((180, 320), (96, 96))]
    return [{"clip": clip, "question": question, "level_word": word, "level_score": score,
             "soft_label": soft_label(score), "mos": score}
            for clip, question, word, score in zip(clips, (QUESTIONS[0], QUESTIONS[3]), ("excellent", "poor"), (4.6, 2.2))]


def _full_logits_losses(model, batch: dict, level_ids: list[int]) -> dict[str, torch.Tensor]:
    """The losses from the full-vocabulary logits of every position (the computation before)."""
    inputs = {k: v for k, v in batch.items() if k not in (*TARGET_KEYS, "labels")}
    logits = model(**inputs).logits
    labels = batch["labels"]
    ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                         ignore_index=-100)
    level = logits[torch.arange(len(logits)), batch["level_positions"]][:, level_ids].float()
    return {"ce": ce, "kl": soft_label_kl(level, batch["soft_labels"]),
            "rank": fidelity_rank_loss(level, batch["level_scores"])}


class HeadRows:
    """Counts the rows the language-model head projects and records ``logits_to_keep``."""

    def __init__(self, model):
        self.rows, self.keep = [], []
        model.get_output_embeddings().register_forward_hook(
            lambda module, args, out: self.rows.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
        model.register_forward_pre_hook(lambda module, args, kwargs: self.keep.append(kwargs.get("logits_to_keep")),
                                        with_kwargs=True)


@pytest.mark.parametrize("family_name", FAMILY_NAMES)
def test_training_step_projects_only_answer_positions_and_losses_are_unchanged(family_name, tiny_models, tmp_path):
    family = get_family(family_name)
    model, processor = family.load(str(tiny_models(family_name)))
    model = prepare_model(model, family, "lora", lora_dropout=0.0)  # deterministic: comparable to a reference
    level_ids = family.level_token_ids(processor.tokenizer)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=2,
                             max_steps=1, save_strategy="no", remove_unused_columns=False, learning_rate=1e-3)
    collator = QualityCollator(family, processor)
    batch = collator(_examples())
    labels = batch["labels"]
    assert len(set(batch["attention_mask"].sum(dim=1).tolist())) == 2, "rows of different lengths (padding)"
    with torch.no_grad():
        reference = _full_logits_losses(model.eval(), batch, level_ids)

    for loss, weights in (("ce", {}), ("deqa", {"ce_weight": 0.05, "kl_weight": 1.0, "rank_weight": 0.5})):
        # one real training step (Trainer.train: sampler, collator, forward, backward, optimizer)
        trainer = QualityTrainer(model=model, args=args, train_dataset=_examples(), data_collator=collator,
                                 level_token_ids=level_ids, loss=loss, **weights)
        head = HeadRows(model)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        step_loss = trainer.train().training_loss
        expected = reference["ce"] if loss == "ce" else (
            0.05 * reference["ce"] + reference["kl"] + 0.5 * reference["rank"])
        assert step_loss == pytest.approx(float(expected), rel=1e-5)
        # the head ran once, on exactly the answer positions: per row its answer length (which
        # includes the level position), at most answer length + 1 (the sampler may swap the rows)
        (keep,) = head.keep
        answer_lengths = (labels != -100).sum(dim=1)
        assert keep.dtype == torch.bool and sorted(keep.sum(dim=1).tolist()) == sorted(answer_lengths.tolist())
        assert head.rows == [int(answer_lengths.sum())] and head.rows[0] <= 2 * (int(answer_lengths.max()) + 1)
        assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before), "it trained"
        with torch.no_grad():
            reference = _full_logits_losses(model.eval(), batch, level_ids)

    # DeQA without CE reads the level position only: one row per sample, the level position
    trainer = QualityTrainer(model=model, args=args, level_token_ids=level_ids, loss="deqa", ce_weight=0.0)
    head = HeadRows(model)
    with torch.no_grad():
        loss_value = trainer.compute_loss(model, dict(batch))
    torch.testing.assert_close(loss_value, reference["kl"] + reference["rank"], rtol=1e-5, atol=1e-6)
    assert head.rows == [2] and head.keep[0].nonzero()[:, 1].tolist() == batch["level_positions"].tolist()


def test_older_transformers_path_keeps_shared_columns_and_gives_the_same_losses(tiny_models, tmp_path, monkeypatch):
    """Before transformers 5.21 ``logits_to_keep`` takes only positions shared by all rows: the union
    of the rows' columns is projected and each row's own are picked; the losses do not change."""
    family = get_family("qwen2_5_vl")
    model, processor = family.load(str(tiny_models("qwen2_5_vl")))
    level_ids = family.level_token_ids(processor.tokenizer)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    batch = QualityCollator(family, processor)(_examples())
    trainer = QualityTrainer(model=model, args=args, level_token_ids=level_ids, loss="deqa", ce_weight=0.05)
    with torch.no_grad():
        new = trainer.compute_loss(model, dict(batch), return_outputs=True)
        monkeypatch.setattr(answer_logits_module, "_takes_boolean_masks", lambda: False)
        head = HeadRows(model)
        old = trainer.compute_loss(model, dict(batch), return_outputs=True)
    torch.testing.assert_close(old[0], new[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(old[1]["level_logits"], new[1]["level_logits"], rtol=1e-6, atol=1e-6)
    (columns,) = head.keep
    keep = loss_positions(batch["labels"], batch["level_positions"], batch["input_ids"].shape[1])
    assert columns.dim() == 1 and columns.tolist() == keep.any(dim=0).nonzero().squeeze(1).tolist()
    assert head.rows == [2 * len(columns)]


def test_loss_positions():
    labels = torch.tensor([[-100, -100, 7, 8, 9, -100], [-100, 5, 6, -100, -100, -100]])
    keep = loss_positions(labels, torch.tensor([1, 0]), 6)
    assert keep.tolist() == [[False, True, True, True, False, False], [True, True, False, False, False, False]]
    assert loss_positions(None, torch.tensor([4, 2]), 6).sum(dim=1).tolist() == [1, 1]
