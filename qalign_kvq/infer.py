"""Score videos from the command line.

    python -m qalign_kvq.infer --video x.mp4                                  # the public OneAlign, its authors' way
    python -m qalign_kvq.infer --video x.mp4 --model DIR_OR_HUB_ID            # one JSON object
    python -m qalign_kvq.infer --videos DIR|LIST.csv|FILES... --model M --output pred.csv
    accelerate launch -m qalign_kvq.infer --videos test.csv --model M --output pred.jsonl
    python -m qalign_kvq.infer --calibrate truth.csv --model DIR               # affine map -> MOS

Batch scoring is pipelined (:mod:`qalign_kvq.pipeline`, :mod:`qalign_kvq.view_batches`): reading,
frame sampling, views and the processor run in ``--workers`` DataLoader worker processes (default:
the CPUs of the process less one, at most 8; 0 is the sequential path), the forwards in the main
process, with ``--views-per-forward`` views of several videos in one forward. A file a worker cannot
read, or one a worker dies on, gets its error record and the run goes on.

Batch output: ``.jsonl`` holds one record per video (errors as ``{"file", "error"}``); ``.csv`` is
the submission format ``filename,score``, written atomically (errors left out) from the records
kept beside it in ``<output>.jsonl``. Every record is appended as one complete line and fsync'ed,
so a kill loses at most the videos in flight; a rerun skips the files that already have a record
(``--retry-errors`` scores the failed ones again), and a finished run leaves the records in input
order. Under ``accelerate launch`` process 0 lists what is left to score and hands it out, each process
scores its share into ``<records>.part<rank>`` (the output folder must be shared by all, which is
checked first) and process 0 merges them in input order. Every exception scoring a video becomes
its error record, except KeyboardInterrupt and device failures (``torch.AcceleratorError``: the GPU
is unusable; exit 3, the records so far are kept); CUDA out-of-memory is recorded (``--retry-errors``
with a smaller ``--views-per-forward`` scores it again). Exit code: 0 all scored, 1 some failed or
have no record, 2 usage, model or storage error, 3 device failure.

Each checkpoint names its scoring protocol (``kvq``: 12 frames x FiveCrop on the MOS scale, for
fine-tuned models; ``authors``: whole frames at the family's rate, the expected level, for public
checkpoints); ``--protocol`` chooses another, and ``--frames``, ``--fps``, ``--crop-ratio``... change
its settings (the record's ``protocol`` then lists them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import numpy as np

from qalign_kvq.batch_inputs import VIDEO_EXTENSIONS, UsageError, collect_inputs, read_csv_names  # noqa: F401
from qalign_kvq.loading import DEFAULT_MODEL
from qalign_kvq.pipeline import DeviceError, WorkerError, default_workers, error_reason
from qalign_kvq.records import (
    RecordsError,
    append_record,
    check_shared_folder,
    drop_errors,
    merge_parts,
    part_files,
    part_path,
    read_records,
    records_path,
    repair_tail,
    tally,
    write_submission_csv,
)
from qalign_kvq.scoring import PROTOCOLS

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
                                  frame_pixels=args.frame_pixels, vision_attention=args.vision_attention,
                                  processor_device=args.processor_device, **overrides)


def score_one(scorer, name: str, path: Path) -> dict:
    """A record for one video: the score, or ``{"file", "error"}`` with the reason. Any exception of
    the video's becomes its error record (:func:`qalign_kvq.pipeline.error_reason`: an unexpected
    type also prints its traceback; CUDA out-of-memory says to try a smaller --views-per-forward).
    What is not the video's propagates: KeyboardInterrupt, SystemExit, and a device failure as
    DeviceError."""
    try:
        record = scorer.score(path).to_record()
    except Exception as err:  # noqa: BLE001 (the video's error record)
        return {"file": name, "error": error_reason(name, err)}
    record["file"] = name
    return record


def batch_workers(args, videos: int, processes: int = 1) -> int:
    """``--workers``, else :func:`qalign_kvq.pipeline.default_workers`."""
    return args.workers if args.workers is not None else default_workers(videos, processes)


@contextlib.contextmanager
def main_threads(workers: int, processes: int = 1):
    """Leave the workers their cores: the forwards' torch threads at most the process's share of
    the CPUs less ``workers`` (never raised; put back afterwards)."""
    import torch

    before = torch.get_num_threads()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if workers > 0:
        torch.set_num_threads(max(1, min(before, cpus // max(1, processes) - workers)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def score_stream(scorer, items, args, processes: int = 1):
    """The records of ``(name, path)`` items in input order, from the pipeline."""
    from qalign_kvq.view_batches import score_videos

    workers = batch_workers(args, len(items), processes)
    with main_threads(workers, processes):
        for outcome in score_videos(scorer, items, workers=workers, prefetch=args.prefetch):
            yield outcome.record()


def plan_batch(args) -> dict:
    """Process 0's view of the run: repair and merge what an interrupted run left, then the input
    names, what is left to score as ``(name, absolute path)`` and a token for the shared-folder
    check; ``{"error": reason}`` for a usage error."""
    try:
        inputs = collect_inputs(args.videos, args.root)
    except UsageError as err:
        return {"error": str(err)}
    if not inputs:
        return {"error": f"no videos found in {args.videos}"}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    records = records_path(output)
    order = {name: i for i, (name, _) in enumerate(inputs)}
    try:  # every complete line a record before anything is changed
        for path in [records, *part_files(records)]:
            read_records(path)
    except RecordsError as err:
        return {"error": f"{err}: a line infer does not write; mend or remove it (nothing was changed), or "
                         "write to another --output"}
    for path in [records, *part_files(records)]:
        repair_tail(path)
    merge_parts(records, order)  # leftovers of an interrupted multi-process run
    if args.retry_errors:
        drop_errors(records, list(order))
    done = {r["file"] for r in read_records(records)}
    todo = [(name, str(path.absolute())) for name, path in inputs if name not in done]
    return {"names": list(order), "todo": todo, "token": secrets.token_hex(8)}


def run_batch(args) -> int:
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env
    from tqdm import tqdm

    from qalign_kvq.distributed import broadcast

    # cpu=True lets `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu` run several CPU processes (gloo)
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu, timeout=timedelta(hours=48))
    distributed = state.num_processes > 1
    try:
        plan = broadcast(plan_batch(args) if state.is_main_process else None)  # one to-do list for all
        if "error" in plan:
            raise UsageError(plan["error"])
        output = Path(args.output)
        records = records_path(output)
        if distributed and (reason := check_shared_folder(records.parent, plan["token"])):
            raise UsageError(f"{records.parent.absolute()} is not one folder shared by all {state.num_processes} "
                             f"processes: {reason}. Scoring with several processes needs --output on storage every "
                             "node sees (each process writes <output>.part<rank> there and process 0 merges them)")
        todo = [(name, Path(path)) for name, path in plan["todo"]]
        mine = todo[state.process_index::state.num_processes]
        target = part_path(records, state.process_index) if distributed else records
        if distributed:
            print(f"process {state.process_index}/{state.num_processes}: {len(mine)} of {len(todo)} videos to score",
                  file=sys.stderr)
        scorer = build_scorer(args, device=state.device if distributed else None)
        node = int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes))  # processes sharing the CPUs
        for record in tqdm(score_stream(scorer, mine, args, node), total=len(mine),
                           desc=f"scoring [{state.process_index}]" if distributed else "scoring", unit="video",
                           disable=args.no_progress or not state.is_local_main_process):
            append_record(target, record)
        state.wait_for_everyone()
        # process 0 counts what every process wrote (part files opened by name) and tells all of them
        summary = broadcast(tally(records, plan["names"], state.num_processes) if state.is_main_process else None)
    finally:
        if distributed and torch.distributed.is_initialized():
            state.destroy_process_group()  # the last collective is behind; a clean exit for gloo's threads
    if state.is_main_process:  # the merge and the CSV: process 0 alone, after the last collective
        final = merge_parts(records, {name: i for i, name in enumerate(plan["names"])},
                            [part_path(records, r) for r in range(state.num_processes)] if distributed else [])
        if output != records:
            write_submission_csv(output, final)
        failed, missing = summary["errors"], summary["missing"]
        print(f"{summary['scored']} scored, {len(failed)} failed, {len(missing)} without a record, "
              f"{len(todo)} this run -> {output}", file=sys.stderr)
        for record in failed[:20]:
            print(f"  failed: {record['file']}: {record['error']}", file=sys.stderr)
        for name in missing[:20]:
            print(f"  no record: {name} (was its part file written where process 0 cannot see it?)",
                  file=sys.stderr)
    return 1 if summary["errors"] or summary["missing"] else 0


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
    records = score_stream(scorer, [(name, base / name) for name in truth], args)
    for record in tqdm(records, total=len(truth), desc="calibrating", unit="video", disable=args.no_progress):
        name, value = record["file"], truth[record["file"]]
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
    p.add_argument("--views-per-forward", type=int,
                   help="views per model forward, across videos in a batch (default: one video's views)")
    p.add_argument("--workers", type=int,
                   help="DataLoader worker processes reading and preparing videos (default: the CPUs of the "
                        "process less one, at most 8; 0: one video after the other in this process)")
    p.add_argument("--prefetch", type=int, default=2, help="videos each worker prepares ahead (default: 2)")
    p.add_argument("--processor-device",
                   help="run the processors' resizing and normalising on this device (e.g. cuda), in the main "
                        "process; the workers then only read frames and cut views")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on GPU, else float32")
    p.add_argument("--attn", help="attention implementation: sdpa, eager, flash_attention_2 (needs flash-attn)... "
                                  "(default: transformers' choice)")
    p.add_argument("--vision-attention", choices=["packed", "stock"], default="packed",
                   help="Qwen-VL vision attention: packed (all windows of a layer in one call, default) or stock "
                        "(transformers' loop over windows)")
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
                or (args.frame_pixels is not None and args.frame_pixels < 1)
                or (args.workers is not None and args.workers < 0) or args.prefetch < 1
                or (args.views_per_forward is not None and args.views_per_forward < 1)):
            raise UsageError("need --frames >= 1, --fps > 0, --max-frames >= 1, 0 < --crop-ratio <= 1, "
                             "--center-weight >= 0, --frame-pixels >= 1, --workers >= 0, --prefetch >= 1, "
                             "--views-per-forward >= 1")
        if args.video:
            return run_single(args)
        if args.calibrate:
            return run_calibrate(args)
        return run_batch(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except WorkerError as err:
        print(f"error: {err}. The records written so far are kept; a rerun scores the rest", file=sys.stderr)
        return 2
    except DeviceError as err:
        print(f"error: device failure, stopped: {err}. The records written so far are kept; a rerun scores the "
              "rest", file=sys.stderr)
        return 3
    except (OSError, ValueError) as err:  # model loading: missing dir, bad checkpoint, unknown family
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
