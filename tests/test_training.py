"""Fine-tuning on CPU with the tiny models: every family with LoRA and full fine-tuning (first losses
pinned), trained vs frozen parameters, resume equivalence, the saved output scoring a video, and
the missing-video report before training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from qalign_kvq.annotations import MissingVideosError
from qalign_kvq.families import FAMILY_NAMES
from tests.training_support import ROOT, load_finetune, quality_set, write_csv  # noqa: F401 (fixture)

TINY_RECIPE = str(ROOT / "recipes" / "configs" / "tiny_cpu.yaml")
SMALL = [("bunny_a/qp18.mp4", 4.6), ("bikes_a/qp46.mp4", 1.4), ("carphone/qp30.mp4", 3.8), ("bikes_b/qp38.mp4", 2.6)]

# First three losses (seed 0, batch 2, lr 1e-3, no warmup, the FREEZE switches below) of each family's
# tiny model on SMALL.
# The first step is the same for LoRA and full (LoRA starts as the identity); later ones differ.
# Qwen2.5-VL and Qwen3-VL read the clips' real frame times (Qwen2-VL has no notion of time: its pins
# did not move); mPLUG-Owl2 trains on Q-Align's conv_vicuna_v1 conversation. Without the times and
# with the old image_first layout the previous pins (qwen2_5_vl 5.893169.., qwen3_vl 5.925671..,
# mplug_owl2 6.375139.., deqa 2.009851..) are reproduced exactly.
PINNED = {
    "qwen2_vl": {"lora": [5.872872, 5.817077, 5.820418], "full": [5.872872, 5.598984, 5.433332]},
    "qwen2_5_vl": {"lora": [5.893201, 5.895029, 5.853207], "full": [5.893201, 5.608734, 5.407019]},
    "qwen3_vl": {"lora": [5.924581, 5.842834, 5.801988], "full": [5.924581, 5.568189, 5.363628]},
    "llava_onevision": {"lora": [5.870292, 5.889225, 5.853875], "full": [5.870292, 5.659634, 5.455176]},
    "internvl": {"lora": [6.005028, 5.987535, 5.9469], "full": [6.005028, 5.767851, 5.599277]},
    "mplug_owl2": {"lora": [6.188993, 6.049932, 5.915521], "full": [6.188993, 5.230554, 4.412539]},
}


class Recorder(TrainerCallback):
    """Losses as logged, and every parameter at the start and the end of training."""

    def __init__(self, stop_at: int | None = None):
        self.losses, self.before, self.after, self.stop_at = [], {}, {}, stop_at

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop_at is not None and state.global_step >= self.stop_at:
            control.should_training_stop = True  # an interruption right after a checkpoint

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.after = {n: p.detach().clone() for n, p in model.named_parameters()}


def run_recipe(model_dir, family, root, out, rows=SMALL, extra=(), callbacks=()):
    csv = write_csv(out.parent / f"{out.name}_train.csv", rows)
    argv = [TINY_RECIPE, "--model_name_or_path", str(model_dir), "--family", family, "--train_csv", str(csv),
            "--video_root", str(root), "--val_csv", "", "--output_dir", str(out), "--max_steps", "3",
            "--per_device_train_batch_size", "2", "--warmup_steps", "0", "--learning_rate", "1e-3",
            "--logging_steps", "1", "--save_strategy", "no", *extra]
    return load_finetune().main(argv, callbacks=list(callbacks))


FREEZE = {"lora": ["--freeze_vision", "true", "--freeze_projector", "true"],
          "full": ["--freeze_vision", "true", "--freeze_projector", "false"]}


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_each_family_trains_with_pinned_losses_and_respects_freezing(family, method, tiny_models, quality_set,
                                                                     tmp_path):
    from qalign_kvq.families import get_family
    from qalign_kvq.training.model import in_group

    root, _ = quality_set
    rec = Recorder()
    run_recipe(tiny_models(family), family, root, tmp_path / "out", extra=["--method", method, *FREEZE[method]],
               callbacks=[rec])
    np.testing.assert_allclose(rec.losses, PINNED[family][method], rtol=1e-4)

    changed = {n for n in rec.before if not torch.equal(rec.before[n], rec.after[n])}
    assert rec.trainable and changed <= rec.trainable, "no frozen parameter moves"
    # nearly every trained tensor moves (a few can get no gradient, e.g. mPLUG-Owl2's visual-token
    # branch of the last layer's norm, whose outputs carry no label)
    assert len(changed) >= 0.9 * len(rec.trainable)
    fam = get_family(family)
    vision = {n for n in rec.before if in_group(n, fam.vision_prefixes)}
    assert vision and not vision & changed, "the vision tower is frozen"
    if method == "lora":
        assert all("lora_" in n for n in changed)
    else:
        projector = {n for n in rec.before if in_group(n, fam.projector_prefixes)}
        assert projector and projector <= changed, "the projector trains"
        assert any(in_group(n, fam.language_prefixes) for n in changed)


def _weights(out):
    name = "adapter_model.safetensors" if (out / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(str(out / name))


@pytest.mark.parametrize("method", ["full", "lora"])
def test_interrupted_and_resumed_run_ends_with_the_same_weights(method, tiny_models, quality_set, tmp_path):
    root, _ = quality_set
    model = tiny_models("qwen2_5_vl")
    extra = ["--method", method, "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "3",
             "--lr_scheduler_type", "cosine"]
    whole = Recorder()
    run_recipe(model, "qwen2_5_vl", root, tmp_path / "whole", extra=extra, callbacks=[whole])

    stopped = Recorder(stop_at=3)
    run_recipe(model, "qwen2_5_vl", root, tmp_path / "parts", extra=extra, callbacks=[stopped])
    assert (tmp_path / "parts" / "checkpoint-3").is_dir() and not (tmp_path / "parts" / "checkpoint-6").exists()
    resumed = Recorder()
    run_recipe(model, "qwen2_5_vl", root, tmp_path / "parts", extra=[*extra, "--resume_from_checkpoint", "last"],
               callbacks=[resumed])

    assert len(whole.losses) == 6 and len(stopped.losses) == 3 and len(resumed.losses) == 3
    np.testing.assert_allclose(stopped.losses + resumed.losses, whole.losses, rtol=1e-5)
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "parts")
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    # and the run really moved away from where the checkpoint started
    assert not all(torch.equal(a[k], load_file(str(tmp_path / "parts" / "checkpoint-3" / next(
        p.name for p in (tmp_path / "parts" / "checkpoint-3").glob("*.safetensors"))))[k]) for k in a)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_saved_output_loads_for_scoring(method, tiny_models, quality_set, tmp_path):
    from qalign_kvq.checkpoint import CheckpointMeta
    from qalign_kvq.loading import load_checkpoint
    from qalign_kvq.modeling import level_probs
    from qalign_kvq.video import read_frames, uniform_indices

    root, _ = quality_set
    model_dir = tiny_models("qwen2_5_vl")
    out = run_recipe(model_dir, "qwen2_5_vl", root, tmp_path / "out", extra=["--method", method])
    meta = CheckpointMeta.load(out)
    assert (meta.family, meta.mos_low, meta.mos_high, meta.train_frames) == ("qwen2_5_vl", 1.4, 4.6, 4)
    assert meta.base_model == (str(model_dir) if method == "lora" else None)
    assert (out / ("adapter_model.safetensors" if method == "lora" else "model.safetensors")).is_file()
    assert (out / "processor_config.json").is_file()

    model, processor, family, meta = load_checkpoint(out)
    clip = read_frames(root / "bunny_b" / "qp18.mp4", uniform_indices(8, 4))
    inputs = family.build_inputs(processor, [clip], meta.question)
    probs = level_probs(model, inputs, family.level_token_ids(processor.tokenizer))
    assert probs.shape == (1, 5)
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-5)
    # the trained weights are the ones scored: differ from the untrained model's probabilities
    base, base_proc = family.load(str(model_dir))
    base_probs = level_probs(base.eval(), family.build_inputs(base_proc, [clip], meta.question),
                             family.level_token_ids(base_proc.tokenizer))
    assert not torch.allclose(probs, base_probs)


def test_deqa_loss_pinned(tiny_models, quality_set, tmp_path):
    root, _ = quality_set
    rec = Recorder()
    run_recipe(tiny_models("qwen2_5_vl"), "qwen2_5_vl", root, tmp_path / "out",
               extra=["--method", "full", "--loss", "deqa", "--ce_weight", "0.05"], callbacks=[rec])
    np.testing.assert_allclose(rec.losses, [2.009575, 1.816449, 1.919146], rtol=1e-4)


def test_missing_videos_are_reported_before_training(tiny_models, quality_set, tmp_path):
    root, _ = quality_set
    rows = SMALL + [("gone/a.mp4", 3.0), ("gone/b.mp4", 2.0)]
    with pytest.raises(MissingVideosError) as info:
        run_recipe(tiny_models("qwen2_5_vl"), "qwen2_5_vl", root, tmp_path / "out", rows=rows)
    assert [name for name, _ in info.value.problems] == ["gone/a.mp4", "gone/b.mp4"]
    assert "2 rows have a missing or unreadable video" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_fidelity_and_kl_losses():
    from qalign_kvq.training.trainer import fidelity_rank_loss, soft_label_kl

    # Two clips with expected scores 5 and 1: P(first better) = Phi(4 / sqrt 2) = 0.9976611.
    # Fidelity loss 1 - sqrt(t P + eps) - sqrt((1 - t)(1 - P) + eps), eps = 1e-8.
    sure = torch.tensor([[30.0, 0, 0, 0, 0], [0, 0, 0, 0, 30.0]])
    p = 0.9976611
    agree = float(fidelity_rank_loss(sure, torch.tensor([4.0, 2.0])))  # t = 1
    assert agree == pytest.approx(1 - np.sqrt(p) - 1e-4, abs=2e-6)
    wrong = float(fidelity_rank_loss(sure, torch.tensor([2.0, 4.0])))  # t = 0
    assert wrong == pytest.approx(1 - 1e-4 - np.sqrt(1 - p), abs=2e-6)
    # A tie in truth: target 0.5; equal predictions give 1 - 2 sqrt(0.25) = 0
    assert float(fidelity_rank_loss(torch.zeros(2, 5), torch.tensor([3.0, 3.0]))) == pytest.approx(0, abs=1e-4)
    assert float(fidelity_rank_loss(sure[:1], torch.tensor([3.0]))) == 0.0  # no pairs
    target = torch.tensor([[0.1, 0.2, 0.4, 0.2, 0.1]])
    assert float(soft_label_kl(target.log(), target)) == pytest.approx(0.0, abs=1e-6)
    assert float(soft_label_kl(torch.zeros(1, 5), target)) == pytest.approx(
        float((target * (target / 0.2).log()).sum()), rel=1e-5)


def test_yaml_is_overridden_by_flags_and_unknown_keys_fail(tmp_path):
    from qalign_kvq.training.arguments import parse_args

    model, data, method, training = parse_args([TINY_RECIPE, "--learning_rate", "5e-4", "--method", "lora",
                                                "--lora_target_modules", "q_proj", "v_proj"])
    assert training["learning_rate"] == 5e-4 and method.method == "lora"
    assert method.lora_target_modules == ["q_proj", "v_proj"]
    assert data.num_frames == 4 and model.family == "qwen2_5_vl"
    with pytest.raises(ValueError, match="unknown arguments"):
        parse_args([TINY_RECIPE, "--no_such_key", "1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({"model_name_or_path": "x", "train_csv": "a", "video_root": "b", "typo_key": 1}))
    with pytest.raises(ValueError, match="bad.yaml: unknown arguments"):
        parse_args([str(bad)])
    with pytest.raises(ValueError, match="method must be lora or full"):
        parse_args([TINY_RECIPE, "--method", "qlora"])


def test_vision_learning_rate_applies_to_the_vision_side(tiny_models, quality_set, tmp_path):
    from qalign_kvq.families import get_family
    from qalign_kvq.training.model import in_group

    root, _ = quality_set
    rec = Recorder()
    run_recipe(tiny_models("qwen2_5_vl"), "qwen2_5_vl", root, tmp_path / "out", callbacks=[rec],
               extra=["--method", "full", "--freeze_vision", "false", "--freeze_projector", "false",
                      "--vision_learning_rate", "0"])
    fam = get_family("qwen2_5_vl")
    side = tuple(fam.vision_prefixes) + tuple(fam.projector_prefixes)
    vision = {n for n in rec.before if in_group(n, side)}
    assert vision <= rec.trainable, "the vision side is trainable..."
    assert all(torch.equal(rec.before[n], rec.after[n]) for n in vision), "...but its learning rate is 0"
    assert any(not torch.equal(rec.before[n], rec.after[n]) for n in rec.before if n not in vision)


def test_two_stage_training_continues_the_stage_one_adapter(tiny_models, quality_set, tmp_path):
    """Stage 1 trains a LoRA adapter; stage 2 starts from that output directory, keeps training the
    same adapter on another set and records the original base model for scoring."""
    from qalign_kvq.checkpoint import CheckpointMeta
    from qalign_kvq.loading import load_checkpoint

    root, _ = quality_set
    base = tiny_models("qwen2_5_vl")
    stage1 = run_recipe(base, "qwen2_5_vl", root, tmp_path / "stage1", extra=["--method", "lora", "--lora_r", "4"])
    rec = Recorder()
    other = [("bunny_b/qp18.mp4", 4.5), ("bikes_c/qp46.mp4", 1.5), ("bunny_b/qp38.mp4", 2.5), ("bikes_c/qp30.mp4", 3.5)]
    stage2 = run_recipe(stage1, "qwen2_5_vl", root, tmp_path / "stage2", rows=other,
                        extra=["--method", "lora", "--lora_r", "16"], callbacks=[rec])
    first = load_file(str(stage1 / "adapter_model.safetensors"))
    second = load_file(str(stage2 / "adapter_model.safetensors"))
    assert first.keys() == second.keys()
    assert first[next(iter(first))].shape[0] == 4, "stage 2 keeps the stage-1 adapter (rank 4, not 16)"
    assert any(not torch.equal(first[k], second[k]) for k in first)
    assert all("lora_" in n or "modules_to_save" in n for n in rec.trainable), sorted(rec.trainable)
    assert len(rec.losses) == 3
    meta = CheckpointMeta.load(stage2)
    assert meta.base_model == str(base) and (meta.mos_low, meta.mos_high) == (1.5, 4.5)
    model, processor, family, _ = load_checkpoint(stage2)
    assert family.name == "qwen2_5_vl"
