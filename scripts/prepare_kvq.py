"""Turn the released KVQ annotations into the CSVs the recipes read, and check every video.

    python scripts/prepare_kvq.py --kvq-root /data/KVQ --train train_data.csv --val truth.csv \
        --val-pairs-xlsx rank-pair-val.xlsx [--test TEST.csv [--test-pairs-xlsx TEST_PAIRS.xlsx]] --out data/kvq

Writes ``train.csv``, ``val.csv`` (``filename,score``), ``val_pairs_homologous.csv`` and
``val_pairs_nonhomologous.csv`` (``video1,video2,label`` from the xlsx sheets ``source`` and
``nonsource``) and ``test.csv`` into ``--out``. ``--test`` is the challenge's test list (empty
scores: ``test.csv`` holds names only) or the test labels KVQ released in 2025-05 (every row
scored: ``test.csv`` keeps the scores, a truth file for ``qalign_kvq.evaluate``); with
``--test-pairs-xlsx`` the test rank pairs become ``test_pairs_homologous.csv`` and
``test_pairs_nonhomologous.csv``. Filenames stay relative to ``--kvq-root``, so train with
``--video_root /data/KVQ``. Prints the MOS range, the level bin edges and the rows per level. Exit
code 1 when a video is missing or unreadable (all are listed), a test list is only partly scored,
or a pair names a video outside its split. Relative paths of the input files are taken from
``--kvq-root``.
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


def read_split_pairs(xlsx: Path, split: str, table) -> dict[str, list]:
    """``{"homologous": pairs, "nonhomologous": pairs}`` of a rank-pair spreadsheet; every video of
    a pair must be in the split's table (when given)."""
    homologous, nonhomologous = read_pairs_xlsx(xlsx)
    known = set(table["filename"]) if table is not None else None
    for kind, pairs in (("homologous", homologous), ("nonhomologous", nonhomologous)):
        unknown = sorted({v for a, b, _ in pairs for v in (a, b) if known is not None and v not in known})
        if unknown:
            raise AnnotationError(f"{xlsx}: {len(unknown)} {kind} pair videos are not in the {split} CSV, "
                                  f"e.g. {unknown[:3]}")
    return {"homologous": homologous, "nonhomologous": nonhomologous}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kvq-root", required=True, type=Path, help="folder the CSV filenames are relative to")
    parser.add_argument("--train", default="train_data.csv", help="filename,score CSV of the training set")
    parser.add_argument("--val", help="filename,score CSV of the validation set (truth.csv)")
    parser.add_argument("--val-pairs-xlsx", help="rank-pair .xlsx of the validation set")
    parser.add_argument("--test", help="CSV of the test set: names with empty scores, or the released test labels "
                        "(filename,score, every row scored)")
    parser.add_argument("--test-pairs-xlsx", help="rank-pair .xlsx of the test set (released with its labels)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--check", choices=["probe", "exists", "none"], default="probe",
                        help="probe every video (default), only check it exists, or skip")
    args = parser.parse_args(argv)
    root = args.kvq_root

    def from_root(name: str | None) -> Path | None:
        return None if name is None else (Path(name) if Path(name).is_absolute() else root / name)

    try:
        splits = {"train": read_table(from_root(args.train), root)}
        if args.val:
            splits["val"] = read_table(from_root(args.val), root)
        if args.test:
            splits["test"] = read_table(from_root(args.test), root, require_scores=False)
        test_scored = "test" in splits and all(v is not None for v in splits["test"]["score"])
        if "test" in splits and not test_scored and any(v is not None for v in splits["test"]["score"]):
            empty = sum(v is None for v in splits["test"]["score"])
            raise AnnotationError(f"{args.test}: {empty} of {len(splits['test'])} rows have no score; give the test "
                                  f"list with names only or the test labels with every score")
        pairs = {split: read_split_pairs(from_root(xlsx), split, splits.get(split))
                 for split, xlsx in (("val", args.val_pairs_xlsx), ("test", args.test_pairs_xlsx)) if xlsx}
        for name, table in splits.items():
            if args.check != "none":
                check_videos(table, f"{name} ({len(table)} rows)", readable=args.check == "probe")
    except (AnnotationError, EvaluationInputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    args.out.mkdir(parents=True, exist_ok=True)  # nothing is written before every input checked out
    for split, kinds in pairs.items():
        for kind, rows in kinds.items():
            write_csv(args.out / f"{split}_pairs_{kind}.csv", ["video1", "video2", "label"], rows)
    for name, table in splits.items():
        scores = table["score"] if name != "test" or test_scored else [""] * len(table)
        write_csv(args.out / f"{name}.csv", ["filename", "score"], zip(table["filename"], scores))
    scale = LevelScale.from_scores(splits["train"]["score"])
    levels = scale.level_index(splits["train"]["score"])
    print(f"train MOS range {scale.low:.4f}..{scale.high:.4f}; level edges "
          + ", ".join(f"{e:.4f}" for e in scale.edges))
    for index, word in zip(range(5, 0, -1), LEVEL_WORDS):
        print(f"  {word:<10}{int(np.sum(levels == index)):>6} rows")
    if "test" in splits:
        print(f"test: {len(splits['test'])} rows, " + ("with scores (the truth for qalign_kvq.evaluate)" if test_scored
                                                      else "names only"))
    print(f"wrote {', '.join(sorted(p.name for p in args.out.glob('*.csv')))} to {args.out}; "
          f"train with --video_root {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
