"""Loading checkpoints the way their authors and trainers left them: strict weights, level words that
are one token, a LoRA adapter's own processor, public checkpoints scored their authors' way
(OneAlign: 1 frame a second, whole frames, the expected level) and `infer --video` without
`--model`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from qalign_kvq import infer
from qalign_kvq.checkpoint import CheckpointMeta
from qalign_kvq.families.base import MissingWeightsError
from qalign_kvq.loading import load_checkpoint
from qalign_kvq.scorer import Scorer
from tests.test_hub import BASE_ID, _place_in_cache, offline_cache, trained  # noqa: F401 (fixtures)
from tests.test_mplug_owl2_family import _public_layout
from tests.training_support import ROOT, load_finetune, make_quality_set, write_csv

ONE_ALIGN = "q-future/one-align"


def _make_clip(path: Path, seconds: float, size: str = "160x90") -> Path:
    """A real clip of ``seconds`` at 25 fps cut from Big Buck Bunny (looped)."""
    import make_test_videos  # scripts/

    return make_test_videos._ffmpeg(["-stream_loop", "-1", "-i", str(make_test_videos.BUNNY), "-t", str(seconds),
                                     "-r", "25", "-vf", f"scale={size.replace('x', ':')}", *make_test_videos.X264,
                                     "-an"], path)


# ----- strict weights -------------------------------------------------------------------------
def test_a_missing_weight_fails_the_load_and_is_named(tiny_models, tmp_path):
    checkpoint = tmp_path / "broken"
    shutil.copytree(tiny_models("qwen2_vl"), checkpoint)
    weights = load_file(checkpoint / "model.safetensors")
    gone = next(k for k in weights if k.endswith("layers.1.mlp.up_proj.weight"))
    save_file({k: v for k, v in weights.items() if k != gone}, checkpoint / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(MissingWeightsError, match=rf"{checkpoint}: .*1 missing \(.*layers\.1\.mlp\.up_proj\.weight"):
        load_checkpoint(checkpoint, "cpu")
    code = infer.main(["--video", str(tmp_path / "x.mp4"), "--model", str(checkpoint)])
    assert code == 2


def test_a_public_mplug_checkpoint_missing_a_shard_weight_fails(tiny_models, tmp_path):
    import torch as _torch

    checkpoint = tmp_path / "one-align"
    _public_layout(tiny_models("mplug_owl2"), checkpoint)
    shard = checkpoint / "pytorch_model-00002-of-00002.bin"
    state = _torch.load(shard, weights_only=True)
    gone = sorted(state)[0]
    _torch.save({k: v for k, v in state.items() if k != gone}, shard)
    index = json.loads((checkpoint / "pytorch_model.bin.index.json").read_text())
    del index["weight_map"][gone]
    (checkpoint / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(MissingWeightsError, match="missing"):
        load_checkpoint(checkpoint, "cpu")


# ----- level words ------------------------------------------------------------------------------
def test_a_level_word_of_several_tokens_fails_at_load(tiny_models, tmp_path):
    checkpoint = tmp_path / "words"
    shutil.copytree(tiny_models("qwen2_5_vl"), checkpoint)
    CheckpointMeta(family="qwen2_5_vl", level_words=["excellent", "good", "fair", "poor", "dreadful"]).save(checkpoint)
    with pytest.raises(ValueError, match=r"level word 'dreadful' is not one token after 'The quality of the video is'"):
        Scorer.from_pretrained(checkpoint, device="cpu")


def test_a_training_target_other_than_the_scoring_token_fails(tiny_models):
    """A word whose full stop merges into it ("good." one token) would train a token scoring never reads."""
    from transformers import AutoProcessor

    from qalign_kvq.families import get_family

    processor = AutoProcessor.from_pretrained(tiny_models("qwen2_5_vl"))
    tokenizer = processor.tokenizer
    tokenizer.add_tokens([" good."])  # now " good." is one token, " good" another
    with pytest.raises(ValueError, match=r"the level word is not token .* \(the full stop merges with it\)"):
        get_family("qwen2_5_vl").check_level_tokens(processor)


# ----- a LoRA adapter's processor -----------------------------------------------------------------
def test_a_lora_adapter_scores_with_the_processor_saved_beside_it(trained, offline_cache, tmp_path):
    _place_in_cache(trained["base"], BASE_ID)
    adapter = tmp_path / "adapter"
    shutil.copytree(trained["lora"], adapter)
    config = json.loads((adapter / "processor_config.json").read_text())
    config["video_processor"]["image_mean"] = [0.3, 0.3, 0.3]  # not the base's (OpenAI CLIP) mean
    (adapter / "processor_config.json").write_text(json.dumps(config))
    _, processor, _, _ = load_checkpoint(adapter, "cpu")
    assert list(processor.video_processor.image_mean) == [0.3, 0.3, 0.3]
    clip = trained["clips"][0]
    saved = Scorer.from_pretrained(adapter, device="cpu").score_frames(clip)
    original = Scorer.from_pretrained(trained["lora"], device="cpu").score_frames(clip)
    assert saved.probs != pytest.approx(original.probs, abs=1e-6)


# ----- public checkpoints: the authors' protocol ---------------------------------------------------
def test_public_onealign_scores_like_q_aligns_video_scorer(tiny_models, tmp_path):
    checkpoint = tmp_path / "one-align"
    _public_layout(tiny_models("mplug_owl2"), checkpoint)
    clip = _make_clip(tmp_path / "five_seconds.mp4", 5)
    result = Scorer.from_pretrained(checkpoint, device="cpu").score(clip)
    assert result.protocol == "authors"
    assert result.frames == 5 and result.views == ["full"]  # int(125 / 25) frames, one at each second
    assert result.score == result.score_1_5  # the expected level, not mapped to a MOS range
    assert result.view_tokens == [5 * 9]  # the tiny abstractor's 8 queries + 1 per frame
    # any settings can still be chosen by name
    kvq = Scorer.from_pretrained(checkpoint, device="cpu", protocol="kvq").score(clip)
    assert (kvq.protocol, kvq.frames, len(kvq.views)) == ("kvq", 12, 5)


def test_a_recipe_fine_tune_of_it_scores_with_the_kvq_ensemble(tiny_models, tmp_path):
    checkpoint = tmp_path / "one-align"
    _public_layout(tiny_models("mplug_owl2"), checkpoint)
    table = make_quality_set(tmp_path / "videos", sources=("carphone", "bikes_a"))
    rows = [row for source in table.values() for row in source]
    out = load_finetune().main([
        str(ROOT / "recipes" / "configs" / "kvq_onealign_lora.yaml"), "--model_name_or_path", str(checkpoint),
        "--train_csv", str(write_csv(tmp_path / "train.csv", rows)), "--video_root", str(tmp_path / "videos"),
        "--val_csv", "", "--val_pairs_xlsx", "", "--num_frames", "2", "--max_steps", "1",
        "--per_device_train_batch_size", "2", "--output_dir", str(tmp_path / "run"), "--use_cpu", "true",
        "--bf16", "false", "--gradient_checkpointing", "false", "--deepspeed", "", "--save_strategy", "no",
        "--report_to", "none", "--dataloader_num_workers", "0"])
    meta = CheckpointMeta.load(out)
    assert meta.protocol == "kvq" and meta.family_options["prompt_layout"] == "vicuna_v1"
    result = Scorer.from_pretrained(out, device="cpu").score(tmp_path / "videos" / rows[0][0])
    assert (result.protocol, result.frames, len(result.views)) == ("kvq", 12, 5)


# ----- infer --video without --model ----------------------------------------------------------------
def test_infer_video_defaults_to_onealign(tiny_models, offline_cache, tmp_path, capsys):
    _place_in_cache(_public_layout_dir(tiny_models("mplug_owl2"), tmp_path / "src"), ONE_ALIGN)
    clip = _make_clip(tmp_path / "clip.mp4", 3)
    assert infer.main(["--video", str(clip)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["protocol"] == "authors" and record["frames"] == 3 and record["score"] == record["score_1_5"]


def test_infer_video_offline_without_onealign_names_the_download(tmp_path):
    clip = _make_clip(tmp_path / "clip.mp4", 1)
    env = {"HF_HOME": str(tmp_path / "empty_home"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "qalign_kvq.infer", "--video", str(clip)], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 2
    assert "q-future/one-align" in run.stderr and "python -m qalign_kvq.hub download q-future/one-align" in run.stderr


def _public_layout_dir(src: Path, dst: Path) -> Path:
    _public_layout(src, dst)
    return dst


def test_pixel_tensors_only_are_cast(tiny_models):
    from qalign_kvq.families import get_family

    family = get_family("qwen2_5_vl")
    model, processor = family.load(str(tiny_models("qwen2_5_vl")))
    inputs = family.build_inputs(processor, [np.zeros((4, 56, 56, 3), np.uint8)]).to("cpu", torch.bfloat16)
    assert inputs.batch["pixel_values_videos"].dtype == torch.bfloat16
    assert inputs.batch["second_per_grid_ts"].dtype == torch.float32
    assert inputs.batch["input_ids"].dtype == torch.long
