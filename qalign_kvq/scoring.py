"""Level probabilities -> scores; the self-ensemble over the views of one video and over models.

A model scores a clip by the softmax over its level-token logits at the answer position (Q-Align's
five words, or the checkpoint's own vocabulary); the expected level score
(:func:`qalign_kvq.levels.expected_score` with the checkpoint's level scores, 5..1 by default) is
the score in [1, 5], mapped to the training MOS scale by the level range stored with the checkpoint,
or by its calibration (an affine map ``mos = a * score_1_5 + b`` fitted by ``infer --calibrate``).
The uncertainty is the std of the level distribution, in score units.

Self-ensemble: ``frames`` evenly spaced frames, optionally cropped to the content band of a
sandwich video, cut into the five crops (each crop one ``(T, h, w, 3)`` clip); all views of one
video go through the model as ONE batch, and their level probabilities are averaged with the view
weights (centre heavier). Several models: their scores are averaged on the MOS scale with weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from qalign_kvq.checkpoint import CheckpointMeta
from qalign_kvq.levels import LEVEL_WORDS, expected_score, score_std
from qalign_kvq.modeling import level_probs
from qalign_kvq.video.crops import DEFAULT_VIEW_RATIO, five_crop_views, view_weights
from qalign_kvq.video.sandwich import detect_sandwich


@dataclass
class ViewOptions:
    """Self-ensemble settings: frames per video, crop size (share of each side), centre weight
    (corners weigh 1), whether the uncropped frames are a sixth view, whether a detected sandwich
    video is cropped to its content band (off by default: training sees the whole canvas), and
    views per forward (None: all views in one)."""

    frames: int = 12
    crop_ratio: float = DEFAULT_VIEW_RATIO
    center_weight: float = 2.0
    include_full: bool = False
    crop_sandwich: bool = False
    batch_size: int | None = None


@dataclass
class Views:
    """The views of one clip, ready for the model: names, clips, normalised weights."""

    names: list[str]
    clips: list[np.ndarray]
    weights: np.ndarray
    #: ``(top, bottom, left, right)`` of the content band when the clip was cropped to it.
    sandwich_box: tuple[int, int, int, int] | None = None


def make_views(clip: np.ndarray, options: ViewOptions) -> Views:
    """Sandwich crop (when detected and enabled), then FiveCrop shared by all frames."""
    box = None
    if options.crop_sandwich:
        info = detect_sandwich(clip)
        if info.is_sandwich:
            box = tuple(int(v) for v in info.box)
            top, bottom, left, right = box
            clip = clip[:, top:bottom, left:right]
    crops = five_crop_views(clip, options.crop_ratio, include_full=options.include_full)
    weights = view_weights(options.center_weight, options.include_full)
    names = list(crops)
    w = np.array([float(weights[name]) for name in names])
    return Views(names, [crops[n] for n in names], w / w.sum(), box)


def single_view(clip: np.ndarray) -> Views:
    """The whole clip as its only view (no crops)."""
    return Views(["full"], [clip], np.ones(1))


@torch.inference_mode()
def clip_level_probs(model, processor, family, clips: Sequence[np.ndarray], level_ids: Sequence[int],
                     question: str, batch_size: int | None = None, device: torch.device | str = "cpu",
                     dtype: torch.dtype | None = None) -> tuple[np.ndarray, float, float]:
    """Level probabilities ``(len(clips), len(level_ids))`` of clips; ``batch_size`` clips per forward (None: all
    in one). Also returns the seconds spent in the processor and in the model."""
    import time

    step = batch_size or len(clips)
    out, t_proc, t_model = [], 0.0, 0.0
    for start in range(0, len(clips), step):
        t0 = time.perf_counter()
        inputs = family.build_inputs(processor, list(clips[start:start + step]), question).to(device, dtype)
        t1 = time.perf_counter()
        probs = level_probs(model, inputs, list(level_ids))
        out.append(probs.float().cpu().numpy())
        t_proc += t1 - t0
        t_model += time.perf_counter() - t1
    return np.concatenate(out).astype(np.float64), t_proc, t_model


def to_mos(score_1_5: float | np.ndarray, meta: CheckpointMeta) -> np.ndarray:
    """Score in [1, 5] -> MOS scale: the checkpoint's calibration when present, else its level range."""
    if meta.calibration:
        return meta.calibration["a"] * np.asarray(score_1_5, dtype=float) + meta.calibration["b"]
    return meta.scale.to_mos(score_1_5)


def combine_views(view_probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted average of per-view level probabilities (its expected score is the weighted average
    of the view scores, since the expectation is linear)."""
    weights = np.asarray(weights, dtype=float)
    return weights @ np.asarray(view_probs, dtype=float) / weights.sum()


@dataclass
class ModelScore:
    """One model's score of one video."""

    probs: np.ndarray
    score_1_5: float
    score: float
    uncertainty: float
    view_probs: np.ndarray = field(repr=False)
    #: The level scores the probabilities are over (best first).
    level_scores: tuple[float, ...] = (5.0, 4.0, 3.0, 2.0, 1.0)

    @classmethod
    def from_view_probs(cls, view_probs: np.ndarray, weights: np.ndarray, meta: CheckpointMeta) -> ModelScore:
        probs = combine_views(view_probs, weights)
        s = float(expected_score(probs, meta.scores))
        return cls(probs, s, float(to_mos(s, meta)), float(score_std(probs, meta.scores)), view_probs, meta.scores)


def ensemble(scores: Sequence[ModelScore], weights: Sequence[float] | None = None) -> ModelScore:
    """Weighted average of several models' scores: MOS-scale scores, [1, 5] scores and level
    probabilities averaged with the same weights; the uncertainty is that of the averaged levels."""
    w = np.ones(len(scores)) if weights is None else np.asarray(weights, dtype=float)
    if len(w) != len(scores) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"need one non-negative weight per model ({len(scores)}), not all zero; got {list(w)}")
    w = w / w.sum()
    if len({s.level_scores for s in scores}) > 1:
        raise ValueError("the models have different level vocabularies: their level probabilities cannot be "
                         "averaged; ensemble models trained with the same level words")
    probs = sum(wi * s.probs for wi, s in zip(w, scores))
    return ModelScore(probs=probs, score_1_5=float(sum(wi * s.score_1_5 for wi, s in zip(w, scores))),
                      score=float(sum(wi * s.score for wi, s in zip(w, scores))),
                      uncertainty=float(score_std(probs, scores[0].level_scores)),
                      view_probs=np.stack([s.probs for s in scores]), level_scores=scores[0].level_scores)


def probs_by_word(probs: np.ndarray, words: Sequence[str] = LEVEL_WORDS) -> dict[str, float]:
    return {word: float(p) for word, p in zip(words, probs)}
