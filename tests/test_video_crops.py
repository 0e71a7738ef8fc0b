"""Clip augmentation (shared random crop, random reverse) and FiveCrop scoring views on real frames."""

import numpy as np
import pytest

from qalign_kvq.video import augment_clip, five_crop_views, read_frames, uniform_indices, view_weights


@pytest.fixture(scope="module")
def clip(sample_video):
    return read_frames(sample_video, uniform_indices(50, 6))  # (6, 180, 320, 3) real frames


def _offset(frame, crop):
    """(top, left) where `crop` lies in `frame` (exact match), or None."""
    h, w = crop.shape[:2]
    for top in range(frame.shape[0] - h + 1):
        for left in range(frame.shape[1] - w + 1):
            if np.array_equal(frame[top:top + h, left:left + w], crop):
                return top, left
    return None


def test_five_crops_are_the_corners_and_centre(clip):
    views = five_crop_views(clip, ratio=0.8)
    assert list(views) == ["top_left", "top_right", "bottom_left", "bottom_right", "center"]
    h, w = 144, 256  # 0.8 x (180, 320)
    assert np.array_equal(views["top_left"], clip[:, :h, :w])
    assert np.array_equal(views["top_right"], clip[:, :h, -w:])
    assert np.array_equal(views["bottom_left"], clip[:, -h:, :w])
    assert np.array_equal(views["bottom_right"], clip[:, -h:, -w:])
    assert np.array_equal(views["center"], clip[:, 18:18 + h, 32:32 + w])
    for v in views.values():
        assert v.dtype == np.uint8 and v.flags.c_contiguous


def test_five_crop_ratio_and_full_frame(clip):
    views = five_crop_views(clip, ratio=0.5, include_full=True)
    assert views["center"].shape == (6, 90, 160, 3)
    assert np.array_equal(views["full"], clip)
    assert five_crop_views(clip)["center"].shape == (6, 144, 256, 3)  # default ratio 0.8
    with pytest.raises(ValueError):
        five_crop_views(clip, ratio=1.5)
    with pytest.raises(ValueError):
        five_crop_views(clip[0], ratio=0.8)


def test_view_weights():
    w = view_weights()
    assert set(w) == {"top_left", "top_right", "bottom_left", "bottom_right", "center"}
    assert sum(w.values()) == pytest.approx(1.0)
    assert w["center"] == pytest.approx(2 * w["top_left"])
    w = view_weights(center_weight=3.0, include_full=True)
    assert sum(w.values()) == pytest.approx(1.0) and w["center"] == pytest.approx(3 * w["full"])
    assert view_weights(center_weight=1.0)["center"] == pytest.approx(0.2)


def test_augment_crops_every_frame_at_the_same_place(clip):
    out = augment_clip(clip, np.random.default_rng(3), crop_ratio=0.9, reverse_prob=0.0)
    assert out.shape == (6, 162, 288, 3) and out.dtype == np.uint8
    top, left = _offset(clip[0], out[0])
    for t in range(6):
        assert np.array_equal(out[t], clip[t, top:top + 162, left:left + 288])


def test_augment_is_seeded_and_varies(clip):
    a = augment_clip(clip, np.random.default_rng(11))
    assert np.array_equal(a, augment_clip(clip, np.random.default_rng(11)))
    outs = [augment_clip(clip, np.random.default_rng(s), reverse_prob=0.0) for s in range(5)]
    assert len({_offset(clip[0], o[0]) for o in outs}) > 1  # the crop position is random


def test_augment_reverse_and_switches(clip):
    reversed_ = augment_clip(clip, np.random.default_rng(0), crop_ratio=None, reverse_prob=1.0)
    assert np.array_equal(reversed_, clip[::-1])
    assert np.array_equal(augment_clip(clip, np.random.default_rng(0), crop_ratio=None, reverse_prob=0.0), clip)
    flips = [np.array_equal(augment_clip(clip, np.random.default_rng(s), crop_ratio=None), clip[::-1])
             for s in range(200)]
    assert 0.35 < np.mean(flips) < 0.65  # reverse_prob=0.5 by default
