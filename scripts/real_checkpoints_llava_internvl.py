"""LLaVA-OneVision and InternVL public checkpoints' real configuration, offline (see ``real_checkpoints.py``).

    python scripts/real_checkpoints.py --out DIR --family llava_onevision_7b --family internvl3_5_8b

Written here as the Hub repos hold them, beside the weights: the processor files, the chat
template, the special tokens and their ids, the vocabulary size, whether the output embedding is
tied, the vision tower's geometry. Where a value comes from is said next to it; the Hub files
themselves cannot be read from here, so the sources are transformers' conversion scripts (which
wrote those repos), transformers' and vLLM's tests that render the repos' templates, and the
InternVL issues that quote the InternVL3.5 files. Every builder returns ``(config, tokenizer,
processor_files)`` for ``real_checkpoints.build``: tiny random weights (a 64-wide 2-layer language
model, a 32-wide 2-layer vision tower) at the real image size, patch size and vocabulary size.
"""

from __future__ import annotations

from real_checkpoints import QWEN2_5_ADDED_TOKENS, QWEN3_ADDED_TOKENS, qwen_tokenizer

# ----- LLaVA-OneVision (llava-hf/llava-onevision-qwen2-{0.5b,7b}-ov-hf) -----------------------------
#: transformers' convert_llava_onevision_weights_to_hf.py: the Qwen2-Instruct tokenizer (three added
#: tokens) plus ``<image>`` and ``<video>`` as special tokens, so <image> = 151646, <video> = 151647.
LLAVA_OV_ADDED_TOKENS = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
                         ("<image>", True), ("<video>", True)]
LLAVA_OV_TOKEN_IDS = {"image_token_index": 151646, "video_token_index": 151647}
#: The conversion script resizes the embeddings to ``vocab_size + 2`` padded to a multiple of 64:
#: Qwen2-7B-Instruct's 152064 -> 152128, Qwen2-0.5B-Instruct's 151936 -> 152000. The 0.5B model ties
#: its output embedding (Qwen2-0.5B does; LlavaOnevisionConfig takes the text config's flag), 7B not.
LLAVA_OV_TEXT = {"llava_onevision_7b": {"vocab_size": 152128, "tie_word_embeddings": False},
                 "llava_onevision_0_5b": {"vocab_size": 152000, "tie_word_embeddings": True}}
#: The repos' chat_template.json, as transformers' tests/models/llava_onevision/test_processing_llava_onevision.py
#: carry it; it renders ``<|im_start|>user <video>\nQ<|im_end|><|im_start|>assistant\n`` (vLLM's
#: tests/models/multimodal/generation video prompts for llava-onevision-qwen2-0.5b-ov-hf): a space
#: after the role, no newline after ``<|im_end|>``, no system turn.
LLAVA_OV_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
#: anyres grid of the image processor: 384-px tiles, 1x1 up to 6x6 (the LlavaOnevisionImageProcessor default).
LLAVA_OV_PINPOINTS = [[h, w] for h in range(384, 2305, 384) for w in range(384, 2305, 384)]
#: preprocessor_config.json: the conversion script takes the image processor of the vision tower
#: (google/siglip-so400m-patch14-384: 384x384, mean = std = 0.5, bicubic). The repos ship no
#: video_preprocessor_config.json that says otherwise (not confirmed from here): transformers builds
#: the video processor from these values.
LLAVA_OV_PREPROCESSOR = {
    "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
    "image_grid_pinpoints": LLAVA_OV_PINPOINTS, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "image_processor_type": "LlavaOnevisionImageProcessor", "processor_class": "LlavaOnevisionProcessor",
    "resample": 3, "rescale_factor": 1 / 255, "size": {"height": 384, "width": 384},
}
#: processor_config.json (the conversion script's LlavaOnevisionProcessor arguments).
LLAVA_OV_PROCESSOR = {"image_token": "<image>", "num_image_tokens": 729, "processor_class": "LlavaOnevisionProcessor",
                      "video_token": "<video>", "vision_feature_select_strategy": "full"}
#: SigLIP so400m/14 at 384 px (the conversion script's SiglipVisionConfig: no pooling head), features
#: from the last kept layer, all 729 patches ("full"), anyres_max_9.
LLAVA_OV_VISION = {"image_size": 384, "patch_size": 14, "vision_use_head": False}

# ----- InternVL (OpenGVLab/InternVL3-8B-hf, OpenGVLab/InternVL3_5-8B-HF) ----------------------------
#: transformers' convert_internvl_weights_to_hf.py write_tokenizer: the Qwen tokenizer's added tokens,
#: then these nine as special tokens; start/end/context image and video tokens are named.
INTERNVL_TOKENS = [(t, True) for t in ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>",
                                        "<box>", "</box>")]
INTERNVL_NAMED_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                         "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
#: InternVL3-8B (Qwen2.5-7B): Qwen2.5's 22 added tokens, so <img> = 151665, <IMG_CONTEXT> = 151667
#: (the conversion script's image_token_id), vocabulary 151674 (the original checkpoint's llm_config),
#: no tied output embedding (its config: tie_word_embeddings false). InternVL3.5-8B (Qwen3-8B):
#: Qwen3's 26 added tokens first, so <IMG_CONTEXT> = 151671 and the vocabulary 151936 (the values an
#: InternVL3.5 -hf config.json carries; read from third-party code, not from the Hub file).
INTERNVL_TEXT = {
    "internvl3_8b": {"added": QWEN2_5_ADDED_TOKENS, "model_type": "qwen2", "vocab_size": 151674, "image_token_id": 151667},
    "internvl3_5_8b": {"added": QWEN3_ADDED_TOKENS, "model_type": "qwen3", "vocab_size": 151936, "image_token_id": 151671},
}
#: The conversion script's chat template (InternVL3-hf and InternVL3.5-HF): no system turn.
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\\n' }}{% elif content['type'] == 'video' %}{{ '<video>\\n' }}{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}{% endif %}"
)
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
#: preprocessor_config.json (the conversion script's write_image_processor: 448x448 tiles, ImageNet
#: mean/std, up to 12 tiles; the processor turns tiling on per call). InternVL3-hf ships no
#: video_preprocessor_config.json (InternVL issue 1222), so its video processor takes these values.
INTERNVL_PREPROCESSOR = {
    "crop_to_patches": False, "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD, "image_processor_type": "GotOcr2ImageProcessorFast",
    "max_patches": 12, "min_patches": 1, "processor_class": "InternVLProcessor", "resample": 3,
    "rescale_factor": 1 / 255, "size": {"height": 448, "width": 448},
}
#: InternVL3.5 -HF video_preprocessor_config.json: InternVLVideoProcessor's class defaults, 384x384 with
#: CLIP mean/std (InternVL issues 1184 and 1222: "the video processor of InternVL-3.5-1B-HF is
#: inconsistent with image processor"; the tower takes 448x448 tiles normalised with ImageNet values).
INTERNVL3_5_VIDEO_PREPROCESSOR = {
    "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": CLIP_MEAN,
    "image_std": CLIP_STD, "initial_shift": True, "processor_class": "InternVLProcessor", "resample": 3,
    "rescale_factor": 1 / 255, "size": {"height": 384, "width": 384}, "video_processor_type": "InternVLVideoProcessor",
}
#: processor_config.json: 256 tokens a 448-px tile (32x32 patches of 14 px, pixel shuffle 0.5).
INTERNVL_PROCESSOR = {"image_seq_length": 256, "processor_class": "InternVLProcessor"}
#: InternViT-300M-448px geometry (the vision_config the conversion copies).
INTERNVL_VISION = {"image_size": [448, 448], "patch_size": [14, 14], "use_absolute_position_embeddings": True,
                   "attention_bias": True, "use_qk_norm": False, "norm_type": "layer_norm"}


def _text(model_type: str, vocab_size: int, tie: bool) -> dict:
    extra = {"head_dim": 16} if model_type == "qwen3" else {}
    return dict(model_type=model_type, vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
                bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=tie, **extra)


def _llava_onevision(name: str):
    from transformers import LlavaOnevisionConfig

    text = LLAVA_OV_TEXT[name]
    tokenizer = qwen_tokenizer(LLAVA_OV_ADDED_TOKENS, LLAVA_OV_CHAT_TEMPLATE)
    vision = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, **LLAVA_OV_VISION}
    config = LlavaOnevisionConfig(
        text_config=_text("qwen2", text["vocab_size"], text["tie_word_embeddings"]), vision_config=vision,
        vision_feature_select_strategy="full", vision_feature_layer=-1, image_grid_pinpoints=LLAVA_OV_PINPOINTS,
        vision_aspect_ratio="anyres_max_9", tie_word_embeddings=text["tie_word_embeddings"], **LLAVA_OV_TOKEN_IDS)
    return config, tokenizer, {"preprocessor_config.json": LLAVA_OV_PREPROCESSOR,
                               "processor_config.json": LLAVA_OV_PROCESSOR}


def _internvl(name: str):
    from transformers import InternVLConfig

    text = INTERNVL_TEXT[name]
    tokenizer = qwen_tokenizer(text["added"] + INTERNVL_TOKENS, INTERNVL_CHAT_TEMPLATE, INTERNVL_NAMED_TOKENS)
    if tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>") != text["image_token_id"]:
        raise RuntimeError(f"{name}: <IMG_CONTEXT> is not {text['image_token_id']}")
    vision = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
              **INTERNVL_VISION}
    config = InternVLConfig(text_config=_text(text["model_type"], text["vocab_size"], False), vision_config=vision,
                            image_token_id=text["image_token_id"], image_seq_length=256, downsample_ratio=0.5,
                            tie_word_embeddings=False)
    files = {"preprocessor_config.json": INTERNVL_PREPROCESSOR, "processor_config.json": INTERNVL_PROCESSOR}
    if name == "internvl3_5_8b":
        files["video_preprocessor_config.json"] = INTERNVL3_5_VIDEO_PREPROCESSOR
    return config, tokenizer, files


BUILDERS = {
    "llava_onevision_7b": lambda: _llava_onevision("llava_onevision_7b"),
    "llava_onevision_0_5b": lambda: _llava_onevision("llava_onevision_0_5b"),
    "internvl3_8b": lambda: _internvl("internvl3_8b"),
    "internvl3_5_8b": lambda: _internvl("internvl3_5_8b"),
}
#: The family adapter of each checkpoint.
FAMILY_OF = {"llava_onevision_7b": "llava_onevision", "llava_onevision_0_5b": "llava_onevision",
             "internvl3_8b": "internvl", "internvl3_5_8b": "internvl"}
