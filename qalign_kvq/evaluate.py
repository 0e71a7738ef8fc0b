"""The challenge metrics, computed exactly as the NTIRE 2024 S-UGC VQA scoring script does.

SROCC (Spearman) and PLCC (plain Pearson on the raw predictions, no logistic fit); Rank1 and Rank2
are pair accuracies on homologous and non-homologous pairs, where the predicted label is 1 when
``score(video1) >= score(video2)`` (a tie counts as 1), else 2.
``Final = 0.45 SROCC + 0.45 PLCC + 0.05 Rank1 + 0.05 Rank2``.

CLI: ``python -m qalign_kvq.evaluate --pred prediction.csv --truth truth.csv
[--pairs-homologous F --pairs-nonhomologous F | --pairs-xlsx rank-pair.xlsx] [--json PATH]
[--plot scatter.png [--mos-range LOW HIGH]]``. Exit code 0 done, 2 bad input or an unwritable output.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy import stats

WEIGHTS = {"SROCC": 0.45, "PLCC": 0.45, "Rank1": 0.05, "Rank2": 0.05}
METRIC_NAMES = tuple(WEIGHTS) + ("Final",)
Pair = tuple[str, str, int]


class EvaluationInputError(ValueError):
    """Bad evaluation input: the message names the file and the problem."""


def final_score(srocc: float, plcc: float, rank1: float, rank2: float) -> float:
    """The challenge's weighted sum."""
    return WEIGHTS["SROCC"] * srocc + WEIGHTS["PLCC"] * plcc + WEIGHTS["Rank1"] * rank1 + WEIGHTS["Rank2"] * rank2


def pair_accuracy(pred: Mapping[str, float], pairs: Sequence[Pair], source: str = "pairs") -> float:
    """Share of pairs whose label (1: video1 better, 2: video2 better) the scores reproduce."""
    if not pairs:
        raise EvaluationInputError(f"{source}: no pairs")
    missing = sorted({v for a, b, _ in pairs for v in (a, b) if v not in pred})
    if missing:
        raise EvaluationInputError(f"{source}: {len(missing)} videos have no prediction, e.g. {missing[:3]}")
    hits = sum((1 if pred[a] >= pred[b] else 2) == label for a, b, label in pairs)
    return hits / len(pairs)


def compute_metrics(
    pred: Mapping[str, float],
    truth: Mapping[str, float],
    homologous_pairs: Sequence[Pair] | None = None,
    nonhomologous_pairs: Sequence[Pair] | None = None,
) -> dict[str, float | None]:
    """SROCC, PLCC, Rank1, Rank2 and Final. Without pairs, the rank metrics and Final are None.
    Predictions and truth must cover exactly the same files; NaN scores are refused."""
    if not truth:
        raise EvaluationInputError("truth: no scores")
    missing = sorted(set(truth) - set(pred))
    extra = sorted(set(pred) - set(truth))
    if missing or extra:
        raise EvaluationInputError(
            f"predictions and truth cover different files: {len(missing)} without prediction "
            f"(e.g. {missing[:3]}), {len(extra)} not in truth (e.g. {extra[:3]})"
        )
    names = sorted(truth)
    y_pred = np.array([pred[n] for n in names], dtype=float)
    y_true = np.array([truth[n] for n in names], dtype=float)
    for label, values in (("predictions", y_pred), ("truth", y_true)):
        bad = [names[i] for i in np.flatnonzero(~np.isfinite(values))]
        if bad:
            raise EvaluationInputError(f"{label}: {len(bad)} non-finite scores, e.g. {bad[:3]}")
    if len(names) < 2:
        raise EvaluationInputError("need at least two videos to compute correlations")
    metrics: dict[str, float | None] = {
        "SROCC": float(stats.spearmanr(y_pred, y_true)[0]),
        "PLCC": float(stats.pearsonr(y_pred, y_true)[0]),
        "Rank1": pair_accuracy(pred, homologous_pairs, "homologous pairs") if homologous_pairs else None,
        "Rank2": pair_accuracy(pred, nonhomologous_pairs, "non-homologous pairs") if nonhomologous_pairs else None,
    }
    parts = [metrics[k] for k in WEIGHTS]
    metrics["Final"] = final_score(*parts) if all(p is not None for p in parts) else None
    return metrics


# ----- files ---------------------------------------------------------------------------------
def read_scores(path: str | Path) -> dict[str, float]:
    """Read a ``filename,score`` CSV (the challenge's format). Empty scores, NaN, duplicates and
    empty files are errors that name the file and the row."""
    path = Path(path)
    rows = _read_csv(path, ("filename", "score"))
    scores: dict[str, float] = {}
    for line_no, row in rows:
        name, raw = row["filename"].strip(), (row["score"] or "").strip()
        if not name:
            raise EvaluationInputError(f"{path}:{line_no}: empty filename")
        if name in scores:
            raise EvaluationInputError(f"{path}:{line_no}: duplicate filename {name!r}")
        try:
            value = float(raw)
        except ValueError:
            raise EvaluationInputError(f"{path}:{line_no}: score {raw!r} of {name!r} is not a number") from None
        if not math.isfinite(value):
            raise EvaluationInputError(f"{path}:{line_no}: score of {name!r} is {raw}")
        scores[name] = value
    return scores


def read_pairs(path: str | Path) -> list[Pair]:
    """Read a ``video1,video2,label`` CSV (label 1: video1 better, 2: video2 better)."""
    path = Path(path)
    return [_pair(path, line_no, row["video1"], row["video2"], row["label"])
            for line_no, row in _read_csv(path, ("video1", "video2", "label"))]


def read_pairs_xlsx(path: str | Path) -> tuple[list[Pair], list[Pair]]:
    """Read the released ``rank-pair-*.xlsx``: sheet ``source`` (homologous pairs) and sheet
    ``nonsource`` (non-homologous), each with rows ``video1, video2, label``."""
    from openpyxl import load_workbook

    path = Path(path)
    if not path.is_file():
        raise EvaluationInputError(f"{path}: no such file")
    try:
        book = load_workbook(path, read_only=True, data_only=True)
    except Exception as err:  # openpyxl raises several unrelated types for non-xlsx input
        raise EvaluationInputError(f"{path}: not a readable .xlsx file ({err})") from err
    sheets = []
    for sheet_name in ("source", "nonsource"):
        if sheet_name not in book.sheetnames:
            raise EvaluationInputError(f"{path}: no sheet {sheet_name!r} (sheets: {book.sheetnames})")
        pairs = []
        for row_no, row in enumerate(book[sheet_name].iter_rows(values_only=True), start=1):
            cells = [c for c in row[:3]]
            if all(c is None for c in cells):
                continue
            if row_no == 1 and str(cells[2]).strip().lower() == "label":
                continue
            pairs.append(_pair(path, f"{sheet_name}!{row_no}", *cells))
        if not pairs:
            raise EvaluationInputError(f"{path}: sheet {sheet_name!r} has no pairs")
        sheets.append(pairs)
    return sheets[0], sheets[1]


def _pair(path: Path, where, video1, video2, label) -> Pair:
    try:
        label_int = int(float(label))
    except (TypeError, ValueError):
        label_int = 0
    if label_int not in (1, 2) or not video1 or not video2:
        raise EvaluationInputError(f"{path}:{where}: bad pair ({video1!r}, {video2!r}, label {label!r}); label must be 1 or 2")
    return str(video1).strip(), str(video2).strip(), label_int


def _read_csv(path: Path, columns: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    if not path.is_file():
        raise EvaluationInputError(f"{path}: no such file")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        header = [c.strip() for c in (reader.fieldnames or [])]
        if not header:
            raise EvaluationInputError(f"{path}: empty file")
        reader.fieldnames = header
        if any(c not in header for c in columns):
            raise EvaluationInputError(f"{path}: header {header} lacks columns {list(columns)}")
        rows = [(line_no, row) for line_no, row in enumerate(reader, start=2)]
    if not rows:
        raise EvaluationInputError(f"{path}: no rows")
    return rows


# ----- CLI -----------------------------------------------------------------------------------
def format_table(metrics: Mapping[str, float | None]) -> str:
    lines = [f"{'metric':<8}{'value':>10}"]
    for name in METRIC_NAMES:
        value = metrics.get(name)
        lines.append(f"{name:<8}{'n/a' if value is None else f'{value:.4f}':>10}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qalign_kvq.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pred", help="prediction CSV (filename,score)")
    parser.add_argument("--truth", help="ground-truth CSV (filename,score)")
    parser.add_argument("--pairs-homologous", help="CSV video1,video2,label of homologous pairs (Rank1)")
    parser.add_argument("--pairs-nonhomologous", help="CSV video1,video2,label of non-homologous pairs (Rank2)")
    parser.add_argument("--pairs-xlsx", help="rank-pair .xlsx with sheets 'source' and 'nonsource'")
    parser.add_argument("--json", help="also write the metrics as JSON to this path")
    parser.add_argument("--plot", metavar="PNG", help="also draw predicted score against MOS and the predictions "
                        "per true level into this PNG (metrics in the title)")
    parser.add_argument("--mos-range", nargs=2, type=float, metavar=("LOW", "HIGH"),
                        help="MOS range whose five equal bins are the levels of --plot (default: the truth's range; "
                             "give the training set's to see the bins the model was trained on)")
    parser.add_argument("--final", nargs=4, type=float, metavar=("SROCC", "PLCC", "RANK1", "RANK2"),
                        help="only compute Final from the four metric values")
    args = parser.parse_args(argv)
    if args.plot and args.final:
        parser.error("--plot draws predictions: give --pred and --truth, not --final")
    scale = None
    if args.mos_range:
        from qalign_kvq.levels import LevelScale

        try:
            scale = LevelScale(*args.mos_range)
        except ValueError as err:
            parser.error(f"--mos-range: {err}")
    try:
        if args.final:
            metrics = dict(zip(WEIGHTS, args.final))
            metrics["Final"] = final_score(*args.final)
        else:
            if not args.pred or not args.truth:
                parser.error("--pred and --truth are required (or --final)")
            if args.pairs_xlsx and (args.pairs_homologous or args.pairs_nonhomologous):
                parser.error("give --pairs-xlsx or the pair CSVs, not both")
            homologous = nonhomologous = None
            if args.pairs_xlsx:
                homologous, nonhomologous = read_pairs_xlsx(args.pairs_xlsx)
            if args.pairs_homologous:
                homologous = read_pairs(args.pairs_homologous)
            if args.pairs_nonhomologous:
                nonhomologous = read_pairs(args.pairs_nonhomologous)
            pred, truth = read_scores(args.pred), read_scores(args.truth)
            metrics = compute_metrics(pred, truth, homologous, nonhomologous)
    except EvaluationInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(metrics))
    try:
        if args.json:
            from qalign_kvq.checkpoint import write_json_atomic

            write_json_atomic(args.json, metrics)
        if args.plot:
            from qalign_kvq.plots import save_scatter

            save_scatter(args.plot, pred, truth, metrics, scale)
            print(f"scatter plot: {args.plot}")
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
