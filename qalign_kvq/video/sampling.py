"""Which frames to read: evenly spaced (scoring), one per second (Q-Align), random (training).

All functions return sorted lists of frame indices in [0, num_frames). A video with fewer frames than
asked for is never an error: `uniform_indices` and `random_indices` repeat frames (each frame about
equally often, in temporal order) so callers always get exactly `k` frames.
"""

from __future__ import annotations


import numpy as np


def _check(num_frames: int, k: int) -> None:
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def uniform_indices(num_frames: int, k: int) -> list[int]:
    """`k` evenly spaced frames: the centre of each of `k` equal segments of the video.

    With num_frames < k, frames repeat (e.g. 3 frames, k=6 -> [0, 0, 1, 1, 2, 2])."""
    _check(num_frames, k)
    return [min(num_frames - 1, int((j + 0.5) * num_frames / k)) for j in range(k)]


def per_second_indices(num_frames: int, fps: float, rate: float = 1.0, max_frames: int | None = None) -> list[int]:
    """Q-Align's rule (``load_video`` of q_align/evaluate/scorer.py): ``int(num_frames / fps * rate)``
    frames, frame ``int(fps * i / rate)`` for the i-th step of 1/rate seconds (at least one frame:
    the original returns none for a video under a second). With `max_frames`, at most that many,
    evenly spread over those steps (the original has no cap and runs out of context on long videos)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if fps <= 0 or rate <= 0:
        raise ValueError(f"fps and rate must be > 0, got fps={fps}, rate={rate}")
    steps = max(1, int(num_frames / fps * rate))
    idx = [min(num_frames - 1, int(fps * s / rate)) for s in range(steps)]
    if max_frames is not None:
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        if len(idx) > max_frames:
            idx = [idx[j] for j in uniform_indices(len(idx), max_frames)]
    return idx


def random_indices(num_frames: int, k: int, rng: np.random.Generator) -> list[int]:
    """`k` distinct frames chosen at random (sorted), for training clips. With num_frames < k, every
    frame is used and the rest are random repeats, still in temporal order."""
    _check(num_frames, k)
    if num_frames >= k:
        return sorted(rng.choice(num_frames, size=k, replace=False).tolist())
    extra = rng.choice(num_frames, size=k - num_frames, replace=True).tolist()
    return sorted(list(range(num_frames)) + extra)
