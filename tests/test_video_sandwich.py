"""Sandwich detection on real content laid out as platforms do, and on ordinary videos."""

import numpy as np
import pytest

from qalign_kvq.video import SandwichInfo, detect_sandwich, probe, read_frames, uniform_indices


def _frames(path, k=8):
    return read_frames(path, uniform_indices(probe(path).num_frames, k))


# the content band each clip of scripts/make_test_videos.py was built with: (top, bottom) in pixels
TRUE_BOX = {"sandwich_blur": (109, 211), "sandwich_black": (122, 198)}


@pytest.mark.parametrize("name", sorted(TRUE_BOX))
@pytest.mark.parametrize("k", [8, 1])
def test_platform_sandwiches_are_found(video_corpus, name, k):
    info = detect_sandwich(_frames(video_corpus[name], k))
    assert isinstance(info, SandwichInfo) and info.is_sandwich
    top, bottom, left, right = info.box
    assert abs(top - TRUE_BOX[name][0]) <= 3 and abs(bottom - TRUE_BOX[name][1]) <= 3
    assert (left, right) == (0, 180)
    assert 0.5 < info.confidence <= 1.0


@pytest.mark.parametrize("name", ["landscape", "portrait", "rotated", "vfr", "hevc10", "uhd4k", "one_frame"])
def test_ordinary_videos_are_not_flagged(video_corpus, name):
    frames = _frames(video_corpus[name])
    info = detect_sandwich(frames)
    assert not info.is_sandwich and info.confidence == 0.0
    assert info.box == (0, frames.shape[1], 0, frames.shape[2])


def test_static_bands_need_several_frames(video_corpus):
    """Bands holding a still picture (a real frame of another clip, as a title card) around moving
    content are found from their lack of motion."""
    moving = _frames(video_corpus["portrait"], 8)  # (8, 320, 180, 3)
    still = np.rot90(read_frames(video_corpus["uhd4k"], [0])[0][::12, ::12])  # (320, 180, 3)
    clip = np.repeat(still[None], 8, axis=0)
    clip[:, 100:220] = moving[:, 100:220]
    info = detect_sandwich(clip)
    assert info.is_sandwich and abs(info.box[0] - 100) <= 3 and abs(info.box[1] - 220) <= 3
    assert not detect_sandwich(clip[:1]).is_sandwich  # one frame cannot tell a still band from content


def test_bad_input():
    with pytest.raises(ValueError):
        detect_sandwich(np.zeros((10, 10, 3), np.uint8))
    tiny = detect_sandwich(np.zeros((2, 8, 8, 3), np.uint8))
    assert not tiny.is_sandwich and tiny.box == (0, 8, 0, 8)
