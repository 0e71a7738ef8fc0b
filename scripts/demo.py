"""The main job end to end on CPU: data -> fine-tune -> evaluate -> score (what `make demo` runs).

    python scripts/demo.py --out demo_out

Each step is the real command-line tool a user runs (printed before it runs):
1. a tiny randomly initialised Qwen2.5-VL-shaped model (scripts/make_tiny_models.py) whose processor
   sees up to 64 visual tokens per frame (about 168x294 px of a 9:16 frame),
2. a KVQ-like practice set from real content that ships offline (scripts/make_demo_data.py),
3. the untrained model scored on the held-out test sources (python -m qalign_kvq.infer) and
   evaluated with the challenge metrics (python -m qalign_kvq.evaluate),
4. fine-tuning with `accelerate launch recipes/finetune.py recipes/configs/demo_cpu.yaml`,
5. the fine-tuned model scored and evaluated the same way,
6. the fine-tuned model's test scatter (scatter.png) and the HTML report of its scored test set
   (python -m qalign_kvq.report), one video scored, printing its JSON record,
7. for reference, a small no-reference CNN (scripts/practice_baseline.py) trained on the same train
   split and evaluated the same way: what the labels allow a model with a visual prior to learn.
The labels of the practice set are full-reference quality measures, not human opinion scores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METRICS = ("SROCC", "PLCC", "Rank1", "Rank2", "Final")
RECIPE = "recipes/configs/demo_cpu.yaml"
FRAME_TOKENS = 64  # the tiny model's view: 16 (the default, ~84x140 px) hides most artefacts


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(cmd: list[str], log: list[tuple[str, float, float]], label: str) -> None:
    """Run one step, streaming its output; stop the demo if it fails. Logs its wall and CPU seconds."""
    print(f"\n=== {label}\n$ {shlex.join(cmd)}", flush=True)
    start, cpu = time.perf_counter(), _children_cpu()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # output in the order it is written
    while chunk := proc.stdout.read1(1 << 16):  # raw bytes: progress bars keep redrawing in place
        sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
    if proc.wait() != 0:
        sys.exit(f"demo: step '{label}' failed with exit code {proc.returncode}")
    log.append((label, time.perf_counter() - start, _children_cpu() - cpu))


def score_and_evaluate(model: Path, data: Path, out: Path, log: list, label: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    pred = out / "prediction.csv"
    run([sys.executable, "-m", "qalign_kvq.infer", "--model", str(model), "--videos", str(data / "test.csv"),
         "--root", str(data), "--output", str(pred)], log, f"score the test set ({label})")
    return evaluate(pred, data, out, log, label)


def evaluate(pred: Path, data: Path, out: Path, log: list, label: str) -> dict:
    metrics = out / "metrics.json"
    run([sys.executable, "-m", "qalign_kvq.evaluate", "--pred", str(pred), "--truth", str(data / "test.csv"),
         "--pairs-homologous", str(data / "test_pairs_homologous.csv"),
         "--pairs-nonhomologous", str(data / "test_pairs_nonhomologous.csv"), "--json", str(metrics),
         "--plot", str(out / "scatter.png")],
        log, f"evaluate ({label})")
    return json.loads(metrics.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="where everything is written")
    parser.add_argument("--sources", type=int, default=16, help="sources in the practice set")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    models, data, model_dir = out / "tiny_models", out / "data", out / "model"
    log: list[tuple[str, float, float]] = []
    py = sys.executable

    run([py, "scripts/make_tiny_models.py", "--out", str(models), "--family", "qwen2_5_vl",
         "--frame-tokens", str(FRAME_TOKENS)], log, "build the tiny model")
    run([py, "scripts/make_demo_data.py", "--out", str(data), "--sources", str(args.sources)], log,
        "build the practice set")
    base = models / "qwen2_5_vl"
    before = score_and_evaluate(base, data, out / "untrained", log, "untrained")
    run([py, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu",
         "recipes/finetune.py", RECIPE,
         "--model_name_or_path", str(base), "--train_csv", str(data / "train.csv"), "--video_root", str(data),
         "--val_csv", str(data / "val.csv"),
         "--val_pairs_homologous", str(data / "val_pairs_homologous.csv"),
         "--val_pairs_nonhomologous", str(data / "val_pairs_nonhomologous.csv"),
         "--output_dir", str(model_dir)], log, "fine-tune (accelerate launch recipes/finetune.py)")
    after = score_and_evaluate(model_dir, data, out / "finetuned", log, "fine-tuned")
    report = out / "finetuned" / "report.html"
    run([py, "-m", "qalign_kvq.report", str(out / "finetuned" / "prediction.csv"), "--root", str(data),
         "--output", str(report), "--no-progress"], log, "report of the scored test set (python -m qalign_kvq.report)")
    first_test = (data / "test.csv").read_text().splitlines()[1].split(",")[0]
    run([py, "-m", "qalign_kvq.infer", "--model", str(model_dir), "--video", str(data / first_test)], log,
        "score one video")

    reference_pred = out / "reference" / "prediction.csv"
    run([py, "scripts/practice_baseline.py", "--data", str(data), "--output", str(reference_pred)], log,
        "reference: a small no-reference CNN trained on the same split (scripts/practice_baseline.py)")
    reference = evaluate(reference_pred, data, out / "reference", log, "reference CNN")

    print("\n=== held-out test sources (practice set; labels are full-reference measures, not MOS)")
    print(f"{'metric':<8}{'tiny LMM, untrained':>21}{'tiny LMM, fine-tuned':>22}{'reference CNN':>15}")
    for name in METRICS:
        print(f"{name:<8}{before[name]:>21.4f}{after[name]:>22.4f}{reference[name]:>15.4f}")
    print("The tiny LMM has a random vision tower and too few videos to learn quality features from\n"
          "scratch: this run shows the pipeline, not a good scorer (README, 'Two commands'). The\n"
          "reference CNN shows that the labels are learnable from the pixels by a model built for it.")
    print("\n=== time per step (wall clock; CPU = user + system time of the step's processes)")
    for label, seconds, cpu in log:
        print(f"{seconds:8.1f} s wall {cpu:8.1f} s CPU  {label}")
    print(f"{sum(t for _, t, _ in log):8.1f} s wall {sum(c for _, _, c in log):8.1f} s CPU  in all")
    print(f"\nwritten under {out}:\n  data/ (practice set)  model/ (fine-tuned checkpoint, its model card and "
          "training_curves.png)\n  untrained/, finetuned/ and reference/ (prediction.csv, metrics.json, scatter.png)")
    print(f"look at:\n  {out / 'finetuned' / 'scatter.png'}   the fine-tuned model's test scores against the labels\n"
          f"  {report}   the scored test videos (open in a browser)\n"
          f"  {model_dir / 'training_curves.png'}   training loss and validation metrics")
    return 0


if __name__ == "__main__":
    sys.exit(main())
