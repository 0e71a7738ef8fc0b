"""What a batch scores: the ``(name, path)`` of every video named by folders, CSVs and files."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

VIDEO_EXTENSIONS = {".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".flv", ".3gp", ".ts", ".mpg", ".mpeg", ".h264"}


class UsageError(Exception):
    """Bad command-line input (exit code 2 of ``infer``)."""


def read_csv_names(path: Path) -> list[str]:
    """The ``filename`` column (else the first column) of a CSV with a header."""
    with open(path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header:
            raise UsageError(f"{path}: empty CSV")
        col = header.index("filename") if "filename" in header else 0
        return [row[col].strip() for row in reader if row and row[col].strip()]


def collect_inputs(items: Sequence[str], root: str | None = None) -> list[tuple[str, Path]]:
    """``(name, path)`` of every video to score, in order, without duplicate names. A folder gives
    its video files (recursively, names relative to it), a CSV its ``filename`` column (relative to
    the CSV's folder), anything else is a file; ``root`` replaces those bases."""
    out: dict[str, Path] = {}
    for item in items:
        path = Path(item)
        if path.is_dir():
            base = Path(root) if root else path
            for file in sorted(p for p in path.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file()):
                out.setdefault(file.relative_to(base).as_posix() if file.is_relative_to(base) else str(file), file)
        elif path.suffix.lower() == ".csv":
            if not path.is_file():
                raise UsageError(f"{path}: no such CSV file")
            base = Path(root) if root else path.parent
            for name in read_csv_names(path):
                out.setdefault(name, base / name)
        else:
            out.setdefault(item, Path(root) / item if root else path)
    return list(out.items())
