"""Scoring maths on a tiny model and real clips: level probabilities -> score, view weights,
batched views, sandwich crop, calibration, model ensembles."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from qalign_kvq.checkpoint import CheckpointMeta
from qalign_kvq.scorer import Scorer
from qalign_kvq.scoring import ViewOptions, clip_level_probs, combine_views, ensemble, make_views, to_mos
from qalign_kvq.video import probe, read_frames, uniform_indices
from qalign_kvq.video.sandwich import detect_sandwich

torch.set_num_threads(2)
FAMILY = "qwen2_vl"
LOW, HIGH = 1.31, 4.5  # KVQ's training MOS range
LEVELS = np.array([5.0, 4.0, 3.0, 2.0, 1.0])


@pytest.fixture(scope="module")
def checkpoint(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / FAMILY
    shutil.copytree(tiny_models(FAMILY), out)
    CheckpointMeta(family=FAMILY, mos_low=LOW, mos_high=HIGH).save(out)
    return out


@pytest.fixture(scope="module")
def scorer(checkpoint):
    return Scorer.from_pretrained(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def clip(sample_video):
    return read_frames(sample_video, uniform_indices(probe(sample_video).num_frames, 12))


def _view_probs(scorer, views):
    lm = scorer.models[0]
    return clip_level_probs(lm.model, lm.processor, lm.family, views.clips, lm.level_ids, lm.meta.question).probs


def test_score_is_weighted_average_of_level_probs(scorer, clip):
    result = scorer.score_frames(clip)
    views = make_views(clip, scorer.options)
    probs = _view_probs(scorer, views)
    assert probs.shape == (5, 5) and np.allclose(probs.sum(1), 1.0, atol=1e-6)
    # by hand: each view's expected level, then centre weight 2 and corners 1
    view_scores = probs @ LEVELS
    weights = np.array([2.0 if name == "center" else 1.0 for name in views.names])
    expected = float(weights @ view_scores / weights.sum())
    assert result.score_1_5 == pytest.approx(expected, abs=1e-6)
    width = (HIGH - LOW) / 5
    assert result.score == pytest.approx(LOW + (expected - 0.5) * width, abs=1e-6)
    assert list(result.probs) == ["excellent", "good", "fair", "poor", "bad"]
    level_probs = np.array(list(result.probs.values()))
    assert level_probs @ LEVELS == pytest.approx(expected, abs=1e-6)
    var = level_probs @ LEVELS**2 - (level_probs @ LEVELS) ** 2
    assert result.uncertainty == pytest.approx(np.sqrt(var), abs=1e-6)
    assert sorted(result.views) == sorted(["top_left", "top_right", "bottom_left", "bottom_right", "center"])
    assert result.frames == 12 and 1.0 <= result.score_1_5 <= 5.0


def test_centre_weight_pulls_the_score_to_the_centre_view(scorer, clip):
    views = make_views(clip, scorer.options)
    view_scores = dict(zip(views.names, _view_probs(scorer, views) @ LEVELS))
    corners = np.mean([s for n, s in view_scores.items() if n != "center"])
    assert abs(view_scores["center"] - corners) > 1e-4, "views must differ for this test to mean anything"
    results = {}
    for weight in (0.0, 1.0, 4.0, 1e6):
        results[weight] = Scorer(scorer.models, options=ViewOptions(center_weight=weight)).score_frames(clip).score_1_5
    assert results[0.0] == pytest.approx(corners, abs=1e-6)
    assert results[1.0] == pytest.approx(np.mean(list(view_scores.values())), abs=1e-6)
    assert results[4.0] == pytest.approx((4 * view_scores["center"] + 4 * corners) / 8, abs=1e-6)
    assert results[1e6] == pytest.approx(view_scores["center"], abs=1e-4)
    # monotone: a heavier centre moves the score towards the centre view
    gaps = [abs(results[w] - view_scores["center"]) for w in (0.0, 1.0, 4.0, 1e6)]
    assert gaps == sorted(gaps, reverse=True)


def test_batched_views_equal_one_at_a_time(scorer, clip):
    lm = scorer.models[0]
    views = make_views(clip, ViewOptions(include_full=True))
    batched = clip_level_probs(lm.model, lm.processor, lm.family, views.clips, lm.level_ids, lm.meta.question).probs
    single = clip_level_probs(lm.model, lm.processor, lm.family, views.clips, lm.level_ids, lm.meta.question,
                              batch_size=1).probs
    assert batched.shape == (6, 5)
    np.testing.assert_allclose(batched, single, atol=1e-5)
    one = Scorer(scorer.models, options=ViewOptions(batch_size=1)).score_frames(clip)
    assert one.score == pytest.approx(scorer.score_frames(clip).score, abs=1e-5)


def test_sandwich_video_is_cropped_to_its_content(scorer, video_corpus):
    path = video_corpus["sandwich_black"]
    clip = read_frames(path, uniform_indices(probe(path).num_frames, 12))
    box = detect_sandwich(clip).box
    result = Scorer(scorer.models, options=ViewOptions(crop_sandwich=True)).score_frames(clip)
    assert result.sandwich_box == list(box)
    top, bottom, left, right = box
    assert bottom - top < clip.shape[1]
    views = make_views(clip, ViewOptions(crop_sandwich=True))
    centre = views.clips[views.names.index("center")]
    assert centre.shape[1] <= bottom - top and centre.shape[2] <= right - left
    plain = scorer.score_frames(clip)  # the default keeps the whole canvas
    assert plain.sandwich_box is None and plain.score != pytest.approx(result.score, abs=1e-7)


def test_image_is_scored_as_five_crops(scorer, clip):
    result = scorer.score_image(clip[0])
    assert result.frames == 1 and len(result.views) == 5 and 1.0 <= result.score_1_5 <= 5.0


def test_calibration_and_level_range_map_to_mos():
    meta = CheckpointMeta(family=FAMILY, mos_low=1.0, mos_high=6.0)
    assert to_mos(np.array([1.0, 3.0, 5.0]), meta) == pytest.approx([1.5, 3.5, 5.5])
    meta.calibration = {"a": 0.5, "b": 1.0}
    assert to_mos(3.0, meta) == pytest.approx(2.5)
    assert combine_views(np.eye(5)[[0, 4]], np.array([3.0, 1.0])) == pytest.approx([0.75, 0, 0, 0, 0.25])


def test_model_ensemble_averages_on_the_mos_scale(scorer, checkpoint, tmp_path, clip):
    other = tmp_path / "other"
    shutil.copytree(checkpoint, other)
    CheckpointMeta(family=FAMILY, mos_low=0.0, mos_high=100.0).save(other)
    both = Scorer.from_pretrained([checkpoint, other], device="cpu", weights=[3.0, 1.0])
    one = scorer.score_frames(clip)
    result = both.score_frames(clip)
    second = 0.0 + (one.score_1_5 - 0.5) * 20.0  # same weights, range 0..100
    assert result.score == pytest.approx((3 * one.score + second) / 4, abs=1e-4)
    assert result.score_1_5 == pytest.approx(one.score_1_5, abs=1e-6)
    assert [m["score"] for m in result.models] == pytest.approx([one.score, second], abs=1e-4)
    with pytest.raises(ValueError, match="weight"):
        ensemble([], [])
