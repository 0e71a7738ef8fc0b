"""Family options: built by ``get_family(name, **options)``, stored in ``qalign_kvq.json`` by a
fine-tune and used again by scoring; mPLUG-Owl2's prompt layouts (Q-Align's training conversation
and Q-Align's public scorer prompt); a public checkpoint scored with the family's zero-shot options."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from qalign_kvq.checkpoint import META_FILE, CheckpointMeta
from qalign_kvq.families import ANSWER_PREFIX, DEFAULT_QUESTION, get_family
from qalign_kvq.families.base import answer_text
from qalign_kvq.levels import LEVEL_WORDS
from tests.training_support import ROOT, load_finetune, quality_set, write_csv  # noqa: F401 (fixture)

#: The prompt of QAlignVideoScorer in Q-Align's q_align/evaluate/scorer.py.
Q_ALIGN_SCORER_PROMPT = ("USER: How would you rate the quality of this video?\n<|image|>\n"
                         "ASSISTANT: The quality of the video is")
ROWS = [("bunny_a/qp18.mp4", 4.6), ("bikes_a/qp46.mp4", 1.4), ("carphone/qp30.mp4", 3.8), ("bikes_b/qp38.mp4", 2.6)]


@pytest.fixture(scope="module")
def mplug(tiny_models):
    """``(model directory, processor)`` of the tiny mPLUG-Owl2."""
    torch.set_num_threads(2)
    path = tiny_models("mplug_owl2")
    _, processor = get_family("mplug_owl2").load(str(path))
    return path, processor


def _clips() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (1, 40, 64, 3), dtype=np.uint8), rng.integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)]


# ----- get_family ------------------------------------------------------------------------------
def test_options_reach_the_constructor_and_unknown_ones_are_named():
    assert get_family("qwen2_5_vl", clip_fps=1.0).clip_fps == 1.0
    assert get_family("qwen3_vl").clip_fps == 2.0
    assert get_family("mplug_owl2").prompt_layout == "vicuna_v1"  # Q-Align's training conversation
    assert get_family("mplug_owl2", prompt_layout="question_first").prompt_layout == "question_first"
    assert get_family("qwen2_5_vl", frame_pixels=200704).frame_pixels == 200704
    with pytest.raises(ValueError, match="model family 'mplug_owl2' has no option 'colour'; its options: "
                                         "prompt_layout, frame_pixels"):
        get_family("mplug_owl2", colour="red")
    with pytest.raises(ValueError, match="model family 'internvl' has no option 'clip_fps'; its options: "
                                         "prompt_layout, frame_pixels"):
        get_family("internvl", clip_fps=2)
    with pytest.raises(ValueError, match="llava_onevision: prompt_layout must be one of chat_template, qwen_1_5, "
                                         "not 'vicuna_v1'"):
        get_family("llava_onevision", prompt_layout="vicuna_v1")
    with pytest.raises(ValueError, match="prompt_layout must be one of vicuna_v1, question_first, image_first, "
                                         "not 'sideways'"):
        get_family("mplug_owl2", prompt_layout="sideways")
    with pytest.raises(ValueError, match="frame_pixels must be a positive whole number of pixels, not -5"):
        get_family("qwen2_vl", frame_pixels=-5)


# ----- CheckpointMeta --------------------------------------------------------------------------
def test_meta_stores_family_options_and_old_files_without_them_load(tmp_path):
    meta = CheckpointMeta(family="mplug_owl2", family_options={"prompt_layout": "question_first"})
    meta.save(tmp_path)
    assert json.loads((tmp_path / META_FILE).read_text())["family_options"] == {"prompt_layout": "question_first"}
    assert CheckpointMeta.load(tmp_path) == meta
    # a file written before the field existed
    (tmp_path / META_FILE).write_text(json.dumps({"family": "qwen2_5_vl", "mos_low": 1.0, "mos_high": 5.0,
                                                  "train_frames": 8, "format_version": 1}))
    assert CheckpointMeta.load(tmp_path).family_options == {}
    (tmp_path / META_FILE).write_text(json.dumps({"family": "qwen2_5_vl", "family_options": None}))
    assert CheckpointMeta.load(tmp_path).family_options == {}


def test_unknown_stored_option_names_the_meta_file(tmp_path):
    from qalign_kvq.loading import load_meta

    CheckpointMeta(family="mplug_owl2", family_options={"layout": "question_first"}).save(tmp_path)
    with pytest.raises(ValueError, match=rf"{tmp_path / META_FILE}: model family 'mplug_owl2' has no option 'layout'"):
        load_meta(tmp_path)


def test_plain_checkpoint_gets_the_zero_shot_options(tmp_path):
    from qalign_kvq.loading import load_meta

    for model_type, options in (("mplug_owl2", {"prompt_layout": "question_first"}), ("qwen2_5_vl", {})):
        directory = tmp_path / model_type
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps({"model_type": model_type}))
        meta, family = load_meta(directory)
        assert (meta.family, meta.family_options, meta.protocol) == (model_type, options, "authors")
        assert all(getattr(family, key) == value for key, value in options.items())


# ----- mPLUG-Owl2 prompt layouts --------------------------------------------------------------
def test_question_first_is_q_align_scorer_prompt(mplug):
    _, processor = mplug
    family = get_family("mplug_owl2", prompt_layout="question_first")
    clip = _clips()[1]
    prompt, full = family.chat_texts(processor, DEFAULT_QUESTION, clip, None)
    assert prompt == full == Q_ALIGN_SCORER_PROMPT
    prompt, full = family.chat_texts(processor, DEFAULT_QUESTION, clip, "good")
    assert full == Q_ALIGN_SCORER_PROMPT + " good.</s>"
    image_first, _ = get_family("mplug_owl2", prompt_layout="image_first").chat_texts(processor, DEFAULT_QUESTION,
                                                                                      clip, None)
    assert image_first == "USER: <|image|>\nHow would you rate the quality of this video? ASSISTANT: The quality of the video is"
    vicuna, _ = get_family("mplug_owl2").chat_texts(processor, DEFAULT_QUESTION, clip, None)
    assert vicuna == ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                      "helpful, detailed, and polite answers to the user's questions. USER: <|image|>\nHow would you "
                      "rate the quality of this video? ASSISTANT: The quality of the video is")


def test_old_mplug_checkpoints_keep_the_layout_they_trained_with(tmp_path):
    from qalign_kvq.loading import load_meta

    # format 1 stored only the options a recipe gave; mPLUG-Owl2 then trained image_first by default
    (tmp_path / META_FILE).write_text(json.dumps({"family": "mplug_owl2", "family_options": {}, "format_version": 1}))
    assert load_meta(tmp_path)[1].prompt_layout == "image_first"
    CheckpointMeta(family="mplug_owl2").save(tmp_path)  # the current format stores every option
    assert load_meta(tmp_path)[1].prompt_layout == "vicuna_v1"


@pytest.mark.parametrize("layout", ["vicuna_v1", "image_first", "question_first"])
def test_build_inputs_positions_and_labels_in_both_layouts(mplug, layout):
    _, processor = mplug
    tokenizer = processor.tokenizer
    family = get_family("mplug_owl2", prompt_layout=layout)
    level_ids = dict(zip(LEVEL_WORDS, family.level_token_ids(tokenizer)))
    question_ids = tokenizer("rate the quality of this", add_special_tokens=False)["input_ids"]  # mid-question

    def question_start(row_ids: list[int]) -> int:
        n = len(question_ids)
        return next(i for i in range(len(row_ids)) if row_ids[i:i + n] == question_ids)

    # scoring: left padding, the level logit is the last one, after "... is"
    inputs = family.build_inputs(processor, _clips(), DEFAULT_QUESTION, padding_side="left")
    ids = inputs.batch["input_ids"]
    assert inputs.level_positions.tolist() == [ids.shape[1] - 1] * 2
    assert tokenizer.convert_ids_to_tokens(ids[:, -1].tolist()) == ["▁is", "▁is"]
    for row in ids.tolist():
        first_image = row.index(processor.image_token_id)
        assert (question_start(row) < first_image) == (layout == "question_first")
    # training: right padding, labels cover exactly the answer and the end of sequence
    inputs = family.build_inputs(processor, _clips(), DEFAULT_QUESTION, level_words=["good", "bad"],
                                 padding_side="right")
    batch = inputs.batch
    for row, (word, prefix) in enumerate([("good", "The quality of the image is"), ("bad", ANSWER_PREFIX)]):
        labels = batch["labels"][row]
        answer = labels[labels != -100].tolist()  # row 0 is an image (one frame), asked about as an image
        assert answer == (tokenizer(answer_text(word, prefix), add_special_tokens=False)["input_ids"]
                          + [tokenizer.eos_token_id])
        assert batch["input_ids"][row, inputs.level_positions[row] + 1] == level_ids[word]
        assert tokenizer.convert_ids_to_tokens(int(batch["input_ids"][row, inputs.level_positions[row]])) == "▁is"
        assert batch["attention_mask"][row].sum() == (labels != -100).nonzero().max() + 1


# ----- fine-tune -> qalign_kvq.json -> scoring -------------------------------------------------
def test_recipe_option_round_trips_to_scoring(mplug, quality_set, tmp_path):
    from qalign_kvq.loading import load_checkpoint
    from qalign_kvq.training.model import load_for_training

    model_dir, _ = mplug
    root, _ = quality_set
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model_name_or_path: {model_dir}\nfamily: mplug_owl2\n"
        "family_options:\n  prompt_layout: question_first\n"
        f"train_csv: {write_csv(tmp_path / 'train.csv', ROWS)}\nvideo_root: {root}\n"
        f"output_dir: {tmp_path / 'run'}\nmethod: lora\nnum_frames: 2\nmax_steps: 1\n"
        "per_device_train_batch_size: 2\nuse_cpu: true\nsave_strategy: 'no'\nreport_to: none\nseed: 0\n")
    out = load_finetune().main([str(recipe)])
    stored = json.loads((out / META_FILE).read_text())
    # every option is stored, the per-frame budget resolved (the tiny model's 56x56 frames)
    assert stored["family_options"] == {"prompt_layout": "question_first", "frame_pixels": 56 * 56}

    model, processor, family, meta = load_checkpoint(out, device="cpu", dtype=torch.float32)
    assert family.prompt_layout == "question_first" and meta.family_options == stored["family_options"]
    assert family.chat_texts(processor, meta.question, _clips()[1], None)[0] == Q_ALIGN_SCORER_PROMPT

    # continuing the adapter (two-stage training) keeps the stored option unless the recipe overrides it
    family = load_for_training(str(out)).family
    assert family.options() == {"prompt_layout": "question_first", "frame_pixels": 3136}
    family = load_for_training(str(out), family_options={"prompt_layout": "image_first"}).family
    assert family.options() == {"prompt_layout": "image_first", "frame_pixels": 3136}


def test_plain_mplug_directory_scores_question_first(mplug, tmp_path):
    from qalign_kvq.loading import load_checkpoint

    model_dir, _ = mplug
    plain = tmp_path / "plain"
    shutil.copytree(model_dir, plain)
    (plain / META_FILE).unlink(missing_ok=True)
    _, processor, family, meta = load_checkpoint(plain, device="cpu", dtype=torch.float32)
    assert meta.family_options == {"prompt_layout": "question_first", "frame_pixels": 56 * 56}
    assert meta.protocol == "authors"
    assert family.chat_texts(processor, meta.question, _clips()[0], None)[0] == Q_ALIGN_SCORER_PROMPT
