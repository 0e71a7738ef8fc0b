"""Build a tiny mPLUG-Owl2 checkpoint directory offline (for tests and demos).

    python scripts/make_tiny_mplug_owl2.py --out DIR

Writes ``config.json`` + ``model.safetensors`` (the parity fixture's tiny config and weights from
``../shared/fixtures/mplug_owl2_tiny`` when present, else the same config drawn under a fixed seed),
a LLaMA-style tokenizer (SentencePiece-like BPE with ``▁`` word prefixes, trained here with the
``tokenizers`` library so that each level word is one token) and the processor files
(``preprocessor_config.json`` at 56 px, ``processor_config.json``). It loads with
``get_family("mplug_owl2").load(DIR)``.
"""

from __future__ import annotations

import argparse
import json
import string
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT.parent / "shared" / "fixtures" / "mplug_owl2_tiny"
SEED = 0
VOCAB_SIZE = 320  # the fixture's

#: The fixture's tiny settings (see its README): LLaMA 64 wide, 2 layers; ViT 32 wide at 56 px;
#: abstractor with 8 queries (9 visual tokens per image or frame).
TINY_CONFIG = {
    "vocab_size": VOCAB_SIZE, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
    "tie_word_embeddings": False,
    "visual_config": {
        "visual_model": {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2,
                         "num_attention_heads": 2, "image_size": 56, "patch_size": 14, "layer_norm_eps": 1e-6},
        "visual_abstractor": {"hidden_size": 32, "intermediate_size": 88, "num_hidden_layers": 2,
                              "num_attention_heads": 2, "num_learnable_queries": 8, "encoder_hidden_size": 32,
                              "grid_size": 4, "layer_norm_eps": 1e-6},
    },
}
IMAGE_PROCESSOR = {"size": {"shortest_edge": 56}, "crop_size": {"height": 56, "width": 56}, "resample": 3,
                   "image_mean": [0.48145466, 0.4578275, 0.40821073],
                   "image_std": [0.26862954, 0.26130258, 0.27577711]}


def _corpus() -> list[str]:
    from qalign_kvq.families.base import QUESTIONS, answer_text
    from qalign_kvq.levels import LEVEL_WORDS

    lines = []
    for question in QUESTIONS + tuple(q.replace("video", "image") for q in QUESTIONS):
        for word in LEVEL_WORDS:
            lines.append(f"USER: \n{question} ASSISTANT: {answer_text(word)}")
    lines += ["The quick brown fox jumps over the lazy dog.", "A short clip of a person walking in the park."]
    return lines


def train_tokenizer():
    """A ``LlamaTokenizer`` (BPE, ``▁`` prefixes, ``<unk> <s> </s>`` = 0 1 2) trained on Q-Align's prompts."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    # Words and punctuation are trained apart (as in LLaMA's vocabulary: "▁good" then ".").
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
        pre_tokenizers.Punctuation(),
    ])
    alphabet = sorted(set(string.printable) - set(" \t\r\x0b\x0c")) + ["▁"]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=alphabet, show_progress=False)
    bpe.train_from_iterator(_corpus() * 20, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    # Fill the vocabulary up to the model's, as LLaMA's 32000 pieces fill its embedding table: the
    # processor's <|image|> then lands at id == vocab_size, like on the public checkpoints.
    vocab = model["vocab"]
    for i in range(VOCAB_SIZE - len(vocab)):
        vocab[f"<unused{i}>"] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return LlamaTokenizer(vocab=model["vocab"], merges=merges)


def _fixture_weights() -> dict[str, torch.Tensor] | None:
    if not (FIXTURE / "model.safetensors").is_file():
        return None
    from safetensors.torch import load_file

    return load_file(FIXTURE / "model.safetensors")


def build(out_dir: str | Path) -> Path:
    """Write the tiny checkpoint into ``out_dir`` and return it."""
    from qalign_kvq.families.mplug_owl2 import (
        MPLUGOwl2Config,
        MPLUGOwl2Family,
        MPLUGOwl2ForConditionalGeneration,
        MPLUGOwl2ImageProcessor,
        MPLUGOwl2Processor,
    )
    from qalign_kvq.levels import LEVEL_WORDS

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer()
    processor = MPLUGOwl2Processor(MPLUGOwl2ImageProcessor(**IMAGE_PROCESSOR), tokenizer)
    for word in LEVEL_WORDS:
        if len(tokenizer(f" {word}", add_special_tokens=False)["input_ids"]) != 1:
            raise RuntimeError(f"tiny tokenizer: level word {word!r} is not a single token")
    if processor.image_token_id != VOCAB_SIZE:
        raise RuntimeError(f"tiny tokenizer: <|image|> has id {processor.image_token_id}, expected {VOCAB_SIZE}")
    config = MPLUGOwl2Config(**TINY_CONFIG)  # image_token_index defaults to vocab_size
    processor.num_image_tokens = config.num_image_tokens
    torch.manual_seed(SEED)
    model = MPLUGOwl2ForConditionalGeneration(config)
    state = _fixture_weights()
    if state is not None:
        model.load_state_dict(state, strict=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    MPLUGOwl2Family().level_token_ids(tokenizer)  # fails loudly if a level word has no token
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    args = parser.parse_args(argv)
    print(build(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
