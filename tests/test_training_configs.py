"""Every shipped recipe YAML, DeepSpeed JSON and accelerate config is valid against what reads it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from qalign_kvq.families import get_family
from qalign_kvq.training.arguments import parse_args
from qalign_kvq.training.trainer import deepspeed_optimizer_problem

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))
DS_CONFIGS = sorted((ROOT / "ds_configs").glob("*.json"))
ACCELERATE = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))


def test_the_required_recipes_are_shipped():
    names = {p.stem for p in RECIPES}
    for needed in ("tiny_cpu", "kvq_onealign_lora", "kvq_qwen2_5_vl_7b_lora", "kvq_qwen2_5_vl_7b_full",
                   "kvq_qwen2_5_vl_3b_lora", "kvq_qwen2_5_vl_3b_full", "kvq_qwen3_vl_8b_lora", "kvq_qwen3_vl_8b_full",
                   "kvq_llava_onevision_7b_lora", "kvq_llava_onevision_7b_full", "kvq_internvl3_8b_lora",
                   "kvq_internvl3_8b_full", "kvq_onealign_lora_stage1_ugc", "kvq_onealign_lora_stage2_kvq",
                   "kvq_qwen2_5_vl_7b_lora_ema", "kvq_qwen2_5_vl_7b_lora_homologous", "kvq_qwen2_5_vl_7b_lora_kfold",
                   "kvq_qwen2_5_vl_7b_lora_levels9"):
        assert needed in names
    assert {p.name for p in DS_CONFIGS} >= {"zero2.json", "zero3.json", "zero3_offload.json"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_yaml_is_valid(path, monkeypatch):
    first = path.read_text().splitlines()[0]
    launch = first.split(" -- ", 1)[1] if first.startswith("# python recipes/kfold.py ") else first[2:]
    assert first.startswith("# ") and launch.startswith("accelerate launch ") and first.endswith(
        f"recipes/finetune.py recipes/configs/{path.name}"), "each recipe opens with the command that runs it"
    overrides = [] if torch.cuda.is_available() else ["--bf16", "false"]  # bf16 needs a GPU to validate
    model, data, method, training = parse_args([str(path), *overrides])
    get_family(model.family, **model.family_options)  # the family takes the recipe's options
    config = yaml.safe_load(path.read_text())
    if config.get("deepspeed"):
        assert (ROOT / config["deepspeed"]).is_file()
    if config.get("load_best_model_at_end"):
        assert data.val_csv, "best-checkpoint selection needs a validation set"
    from transformers import TrainingArguments

    monkeypatch.chdir(ROOT)  # relative deepspeed paths resolve from the repository root, as in the commands
    args = TrainingArguments(**training)
    assert args.output_dir == config["output_dir"]


def test_onealign_recipe_has_the_q_align_lora_defaults():
    recipe = str(ROOT / "recipes/configs/kvq_onealign_lora.yaml")
    model, data, method, training = parse_args([recipe, "--bf16", "false"])
    assert (model.family, method.method, method.lora_r, method.lora_alpha, method.lora_dropout) == (
        "mplug_owl2", "lora", 128, 256, 0.05)
    assert model.family_options == {"prompt_layout": "vicuna_v1"}  # Q-Align's training conversation (--version v1)
    assert method.freeze_vision and method.freeze_projector is False  # abstractor trained, ViT frozen
    assert training["num_train_epochs"] == 3 and training["learning_rate"] == 2e-4
    assert data.balance_levels and data.num_frames == 8 and data.crop_ratio == 0.9


@pytest.mark.parametrize("name", ["kvq_onealign_lora", "kvq_onealign_lora_stage1_ugc", "kvq_onealign_lora_stage2_kvq"])
def test_onealign_recipes_train_on_q_aligns_conversation(name):
    model, *_ = parse_args([str(ROOT / f"recipes/configs/{name}.yaml"), "--bf16", "false"])
    assert model.family_options["prompt_layout"] == "vicuna_v1"


@pytest.mark.parametrize("name,budget", [("kvq_qwen2_5_vl_7b_lora", 768 * 28 * 28), ("kvq_qwen2_5_vl_3b_full", 768 * 28 * 28),
                                         ("kvq_qwen3_vl_8b_lora", 768 * 32 * 32)])
def test_qwen_recipes_state_the_frame_budget(name, budget):
    model, *_ = parse_args([str(ROOT / f"recipes/configs/{name}.yaml"), "--bf16", "false"])
    assert model.family_options["frame_pixels"] == budget and model.scoring_protocol == "kvq"
def test_trick_recipes_switch_their_trick_on():
    """One recipe per KVQ training trick (README: "Training tricks"), each the 7B LoRA recipe plus it."""
    from qalign_kvq.levels import check_vocabulary

    def parsed(name):
        return parse_args([str(ROOT / f"recipes/configs/{name}.yaml"), "--bf16", "false"])

    _, _, base, base_training = parsed("kvq_qwen2_5_vl_7b_lora")
    _, _, method, training = parsed("kvq_qwen2_5_vl_7b_lora_ema")
    assert method.ema_decay == 0.99 and method.ema_warmup and base.ema_decay is None
    assert "zero3" not in training["deepspeed"], "the EMA refuses ZeRO-3"
    _, data, method, training = parsed("kvq_qwen2_5_vl_7b_lora_homologous")
    assert (method.loss, method.rank_pairs, data.source_group_size) == ("ce_rank", "homologous", 2)
    assert training["per_device_train_batch_size"] % data.source_group_size == 0
    assert data.train_csv.endswith("_sources.csv")
    assert (training["per_device_train_batch_size"] * training["gradient_accumulation_steps"] ==
            base_training["per_device_train_batch_size"] * base_training["gradient_accumulation_steps"])
    _, data, _, _ = parsed("kvq_qwen2_5_vl_7b_lora_kfold")
    assert data.train_csv.endswith("_sources.csv") and data.val_csv.endswith("_sources.csv")
    first = (ROOT / "recipes/configs/kvq_qwen2_5_vl_7b_lora_kfold.yaml").read_text().splitlines()[0]
    assert first.startswith("# python recipes/kfold.py --folds 5 --include_val -- accelerate launch ")
    _, data, _, _ = parsed("kvq_qwen2_5_vl_7b_lora_levels9")
    words, scores = check_vocabulary(data.level_words, data.level_scores)
    assert len(words) == 9 and scores.tolist() == [5, 4.5, 4, 3.5, 3, 2.5, 2, 1.5, 1]


@pytest.mark.parametrize("name,layout,budget", [
    ("kvq_llava_onevision_7b_lora", "qwen_1_5", 384 * 384), ("kvq_llava_onevision_7b_full", "qwen_1_5", 384 * 384),
    ("kvq_internvl3_8b_lora", "internvl2_5", 448 * 448), ("kvq_internvl3_8b_full", "internvl2_5", 448 * 448)])
def test_llava_onevision_and_internvl_recipes_state_their_conversation_and_budget(name, layout, budget):
    model, _, method, _ = parse_args([str(ROOT / f"recipes/configs/{name}.yaml"), "--bf16", "false"])
    assert model.family_options == {"prompt_layout": layout, "frame_pixels": budget}
    family = get_family(model.family, **model.family_options)
    assert family.prompt_layout == family.authors_layout == family.zero_shot_options["prompt_layout"]
    if method.method == "lora":  # the tower frozen: adapters on the language model only
        assert method.freeze_vision and method.freeze_projector


def test_two_stage_recipe_continues_stage_one():
    _, _, _, stage1 = parse_args([str(ROOT / "recipes/configs/kvq_onealign_lora_stage1_ugc.yaml"), "--bf16", "false"])
    model2, data2, _, stage2 = parse_args([str(ROOT / "recipes/configs/kvq_onealign_lora_stage2_kvq.yaml"),
                                           "--bf16", "false"])
    assert model2.model_name_or_path == stage1["output_dir"]
    assert stage1["num_train_epochs"] == 1 and stage2["num_train_epochs"] == 3
    assert "kvq" in data2.train_csv


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.stem)
def test_deepspeed_config_is_valid(path):
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    config = json.loads(path.read_text())
    stage = config["zero_optimization"]["stage"]
    assert stage == (2 if "zero2" in path.name else 3)
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        assert config[key] == "auto", "the Trainer fills batch sizes"
    ds = HfTrainerDeepSpeedConfig(str(path))
    assert ds.is_zero3() == (stage == 3)
    if "offload" in path.name:
        assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    # the Trainer builds the optimizer, so vision_learning_rate's group is kept (torch AdamW; DeepSpeed's
    # CPU AdamW where the optimizer is offloaded)
    assert "optimizer" not in config
    assert deepspeed_optimizer_problem(config, 1e-5, "adamw_torch_fused") is None


def test_deepspeed_settings_that_cannot_be_honoured_are_refused():
    config = json.loads((ROOT / "ds_configs" / "zero3_offload.json").read_text())
    with_block = {**config, "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}
    assert "would train the vision tower at learning_rate" in deepspeed_optimizer_problem(with_block, 1e-5,
                                                                                       "adamw_torch")
    assert deepspeed_optimizer_problem(with_block, None, "adamw_torch") is None  # one learning rate: DeepSpeed may build it
    assert "optim adafactor cannot be honoured" in deepspeed_optimizer_problem(config, None, "adafactor")
    zero2 = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    assert deepspeed_optimizer_problem(zero2, 1e-5, "adafactor") is None  # not offloaded: the Trainer's optimizer


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.stem)
def test_accelerate_configs(path):
    config = yaml.safe_load(path.read_text())
    assert config["num_processes"] == 2
    if config["distributed_type"] == "DEEPSPEED":
        assert (ROOT / config["deepspeed_config"]["deepspeed_config_file"]).is_file()
        assert "mixed_precision" not in config, "the DeepSpeed JSON decides the precision"
