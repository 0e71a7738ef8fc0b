"""recipes/finetune.py and the Hub: every run writes its model card; ``push_to_hub: true`` uploads
the saved output through ``qalign_kvq.hub.push_to_hub`` (the Trainer never pushes); a missing repo
id or token stops the run before training. Only the Hub client's network calls are replaced
(``FakeHub`` of tests/test_hub.py)."""

from __future__ import annotations

import re

import pytest
import torch
from huggingface_hub import ModelCard, constants
from PIL import Image
from transformers import TrainerCallback

from qalign_kvq.checkpoint import META_FILE, CheckpointMeta
from qalign_kvq.hub import HubError, MissingTokenError
from qalign_kvq.model_card import GENERATED_MARKER
from qalign_kvq.plots import CURVES_FILE, SCATTER_FILE
from tests.test_hub import FakeHub, _files
from tests.training_support import ROOT, load_finetune, quality_set, write_csv  # noqa: F401 (fixture)


def _picture_links(text: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)


ROWS = [("bunny_a/qp18.mp4", 4.6), ("bikes_a/qp46.mp4", 1.4), ("carphone/qp30.mp4", 3.8), ("bikes_b/qp38.mp4", 2.6)]


class TrainerPushFlag(TrainerCallback):
    """Records the Trainer's own ``push_to_hub`` setting."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.push_to_hub = args.push_to_hub


def _run(model_dir, root, tmp_path, extra=(), callbacks=()):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model_name_or_path: {model_dir}\nfamily: qwen2_5_vl\n"
        f"train_csv: {write_csv(tmp_path / 'train.csv', ROWS)}\nvideo_root: {root}\n"
        f"output_dir: {tmp_path / 'run'}\nmethod: lora\nnum_frames: 2\nmax_steps: 1\n"
        "per_device_train_batch_size: 2\nuse_cpu: true\nsave_strategy: 'no'\nreport_to: none\nseed: 0\n"
        "check_videos: exists\n" + "".join(f"{line}\n" for line in extra))
    return load_finetune().main([str(recipe)], callbacks=list(callbacks))


@pytest.fixture
def no_token(tmp_path, monkeypatch):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


def test_run_writes_its_model_card_and_pushes_nothing(tiny_models, quality_set, tmp_path, monkeypatch, no_token):
    torch.set_num_threads(2)
    fake = FakeHub(tmp_path / "remote")
    fake.install(monkeypatch)
    out = _run(tiny_models("qwen2_5_vl"), quality_set[0], tmp_path)
    card = ModelCard.load(out / "README.md")  # peft's placeholder card is replaced
    assert GENERATED_MARKER in card.text and card.data.library_name == "qalign-kvq"
    assert card.data.model_name == str(out) and f'Scorer.from_pretrained("{out}")' in card.text
    assert "lora" in card.data.tags
    assert fake.calls == []
    with Image.open(out / CURVES_FILE) as curves:  # the run's curves (no validation set: no scatter)
        assert curves.format == "PNG" and curves.size == (660, 480)
    assert not (out / SCATTER_FILE).exists()
    assert _picture_links(card.text) == [CURVES_FILE]


def test_push_to_hub_uploads_the_saved_output_with_its_card(tiny_models, quality_set, tmp_path, monkeypatch,
                                                            no_token):
    torch.set_num_threads(2)
    fake = FakeHub(tmp_path / "remote")
    fake.install(monkeypatch)
    flag = TrainerPushFlag()
    val_csv = write_csv(tmp_path / "val.csv", ROWS)
    out = _run(tiny_models("qwen2_5_vl"), quality_set[0], tmp_path, callbacks=[flag], extra=[
        "push_to_hub: true", "hub_model_id: org/kvq-tiny", "hub_private_repo: true", "hub_token: hf_recipe_token",
        f"val_csv: {val_csv}", "eval_num_frames: 2"])
    assert flag.push_to_hub is False  # the Trainer's own push (its own card, every checkpoint) stays off
    assert [c[0] for c in fake.calls] == ["create_repo", "upload_folder"]
    assert fake.calls[0][1] == "org/kvq-tiny"
    assert fake.calls[0][2]["private"] is True and fake.calls[0][2]["token"] == "hf_recipe_token"
    sent = _files(tmp_path / "remote")
    local = _files(out)
    assert {"adapter_model.safetensors", "adapter_config.json", META_FILE, "README.md"} <= set(sent)
    assert all(sent[name] == local[name] for name in sent)  # what was saved, after the card was written
    assert CheckpointMeta.load(tmp_path / "remote").family == "qwen2_5_vl"
    card = ModelCard(sent["README.md"].decode())
    assert card.data.model_name == "org/kvq-tiny" and 'Scorer.from_pretrained("org/kvq-tiny")' in card.text
    # the card shows the run's curves and the validation scatter, and both files went with it
    assert _picture_links(card.text) == [CURVES_FILE, SCATTER_FILE]
    assert all(sent[name][:8] == b"\x89PNG\r\n\x1a\n" for name in (CURVES_FILE, SCATTER_FILE))
    with Image.open(out / CURVES_FILE) as curves:  # loss panel + validation panel
        assert curves.size == (1320, 480)


def test_push_settings_are_checked_before_training(tmp_path, monkeypatch, no_token):
    """No model or video is needed: the run stops while reading its arguments."""
    finetune = load_finetune()
    base = ["--model_name_or_path", str(tmp_path / "never-loaded"), "--train_csv", str(tmp_path / "none.csv"),
            "--video_root", str(tmp_path), "--output_dir", str(tmp_path / "run"), "--push_to_hub", "true"]
    with pytest.raises(HubError, match="push_to_hub: true needs hub_model_id"):
        finetune.main(base)
    with pytest.raises(HubError, match="hub_model_id 'a/b/c': not a valid Hub repo id"):
        finetune.main([*base, "--hub_model_id", "a/b/c"])
    with pytest.raises(MissingTokenError, match="push_to_hub to org/x needs a Hugging Face token"):
        finetune.main([*base, "--hub_model_id", "org/x"])
    assert not (tmp_path / "run").exists()
