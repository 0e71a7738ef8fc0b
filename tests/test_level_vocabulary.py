"""Level vocabularies beyond Q-Align's five words: N ordered words with equally spaced scores (5..1 by
default, whatever N), MOS -> level -> score round trips, soft labels and resampling over N levels,
and a tiny Qwen2.5-VL trained with a nine-word vocabulary that stores it and scores with it."""

from __future__ import annotations

import numpy as np
import pytest

from qalign_kvq.checkpoint import CheckpointMeta
from qalign_kvq.levels import LevelScale, balanced_indices, check_vocabulary, default_scores, expected_score, soft_label
from tests.test_training import SMALL, run_recipe
from tests.training_support import quality_set, write_csv  # noqa: F401 (fixture)

#: The finer recipe's words (recipes/configs/kvq_qwen2_5_vl_7b_lora_levels9.yaml): each one token after
#: "The quality of the video is" in the real Qwen vocabulary (ids 9073 2244 1661 14977 6624 67380 7852 3873
#: 17478 in qwen.tiktoken).
FINE = ("excellent", "great", "good", "decent", "fair", "mediocre", "poor", "bad", "terrible")


def test_nine_levels_round_trip_mos_level_score():
    scale = LevelScale(1.0, 4.6, tuple(default_scores(9)))
    assert scale.levels == 9 and scale.width == pytest.approx(0.4)
    np.testing.assert_allclose(scale.scores, [5, 4.5, 4, 3.5, 3, 2.5, 2, 1.5, 1])
    np.testing.assert_allclose(scale.edges, 1.0 + 0.4 * np.arange(1, 9))
    centres = 1.0 + 0.4 * (np.arange(1, 10) - 0.5)  # level 1 (terrible) .. 9 (excellent)
    assert scale.level_index(centres).tolist() == list(range(1, 10))
    assert [scale.level_word(m, FINE) for m in centres] == list(FINE[::-1])
    np.testing.assert_allclose(scale.to_level_score(centres), np.linspace(1, 5, 9))
    np.testing.assert_allclose(scale.to_mos(scale.to_level_score(centres)), centres)
    # a one-hot answer scores its level's score, which maps back to its bin's centre
    for k, word in enumerate(FINE):
        probs = np.eye(9)[k]
        assert float(scale.to_mos(expected_score(probs, scale.scores))) == pytest.approx(centres[8 - k])
        assert scale.level_word(float(scale.to_mos(expected_score(probs, scale.scores))), FINE) == word
    assert float(scale.to_level_score(0.0)) == 1.0 and float(scale.to_level_score(9.0)) == 5.0  # clipped
    # with no scores given, N probabilities get default_scores(N)
    assert float(expected_score(np.eye(9)[2])) == pytest.approx(4.0)


def test_scores_of_other_spacings_and_bad_vocabularies():
    qalign01 = LevelScale(1.0, 5.0, (1.0, 0.75, 0.5, 0.25, 0.0))  # Q-Align's [0, 1] scores
    assert float(qalign01.to_level_score(4.6)) == pytest.approx(1.0)
    assert float(qalign01.to_mos(0.5)) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="decrease in equal steps"):
        check_vocabulary(["a", "b", "c"], [3.0, 2.5, 1.0])
    with pytest.raises(ValueError, match="3 level words need 3 level scores"):
        check_vocabulary(["a", "b", "c"], [2.0, 1.0])
    with pytest.raises(ValueError, match="distinct single words"):
        check_vocabulary(["good", "very good"])
    with pytest.raises(ValueError, match="distinct single words"):
        check_vocabulary(["good", "good"])


@pytest.mark.parametrize("std", [None, 0.7])
def test_soft_labels_over_nine_levels_keep_the_expectation(std):
    scores = default_scores(9)
    for x in (1.0, 1.3, 2.75, 4.0, 4.9, 5.0):
        label = soft_label(x, std, scores=scores)
        assert label.shape == (9,) and label.sum() == pytest.approx(1.0) and (label >= 0).all()
        assert float(label @ scores) == pytest.approx(x, abs=1e-9)
    assert soft_label(2.75, None, scores=scores).tolist() == pytest.approx([0, 0, 0, 0, 0.5, 0.5, 0, 0, 0])  # 3 and 2.5


def test_resampling_and_levels_of_a_table():
    import datasets

    from qalign_kvq.annotations import add_levels

    table = datasets.Dataset.from_dict({"filename": [f"{i}.mp4" for i in range(12)],
                                        "score": [1.0, 1.1, 1.2, 1.3, 2.0, 2.6, 3.1, 3.5, 4.0, 4.4, 4.5, 4.6]})
    scale = LevelScale.from_scores(table["score"], default_scores(9))
    out = add_levels(table, scale, soft_labels=True, words=FINE)
    assert out["level_word"][0] == "terrible" and out["level_word"][-1] == "excellent"
    assert all(len(s) == 9 for s in out["soft_label"])
    picked = balanced_indices(out["level"], seed=0)
    counts = np.unique(np.asarray(out["level"])[picked], return_counts=True)[1]
    assert len(set(counts.tolist())) == 1 and counts[0] == 4  # every level present as often as the largest
    with pytest.raises(ValueError, match="5 level words for a scale of 9 levels"):
        add_levels(table, scale)


@pytest.fixture(scope="module")
def fine_model(tmp_path_factory):
    import make_tiny_models

    return make_tiny_models.build_tiny_model("qwen2_5_vl", tmp_path_factory.mktemp("fine"), level_words=FINE)


def test_a_checkpoint_trained_with_nine_levels_scores_with_them(fine_model, quality_set, tmp_path):
    from qalign_kvq.scorer import Scorer

    root, _ = quality_set
    val = write_csv(tmp_path / "val.csv", [("bunny_b/qp18.mp4", 4.6), ("bunny_b/qp46.mp4", 1.4),
                                           ("bikes_c/qp30.mp4", 3.8), ("bikes_c/qp38.mp4", 2.6)])
    out = run_recipe(fine_model, "qwen2_5_vl", root, tmp_path / "out", extra=[
        "--method", "lora", "--loss", "deqa", "--ce_weight", "0.05", "--level_words", *FINE,
        "--val_csv", str(val), "--val_pairs_homologous", "", "--val_pairs_nonhomologous", "",
        "--eval_strategy", "steps", "--eval_steps", "3", "--load_best_model_at_end", "false"])
    meta = CheckpointMeta.load(out)
    assert meta.level_words == list(FINE) and meta.level_scores == pytest.approx(np.linspace(5, 1, 9).tolist())
    assert (meta.mos_low, meta.mos_high) == (1.4, 4.6) and meta.bin_edges == pytest.approx(
        (1.4 + (4.6 - 1.4) / 9 * np.arange(1, 9)).tolist())
    assert set(meta.metrics) >= {"SROCC", "PLCC"}, "evaluation read nine level logits per clip"
    scorer = Scorer.from_pretrained(out, frames=4)
    result = scorer.score(root / "carphone" / "qp30.mp4")
    assert list(result.probs) == list(FINE) and sum(result.probs.values()) == pytest.approx(1.0, abs=1e-5)
    probs = np.array(list(result.probs.values()))
    assert result.score_1_5 == pytest.approx(float(probs @ np.linspace(5, 1, 9)), abs=1e-6)
    assert result.score == pytest.approx(float(meta.scale.to_mos(result.score_1_5)), abs=1e-6)


def test_models_of_different_vocabularies_are_not_averaged():
    from qalign_kvq.scorer import LoadedModel, Scorer

    five, nine = CheckpointMeta(family="qwen2_5_vl"), CheckpointMeta(family="qwen2_5_vl", level_words=list(FINE))
    with pytest.raises(ValueError, match="different level vocabularies"):
        Scorer([LoadedModel("a", None, None, None, five, []), LoadedModel("b", None, None, None, nine, [])])


def test_the_default_vocabulary_is_unchanged():
    assert SMALL  # the five-word runs of test_training.py pin their losses with the defaults
    meta = CheckpointMeta(family="qwen2_5_vl")
    assert meta.level_scores is None and meta.scores == (5.0, 4.0, 3.0, 2.0, 1.0)
    assert meta.scale == LevelScale(1.0, 5.0)


def test_the_model_card_describes_the_vocabulary():
    from qalign_kvq.model_card import card_body

    meta = CheckpointMeta(family="qwen2_5_vl", mos_low=1.0, mos_high=4.6, level_words=list(FINE))
    body = card_body(meta, "x")
    assert "softmax over the 9 level words" in body and "split into 9 equal bins" in body
    assert "The words score 5, 4.5, 4, 3.5, 3, 2.5, 2, 1.5, 1 (best first)" in body
    assert "| 9 | excellent | (4.2, 4.6] |" in body and "| 1 | terrible | [1, 1.4] |" in body
    # its formula is the scale's: the centre of the "fair" bin (score 3)
    assert float(meta.scale.to_mos(3.0)) == pytest.approx(1.0 + ((3 - 1) / 0.5 + 0.5) * 0.4)
