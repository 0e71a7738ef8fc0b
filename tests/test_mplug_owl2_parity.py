"""Parity of the mPLUG-Owl2 port with the original Q-Align code (fixtures/mplug_owl2_tiny).

The fixture's inputs use the original layout (one ``-200`` per image slot, expanded inside the
model); the port takes ``num_image_tokens`` placeholders per image or frame in ``input_ids``, so each
case is converted to that layout first. Tolerance 1e-5 (the README shows 1e-4 hides real mistakes).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qalign_kvq.families.mplug_owl2 import MPLUGOwl2ForConditionalGeneration, MPLUGOwl2ImageProcessor
from qalign_kvq.families.mplug_owl2.modeling import AbstractorAttention

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "mplug_owl2_tiny"
ORIGINAL_IMAGE_INDEX = -200
ATOL = 1e-5


def _fixture_path() -> Path:
    for candidate in (FIXTURE, Path("/work/shared/fixtures/mplug_owl2_tiny")):
        if (candidate / "model.safetensors").is_file():
            return candidate
    raise FileNotFoundError(f"the mPLUG-Owl2 parity fixture is missing: {FIXTURE}")


@pytest.fixture(scope="module")
def fixture_dir() -> Path:
    torch.set_num_threads(1)
    return _fixture_path()


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def port(request, fixture_dir):
    model, info = MPLUGOwl2ForConditionalGeneration.from_pretrained(
        fixture_dir, attn_implementation=request.param, output_loading_info=True
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    return model.eval()


def to_port_layout(case: dict, config) -> dict[str, torch.Tensor]:
    """The fixture's ids (one -200 per slot, frames split evenly over rows) -> expanded placeholders;
    ``labels`` follow the original (pad -> -100, visual tokens -> -100)."""
    ids = case["input_ids"]
    pixels = case.get("pixel_values")
    frames_per_row = 0 if pixels is None else pixels.shape[0] // ids.shape[0]
    n = frames_per_row * config.num_image_tokens
    rows, masks, labels = [], [], []
    for row in ids.tolist():
        out, mask, label = [], [], []
        for token in row:
            if token == ORIGINAL_IMAGE_INDEX:
                out += [config.image_token_index] * n
                mask += [1] * n
                label += [-100] * n
            else:
                out.append(token)
                mask.append(int(token != 0))
                label.append(token if token != 0 else -100)
        rows.append(out), masks.append(mask), labels.append(label)
    batch = {"input_ids": torch.tensor(rows)}
    if "attention_mask" in case:
        batch["attention_mask"] = torch.tensor(masks)
    if pixels is not None:
        batch["pixel_values"] = torch.from_numpy(pixels)
    return batch | {"labels": torch.tensor(labels)}


def _load_case(fixture_dir: Path, name: str) -> dict[str, np.ndarray]:
    with np.load(fixture_dir / f"case_{name}.npz") as data:
        return dict(data)


def _close(actual, expected, what: str) -> None:
    actual = actual.detach().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    np.testing.assert_allclose(actual, expected, atol=ATOL, rtol=ATOL, err_msg=what)


@pytest.mark.parametrize("name", ["A", "B", "C", "D"])
def test_logits_and_intermediates_match_original(port, fixture_dir, name):
    case = _load_case(fixture_dir, name)
    batch = to_port_layout(case, port.config)
    labels = batch.pop("labels")
    with torch.no_grad():
        out = port(**batch, output_hidden_states=True)
        embeds, modality = port.model.embed(batch["input_ids"], batch.get("pixel_values"))
    _close(out.logits, case["logits"], "logits")
    _close(torch.stack(out.hidden_states), case["text_hidden_states"], "text_hidden_states")
    np.testing.assert_array_equal(modality.numpy(), case["modality_indicators"])
    if "merged_attention_mask" in case:
        np.testing.assert_array_equal(batch["attention_mask"].numpy(), case["merged_attention_mask"])
    if "pixel_values" in case:
        pixels = batch["pixel_values"]
        with torch.no_grad():
            vision = port.model.vision_model(pixels)
            _close(port.model.vision_model.embeddings(pixels), case["vision_embeddings"], "vision_embeddings")
            _close(vision, case["vision_last_hidden_state"], "vision_last_hidden_state")
            _close(port.model.visual_abstractor.queries(vision), case["abstractor_hidden_pre_fc"], "abstractor")
            _close(port.model.get_image_features(pixels), case["visual_tokens"], "visual_tokens")
        _close(embeds, case["inputs_embeds"], "inputs_embeds")
        # Q-Align's scoring on the last real position with the tiny level ids.
        level_ids = list(json.loads((fixture_dir / "cases.json").read_text())["tiny_level_ids"].values())
        last = case.get("last_real_index", np.full(len(case["logits"]), -1))
        level_logits = out.logits[torch.arange(len(last)), torch.from_numpy(last)][:, level_ids]
        probs = torch.softmax(level_logits, dim=-1)
        _close(level_logits, case["level_logits"], "level_logits")
        _close(probs @ torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0]), case["score_1_5"], "score_1_5")
    if name == "C":
        with torch.no_grad():
            loss = port(**batch, labels=labels).loss
        _close(loss.reshape(1), case["loss_with_labels"], "loss_with_labels")


def test_left_padding_matches_unpadded_rows(fixture_dir):
    """Left padding (what scoring uses) gives each row the logits it has alone (the original's
    merge only handled right padding)."""
    model = MPLUGOwl2ForConditionalGeneration.from_pretrained(fixture_dir, attn_implementation="eager").eval()
    case = _load_case(fixture_dir, "C")
    batch = to_port_layout(case, model.config)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pad = int((mask[0] == 0).sum())
    left_ids = torch.stack([torch.cat([ids[0, -pad:], ids[0, :-pad]]), ids[1]])
    left_mask = torch.stack([torch.cat([mask[0, -pad:], mask[0, :-pad]]), mask[1]])
    with torch.no_grad():
        out = model(input_ids=left_ids, attention_mask=left_mask, pixel_values=batch["pixel_values"])
    _close(out.logits[0, pad:], case["logits"][0, : ids.shape[1] - pad], "left-padded row 0")
    _close(out.logits[1], case["logits"][1], "row 1")


def test_abstractor_sincos_tables_rebuild_the_saved_buffers(fixture_dir):
    from safetensors.torch import load_file

    model = MPLUGOwl2ForConditionalGeneration.from_pretrained(fixture_dir)
    state = load_file(fixture_dir / "model.safetensors")
    q_pos, k_pos = AbstractorAttention.sincos_tables(model.config.abstractor_settings)
    prefix = "model.visual_abstractor.encoder.layers.0.crossattention.attention."
    _close(q_pos, state[prefix + "q_pos_embed"].numpy(), "q_pos_embed")
    _close(k_pos, state[prefix + "k_pos_embed"].numpy(), "k_pos_embed")


def test_checkpoint_without_pos_buffers_or_with_inv_freq_loads_the_same(fixture_dir, tmp_path):
    """Older conversions store ``rotary_emb.inv_freq`` and may lack the sin-cos buffers."""
    from safetensors.torch import load_file, save_file

    state = load_file(fixture_dir / "model.safetensors")
    state = {k: v for k, v in state.items() if not k.endswith("_pos_embed")}
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((fixture_dir / "config.json").read_text())
    model = MPLUGOwl2ForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager").eval()
    case = _load_case(fixture_dir, "A")
    batch = to_port_layout(case, model.config)
    batch.pop("labels")
    with torch.no_grad():
        _close(model(**batch).logits, case["logits"], "logits with rebuilt buffers")


def test_preprocessing_matches_original(fixture_dir):
    images = np.load(fixture_dir / "images.npz")
    processor = MPLUGOwl2ImageProcessor.from_pretrained(fixture_dir)
    pixels = processor([images["raw_astronaut"], images["raw_coffee"]], return_tensors="pt")["pixel_values"]
    _close(pixels, images["pixel_values_astronaut_coffee"], "pixel_values")
    # The video case's frames: astronaut, coffee, astronaut flipped left-right.
    frames = [images["raw_astronaut"], images["raw_coffee"], images["raw_astronaut"][:, ::-1]]
    pixels = processor(frames, return_tensors="pt")["pixel_values"]
    _close(pixels, _load_case(fixture_dir, "B")["pixel_values"], "video frames")
