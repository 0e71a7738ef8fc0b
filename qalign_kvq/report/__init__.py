"""A browsable report of scored videos: one self-contained HTML page.

    python -m qalign_kvq.report SCORES.jsonl --root DIR --output report.html [--frames 4] [--height 80]

SCORES is what ``python -m qalign_kvq.infer --videos ... --output`` writes: its records JSONL (for a
``.csv`` output, the ``<output>.jsonl`` kept beside it). The page shows, per scored video, a strip of
a few frames (small WebP images embedded in the page, loaded lazily), the score, the level
probabilities as a bar and the uncertainty; the videos that could not be scored are listed apart.
Rows sort by score (worst first, the default), uncertainty (least sure first), file name or input
order, from the buttons or the address: ``report.html#sort=uncertainty`` (``&order=asc|desc``,
``&q=TEXT`` filters by name). ``--root`` is the folder the records' names are relative to (the
``--root`` or the CSV's folder given to infer). A video that cannot be read gets a placeholder.
Exit code: 0 page written, 1 page written but some thumbnails could not be made (listed), 2 usage
error (bad arguments or records; no page written).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from tqdm import tqdm

from qalign_kvq.records import RecordsError, parse_records
from qalign_kvq.report.page import SORT_KEYS, Row, render_page

__all__ = ["RecordsError", "build_report", "load_records", "main"]


def _number(record: dict, key: str, where: str) -> float:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecordsError(f"{where}: {key!r} must be a finite number, got {value!r}")
    return float(value)


def load_records(path: str | os.PathLike) -> tuple[list[Row], list[dict], list[str]]:
    """``(rows, errors, words)`` of a records JSONL: scored videos in file order, error records
    (``{"file", "error"}``) and the level words of the probabilities (best first). A file named
    twice keeps its last record (a rerun's)."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        records = path.with_name(path.name + ".jsonl")
        if not records.is_file():
            raise RecordsError(f"{path}: a filename,score CSV has no probabilities; pass the records JSONL that "
                               f"python -m qalign_kvq.infer keeps beside it ({records.name})")
        path = records
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise RecordsError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise RecordsError(f"{path}: cannot be read ({err})") from None
    by_file: dict[str, Row | dict] = {}
    words: list[str] | None = None
    for where, record in parse_records(lines, path):
        name = record["file"]
        by_file.pop(name, None)  # a later record of the same file replaces it, at its own place
        if "error" in record:
            by_file[name] = {"file": name, "error": str(record["error"])}
            continue
        probs = record.get("probs")
        if not isinstance(probs, dict) or not probs:
            raise RecordsError(f"{where}: {name}: no 'probs' (level word -> probability)")
        if words is None:
            words = list(probs)
        elif list(probs) != words:
            raise RecordsError(f"{where}: {name}: level words {list(probs)} differ from the first record's {words}")
        by_file[name] = Row(index=0, file=name, score=_number(record, "score", where),
                            score_1_5=_number(record, "score_1_5", where),
                            uncertainty=_number(record, "uncertainty", where),
                            probs=[_number(probs, w, where) for w in words])
    if not by_file:
        raise RecordsError(f"{path}: no records")
    rows = [r for r in by_file.values() if isinstance(r, Row)]
    for index, row in enumerate(rows):
        row.index = index
    errors = [r for r in by_file.values() if isinstance(r, dict)]
    return rows, errors, words or []


def build_report(records: str | os.PathLike, output: str | os.PathLike, root: str | os.PathLike = ".",
                 frames: int = 4, height: int = 80, workers: int = 4, default_sort: str = "score",
                 title: str | None = None, progress: bool = False) -> tuple[list[Row], list[dict]]:
    """Write the page of ``records`` to ``output`` (atomically) and return ``(rows, errors)``; rows
    whose thumbnail failed have ``thumb_error`` set."""
    from qalign_kvq.report.thumbnails import make_thumbnails

    rows, errors, words = load_records(records)
    root = Path(root)
    paths = [Path(r.file) if Path(r.file).is_absolute() else root / r.file for r in rows]
    bar = partial(tqdm, total=len(paths), desc="thumbnails", unit="video", file=sys.stderr, disable=not progress)
    width = 4 * height  # the thumbnail column: four portrait frames at full height, landscape ones lower
    for row, thumb in zip(rows, make_thumbnails(paths, frames, height, width, workers, progress=bar)):
        row.thumb, row.thumb_error = thumb.url, thumb.error
        row.thumb_size = (thumb.width, thumb.height) if thumb.url else None
    page = render_page(rows, errors, words, title or f"Scored videos: {Path(records).name}", str(records),
                       default_sort, height, width)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return rows, errors


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qalign_kvq.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("records", help="records JSONL written by python -m qalign_kvq.infer (or its .csv output)")
    parser.add_argument("--output", required=True, help="the HTML page to write")
    parser.add_argument("--root", default=".", help="folder the records' file names are relative to (default: .)")
    parser.add_argument("--frames", type=int, default=4, help="frames per thumbnail strip (default 4)")
    parser.add_argument("--height", type=int, default=80, help="thumbnail height in pixels (default 80)")
    parser.add_argument("--sort", choices=SORT_KEYS, default="score",
                        help="order when the page opens without #sort= (default: score, worst first)")
    parser.add_argument("--title", help="page title (default: from the records file name)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="videos decoded at a time (default: up to 4)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.frames < 1 or not 16 <= args.height <= 1080 or args.workers < 1:
        parser.error("need --frames >= 1, 16 <= --height <= 1080, --workers >= 1")
    if not Path(args.root).is_dir():
        parser.error(f"--root {args.root}: no such folder")
    try:
        rows, errors = build_report(args.records, args.output, args.root, args.frames, args.height, args.workers,
                                    args.sort, args.title, progress=not args.no_progress)
    except RecordsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: cannot write {args.output}: {err}", file=sys.stderr)
        return 2
    failed = [r for r in rows if r.thumb_error]
    print(f"{args.output}: {len(rows)} scored videos ({len(failed)} without thumbnail), {len(errors)} errors",
          file=sys.stderr)
    for row in failed[:20]:
        print(f"  no thumbnail: {row.file}: {row.thumb_error}", file=sys.stderr)
    return 1 if failed else 0
