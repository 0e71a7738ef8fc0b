"""Level probabilities -> scores; scoring protocols; the self-ensemble over the views of one video
and over models.

A model scores a clip by the softmax over its level-token logits at the answer position (Q-Align's
five words, or the checkpoint's own vocabulary); the expected level score
(:func:`qalign_kvq.levels.expected_score` with the checkpoint's level scores, 5..1 by default) is
the score in [1, 5]. On the ``mos`` scale it is mapped to the training MOS scale by the level range
stored with the checkpoint, or by its calibration (an affine map ``mos = a * score_1_5 + b`` fitted
by ``infer --calibrate``); on the ``levels`` scale the score is the expected level itself. The
uncertainty is the std of the level distribution, in score units.

A *protocol* (:class:`ViewOptions`, named in :data:`PROTOCOLS`) says which frames and views a video
is scored on and on which scale:

* ``kvq``: the KVQ self-ensemble (BDVQAGroup's): 12 evenly spaced frames, optionally cropped to
  the content band of a sandwich video, cut into the five crops (each crop one ``(T, h, w, 3)``
  clip), their level probabilities averaged with the centre weighted 2:1; MOS scale. What a
  fine-tuned checkpoint stores.
* ``authors``: how the model's authors score a video with a public checkpoint: whole frames at the
  family's rate (Q-Align: 1 frame a second, ``floor(duration)`` frames, as its ``load_video``),
  capped at what the model's context holds, one view, the expected level as the score.

All views of one video go through the model as ONE batch. Several models: their scores are
averaged on the scale of the protocol with weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from qalign_kvq.checkpoint import CheckpointMeta
from qalign_kvq.families.base import ANSWER_PREFIX, ClipTiming
from qalign_kvq.levels import LEVEL_WORDS, expected_score, score_std
from qalign_kvq.modeling import level_probs
from qalign_kvq.video.crops import DEFAULT_VIEW_RATIO, five_crop_views, planar_clip, view_weights
from qalign_kvq.video.sampling import per_second_indices, uniform_indices
from qalign_kvq.video.sandwich import detect_sandwich


SCALES = ("mos", "levels")
VIEW_KINDS = ("five_crop", "full")


@dataclass
class ViewOptions:
    """A scoring protocol. Frames: ``frames`` evenly spaced, or with ``fps`` that many frames per
    second of the video (at most ``max_frames``; None: what the model's context holds). Views:
    ``five_crop`` (crops of ``crop_ratio`` of each side, centre weighted ``center_weight`` against
    1 for the corners, the uncropped frames as a sixth view with ``include_full``) or ``full``.
    ``crop_sandwich`` first crops a detected sandwich video to its content band (off by default:
    training sees the whole canvas). ``scale``: ``mos`` or ``levels`` (the expected level).
    ``batch_size``: views per forward (None: all in one)."""

    frames: int = 12
    crop_ratio: float = DEFAULT_VIEW_RATIO
    center_weight: float = 2.0
    include_full: bool = False
    crop_sandwich: bool = False
    batch_size: int | None = None
    fps: float | None = None
    max_frames: int | None = None
    views: str = "five_crop"
    scale: str = "mos"
    name: str = "custom"

    def __post_init__(self):
        if self.views not in VIEW_KINDS or self.scale not in SCALES:
            raise ValueError(f"views must be one of {VIEW_KINDS} and scale one of {SCALES}; got {self.views!r}, "
                             f"{self.scale!r}")
        if self.frames < 1 or not 0 < self.crop_ratio <= 1 or self.center_weight < 0:
            raise ValueError("need frames >= 1, 0 < crop_ratio <= 1, center_weight >= 0")
        if (self.fps is not None and not self.fps > 0) or (self.max_frames is not None and self.max_frames < 1):
            raise ValueError(f"fps must be > 0 and max_frames >= 1; got {self.fps}, {self.max_frames}")

    def frame_indices(self, num_frames: int, video_fps: float, context_frames: int | None = None) -> list[int]:
        """Which frames of a video of ``num_frames`` frames at ``video_fps`` this protocol reads."""
        if self.fps is None:
            return uniform_indices(num_frames, self.frames)
        return per_second_indices(num_frames, video_fps, self.fps, self.max_frames or context_frames)


#: Named protocols. ``authors`` takes its frame rate from the family (``Family.authors_fps``).
PROTOCOLS = {
    "kvq": ViewOptions(name="kvq"),
    "authors": ViewOptions(name="authors", fps=1.0, views="full", scale="levels"),
}


def protocol(name: str, family=None, **overrides) -> ViewOptions:
    """The named protocol (``kvq``, ``authors``) for a family, with ``overrides`` (ViewOptions
    fields); its ``name`` lists the overrides that change it, e.g. ``kvq[frames=8]``."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown scoring protocol {name!r}; known: {', '.join(PROTOCOLS)}")
    base = PROTOCOLS[name]
    if name == "authors" and family is not None:
        base = replace(base, fps=family.authors_fps)
    if "frames" in overrides and "fps" not in overrides:
        overrides = {**overrides, "fps": None}  # a frame count asks for evenly spaced frames
    changed = {k: v for k, v in sorted(overrides.items()) if k != "batch_size" and v != getattr(base, k)}
    label = name + ("[" + ",".join(f"{k}={v}" for k, v in changed.items()) + "]" if changed else "")
    return replace(base, **overrides, name=label)


@dataclass
class Views:
    """The views of one clip, ready for the model: names, clips, normalised weights."""

    names: list[str]
    clips: list[np.ndarray]
    weights: np.ndarray
    #: ``(top, bottom, left, right)`` of the content band when the clip was cropped to it.
    sandwich_box: tuple[int, int, int, int] | None = None


def make_views(clip: np.ndarray, options: ViewOptions) -> Views:
    """Sandwich crop (when detected and enabled), then FiveCrop shared by all frames, or the whole
    clip as the only view (``views="full"``). The crops are slices of one planar copy of the clip
    (:func:`~qalign_kvq.video.crops.planar_clip`), which the processor call reads without further
    per-pixel copies."""
    box = None
    if options.crop_sandwich:
        info = detect_sandwich(clip)
        if info.is_sandwich:
            box = tuple(int(v) for v in info.box)
            top, bottom, left, right = box
            clip = clip[:, top:bottom, left:right]
    if options.views == "full":
        return Views(["full"], [clip], np.ones(1), box)
    crops = five_crop_views(planar_clip(clip), options.crop_ratio, include_full=options.include_full, copy=False)
    weights = view_weights(options.center_weight, options.include_full)
    names = list(crops)
    w = np.array([float(weights[name]) for name in names])
    return Views(names, [crops[n] for n in names], w / w.sum(), box)


@dataclass
class ViewScores:
    """A model's level probabilities of views ``(n_views, n_levels)``, the visual tokens each view cost,
    and the seconds spent in the processor and in the model."""

    probs: np.ndarray
    visual_tokens: list[int] | None
    processor_s: float
    model_s: float


@torch.inference_mode()
def clip_level_probs(model, processor, family, clips: Sequence[np.ndarray], level_ids: Sequence[int],
                     question: str, batch_size: int | None = None, device: torch.device | str = "cpu",
                     dtype: torch.dtype | None = None, timing: ClipTiming | None = None,
                     answer_prefix: str = ANSWER_PREFIX, processor_device: str | None = None) -> ViewScores:
    """Level probabilities ``(len(clips), len(level_ids))`` of clips (views of one video, sharing
    ``timing``); ``batch_size`` clips per forward (None: all in one); ``processor_device``: where
    the processor resizes and normalises the pixels (default: the CPU)."""
    import time

    step = batch_size or len(clips)
    out, tokens, t_proc, t_model = [], [], 0.0, 0.0
    for start in range(0, len(clips), step):
        t0 = time.perf_counter()
        part = list(clips[start:start + step])
        inputs = family.build_inputs(processor, part, question, timings=[timing] * len(part),
                                     answer_prefix=answer_prefix, device=processor_device).to(device, dtype)
        t1 = time.perf_counter()
        probs = level_probs(model, inputs, list(level_ids))
        out.append(probs.float().cpu().numpy())
        tokens = None if inputs.visual_tokens is None or tokens is None else tokens + inputs.visual_tokens
        t_proc += t1 - t0
        t_model += time.perf_counter() - t1
    return ViewScores(np.concatenate(out).astype(np.float64), tokens, t_proc, t_model)


def to_mos(score_1_5: float | np.ndarray, meta: CheckpointMeta, scale: str = "mos") -> np.ndarray:
    """Score in [1, 5] -> MOS scale: the checkpoint's calibration when present, else its level range;
    on the ``levels`` scale the score in [1, 5] itself."""
    if scale == "levels":
        return np.asarray(score_1_5, dtype=float)
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
    def from_view_probs(cls, view_probs: np.ndarray, weights: np.ndarray, meta: CheckpointMeta,
                        scale: str = "mos") -> ModelScore:
        probs = combine_views(view_probs, weights)
        s = float(expected_score(probs, meta.scores))
        return cls(probs, s, float(to_mos(s, meta, scale)), float(score_std(probs, meta.scores)), view_probs,
                   meta.scores)


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
