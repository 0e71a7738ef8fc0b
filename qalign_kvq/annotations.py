"""Annotation tables: KVQ-style CSV (``filename,score[,std]``) and JSONL -> ``datasets.Dataset``.

Video paths are relative to a video root and may not escape it. :func:`check_videos` finds every
row whose file is missing or unreadable *before* training starts and reports them all at once.
:func:`add_levels` assigns the levels (Q-Align's five, or a finer vocabulary) with equal-width bins
(optionally soft labels).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import datasets
import numpy as np

from qalign_kvq.levels import LEVEL_WORDS, LevelScale, balanced_indices, soft_label

#: Column names accepted for the video file and the score in CSV headers and JSONL records.
FILE_KEYS = ("filename", "video", "path", "file")
SCORE_KEYS = ("score", "mos")
STD_KEYS = ("std", "mos_std", "score_std")
#: The column naming each video's source (``python -m qalign_kvq.sources`` writes it).
SOURCE_KEYS = ("source",)


class AnnotationError(ValueError):
    """A problem with an annotation file or its rows; the message names the file and the reason."""


class UnsafePathError(AnnotationError):
    """A video path that points outside the video root."""


class MissingVideosError(AnnotationError):
    """Rows whose video file is missing or unreadable (all of them, listed)."""

    def __init__(self, source: str, problems: list[tuple[str, str]], shown: int = 20):
        self.source = source
        self.problems = problems
        lines = [f"  {name}: {reason}" for name, reason in problems[:shown]]
        if len(problems) > shown:
            lines.append(f"  ... and {len(problems) - shown} more")
        super().__init__(f"{source}: {len(problems)} rows have a missing or unreadable video:\n" + "\n".join(lines))


def resolve_video_path(video_root: str | os.PathLike, filename: str) -> Path:
    """``video_root / filename``, refusing absolute paths and ``..`` that leave the root
    (symbolic links are resolved before the check)."""
    if not filename or not str(filename).strip():
        raise AnnotationError("empty video filename")
    root = Path(video_root).resolve()
    candidate = (root / filename).resolve()
    if candidate != root and root not in candidate.parents:
        raise UnsafePathError(f"{filename}: path escapes the video root {root}")
    return candidate


def _pick(keys: Sequence[str], names: Sequence[str], what: str, source: str, required: bool = True) -> str | None:
    lowered = {name.strip().lower(): name for name in names}
    for key in keys:
        if key in lowered:
            return lowered[key]
    if required:
        raise AnnotationError(f"{source}: no {what} column (expected one of {', '.join(keys)}; found {list(names)})")
    return None


def _number(value, source: str, where: str, what: str, allow_empty: bool = False) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        if allow_empty:
            return None
        raise AnnotationError(f"{source}: {where}: empty {what}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise AnnotationError(f"{source}: {where}: {what} {value!r} is not a number") from None
    if not math.isfinite(number):
        raise AnnotationError(f"{source}: {where}: {what} {value!r} is not finite")
    return number


def _build(rows: list[dict], source: str, video_root: str | os.PathLike, require_scores: bool) -> datasets.Dataset:
    if not rows:
        raise AnnotationError(f"{source}: no rows")
    seen: dict[str, str] = {}
    for row in rows:
        if row["filename"] in seen:
            raise AnnotationError(f"{source}: {row.pop('_where')}: duplicate filename {row['filename']!r}")
        seen[row["filename"]] = row.pop("_where")
        row["path"] = str(resolve_video_path(video_root, row["filename"]))
        if require_scores and row["score"] is None:
            raise AnnotationError(f"{source}: {seen[row['filename']]}: empty score")
    if not any(row["std"] is not None for row in rows):
        for row in rows:
            del row["std"]
    if all(row["source"] is None for row in rows):
        for row in rows:
            del row["source"]
    return datasets.Dataset.from_list(rows)


def _source(value, source: str, where: str, present: bool) -> str | None:
    if not present:
        return None
    text = "" if value is None else str(value).strip()
    if not text:
        raise AnnotationError(f"{source}: {where}: empty source (a source column needs one on every row; "
                              "python -m qalign_kvq.sources fills it)")
    return text


def read_csv_table(path: str | os.PathLike, video_root: str | os.PathLike,
                   require_scores: bool = True) -> datasets.Dataset:
    """A KVQ-style CSV (header ``filename,score`` and optionally ``std`` and ``source``) -> Dataset
    with columns ``filename``, ``score``, [``std``], [``source``], ``path`` (absolute, inside
    ``video_root``)."""
    path = Path(path)
    source = str(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            file_key = _pick(FILE_KEYS, header, "filename", source)
            score_key = _pick(SCORE_KEYS, header, "score", source)
            std_key = _pick(STD_KEYS, header, "std", source, required=False)
            source_key = _pick(SOURCE_KEYS, header, "source", source, required=False)
            rows = []
            for line, record in enumerate(reader, start=2):
                where = f"line {line}"
                name = (record.get(file_key) or "").strip()
                if not name:
                    raise AnnotationError(f"{source}: {where}: empty filename")
                rows.append({
                    "filename": name,
                    "score": _number(record.get(score_key), source, where, "score", allow_empty=True),
                    "std": _number(record.get(std_key), source, where, "std", allow_empty=True) if std_key else None,
                    "source": _source(record.get(source_key), source, where, source_key is not None),
                    "_where": where,
                })
    except FileNotFoundError:
        raise AnnotationError(f"{source}: annotation file not found") from None
    return _build(rows, source, video_root, require_scores)


def read_jsonl_table(path: str | os.PathLike, video_root: str | os.PathLike,
                     require_scores: bool = True) -> datasets.Dataset:
    """JSON lines, one object per video: ``{"filename"|"video": ..., "score"|"mos": ..., "std": ...,
    "source": ...}``."""
    path = Path(path)
    source = str(path)
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise AnnotationError(f"{source}: annotation file not found") from None
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        where = f"line {number}"
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            raise AnnotationError(f"{source}: {where}: invalid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise AnnotationError(f"{source}: {where}: expected a JSON object")
        file_key = _pick(FILE_KEYS, list(record), "filename", f"{source}: {where}")
        score_key = _pick(SCORE_KEYS, list(record), "score", f"{source}: {where}", required=require_scores)
        std_key = _pick(STD_KEYS, list(record), "std", source, required=False)
        source_key = _pick(SOURCE_KEYS, list(record), "source", source, required=False)
        name = str(record[file_key]).strip()
        if not name:
            raise AnnotationError(f"{source}: {where}: empty filename")
        rows.append({
            "filename": name,
            "score": _number(record.get(score_key), source, where, "score", allow_empty=True) if score_key else None,
            "std": _number(record.get(std_key), source, where, "std", allow_empty=True) if std_key else None,
            "source": _source(record.get(source_key), source, where, source_key is not None),
            "_where": where,
        })
    if any(row["source"] is not None for row in rows) and any(row["source"] is None for row in rows):
        missing = next(row["_where"] for row in rows if row["source"] is None)
        raise AnnotationError(f"{source}: {missing}: no source (other records have one)")
    return _build(rows, source, video_root, require_scores)


def read_table(path: str | os.PathLike, video_root: str | os.PathLike, require_scores: bool = True) -> datasets.Dataset:
    """CSV or JSONL by extension (``.jsonl``/``.json`` -> JSONL, anything else -> CSV)."""
    if str(path).lower().endswith((".jsonl", ".json")):
        return read_jsonl_table(path, video_root, require_scores)
    return read_csv_table(path, video_root, require_scores)


NOT_FOUND = "file not found"


def video_problems(table: datasets.Dataset, readable: bool = True, rank: int = 0,
                   world_size: int = 1) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """What one process finds: ``(filename, reason)`` of every row whose file it cannot see, and
    with ``readable`` of the rows of its share (every ``world_size``-th distinct file from ``rank``)
    that cannot be probed as a video; plus the frame count and rate of each file of its share
    (path -> (frames, fps))."""
    from qalign_kvq.video import VideoError, probe

    problems, counts, present = [], {}, set()
    for name, path in zip(table["filename"], table["path"]):
        if Path(path).is_file():
            present.add(path)
        else:
            problems.append((name, NOT_FOUND))
    distinct = dict(zip(table["path"], table["filename"]))  # the shares split the table, not one view of it
    for path, name in list(distinct.items())[rank::world_size] if readable else []:
        if path not in present:
            continue
        try:
            info = probe(path)
        except VideoError as err:
            problems.append((name, getattr(err, "reason", str(err))))
            continue
        if info.num_frames < 1:
            problems.append((name, "no frames"))
        else:
            counts[path] = (info.num_frames, info.fps)
    return problems, counts


def check_videos(table: datasets.Dataset, source: str = "annotations", readable: bool = True,
                 timeout: float = 6 * 3600) -> dict[str, tuple[int, float]]:
    """Raise :class:`MissingVideosError` listing every row whose file is missing (or, with
    ``readable``, cannot be probed as a video); nothing is skipped silently. Returns what the probes
    found (path -> (frame count, fps)). Under torch.distributed every process must call it: each looks for every
    file (its own view of the storage) and probes its share, then all wait up to ``timeout`` seconds
    for each other on a side group and raise the same error, naming the processes that miss a file
    the others see."""
    import socket

    from qalign_kvq.distributed import all_gather, rank_and_size, side_group

    rank, world_size = rank_and_size()
    found = video_problems(table, readable, rank, world_size)
    with side_group(timedelta(seconds=timeout)) as group:
        gathered = all_gather((socket.gethostname(), *found), group)
    seen: dict[str, dict[str, set[int]]] = {}
    counts: dict[str, tuple[int, float]] = {}
    for r, (_, problems, probed) in enumerate(gathered):
        counts.update(probed)
        for name, reason in problems:
            seen.setdefault(name, {}).setdefault(reason, set()).add(r)
    order = {name: i for i, name in enumerate(table["filename"])}
    merged = []
    for name in sorted(seen, key=order.__getitem__):
        for reason, ranks in seen[name].items():
            if reason == NOT_FOUND and len(ranks) < world_size:
                where = ", ".join(f"{r} ({gathered[r][0]})" for r in sorted(ranks))
                reason = f"{NOT_FOUND} by process {where} of {world_size} (the others see it)"
            merged.append((name, reason))
    if merged:
        raise MissingVideosError(source, merged)
    return counts


def add_levels(table: datasets.Dataset, scale: LevelScale, soft_labels: bool = False,
               min_std: float = 0.2, words: Sequence[str] = LEVEL_WORDS) -> datasets.Dataset:
    """Add ``level`` (1 = worst .. N = best, N = ``scale.levels``), ``level_word`` (from ``words``,
    best first), ``level_score`` (MOS on the level-score axis) and, with ``soft_labels``,
    ``soft_label`` (N probabilities ordered like ``words``; the std column, scaled to level units,
    sets the spread)."""
    if len(words) != scale.levels:
        raise AnnotationError(f"{len(words)} level words for a scale of {scale.levels} levels")
    scores = np.asarray(table["score"], dtype=float)
    levels = scale.level_index(scores)
    level_scores = scale.to_level_score(scores)
    table = table.add_column("level", [int(v) for v in levels])
    table = table.add_column("level_word", [words[scale.levels - int(v)] for v in levels])
    table = table.add_column("level_score", [float(v) for v in level_scores])
    if soft_labels:
        stds = table["std"] if "std" in table.column_names else [None] * len(table)
        labels = [
            soft_label(float(x), None if s is None else float(s) / scale.width, min_std=min_std,
                       scores=scale.scores).tolist()
            for x, s in zip(level_scores, stds)
        ]
        table = table.add_column("soft_label", labels)
    return table


def balance(table: datasets.Dataset, seed: int = 0) -> datasets.Dataset:
    """Resample rows (needs the ``level`` column) so that every level present has as many rows
    as the largest one, as BDVQAGroup did offline. Seeded and shuffled."""
    if "level" not in table.column_names:
        raise AnnotationError("balance: the table has no level column (call add_levels first)")
    return table.select(balanced_indices(table["level"], seed=seed).tolist())


@dataclass(frozen=True)
class RankPairs:
    """Validation rank pairs: homologous (same source) and non-homologous, as ``(video1, video2, label)``."""

    homologous: list[tuple[str, str, int]] | None = None
    nonhomologous: list[tuple[str, str, int]] | None = None


def read_rank_pairs(homologous: str | None = None, nonhomologous: str | None = None, xlsx: str | None = None,
                    known: Sequence[str] | None = None) -> RankPairs:
    """Read rank-pair CSVs (``video1,video2,label``) or the released xlsx (sheets ``source`` and
    ``nonsource``). With ``known`` (the filenames of the table), pairs naming other videos are refused."""
    from qalign_kvq.evaluate import read_pairs, read_pairs_xlsx

    if xlsx:
        homo, non = read_pairs_xlsx(xlsx)
    else:
        homo = read_pairs(homologous) if homologous else None
        non = read_pairs(nonhomologous) if nonhomologous else None
    if known is not None:
        names = set(known)
        for source, pairs in ((homologous or xlsx, homo), (nonhomologous or xlsx, non)):
            unknown = sorted({v for a, b, _ in pairs or [] for v in (a, b) if v not in names})
            if unknown:
                raise AnnotationError(f"{source}: {len(unknown)} videos are not in the table, e.g. {unknown[:3]}")
    return RankPairs(homo, non)
