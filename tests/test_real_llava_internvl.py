"""LLaVA-OneVision and InternVL as their Hub downloads load (``scripts/real_checkpoints_llava_internvl.py``:
the real processor configs, chat templates, special tokens and vocabulary sizes, the real Qwen
vocabulary) beside tiny weights at the real image geometry. InternVL3.5's 384-px video config,
the authors' training conversations for public checkpoints, the image path's token cost, LoRA on
an unfrozen vision tower, and LLaVA-OneVision's ``image_newline`` trained and saved with LoRA."""

from __future__ import annotations

import json
import logging
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from skimage import data
from transformers import AutoModelForImageTextToText, AutoProcessor

from qalign_kvq.bare_parameters import BARE_PARAMETERS_FILE
from qalign_kvq.checkpoint import META_FILE
from qalign_kvq.families import FAMILY_NAMES, get_family
from qalign_kvq.families.internvl import INTERNVL_SYSTEM
from qalign_kvq.loading import load_checkpoint, load_meta
from tests.test_training import Recorder, run_recipe
from tests.training_support import quality_set  # noqa: F401 (fixture)

LEVEL_IDS = [9073, 1661, 6624, 7852, 3873]  # " excellent", " good", " fair", " poor", " bad" (Qwen2 vocabulary)
QUESTION = "How would you rate the quality of this video?"
IMAGE_QUESTION = "How would you rate the quality of this image?"


@pytest.fixture(scope="session")
def real_ckpt(tmp_path_factory):
    """``real_ckpt(name) -> Path``: a checkpoint of ``real_checkpoints_llava_internvl.BUILDERS``, built on first use."""
    import real_checkpoints  # scripts/

    root = tmp_path_factory.mktemp("real_llava_internvl")
    built, lock = {}, threading.Lock()

    def get(name: str):
        with lock:
            if name not in built:
                built[name] = real_checkpoints.build(name, root)
            return built[name]

    return get


@pytest.fixture(scope="module")
def real_processor(real_ckpt):
    """``real_processor(name)``: the processor of a checkpoint, loaded once (a second or three each)."""
    loaded = {}

    def get(name: str):
        if name not in loaded:
            loaded[name] = AutoProcessor.from_pretrained(real_ckpt(name))
        return loaded[name]

    return get


def _portrait_view(frames: int = 12) -> np.ndarray:
    """A FiveCrop view (0.8 of each side) of a 1080x1920 portrait frame, repeated: 864x1536."""
    photo = np.repeat(np.repeat(data.astronaut(), 4, axis=0), 2, axis=1)[:1536, :864]
    return np.ascontiguousarray(np.broadcast_to(photo, (frames, *photo.shape)))


# ----- the Hub layout and the vocabulary ---------------------------------------------------------
@pytest.mark.parametrize("name,vocab,tied,image_id", [
    ("llava_onevision_7b", 152128, False, 151646), ("llava_onevision_0_5b", 152000, True, 151646),
    ("internvl3_8b", 151674, False, 151667), ("internvl3_5_8b", 151936, False, 151671)])
def test_the_real_ids_and_embeddings(real_ckpt, real_processor, name, vocab, tied, image_id):
    family = "llava_onevision" if name.startswith("llava") else "internvl"
    model, processor = AutoModelForImageTextToText.from_pretrained(real_ckpt(name)), real_processor(name)
    assert model.get_input_embeddings().weight.shape[0] == vocab
    assert (model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()) is tied
    assert processor.image_token_id == image_id
    assert processor.tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [151644, 151645]
    for layout in ("chat_template", get_family(family).authors_layout):
        assert get_family(family, prompt_layout=layout).check_level_tokens(processor) == LEVEL_IDS


# ----- prompts: the Hub chat templates and the authors' training conversations -----------------
def test_chat_template_prompts_are_the_hub_renderings(real_processor):
    ov = real_processor("llava_onevision_7b")
    clip = np.zeros((2, 8, 8, 3), np.uint8)
    prompt, _ = get_family("llava_onevision").chat_texts(ov, QUESTION, clip, None)
    assert prompt == f"<|im_start|>user <video>\n{QUESTION}<|im_end|><|im_start|>assistant\nThe quality of the video is"
    vl = real_processor("internvl3_8b")
    prompt, _ = get_family("internvl").chat_texts(vl, QUESTION, clip, None)
    assert prompt == f"<|im_start|>user\n<video>\n{QUESTION}<|im_end|>\n<|im_start|>assistant\nThe quality of the video is"


@pytest.mark.parametrize("name,layout,system,image", [
    ("llava_onevision_7b", "qwen_1_5", "You are a helpful assistant.", "<image>"),
    ("internvl3_8b", "internvl2_5", INTERNVL_SYSTEM, "<IMG_CONTEXT>"),
    ("internvl3_5_8b", "internvl2_5", INTERNVL_SYSTEM, "<IMG_CONTEXT>")])
def test_a_public_checkpoint_is_prompted_in_its_training_conversation(real_ckpt, real_processor, name, layout, system,
                                                                     image):
    path = real_ckpt(name)
    assert not (path / META_FILE).exists()
    meta, family = load_meta(path)
    assert meta.protocol == "authors" and meta.family_options == {"prompt_layout": layout}
    processor = real_processor(name)
    prompt, full = family.chat_texts(processor, QUESTION, np.zeros((2, 8, 8, 3), np.uint8), "good")
    head = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
    assert prompt == f"{head}<video>\n{QUESTION}<|im_end|>\n<|im_start|>assistant\nThe quality of the video is"
    assert full == prompt + " good.<|im_end|>\n"
    inputs = family.build_inputs(processor, [np.zeros((1, 64, 64, 3), np.uint8)], QUESTION)
    text = processor.tokenizer.decode(inputs.batch["input_ids"][0])
    assert text.startswith(f"{head}{image if image == '<image>' else '<img>'}")
    assert text.endswith(f"\n{IMAGE_QUESTION}<|im_end|>\n<|im_start|>assistant\nThe quality of the image is")
    # fine-tuning keeps the chat template unless the recipe asks
    assert get_family(family.name).options()["prompt_layout"] == "chat_template"


# ----- InternVL3.5: video frames at the tower's size --------------------------------------------
def test_internvl3_5_video_frames_are_fed_at_the_towers_448px(real_ckpt, real_processor, caplog):
    path = real_ckpt("internvl3_5_8b")
    processor = real_processor("internvl3_5_8b")
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    view = _portrait_view()
    # what transformers alone does with this checkpoint: 384-px CLIP-normalised frames the tower cannot take
    raw = processor(text=["<video>\nQ"], videos=[view], return_tensors="pt")
    assert tuple(raw["pixel_values"].shape) == (12, 3, 384, 384)
    with torch.no_grad(), pytest.raises(RuntimeError, match="invalid"):
        model(**raw)

    family = get_family("internvl")
    with caplog.at_level(logging.WARNING):
        model, processor = family.load(str(path))
    assert "video processor's size (384, 384) (the image processor's: (448, 448))" in caplog.text
    assert "mean [0.48145466" in caplog.text
    inputs = family.build_inputs(processor, [view], QUESTION)
    frames = inputs.batch["pixel_values"]
    assert tuple(frames.shape) == (12, 3, 448, 448) and inputs.visual_tokens == [12 * 256]
    image = processor.image_processor(images=[view[0]], crop_to_patches=False, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(frames[0], image[0], atol=1e-5, rtol=0)  # size, resampling, ImageNet mean/std
    with torch.no_grad():
        logits = model(**inputs.batch).logits
    assert torch.isfinite(logits[0, int(inputs.level_positions[0]), LEVEL_IDS]).all()
    assert family.options()["frame_pixels"] == 448 * 448


def test_internvl3_5_scores_a_video_the_authors_way(real_ckpt, sample_video):
    from qalign_kvq.scorer import Scorer

    scorer = Scorer.from_pretrained(str(real_ckpt("internvl3_5_8b")), device="cpu")
    result = scorer.score(sample_video)  # 2 s: two whole frames, at 448 px
    assert result.protocol == "authors" and result.frames == 2 and result.view_tokens == [2 * 256]
    assert result.score == pytest.approx(result.score_1_5) and 1 <= result.score <= 5


def test_an_image_processor_that_is_not_the_towers_size_is_refused(real_ckpt, tmp_path):
    import shutil

    broken = tmp_path / "internvl3_8b"
    shutil.copytree(real_ckpt("internvl3_8b"), broken)
    config = json.loads((broken / "preprocessor_config.json").read_text())
    (broken / "preprocessor_config.json").write_text(json.dumps({**config, "size": {"height": 384, "width": 384}}))
    with pytest.raises(ValueError, match=r"makes 384x384 images but the vision tower takes 448x448"):
        get_family("internvl").load(str(broken))


# ----- the image path: one frame's worth ------------------------------------------------------------
@pytest.mark.parametrize("name,family_name,raw_tokens,image_tokens,view_tokens", [
    ("llava_onevision_7b", "llava_onevision", 7425, 1161, 12 * 196 + 1),
    ("internvl3_8b", "internvl", 9 * 256, 256, 12 * 256)])  # dynamic tiling: 8 tiles and a thumbnail
def test_the_frame_budget_bounds_the_image_path(real_processor, name, family_name, raw_tokens, image_tokens,
                                                view_tokens):
    family = get_family(family_name)
    processor = real_processor(name)
    view = _portrait_view()
    token = processor.image_token
    raw = processor(text=[f"{token}\nQ"], images=[view[0]], return_tensors="pt")  # anyres / dynamic tiling
    assert int((raw["input_ids"] == processor.image_token_id).sum()) == raw_tokens
    inputs = family.build_inputs(processor, [view, view[:1]], QUESTION)
    assert inputs.visual_tokens == [view_tokens, image_tokens]
    frame_pixels = family.frame_pixels
    assert frame_pixels == {"llava_onevision": 384 * 384, "internvl": 448 * 448}[family_name]
    if family_name == "llava_onevision":  # the image shrunk into the 384x384 frame: one anyres tile
        assert inputs.batch["image_sizes"][0].tolist() == [384, 216]
        assert inputs.batch["pixel_values"].shape[1] == 2  # the whole image and its one tile
    else:
        assert inputs.batch["pixel_values"].shape[0] == 12 + 1  # 12 frames, then one tile for the image
    assert family.tokens_per_frame(processor) == {"llava_onevision": 196, "internvl": 256}[family_name]


# ----- LoRA on an unfrozen vision tower ---------------------------------------------------------------
@pytest.mark.parametrize("family_name,freeze_language", [
    *[(name, "false") for name in FAMILY_NAMES], ("llava_onevision", "true"), ("internvl", "true")])
def test_lora_with_an_unfrozen_tower_trains_vision_adapters(tiny_models, quality_set, tmp_path, family_name,
                                                            freeze_language):
    """Tiny models: the same transformers classes, so the same module names as the real towers."""
    from qalign_kvq.training.model import in_group

    root, _ = quality_set
    rec = Recorder()
    run_recipe(tiny_models(family_name), family_name, root, tmp_path / "out", callbacks=[rec],
               extra=["--method", "lora", "--freeze_vision", "false", "--freeze_language", freeze_language,
                      "--max_steps", "2", "--num_frames", "2"])
    family = get_family(family_name)
    vision = {n for n in rec.trainable if in_group(n, family.vision_prefixes)}
    language = {n for n in rec.trainable if in_group(n, family.language_prefixes)}
    assert vision and all("lora_" in n for n in vision)
    if family_name in ("llava_onevision", "internvl"):  # 2 layers x (4 attention projections, fc1, fc2) x (A, B)
        assert len(vision) == 2 * 6 * 2
    assert (not language) if freeze_language == "true" else language
    changed = {n for n in rec.before if not torch.equal(rec.before[n], rec.after[n])}
    assert vision <= changed <= rec.trainable


def test_lora_refuses_what_it_cannot_train(tiny_models):
    from qalign_kvq.families.qwen_vl import Qwen25VLFamily
    from qalign_kvq.training.model import prepare_model

    model, _ = get_family("qwen2_5_vl").load(str(tiny_models("qwen2_5_vl")))
    with pytest.raises(ValueError, match="has no module to adapt"):
        prepare_model(model, get_family("qwen2_5_vl"), "lora", freeze_vision=True, freeze_language=True)

    class NoVisionTargets(Qwen25VLFamily):  # a family that names no vision-tower modules
        vision_lora_targets = None

    with pytest.raises(ValueError, match="no vision-tower targets"):
        prepare_model(model, NoVisionTargets(), "lora", freeze_vision=False)


# ----- image_newline with LoRA and an unfrozen projector ------------------------------------------------
def test_lora_with_an_unfrozen_projector_trains_and_saves_image_newline(tiny_models, quality_set, tmp_path):
    root, _ = quality_set
    base = tiny_models("llava_onevision")
    rec = Recorder()
    out = run_recipe(base, "llava_onevision", root, tmp_path / "out", callbacks=[rec],
                     extra=["--method", "lora", "--freeze_projector", "false", "--max_steps", "1", "--num_frames", "2",
                            "--save_strategy", "steps", "--save_steps", "1"])
    key = "base_model.model.model.image_newline"
    assert key in rec.trainable and not torch.equal(rec.before[key], rec.after[key])
    saved = load_file(str(out / BARE_PARAMETERS_FILE))
    assert list(saved) == ["model.image_newline"]
    torch.testing.assert_close(saved["model.image_newline"], rec.after[key], rtol=0, atol=0)
    assert (out / "checkpoint-1" / BARE_PARAMETERS_FILE).is_file()
    model, _, _, _ = load_checkpoint(out, device="cpu", dtype=torch.float32)
    torch.testing.assert_close(model.model.image_newline.detach(), rec.after[key], rtol=0, atol=0)
    original = AutoModelForImageTextToText.from_pretrained(base).model.image_newline.detach()
    assert not torch.equal(model.model.image_newline.detach(), original)


def test_a_resumed_run_restores_image_newline(tiny_models, quality_set, tmp_path):
    root, _ = quality_set
    model = tiny_models("llava_onevision")
    extra = ["--method", "lora", "--freeze_projector", "false", "--max_steps", "2", "--save_strategy", "steps",
             "--save_steps", "1", "--num_frames", "2"]
    whole = Recorder()
    run_recipe(model, "llava_onevision", root, tmp_path / "whole", extra=extra, callbacks=[whole])
    run_recipe(model, "llava_onevision", root, tmp_path / "parts", extra=extra, callbacks=[Recorder(stop_at=1)])
    resumed = Recorder()
    run_recipe(model, "llava_onevision", root, tmp_path / "parts", callbacks=[resumed],
               extra=[*extra, "--resume_from_checkpoint", "last"])
    key = "base_model.model.model.image_newline"
    torch.testing.assert_close(resumed.before[key], load_file(
        str(tmp_path / "parts" / "checkpoint-1" / BARE_PARAMETERS_FILE))["model.image_newline"], rtol=0, atol=0)
    torch.testing.assert_close(resumed.after[key], whole.after[key], rtol=1e-5, atol=1e-6)
