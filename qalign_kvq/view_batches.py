"""The forward side of batch scoring: views of several videos share a forward.

With ``options.batch_size`` (``--views-per-forward``) set, each view of a prepared video
(:mod:`qalign_kvq.pipeline`) is one processor row; rows of one model with the same shapes (the
same tensor shapes but for the batch axis: the same text length, frame count, image size) are
concatenated along the batch axis, at most ``batch_size`` views a forward, and the level
probabilities are split back to their videos. Without it a video's views are one row (one
processor call), forwarded as they come. Rows of one shape line up without padding, so a
view scores as it does in a forward of its own video's views, to float tolerance. A forward that
fails on several videos is run again one video at a time, so that the error is the right video's.
Results come out in input order, each as soon as all its views are scored.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from qalign_kvq.cpu_allocator import keep_freed_memory
from qalign_kvq.families.base import ModelInputs
from qalign_kvq.modeling import level_probs
from qalign_kvq.pipeline import PreparedVideo, PrepareSpec, error_reason, prepared_videos, view_inputs

#: Row shapes with a forward gathering at once (one more flushes the oldest): bounds the videos
#: waiting for a forward when a set mixes many frame sizes.
MAX_OPEN_SHAPES = 4


@dataclass
class Outcome:
    """What scoring one video gave: its :class:`~qalign_kvq.scorer.ScoreResult`, or the record's
    ``error`` (and the ``exception`` behind it)."""

    name: str
    result: object | None = None
    error: str | None = None
    exception: BaseException | None = None

    def record(self) -> dict:
        """The JSONL record: the result with ``file`` set to the name, or ``{"file", "error"}``."""
        if self.result is None:
            return {"file": self.name, "error": self.error}
        record = self.result.to_record()
        record["file"] = self.name
        return record


def signature(inputs: ModelInputs) -> tuple:
    """What rows must share to be concatenated: keys, and each tensor's shape past the batch axis."""
    parts = []
    for key in sorted(inputs.batch):
        value = inputs.batch[key]
        if isinstance(value, torch.Tensor):
            parts.append((key, tuple(value.shape[1:]), value.dtype, value.device.type))
        else:
            parts.append((key, type(value).__name__ if isinstance(value, list) else repr(value)))
    return tuple(parts)


def concat(rows: Sequence[ModelInputs]) -> ModelInputs:
    """Rows of one :func:`signature` as one batch (tensors and lists joined along the batch axis;
    packed pixel tensors too: the grids say whose patches are whose); one row as it is."""
    if len(rows) == 1:
        return rows[0]
    batch = {}
    for key, first in rows[0].batch.items():
        values = [row.batch[key] for row in rows]
        if isinstance(first, torch.Tensor):
            batch[key] = torch.cat(values) if first.dim() else first
        elif isinstance(first, list):
            batch[key] = [x for value in values for x in value]
        else:
            batch[key] = first
    tokens = None if any(r.visual_tokens is None for r in rows) else [t for r in rows for t in r.visual_tokens]
    return ModelInputs(batch, torch.cat([row.level_positions for row in rows]), tokens)


class _Video:
    """A video waiting for its views' probabilities (per model) or failed."""

    def __init__(self, item: PreparedVideo, n_models: int):
        self.item, self.error, self.exception = item, item.error, item.exception
        n = len(item.view_names)
        self.probs = [[None] * n for _ in range(n_models)]
        self.tokens: list[int | None] = [None] * n
        self.left = n_models * n
        self.model_s = 0.0

    @property
    def done(self) -> bool:
        return self.error is not None or self.left == 0

    def fail(self, err: Exception) -> None:
        if self.error is None:
            self.error, self.exception = error_reason(self.item.name, err), err


@dataclass
class _Row:
    """Model inputs of views ``views`` of one video (one per batch row of ``inputs``)."""

    video: _Video
    model: int
    views: range
    inputs: ModelInputs


class ForwardQueue:
    """One model's rows waiting for a forward, gathered by shape; a group is forwarded when it
    holds ``limit`` views (None: at :meth:`flush`, i.e. per video)."""

    def __init__(self, lm, model_index: int, device, dtype, limit: int | None):
        self.lm, self.index, self.device, self.dtype, self.limit = lm, model_index, device, dtype, limit
        self.groups: OrderedDict[tuple, list[_Row]] = OrderedDict()

    def add(self, row: _Row) -> None:
        key = signature(row.inputs)
        group = self.groups.get(key)
        if group is None:
            if len(self.groups) >= MAX_OPEN_SHAPES:
                self._forward(self.groups.popitem(last=False)[1])
            group = self.groups[key] = []
        group.append(row)
        if self.limit is not None and sum(len(r.views) for r in group) >= self.limit:
            self._forward(self.groups.pop(key))

    def flush(self) -> None:
        while self.groups:
            self._forward(self.groups.popitem(last=False)[1])

    def _forward(self, rows: list[_Row], again: bool = True) -> None:
        live = [r for r in rows if r.video.error is None]
        if not live:
            return
        try:
            t0 = time.perf_counter()
            merged = concat([r.inputs for r in live]).to(self.device, self.dtype)
            with torch.inference_mode():
                probs = level_probs(self.lm.model, merged, self.lm.level_ids).float().cpu().numpy()
            seconds = time.perf_counter() - t0
        except Exception as err:  # noqa: BLE001 (policy: pipeline.error_reason)
            if again and str(err).startswith("DataLoader worker"):
                return self._forward(rows, again=False)  # another loader's SIGCHLD handler: not this forward's
            videos = list(dict.fromkeys(r.video for r in live))
            if len(videos) == 1 or isinstance(err, torch.AcceleratorError):
                videos[0].fail(err)  # a device failure raises DeviceError here
                return
            for video in videos:  # again one video at a time: the error goes to its own video
                self._forward([r for r in live if r.video is video], again=False)
            return
        offset = 0
        for row in live:
            video, n = row.video, len(row.views)
            for j, view in enumerate(row.views):
                video.probs[self.index][view] = probs[offset + j].astype(np.float64)
                if self.index == 0 and row.inputs.visual_tokens is not None:
                    video.tokens[view] = row.inputs.visual_tokens[j]
            offset += n
            video.model_s += seconds * n / len(probs)
            video.left -= n


def spec_of(scorer, processor_device: str | None = None) -> PrepareSpec:
    """What the loader needs of ``scorer``; the processor runs in the loader unless on a device."""
    entries = [(lm.processor, lm.family, lm.meta.question, lm.meta.answer_prefix) for lm in scorer.models]
    return PrepareSpec(scorer.options, scorer.frame_cap(), entries, scorer.dtype, process=processor_device is None)


def score_videos(scorer, items: Sequence[tuple[str, str | os.PathLike]], workers: int = 0, prefetch: int = 2
                 ) -> Iterator[Outcome]:
    """Score ``(name, path)`` items, yielding one :class:`Outcome` each in input order: prepared by
    ``workers`` DataLoader workers (0: here), forwarded here with ``scorer.options.batch_size``
    views per forward across videos. ``scorer.processor_device`` set: the processors run here,
    on that device, the workers only read and cut views. Forwards on the CPU: glibc's malloc keeps
    freed memory for the next forward (:func:`qalign_kvq.cpu_allocator.keep_freed_memory`)."""
    if torch.device(scorer.device).type == "cpu":
        keep_freed_memory()
    spec = spec_of(scorer, scorer.processor_device)
    limit = scorer.options.batch_size
    queues = [ForwardQueue(lm, i, scorer.device, scorer.dtype, limit) for i, lm in enumerate(scorer.models)]
    waiting: deque[_Video] = deque()
    for item in prepared_videos(spec, items, workers, prefetch):
        video = _Video(item, len(scorer.models))
        waiting.append(video)
        if video.error is None:
            _queue_rows(scorer, spec, video, queues)
        if limit is None:
            for q in queues:
                q.flush()
        yield from _finished(scorer, waiting)
    for q in queues:
        q.flush()
    yield from _finished(scorer, waiting)
    assert not waiting, "every video is scored once the queues are flushed"


def _queue_rows(scorer, spec: PrepareSpec, video: _Video, queues: list[ForwardQueue]) -> None:
    item = video.item
    rows = item.inputs
    if rows is None:  # the processor runs here, on the processor device
        t0 = time.perf_counter()
        try:
            rows = [view_inputs(entry, item.clips, item.timing, spec.per_view, scorer.processor_device)
                    for entry in spec.processors]
        except Exception as err:  # noqa: BLE001 (the video's error)
            video.fail(err)
            return
        finally:
            item.clips = None
        item.seconds["processor_s"] += time.perf_counter() - t0
    item.inputs = None  # the queues hold the rows now
    for m, model_rows in enumerate(rows):
        start = 0
        for inputs in model_rows:
            n = len(inputs.level_positions)
            queues[m].add(_Row(video, m, range(start, start + n), inputs))
            start += n


def _finished(scorer, waiting: deque[_Video]) -> Iterator[Outcome]:
    while waiting and waiting[0].done:
        video = waiting.popleft()
        item = video.item
        if video.error is not None:
            yield Outcome(item.name, error=video.error, exception=video.exception)
            continue
        seconds = {**item.seconds, "model_s": video.model_s}
        seconds["total_s"] = sum(seconds.values())
        tokens = None if any(t is None for t in video.tokens) else list(video.tokens)
        result = scorer.assemble(item.view_names, item.view_weights, item.sandwich_box,
                                 [np.stack(p) for p in video.probs], item.path, item.frames, tokens, seconds)
        yield Outcome(item.name, result=result)
