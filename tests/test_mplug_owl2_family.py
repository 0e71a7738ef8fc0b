"""The mPLUG-Owl2 family on the tiny checkpoint of scripts/make_tiny_mplug_owl2.py: scoring images
and clips, training labels, LoRA targets, gradient checkpointing, saving and hub-cache loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from qalign_kvq.families import get_family
from qalign_kvq.families.base import ANSWER_PREFIX, answer_text, for_media
from qalign_kvq.families.mplug_owl2 import VICUNA_V1_SYSTEM
from qalign_kvq.families.mplug_owl2 import LORA_TARGETS, MPLUGOwl2ForConditionalGeneration
from qalign_kvq.families.mplug_owl2.processing import expand_to_square
from qalign_kvq.levels import LEVEL_WORDS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    torch.set_num_threads(2)
    import make_tiny_mplug_owl2 as module  # scripts/ is on pytest's pythonpath
    return module.build(tmp_path_factory.mktemp("tiny") / "mplug_owl2")


@pytest.fixture(scope="module")
def family():
    return get_family("mplug_owl2")


@pytest.fixture(scope="module")
def loaded(tiny_dir, family):
    model, processor = family.load(str(tiny_dir), attn_implementation="eager")
    return model.eval(), processor


def _clips() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (1, 40, 64, 3), dtype=np.uint8), rng.integers(0, 256, (4, 72, 48, 3), dtype=np.uint8)]


def _level_probs(model, family, processor, inputs) -> torch.Tensor:
    with torch.no_grad():
        logits = model(**inputs.batch).logits
    rows = torch.arange(logits.shape[0])
    level_logits = logits[rows, inputs.level_positions][:, family.level_token_ids(processor.tokenizer)]
    return torch.softmax(level_logits, dim=-1)


def test_scores_an_image_and_a_clip(loaded, family):
    model, processor = loaded
    inputs = family.build_inputs(processor, _clips(), padding_side="left")
    ids = inputs.batch["input_ids"]
    # One slot per row: 9 visual tokens for the image, 4 x 9 for the clip's frames.
    assert (ids == processor.image_token_id).sum(dim=1).tolist() == [9, 36]
    assert inputs.batch["pixel_values"].shape == (5, 3, 56, 56)
    assert inputs.level_positions.tolist() == [ids.shape[1] - 1] * 2
    assert processor.tokenizer.convert_ids_to_tokens(ids[:, -1].tolist()) == ["▁is", "▁is"]
    probs = _level_probs(model, family, processor, inputs)
    assert probs.shape == (2, 5)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(2))
    assert bool((probs > 0).all())
    # The two rows see different media, so their distributions differ.
    assert not torch.allclose(probs[0], probs[1])


def test_left_padded_batch_matches_single_rows(loaded, family):
    model, processor = loaded
    clips = _clips()
    batched = _level_probs(model, family, processor, family.build_inputs(processor, clips))
    for row, clip in enumerate(clips):
        alone = _level_probs(model, family, processor, family.build_inputs(processor, [clip]))
        torch.testing.assert_close(batched[row], alone[0], atol=1e-5, rtol=1e-5)


def test_sdpa_matches_eager_with_left_padding(tiny_dir, loaded, family):
    eager, processor = loaded
    sdpa = MPLUGOwl2ForConditionalGeneration.from_pretrained(tiny_dir, attn_implementation="sdpa").eval()
    inputs = family.build_inputs(processor, _clips())
    mask = inputs.batch["attention_mask"].bool()
    with torch.no_grad():
        a, b = eager(**inputs.batch).logits, sdpa(**inputs.batch).logits
    torch.testing.assert_close(a[mask], b[mask], atol=1e-5, rtol=1e-5)


def test_training_labels_cover_the_answer(loaded, family):
    model, processor = loaded
    tokenizer = processor.tokenizer
    inputs = family.build_inputs(processor, _clips(), level_words=["good", "bad"], padding_side="right")
    batch = inputs.batch
    level_ids = dict(zip(LEVEL_WORDS, family.level_token_ids(tokenizer)))
    for row, word in enumerate(["good", "bad"]):
        labels = batch["labels"][row]
        answer = tokenizer.convert_ids_to_tokens(labels[labels != -100].tolist())
        prefix = for_media(ANSWER_PREFIX, _clips()[row].shape[0] == 1)  # an image is asked about as an image
        expected = tokenizer(answer_text(word, prefix), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert answer == tokenizer.convert_ids_to_tokens(expected)
        assert batch["input_ids"][row, inputs.level_positions[row] + 1] == level_ids[word]
        assert batch["attention_mask"][row].sum() == (labels != -100).nonzero().max() + 1  # answer ends the row
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss)


def test_chat_template_is_q_align(family, loaded):
    _, processor = loaded
    clip = _clips()[1]
    prompt, full = family.chat_texts(processor, "How is the quality of this video?", clip, "fair")
    head = f"{VICUNA_V1_SYSTEM} USER: <|image|>\nHow is the quality of this video? ASSISTANT: "
    assert prompt == head + ANSWER_PREFIX
    assert full == head + "The quality of the video is fair.</s>"


def test_processor_slots_and_errors(loaded):
    _, processor = loaded
    image, clip = _clips()
    out = processor(text=["USER: <|image|>\nhi", "USER: <|image|>\nhi"], images=[image[0], clip])
    assert out["pixel_values"].shape[0] == 5
    assert (out["input_ids"] == processor.image_token_id).sum().item() == 5 * 9
    with pytest.raises(ValueError, match="1 <\\|image\\|> slots but 2"):
        processor(text="USER: <|image|>\nhi", images=[image[0], clip])
    with pytest.raises(ValueError, match="not both"):
        processor(text="USER: <|image|>\nhi", images=[image[0]], videos=[clip])


def test_expand_to_square_pads_with_the_mean_colour():
    image = np.full((2, 6, 3), 7, dtype=np.uint8)
    square = expand_to_square(image, (122, 116, 104))
    assert square.shape == (6, 6, 3)
    assert (square[2:4] == 7).all()
    assert (square[:2] == [122, 116, 104]).all() and (square[4:] == [122, 116, 104]).all()


def test_lora_default_targets_are_q_proj_and_visual_v_proj(tiny_dir, family):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    model = MPLUGOwl2ForConditionalGeneration.from_pretrained(tiny_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=family.lora_targets))
    hit = {name.removeprefix("base_model.model.") for name, module in peft_model.named_modules()
           if isinstance(module, LoraLayer)}
    expected = {f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj.multiway.1")}
    assert hit == expected
    assert family.lora_targets == LORA_TARGETS


def _grads(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_gradients(tiny_dir, loaded, family):
    _, processor = loaded
    batch = family.build_inputs(processor, _clips(), level_words=["good", "poor"], padding_side="right").batch
    model = MPLUGOwl2ForConditionalGeneration.from_pretrained(tiny_dir).train()
    plain = _grads(model, batch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    checkpointed = _grads(model, batch)
    assert model.model.layers[0].gradient_checkpointing
    assert model.model.vision_model.encoder.layers[0].gradient_checkpointing
    assert plain.keys() == checkpointed.keys()
    for prefix in ("model.vision_model.", "model.visual_abstractor.", "model.layers.", "lm_head."):
        assert any(n.startswith(prefix) for n in plain), prefix
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-5, rtol=1e-4, msg=name)


def test_lora_with_reentrant_checkpointing_trains_the_adapters(tiny_dir, loaded, family):
    from peft import LoraConfig, get_peft_model

    _, processor = loaded
    batch = family.build_inputs(processor, _clips(), level_words=["fair", "bad"], padding_side="right").batch
    model = MPLUGOwl2ForConditionalGeneration.from_pretrained(tiny_dir)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=family.lora_targets)).train()
    for name, param in peft_model.named_parameters():  # Q-Align trains the abstractor, freezes the ViT
        if ".visual_abstractor." in name:
            param.requires_grad_(True)
    peft_model(**batch).loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters()}
    lora_b = [g for n, g in grads.items() if "lora_B" in n]
    assert len(lora_b) == 4 and all(g is not None and g.abs().sum() > 0 for g in lora_b)
    abstractor = [g for n, g in grads.items() if ".visual_abstractor.encoder." in n]
    assert abstractor and all(g is not None and g.abs().sum() > 0 for g in abstractor)
    assert all(g is None for n, g in grads.items() if ".vision_model." in n)


def test_save_and_reload_in_safetensors_gives_identical_logits(tmp_path, loaded, family):
    model, processor = loaded
    inputs = family.build_inputs(processor, _clips())
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "mplug_owl2"
    reloaded, reprocessor = family.load(str(tmp_path), attn_implementation="eager")
    again = family.build_inputs(reprocessor, _clips())
    assert torch.equal(again.batch["input_ids"], inputs.batch["input_ids"])
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(**again.batch).logits, model(**inputs.batch).logits)


def test_greedy_generation_with_cache_matches_full_recompute(loaded, family):
    model, processor = loaded
    batch = family.build_inputs(processor, _clips()).batch
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=3, do_sample=False)[:, batch["input_ids"].shape[1]:]
        ids, mask = batch["input_ids"], batch["attention_mask"]
        for _ in range(3):
            step = model(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"]).logits[:, -1]
            ids = torch.cat([ids, step.argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    assert torch.equal(generated, ids[:, -3:])


def _public_layout(src: Path, dst: Path) -> None:
    """``src`` (a tiny checkpoint) laid out like q-future/one-align: two ``.bin`` shards with an
    index, the legacy CLIP ``preprocessor_config.json`` and the tokenizer without <|image|>."""
    from transformers import AutoTokenizer

    dst.mkdir(parents=True)
    model = MPLUGOwl2ForConditionalGeneration.from_pretrained(src)
    state = model.state_dict()
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2 :]}
    weight_map = {}
    for shard, keys in shards.items():
        torch.save({k: state[k].clone() for k in keys}, dst / shard)
        weight_map |= dict.fromkeys(keys, shard)
    total = sum(t.numel() * t.element_size() for t in state.values())
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    config = json.loads((src / "config.json").read_text())
    config.pop("image_token_index")
    config["architectures"] = ["MPLUGOwl2LlamaForCausalLM"]
    # The public repos point at their remote code; it must be ignored (no trust_remote_code).
    config["auto_map"] = {"AutoConfig": "configuration_mplug_owl2.MPLUGOwl2Config",
                          "AutoModelForCausalLM": "modeling_mplug_owl2.MPLUGOwl2LlamaForCausalLM"}
    (dst / "config.json").write_text(json.dumps(config))
    (dst / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 56, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 56}))
    tokenizer = AutoTokenizer.from_pretrained(src)
    tokenizer = type(tokenizer)(vocab={t: i for t, i in tokenizer.get_vocab().items() if t != "<|image|>"},
                                merges=tokenizer._merges)
    tokenizer.save_pretrained(dst)


_LOAD_BY_ID = """
import sys, torch
from qalign_kvq.families import get_family
family = get_family("mplug_owl2")
model, processor = family.load("q-future/tiny-one-align")
ref, _ = family.load(sys.argv[1])
clip = torch.zeros(2, 30, 50, 3, dtype=torch.uint8).numpy()
inputs = family.build_inputs(processor, [clip])
with torch.no_grad():
    same = torch.equal(model.eval()(**inputs.batch).logits, ref.eval()(**inputs.batch).logits)
print("RESULT", type(processor.image_processor).__name__, processor.num_image_tokens, same)
"""


def test_loads_sharded_bin_checkpoint_from_offline_hub_cache_by_repo_id(tmp_path, tiny_dir):
    home = tmp_path / "hf"
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = home / "hub" / "models--q-future--tiny-one-align"
    _public_layout(tiny_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", _LOAD_BY_ID, str(tiny_dir)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "RESULT MPLUGOwl2ImageProcessor 9 True" in run.stdout


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_unsafe_bin_shard_is_refused(tmp_path, tiny_dir):
    checkpoint = tmp_path / "ckpt"
    _public_layout(tiny_dir, checkpoint)
    marker = tmp_path / "pwned"
    shard = checkpoint / "pytorch_model-00001-of-00002.bin"
    state = torch.load(shard, weights_only=True)
    state["payload"] = _Payload(marker)
    torch.save(state, shard)
    with pytest.raises(Exception, match="(?i)weights.only|unpickl|unsupported"):
        MPLUGOwl2ForConditionalGeneration.from_pretrained(checkpoint)
    assert not marker.exists()


def test_bfloat16_scores_close_to_float32(tiny_dir, loaded, family):
    model, processor = loaded
    half, _ = family.load(str(tiny_dir), dtype=torch.bfloat16)
    assert half.model.layers[0].self_attn.k_proj.multiway[1].weight.dtype == torch.bfloat16
    inputs = family.build_inputs(processor, _clips())
    reference = _level_probs(model, family, processor, inputs)
    probs = _level_probs(half.eval(), family, processor, inputs.to("cpu", torch.bfloat16)).float()
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(2), atol=1e-2, rtol=0)
    assert (probs - reference).abs().max() < 0.02  # measured 0.005


def test_built_under_a_device_context_everything_lands_on_that_device(tiny_dir):
    """``with torch.device(...)`` (how bench_gpu.py and accelerate's init on meta build models): no
    parameter or buffer (the abstractor's sin-cos tables included) stays behind on the CPU."""
    from qalign_kvq.families.mplug_owl2 import MPLUGOwl2Config

    config = MPLUGOwl2Config.from_pretrained(tiny_dir)
    with torch.device("meta"):
        model = MPLUGOwl2ForConditionalGeneration(config)
    stray = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type != "meta"]
    assert stray == []


def test_many_images_are_preprocessed_in_parallel_chunks_with_the_same_result(loaded):
    _, processor = loaded
    image_processor = processor.image_processor
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (rng.integers(20, 90), rng.integers(20, 90), 3), dtype=np.uint8) for _ in range(21)]
    parallel = image_processor(images, return_tensors="pt")["pixel_values"]
    one_by_one = torch.cat([image_processor(image, return_tensors="pt")["pixel_values"] for image in images])
    assert parallel.shape == (21, 3, 56, 56)
    assert torch.equal(parallel, one_by_one)
    assert len(image_processor(images[:3])["pixel_values"]) == 3  # one chunk, no tensors asked: a list
    assert len(image_processor(images, return_tensors=None)["pixel_values"]) == 21


def test_the_chunk_threads_follow_torchs_thread_count(loaded, monkeypatch):
    # in a DataLoader worker (torch on 1 thread) the workers are the parallelism: no pool of 8 in each
    image_processor = loaded[1].image_processor
    images = [np.full((40, 60, 3), 7 * i, dtype=np.uint8) for i in range(24)]  # 3 chunks of 8
    seen = []
    chunk = type(image_processor)._preprocess_chunk

    def recording(self, *args, **kwargs):
        seen.append(threading.get_ident())
        return chunk(self, *args, **kwargs)

    monkeypatch.setattr(type(image_processor), "_preprocess_chunk", recording)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert image_processor(images, return_tensors="pt")["pixel_values"].shape[0] == 24
        assert set(seen) == {threading.get_ident()}  # in the calling thread
        seen.clear()
        torch.set_num_threads(2)
        assert image_processor(images, return_tensors="pt")["pixel_values"].shape[0] == 24
        assert len(seen) == 3 and threading.get_ident() not in seen and len(set(seen)) <= 2  # a pool of 2
    finally:
        torch.set_num_threads(threads)
