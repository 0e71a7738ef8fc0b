"""The five quality levels: MOS <-> level, balanced resampling, soft labels, expected score.

Arrays of level probabilities are ordered like :data:`LEVEL_WORDS` (best first), matching the
order of the level-token ids; the level *score* of word ``i`` is ``LEVEL_SCORES[i]`` (5..1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq

LEVEL_WORDS: tuple[str, ...] = ("excellent", "good", "fair", "poor", "bad")
LEVEL_SCORES = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
#: Nominal MOS range of a 1..5 absolute category rating scale.
NOMINAL_RANGE = (1.0, 5.0)


@dataclass(frozen=True)
class LevelScale:
    """Equal-width bins over ``[low, high]``: level ``i`` (1 = bad .. 5 = excellent) holds
    ``low + (i-1)w < s <= low + i w`` with ``w = (high - low) / 5`` (Q-Align's rule; ``low``
    itself falls in level 1, values outside the range in the end levels)."""

    low: float
    high: float

    def __post_init__(self) -> None:
        if not np.isfinite([self.low, self.high]).all() or not self.high > self.low:
            raise ValueError(f"invalid MOS range [{self.low}, {self.high}]: need finite low < high")

    @classmethod
    def from_scores(cls, mos: Sequence[float]) -> LevelScale:
        """The training set's range: its min and max MOS."""
        values = np.asarray(mos, dtype=float)
        if values.size == 0 or not np.isfinite(values).all():
            raise ValueError("MOS values must be a non-empty list of finite numbers")
        return cls(float(values.min()), float(values.max()))

    @property
    def width(self) -> float:
        return (self.high - self.low) / 5.0

    @property
    def edges(self) -> np.ndarray:
        """The four inner bin edges, ascending."""
        return self.low + self.width * np.arange(1, 5)

    def level_index(self, mos: float | Sequence[float]) -> np.ndarray:
        """Level number 1 (bad) .. 5 (excellent) of each MOS."""
        return np.searchsorted(self.edges, np.asarray(mos, dtype=float), side="left") + 1

    def level_word(self, mos: float) -> str:
        return LEVEL_WORDS[5 - int(self.level_index(mos))]

    def to_level_score(self, mos: float | np.ndarray) -> np.ndarray:
        """MOS -> continuous level score (bin centres map to 1..5), clipped to [1, 5]."""
        return np.clip((np.asarray(mos, dtype=float) - self.low) / self.width + 0.5, 1.0, 5.0)

    def to_mos(self, score: float | np.ndarray) -> np.ndarray:
        """Level score in [1, 5] -> MOS scale: score ``i`` maps to the centre of level ``i``'s bin."""
        return self.low + (np.asarray(score, dtype=float) - 0.5) * self.width


def expected_score(probs: np.ndarray) -> np.ndarray:
    """Weighted average of level scores: probabilities ``(..., 5)`` -> score in [1, 5]."""
    return np.asarray(probs, dtype=float) @ LEVEL_SCORES


def score_std(probs: np.ndarray) -> np.ndarray:
    """Standard deviation of the level distribution, in level units (an uncertainty)."""
    probs = np.asarray(probs, dtype=float)
    mean = probs @ LEVEL_SCORES
    return np.sqrt(np.clip(probs @ LEVEL_SCORES**2 - mean**2, 0.0, None))


def balanced_indices(levels: Sequence[int], seed: int = 0, per_level: int | None = None) -> np.ndarray:
    """Row indices resampled so every level present has ``per_level`` rows (default: the largest
    level's count). Each level keeps all its rows as long as ``per_level`` allows, then draws
    extra rows with replacement. Seeded; the result is shuffled."""
    levels = np.asarray(levels)
    rng = np.random.default_rng(seed)
    present = np.unique(levels)
    if present.size == 0:
        return np.zeros(0, dtype=int)
    target = per_level or max(int((levels == lv).sum()) for lv in present)
    picked = []
    for level in present:
        rows = np.flatnonzero(levels == level)
        if target <= rows.size:
            picked.append(rng.choice(rows, size=target, replace=False))
        else:
            extra = rng.choice(rows, size=target - rows.size, replace=True)
            picked.append(np.concatenate([rows, extra]))
    out = np.concatenate(picked)
    rng.shuffle(out)
    return out


def soft_label(level_score: float, std: float | None = None, min_std: float = 0.2) -> np.ndarray:
    """DeQA-style soft label over the five levels (ordered like :data:`LEVEL_WORDS`).

    ``level_score`` is the MOS on the level axis (see :meth:`LevelScale.to_level_score`), ``std``
    its spread in level units. A discrete Gaussian over 1..5 whose centre is solved so that the
    expectation equals ``level_score`` exactly; with no std, or one below ``min_std``, the mass
    goes to the two adjacent levels (linear split), which has the same expectation.
    """
    x = float(np.clip(level_score, 1.0, 5.0))
    grid = LEVEL_SCORES[::-1]  # 1..5
    if std is None or std < min_std or x in (1.0, 5.0):
        lo = min(int(np.floor(x)), 4)
        probs = np.zeros(5)
        probs[lo - 1] = lo + 1 - x
        probs[lo] = x - lo
        return probs[::-1].copy()

    def gaussian(centre: float) -> np.ndarray:
        logits = -((grid - centre) ** 2) / (2 * std**2)
        weights = np.exp(logits - logits.max())
        return weights / weights.sum()

    centre = brentq(lambda c: gaussian(c) @ grid - x, -50.0, 56.0, xtol=1e-12)
    return gaussian(centre)[::-1].copy()
