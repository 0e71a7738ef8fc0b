"""Qwen2.5-VL and Qwen3-VL as their Hub downloads load: the real vocabulary (qwen-agent's
qwen.tiktoken), special tokens, chat templates and processor configs (``scripts/real_checkpoints.py``)
beside tiny weights with the real 151,936-row vocabulary. Prompts, level ids, answer labels, the
per-frame pixel budget, frame times."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from skimage import data
from transformers import AutoProcessor

from qalign_kvq.checkpoint import META_FILE
from qalign_kvq.families import get_family
from qalign_kvq.families.base import ClipTiming
from qalign_kvq.levels import LEVEL_WORDS
from tests.test_training import run_recipe
from tests.training_support import quality_set  # noqa: F401 (fixture)

#: The real Qwen ids (Qwen2, Qwen2.5 and Qwen3 share the vocabulary).
LEVEL_IDS = [9073, 1661, 6624, 7852, 3873]  # " excellent", " good", " fair", " poor", " bad"
PREFIX_IDS = [785, 4271, 315, 279, 2766, 374]  # "The quality of the video is"
IM_END, NEWLINE = 151645, 198
#: qwen-vl-utils' per-frame cap: 768 merged tokens of 28x28 (Qwen2/2.5-VL) or 32x32 (Qwen3-VL) pixels.
BUDGET = {"qwen2_5_vl": 768 * 28 * 28, "qwen3_vl": 768 * 32 * 32}
FACTOR = {"qwen2_5_vl": 28, "qwen3_vl": 32}
QUESTION = "How would you rate the quality of this video?"


@pytest.fixture(scope="session")
def real_qwen(tmp_path_factory):
    import real_checkpoints  # scripts/ is on pytest's pythonpath

    root = tmp_path_factory.mktemp("real_qwen")
    return {family: real_checkpoints.build(family, root) for family in real_checkpoints.FAMILIES}


@pytest.fixture(scope="module")
def processors(real_qwen):
    return {family: AutoProcessor.from_pretrained(path) for family, path in real_qwen.items()}


def _portrait_view(frames: int = 12) -> np.ndarray:
    """A FiveCrop view (0.8 of each side) of a 1080x1920 portrait frame, repeated: 864x1536."""
    photo = np.repeat(np.repeat(data.astronaut(), 4, axis=0), 2, axis=1)[:1536, :864]
    return np.ascontiguousarray(np.broadcast_to(photo, (frames, *photo.shape)))


def test_the_hub_layout_is_what_a_download_holds(real_qwen):
    files = {family: sorted(p.name for p in path.iterdir()) for family, path in real_qwen.items()}
    assert "video_preprocessor_config.json" not in files["qwen2_5_vl"]  # as on the Hub
    assert "video_preprocessor_config.json" in files["qwen3_vl"]
    for family, path in real_qwen.items():
        config = json.loads((path / "config.json").read_text())
        assert config["text_config"]["vocab_size"] == 151936
        assert (config["image_token_id"], config["video_token_id"]) == (151655, 151656)


@pytest.mark.parametrize("family_name", ["qwen2_5_vl", "qwen3_vl"])
def test_level_ids_are_the_real_ones(processors, family_name):
    processor = processors[family_name]
    tokenizer = processor.tokenizer
    assert tokenizer("The quality of the video is", add_special_tokens=False)["input_ids"] == PREFIX_IDS
    family = get_family(family_name)
    assert family.level_token_ids(tokenizer) == LEVEL_IDS
    assert family.check_level_tokens(processor) == LEVEL_IDS  # in the whole conversation, video and image
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|endoftext|>"]) == [151644, 151645, 151643]


@pytest.mark.parametrize("family_name", ["qwen2_5_vl", "qwen3_vl"])
def test_prompts_render_the_real_chat_templates(processors, family_name):
    processor = processors[family_name]
    family = get_family(family_name)
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" if family_name == "qwen2_5_vl" else ""
    video, _ = family.chat_texts(processor, QUESTION, np.zeros((2, 8, 8, 3), np.uint8), None)
    assert video == (f"{system}<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>{QUESTION}<|im_end|>\n"
                     "<|im_start|>assistant\nThe quality of the video is")
    inputs = family.build_inputs(processor, [np.zeros((1, 56, 56, 3), np.uint8)], QUESTION)
    text = processor.tokenizer.decode(inputs.batch["input_ids"][0])
    assert text.startswith(f"{system}<|im_start|>user\n<|vision_start|><|image_pad|>")
    assert text.endswith("<|vision_end|>How would you rate the quality of this image?<|im_end|>\n"
                         "<|im_start|>assistant\nThe quality of the image is")


@pytest.mark.parametrize("family_name", ["qwen2_5_vl", "qwen3_vl"])
def test_answer_labels_and_the_level_position(processors, family_name):
    processor = processors[family_name]
    family = get_family(family_name)
    clips = [np.zeros((4, 56, 84, 3), np.uint8), np.zeros((2, 112, 56, 3), np.uint8)]
    inputs = family.build_inputs(processor, clips, QUESTION, level_words=["poor", "excellent"], padding_side="right")
    ids, labels = inputs.batch["input_ids"], inputs.batch["labels"]
    for row, word in enumerate(["poor", "excellent"]):
        answer = labels[row][labels[row] != -100].tolist()
        # "The quality of the video is <word>." then the template's "<|im_end|>\n"
        assert answer == PREFIX_IDS + [LEVEL_IDS[LEVEL_WORDS.index(word)], 13, IM_END, NEWLINE]
        position = int(inputs.level_positions[row])
        assert ids[row, position - len(PREFIX_IDS) + 1 : position + 1].tolist() == PREFIX_IDS
        assert int(ids[row, position + 1]) == LEVEL_IDS[LEVEL_WORDS.index(word)]


@pytest.mark.parametrize("family_name", ["qwen2_5_vl", "qwen3_vl"])
def test_the_frame_budget_holds_with_the_hub_processor(processors, family_name):
    processor = processors[family_name]
    view = _portrait_view()
    if family_name == "qwen2_5_vl":  # what transformers alone does with this checkpoint: the image limits
        raw = processor(text=["<|vision_start|><|video_pad|><|vision_end|>"], videos=[view], do_sample_frames=False,
                        cap_pixels_per_frame=False, return_tensors="pt")
        assert raw["video_grid_thw"].tolist() == [[6, 110, 62]]  # 10,230 merged tokens for one view
    family = get_family(family_name)
    inputs = family.build_inputs(processor, [view, view[:1, :1080]], QUESTION)
    assert family.frame_pixels == BUDGET[family_name]
    patch = processor.video_processor.patch_size
    t, h, w = inputs.batch["video_grid_thw"][0].tolist()
    assert t == 6 and h * w * patch**2 <= BUDGET[family_name] and h * w * patch**2 > 0.9 * BUDGET[family_name]
    _, ih, iw = inputs.batch["image_grid_thw"][0].tolist()  # a single frame is held to the same budget
    assert ih * iw * patch**2 <= BUDGET[family_name]
    per_view = t * h * w // 4
    assert inputs.visual_tokens[0] == per_view <= 6 * 768


def test_a_kvq_view_keeps_its_resolution(processors):
    """0.8 of a 720x1280 KVQ frame (576x1024) is within the budget: only rounded to whole 28 px
    patches (1008x560), not down-scaled as the image limits or a smaller cap would."""
    family = get_family("qwen2_5_vl")
    inputs = family.build_inputs(processors["qwen2_5_vl"], [np.zeros((12, 1024, 576, 3), np.uint8)])
    _, h, w = inputs.batch["video_grid_thw"][0].tolist()
    assert (h * 14, w * 14) == (1008, 560)


def test_frame_times_reach_the_model(processors):
    """Qwen2.5-VL's temporal step is twice the mean gap of the sampled frames; Qwen3-VL prints the
    frames' own times. 12 frames spread over a 10 s, 30 fps video: one every 25 frames."""
    indices = tuple(range(12, 300, 25))[:12]
    timing = ClipTiming(indices, 30.0, 300)
    clip = np.zeros((12, 56, 56, 3), np.uint8)
    q25 = get_family("qwen2_5_vl").build_inputs(processors["qwen2_5_vl"], [clip], timings=[timing])
    assert q25.batch["second_per_grid_ts"].tolist() == pytest.approx([2 * 25 / 30.0])
    assert q25.to("cpu", torch.bfloat16).batch["second_per_grid_ts"].dtype == torch.float32  # not cast
    q3 = get_family("qwen3_vl").build_inputs(processors["qwen3_vl"], [clip], timings=[timing])
    text = processors["qwen3_vl"].tokenizer.decode(q3.batch["input_ids"][0])
    # one time per temporal patch of two frames: the mean of their times
    expected = [f"<{(indices[i] / 30.0 + indices[i + 1] / 30.0) / 2:.1f} seconds>" for i in range(0, 12, 2)]
    assert [piece for piece in expected if piece in text] == expected
    # a reversed clip keeps time running forward, with the gaps mirrored
    assert timing.reversed().indices == tuple(indices[0] + indices[-1] - i for i in reversed(indices))


def test_a_recipe_run_stores_the_budget_and_trains_within_it(real_qwen, processors, quality_set, tmp_path):
    from qalign_kvq.training.collator import QualityCollator
    from qalign_kvq.training.dataset import ClipDataset

    root, _ = quality_set
    out = run_recipe(real_qwen["qwen2_5_vl"], "qwen2_5_vl", root, tmp_path / "out",
                     extra=["--method", "lora", "--max_steps", "1"])
    meta = json.loads((out / META_FILE).read_text())
    assert meta["family_options"] == {"clip_fps": 2.0, "frame_pixels": BUDGET["qwen2_5_vl"]}
    assert meta["protocol"] == "kvq"
    saved = AutoProcessor.from_pretrained(out)  # saved as loaded: the budget lives in qalign_kvq.json
    # a training batch of full-HD portrait frames, through the recipe's own dataset and collator
    import make_test_videos  # scripts/

    video = make_test_videos._ffmpeg(["-i", str(make_test_videos.BUNNY), "-frames:v", "8", "-vf",
                                      "crop=405:720,scale=1080:1920", *make_test_videos.X264, "-an"],
                                     tmp_path / "portrait_1080x1920.mp4")
    from datasets import Dataset

    table = Dataset.from_list([{"path": str(video), "filename": "v.mp4", "level_word": "good", "level_score": 4.0,
                                "score": 4.0}])
    family = get_family("qwen2_5_vl", **meta["family_options"])
    batch = QualityCollator(family, saved)([ClipDataset(table, num_frames=8, seed=0)[0]])
    t, h, w = batch["video_grid_thw"][0].tolist()
    assert t == 4 and 0.9 * BUDGET["qwen2_5_vl"] < h * w * 14 * 14 <= BUDGET["qwen2_5_vl"]
