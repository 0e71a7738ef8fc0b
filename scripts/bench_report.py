"""Measure the HTML report (python -m qalign_kvq.report) at the size of a real batch.

    python scripts/bench_report.py [--work /tmp/qalign_bench] [--rows 5000] [--repeats 3]

1. Thumbnails: time of one frame strip (4 evenly spaced frames, 80 px high, WebP) of the portrait
   and sandwich clips that scripts/bench_video.py makes (real content, KVQ's sizes), best of
   ``--repeats``, and its bytes as WebP and as JPEG.
2. The page: ``--rows`` rows cycling those real strips (random scores and probabilities), its size
   and the time to write it.
3. Headless Chromium (when installed): wall time until the page is loaded and every row drawn
   (``--dump-dom``, rows counted in the dumped DOM) and until a screenshot of the sorted page.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_video import CLIPS
from make_test_videos import _ffmpeg

from qalign_kvq.report.page import Row, render_page
from qalign_kvq.report.thumbnails import encode, make_thumbnail, strip_image
from qalign_kvq.video import probe, read_frames, uniform_indices

#: The portrait and sandwich clips of scripts/bench_video.py: the sizes of KVQ's videos.
KVQ_LIKE = ("portrait_10s_1080x1920_h264", "sandwich_5s_720x1280_h264", "portrait_10s_1080x1920_hevc")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium(args: list[str]) -> tuple[float, str]:
    """Wall seconds of one headless Chromium run (a fresh profile) and its stdout."""
    with tempfile.TemporaryDirectory(prefix="bench_report_profile_") as profile:
        start = time.perf_counter()
        run = subprocess.run([shutil.which("chromium"), *FLAGS, f"--user-data-dir={profile}", *args],
                             capture_output=True, text=True, timeout=600, check=False)
        seconds = time.perf_counter() - start
    if run.returncode != 0:
        raise RuntimeError(f"chromium failed: {run.stderr[-2000:]}")
    return seconds, run.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/qalign_bench"))
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    clips = {name: args.work / f"{name}.mp4" for name in KVQ_LIKE}
    for name, path in clips.items():
        if not path.exists():  # the same clips as scripts/bench_video.py, shared through --work
            _ffmpeg(CLIPS[name], path)

    thumbs = []
    result = {"machine": {"python": platform.python_version(), "cpus": len(os.sched_getaffinity(0)),
                          "load_average": round(os.getloadavg()[0], 1)}, "thumbnails": {}}
    for name, path in clips.items():
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            thumb = make_thumbnail(path, frames=4, height=80, max_width=320)
            times.append(time.perf_counter() - start)
        info = probe(path)
        strip = strip_image(read_frames(path, uniform_indices(info.num_frames, 4)), 80, 320)
        buffer = io.BytesIO()
        strip.save(buffer, format="JPEG", quality=60)
        result["thumbnails"][name] = {"size": f"{info.width}x{info.height}", "s": round(min(times), 3),
                                      "strip_px": f"{thumb.width}x{thumb.height}",
                                      "webp_bytes": len(encode(strip)) * 3 // 4, "jpeg_bytes": buffer.tell()}
        thumbs.append(thumb)

    rng = np.random.default_rng(0)
    rows = []
    for i in range(args.rows):
        probs = rng.dirichlet(np.ones(5)).tolist()
        thumb = thumbs[i % len(thumbs)]
        rows.append(Row(index=i, file=f"test/{i:05d}.mp4", score=float(rng.uniform(1.3, 4.5)),
                        score_1_5=float(rng.uniform(1, 5)), uncertainty=float(rng.uniform(0.2, 1.5)), probs=probs,
                        thumb=thumb.url, thumb_size=(thumb.width, thumb.height)))
    errors = [{"file": f"test/broken{i}.mp4", "error": "not a video container FFmpeg can read"} for i in range(10)]
    with tempfile.TemporaryDirectory(prefix="bench_report_") as tmp:
        page = Path(tmp) / "report.html"
        start = time.perf_counter()
        page.write_text(render_page(rows, errors, ["excellent", "good", "fair", "poor", "bad"], "bench", "bench"))
        result["page"] = {"rows": args.rows, "write_s": round(time.perf_counter() - start, 3),
                          "mb": round(page.stat().st_size / 1e6, 2),
                          "bytes_per_row": page.stat().st_size // args.rows}
        if shutil.which("chromium"):
            seconds, dom = chromium(["--dump-dom", page.as_uri() + "#sort=uncertainty"])
            drawn = len(re.findall(r'<div class="row" data-file=', dom))
            shot = Path(tmp) / "shot.png"
            shot_s, _ = chromium([f"--screenshot={shot}", "--window-size=1280,900", page.as_uri() + "#sort=score"])
            result["chromium"] = {"dump_dom_s": round(seconds, 2), "rows_in_dom": drawn,
                                  "screenshot_s": round(shot_s, 2), "screenshot_bytes": shot.stat().st_size}
        else:
            result["chromium"] = "not installed (make chromium)"
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
