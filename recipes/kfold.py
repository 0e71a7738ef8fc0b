"""Train k models on source-disjoint folds and write the command that scores with their ensemble.

    python recipes/kfold.py --folds 5 [--include_val] -- accelerate launch recipes/finetune.py RECIPE.yaml [--key value ...]

Everything after ``--`` is the training command of one model, as you would run it; it is run once
per fold with the fold's tables appended (``--train_csv``, ``--val_csv``, their rank pairs,
``--output_dir``, ``--mos_low``/``--mos_high``), so the flags given there hold for every fold. The
recipe's training table (with ``--include_val`` also its validation table) must have a ``source``
column (``python -m qalign_kvq.sources``): its sources are spread over k folds, every version of a
source in one fold (SJTU MMLab's winning KVQ entry ensembled models trained on such splits). Fold
``i`` trains on the other folds and validates on fold ``i`` (SROCC, PLCC, and Rank1/Rank2 on the
fold's own homologous and non-homologous pairs). Every fold uses the pooled table's MOS range, so
their levels agree.

Into ``--output_dir`` (default: the recipe's ``output_dir``) go ``folds/fold_<i>/`` (the tables),
``fold_<i>/`` (the models), ``kfold.json`` (folds, sizes, held-out sources, each model's metrics)
and ``infer.sh``: the ``python -m qalign_kvq.infer`` command that averages the k models. A fold
whose model is already there is not trained again (rerun after a failure); a failed fold does not
stop the others. Exit code 0: every fold trained; 1: some failed; 2: usage or table error.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from qalign_kvq.annotations import AnnotationError, read_table
from qalign_kvq.checkpoint import META_FILE, CheckpointMeta, write_json_atomic
from qalign_kvq.folds import write_folds
from qalign_kvq.training.arguments import parse_args


def split_command(argv: list[str]) -> tuple[list[str], list[str], list[str]]:
    """``(kfold options, training command, recipe arguments)`` from ``OPTIONS -- COMMAND``; the recipe
    arguments are what follows ``finetune.py`` in the command."""
    if "--" not in argv:
        raise ValueError("give the training command after --, e.g. -- accelerate launch recipes/finetune.py R.yaml")
    cut = argv.index("--")
    command = argv[cut + 1:]
    script = next((i for i, item in enumerate(command) if item.endswith("finetune.py")), None)
    if script is None:
        raise ValueError(f"the training command must run recipes/finetune.py: {shlex.join(command)}")
    return argv[:cut], command, command[script + 1:]


def infer_command(models: list[Path], videos: str | None) -> str:
    return shlex.join(["python", "-m", "qalign_kvq.infer", "--model", *map(str, models), "--videos",
                       videos or "VIDEOS", "--output", "predictions.csv"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python recipes/kfold.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--folds", type=int, default=5, help="number of folds k (default 5)")
    parser.add_argument("--include_val", action="store_true", help="pool the recipe's validation table into the folds")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    parser.add_argument("--output_dir", help="where folds, models and infer.sh go (default: the recipe's output_dir)")
    parser.add_argument("--videos", help="what infer.sh scores (a CSV, folder or files; default: a VIDEOS placeholder)")
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        own, command, recipe = split_command(argv)
    except ValueError as err:
        parser.error(str(err))
    args = parser.parse_args(own)
    try:
        _, data, _, training = parse_args(recipe)
        tables = [read_table(data.train_csv, data.video_root)]
        roots = [Path(data.video_root).resolve()]
        if args.include_val:
            if not data.val_csv:
                raise ValueError("--include_val: the recipe has no val_csv")
            tables.append(read_table(data.val_csv, data.val_video_root or data.video_root))
            roots.append(Path(data.val_video_root or data.video_root).resolve())
        for table, name in zip(tables, (data.train_csv, data.val_csv)):
            if "source" not in table.column_names:
                raise ValueError(f"{name} has no source column: write one with python -m qalign_kvq.sources "
                                 f"--annotations {name} --root DIR --output <table with sources>")
        root = Path(os.path.commonpath(roots))
        out = Path(args.output_dir or training["output_dir"])
        folds = write_folds(tables, root, out / "folds", args.folds, args.seed)
    except (ValueError, AnnotationError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    scores = [s for table in tables for s in table["score"]]
    low, high = (data.mos_low, data.mos_high) if data.mos_low is not None else (min(scores), max(scores))

    summary = []
    for fold in folds:
        model_dir = out / f"fold_{fold.index}"
        status = "trained before"
        if not (model_dir / META_FILE).is_file():
            cmd = [*command, "--train_csv", str(fold.train_csv), "--video_root", str(root),
                   "--val_csv", str(fold.val_csv), "--val_video_root", str(root),
                   "--val_pairs_homologous", str(fold.homologous_pairs or ""),
                   "--val_pairs_nonhomologous", str(fold.nonhomologous_pairs or ""), "--val_pairs_xlsx", "",
                   "--output_dir", str(model_dir), "--mos_low", repr(float(low)), "--mos_high", repr(float(high))]
            print(f"fold {fold.index + 1}/{len(folds)}: {shlex.join(cmd)}", flush=True)
            code = subprocess.run(cmd, check=False).returncode
            status = "trained" if code == 0 and (model_dir / META_FILE).is_file() else f"failed (exit code {code})"
        metrics = CheckpointMeta.load(model_dir).metrics if (model_dir / META_FILE).is_file() else None
        summary.append({"fold": fold.index, "model": str(model_dir), "status": status, "train_rows": fold.train_rows,
                        "val_rows": fold.val_rows, "val_sources": list(fold.val_sources), "metrics": metrics})
    done = [Path(s["model"]) for s in summary if (Path(s["model"]) / META_FILE).is_file()]
    line = infer_command(done, args.videos)
    write_json_atomic(out / "kfold.json", {"folds": summary, "mos_range": [low, high], "seed": args.seed,
                                           "command": command, "infer": line})
    (out / "infer.sh").write_text(f"#!/bin/sh\n# the ensemble of the {len(done)} fold models\n{line}\n")
    failed = [s for s in summary if s["status"].startswith("failed")]
    for s in failed:
        print(f"fold {s['fold']}: {s['status']}", file=sys.stderr)
    print(f"{len(done)} of {len(folds)} fold models in {out}; score with their ensemble:\n  {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
