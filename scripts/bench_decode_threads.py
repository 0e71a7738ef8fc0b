"""Decoding throughput when many readers share the CPU (ranks x DataLoader workers), by FFmpeg thread count.

    python scripts/bench_decode_threads.py [--work /tmp/qalign_bench] [--readers 1 2 4 8] [--reads 12]

Each reader is one process (as a DataLoader worker is) reading 8 evenly spaced frames of
bench_video.py's 5 s 720x1280 H.264 clip ``--reads`` times with ``qalign_kvq.video.read_frames``.
Variants: ``threads=0`` (FFmpeg's own count, one per core: what every reader did before) and
``threads=1`` (``decode_threads()`` in a DataLoader worker, where torch runs one thread). Printed:
the readers' total frames per second (wall clock from the first start to the last end) and CPU
seconds per read, best of ``--repeats`` rounds; the variants take turns in each round.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from pathlib import Path

FRAMES = 8


def _reader(args: tuple[str, int, int, object]) -> float:
    path, threads, reads, start = args
    from qalign_kvq.video import probe, read_frames, uniform_indices

    indices = uniform_indices(probe(path).num_frames, FRAMES)
    start.wait()
    cpu = time.process_time()
    for _ in range(reads):
        read_frames(path, indices, threads=threads)
    return time.process_time() - cpu  # the decoder's threads count: process CPU time, all threads


def run(path: Path, readers: int, threads: int, reads: int) -> dict:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(readers) as pool:
        start = manager.Barrier(readers + 1)
        pending = pool.map_async(_reader, [(str(path), threads, reads, start)] * readers)
        start.wait()
        began = time.perf_counter()
        cpu = pending.get()
        wall = time.perf_counter() - began
    return {"frames_per_s": readers * reads * FRAMES / wall, "cpu_s_per_read": sum(cpu) / (readers * reads)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/qalign_bench")
    parser.add_argument("--readers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--reads", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from bench_training_input import make_clip  # a sibling script: scripts/ is sys.path[0]

    path = make_clip(Path(args.work))
    print(json.dumps({"cores": len(os.sched_getaffinity(0)), "clip": path.name, "frames_per_read": FRAMES}))
    for readers in args.readers:
        best: dict[int, dict] = {}
        for _ in range(args.repeats):
            for threads in (0, 1):
                result = run(path, readers, threads, args.reads)
                if threads not in best or result["frames_per_s"] > best[threads]["frames_per_s"]:
                    best[threads] = result
        for threads, result in best.items():
            print(json.dumps({"readers": readers, "threads": threads or "ffmpeg (one per core)",
                              "frames_per_s": round(result["frames_per_s"], 1),
                              "cpu_s_per_read": round(result["cpu_s_per_read"], 3)}))


if __name__ == "__main__":
    main()
