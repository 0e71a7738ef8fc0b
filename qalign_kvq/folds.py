"""Source-disjoint k-fold splits of an annotation table (every version of a source in one fold), the
rank pairs of each held-out fold, and the fold tables written as CSVs for ``recipes/kfold.py``."""

from __future__ import annotations

import csv
import itertools
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAX_PAIRS = 2000


def source_folds(sources: Sequence[str], k: int, seed: int = 0) -> list[int]:
    """Fold index (0..k-1) of each row: sources in a seeded random order, largest first, each to the
    fold with the fewest rows so far (ties: the lowest index), so folds are source-disjoint and
    about equal in rows."""
    counts = Counter(sources)
    if k < 2:
        raise ValueError(f"need at least 2 folds, got {k}")
    if len(counts) < k:
        raise ValueError(f"{len(counts)} sources cannot make {k} source-disjoint folds")
    rng = np.random.default_rng(seed)
    names = list(counts)
    order = [names[i] for i in rng.permutation(len(names))]
    order.sort(key=lambda name: -counts[name])  # stable: equal sizes keep the random order
    rows, fold_of = [0] * k, {}
    for name in order:
        fold = min(range(k), key=lambda f: (rows[f], f))
        fold_of[name] = fold
        rows[fold] += counts[name]
    return [fold_of[s] for s in sources]


def rank_pairs(names: Sequence[str], scores: Sequence[float], sources: Sequence[str], homologous: bool,
               seed: int = 0, max_pairs: int = MAX_PAIRS) -> list[tuple[str, str, int]]:
    """``(video1, video2, label)`` pairs of rows from one source (homologous) or two (not), label 1
    when video1 scores higher, 2 otherwise; ties left out; at most ``max_pairs`` (a seeded sample)."""
    rng = np.random.default_rng(seed)
    pairs = []
    for a, b in itertools.combinations(range(len(names)), 2):
        if (sources[a] == sources[b]) != homologous or scores[a] == scores[b]:
            continue
        if rng.random() < 0.5:
            a, b = b, a
        pairs.append((names[a], names[b], 1 if scores[a] > scores[b] else 2))
    if len(pairs) > max_pairs:
        pairs = [pairs[i] for i in np.sort(rng.choice(len(pairs), size=max_pairs, replace=False))]
    return pairs


@dataclass(frozen=True)
class Fold:
    """The files of one fold: training rows (the other folds), held-out rows and their pairs (None
    when the held-out rows make no pair of that kind)."""

    index: int
    train_csv: Path
    val_csv: Path
    homologous_pairs: Path | None
    nonhomologous_pairs: Path | None
    train_rows: int
    val_rows: int
    val_sources: tuple[str, ...]


def _write(path: Path, header: Sequence[str], rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


def write_folds(tables: Sequence, root: str | os.PathLike, out_dir: str | os.PathLike, k: int,
                seed: int = 0) -> list[Fold]:
    """Pool ``tables`` (annotation ``datasets.Dataset``\\ s with ``path``, ``score`` and ``source``),
    split them into ``k`` source-disjoint folds and write ``out_dir/fold_<i>/{train,val}.csv``
    (``filename,score[,std],source``, names relative to ``root``) and the held-out fold's
    ``val_pairs_{homologous,nonhomologous}.csv``."""
    root, out_dir = Path(root), Path(out_dir)
    rows = [row for table in tables for row in table.to_list()]
    if any("source" not in row for row in rows):
        raise ValueError("k-fold splits need a source column in every table (python -m qalign_kvq.sources)")
    names = [Path(row["path"]).relative_to(root).as_posix() for row in rows]
    if len(set(names)) != len(names):
        raise ValueError("the pooled tables name some videos twice")
    has_std = all(row.get("std") is not None for row in rows)
    header = ["filename", "score", *(["std"] if has_std else []), "source"]
    records = [[name, row["score"], *([row["std"]] if has_std else []), row["source"]] for name, row in zip(names, rows)]
    sources = [row["source"] for row in rows]
    fold_of = source_folds(sources, k, seed)
    folds = []
    for i in range(k):
        folder = out_dir / f"fold_{i}"
        held = [n for n, f in enumerate(fold_of) if f == i]
        pair_files = []
        for homologous, tag in ((True, "homologous"), (False, "nonhomologous")):
            pairs = rank_pairs([names[n] for n in held], [rows[n]["score"] for n in held],
                               [sources[n] for n in held], homologous, seed=seed + i)
            pair_files.append(_write(folder / f"val_pairs_{tag}.csv", ["video1", "video2", "label"], pairs)
                              if pairs else None)
        folds.append(Fold(
            i, _write(folder / "train.csv", header, [r for r, f in zip(records, fold_of) if f != i]),
            _write(folder / "val.csv", header, [records[n] for n in held]), *pair_files,
            train_rows=len(rows) - len(held), val_rows=len(held),
            val_sources=tuple(sorted({sources[n] for n in held}))))
    return folds
