"""Read video metadata and selected frames (uint8 RGB, rotation applied) with PyAV or decord.

Only the requested frames are converted and kept, so memory stays bounded for long and 4K videos.
Frame `i` is the i-th frame shown, in presentation order, as ffmpeg's select=eq(n,i) filter numbers them
(frames an edit list hides are not counted; decord counts them but returns the same frames below that).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from .errors import EmptyVideoError, NotAVideoError, NoVideoStreamError, VideoDecodeError, VideoNotFoundError

BACKENDS = ("auto", "pyav", "decord")
# first bytes of containers that FFmpeg reads: a file that starts like one but fails to open is damaged
_CONTAINER_MAGIC = {b"\x1a\x45\xdf\xa3": "Matroska/WebM", b"RIFF": "RIFF/AVI", b"OggS": "Ogg", b"FLV": "FLV"}


@dataclass(frozen=True)
class VideoInfo:
    """What a video file is. `width`/`height` are the displayed size (rotation applied);
    `rotation` is the counter-clockwise angle (0, 90, 180, 270) applied to the stored frames;
    `num_frames` comes from the container header (counted from packets when the header has none)."""

    path: str
    width: int
    height: int
    fps: float
    num_frames: int
    duration: float
    rotation: int
    codec: str


def _check_file(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise VideoNotFoundError(p, "no such file" if not p.exists() else "not a regular file")
    if p.stat().st_size == 0:
        raise NotAVideoError(p, "the file is empty (0 bytes)")
    return p


def _container_kind(p: Path) -> str | None:
    with open(p, "rb") as f:
        head = f.read(12)
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide"):
        return "MP4/MOV"
    return next((name for magic, name in _CONTAINER_MAGIC.items() if head.startswith(magic)), None)


@contextlib.contextmanager
def _open(p: Path) -> Iterator[av.container.InputContainer]:
    try:
        container = av.open(str(p), mode="r")
    except av.error.FFmpegError as e:
        kind = _container_kind(p)
        if kind is not None:
            raise VideoDecodeError(p, f"damaged or truncated {kind} container ({e.strerror or e})") from e
        raise NotAVideoError(p, f"not a video container FFmpeg can read ({e.strerror or e})") from e
    try:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise NoVideoStreamError(p, f"no video stream (streams: {', '.join(kinds)})")
        yield container
    finally:
        container.close()


def _rotation(frame: av.VideoFrame) -> int:
    return int(round(frame.rotation / 90.0)) % 4 * 90


def _to_rgb(frame: av.VideoFrame, rotation: int) -> np.ndarray:
    rgb = frame.to_ndarray(format="rgb24")
    return np.ascontiguousarray(np.rot90(rgb, rotation // 90)) if rotation else rgb


def _packet_table(container, stream) -> tuple[list[int], list[int], dict[int, int]] | None:
    """Presentation timestamps of all shown frames (sorted) and of the keyframes, and each keyframe's
    decoding timestamp, from packets (no decoding). Packets an edit list discards (e.g. after a trim
    without re-encoding) are decoded as references but never shown, so they are not frames. None
    when some packet has no timestamp."""
    pts, keys, key_dts = [], [], {}
    for packet in container.demux(stream):
        if packet.size == 0:
            continue
        if packet.pts is None:
            return None
        if packet.is_keyframe:
            keys.append(packet.pts)
            if packet.dts is not None:
                key_dts[packet.pts] = packet.dts
        if not packet.is_discard:
            pts.append(packet.pts)
    return sorted(pts), sorted(keys), key_dts


def _count_packets(p: Path) -> int:
    """Packets with data of the video stream, from a fresh open (for streams without timestamps)."""
    with _open(p) as c:
        return sum(1 for packet in c.demux(c.streams.video[0]) if packet.size)


def _header_frames(stream) -> int:
    """Frame count from the container index (MP4/MOV: every sample, minus those an edit list discards);
    0 where the container keeps none (Matroska/WebM, raw streams)."""
    if stream.frames <= 0:
        return 0
    entries = stream.index_entries
    if len(entries) == stream.frames:
        return sum(1 for e in entries if not e.is_discard)
    return stream.frames


def probe(path: str | Path) -> VideoInfo:
    """Describe a video from its header and its first frame (only that frame is decoded)."""
    p = _check_file(path)
    with _open(p) as c:
        st = c.streams.video[0]
        num_frames = _header_frames(st)
        counted = num_frames <= 0
        if counted:  # Matroska/WebM, MPEG-TS, raw streams keep no count: count packets, decode nothing
            table = _packet_table(c, st)
            num_frames = len(table[0]) if table else _count_packets(p)
        if num_frames <= 0:
            raise EmptyVideoError(p, "the video stream has no frames")
        # after counting, a new open starts at the first packet (raw streams cannot seek back)
        with _open(p) if counted else contextlib.nullcontext(c) as fresh:
            try:
                first = next(fresh.decode(fresh.streams.video[0]), None)
            except av.error.FFmpegError as e:
                raise VideoDecodeError(p, f"the first frame cannot be decoded ({e.strerror or e})") from e
        if first is None:
            raise EmptyVideoError(p, "no frame of the video stream can be decoded")
        rotation = _rotation(first)
        if st.duration and st.time_base:
            duration = float(st.duration * st.time_base)
        elif c.duration:
            duration = c.duration / 1_000_000
        else:
            duration = 0.0
        rate = st.average_rate or st.guessed_rate
        fps = float(rate) if rate else (num_frames / duration if duration else 0.0)
        if not duration and fps:
            duration = num_frames / fps
        w, h = first.width, first.height
        if rotation in (90, 270):
            w, h = h, w
        return VideoInfo(str(p), w, h, fps, int(num_frames), duration, rotation, st.codec_context.name)


def _validate(p: Path, indices: Sequence[int], num_frames: int) -> list[int]:
    out = [int(i) for i in indices]
    bad = [i for i in out if not 0 <= i < num_frames]
    if bad:
        raise IndexError(f"{p}: frame indices {bad[:5]} out of range for a video of {num_frames} frames")
    return out


def decode_threads() -> int:
    """FFmpeg decoding threads per reader: torch's intra-op thread count of this process (1 in a
    DataLoader worker, ``OMP_NUM_THREADS`` where a launcher sets it, else the cores), so that ranks x
    workers readers do not each start one thread per core of the machine."""
    import torch

    return max(1, torch.get_num_threads())


#: Most GOPs of one video decoded at once (each in its own thread and open of the file), within the
#: reader's threads: a decoder's frame threads speed it up far less than decoders side by side.
MAX_PARALLEL_GOPS = 4

#: Codecs whose FFmpeg decoders, told to skip non-reference frames, leave every other frame
#: byte-identical (tests/test_video_reader.py checks each against a full decode).
SKIP_NONREF_CODECS = frozenset({"h264", "hevc"})


def _frames(container, stream, keep: set[int] | None) -> Iterator[av.VideoFrame]:
    """Frames decoded from the container's position on. With `keep` (pts of the frames wanted) and a
    codec of :data:`SKIP_NONREF_CODECS`, frames no other frame refers to are not decoded unless
    kept: a B-frame of H.264 costs decoding time, and most frames of a clip are never shown to
    the model."""
    cc = stream.codec_context
    skip = keep is not None and cc.name in SKIP_NONREF_CODECS
    mode = None
    for packet in container.demux(stream):
        if skip and mode != (want := "DEFAULT" if packet.size == 0 or packet.pts in keep else "NONREF"):
            cc.skip_frame = mode = want  # set on change only (frame threads copy it at each packet)
        yield from packet.decode()


def _set_threads(stream, threads: int | None) -> None:
    stream.thread_type = "AUTO"  # frame + slice threads, at most `threads` of them
    stream.codec_context.thread_count = decode_threads() if threads is None else threads


def _decode_from_start(p: Path, wanted: list[int], pts: list[int] | None, threads: int | None,
                       got: dict[int, np.ndarray]) -> None:
    """Decode forward from a fresh open of the file (no seek: raw streams cannot, and some
    containers land past the target) and fill `got` with the frames `wanted` still lacks. With
    `pts` (the shown frames' timestamps) frame i is the first frame at or after pts[i], as in the
    seek path; without, the i-th frame the decoder gives."""
    todo = [i for i in wanted if i not in got]
    if not todo:
        return
    with _open(p) as c:
        st = c.streams.video[0]
        _set_threads(st, threads)
        k = 0
        keep = None if pts is None else {pts[i] for i in todo}
        for n, frame in enumerate(_frames(c, st, keep)):
            while k < len(todo):
                i = todo[k]
                hit = (frame.pts is not None and frame.pts >= pts[i]) if pts is not None else n == i
                if not hit:
                    break
                got[i] = _to_rgb(frame, _rotation(frame))
                k += 1
            if k == len(todo):
                return
    raise VideoDecodeError(p, f"frame {todo[k]} could not be decoded: the stream ended first, decoding from the "
                              f"start (damaged or truncated?)")


def _decode_to(frames: Iterator[av.VideoFrame], target: int, starts: set[int] | None):
    """Decode on to the first frame at or after `target`: ``(its pts, frame)``, ``(last pts, None)``
    when the stream ends first, None when the first frame is not in `starts` at or before the
    target or no frame comes (a seek that landed wrong; `starts` None: no check)."""
    last, first = None, True
    for frame in frames:
        if starts is not None and first and not (frame.pts in starts and frame.pts <= target):
            return None
        last, first = frame.pts, False
        if frame.pts is not None and frame.pts >= target:
            return last, frame
    return None if starts is not None and first else (last, None)


def _read_pyav(p: Path, order: list[int], threads: int | None = None) -> np.ndarray:
    """Decode only the GOPs that hold the wanted frames, each from its keyframe on to its last wanted
    frame; with several threads, up to :data:`MAX_PARALLEL_GOPS` GOPs at once (the threads shared
    among them). A stream without timestamps (raw H.264) is decoded from the start, and so are the
    frames a seek did not reach (it landed after its target, or not on a GOP's first frame, as in
    MPEG-TS): the frames are always those of a decode from the start."""
    with _open(p) as c:
        st = c.streams.video[0]
        table = _packet_table(c, st)
        num_frames = _header_frames(st) or (len(table[0]) if table else 0)
        if table is not None and num_frames <= 0:
            raise EmptyVideoError(p, "the video stream has no frames")
        if table is not None:
            _validate(p, order, num_frames)
        if not order:
            w, h = st.codec_context.width, st.codec_context.height
            return np.empty((0, h, w, 3), np.uint8)
    wanted = sorted(set(order))
    got: dict[int, np.ndarray] = {}
    if table is None:  # no timestamps (raw streams): count the frames while decoding from the start
        _validate(p, order, _count_packets(p))
        _decode_from_start(p, wanted, None, threads, got)
        return np.stack([got[i] for i in order])
    pts, keys, key_dts = table
    if not pts:
        raise EmptyVideoError(p, f"the header lists {num_frames} frames but the file holds no frame data")
    if wanted[-1] >= len(pts):
        raise VideoDecodeError(p, f"the header lists {num_frames} frames but the file holds {len(pts)}; "
                                  f"frame {wanted[-1]} was asked for (truncated?)")
    # the first frame shown from each keyframe on: where a decode after a good seek starts
    starts = {pts[j] for j in np.searchsorted(pts, keys) if j < len(pts)} if keys else {pts[0]}
    gops: dict[int, list[int]] = {}  # keyframe -> the wanted frames decoded from it
    for i in wanted:
        gops.setdefault(keys[max(0, np.searchsorted(keys, pts[i], side="right") - 1)] if keys else pts[0], []).append(i)
    total = decode_threads() if threads is None else threads or os.cpu_count() or 1
    workers = min(len(gops), total, MAX_PARALLEL_GOPS)
    first_key = keys[0] if keys else pts[0]

    def read(gop: tuple[int, list[int]]) -> dict[int, np.ndarray]:
        key, items = gop
        share = threads if workers == 1 else max(1, total // workers)
        return _read_gop(p, key, items, pts, starts, key_dts.get(key), key == first_key, share)

    if workers <= 1:
        parts = [read(gop) for gop in gops.items()]
    else:
        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(read, gops.items()))
    for part in parts:
        got.update(part)
    _decode_from_start(p, wanted, pts, threads, got)  # what a seek did not reach, if any
    return np.stack([got[i] for i in order])


def _read_gop(p: Path, key: int, items: list[int], pts: list[int], starts: set[int], key_dts: int | None,
              at_start: bool, threads: int | None) -> dict[int, np.ndarray]:
    """Frames `items` (sorted, all after keyframe `key`) from one open of the file: seek to the
    keyframe (unless it is the first: a fresh open starts there), retried at its decoding time
    (MPEG-TS seeks by it), then decode on. Frames it cannot reach (a seek that lands past its
    target or inside a GOP, a stream that cannot seek, an early end) are left out."""
    got: dict[int, np.ndarray] = {}
    with _open(p) as c:
        st = c.streams.video[0]
        _set_threads(st, threads)
        keep = starts | {pts[i] for i in items}  # frames that must be decoded, all others may be skipped
        frames = _frames(c, st, keep)
        landed = _decode_to(frames, pts[items[0]], None) if at_start else None
        for seek in [] if at_start else [key] + ([key_dts] if key_dts not in (None, key) else []):
            try:
                c.seek(seek, stream=st, backward=True)
            except av.error.FFmpegError:  # a stream that cannot seek back
                return got
            frames = _frames(c, st, keep)
            landed = _decode_to(frames, pts[items[0]], starts)
            if landed is not None:
                break
        for k, i in enumerate(items):
            if k:
                landed = _decode_to(frames, pts[i], None)
            if landed is None or landed[1] is None:
                return got
            got[i] = _to_rgb(landed[1], _rotation(landed[1]))
    return got


def _read_decord(p: Path, order: list[int], num_frames: int) -> np.ndarray:
    import decord

    _validate(p, order, num_frames)
    try:
        vr = decord.VideoReader(str(p), ctx=decord.cpu(0))
        if not order:
            return np.empty((0, *vr[0].shape), np.uint8) if len(vr) else np.empty((0, 0, 0, 3), np.uint8)
        wanted = sorted(set(order))
        if wanted[-1] >= len(vr):
            raise VideoDecodeError(p, f"decord finds {len(vr)} frames, frame {wanted[-1]} was asked for (truncated?)")
        batch = vr.get_batch(wanted).asnumpy()  # decord applies the display rotation itself
    except decord.DECORDError as e:
        raise VideoDecodeError(p, f"decord cannot decode the file ({str(e).splitlines()[0][:300]})") from e
    pos = {i: k for k, i in enumerate(wanted)}
    return batch[[pos[i] for i in order]]


def read_frames(path: str | Path, indices: Sequence[int], backend: str = "auto",
                threads: int | None = None) -> np.ndarray:
    """Return frames `indices` (any order, repeats allowed) as a uint8 RGB array (len(indices), H, W, 3).

    backend: "pyav" (seek-based, decodes only the GOPs that hold the frames; from the start where the
    file cannot seek or a seek lands wrong: raw streams, MPEG-TS), "decord", or "auto": PyAV, which
    needed no more CPU time than decord on any clip of scripts/bench_video.py (see
    docs/benchmarks.md) and, unlike decord 0.6, reads VP9 and AV1; decord is tried where PyAV
    fails. Broken files raise a typed
    `VideoError` (for decord, after a PyAV probe, so decord never sees a file FFmpeg cannot open);
    indices outside the video raise IndexError. PyAV decodes with `threads` threads (default
    :func:`decode_threads`; 0 is FFmpeg's own choice, one per core).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    p = _check_file(path)
    if backend == "decord":
        return _read_decord(p, list(indices), probe(p).num_frames)
    try:
        return _read_pyav(p, [int(i) for i in indices], threads)
    except av.error.FFmpegError as e:
        if backend == "pyav":
            raise VideoDecodeError(p, f"PyAV cannot decode the file ({e.strerror or e})") from e
        return _read_decord(p, list(indices), probe(p).num_frames)
