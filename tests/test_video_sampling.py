"""Frame sampling policies: uniform (scoring), per second (Q-Align), random (training)."""

import numpy as np
import pytest

from qalign_kvq.video import per_second_indices, probe, random_indices, read_frames, uniform_indices


def test_uniform_centres_of_equal_segments():
    assert uniform_indices(120, 12) == [5, 15, 25, 35, 45, 55, 65, 75, 85, 95, 105, 115]
    assert uniform_indices(50, 1) == [25]
    assert uniform_indices(12, 12) == list(range(12))


def test_uniform_short_video_repeats_frames():
    assert uniform_indices(3, 6) == [0, 0, 1, 1, 2, 2]
    assert uniform_indices(1, 12) == [0] * 12
    idx = uniform_indices(5, 12)
    assert len(idx) == 12 and sorted(idx) == idx and set(idx) == set(range(5))


def test_per_second_is_q_aligns_load_video():
    # Q-Align: frame_indices = [int(fps * i) for i in range(int(len(vr) / fps))]
    assert per_second_indices(132, 25.0) == [0, 25, 50, 75, 100]  # 5.28 s -> 5 frames
    assert per_second_indices(120, 29.97) == [0, 29, 59, 89]  # 4.004 s -> 4 frames, int() not round()
    assert per_second_indices(150, 29.97) == [int(29.97 * i) for i in range(int(150 / 29.97))]
    assert per_second_indices(10, 25.0) == [0]  # shorter than a second: still one frame
    assert per_second_indices(100, 25.0, rate=2.0) == [0, 12, 25, 37, 50, 62, 75, 87]


def test_per_second_cap_spreads_over_the_video():
    full = per_second_indices(25 * 600, 25.0)  # a 10-minute video: 600 frames uncapped
    assert len(full) == 600
    capped = per_second_indices(25 * 600, 25.0, max_frames=16)
    assert len(capped) == 16 and set(capped) <= set(full)
    assert capped[0] < 25 * 40 and capped[-1] > 25 * 560  # covers the whole video


def test_random_indices_seeded_distinct_sorted():
    a = random_indices(300, 8, np.random.default_rng(7))
    assert a == random_indices(300, 8, np.random.default_rng(7))
    assert a != random_indices(300, 8, np.random.default_rng(8))
    assert len(set(a)) == 8 and a == sorted(a) and 0 <= a[0] and a[-1] < 300
    short = random_indices(3, 8, np.random.default_rng(0))
    assert len(short) == 8 and short == sorted(short) and set(short) == {0, 1, 2}


@pytest.mark.parametrize("fn,args", [(uniform_indices, (0, 4)), (uniform_indices, (10, 0)),
                                     (per_second_indices, (10, 0.0)), (per_second_indices, (0, 25.0)),
                                     (random_indices, (0, 8, np.random.default_rng(0)))])
def test_bad_arguments(fn, args):
    with pytest.raises(ValueError):
        fn(*args)


def test_sampling_feeds_the_reader(video_corpus):
    for name in ("one_frame", "tiny", "vfr"):
        info = probe(video_corpus[name])
        for idx in (uniform_indices(info.num_frames, 12),
                    per_second_indices(info.num_frames, info.fps, max_frames=8),
                    random_indices(info.num_frames, 8, np.random.default_rng(0))):
            clip = read_frames(video_corpus[name], idx)
            assert clip.shape[0] == len(idx)
