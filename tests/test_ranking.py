"""Homologous ranking: the fidelity and margin rank losses (all pairs or same-source pairs only), and a
tiny run whose Trainer batches versions of one source together and trains with the margin loss."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from qalign_kvq.levels import LEVEL_SCORES
from qalign_kvq.training.ranking import pair_indices, rank_loss
from tests.test_training import TINY_RECIPE, Recorder
from tests.training_support import load_finetune, quality_set  # noqa: F401 (fixture)

SURE = 30.0  # a level logit this far above the others: probability ~1 on that level


def _confident(levels):
    """Level logits putting (almost) all mass on each row's level index (0 = excellent .. 4 = bad)."""
    logits = torch.zeros(len(levels), 5)
    logits[torch.arange(len(levels)), torch.tensor(levels)] = SURE
    return logits


def test_margin_loss_is_zero_for_confident_right_orders_and_positive_otherwise():
    truth = torch.tensor([4.5, 2.0, 3.0])
    right = _confident([0, 4, 2])  # expected scores 5, 1, 3: the order of the truth, gaps >= 2
    assert float(rank_loss(right, truth, LEVEL_SCORES, "margin", margin=0.5)) == 0.0
    wrong = _confident([4, 0, 2])  # 1, 5, 3: every pair reversed
    # ordered gaps -4, -2, -2: relu(0.5 + 4), relu(0.5 + 2), relu(0.5 + 2) -> mean 9.5 / 3
    assert float(rank_loss(wrong, truth, LEVEL_SCORES, "margin", margin=0.5)) == pytest.approx(9.5 / 3, abs=1e-5)
    unsure = torch.zeros(3, 5)  # every expected score 3: right order by a gap of 0 < margin
    assert float(rank_loss(unsure, truth, LEVEL_SCORES, "margin", margin=0.5)) == pytest.approx(0.5)
    # ties in the truth carry no order: no pair left, zero with a gradient path
    tied = rank_loss(wrong.requires_grad_(), torch.tensor([3.0, 3.0, 3.0]), LEVEL_SCORES, "margin")
    assert float(tied.detach()) == 0.0 and tied.requires_grad


def test_fidelity_loss_is_near_zero_for_confident_right_orders_and_larger_otherwise():
    truth = torch.tensor([4.5, 2.0])
    right = float(rank_loss(_confident([0, 4]), truth, LEVEL_SCORES, "fidelity"))
    wrong = float(rank_loss(_confident([4, 0]), truth, LEVEL_SCORES, "fidelity"))
    p = 0.9976611  # Phi(4 / sqrt 2): a score gap of 4
    assert right == pytest.approx(1 - np.sqrt(p) - 1e-4, abs=2e-6) and right < 2e-3
    assert wrong == pytest.approx(1 - 1e-4 - np.sqrt(1 - p), abs=2e-6) and wrong > 0.9


def test_homologous_pairs_only():
    sources = torch.tensor([0, 1, 0, 1])
    i, j = pair_indices(4, sources)
    assert list(zip(i.tolist(), j.tolist())) == [(0, 2), (1, 3)]
    truth = torch.tensor([4.0, 4.0, 2.0, 2.0])
    # same-source pairs (0, 2) and (1, 3) are ordered right; the cross-source pairs (0, 3), (1, 2) are not
    logits = _confident([1, 3, 0, 4])  # scores 4, 2, 5, 1: pair (0, 2) wrong, pair (1, 3) right
    homologous = float(rank_loss(logits, truth, LEVEL_SCORES, "margin", 0.5, sources))
    assert homologous == pytest.approx((0.5 + 1) / 2, abs=1e-5)  # only pair (0, 2) costs: relu(0.5 - (4 - 5))
    everything = float(rank_loss(logits, truth, LEVEL_SCORES, "margin", 0.5))
    assert everything != pytest.approx(homologous)
    no_pairs = rank_loss(logits, truth, LEVEL_SCORES, "fidelity", sources=torch.arange(4))
    assert float(no_pairs) == 0.0


class BatchProbe(Recorder):
    """Also the source ids of every batch of the Trainer's train dataloader, read before training."""

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        super().on_train_begin(args, state, control, model=model, **kwargs)
        self.batches = [batch["source_ids"].tolist() for batch in train_dataloader]


def _write_with_sources(path, rows):
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", "score", "source"])
        writer.writerows([(name, score, name.split("/")[0]) for name, score in rows])
    return path


HOMOLOGOUS = [("bunny_a/qp18.mp4", 4.6), ("bunny_a/qp38.mp4", 2.6), ("bikes_a/qp30.mp4", 3.8),
              ("bikes_a/qp46.mp4", 1.4), ("carphone/qp18.mp4", 4.6), ("carphone/qp46.mp4", 1.4),
              ("bikes_b/qp30.mp4", 3.8), ("bikes_b/qp38.mp4", 2.6)]


def test_training_with_homologous_batches_and_the_margin_loss(tiny_models, quality_set, tmp_path, caplog):
    root, _ = quality_set
    table = _write_with_sources(tmp_path / "train.csv", HOMOLOGOUS)
    probe = BatchProbe()
    argv = [TINY_RECIPE, "--model_name_or_path", str(tiny_models("qwen2_5_vl")), "--family", "qwen2_5_vl",
            "--train_csv", str(table), "--video_root", str(root), "--val_csv", "", "--output_dir",
            str(tmp_path / "out"), "--max_steps", "4", "--per_device_train_batch_size", "2", "--warmup_steps", "0",
            "--learning_rate", "1e-3", "--logging_steps", "1", "--save_strategy", "no", "--method", "lora",
            "--source_group_size", "2"]
    ranked = ["--loss", "ce_rank", "--rank_loss", "margin", "--rank_pairs", "homologous", "--rank_weight", "1.0"]
    with caplog.at_level("INFO", logger="qalign_kvq.finetune"):
        load_finetune().main([*argv, *ranked], callbacks=[probe])
    # every batch is the two versions of one source, and an epoch covers all four sources
    assert len(probe.batches) == 4 and all(len(set(b)) == 1 and len(b) == 2 for b in probe.batches)
    assert sorted(b[0] for b in probe.batches) == [0, 1, 2, 3]
    assert "4 batches of up to 2 over 1 process(es), 4 homologous pairs in batches" in caplog.text
    assert len(probe.losses) == 4 and all(np.isfinite(probe.losses))
    # the rank term is in the loss: a run without it logs other losses
    plain = Recorder()
    load_finetune().main([*argv, "--output_dir", str(tmp_path / "plain")], callbacks=[plain])
    assert not np.allclose(plain.losses, probe.losses)


def test_homologous_options_need_a_source_column(tiny_models, quality_set, tmp_path):
    root, _ = quality_set
    plain = tmp_path / "plain.csv"
    plain.write_text("filename,score\n" + "".join(f"{n},{s}\n" for n, s in HOMOLOGOUS))
    argv = [TINY_RECIPE, "--model_name_or_path", str(tiny_models("qwen2_5_vl")), "--train_csv", str(plain),
            "--video_root", str(root), "--val_csv", "", "--output_dir", str(tmp_path / "out")]
    for extra in (["--source_group_size", "2"], ["--loss", "ce_rank", "--rank_pairs", "homologous"]):
        with pytest.raises(ValueError, match="needs a source column in .*plain.csv: write one with python -m "
                                             "qalign_kvq.sources"):
            load_finetune().main([*argv, *extra])
    assert not (tmp_path / "out").exists()


def test_interrupted_homologous_run_resumes_with_the_same_batches(tiny_models, quality_set, tmp_path):
    """Stopped mid-way through epoch 1 and resumed: the grouped batches of the resumed epoch are the
    same as in the uninterrupted run, so the losses match."""
    root, _ = quality_set
    table = _write_with_sources(tmp_path / "train.csv", HOMOLOGOUS)

    def run(out, extra=(), stop_at=None):
        rec = Recorder(stop_at=stop_at)
        load_finetune().main([TINY_RECIPE, "--model_name_or_path", str(tiny_models("qwen2_5_vl")), "--family",
                              "qwen2_5_vl", "--train_csv", str(table), "--video_root", str(root), "--val_csv", "",
                              "--output_dir", str(out), "--max_steps", "6", "--per_device_train_batch_size", "2",
                              "--warmup_steps", "0", "--learning_rate", "1e-3", "--logging_steps", "1",
                              "--save_strategy", "steps", "--save_steps", "5", "--method", "full",
                              "--source_group_size", "2", "--loss", "ce_rank", "--rank_pairs", "homologous", *extra],
                             callbacks=[rec])
        return rec.losses

    whole = run(tmp_path / "whole")
    first = run(tmp_path / "parts", stop_at=5)
    rest = run(tmp_path / "parts", extra=["--resume_from_checkpoint", "last"])
    assert len(whole) == 6 and len(first) == 5 and len(rest) == 1
    np.testing.assert_allclose(first + rest, whole, rtol=1e-5)
