"""Quality levels: MOS <-> level, balanced resampling, soft labels, expected score.

Q-Align's five levels are :data:`LEVEL_WORDS` with the scores :data:`LEVEL_SCORES` (5..1). A finer
vocabulary has N ordered words (best first) and N scores, equally spaced and decreasing (default:
:func:`default_scores`, 5 down to 1, so that every vocabulary scores on the same 1..5 axis). Arrays
of level probabilities are ordered like the words, matching the order of the level-token ids; the
level *score* of word ``i`` is ``scores[i]``.
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


def default_scores(n: int) -> np.ndarray:
    """Scores of ``n`` levels, best first: equally spaced from 5 down to 1 (5 levels: 5, 4, 3, 2, 1)."""
    if n < 2:
        raise ValueError(f"a level vocabulary needs at least 2 levels, got {n}")
    return np.linspace(5.0, 1.0, n) if n != 5 else LEVEL_SCORES.copy()


def check_vocabulary(words: Sequence[str], scores: Sequence[float] | None = None) -> tuple[tuple[str, ...], np.ndarray]:
    """``(words, scores)`` validated: at least 2 distinct single words, best first, and as many scores,
    strictly decreasing and equally spaced (default :func:`default_scores`)."""
    words = tuple(str(w) for w in words)
    if len(words) < 2 or len(set(words)) != len(words) or any(not w or w != w.strip() or " " in w for w in words):
        raise ValueError(f"level words must be at least 2 distinct single words, best first; got {list(words)}")
    values = default_scores(len(words)) if scores is None else np.asarray(scores, dtype=float)
    if values.shape != (len(words),):
        raise ValueError(f"{len(words)} level words need {len(words)} level scores, got {list(np.ravel(values))}")
    steps = np.diff(values)
    if not np.isfinite(values).all() or not (steps < 0).all() or not np.allclose(steps, steps[0], rtol=1e-6):
        raise ValueError(f"level scores must decrease in equal steps (equal-width MOS bins), got {values.tolist()}")
    return words, values


@dataclass(frozen=True)
class LevelScale:
    """``len(scores)`` equal-width bins over ``[low, high]``: level ``i`` (1 = worst .. N = best)
    holds ``low + (i-1)w < s <= low + i w`` with ``w = (high - low) / N`` (Q-Align's rule; ``low``
    itself falls in level 1, values outside the range in the end levels). ``scores`` are the level
    scores best first (default Q-Align's 5, 4, 3, 2, 1); the centre of level ``i``'s bin maps to
    its score."""

    low: float
    high: float
    scores: tuple[float, ...] = tuple(LEVEL_SCORES.tolist())

    def __post_init__(self) -> None:
        if not np.isfinite([self.low, self.high]).all() or not self.high > self.low:
            raise ValueError(f"invalid MOS range [{self.low}, {self.high}]: need finite low < high")
        _, values = check_vocabulary([f"w{i}" for i in range(len(self.scores))], self.scores)
        object.__setattr__(self, "scores", tuple(float(v) for v in values))

    @classmethod
    def from_scores(cls, mos: Sequence[float], scores: Sequence[float] | None = None) -> LevelScale:
        """The training set's range: its min and max MOS (``scores``: the level scores)."""
        values = np.asarray(mos, dtype=float)
        if values.size == 0 or not np.isfinite(values).all():
            raise ValueError("MOS values must be a non-empty list of finite numbers")
        levels = tuple(LEVEL_SCORES.tolist()) if scores is None else tuple(float(v) for v in scores)
        return cls(float(values.min()), float(values.max()), levels)

    @property
    def levels(self) -> int:
        return len(self.scores)

    @property
    def width(self) -> float:
        return (self.high - self.low) / self.levels

    @property
    def edges(self) -> np.ndarray:
        """The ``levels - 1`` inner bin edges, ascending."""
        return self.low + self.width * np.arange(1, self.levels)

    @property
    def _step(self) -> float:  # score difference between neighbouring levels
        return (self.scores[0] - self.scores[-1]) / (self.levels - 1)

    def level_index(self, mos: float | Sequence[float]) -> np.ndarray:
        """Level number 1 (worst) .. N (best) of each MOS."""
        return np.searchsorted(self.edges, np.asarray(mos, dtype=float), side="left") + 1

    def level_word(self, mos: float, words: Sequence[str] = LEVEL_WORDS) -> str:
        """The word (``words`` best first, one per level) of the level of ``mos``."""
        if len(words) != self.levels:
            raise ValueError(f"{len(words)} level words for {self.levels} levels")
        return words[self.levels - int(self.level_index(mos))]

    def to_level_score(self, mos: float | np.ndarray) -> np.ndarray:
        """MOS -> continuous level score (bin centres map to the level scores), clipped to the scores' range."""
        index = np.clip((np.asarray(mos, dtype=float) - self.low) / self.width + 0.5, 1.0, float(self.levels))
        return self.scores[-1] + (index - 1.0) * self._step

    def to_mos(self, score: float | np.ndarray) -> np.ndarray:
        """Level score -> MOS scale: the score of level ``i`` maps to the centre of level ``i``'s bin."""
        index = (np.asarray(score, dtype=float) - self.scores[-1]) / self._step + 1.0
        return self.low + (index - 0.5) * self.width


def _scores_for(probs: np.ndarray, scores: Sequence[float] | None) -> np.ndarray:
    values = default_scores(probs.shape[-1]) if scores is None else np.asarray(scores, dtype=float)
    if values.shape != probs.shape[-1:]:
        raise ValueError(f"level probabilities over {probs.shape[-1]} levels, but {values.size} level scores")
    return values


def expected_score(probs: np.ndarray, scores: Sequence[float] | None = None) -> np.ndarray:
    """Weighted average of level scores: probabilities ``(..., N)`` -> score (default scores:
    :func:`default_scores` of N, so in [1, 5])."""
    probs = np.asarray(probs, dtype=float)
    return probs @ _scores_for(probs, scores)


def score_std(probs: np.ndarray, scores: Sequence[float] | None = None) -> np.ndarray:
    """Standard deviation of the level distribution, in score units (an uncertainty)."""
    probs = np.asarray(probs, dtype=float)
    values = _scores_for(probs, scores)
    mean = probs @ values
    return np.sqrt(np.clip(probs @ values**2 - mean**2, 0.0, None))


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


def soft_label(level_score: float, std: float | None = None, min_std: float = 0.2,
               scores: Sequence[float] = LEVEL_SCORES) -> np.ndarray:
    """DeQA-style soft label over the levels of ``scores`` (best first, like the words).

    ``level_score`` is the MOS on the score axis (see :meth:`LevelScale.to_level_score`), ``std``
    its spread in level units (bin widths). A discrete Gaussian over the levels whose centre is
    solved so that the expectation equals ``level_score`` exactly; with no std, or one below
    ``min_std``, the mass goes to the two adjacent levels (linear split), which has the same
    expectation.
    """
    _, values = check_vocabulary([f"w{i}" for i in range(len(scores))], scores)
    n, step = len(values), (values[0] - values[-1]) / (len(values) - 1)
    # work on the level axis 1..n (affine in the score), then order best first
    x = float(np.clip((level_score - values[-1]) / step + 1.0, 1.0, float(n)))
    grid = np.arange(1.0, n + 1.0)
    if std is None or std < min_std or x in (1.0, float(n)):
        lo = min(int(np.floor(x)), n - 1)
        probs = np.zeros(n)
        probs[lo - 1] = lo + 1 - x
        probs[lo] = x - lo
        return probs[::-1].copy()

    def gaussian(centre: float) -> np.ndarray:
        logits = -((grid - centre) ** 2) / (2 * std**2)
        weights = np.exp(logits - logits.max())
        return weights / weights.sum()

    centre = brentq(lambda c: gaussian(c) @ grid - x, -50.0, n + 51.0, xtol=1e-12)
    return gaussian(centre)[::-1].copy()
