"""Turn the released KVQ annotations into the CSVs the recipes read, and check every video.

    python scripts/prepare_kvq.py --kvq-root /data/KVQ --train train_data.csv --val truth.csv \
        --val-pairs-xlsx rank-pair-val.xlsx [--test test_data.csv] --out data/kvq

Writes ``train.csv``, ``val.csv`` (``filename,score``), ``val_pairs_homologous.csv`` and
``val_pairs_nonhomologous.csv`` (``video1,video2,label`` from the xlsx sheets ``source`` and
``nonsource``) and ``test.csv`` (names only) into ``--out``; filenames stay relative to
``--kvq-root``, so train with ``--video_root /data/KVQ``. Prints the MOS range, the level bin edges
and the rows per level. Exit code 1 when a video is missing or unreadable (all are listed).
Relative ``--train/--val/--test/--val-pairs-xlsx`` paths are taken from ``--kvq-root``.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from qalign_kvq.annotations import AnnotationError, check_videos, read_table
from qalign_kvq.evaluate import EvaluationInputError, read_pairs_xlsx
from qalign_kvq.levels import LEVEL_WORDS, LevelScale


def write_csv(path: Path, header: list[str], rows) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kvq-root", required=True, type=Path, help="folder the CSV filenames are relative to")
    parser.add_argument("--train", default="train_data.csv", help="filename,score CSV of the training set")
    parser.add_argument("--val", help="filename,score CSV of the validation set (truth.csv)")
    parser.add_argument("--val-pairs-xlsx", help="rank-pair .xlsx of the validation set")
    parser.add_argument("--test", help="CSV of the test set (scores may be empty)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--check", choices=["probe", "exists", "none"], default="probe",
                        help="probe every video (default), only check it exists, or skip")
    args = parser.parse_args(argv)
    root = args.kvq_root

    def from_root(name: str | None) -> Path | None:
        return None if name is None else (Path(name) if Path(name).is_absolute() else root / name)

    args.out.mkdir(parents=True, exist_ok=True)
    try:
        splits = {"train": read_table(from_root(args.train), root)}
        if args.val:
            splits["val"] = read_table(from_root(args.val), root)
        if args.test:
            splits["test"] = read_table(from_root(args.test), root, require_scores=False)
        for name, table in splits.items():
            if args.check != "none":
                check_videos(table, f"{name} ({len(table)} rows)", readable=args.check == "probe")
        if args.val_pairs_xlsx:
            homologous, nonhomologous = read_pairs_xlsx(from_root(args.val_pairs_xlsx))
            known = set(splits["val"]["filename"]) if "val" in splits else None
            for kind, pairs in (("homologous", homologous), ("nonhomologous", nonhomologous)):
                unknown = sorted({v for a, b, _ in pairs for v in (a, b) if known is not None and v not in known})
                if unknown:
                    raise AnnotationError(f"{args.val_pairs_xlsx}: {len(unknown)} {kind} pair videos are not in "
                                          f"the validation CSV, e.g. {unknown[:3]}")
                write_csv(args.out / f"val_pairs_{kind}.csv", ["video1", "video2", "label"], pairs)
    except (AnnotationError, EvaluationInputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    for name, table in splits.items():
        scores = table["score"] if name != "test" else [""] * len(table)
        write_csv(args.out / f"{name}.csv", ["filename", "score"], zip(table["filename"], scores))
    scale = LevelScale.from_scores(splits["train"]["score"])
    levels = scale.level_index(splits["train"]["score"])
    print(f"train MOS range {scale.low:.4f}..{scale.high:.4f}; level edges "
          + ", ".join(f"{e:.4f}" for e in scale.edges))
    for index, word in zip(range(5, 0, -1), LEVEL_WORDS):
        print(f"  {word:<10}{int(np.sum(levels == index)):>6} rows")
    print(f"wrote {', '.join(sorted(p.name for p in args.out.glob('*.csv')))} to {args.out}; "
          f"train with --video_root {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
