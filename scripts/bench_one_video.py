"""One video, end to end: qalign-kvq's ``Scorer.score`` (what ``python -m qalign_kvq.infer --video``
runs per video) against what a plain-transformers user writes (scripts/plain_transformers_scoring.py),
in the same process, alternating, on the same clip and model.

    python scripts/bench_one_video.py [--repeats 7] [--threads 2] [--frame-tokens 64] [--family qwen2_5_vl]

Makes the 10 s 1080x1920 H.264 clip of scripts/bench_scoring.py and the demo's tiny model
(scripts/make_tiny_models.py, ``--frame-tokens`` 64 as scripts/demo.py) in a temp folder (or takes
``--video`` / ``--model``). Checks that both read the same 12 frames (decord's pixels equal ours)
and give the same score (|difference| <= 1e-5, else exit code 1), then times one warm-up and
``--repeats`` rounds of each, the order alternating. Prints the seconds per video of every round,
the medians and the best rounds, the ratios plain / ours, qalign-kvq's split (decode / views /
processor / model, medians) and the load average before and after (on a shared machine the best
rounds are the least disturbed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scoring import make_clip  # noqa: E402
from plain_transformers_scoring import PlainScorer  # noqa: E402

from qalign_kvq.checkpoint import CheckpointMeta  # noqa: E402
from qalign_kvq.scorer import Scorer  # noqa: E402
from qalign_kvq.video import probe, read_frames, uniform_indices  # noqa: E402

SCORE_TOLERANCE = 1e-5


def make_model(family: str, frame_tokens: int, out: Path) -> Path:
    from make_tiny_models import build_tiny_model

    path = build_tiny_model(family, out, frame_tokens=frame_tokens)
    CheckpointMeta(family=family).save(path)
    return path


def same_frames(video: Path, indices: list[int]) -> bool:
    import decord

    plain = decord.VideoReader(str(video), ctx=decord.cpu(0)).get_batch(indices).asnumpy()
    return bool(np.array_equal(plain, read_frames(video, indices)))


def run(video: Path, model: Path, repeats: int) -> dict:
    ours, plain = Scorer.from_pretrained(model, device="cpu"), PlainScorer(str(model))
    indices = uniform_indices(probe(video).num_frames, ours.options.frames)
    first_plain, first_ours = plain.score(str(video)), ours.score(video)  # warm-up, also the check
    diff = abs(first_plain["score_1_5"] - first_ours.score_1_5)
    seconds: dict[str, list[float]] = {"plain": [], "ours": []}
    split: dict[str, list[float]] = {}
    for r in range(repeats):
        for name in ("plain", "ours") if r % 2 == 0 else ("ours", "plain"):
            t0 = time.perf_counter()
            result = plain.score(str(video)) if name == "plain" else ours.score(video)
            seconds[name].append(time.perf_counter() - t0)
            if name == "ours":
                for key, value in result.timing.items():
                    split.setdefault(key, []).append(value)
    med = {k: statistics.median(v) for k, v in seconds.items()}
    best = {k: min(v) for k, v in seconds.items()}
    return {
        "same_frame_indices": first_plain["frames"] == indices, "same_frame_pixels": same_frames(video, indices),
        "score_1_5": {"plain": first_plain["score_1_5"], "ours": first_ours.score_1_5, "abs_diff": diff},
        "seconds": {k: [round(x, 3) for x in v] for k, v in seconds.items()},
        "median_s": {k: round(v, 3) for k, v in med.items()},
        "plain_over_ours": round(med["plain"] / med["ours"], 3),
        "best_s": {k: round(v, 3) for k, v in best.items()},
        "plain_over_ours_best": round(best["plain"] / best["ours"], 3),
        "pair_ratios": [round(p / o, 3) for p, o in zip(seconds["plain"], seconds["ours"])],
        "ours_split_median_s": {k: round(statistics.median(v), 3) for k, v in split.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="qwen2_5_vl")
    parser.add_argument("--frame-tokens", type=int, default=64, help="tiny model's tokens a frame (demo: 64)")
    parser.add_argument("--model", type=Path, help="a checkpoint dir instead of the tiny model")
    parser.add_argument("--video", type=Path, help="a video instead of the 10 s 1080x1920 clip")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        video = args.video or make_clip(Path(tmp) / "portrait_1080x1920_10s.mp4")
        model = args.model or make_model(args.family, args.frame_tokens, Path(tmp) / "models")
        info = probe(video)
        report = run(video, model, args.repeats)
    report = {
        "clip": f"{info.width}x{info.height}, {info.duration:.1f} s, {info.num_frames} frames, {info.codec}",
        "model": str(args.model) if args.model else f"tiny {args.family}, {args.frame_tokens} tokens a frame",
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "repeats": args.repeats,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()], **report,
    }
    print(json.dumps(report, indent=2))
    ok = report["same_frame_indices"] and report["same_frame_pixels"] and \
        report["score_1_5"]["abs_diff"] <= SCORE_TOLERANCE
    m, b = report["median_s"], report["best_s"]
    print(f"one video: plain transformers {m['plain']:.2f} s, qalign-kvq {m['ours']:.2f} s (medians) -> "
          f"{report['plain_over_ours']}x; best of {args.repeats}: {b['plain']:.2f} s vs {b['ours']:.2f} s -> "
          f"{report['plain_over_ours_best']}x (target >= 1.25); scores {'agree' if ok else 'DISAGREE'} "
          f"(|diff| {report['score_1_5']['abs_diff']:.1e}), same frames: {report['same_frame_pixels']}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
