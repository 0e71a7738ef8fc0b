"""The Python API: ``from qalign_kvq import Scorer``; checkpoint kinds that load; inputs it takes."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from qalign_kvq.checkpoint import CheckpointMeta
from qalign_kvq.loading import load_checkpoint
from qalign_kvq.video import VideoError, probe, read_frames, uniform_indices

torch.set_num_threads(2)
FAMILY = "qwen2_vl"


@pytest.fixture(scope="module")
def checkpoint(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / FAMILY
    shutil.copytree(tiny_models(FAMILY), out)
    CheckpointMeta(family=FAMILY, mos_low=1.31, mos_high=4.5).save(out)
    return out


@pytest.fixture(scope="module")
def scorer(checkpoint):
    from qalign_kvq import Scorer

    return Scorer.from_pretrained(str(checkpoint), device="cpu", frames=8)


def test_score_file_many_frames(scorer, sample_video, video_corpus):
    result = scorer.score(sample_video)
    record = result.to_record()
    assert record["file"] == str(sample_video)
    assert set(record) >= {"file", "score", "score_1_5", "probs", "uncertainty", "views", "timing"}
    assert result.frames == 8 and 1.0 <= result.score_1_5 <= 5.0
    assert 1.31 <= result.score <= 4.5 + 1e-9
    assert sum(result.probs.values()) == pytest.approx(1.0, abs=1e-5)
    assert set(result.timing) >= {"decode_s", "processor_s", "model_s", "total_s"}
    # frames in memory give the same score as the file
    clip = read_frames(sample_video, uniform_indices(probe(sample_video).num_frames, 8))
    assert scorer.score_frames(clip).score == pytest.approx(result.score, abs=1e-6)
    others = [video_corpus["portrait"], video_corpus["sandwich_blur"]]
    many = list(scorer.score_many([sample_video, *others]))
    assert [r.file for r in many] == [str(p) for p in [sample_video, *others]]
    assert many[0].score == pytest.approx(result.score, abs=1e-6)
    assert len({round(r.score, 6) for r in many}) == 3


def test_score_image_array_pil_and_file(scorer, tmp_path, sample_video):
    frame = read_frames(sample_video, [0])[0]
    path = tmp_path / "frame.png"
    Image.fromarray(frame).save(path)
    a = scorer.score_image(frame)
    b = scorer.score_image(Image.fromarray(frame))
    c = scorer.score_image(path)
    assert a.frames == 1 and c.file == str(path)
    assert a.score == pytest.approx(b.score, abs=1e-6) == pytest.approx(c.score, abs=1e-6)


def test_bad_inputs_raise_clear_errors(scorer, broken_videos):
    with pytest.raises(VideoError) as info:
        scorer.score(broken_videos["zero_bytes"])
    assert str(broken_videos["zero_bytes"]) in str(info.value)
    with pytest.raises(ValueError, match="uint8"):
        scorer.score_frames(np.zeros((2, 32, 32, 3), dtype=np.float32))


def test_plain_transformers_dir_loads_as_a_public_checkpoint(tiny_models, caplog):
    with caplog.at_level(logging.INFO, logger="qalign_kvq.loading"):
        _, _, family, meta = load_checkpoint(tiny_models(FAMILY), "cpu")
    assert family.name == FAMILY and (meta.mos_low, meta.mos_high) == (1.0, 5.0)
    assert meta.protocol == "authors"  # scored the way its authors score
    assert "qalign_kvq.json" in caplog.text


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_checkpoint(tmp_path / "nowhere")


def test_peft_adapter_checkpoint_scores_like_the_merged_model(tiny_models, tmp_path, sample_video):
    from peft import LoraConfig, get_peft_model

    from qalign_kvq import Scorer

    base = tiny_models(FAMILY)
    model, _, _, _ = load_checkpoint(base, "cpu")
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # non-zero B so the adapter changes the scores
            torch.nn.init.normal_(param, std=0.5)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    CheckpointMeta(family=FAMILY, base_model=str(base)).save(adapter)
    merged = tmp_path / "merged"
    peft_model.merge_and_unload().save_pretrained(merged)
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        if (base / name).is_file():
            shutil.copy(base / name, merged / name)
    CheckpointMeta(family=FAMILY).save(merged)
    with_adapter = Scorer.from_pretrained(adapter, device="cpu", frames=4).score(sample_video)
    full = Scorer.from_pretrained(merged, device="cpu", frames=4).score(sample_video)
    plain = Scorer.from_pretrained(base, device="cpu", frames=4).score(sample_video)
    assert with_adapter.score == pytest.approx(full.score, abs=1e-5)
    assert abs(with_adapter.score - plain.score) > 1e-4
