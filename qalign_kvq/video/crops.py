"""Clip operations: the training augmentation (one shared random crop, random temporal reverse) and the
scoring views (FiveCrop on every frame, plus the full frame), with torchvision's functional transforms.

A clip is a uint8 RGB array (T, H, W, 3); every function returns new arrays of that shape (the
scoring views, on request, as slices of the clip: no copy). :func:`planar_clip` lays a clip out
as the processors' torch path reads it, colour planes one after the other.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

VIEW_NAMES = ("top_left", "top_right", "bottom_left", "bottom_right", "center")
DEFAULT_VIEW_RATIO = 0.8  # each FiveCrop view is 80 % of the frame's height and width


def _check_clip(clip: np.ndarray) -> None:
    if clip.ndim != 4 or clip.shape[-1] != 3 or clip.shape[0] < 1:
        raise ValueError(f"a clip is an array (T, H, W, 3) with T >= 1, got shape {clip.shape}")


def _crop_size(height: int, width: int, ratio: float) -> tuple[int, int]:
    if not 0 < ratio <= 1:
        raise ValueError(f"crop ratio must be in (0, 1], got {ratio}")
    return max(1, round(height * ratio)), max(1, round(width * ratio))


def _as_tensor(clip: np.ndarray) -> torch.Tensor:  # (T, 3, H, W) view of the same memory
    return torch.from_numpy(np.asarray(clip)).permute(0, 3, 1, 2)


def _as_clip(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.permute(0, 2, 3, 1).numpy())


def augment_clip(clip: np.ndarray, rng: np.random.Generator, crop_ratio: float | None = 0.9,
                 reverse_prob: float = 0.5) -> np.ndarray:
    """Training augmentation (the KVQ recipe): one random crop of `crop_ratio` x (H, W) at the same
    position on every frame, then reverse the frame order with probability `reverse_prob`.
    `crop_ratio=None` (or 1.0) switches the crop off, `reverse_prob=0` the reverse; `rng` seeds both."""
    return augment_clip_reversed(clip, rng, crop_ratio, reverse_prob)[0]


def augment_clip_reversed(clip: np.ndarray, rng: np.random.Generator, crop_ratio: float | None = 0.9,
                          reverse_prob: float = 0.5) -> tuple[np.ndarray, bool]:
    """:func:`augment_clip`, also saying whether the clip was reversed (same draws from `rng`)."""
    _check_clip(clip)
    t = _as_tensor(clip)
    if crop_ratio is not None and crop_ratio != 1.0:
        h, w = _crop_size(clip.shape[1], clip.shape[2], crop_ratio)
        top = int(rng.integers(0, clip.shape[1] - h + 1))
        left = int(rng.integers(0, clip.shape[2] - w + 1))
        t = F.crop(t, top, left, h, w)
    reversed_ = bool(reverse_prob > 0 and rng.random() < reverse_prob)
    if reversed_:
        t = t.flip(0)
    return _as_clip(t), reversed_


def five_crop_boxes(height: int, width: int, ratio: float = DEFAULT_VIEW_RATIO) -> dict[str, tuple[int, int, int, int]]:
    """``(top, left, height, width)`` of each FiveCrop view of a ``height`` x ``width`` frame, keyed
    as :data:`VIEW_NAMES`: the boxes of torchvision's ``five_crop`` (centre rounded as its
    ``center_crop``)."""
    h, w = _crop_size(height, width, ratio)
    if h > height or w > width:
        raise ValueError(f"crop {h}x{w} larger than the frame {height}x{width}")
    centre = (int(round((height - h) / 2.0)), int(round((width - w) / 2.0)))
    corners = ((0, 0), (0, width - w), (height - h, 0), (height - h, width - w), centre)
    return {name: (top, left, h, w) for name, (top, left) in zip(VIEW_NAMES, corners)}


def five_crop_views(clip: np.ndarray, ratio: float = DEFAULT_VIEW_RATIO,
                    include_full: bool = False, copy: bool = True) -> dict[str, np.ndarray]:
    """FiveCrop applied identically to every frame: five clips of size ratio x (H, W), keyed
    top_left, top_right, bottom_left, bottom_right, center; plus `full` (the clip itself) on request.
    ``copy=False`` returns slices of `clip` (no copy; they share its memory)."""
    _check_clip(clip)
    boxes = five_crop_boxes(clip.shape[1], clip.shape[2], ratio)
    views = {name: clip[:, top:top + h, left:left + w] for name, (top, left, h, w) in boxes.items()}
    if include_full:
        views["full"] = clip
    return {name: np.ascontiguousarray(v) for name, v in views.items()} if copy else views


def planar_clip(clip: np.ndarray) -> np.ndarray:
    """The clip (T, H, W, 3) with each frame's memory holding its R, G and B planes one after the
    other ((T, 3, H, W) in memory, seen as (T, H, W, 3)): slices of it are what a video processor's
    torch path reads without copying pixels one by one (see ``Family.processor_call``)."""
    _check_clip(clip)
    return _as_tensor(clip).contiguous().numpy().transpose(0, 2, 3, 1)


def is_planar(clip: np.ndarray) -> bool:
    """Whether a (T, H, W, 3) array lies in memory as :func:`planar_clip` lays it (rows of one
    colour contiguous, the colours one plane apart)."""
    return clip.ndim == 4 and clip.strides[2] == clip.itemsize and clip.strides[3] >= clip.strides[1] * clip.shape[1]


def view_weights(center_weight: float = 2.0, include_full: bool = False, full_weight: float = 1.0) -> dict[str, float]:
    """Weights for averaging scores over the views of `five_crop_views`, summing to 1: each corner 1,
    the centre `center_weight` (heavier by default: in sandwich videos the corners hold the bands),
    the full frame `full_weight` when included."""
    if center_weight < 0 or full_weight < 0:
        raise ValueError("view weights must be >= 0")
    raw = {name: 1.0 for name in VIEW_NAMES[:4]} | {"center": float(center_weight)}
    if include_full:
        raw["full"] = float(full_weight)
    total = sum(raw.values())
    return {k: v / total for k, v in raw.items()}
