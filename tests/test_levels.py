import numpy as np
import pytest

from qalign_kvq.levels import (
    LEVEL_WORDS,
    LevelScale,
    balanced_indices,
    expected_score,
    score_std,
    soft_label,
)

KVQ = LevelScale(1.306, 4.5)


def test_kvq_bin_edges_are_pinned():
    np.testing.assert_allclose(KVQ.edges, [1.9448, 2.5836, 3.2224, 3.8612], atol=1e-12)


@pytest.mark.parametrize(
    "mos, level",
    [
        (1.306, 1),  # the minimum falls in the lowest level
        (1.9448, 1),  # an edge belongs to the bin below it (left-open, right-closed)
        (1.94481, 2),
        (2.5836, 2),
        (3.2224, 3),
        (3.2225, 4),
        (3.8612, 4),
        (3.8613, 5),
        (4.5, 5),
        (0.5, 1),  # outside the range: the end levels
        (4.9, 5),
    ],
)
def test_boundaries_follow_the_q_align_rule(mos, level):
    assert int(KVQ.level_index(mos)) == level


def test_level_words_map_best_first():
    assert LEVEL_WORDS == ("excellent", "good", "fair", "poor", "bad")
    assert KVQ.level_word(4.4) == "excellent"
    assert KVQ.level_word(1.4) == "bad"
    assert KVQ.level_word(3.0) == "fair"


def test_from_scores_uses_min_and_max():
    scale = LevelScale.from_scores([3.0, 1.306, 4.5, 2.2])
    assert (scale.low, scale.high) == (1.306, 4.5)
    with pytest.raises(ValueError):
        LevelScale.from_scores([])
    with pytest.raises(ValueError):
        LevelScale(2.0, 2.0)


def test_expected_score_and_mos_round_trip():
    probs = np.array([0.1, 0.2, 0.3, 0.25, 0.15])
    assert expected_score(probs) == pytest.approx(5 * 0.1 + 4 * 0.2 + 3 * 0.3 + 2 * 0.25 + 1 * 0.15)
    # a one-hot "fair" answer maps to the centre of the fair bin
    assert KVQ.to_mos(3.0) == pytest.approx((2.5836 + 3.2224) / 2)
    # MOS -> level score -> MOS is the identity inside the representable range
    mos = np.linspace(1.7, 4.1, 9)
    np.testing.assert_allclose(KVQ.to_mos(KVQ.to_level_score(mos)), mos)
    assert score_std(np.eye(5)[2]) == pytest.approx(0.0)
    assert score_std(np.array([0.5, 0, 0, 0, 0.5])) == pytest.approx(2.0)


def test_balanced_resampling_equalises_levels_and_is_seeded():
    levels = np.array([1] * 3 + [2] * 10 + [3] * 6 + [5] * 1)
    idx = balanced_indices(levels, seed=7)
    counts = {lv: int((levels[idx] == lv).sum()) for lv in (1, 2, 3, 5)}
    assert counts == {1: 10, 2: 10, 3: 10, 5: 10}
    assert set(np.flatnonzero(levels == 2)) <= set(idx)  # the largest level keeps every row once
    np.testing.assert_array_equal(idx, balanced_indices(levels, seed=7))
    assert not np.array_equal(idx, balanced_indices(levels, seed=8))
    assert len(balanced_indices(levels, per_level=4)) == 16


@pytest.mark.parametrize("x", [1.0, 1.3, 2.5, 3.0, 3.77, 4.9, 5.0])
@pytest.mark.parametrize("std", [None, 0.05, 0.4, 0.8, 1.5])
def test_soft_labels_sum_to_one_and_keep_the_expectation(x, std):
    probs = soft_label(x, std)
    assert probs.shape == (5,)
    assert (probs >= 0).all()
    assert probs.sum() == pytest.approx(1.0, abs=1e-12)
    assert expected_score(probs) == pytest.approx(x, abs=1e-9)


def test_soft_label_without_std_splits_between_adjacent_levels():
    np.testing.assert_allclose(soft_label(3.25), [0, 0.25, 0.75, 0, 0])
    wide = soft_label(3.0, 1.0)
    assert wide[2] == wide.max() and wide[0] > 0 and wide[4] > 0
