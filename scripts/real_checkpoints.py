"""Public checkpoints' real configuration, offline: the facts, and tiny checkpoints that carry them.

    python scripts/real_checkpoints.py --out DIR [--family qwen2_5_vl|qwen3_vl|llava_onevision_7b|... ...]

What a user's download of ``Qwen/Qwen2.5-VL-7B-Instruct`` or ``Qwen/Qwen3-VL-8B-Instruct`` holds
besides the weights is written here as it is on the Hub: the processor files
(``preprocessor_config.json``, and for Qwen3-VL ``video_preprocessor_config.json``; Qwen2.5-VL has
none), the chat template, the special tokens and their ids, the vocabulary size. The vocabulary
itself is Qwen's: the 151,643 byte-level BPE ranks shipped in the ``qwen-agent`` wheel
(``qwen_agent/utils/qwen.tiktoken``, shared by Qwen2, Qwen2.5 and Qwen3), converted with
transformers' ``TikTokenConverter``. :func:`build` writes a checkpoint directory in the Hub layout
with those files and tiny random weights (the real vocabulary size, a 64-wide 2-layer language
model, a 2-layer 32-wide vision tower with the real patch, window and merge geometry), which loads
with ``AutoProcessor`` / ``AutoModelForImageTextToText`` exactly as the download does.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import torch

#: Qwen2's pre-tokenizer pattern (its tokenizer.json).
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_REGULAR_TOKENS = 151_643
QWEN_VOCAB_SIZE = 151_936  # config.json vocab_size (the embedding is padded past the tokens)
#: Added tokens from id 151643 on, in order, and whether each is special (tokenizer_config.json).
QWEN2_5_ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
]
QWEN3_ADDED_TOKENS = QWEN2_5_ADDED_TOKENS + [
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
]
QWEN_TOKEN_IDS = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
                  "vision_end_token_id": 151653}

#: Qwen/Qwen2.5-VL-7B-Instruct chat_template.json (the same as Qwen2-VL-7B-Instruct's).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
#: Qwen/Qwen3-VL-8B-Instruct chat_template.json (no default system turn).
QWEN3_VL_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

#: Qwen/Qwen2.5-VL-7B-Instruct preprocessor_config.json (the repo has no video_preprocessor_config.json).
QWEN2_5_VL_PREPROCESSOR = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
}
#: Qwen/Qwen3-VL-8B-Instruct preprocessor_config.json and video_preprocessor_config.json (the video
#: ``size`` is a budget for the whole clip).
QWEN3_VL_PREPROCESSOR = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16, "temporal_patch_size": 2,
    "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor", "image_processor_type": "Qwen2VLImageProcessorFast",
}
QWEN3_VL_VIDEO_PREPROCESSOR = {
    "size": {"longest_edge": 25165824, "shortest_edge": 4096}, "patch_size": 16, "temporal_patch_size": 2,
    "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor", "video_processor_type": "Qwen3VLVideoProcessor",
}
#: Vision geometry of the real towers (Qwen2.5-VL-7B: window 112 px, full attention in blocks 7, 15,
#: 23, 31 of 32; Qwen3-VL-8B: patch 16, deepstack from blocks 8, 16, 24 of 27).
QWEN2_5_VL_VISION = {"patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112}
QWEN3_VL_VISION = {"patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2}

FAMILIES = ("qwen2_5_vl", "qwen3_vl")


def qwen_tiktoken_file() -> Path:
    """``qwen_agent/utils/qwen.tiktoken`` of the installed ``qwen-agent`` wheel (not imported: its
    dependencies are not needed)."""
    spec = importlib.util.find_spec("qwen_agent")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the real Qwen vocabulary ships in the qwen-agent wheel: "
                           "pip install --no-deps qwen-agent==0.0.34 (make test does)")
    path = Path(spec.submodule_search_locations[0]) / "utils" / "qwen.tiktoken"
    if not path.is_file():
        raise RuntimeError(f"{path}: missing from the installed qwen-agent")
    return path


@functools.cache
def qwen_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """``(vocab, merges)`` of Qwen's 151,643 regular tokens, converted from ``qwen.tiktoken``."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converted = TikTokenConverter(vocab_file=str(qwen_tiktoken_file()), pattern=QWEN_PATTERN).converted()
    model = json.loads(converted.to_str())["model"]
    if len(model["vocab"]) != QWEN_REGULAR_TOKENS:
        raise RuntimeError(f"qwen.tiktoken holds {len(model['vocab'])} tokens, expected {QWEN_REGULAR_TOKENS}")
    return model["vocab"], [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]


def qwen_tokenizer(added_tokens: list[tuple[str, bool]], chat_template: str,
                   extra_special_tokens: dict[str, str] | None = None):
    """Qwen's real tokenizer: the tiktoken ranks as a byte-level BPE (Qwen2's pattern), the added
    tokens at their real ids, ``<|im_end|>`` as eos and ``<|endoftext|>`` as pad, as Qwen2.5-VL /
    Qwen3-VL ship it; ``extra_special_tokens`` names model-specific tokens (InternVL's
    ``context_image_token`` ...)."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = qwen_bpe()
    tokenizer = Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges), unk_token=None, bos_token=None,
                               eos_token=None, pad_token=None)
    for token, special in added_tokens:
        tokenizer.add_tokens([AddedToken(token, special=special, normalized=False)], special_tokens=special)
    for offset, (token, _) in enumerate(added_tokens):
        if tokenizer.convert_tokens_to_ids(token) != QWEN_REGULAR_TOKENS + offset:
            raise RuntimeError(f"{token} got id {tokenizer.convert_tokens_to_ids(token)}")
    tokenizer.eos_token, tokenizer.pad_token = "<|im_end|>", "<|endoftext|>"
    tokenizer.chat_template = chat_template
    if extra_special_tokens:  # named on reload, as the conversion scripts do (the tokens already have their ids)
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            tokenizer = Qwen2Tokenizer.from_pretrained(tmp, extra_special_tokens=extra_special_tokens)
        for offset, (token, _) in enumerate(added_tokens):
            if tokenizer.convert_tokens_to_ids(token) != QWEN_REGULAR_TOKENS + offset:
                raise RuntimeError(f"{token} got id {tokenizer.convert_tokens_to_ids(token)} after naming")
    return tokenizer


def _text_config(**extra) -> dict:
    return dict(vocab_size=QWEN_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128000,
                bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=False, **extra)


def _qwen2_5_vl():
    from transformers import Qwen2_5_VLConfig

    tokenizer = qwen_tokenizer(QWEN2_5_ADDED_TOKENS, QWEN2_5_VL_CHAT_TEMPLATE)
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
              "fullatt_block_indexes": [1], **QWEN2_5_VL_VISION}
    text = _text_config(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]})
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **QWEN_TOKEN_IDS)
    return config, tokenizer, {"preprocessor_config.json": QWEN2_5_VL_PREPROCESSOR}


def _qwen3_vl():
    from transformers import Qwen3VLConfig

    tokenizer = qwen_tokenizer(QWEN3_ADDED_TOKENS, QWEN3_VL_CHAT_TEMPLATE)
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
              "num_position_embeddings": 64, "deepstack_visual_indexes": [1], **QWEN3_VL_VISION}
    text = _text_config(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                                       "mrope_section": [2, 3, 3], "mrope_interleaved": True})
    config = Qwen3VLConfig(text_config=text, vision_config=vision, **QWEN_TOKEN_IDS)
    return config, tokenizer, {"preprocessor_config.json": QWEN3_VL_PREPROCESSOR,
                               "video_preprocessor_config.json": QWEN3_VL_VIDEO_PREPROCESSOR}


_BUILDERS = {"qwen2_5_vl": _qwen2_5_vl, "qwen3_vl": _qwen3_vl}


def _builders() -> dict:
    """Every checkpoint this script can build: the Qwen-VL ones here, LLaVA-OneVision and InternVL
    in ``real_checkpoints_llava_internvl.py``."""
    import real_checkpoints_llava_internvl as others  # the sibling module in scripts/

    return {**_BUILDERS, **others.BUILDERS}


def build(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write ``out_dir/<family>``: the real tokenizer files and chat template, the real processor
    config files, and tiny random weights; returns the directory."""
    from transformers import AutoModelForImageTextToText

    builders = _builders()
    if family not in builders:
        raise ValueError(f"no real configuration for {family!r}; known: {', '.join(builders)}")
    out = Path(out_dir) / family
    out.mkdir(parents=True, exist_ok=True)
    config, tokenizer, processor_files = builders[family]()
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "chat_template.json").write_text(json.dumps({"chat_template": tokenizer.chat_template}, indent=2))
    for name in ("chat_template.jinja",):
        (out / name).unlink(missing_ok=True)  # the Hub repos ship chat_template.json
    for name, content in processor_files.items():
        (out / name).write_text(json.dumps(content, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--family", action="append", choices=tuple(_builders()), help="default: all")
    args = parser.parse_args(argv)
    for family in args.family or tuple(_builders()):
        print(f"{family}: {build(family, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
