"""The offline tiny-model builder: deterministic, loadable with the Auto classes, CLI layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qalign_kvq.levels import LEVEL_WORDS
from tests.fixtures_models import load_builder

torch.set_num_threads(1)
builder = load_builder()
NATIVE = [f for f in builder.FAMILIES if f != "mplug_owl2"]


@pytest.mark.parametrize("family", builder.FAMILIES)
def test_builder_is_deterministic(family, tmp_path, tiny_models):
    again = builder.build_tiny_model(family, tmp_path)
    first = tiny_models(family)
    assert again == tmp_path / family
    a, b = load_file(first / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and len(a) > 10
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (first / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("family", NATIVE)
def test_tiny_model_loads_with_auto_classes(family, tiny_models):
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    path = tiny_models(family)
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    text = config.get_text_config()
    assert (text.hidden_size, text.num_hidden_layers) == (64, 2)
    assert text.vocab_size == len(processor.tokenizer)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert processor.tokenizer.chat_template
    for word in LEVEL_WORDS:
        assert len(processor.tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1


def test_cli_builds_one_directory_per_family(tmp_path, capsys):
    assert builder.main(["--out", str(tmp_path), "--family", "qwen2_vl", "--family", "internvl"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["internvl", "qwen2_vl"]
    for family in ("qwen2_vl", "internvl"):
        assert (tmp_path / family / "model.safetensors").is_file()
        assert json.loads((tmp_path / family / "config.json").read_text())["model_type"] == family
    assert "qwen2_vl: " in capsys.readouterr().out


def test_mplug_owl2_builder_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(builder, "MPLUG_OWL2_BUILDER", tmp_path / "absent.py")
    with pytest.raises(FileNotFoundError, match=r"absent\.py: missing"):
        builder.build_tiny_model("mplug_owl2", tmp_path)


def test_unknown_family_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown family 'nope'"):
        builder.build_tiny_model("nope", tmp_path)
    with pytest.raises(SystemExit):
        builder.main(["--out", str(tmp_path), "--family", "nope"])


@pytest.mark.parametrize("tiny_model_dir", ["qwen2_vl", "internvl"], indirect=True)
def test_tiny_model_dir_fixture_gives_the_family_directory(tiny_model_dir, tiny_models):
    assert tiny_model_dir == tiny_models(tiny_model_dir.name)  # built once per session
    assert json.loads((tiny_model_dir / "config.json").read_text())["model_type"] == tiny_model_dir.name


def test_frame_tokens_option_raises_the_qwen_processor_resolution(tmp_path, tiny_models):
    from transformers import AutoProcessor

    assert builder.main(["--out", str(tmp_path), "--family", "qwen2_5_vl", "--frame-tokens", "64"]) == 0
    high, default = tmp_path / "qwen2_5_vl", tiny_models("qwen2_5_vl")
    # the weights are the default model's; only the processor's pixel budget changes
    a, b = load_file(default / "model.safetensors"), load_file(high / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    frames = np.zeros((4, 640, 360, 3), dtype=np.uint8)  # 4 portrait frames (T, H, W, C)
    tokens = {}
    for name, path in (("default", default), ("high", high)):
        out = AutoProcessor.from_pretrained(path).video_processor(videos=[frames], return_tensors="pt")
        _, h, w = out["video_grid_thw"][0].tolist()
        tokens[name] = (h * w // 4, h * 14, w * 14)  # merged tokens per frame, pixels seen
    assert tokens["default"][0] <= 16 and 48 <= tokens["high"][0] <= 64
    assert tokens["high"][1] >= 2 * tokens["default"][1]
    with pytest.raises(ValueError, match="Qwen families"):
        builder.build_tiny_model("internvl", tmp_path, frame_tokens=64)
    with pytest.raises(ValueError, match="at least 4"):
        builder.build_tiny_model("qwen2_5_vl", tmp_path, frame_tokens=2)


def test_vision_init_std_option_scales_only_the_vision_tower(tmp_path, tiny_models):
    assert builder.main(["--out", str(tmp_path), "--family", "qwen2_5_vl", "--vision-init-std", "0.2"]) == 0
    default, scaled = tiny_models("qwen2_5_vl"), tmp_path / "qwen2_5_vl"
    config = json.loads((scaled / "config.json").read_text())
    assert config["vision_config"]["initializer_range"] == 0.2
    a, b = load_file(default / "model.safetensors"), load_file(scaled / "model.safetensors")
    assert a.keys() == b.keys()
    # random vision matrices are about 10x larger (std 0.2 vs 0.02); nothing else is drawn differently
    ratio = b["visual.blocks.0.mlp.up_proj.weight"].std() / a["visual.blocks.0.mlp.up_proj.weight"].std()
    assert 8 < float(ratio) < 12
    assert torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    with pytest.raises(ValueError, match="Qwen families"):
        builder.build_tiny_model("internvl", tmp_path, vision_init_std=0.2)
    with pytest.raises(ValueError, match="positive"):
        builder.build_tiny_model("qwen2_5_vl", tmp_path, vision_init_std=0.0)
