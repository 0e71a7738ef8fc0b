"""Score videos from the command line.

    python -m qalign_kvq.infer --video x.mp4                                  # the public OneAlign, its authors' way
    python -m qalign_kvq.infer --video x.mp4 --model DIR_OR_HUB_ID            # one JSON object
    python -m qalign_kvq.infer --videos DIR|LIST.csv|FILES... --model M --output pred.csv
    accelerate launch -m qalign_kvq.infer --videos test.csv --model M --output pred.jsonl
    python -m qalign_kvq.infer --calibrate truth.csv --model DIR               # affine map -> MOS

Batch output: ``.jsonl`` holds one record per video (errors as ``{"file", "error"}``); ``.csv`` is
the submission format ``filename,score``, written atomically (errors left out) from the records
kept beside it in ``<output>.jsonl``. Every record is appended as one complete line and fsync'ed,
so a kill loses at most the video in flight; a rerun skips the files that already have a record
(``--retry-errors`` scores the failed ones again), and a finished run leaves the records in input
order. Under ``accelerate launch`` each process scores its share into ``<records>.part<rank>`` and
rank 0 merges them in input order. Exit code: 0 all scored, 1 some failed, 2 usage or model error.

Each checkpoint names its scoring protocol (``kvq``: 12 frames x FiveCrop on the MOS scale, for
fine-tuned models; ``authors``: whole frames at the family's rate, the expected level, for public
checkpoints); ``--protocol`` chooses another, and ``--frames``, ``--fps``, ``--crop-ratio``... change
its settings (the record's ``protocol`` then lists them).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import numpy as np

from qalign_kvq.loading import DEFAULT_MODEL
from qalign_kvq.scoring import PROTOCOLS

VIDEO_EXTENSIONS = {".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".flv", ".3gp", ".ts", ".mpg", ".mpeg"}


class UsageError(Exception):
    """Bad command-line input (exit code 2)."""


# ----- inputs ----------------------------------------------------------------------------------
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


# ----- records -----------------------------------------------------------------------------------
def records_path(output: Path) -> Path:
    """Where the full records live: the output itself (JSONL) or ``<output>.jsonl`` beside a CSV."""
    return output if output.suffix.lower() != ".csv" else output.with_name(output.name + ".jsonl")


def read_records(path: Path) -> list[dict]:
    """Complete records of a JSONL file (a last line without newline, from a kill, is ignored)."""
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.split("\n")[:-1]  # only newline-terminated lines
    return [json.loads(line) for line in lines if line.strip()]


def repair_tail(path: Path) -> None:
    """Cut a half-written last line (no trailing newline) off a records file."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)
            handle.flush()
            os.fsync(handle.fileno())


def append_record(path: Path, record: dict) -> None:
    """Append one record as one complete line in a single write, then fsync."""
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", newline="") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_submission_csv(output: Path, records: Sequence[dict]) -> None:
    """``filename,score`` of every scored record, in record order (error records left out)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["filename", "score"])
    for record in records:
        if "error" not in record:
            writer.writerow([record["file"], repr(float(record["score"]))])
    write_text_atomic(output, buf.getvalue())


def part_files(records: Path) -> list[Path]:
    return sorted(records.parent.glob(f"{records.name}.part*"))


def merge_parts(records: Path, order: dict[str, int]) -> None:
    """Append the records of every part file (input order; names already present skipped), then
    remove the parts."""
    done = {r["file"] for r in read_records(records)}
    parts = part_files(records)
    pending = [r for part in parts for r in read_records(part) if r["file"] not in done]
    pending.sort(key=lambda r: order.get(r["file"], len(order)))
    for record in pending:
        if record["file"] not in done:
            append_record(records, record)
            done.add(record["file"])
    for part in parts:
        part.unlink()


# ----- scoring -----------------------------------------------------------------------------------
#: Command-line flags that set a protocol's ViewOptions field of the same name (None: the protocol's own).
PROTOCOL_FLAGS = ("frames", "fps", "max_frames", "crop_ratio", "center_weight", "views", "scale")


def build_scorer(args, device=None):
    from qalign_kvq.scorer import Scorer

    overrides = {name: getattr(args, name) for name in PROTOCOL_FLAGS if getattr(args, name) is not None}
    if args.include_full:
        overrides["include_full"] = True
    if args.crop_sandwich:
        overrides["crop_sandwich"] = True
    if args.views_per_forward:
        overrides["batch_size"] = args.views_per_forward
    return Scorer.from_pretrained(args.model or [DEFAULT_MODEL], device=device or args.device, dtype=args.dtype,
                                  weights=args.model_weight, protocol=args.protocol, attn_implementation=args.attn,
                                  frame_pixels=args.frame_pixels, **overrides)


def score_one(scorer, name: str, path: Path) -> dict:
    """A record for one video: the score, or ``{"file", "error"}`` with the reason."""
    from qalign_kvq.video import VideoError

    try:
        record = scorer.score(path).to_record()
    except VideoError as err:
        return {"file": name, "error": err.reason}
    except (OSError, ValueError, RuntimeError) as err:
        return {"file": name, "error": f"{type(err).__name__}: {err}"}
    record["file"] = name
    return record


def run_batch(args) -> int:
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env
    from tqdm import tqdm

    # cpu=True lets `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu` run several CPU processes (gloo)
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu, timeout=timedelta(hours=48))
    inputs = collect_inputs(args.videos, args.root)
    if not inputs:
        raise UsageError(f"no videos found in {args.videos}")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    records = records_path(output)
    order = {name: i for i, name in enumerate(n for n, _ in inputs)}
    distributed = state.num_processes > 1
    if state.is_main_process:
        for path in [records, *part_files(records)]:
            repair_tail(path)
        merge_parts(records, order)  # leftovers of an interrupted multi-process run
        if args.retry_errors:
            kept = [r for r in read_records(records) if not ("error" in r and r["file"] in order)]
            write_text_atomic(records, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    state.wait_for_everyone()
    done = {r["file"] for path in [records, *part_files(records)] for r in read_records(path)}
    todo = [(name, path) for name, path in inputs if name not in done]
    mine = todo[state.process_index::state.num_processes]
    target = records.with_name(f"{records.name}.part{state.process_index}") if distributed else records
    if distributed:
        print(f"process {state.process_index}/{state.num_processes}: {len(mine)} of {len(todo)} videos to score",
              file=sys.stderr)
    scorer = build_scorer(args, device=state.device if distributed else None)
    for name, path in tqdm(mine, desc=f"scoring [{state.process_index}]" if distributed else "scoring",
                           unit="video", disable=args.no_progress or not state.is_local_main_process):
        append_record(target, score_one(scorer, name, path))
    state.wait_for_everyone()
    failed = 0
    if state.is_main_process:
        merge_parts(records, order)
        final = read_records(records)
        canonical = sorted(final, key=lambda r: order.get(r["file"], -1))  # older names first, then input order
        if canonical != final:  # e.g. parts of an interrupted multi-process run were merged first
            write_text_atomic(records, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in canonical))
            final = canonical
        if output != records:
            write_submission_csv(output, final)
        errors = [r for r in final if "error" in r and r["file"] in order]
        failed = len(errors)
        scored = sum(1 for r in final if "error" not in r and r["file"] in order)
        print(f"{scored} scored, {failed} failed, {len(todo)} this run -> {output}", file=sys.stderr)
        for record in errors[:20]:
            print(f"  failed: {record['file']}: {record['error']}", file=sys.stderr)
    if distributed:  # every process exits with the same code
        from accelerate.utils import broadcast_object_list

        failed = broadcast_object_list([failed], from_process=0)[0]
        state.destroy_process_group()  # a clean shutdown: gloo threads left running can abort the exit
    return 1 if failed else 0


def run_single(args) -> int:
    scorer = build_scorer(args)
    record = score_one(scorer, args.video, Path(args.video))
    print(json.dumps(record, indent=2, ensure_ascii=False))
    return 1 if "error" in record else 0


def run_calibrate(args) -> int:
    """Score the labelled videos, fit ``mos = a * score_1_5 + b`` per model, store it in each model's
    ``qalign_kvq.json`` (affine, so PLCC is unchanged)."""
    from tqdm import tqdm

    from qalign_kvq.checkpoint import META_FILE
    from qalign_kvq.evaluate import read_scores

    dirs = [Path(m) for m in args.model or [DEFAULT_MODEL]]
    for d in dirs:
        if not (d / META_FILE).is_file():
            raise UsageError(f"{d}: calibration is stored with the model: pass a local qalign-kvq checkpoint dir")
    truth_path = Path(args.calibrate)
    truth = read_scores(truth_path)
    base = Path(args.root) if args.root else truth_path.parent
    scorer = build_scorer(args)
    scores, mos = [[] for _ in dirs], []
    for name, value in tqdm(list(truth.items()), desc="calibrating", unit="video", disable=args.no_progress):
        record = score_one(scorer, name, base / name)
        if "error" in record:
            print(f"skipped {name}: {record['error']}", file=sys.stderr)
            continue
        # each model's own score_1_5: the calibration maps it to MOS before the ensemble averages
        per_model = [m["score_1_5"] for m in record["models"]] if "models" in record else [record["score_1_5"]]
        for i, s in enumerate(per_model):
            scores[i].append(s)
        mos.append(value)
    if len(mos) < 2:
        raise UsageError(f"{truth_path}: fewer than two videos could be scored")
    result = []
    for d, lm, s in zip(dirs, scorer.models, scores):
        a, b = np.polyfit(np.asarray(s), np.asarray(mos), 1)
        lm.meta.calibration = {"a": float(a), "b": float(b)}
        lm.meta.save(d)
        result.append({"model": str(d), "a": float(a), "b": float(b), "n": len(mos),
                       "plcc": float(np.corrcoef(s, mos)[0, 1])})
    print(json.dumps({"calibration": result}, indent=2))
    return 0


# ----- CLI ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qalign_kvq.infer", description=__doc__.split("\n\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--video", help="score one video, print one JSON object")
    what.add_argument("--videos", nargs="+", help="video files, folders and/or CSVs (filename column)")
    what.add_argument("--calibrate", metavar="TRUTH_CSV",
                      help="fit scores -> MOS on a filename,score CSV and store it with the model")
    p.add_argument("--model", nargs="+", action="extend",
                   help=f"checkpoint dir or hub id (several: an ensemble); default: {DEFAULT_MODEL}")
    p.add_argument("--model-weight", nargs="+", action="extend", type=float, help="one weight per --model")
    p.add_argument("--output", help="JSONL or CSV (filename,score) file for --videos")
    p.add_argument("--root", help="base folder of the names in CSVs / folders")
    p.add_argument("--protocol", choices=sorted(PROTOCOLS),
                   help="scoring protocol (default: the checkpoint's; kvq for fine-tuned, authors for public ones)")
    p.add_argument("--frames", type=int, help="evenly spaced frames per video (kvq: 12)")
    p.add_argument("--fps", type=float, help="frames per second of the whole video instead (authors: the family's rate)")
    p.add_argument("--max-frames", type=int, help="at most this many frames with --fps (default: what the context holds)")
    p.add_argument("--views", choices=["five_crop", "full"], help="FiveCrop views or the whole frame")
    p.add_argument("--scale", choices=["mos", "levels"], help="score on the training MOS scale or as the expected level")
    p.add_argument("--crop-ratio", type=float, help="FiveCrop size as a share of each side (kvq: 0.8)")
    p.add_argument("--center-weight", type=float, help="weight of the centre crop, corners 1 (kvq: 2)")
    p.add_argument("--include-full", action="store_true", help="add the uncropped frames as a sixth view")
    p.add_argument("--crop-sandwich", action="store_true", help="crop detected sandwich videos to their content band")
    p.add_argument("--frame-pixels", type=int,
                   help="per-frame pixel budget (default: the one stored with the checkpoint / the model's own)")
    p.add_argument("--views-per-forward", type=int, help="views per model forward (default: all views at once)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on GPU, else float32")
    p.add_argument("--attn", help="attention implementation: sdpa, eager, flash_attention_2 (needs flash-attn)... "
                                  "(default: transformers' choice)")
    p.add_argument("--retry-errors", action="store_true", help="score again the files that failed before")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.model_weight and len(args.model_weight) != len(args.model or [DEFAULT_MODEL]):
            raise UsageError(f"{len(args.model_weight)} --model-weight values for {len(args.model or [1])} --model")
        if args.videos and not args.output:
            raise UsageError("--videos needs --output FILE (.jsonl or .csv)")
        if ((args.frames is not None and args.frames < 1) or (args.crop_ratio is not None and not 0 < args.crop_ratio <= 1)
                or (args.center_weight is not None and args.center_weight < 0) or (args.fps is not None and args.fps <= 0)
                or (args.max_frames is not None and args.max_frames < 1)
                or (args.frame_pixels is not None and args.frame_pixels < 1)):
            raise UsageError("need --frames >= 1, --fps > 0, --max-frames >= 1, 0 < --crop-ratio <= 1, "
                             "--center-weight >= 0, --frame-pixels >= 1")
        if args.video:
            return run_single(args)
        if args.calibrate:
            return run_calibrate(args)
        return run_batch(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as err:  # model loading: missing dir, bad checkpoint, unknown family
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
