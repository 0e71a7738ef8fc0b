"""probe / read_frames on real clips of every layout and codec, and typed errors on broken files."""

import json
import subprocess
import sys

import numpy as np
import pytest

from qalign_kvq.video import (
    EmptyVideoError,
    NotAVideoError,
    NoVideoStreamError,
    VideoDecodeError,
    VideoError,
    VideoNotFoundError,
    probe,
    read_frames,
    uniform_indices,
)

# name -> (displayed width, height, frames, codec, rotation)
EXPECTED = {
    "landscape": (320, 180, 50, "h264", 0),
    "portrait": (180, 320, 50, "h264", 0),
    "sandwich_blur": (180, 320, 50, "h264", 0),
    "sandwich_black": (180, 320, 50, "h264", 0),
    "hevc10": (320, 180, 25, "hevc", 0),
    "vp9": (320, 180, 25, "vp9", 0),
    "av1": (320, 180, 25, None, 0),  # decoder name varies (libdav1d / libaom-av1 / av1)
    "rotated": (180, 320, 25, "h264", 90),
    "vfr": (320, 136, 33, "h264", 0),
    "trimmed": (320, 180, 37, "h264", 0),  # 50 frames in the file, the first 13 hidden by an edit list
    "one_frame": (320, 180, 1, "h264", 0),
    "tiny": (32, 14, 25, "h264", 0),
    "gops": (320, 136, 100, "h264", 0),
    "mpegts": (320, 136, 100, "h264", 0),
    "raw_h264": (320, 180, 50, "h264", 0),
    "uhd4k": (3840, 2160, 8, "h264", 0),
}
BROKEN_ERRORS = {
    "zero_bytes": NotAVideoError,
    "text_as_mp4": NotAVideoError,
    "truncated": VideoDecodeError,
    "moov_cut": VideoDecodeError,
    "audio_only": NoVideoStreamError,
    "no_frames": EmptyVideoError,
}


def _ffmpeg_frame(path, index, width, height):
    """Frame `index` decoded by the ffmpeg CLI (display rotation applied), as RGB."""
    out = subprocess.run(
        ["ffmpeg", "-v", "error", "-nostdin", "-i", str(path), "-vf", f"select=eq(n\\,{index})", "-fps_mode",
         "passthrough", "-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
        capture_output=True, check=True, timeout=60).stdout
    return np.frombuffer(out, np.uint8).reshape(height, width, 3)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_probe_and_read_every_clip(video_corpus, name):
    width, height, frames, codec, rotation = EXPECTED[name]
    info = probe(video_corpus[name])
    assert (info.width, info.height, info.num_frames, info.rotation) == (width, height, frames, rotation)
    assert codec is None or info.codec == codec
    assert info.fps > 0 and info.duration > 0
    idx = uniform_indices(info.num_frames, 12)
    clip = read_frames(video_corpus[name], idx)
    assert clip.shape == (12, height, width, 3) and clip.dtype == np.uint8
    assert clip.std() > 5  # real content, not a blank buffer


@pytest.mark.parametrize("name", ["landscape", "rotated", "vfr", "trimmed", "hevc10", "vp9", "gops", "mpegts",
                                  "raw_h264"])
def test_frames_match_ffmpeg_cli(video_corpus, name):
    """Frame i is the i-th displayed frame, the same one ffmpeg's select=eq(n,i) gives (VFR and edit lists
    included)."""
    info = probe(video_corpus[name])
    for i in (0, info.num_frames // 2, info.num_frames - 1):
        ours = read_frames(video_corpus[name], [i], backend="pyav")[0].astype(int)
        ref = _ffmpeg_frame(video_corpus[name], i, info.width, info.height).astype(int)
        assert np.abs(ours - ref).mean() < 1.0, (name, i)
        # neighbouring frames differ more: the match is not an accident of static content
        if 0 < i:
            other = read_frames(video_corpus[name], [i - 1], backend="pyav")[0].astype(int)
            assert np.abs(other - ref).mean() > np.abs(ours - ref).mean()


def _decode_all(path):
    """Every frame of a decode from the start of the file (no seek, no frame skipped), as PyAV gives
    them, in RGB, display rotation applied."""
    import av

    with av.open(str(path)) as c:
        return [np.rot90(frame.to_ndarray(format="rgb24"), round(frame.rotation / 90) % 4)
                for frame in c.decode(c.streams.video[0])]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_frames_equal_a_full_decode(video_corpus, name):
    """Seeking and skipping the decoding of frames no other frame refers to (H.264, HEVC) leave the
    frames read byte-identical to those of a full decode from the start: 12 frames and every frame."""
    every = _decode_all(video_corpus[name])
    assert len(every) == EXPECTED[name][2]
    for idx in (uniform_indices(len(every), 12), list(range(len(every)))):
        clip = read_frames(video_corpus[name], idx, backend="pyav")
        for k, i in enumerate(idx):
            assert np.array_equal(clip[k], every[i]), (name, k, i)


@pytest.mark.parametrize("name", ["gops", "mpegts"])
def test_gops_decoded_side_by_side_give_the_same_frames(video_corpus, name):
    """With 4 threads the GOPs of the wanted frames are decoded at once (5 GOPs in each file), with 1
    one after the other: the same frames, in any order asked for."""
    every = _decode_all(video_corpus[name])
    order = [97, 3, 50, 22, 71, 3, 44, 99, 60]
    for threads in (1, 4):
        clip = read_frames(video_corpus[name], order, backend="pyav", threads=threads)
        assert all(np.array_equal(clip[k], every[i]) for k, i in enumerate(order)), (name, threads)


@pytest.mark.parametrize("name", ["landscape", "hevc10", "mpegts"])
def test_unreferenced_frames_are_not_decoded(video_corpus, name):
    """The B-frames no frame refers to are skipped unless wanted (so the test above checks skipping)."""
    import av

    from qalign_kvq.video.reader import _frames

    with av.open(str(video_corpus[name])) as c:
        decoded = sum(1 for _ in _frames(c, c.streams.video[0], keep=set()))
    assert 0 < decoded < 0.8 * EXPECTED[name][2]


@pytest.mark.parametrize("name", ["mpegts", "raw_h264"])
@pytest.mark.parametrize("backend", ["pyav", "auto"])
def test_streams_that_cannot_seek_by_time(video_corpus, name, backend):
    """MPEG-TS (a seek to a keyframe's presentation time lands after the keyframe) and a raw H.264
    stream (no timestamps; the file cannot seek): probe counts the frames, and any frames, in any
    order, are byte-identical to those of a decode from the start."""
    path = video_corpus[name]
    every = _decode_all(path)
    info = probe(path)
    assert info.num_frames == len(every) and info.fps == 25
    assert info.duration == pytest.approx(len(every) / 25, abs=0.05)
    idx = uniform_indices(info.num_frames, 12)
    order = [*idx, len(every) - 1, 0, idx[5], 1]  # backward jumps after the last frame
    clip = read_frames(path, order, backend=backend)
    assert clip.shape == (len(order), *every[0].shape)
    for k, i in enumerate(order):
        assert np.array_equal(clip[k], every[i]), (name, k, i)
    with pytest.raises(IndexError, match="out of range"):
        read_frames(path, [0, len(every)], backend=backend)


@pytest.mark.parametrize("name", ["landscape", "portrait", "sandwich_blur", "rotated", "vfr", "trimmed", "one_frame",
                                  "tiny", "hevc10", "uhd4k"])
def test_decord_and_pyav_agree(video_corpus, name):
    """Same indices, same frames. 8-bit H.264 is bit-exact; 10-bit HEVC differs by the 10->8 bit conversion
    (tolerance: mean abs difference < 2, max < 40 grey levels)."""
    info = probe(video_corpus[name])
    idx = uniform_indices(info.num_frames, 6)
    a = read_frames(video_corpus[name], idx, backend="pyav").astype(int)
    d = read_frames(video_corpus[name], idx, backend="decord").astype(int)
    assert a.shape == d.shape
    if name == "hevc10":
        assert np.abs(a - d).mean() < 2 and np.abs(a - d).max() < 40
    else:
        assert np.array_equal(a, d)


@pytest.mark.parametrize("name", ["vp9", "av1"])
def test_auto_reads_what_decord_cannot(video_corpus, name):
    """decord 0.6 cannot decode these; "auto" reads them, and decord fails with a typed error or agrees."""
    idx = [0, 12, 24]
    auto = read_frames(video_corpus[name], idx)
    assert np.array_equal(auto, read_frames(video_corpus[name], idx, backend="pyav"))
    try:
        d = read_frames(video_corpus[name], idx, backend="decord")
    except VideoDecodeError as e:
        assert str(video_corpus[name]) in str(e) and "decord" in str(e)
    else:
        assert np.abs(d.astype(int) - auto.astype(int)).mean() < 2


def test_order_repeats_and_empty(sample_video):
    clip = read_frames(sample_video, [30, 2, 30, 2, 49])
    singles = [read_frames(sample_video, [i])[0] for i in (30, 2, 49)]
    assert np.array_equal(clip[0], singles[0]) and np.array_equal(clip[2], singles[0])
    assert np.array_equal(clip[1], singles[1]) and np.array_equal(clip[4], singles[2])
    assert not np.array_equal(clip[0], clip[1])
    assert read_frames(sample_video, []).shape == (0, 180, 320, 3)


@pytest.mark.parametrize("backend", ["pyav", "decord", "auto"])
def test_out_of_range_index(sample_video, backend):
    with pytest.raises(IndexError, match="out of range"):
        read_frames(sample_video, [0, 50], backend=backend)
    with pytest.raises(IndexError):
        read_frames(sample_video, [-1], backend=backend)


def test_unknown_backend(sample_video):
    with pytest.raises(ValueError, match="backend"):
        read_frames(sample_video, [0], backend="opencv")


def test_missing_file(tmp_path):
    for fn in (probe, lambda p: read_frames(p, [0])):
        with pytest.raises(VideoNotFoundError, match="no such file") as err:
            fn(tmp_path / "nope.mp4")
        assert str(tmp_path / "nope.mp4") in str(err.value)
        assert isinstance(err.value, FileNotFoundError)
    with pytest.raises(VideoNotFoundError, match="not a regular file"):
        probe(tmp_path)


_CHILD = """
import json, sys
from qalign_kvq.video import probe, read_frames, VideoError
out = {}
for name, path in json.loads(sys.argv[1]).items():
    for fn in ("probe", "read"):
        try:
            probe(path) if fn == "probe" else read_frames(path, [0, 20], backend=sys.argv[2])
            out[f"{name}/{fn}"] = ["no error", ""]
        except VideoError as e:
            out[f"{name}/{fn}"] = [type(e).__name__, str(e)]
print(json.dumps(out))
"""


@pytest.mark.parametrize("backend", ["auto", "pyav", "decord"])
def test_broken_files_give_typed_errors(broken_videos, backend):
    """Each broken file gives its typed error naming the file, in a child process with a timeout, so a
    crash or a hang in a decoder fails the test instead of killing or blocking the run."""
    paths = {k: str(v) for k, v in broken_videos.items()}
    run = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(paths), backend],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    for name, error in BROKEN_ERRORS.items():
        for fn in ("probe", "read"):
            kind, message = got[f"{name}/{fn}"]
            if name == "truncated" and fn == "probe":  # the header and the first frames are intact
                assert kind == "no error"
                continue
            assert kind == error.__name__, (name, fn, kind, message)
            assert message.startswith(paths[name] + ": ") and len(message) > len(paths[name]) + 10


def test_error_hierarchy_and_pickling():
    import pickle

    e = VideoDecodeError("/x/a.mp4", "the stream ended early")
    assert isinstance(e, VideoError) and str(e) == "/x/a.mp4: the stream ended early"
    e2 = pickle.loads(pickle.dumps(e))
    assert type(e2) is VideoDecodeError and (e2.path, e2.reason) == (e.path, e.reason)
