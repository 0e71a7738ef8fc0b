"""Build tiny, randomly initialised, seeded checkpoints of every supported family, fully offline.

    python scripts/make_tiny_models.py --out DIR [--family NAME ...]

Each family gets ``DIR/<family>/``: a real byte-level BPE tokenizer trained on the fly (so that
" excellent", " good", " fair", " poor", " bad" are single tokens) wrapped in the family's
tokenizer class with its special tokens and a small chat template mirroring the real one, the
family's processor (image and video processors with small sizes), and a model with a 64-wide,
2-layer language model and a 2-layer, 32-wide vision tower. Everything loads with
``AutoProcessor`` / ``AutoModelForImageTextToText``. Same inputs, same bytes: the weights are
drawn under a fixed seed. ``mplug_owl2`` is built by ``scripts/make_tiny_mplug_owl2.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision", "internvl", "mplug_owl2")
SEED = 0
#: The mPLUG-Owl2 port has its own builder (its ``build(out_dir)`` is called, imported lazily).
MPLUG_OWL2_BUILDER = Path(__file__).with_name("make_tiny_mplug_owl2.py")
LEVEL_WORDS = ("excellent", "good", "fair", "poor", "bad")

# Text the BPE is trained on: the prompts and answers the toolkit uses, many times over, so that
# every " <level word>" ends up as one token.
_CORPUS = [
    "You are a helpful assistant.",
    "How would you rate the quality of this video?",
    "Can you rate the quality of this video?",
    "What do you think about the quality of this video?",
    "Rate the quality of this video.",
    "How is the quality of this video?",
    "How would you rate the quality of this image?",
    "user assistant system",
    "0.1 0.5 1.0 1.5 2.0 2.5 3.0 3.5 4.0 4.5 5.0 seconds",
] + [f"The quality of the video is {word}." for word in LEVEL_WORDS]
_BPE_VOCAB_SIZE = 400

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]

# Chat templates: small versions of the families' real ones (same turn markers, same media slots).
_QWEN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' and DEFAULT_SYSTEM %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# LLaVA-OneVision (llava-hf *-ov-hf): media first, then "\n" + text; note the space after the role.
_LLAVA_OV_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}<image>{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}<video>{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\n' + content['text'] }}{% endfor %}"
    "<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# InternVL3 (*-hf): Qwen2.5 turns; an image is <IMG_CONTEXT>, a video <video>, each on its own line.
_INTERNVL_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif content['type'] == 'video' %}<video>\n"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _train_bpe(level_words: tuple[str, ...] = LEVEL_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE (Qwen2 pre-tokenizer) trained on :data:`_CORPUS` (plus the answers with
    ``level_words`` beyond the five): ``(vocab, merges)``."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=_BPE_VOCAB_SIZE, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    extra = [f"The quality of the video is {word}." for word in level_words if word not in LEVEL_WORDS]
    tokenizer.train_from_iterator((_CORPUS + extra) * 20, trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return model["vocab"], merges


def _qwen_tokenizer(extra_special: list[str], chat_template: str, level_words: tuple[str, ...] = LEVEL_WORDS,
                    **kwargs):
    """A ``Qwen2Tokenizer`` over the trained BPE, with the Qwen special tokens plus ``extra_special``;
    every " <level word>" is one token."""
    from transformers import Qwen2Tokenizer

    vocab, merges = _train_bpe(level_words)
    specials = [t for t in QWEN_SPECIALS + extra_special if t not in vocab]
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                               extra_special_tokens=kwargs.pop("extra_special_tokens", None), **kwargs)
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.chat_template = chat_template
    for word in level_words:
        if len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) != 1:
            raise RuntimeError(f"tiny tokenizer: ' {word}' is not a single token")
    return tokenizer


def _text_config(tokenizer, **extra) -> dict:
    return dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tokenizer.pad_token_id, **extra)


def _qwen_token_ids(tokenizer) -> dict[str, int]:
    ids = tokenizer.convert_tokens_to_ids
    return {"image_token_id": ids("<|image_pad|>"), "video_token_id": ids("<|video_pad|>"),
            "vision_start_token_id": ids("<|vision_start|>"), "vision_end_token_id": ids("<|vision_end|>")}


#: Most visual tokens (merged patches) per frame of the Qwen processors, by default.
FRAME_TOKENS = 16


def _qwen_pixel_range(factor: int, frame_tokens: int = FRAME_TOKENS) -> dict[str, int]:
    """Small images: between 2x2 and ``frame_tokens`` merged patches (default 4x4) per frame."""
    return {"shortest_edge": factor * factor * 4, "longest_edge": factor * factor * frame_tokens}


def _qwen2_family(config_class, processor_class, vision_config: dict, frame_tokens: int,
                  level_words: tuple[str, ...] = LEVEL_WORDS):
    """Qwen2-VL and Qwen2.5-VL: the same tokenizer, processors and text model; their own vision tower."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    tokenizer = _qwen_tokenizer([], _QWEN_TEMPLATE.replace("DEFAULT_SYSTEM", "true"), level_words)
    size = _qwen_pixel_range(28, frame_tokens)
    processor = processor_class(image_processor=Qwen2VLImageProcessor(size=size),
                                video_processor=Qwen2VLVideoProcessor(size=size, cap_pixels_per_frame=True),
                                tokenizer=tokenizer, chat_template=tokenizer.chat_template)
    config = config_class(
        text_config=_text_config(tokenizer, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                              "mrope_section": [2, 3, 3]}),
        vision_config=vision_config, **_qwen_token_ids(tokenizer))
    return config, processor


def _qwen2_vl(frame_tokens: int = FRAME_TOKENS, level_words: tuple[str, ...] = LEVEL_WORDS):
    from transformers import Qwen2VLConfig, Qwen2VLProcessor

    return _qwen2_family(Qwen2VLConfig, Qwen2VLProcessor,
                         {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2}, frame_tokens,
                         level_words)


def _qwen2_5_vl(frame_tokens: int = FRAME_TOKENS, level_words: tuple[str, ...] = LEVEL_WORDS):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor

    return _qwen2_family(Qwen2_5_VLConfig, Qwen2_5_VLProcessor,
                         {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
                          "window_size": 56, "fullatt_block_indexes": [1]}, frame_tokens, level_words)


def _qwen3_vl(frame_tokens: int = FRAME_TOKENS, level_words: tuple[str, ...] = LEVEL_WORDS):
    from transformers import Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLProcessor, Qwen3VLVideoProcessor

    tokenizer = _qwen_tokenizer([], _QWEN_TEMPLATE.replace("DEFAULT_SYSTEM", "false"), level_words)
    size = _qwen_pixel_range(32, frame_tokens)
    # Qwen3-VL's video size is a budget for the whole clip; the per-frame ceiling is max_video_tokens
    video_processor = Qwen3VLVideoProcessor(size=size, cap_pixels_per_frame=True, max_video_tokens=frame_tokens)
    processor = Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(size=size, patch_size=16),
                                 video_processor=video_processor,
                                 tokenizer=tokenizer, chat_template=tokenizer.chat_template)
    text = _text_config(tokenizer, head_dim=16, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True})
    config = Qwen3VLConfig(
        text_config=text,
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
                       "num_position_embeddings": 64, "deepstack_visual_indexes": [1]},
        **_qwen_token_ids(tokenizer))
    return config, processor


def _llava_onevision():
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    tokenizer = _qwen_tokenizer(["<image>", "<video>"], _LLAVA_OV_TEMPLATE)
    image_size, patch = 28, 14
    pinpoints = [[28, 28], [28, 56], [56, 28], [56, 56]]
    image_processor = LlavaOnevisionImageProcessor(size={"height": image_size, "width": image_size},
                                                   crop_size={"height": image_size, "width": image_size},
                                                   image_grid_pinpoints=pinpoints)
    video_processor = LlavaOnevisionVideoProcessor(size={"height": image_size, "width": image_size})
    processor = LlavaOnevisionProcessor(image_processor=image_processor, video_processor=video_processor,
                                        tokenizer=tokenizer, chat_template=tokenizer.chat_template,
                                        num_image_tokens=(image_size // patch) ** 2,
                                        vision_feature_select_strategy="full")
    ids = tokenizer.convert_tokens_to_ids
    config = LlavaOnevisionConfig(
        text_config={"model_type": "qwen2", **_text_config(tokenizer)},
        vision_config={"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": image_size,
                       "patch_size": patch},
        image_token_index=ids("<image>"), video_token_index=ids("<video>"),
        vision_feature_select_strategy="full", vision_feature_layer=-1, image_grid_pinpoints=pinpoints)
    return config, processor


def _internvl():
    from transformers import GotOcr2ImageProcessor, InternVLConfig, InternVLProcessor, InternVLVideoProcessor

    tokens = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
              "video_token": "<video>"}
    tokenizer = _qwen_tokenizer(list(tokens.values()), _INTERNVL_TEMPLATE, extra_special_tokens=tokens)
    image_size, patch = 56, 14
    image_seq_length = (image_size // patch) ** 2 // 4  # pixel shuffle with downsample ratio 0.5
    image_processor = GotOcr2ImageProcessor(size={"height": image_size, "width": image_size},
                                            crop_to_patches=False, max_patches=2)
    video_processor = InternVLVideoProcessor(size={"height": image_size, "width": image_size})
    processor = InternVLProcessor(image_processor=image_processor, video_processor=video_processor,
                                  tokenizer=tokenizer, chat_template=tokenizer.chat_template,
                                  image_seq_length=image_seq_length)
    config = InternVLConfig(
        text_config={"model_type": "qwen2", **_text_config(tokenizer)},
        vision_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                       "image_size": [image_size, image_size], "patch_size": [patch, patch]},
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=image_seq_length,
        downsample_ratio=0.5)
    return config, processor


QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
_BUILDERS: dict[str, Callable] = {
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": _qwen2_5_vl,
    "qwen3_vl": _qwen3_vl,
    "llava_onevision": _llava_onevision,
    "internvl": _internvl,
}


def _build_mplug_owl2(out: Path) -> Path:
    script = MPLUG_OWL2_BUILDER
    if not script.is_file():
        raise FileNotFoundError(f"{script}: missing; the tiny mplug_owl2 model is built by that script")
    spec = importlib.util.spec_from_file_location("make_tiny_mplug_owl2", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.build(out)
    return Path(result) if result is not None else out


def build_tiny_model(family: str, out_dir: str | Path, frame_tokens: int = FRAME_TOKENS,
                     vision_init_std: float | None = None, level_words: tuple[str, ...] | None = None) -> Path:
    """Build the tiny model of ``family`` into ``out_dir/<family>`` and return that directory.

    ``frame_tokens`` (Qwen families only) is the most visual tokens per frame the processor makes
    (each one a 2x2 merge of 14 px patches, 16 for Qwen3-VL): the default 16 sees about 84x140 px
    of a 9:16 frame, 64 about 168x294 px. ``vision_init_std`` (Qwen families only) replaces the
    vision tower's ``initializer_range`` (0.02, sized for a 1280-wide tower): at width 32 the default
    leaves the vision blocks near the identity, so the tower stays a linear patch projection that
    cannot learn quality (a second-order statistic of the pixels); about 1/sqrt(32) = 0.2 can.
    ``level_words`` (Qwen families only): a level vocabulary beyond the five words whose every
    " <word>" the tokenizer makes one token, as the real Qwen vocabulary does for the recipes' words
    (the default five leave the tokenizer, and the model, byte-identical)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    if frame_tokens != FRAME_TOKENS and family not in QWEN_FAMILIES:
        raise ValueError(f"frame_tokens applies to the Qwen families ({', '.join(QWEN_FAMILIES)}), not {family!r}")
    if vision_init_std is not None and (family not in QWEN_FAMILIES or not vision_init_std > 0):
        raise ValueError(f"vision_init_std must be positive and applies to the Qwen families, "
                         f"got {vision_init_std} for {family!r}")
    if level_words is not None and family not in QWEN_FAMILIES:
        raise ValueError(f"level_words applies to the Qwen families ({', '.join(QWEN_FAMILIES)}), not {family!r}")
    if frame_tokens < 4:
        raise ValueError(f"frame_tokens must be at least 4 (the processor's 2x2 minimum), got {frame_tokens}")
    out = Path(out_dir) / family
    out.mkdir(parents=True, exist_ok=True)
    if family == "mplug_owl2":
        return _build_mplug_owl2(out)
    from transformers import AutoModelForImageTextToText

    words = tuple(level_words) if level_words is not None else LEVEL_WORDS
    config, processor = (_BUILDERS[family](frame_tokens, words) if family in QWEN_FAMILIES
                         else _BUILDERS[family]())
    if vision_init_std is not None:
        config.vision_config.initializer_range = vision_init_std
    torch.manual_seed(SEED)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory (one sub-directory per family)")
    parser.add_argument("--family", action="append", choices=FAMILIES,
                        help="family to build (repeatable; default: all)")
    parser.add_argument("--frame-tokens", type=int, default=FRAME_TOKENS,
                        help=f"most visual tokens per frame, Qwen families only (default {FRAME_TOKENS}; "
                             "more = a higher-resolution view, slower)")
    parser.add_argument("--vision-init-std", type=float, default=None,
                        help="vision tower initializer_range, Qwen families only (default: the config's 0.02; "
                             "0.2 gives the tiny tower blocks that learn, see build_tiny_model)")
    parser.add_argument("--level-words", nargs="+", default=None,
                        help="a level vocabulary beyond the five words, each made one token, Qwen families only")
    args = parser.parse_args(argv)
    for family in args.family or FAMILIES:
        path = build_tiny_model(family, args.out, args.frame_tokens, args.vision_init_std,
                                tuple(args.level_words) if args.level_words else None)
        print(f"{family}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
