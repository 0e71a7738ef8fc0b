"""The Python API: ``Scorer.from_pretrained(path_or_id).score("x.mp4")``.

A :class:`Scorer` holds one or more loaded models (a model ensemble, averaged with weights) and
the scoring protocol (:class:`~qalign_kvq.scoring.ViewOptions`): by default the one each
checkpoint names (``kvq`` for fine-tuned ones, ``authors`` for public checkpoints).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from qalign_kvq.families.base import ClipTiming
from qalign_kvq.loading import DEFAULT_MODEL, default_device_dtype, load_checkpoint
from qalign_kvq.scoring import ModelScore, ViewOptions, Views, clip_level_probs, ensemble, make_views, probs_by_word
from qalign_kvq.scoring import protocol as named_protocol
from qalign_kvq.video import probe, read_frames

#: Text tokens kept free of frames when a protocol's frame count is capped by the model's context.
CONTEXT_TEXT_MARGIN = 256


@dataclass
class ScoreResult:
    """The score of one video (or image): ``score`` on the protocol's scale (the training MOS scale,
    or the expected level), ``score_1_5`` the expected level, ``probs`` per level word,
    ``uncertainty`` the std of the level distribution (levels), the ``protocol`` used, the
    ``views`` and the visual tokens each cost (``view_tokens``, of the first model)."""

    file: str | None
    score: float
    score_1_5: float
    probs: dict[str, float]
    uncertainty: float
    views: list[str]
    frames: int
    protocol: str = "custom"
    view_tokens: list[int] | None = None
    sandwich_box: list[int] | None = None
    timing: dict[str, float] = field(default_factory=dict)
    #: Per-model scores when several models are ensembled.
    models: list[dict[str, Any]] | None = None

    def to_record(self) -> dict[str, Any]:
        record = asdict(self)
        if record["models"] is None:
            del record["models"]
        return record


@dataclass
class LoadedModel:
    name: str
    model: Any
    processor: Any
    family: Any
    meta: Any
    level_ids: list[int]

    def context_frames(self) -> int | None:
        """How many frames fit the model's context beside the prompt (None: unknown)."""
        per_frame = self.family.tokens_per_frame(self.processor)
        config = getattr(self.model.config, "text_config", None) or self.model.config
        context = getattr(config, "max_position_embeddings", None)
        if not per_frame or not context:
            return None
        return max(1, int((context - CONTEXT_TEXT_MARGIN) // per_frame))


class Scorer:
    """Scores videos, frames in memory and images with one model or a weighted model ensemble."""

    def __init__(self, models: Sequence[LoadedModel], weights: Sequence[float] | None = None,
                 options: ViewOptions | None = None, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None, processor_device: str | None = None):
        if not models:
            raise ValueError("a Scorer needs at least one model")
        if weights is not None and len(weights) != len(models):
            raise ValueError(f"{len(weights)} model weights for {len(models)} models")
        self.models = list(models)
        if len({(tuple(m.meta.level_words), m.meta.scores) for m in self.models}) > 1:
            raise ValueError("the models have different level vocabularies (level_words in qalign_kvq.json): their "
                             "level probabilities cannot be averaged; ensemble models trained with the same words")
        self.weights = list(weights) if weights is not None else [1.0] * len(models)
        self.options = options or ViewOptions()
        self.device, self.dtype = torch.device(device), dtype
        for lm in self.models:
            lm.family.check_processor_device(processor_device)
        #: Where the processors resize and normalise pixels (None: the CPU; e.g. "cuda").
        self.processor_device = processor_device

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike | Sequence[str | os.PathLike] = DEFAULT_MODEL,
                        device=None, dtype=None, weights: Sequence[float] | None = None,
                        options: ViewOptions | None = None, protocol: str | None = None,
                        attn_implementation: str | None = None, frame_pixels: int | None = None,
                        vision_attention: str = "packed", processor_device: str | None = None,
                        **view_options) -> Scorer:
        """Load one checkpoint (directory or hub id; default: the public OneAlign) or several (a
        list: a model ensemble). The protocol is ``protocol`` if given, else the one the
        checkpoints name (they must agree); keyword arguments beyond these change its
        :class:`ViewOptions` fields (``frames=8``...); ``options`` replaces it whole.
        ``frame_pixels`` replaces the per-frame pixel budget stored with the checkpoints;
        ``attn_implementation`` goes to ``from_pretrained`` (e.g. ``flash_attention_2``);
        ``vision_attention`` is ``packed`` (Qwen-VL, one call per layer) or ``stock``;
        ``processor_device`` (e.g. ``cuda``) runs the processors' pixel work there."""
        paths = [path_or_id] if isinstance(path_or_id, (str, os.PathLike)) else list(path_or_id)
        dev, dt = default_device_dtype(device, dtype)
        overrides = {"frame_pixels": frame_pixels} if frame_pixels is not None else None
        loaded = []
        for path in paths:
            model, processor, family, meta = load_checkpoint(path, dev, dt, attn_implementation, overrides,
                                                            vision_attention)
            ids = family.check_level_tokens(processor, meta.level_words, meta.question, meta.answer_prefix)
            loaded.append(LoadedModel(str(path), model, processor, family, meta, ids))
        if options is None:
            options = resolve_protocol(loaded, protocol, view_options)
        return cls(loaded, weights, options, dev, dt, processor_device)

    # ----- entry points -------------------------------------------------------------------
    def score(self, path: str | os.PathLike) -> ScoreResult:
        """Score a video file with the protocol's frames, then :meth:`score_frames`. Unreadable
        files raise :class:`qalign_kvq.video.VideoError` naming the file and the reason."""
        t0 = time.perf_counter()
        info = probe(path)
        indices = self.options.frame_indices(info.num_frames, info.fps, self.frame_cap())
        clip = read_frames(path, indices)
        decode = time.perf_counter() - t0
        timing = ClipTiming(tuple(indices), info.fps, info.num_frames) if info.fps > 0 else None
        result = self.score_frames(clip, file=str(path), timing=timing)
        result.timing = {"decode_s": decode, **result.timing}
        result.timing["total_s"] += decode
        return result

    def score_many(self, paths: Iterable[str | os.PathLike], workers: int = 0, prefetch: int = 2
                   ) -> Iterator[ScoreResult]:
        """Score video files, yielding the results in input order: read, sampled, cut into views and
        processed in ``workers`` DataLoader worker processes (0: here, one after the other), at most
        ``prefetch`` videos ahead each, while this process runs the forwards (``options.batch_size``
        views per forward, across videos; None: one video's views). A file that cannot be scored
        raises its error when its turn comes, as :meth:`score` would (and ends the iteration);
        :func:`qalign_kvq.view_batches.score_videos` yields error outcomes and goes on."""
        from qalign_kvq.view_batches import score_videos

        for outcome in score_videos(self, [(str(p), p) for p in paths], workers=workers, prefetch=prefetch):
            if outcome.result is None:
                raise outcome.exception
            yield outcome.result

    def frame_cap(self) -> int | None:
        """The most frames every model's context holds (None: no model knows)."""
        return min((c for c in (lm.context_frames() for lm in self.models) if c), default=None)

    def score_frames(self, clip: np.ndarray, file: str | None = None, timing: ClipTiming | None = None) -> ScoreResult:
        """Score frames already in memory: ``(T, H, W, 3)`` uint8 RGB (T == 1: an image); ``timing``
        says which frames of which video they are (Qwen2.5-VL / Qwen3-VL read the times from it)."""
        clip = check_clip(clip)
        t0 = time.perf_counter()
        views = make_views(clip, self.options)
        return self._score_views(views, file, clip.shape[0], time.perf_counter() - t0, timing)

    def score_image(self, image: np.ndarray | str | os.PathLike | Any) -> ScoreResult:
        """Score one image (asked about as an image): an ``(H, W, 3)`` uint8 array, a PIL image or
        an image file."""
        file = None
        if isinstance(image, (str, os.PathLike)):
            file, image = str(image), load_image(image)
        array = np.array(image.convert("RGB")) if hasattr(image, "convert") else np.asarray(image)
        if array.ndim != 3:
            raise ValueError(f"an image must be (H, W, 3), got shape {array.shape}")
        return self.score_frames(array[None], file=file)

    # ----- the shared path ------------------------------------------------------------------
    def _score_views(self, views: Views, file: str | None, frames: int, t_views: float,
                     timing: ClipTiming | None = None) -> ScoreResult:
        t_proc = t_model = 0.0
        probs, tokens = [], None
        for i, lm in enumerate(self.models):
            scored = clip_level_probs(lm.model, lm.processor, lm.family, views.clips, lm.level_ids,
                                      lm.meta.question, self.options.batch_size, self.device, self.dtype,
                                      timing=timing, answer_prefix=lm.meta.answer_prefix,
                                      processor_device=self.processor_device)
            t_proc, t_model = t_proc + scored.processor_s, t_model + scored.model_s
            tokens = scored.visual_tokens if i == 0 else tokens
            probs.append(scored.probs)
        return self.assemble(views.names, views.weights, views.sandwich_box, probs, file, frames, tokens,
                             {"views_s": t_views, "processor_s": t_proc, "model_s": t_model,
                              "total_s": t_views + t_proc + t_model})

    def assemble(self, view_names: Sequence[str], view_weights: np.ndarray, sandwich_box,
                 view_probs: Sequence[np.ndarray], file: str | None, frames: int, tokens: list[int] | None,
                 timing: dict[str, float]) -> ScoreResult:
        """The result of one video from each model's level probabilities of its views
        ``(n_views, n_levels)``: views combined by their weights, then the models by theirs."""
        per_model = [ModelScore.from_view_probs(p, view_weights, lm.meta, self.options.scale)
                     for p, lm in zip(view_probs, self.models)]
        combined = per_model[0] if len(per_model) == 1 else ensemble(per_model, self.weights)
        words = self.models[0].meta.level_words
        models = None
        if len(per_model) > 1:
            models = [{"model": lm.name, "weight": w, "score": s.score, "score_1_5": s.score_1_5}
                      for lm, w, s in zip(self.models, self.weights, per_model)]
        return ScoreResult(
            file=file, score=combined.score, score_1_5=combined.score_1_5,
            probs=probs_by_word(combined.probs, words), uncertainty=combined.uncertainty,
            views=list(view_names), frames=frames, protocol=self.options.name, view_tokens=tokens,
            sandwich_box=list(sandwich_box) if sandwich_box else None, timing=timing, models=models)


def resolve_protocol(models: Sequence[LoadedModel], name: str | None, overrides: dict[str, Any]) -> ViewOptions:
    """The protocol named ``name``, else the one every checkpoint names, with ``overrides``. The
    ``authors`` protocol takes its frame rate from the (single) family of the models."""
    names = {lm.meta.protocol for lm in models}
    if name is None:
        if len(names) > 1:
            raise ValueError(f"the models name different scoring protocols ({', '.join(sorted(names))}); "
                             "choose one (--protocol / protocol=)")
        name = names.pop()
    families = {lm.family.name for lm in models}
    if name == "authors" and len({type(lm.family).authors_fps for lm in models}) > 1:
        raise ValueError(f"the 'authors' protocol reads frames at each family's own rate; these models are of "
                         f"{', '.join(sorted(families))}: choose the frames (fps=, frames=) or another protocol")
    return named_protocol(name, models[0].family, **overrides)


def check_clip(clip: np.ndarray) -> np.ndarray:
    clip = np.asarray(clip)
    if clip.ndim != 4 or clip.shape[-1] != 3 or clip.dtype != np.uint8 or clip.shape[0] == 0:
        raise ValueError(f"a clip must be a non-empty (T, H, W, 3) uint8 array, got {clip.shape} {clip.dtype}")
    return clip


def load_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as an ``(H, W, 3)`` uint8 RGB array."""
    from PIL import Image

    with Image.open(path) as img:
        return np.array(img.convert("RGB"))
