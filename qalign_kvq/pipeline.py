"""The input side of batch scoring: reading, frame sampling, views and the processor call of each
video, in ``torch.utils.data.DataLoader`` worker processes (``workers > 0``) or in the calling
process (``workers == 0``: one video after the other), delivered in input order while the main
process runs the forwards (:mod:`qalign_kvq.view_batches`).

Each video becomes a :class:`PreparedVideo`: the model inputs of its views for every model of the
Scorer (one processor call for all the views when a forward takes one video's views, as
:meth:`~qalign_kvq.scorer.Scorer.score` makes them; else one call per view, so that views of
several videos can share a forward), the views themselves when the processor runs in the main
process (``processor_device``), or the reason the file could not be scored. An exception on a
file is returned as data, so one bad file never stops the loader. A worker that dies on a file (a
crash in a decoder, ``os._exit``, the kernel's OOM killer) is found by the in-flight slot each
worker keeps: that file gets an error record and a new loader goes on with the rest. Prefetch is
bounded: at most ``workers x prefetch`` videos are prepared ahead of the forwards.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from qalign_kvq.families.base import ClipTiming, ModelInputs
from qalign_kvq.scoring import ViewOptions, make_views
from qalign_kvq.video import VideoError, probe, read_frames

#: Files in a row whose worker died (no video prepared in between) before the run stops: a
#: worker that dies on every file is a broken environment (a full /dev/shm), not broken files.
MAX_CRASHES_IN_A_ROW = 5
#: Most workers the default picks (more rarely pays: the forward is the bottleneck on a GPU).
MAX_DEFAULT_WORKERS = 8


class DeviceError(Exception):
    """The accelerator failed: nothing more can be scored in this process."""


class WorkerError(Exception):
    """DataLoader workers keep dying: the environment, not the files (nothing more is scored)."""


def error_reason(name: str, err: Exception) -> str:
    """The error record's reason for an exception met scoring ``name``: a VideoError's reason, else
    ``Type: message``; CUDA out-of-memory says how to retry; an unexpected type also prints its
    traceback. A device failure (``torch.AcceleratorError``) raises :class:`DeviceError`."""
    if isinstance(err, VideoError):
        return err.reason
    if isinstance(err, torch.OutOfMemoryError):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        first = str(err).splitlines()[0] if str(err) else ""
        return f"OutOfMemoryError: {first} (try --views-per-forward with fewer views)"
    if isinstance(err, torch.AcceleratorError):
        raise DeviceError(f"{name}: {err}") from err
    if not isinstance(err, (OSError, ValueError, RuntimeError)):
        print(f"unexpected {type(err).__name__} scoring {name} (recorded as its error):", file=sys.stderr)
        traceback.print_exception(err)
    return f"{type(err).__name__}: {err}"


def default_workers(videos: int, processes: int = 1) -> int:
    """Loader workers per process: the CPUs this process may use, shared by the ``processes`` of
    one node, less one for the main process; at most 8 and at most ``videos``; 0 (score in the
    main process) with a single CPU."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(MAX_DEFAULT_WORKERS, cpus // max(1, processes) - 1, videos))


@dataclass
class PrepareSpec:
    """What preparing a video needs of a Scorer, without its models (it travels to the workers):
    the protocol, the frame cap of the models' context, per model ``(processor, family, question,
    answer_prefix)``, the dtype of the pixel values, and whether the processor runs here."""

    options: ViewOptions
    frame_cap: int | None
    processors: list[tuple[Any, Any, str, str]]
    dtype: torch.dtype | None = None
    process: bool = True

    @property
    def per_view(self) -> bool:
        """Each view processed on its own: forwards gather views across videos (``batch_size`` set)."""
        return self.options.batch_size is not None


@dataclass
class PreparedVideo:
    """One video ready for the forwards: ``inputs[model]``, the rows of its views in view order
    (one ModelInputs of all views, or one per view: :func:`view_inputs`; or ``clips`` of the views
    when the processor runs in the main process), the views' names and weights, or ``error`` (the
    record's reason) with the ``exception`` for the Python API."""

    index: int
    name: str
    path: str
    error: str | None = None
    exception: BaseException | None = None
    view_names: list[str] = field(default_factory=list)
    view_weights: np.ndarray | None = None
    sandwich_box: tuple[int, int, int, int] | None = None
    frames: int = 0
    timing: ClipTiming | None = None
    inputs: list[list[ModelInputs]] | None = None
    clips: list[np.ndarray] | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def view_inputs(spec_entry: tuple[Any, Any, str, str], clips: Sequence[np.ndarray], timing: ClipTiming | None,
                per_view: bool, device: str | torch.device | None = None) -> list[ModelInputs]:
    """The model inputs of one video's views, in view order: one processor call for all of them
    (one ModelInputs), or with ``per_view`` one call per view (rows that can join any forward of
    their shape)."""
    processor, family, question, prefix = spec_entry
    parts = [[clip] for clip in clips] if per_view else [list(clips)]
    return [family.build_inputs(processor, part, question, timings=[timing] * len(part), answer_prefix=prefix,
                                device=device) for part in parts]


def prepare(spec: PrepareSpec, index: int, name: str, path: str, threads: int | None = None) -> PreparedVideo:
    """Probe, sample the protocol's frames, read them (``threads`` decoder threads), cut the views,
    run each model's processor; any exception becomes the item's error."""
    from qalign_kvq.scorer import check_clip

    t0 = time.perf_counter()
    try:
        info = probe(path)
        indices = spec.options.frame_indices(info.num_frames, info.fps, spec.frame_cap)
        clip = check_clip(read_frames(path, indices, threads=threads))
        t1 = time.perf_counter()
        timing = ClipTiming(tuple(indices), info.fps, info.num_frames) if info.fps > 0 else None
        views = make_views(clip, spec.options)
        t2 = time.perf_counter()
        inputs = None
        if spec.process:
            inputs = [[row.to("cpu", spec.dtype) for row in view_inputs(entry, views.clips, timing, spec.per_view)]
                      for entry in spec.processors]
        t3 = time.perf_counter()
    except Exception as err:  # noqa: BLE001 (the file's error, returned as data)
        return PreparedVideo(index, name, path, error=error_reason(name, err), exception=_picklable(err))
    return PreparedVideo(index, name, path, view_names=list(views.names), view_weights=views.weights,
                         sandwich_box=views.sandwich_box, frames=clip.shape[0], timing=timing, inputs=inputs,
                         clips=None if spec.process else list(views.clips),
                         seconds={"decode_s": t1 - t0, "views_s": t2 - t1, "processor_s": t3 - t2})


def _picklable(err: BaseException) -> BaseException:
    """``err``, or a RuntimeError with its text where it would not survive the trip from a worker."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(err).__name__}: {err}")


@dataclass(frozen=True)
class _Item:
    index: int
    name: str
    path: str
    crashed: str | None = None  # the worker reading it died: its error, without reading it again


class VideoItems(Dataset):
    """The videos still to prepare; each worker notes ``(pid, index)`` of the one it is on in
    ``slots`` (two entries per worker id), so that the file a dead worker was on is known."""

    def __init__(self, spec: PrepareSpec, items: Sequence[_Item], slots=None):
        self.spec, self.items, self.slots = spec, list(items), slots

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> PreparedVideo:
        item = self.items[i]
        if item.crashed:
            return PreparedVideo(item.index, item.name, item.path, error=item.crashed,
                                 exception=RuntimeError(f"{item.path}: {item.crashed}"))
        worker = get_worker_info()
        if worker is None or self.slots is None:
            return prepare(self.spec, item.index, item.name, item.path)
        self.slots[2 * worker.id], self.slots[2 * worker.id + 1] = os.getpid(), item.index
        try:
            return prepare(self.spec, item.index, item.name, item.path, threads=1)  # one decoder thread each
        finally:
            self.slots[2 * worker.id + 1] = -1


def _identity(item):
    return item


def _init_worker(worker_id: int) -> None:
    torch.set_num_threads(1)  # decode_threads() follows: one FFmpeg thread per worker


def prepared_videos(spec: PrepareSpec, items: Sequence[tuple[str, str | os.PathLike]], workers: int = 0,
                    prefetch: int = 2) -> Iterator[PreparedVideo]:
    """The ``(name, path)`` items prepared, in order: in this process (``workers == 0``) or in
    ``workers`` DataLoader workers, at most ``prefetch`` videos ahead each."""
    todo = [_Item(i, name, str(path)) for i, (name, path) in enumerate(items)]
    if workers <= 0:
        for item in todo:
            yield prepare(spec, item.index, item.name, item.path)
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers are forked after tokenizing
    out: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()
    # the loader is iterated in a thread of its own: torch then sets no SIGCHLD handler, which would
    # raise a worker's death in the main thread wherever it is (in a forward, writing a record)
    feeder = threading.Thread(target=_feed, args=(spec, todo, workers, prefetch, out, stop), daemon=True,
                              name="qalign-kvq-loader")
    feeder.start()
    try:
        while True:
            kind, value = out.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        while feeder.is_alive():
            try:
                out.get(timeout=0.1)  # unblock a put
            except queue.Empty:
                pass
        feeder.join()


def _put(out: queue.Queue, stop: threading.Event, message) -> bool:
    while not stop.is_set():
        try:
            out.put(message, timeout=0.1)
            return True
        except queue.Full:
            pass
    return False


def _feed(spec, todo: list[_Item], workers: int, prefetch: int, out: queue.Queue, stop: threading.Event) -> None:
    try:
        _load(spec, todo, workers, prefetch, out, stop)
        _put(out, stop, ("end", None))
    except BaseException as err:  # noqa: BLE001 (handed to the consumer)
        _put(out, stop, ("error", err))


def _load(spec, remaining: list[_Item], workers: int, prefetch: int, out: queue.Queue, stop: threading.Event):
    context = multiprocessing.get_context()
    slots = context.Array("q", 2 * workers, lock=False)
    crashes_in_a_row, stalled = 0, False
    while remaining and not stop.is_set():
        for k in range(len(slots)):
            slots[k] = -1
        loader = DataLoader(VideoItems(spec, remaining, slots), batch_size=None, shuffle=False,
                            num_workers=min(workers, len(remaining)), collate_fn=_identity,
                            worker_init_fn=_init_worker, prefetch_factor=prefetch, persistent_workers=False,
                            multiprocessing_context=context)
        delivered, iterator = 0, iter(loader)
        try:
            for prepared in iterator:
                delivered += 1
                crashed = remaining[delivered - 1].crashed is not None
                crashes_in_a_row = crashes_in_a_row + 1 if crashed else 0
                if crashes_in_a_row >= MAX_CRASHES_IN_A_ROW:
                    raise WorkerError(f"the DataLoader worker died on {crashes_in_a_row} files in a row (last: "
                                      f"{prepared.path}): the environment rather than the files? A full /dev/shm "
                                      "(docker's default is 64 MB: --shm-size) kills workers; --workers 0 reads in "
                                      "the main process")
                if not _put(out, stop, ("item", prepared)):
                    return
            remaining = []
        except (RuntimeError, OSError, EOFError) as err:
            # torch names a dead worker; a worker that died before this process took the tensors of
            # the video it had just sent (they are fetched from the sender) shows as EOFError/OSError
            if not (str(err).startswith("DataLoader worker") or _a_worker_died(slots)):
                raise
            lost = remaining[delivered:]
            culprits = _in_flight_of_dead(slots, {item.index for item in lost if not item.crashed})
            if not culprits and (stalled or delivered == 0):  # no slot to go by twice: blame the next file
                culprits = {next(item.index for item in lost if not item.crashed)}
            stalled = not culprits
            reason = (f"the DataLoader worker reading it died ({err}: a crash in the decoder or the processor, "
                      "or killed, e.g. for memory)")
            remaining = [replace(item, crashed=reason) if item.index in culprits else item for item in lost]
        finally:
            del iterator  # shuts its workers down


def _a_worker_died(slots, wait_s: float = 5.0) -> bool:
    """Whether a worker process of ``slots`` is gone (or goes within ``wait_s``: it may be dying)."""
    pids = [slots[k] for k in range(0, len(slots), 2) if slots[k] > 0]
    deadline = time.monotonic() + wait_s
    while True:
        if any(not _alive(pid) for pid in pids):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _in_flight_of_dead(slots, wanted: set[int]) -> set[int]:
    """Indices in ``wanted`` that a worker whose process is gone was preparing."""
    found = set()
    for k in range(0, len(slots), 2):
        pid, index = slots[k], slots[k + 1]
        if pid > 0 and index in wanted and not _alive(pid):
            found.add(index)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (not reaped yet) is dead
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
