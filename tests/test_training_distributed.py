"""Real multi-process fine-tuning on CPU through ``accelerate launch``: 2 processes with DDP, DeepSpeed
ZeRO-2, ZeRO-3 and ZeRO-3 with CPU offload (the shipped ds_configs), each finishing and saving a
checkpoint that scores a video. The tiny mPLUG-Owl2 (the Q-Align backbone) runs under ZeRO-3 with
LoRA, the way Q-Align itself was trained. A ZeRO-2 run keeps an EMA of the adapter
(``ema_decay``), and a DDP run batches versions of one source together (``source_group_size``).

With one clip per process the global batch equals the single-process batch of 2 in test_training.py,
so the logged losses must equal the single-process pinned ones: the data is really split across
the two ranks and the gradients really averaged."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.test_training import FREEZE, PINNED, SMALL, TINY_RECIPE
from tests.training_support import ROOT, quality_set, write_csv  # noqa: F401 (fixture)

RUNS = {
    # name: (family, accelerate config, ds config, method, extra flags, expected distributed type)
    "ddp": ("qwen2_5_vl", "cpu_ddp.yaml", None, "full", [], "MULTI_CPU"),
    "zero2": ("qwen2_5_vl", "cpu_zero2.yaml", "zero2.json", "lora", [], "DEEPSPEED"),
    # the EMA of the adapter (qalign_kvq.training.ema) under ZeRO-2, a checkpoint after each step
    "zero2_ema": ("qwen2_5_vl", "cpu_zero2.yaml", "zero2.json", "lora", ["--ema_decay", "0.5", "--save_steps", "1"],
                  "DEEPSPEED"),
    "zero3": ("qwen2_5_vl", "cpu_zero3.yaml", "zero3.json", "full", [], "DEEPSPEED"),
    "zero3_lora_gc": ("qwen2_5_vl", "cpu_zero3.yaml", "zero3.json", "lora", ["--gradient_checkpointing", "true"],
                      "DEEPSPEED"),
    "zero3_mplug_owl2_lora": ("mplug_owl2", "cpu_zero3.yaml", "zero3.json", "lora", [], "DEEPSPEED"),
    # DeepSpeed's CPU Adam (compiled with g++/ninja on first use, ~1 min, then cached)
    "zero3_offload": ("qwen2_5_vl", "cpu_zero3_offload.yaml", "zero3_offload.json", "full", [], "DEEPSPEED"),
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("name", list(RUNS))
def test_two_process_cpu_training_saves_a_scoring_checkpoint(name, tiny_models, quality_set, tmp_path):
    from qalign_kvq.families import get_family
    from qalign_kvq.loading import load_checkpoint
    from qalign_kvq.modeling import level_probs
    from qalign_kvq.video import read_frames, uniform_indices

    family_name, accelerate_config, ds_config, method, extra, dist_type = RUNS[name]
    root, _ = quality_set
    out = tmp_path / "out"
    csv = write_csv(tmp_path / "train.csv", SMALL)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("ACCELERATE_USE_CPU", None)
    if ds_config is None:
        env["ACCELERATE_USE_CPU"] = "1"  # DDP on CPU (MULTI_CPU over gloo); DeepSpeed runs must not set it
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "recipes" / "accelerate" / accelerate_config), "--main_process_port", str(_free_port()),
           str(ROOT / "recipes" / "finetune.py"), TINY_RECIPE,
           "--model_name_or_path", str(tiny_models(family_name)), "--family", family_name, "--train_csv", str(csv), "--video_root", str(root),
           "--val_csv", "", "--output_dir", str(out), "--method", method, *FREEZE[method],
           "--max_steps", "2", "--per_device_train_batch_size", "1", "--warmup_steps", "0", "--learning_rate", "1e-3",
           "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "2", "--use_cpu", "false", *extra]
    if ds_config:
        cmd += ["--deepspeed", str(ROOT / "ds_configs" / ds_config)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert log.count(f"distributed: DistributedType.{dist_type}, 2 processes, deepspeed: {bool(ds_config)}") == 2
    # the logged parameter count is the whole model's, also when ZeRO-3 has partitioned it
    counts = re.findall(r"trainable ([\d,]+) / total ([\d,]+) parameters", log)
    assert len(counts) == 2, log[-4000:]
    base_model, _ = get_family(family_name).load(str(tiny_models(family_name)), dtype=torch.float32)
    base_total = sum(p.numel() for p in base_model.parameters())
    for trainable, total in counts:
        trainable, total = int(trainable.replace(",", "")), int(total.replace(",", ""))
        assert total >= base_total and 0 < trainable < total, (trainable, total, base_total)

    checkpoint = out / "checkpoint-2"
    assert checkpoint.is_dir()
    if ds_config:
        assert (checkpoint / "global_step2").is_dir(), "DeepSpeed wrote its own (partitioned) checkpoint"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    np.testing.assert_allclose(losses, PINNED[family_name][method][:2], rtol=1e-4)

    if "--ema_decay" in extra:
        _check_ema(out, float(extra[extra.index("--ema_decay") + 1]))

    model, processor, family, meta = load_checkpoint(out)
    clip = read_frames(root / "bikes_c" / "qp30.mp4", uniform_indices(8, 4))
    probs = level_probs(model, family.build_inputs(processor, [clip], meta.question),
                        family.level_token_ids(processor.tokenizer))
    assert probs.shape == (1, 5) and torch.isfinite(probs).all()
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-5)


def _check_ema(out, decay):
    """The EMA of the two checkpoints follows the formula over the weights DeepSpeed trained: at step 1
    ``d * w0 + (1 - d) * w1`` (LoRA B starts at 0, so there it is ``(1 - d) * w1``), at step 2
    ``d * ema1 + (1 - d) * w2``; the output adapter is the step-2 EMA."""
    from safetensors.torch import load_file

    from qalign_kvq.training.ema import EMA_FILE

    ema1, ema2 = (load_file(str(out / f"checkpoint-{k}" / EMA_FILE)) for k in (1, 2))
    w1, w2, saved = (load_file(str(d / "adapter_model.safetensors")) for d in
                     (out / "checkpoint-1", out / "checkpoint-2", out))
    assert ema1.keys() == ema2.keys() and any("lora_B" in n for n in ema1)
    for name in ema1:
        key = name.replace(".default.", ".")
        if "lora_B" in name:
            torch.testing.assert_close(ema1[name], (1 - decay) * w1[key], msg=name)
        torch.testing.assert_close(ema2[name], decay * ema1[name] + (1 - decay) * w2[key], msg=name)
        torch.testing.assert_close(saved[key], ema2[name], msg=key)
    assert any(not torch.allclose(w2[n.replace(".default.", ".")], ema2[n], atol=1e-6) for n in ema2)


def test_two_process_homologous_batches(tiny_models, quality_set, tmp_path):
    """DDP on 2 CPU processes with source_group_size: the sampler's 4 batches of an epoch are split
    between the ranks (2 steps each, none repeated or dropped by accelerate's shard wrapper), each a
    pair of versions of one source that the homologous rank loss sees."""
    from tests.test_ranking import HOMOLOGOUS, _write_with_sources

    root, _ = quality_set
    table = _write_with_sources(tmp_path / "train.csv", HOMOLOGOUS)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "recipes" / "accelerate" / "cpu_ddp.yaml"), "--main_process_port", str(_free_port()),
           str(ROOT / "recipes" / "finetune.py"), TINY_RECIPE, "--model_name_or_path", str(tiny_models("qwen2_5_vl")),
           "--family", "qwen2_5_vl", "--train_csv", str(table), "--video_root", str(root), "--val_csv", "",
           "--output_dir", str(out), "--method", "lora", "--num_train_epochs", "2", "--per_device_train_batch_size",
           "2", "--warmup_steps", "0", "--learning_rate", "1e-3", "--logging_steps", "1", "--save_strategy", "no",
           "--source_group_size", "2", "--loss", "ce_rank", "--rank_loss", "margin", "--rank_pairs", "homologous",
           "--use_cpu", "false"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert log.count("4 batches of up to 2 over 2 process(es), 4 homologous pairs in batches") == 2
    losses = [float(x) for x in re.findall(r"'loss': '?([\d.]+)'?", log)]
    assert len(losses) == 4, log[-3000:]  # 2 epochs x (4 batches / 2 processes) optimizer steps
    assert (out / "adapter_model.safetensors").is_file()
