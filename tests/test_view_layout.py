"""Scoring views are slices of one planar copy of the clip; every family's processor turns them into
exactly the inputs it made from separate contiguous crops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qalign_kvq.families import get_family
from qalign_kvq.families.base import ClipTiming, processor_video
from qalign_kvq.scoring import ViewOptions, make_views
from qalign_kvq.video import five_crop_views, read_frames, uniform_indices
from qalign_kvq.video.crops import is_planar, planar_clip
from tests.fixtures_models import TINY_FAMILIES


@pytest.fixture(scope="module")
def clip(sample_video):
    return read_frames(sample_video, uniform_indices(50, 8))  # (8, 180, 320, 3) real frames


def test_planar_views_share_one_copy(clip):
    views = make_views(clip, ViewOptions(include_full=True))
    assert views.names == ["top_left", "top_right", "bottom_left", "bottom_right", "center", "full"]
    copies = five_crop_views(clip, include_full=True)
    for name, view in zip(views.names, views.clips):
        assert np.array_equal(view, copies[name]) and view.dtype == np.uint8 and is_planar(view)
        assert np.shares_memory(view, views.clips[-1]) and not np.shares_memory(view, clip)
    assert not is_planar(clip) and not is_planar(copies["center"])
    tensor = processor_video(views.clips[4])
    assert tensor.shape == (8, 3, 144, 256)
    assert torch.equal(tensor, torch.from_numpy(copies["center"]).permute(0, 3, 1, 2))
    assert processor_video(clip) is clip  # any other layout goes to the processor as it was


@pytest.mark.parametrize("family_name", TINY_FAMILIES)
def test_processor_inputs_unchanged(tiny_models, clip, family_name):
    """All views in one call, and one view alone: every tensor of the batch is bit-identical to the
    one made from contiguous (T, H, W, 3) copies of the crops."""
    family = get_family(family_name)
    _, processor = family.load(str(tiny_models(family_name)))
    timing = ClipTiming(tuple(uniform_indices(50, 8)), 25.0, 50)
    views = make_views(clip, ViewOptions(include_full=True))
    copies = [np.ascontiguousarray(v) for v in views.clips]
    for pick in (slice(None), slice(4, 5)):
        new = family.build_inputs(processor, views.clips[pick], timings=[timing] * len(views.clips[pick]))
        old = family.build_inputs(processor, copies[pick], timings=[timing] * len(copies[pick]))
        assert new.batch.keys() == old.batch.keys() and new.visual_tokens == old.visual_tokens
        for key, value in old.batch.items():
            assert torch.equal(new.batch[key], value), (family_name, key)
        assert torch.equal(new.level_positions, old.level_positions)


def test_planar_clip_of_a_single_frame():
    frame = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(1, 2, 3, 3)
    planar = planar_clip(frame)
    assert np.array_equal(planar, frame) and is_planar(planar)
    assert planar.base is not None and planar.strides[3] == 6  # the three colour planes of 2x3 pixels
