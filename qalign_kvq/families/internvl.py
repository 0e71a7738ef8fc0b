"""InternVL (transformers-native, ``OpenGVLab/InternVL3-*-hf``).

An image becomes one ``<img>…</img>`` slot; a video becomes one such slot per frame, each after a
``FrameN:`` label. Frames are never re-sampled by the processor, which stacks the videos of a batch:
every clip of a batch must have the same number of frames. The InternViT vision tower also has
``q_proj/k_proj/v_proj`` modules, so the LoRA targets are a regex limited to the language model.
The output embedding is tied to the input embedding in InternVL3 (no separate ``lm_head`` weight).
"""

from __future__ import annotations

from qalign_kvq.families.base import LANGUAGE_MODEL_ATTENTION, Family


class InternVLFamily(Family):
    name = "internvl"
    model_types = ("internvl",)
    lora_targets = LANGUAGE_MODEL_ATTENTION
    vision_prefixes = ("model.vision_tower.",)
    projector_prefixes = ("model.multi_modal_projector.",)
    language_prefixes = ("model.language_model.", "lm_head.")
    equal_frame_counts = True
