"""Fine-tuning the way a cluster runs it, as two gloo processes on CPU: DDP + LoRA + gradient
checkpointing with persistent DataLoader workers and a Hub push slower than ``ddp_timeout`` (one
``accelerate launch``, shared by several tests), resume past a half-written newest checkpoint, the
video check shared out over both ranks (one rank slow, one rank missing a file the other sees), the
vision learning rate under ZeRO-3 with optimizer offload (mPLUG-Owl2, LoRA on its vision tower
with reentrant checkpointing), and the DeQA fidelity loss over the pairs of both ranks' clips."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.distributed_support import FakeHub, cpu_env, fidelity_rank, free_port, run_ranks, with_sitecustomize
from tests.test_training import FREEZE, SMALL, TINY_RECIPE
from tests.training_support import ROOT, quality_set, write_csv  # noqa: F401 (fixture)

DDP_TIMEOUT = 10  # seconds: every collective of the run below must meet it
PUSH_SECONDS = 12  # the fake Hub's commit takes this long: more than DDP_TIMEOUT
# Losses of the run below (global batch 2, lr 1e-3, LoRA dropout 0). They equal those of the same
# run with workers forked anew each epoch; with the epoch frozen at 0 in persistent workers (the
# old ClipDataset) step 3, the first of epoch 1, differed (5.851800 against 5.852078, measured
# before Qwen2.5-VL read the clips' real frame times, which moved all three by ~1e-5).
GC_LOSSES = [5.893201, 5.895542, 5.852129]


def _launch(accelerate_config: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "recipes" / "accelerate" / accelerate_config), "--main_process_port", str(free_port()),
           str(ROOT / "recipes" / "finetune.py"), TINY_RECIPE, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)


def _recipe(model_dir, csv, root, out, family="qwen2_5_vl", method="lora") -> list[str]:
    return ["--model_name_or_path", str(model_dir), "--family", family, "--train_csv", str(csv),
            "--video_root", str(root), "--val_csv", "", "--output_dir", str(out), "--method", method,
            *FREEZE[method], "--per_device_train_batch_size", "1", "--warmup_steps", "0",
            "--learning_rate", "1e-3", "--logging_steps", "1", "--use_cpu", "false"]


def _gc_args(model_dir, csv, root, out, push: bool) -> list[str]:
    args = [*_recipe(model_dir, csv, root, out), "--gradient_checkpointing", "true", "--lora_dropout", "0",
            "--dataloader_num_workers", "1", "--dataloader_persistent_workers", "true", "--max_steps", "3",
            "--save_strategy", "steps", "--save_steps", "1", "--ddp_timeout", str(DDP_TIMEOUT)]
    if push:
        args += ["--push_to_hub", "true", "--hub_model_id", "org/kvq-cluster", "--hub_token", "hf_cluster_test"]
    return args


def _losses(checkpoint) -> list[float]:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


@pytest.fixture(scope="module")
def lora_gc_run(tiny_models, quality_set, tmp_path_factory):
    """DDP + LoRA + gradient checkpointing (the recipe's defaults for it), one persistent worker per
    rank, 3 steps (2 per epoch) saved at every step, then a push to a Hub whose commit outlasts
    ``ddp_timeout``."""
    root, _ = quality_set
    tmp = tmp_path_factory.mktemp("lora_gc")
    hub = FakeHub(commit_seconds=PUSH_SECONDS)
    env = cpu_env(HF_HUB_OFFLINE=None, HF_ENDPOINT=hub.url)
    model_dir, csv = tiny_models("qwen2_5_vl"), write_csv(tmp / "train.csv", SMALL)
    proc = _launch("cpu_ddp.yaml", _gc_args(model_dir, csv, root, tmp / "out", push=True), env)
    hub.close()
    return {"proc": proc, "log": proc.stdout + proc.stderr, "out": tmp / "out", "hub": hub, "root": root,
            "model_dir": model_dir, "csv": csv}


@pytest.mark.slow
def test_ddp_lora_with_gradient_checkpointing_trains_and_its_checkpoint_scores(lora_gc_run):
    from qalign_kvq.loading import load_checkpoint
    from qalign_kvq.modeling import level_probs
    from qalign_kvq.video import read_frames, uniform_indices

    log, out = lora_gc_run["log"], lora_gc_run["out"]
    assert lora_gc_run["proc"].returncode == 0, log[-4000:]
    assert "mark a variable ready only once" not in log
    assert log.count("distributed: DistributedType.MULTI_CPU, 2 processes, deepspeed: False") == 2
    np.testing.assert_allclose(_losses(out / "checkpoint-3"), GC_LOSSES, rtol=1e-6)
    model, processor, family, meta = load_checkpoint(out)
    clip = read_frames(lora_gc_run["root"] / "bikes_c" / "qp30.mp4", uniform_indices(8, 4))
    probs = level_probs(model, family.build_inputs(processor, [clip], meta.question),
                        family.level_token_ids(processor.tokenizer))
    assert probs.shape == (1, 5) and float(probs.sum()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.slow
def test_persistent_workers_see_each_epochs_augmentation(lora_gc_run):
    # step 3 is the first of epoch 1: its clips are drawn with epoch 1 in the long-lived workers
    assert lora_gc_run["proc"].returncode == 0, lora_gc_run["log"][-4000:]
    assert _losses(lora_gc_run["out"] / "checkpoint-3")[2] == pytest.approx(GC_LOSSES[2], rel=1e-6)


@pytest.mark.slow
def test_a_push_slower_than_ddp_timeout_still_exits_0(lora_gc_run):
    hub, out = lora_gc_run["hub"], lora_gc_run["out"]
    assert lora_gc_run["proc"].returncode == 0, lora_gc_run["log"][-4000:]
    commits = [c for c in hub.calls if c[0] == "commit"]
    assert len(commits) == 1 and commits[0][3] - commits[0][2] >= PUSH_SECONDS > DDP_TIMEOUT
    assert [c[1]["name"] for c in hub.calls if c[0] == "create_repo"] == ["kvq-cluster"]
    for name in ("adapter_model.safetensors", "adapter_config.json", "qalign_kvq.json", "README.md"):
        assert hub.files[name] == (out / name).read_bytes(), name
    assert not any(name.startswith("checkpoint-") for name in hub.files)


@pytest.mark.slow
def test_what_makes_a_checkpoint_incomplete(lora_gc_run, tmp_path):
    from qalign_kvq.training.resume import checkpoint_problem, last_complete_checkpoint

    assert lora_gc_run["proc"].returncode == 0, lora_gc_run["log"][-4000:]
    ckpt = tmp_path / "checkpoint-2"
    shutil.copytree(lora_gc_run["out"] / "checkpoint-2", ckpt)
    assert checkpoint_problem(ckpt) is None
    state = (ckpt / "trainer_state.json").read_text()
    (ckpt / "trainer_state.json").write_text(state[: len(state) // 2])
    assert checkpoint_problem(ckpt).startswith("trainer_state.json is incomplete")
    (ckpt / "trainer_state.json").write_text(state)
    weights = (ckpt / "adapter_model.safetensors").read_bytes()
    (ckpt / "adapter_model.safetensors").write_bytes(weights[:-100])
    assert checkpoint_problem(ckpt).startswith("adapter_model.safetensors is not a complete safetensors file")
    (ckpt / "adapter_model.safetensors").write_bytes(weights)
    (ckpt / "optimizer.pt").unlink()
    assert checkpoint_problem(ckpt).startswith("no optimizer state")
    assert checkpoint_problem(ckpt, save_only_model=True) is None
    shutil.copytree(lora_gc_run["out"] / "checkpoint-2", tmp_path / "checkpoint-10")  # a step it does not hold
    assert checkpoint_problem(tmp_path / "checkpoint-10") == "trainer_state.json is at step 2, not 10"
    assert last_complete_checkpoint(tmp_path) is None
    shutil.copytree(lora_gc_run["out"] / "checkpoint-2", tmp_path / "checkpoint-2", dirs_exist_ok=True)
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")


def test_dataloader_workers_share_the_epoch_and_the_frame_counts(quality_set, tmp_path, monkeypatch):
    import qalign_kvq.video
    from qalign_kvq.annotations import add_levels, read_table
    from qalign_kvq.levels import LevelScale
    from qalign_kvq.training.dataset import ClipDataset

    root, _ = quality_set
    table = add_levels(read_table(write_csv(tmp_path / "train.csv", SMALL), root), LevelScale(1.0, 5.0))
    dataset = ClipDataset(table, num_frames=4, train=True, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=1, persistent_workers=True)
    epoch0 = [np.asarray(item["clip"]) for item in loader]
    dataset.set_epoch(1)  # as EpochCallback does, in the main process, between epochs
    epoch1 = [np.asarray(item["clip"]) for item in loader]

    def no_probe(path):
        raise AssertionError(f"{path} probed again")

    monkeypatch.setattr(qalign_kvq.video, "probe", no_probe)  # the worker's counts are in shared memory
    expected = [dataset[i]["clip"] for i in range(len(dataset))]  # epoch 1, drawn here
    assert all(np.array_equal(a, b) for a, b in zip(epoch1, expected))
    assert not any(np.array_equal(a, b) for a, b in zip(epoch0, epoch1))
    counts = {path: (8, 25.0) for path in table["path"]}  # e.g. from check_videos: nothing left to probe
    assert ClipDataset(table, num_frames=4, train=False, probed=counts)[0]["clip"].shape[0] == 4


@pytest.mark.slow
def test_resume_skips_a_half_written_newest_checkpoint(lora_gc_run, tmp_path):
    from qalign_kvq.training.resume import checkpoint_problem

    assert lora_gc_run["proc"].returncode == 0, lora_gc_run["log"][-4000:]
    out = tmp_path / "out"
    shutil.copytree(lora_gc_run["out"], out)
    # a kill during the save of step 3: the weights half written, trainer_state.json (written last) absent
    weights = out / "checkpoint-3" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (out / "checkpoint-3" / "trainer_state.json").unlink()
    assert checkpoint_problem(out / "checkpoint-3") == "no trainer_state.json (the Trainer writes it last)"
    assert checkpoint_problem(out / "checkpoint-2") is None
    args = _gc_args(lora_gc_run["model_dir"], lora_gc_run["csv"], lora_gc_run["root"], out, push=False)
    proc = _launch("cpu_ddp.yaml", [*args, "--resume_from_checkpoint", "last"], cpu_env())
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert log.count(f"not resuming from {out / 'checkpoint-3'}: no trainer_state.json") == 1  # process 0 picks
    assert log.count(f"resuming from {out / 'checkpoint-2'}") == 2
    np.testing.assert_allclose(_losses(out / "checkpoint-3"), GC_LOSSES, rtol=1e-6)
    assert checkpoint_problem(out / "checkpoint-3") is None


SLOW_SHARE = """
import os, time
if os.environ.get("RANK") == "1":
    import qalign_kvq.video as video
    probe, slept = video.probe, []
    def slow_probe(path):  # process 1's files sit on a slow network share
        if not slept:
            time.sleep({seconds})
            slept.append(True)
        return probe(path)
    video.probe = slow_probe
"""


@pytest.mark.slow
def test_video_check_runs_on_every_rank_and_a_slow_share_does_not_time_the_others_out(tiny_models, quality_set,
                                                                                        tmp_path):
    root, _ = quality_set
    rows = [*SMALL, ("gone/a.mp4", 3.0)]
    csv = write_csv(tmp_path / "train.csv", rows)
    # two "nodes" with their own view of the videos (video_root is relative to each one's directory):
    # node 1 lacks one file that node 0 has
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    node0.mkdir()
    (node0 / "videos").symlink_to(root)
    for name, _ in SMALL[1:]:
        (node1 / "videos" / name).parent.mkdir(parents=True, exist_ok=True)
        os.link(root / name, node1 / "videos" / name)
    env = with_sitecustomize(cpu_env(), tmp_path / "site", SLOW_SHARE.replace("{seconds}", str(2 * 5)))
    args = [str(ROOT / "recipes" / "finetune.py"), TINY_RECIPE, *_recipe(tiny_models("qwen2_5_vl"), csv, "videos",
                                                                        tmp_path / "out"),
            "--max_steps", "1", "--ddp_timeout", "5"]
    # process 0's error names what process 1 found after its 10 s share: it waited past ddp_timeout (5 s)
    expected = (f"MissingVideosError: {csv}: 2 rows have a missing or unreadable video:\n"
                f"  {SMALL[0][0]}: file not found by process 1 ({socket.gethostname()}) of 2 (the others see it)\n"
                "  gone/a.mp4: file not found\n")
    for code, text in run_ranks(args, env, cwds=[node0, node1], timeout=240):
        text = re.sub(r"(?m)^\[rank\d\]: ", "", text)  # torch prefixes an uncaught error's lines with the rank
        assert code == 1 and expected in text, text[-3000:]
        assert "Timed out" not in text, text[-3000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_vision_parameters_under_zero3_offload_move_at_the_vision_learning_rate(tiny_models, quality_set, tmp_path):
    """mPLUG-Owl2 (Q-Align's backbone) with LoRA on the language model and the vision tower, under
    ds_configs/zero3_offload.json (DeepSpeed's CPU Adam) with gradient checkpointing, which ZeRO-3 +
    LoRA runs reentrant. After one Adam step from lora_B = 0, each lora_B entry with a gradient has
    moved by the learning rate of its group: vision 1e-5, language 1e-3."""
    from safetensors.torch import load_file

    root, _ = quality_set
    out = tmp_path / "out"
    env = cpu_env(ACCELERATE_USE_CPU=None)
    args = [*_recipe(tiny_models("mplug_owl2"), write_csv(tmp_path / "train.csv", SMALL), root, out,
                     family="mplug_owl2"),
            "--freeze_vision", "false", "--lora_target_modules", "q_proj", "query_key_value",
            "--vision_learning_rate", "1e-5", "--gradient_checkpointing", "true", "--max_steps", "1",
            "--save_strategy", "no", "--deepspeed", str(ROOT / "ds_configs" / "zero3_offload.json")]
    proc = _launch("cpu_zero3_offload.yaml", args, env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert log.count("distributed: DistributedType.DEEPSPEED, 2 processes, deepspeed: True") == 2
    weights = load_file(out / "adapter_model.safetensors")
    vision = [v for k, v in weights.items() if "lora_B" in k and "vision_model" in k]
    language = [v for k, v in weights.items() if "lora_B" in k and "vision_model" not in k]
    assert len(vision) == 2 and len(language) == 2  # the tiny model's two layers, one target each
    for tensors, lr in ((vision, 1e-5), (language, 1e-3)):
        for tensor in tensors:
            assert float(tensor.abs().max()) == pytest.approx(lr, rel=1e-3)


@pytest.mark.slow
def test_fidelity_loss_pairs_the_clips_of_every_rank(tmp_path):
    from qalign_kvq.training.trainer import fidelity_rank_loss

    logits = torch.tensor([[2.0, 0.1, 0, 0, -1], [0, 1.5, 0, 0, 0], [0, 0, 0.3, 1, 0], [-1, 0, 0, 0, 2],
                           [0.5, 0.5, 0, 0, 0]])
    scores = torch.tensor([4.6, 3.8, 2.6, 1.4, 3.0])
    whole = logits.clone().requires_grad_(True)
    single = fidelity_rank_loss(whole, scores)
    single.backward()
    torch.multiprocessing.start_processes(
        fidelity_rank, args=(2, str(tmp_path / "store"), logits, scores, str(tmp_path / "result")), nprocs=2,
        start_method="spawn")
    parts = [torch.load(tmp_path / f"result.{r}") for r in range(2)]
    for part in parts:  # the loss over all 10 pairs of the 5 clips, on both ranks
        assert float(part["loss"]) == pytest.approx(float(single), abs=1e-7)
    # DDP averages the ranks' gradients: each rank's clips get the single-process gradient
    grads = torch.zeros_like(logits)
    grads[0::2], grads[1::2] = parts[0]["grad"] / 2, parts[1]["grad"] / 2
    torch.testing.assert_close(grads, whole.grad, atol=1e-7, rtol=1e-5)
    assert float(fidelity_rank_loss(logits[:1], scores[:1])) == 0.0  # one clip alone has no pair


def test_deqa_loss_refuses_a_step_of_one_clip(tiny_models, quality_set, tmp_path):
    from tests.test_training import run_recipe

    root, _ = quality_set
    with pytest.raises(ValueError, match=r"needs at least 2 of them \(per_device_train_batch_size x processes\)"):
        run_recipe(tiny_models("qwen2_5_vl"), "qwen2_5_vl", root, tmp_path / "out",
                   extra=["--loss", "deqa", "--per_device_train_batch_size", "1"])
    assert not (tmp_path / "out").exists()
