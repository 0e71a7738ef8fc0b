"""InternVL (transformers-native, ``OpenGVLab/InternVL3-*-hf``, ``OpenGVLab/InternVL3_5-*-HF``).

**Conversation.** An image becomes one ``<img>…</img>`` slot; a video becomes one such slot per
frame, each after a ``FrameN:`` label, as InternVL's own video chat writes it. The -hf chat
template has no system turn; ``prompt_layout="internvl2_5"`` is InternVL's conversation template
(the ``template: internvl2_5`` of the InternVL2.5 / InternVL3 checkpoints, InternVL's
``internvl_chat/internvl/conversation.py``): ChatML with InternVL's system message. Public
checkpoints are scored in it; fine-tuning defaults to the chat template.

**Frames and images.** Every frame and image is one 448x448 tile of 256 tokens (a 12-frame view:
3,072). The InternVL3.5 -HF repos' video processor config (384 px, CLIP mean/std) is overridden
by the image processor's values on every call (:mod:`qalign_kvq.families.fixed_size`). An image
is not tiled (InternVL's dynamic tiling would give a 1536x864 view 9 tiles, 2,304 tokens): it is fed
like a video frame, one tile. Frames are never re-sampled by the processor, which stacks the videos
of a batch: every clip of a batch must have the same number of frames.

**Training.** The InternViT tower also has ``q_proj/k_proj/v_proj`` modules, so the language-model
LoRA targets are a regex limited to the language model; an unfrozen tower gets adapters on its
attention and MLP projections (InternVL's own ``wrap_backbone_lora`` targets ``attn.qkv``,
``attn.proj``, ``mlp.fc1``, ``mlp.fc2``). InternVL3-8B and InternVL3.5-8B keep an output embedding
of their own (their Qwen2.5-7B / Qwen3-8B language models do not tie it to the input embedding).
"""

from __future__ import annotations

from typing import Any

from qalign_kvq.families.base import LANGUAGE_MODEL_ATTENTION
from qalign_kvq.families.fixed_size import FixedSizeFamily

#: InternVL's system message (conversation template ``internvl2_5``).
INTERNVL_SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"


class InternVLFamily(FixedSizeFamily):
    name = "internvl"
    model_types = ("internvl",)
    lora_targets = LANGUAGE_MODEL_ATTENTION
    vision_lora_targets = (r"model\.vision_tower\.encoder\.layer\.\d+\."
                           r"(attention\.(q_proj|k_proj|v_proj|projection_layer)|mlp\.(fc1|fc2))")
    vision_prefixes = ("model.vision_tower.",)
    projector_prefixes = ("model.multi_modal_projector.",)
    language_prefixes = ("model.language_model.", "lm_head.")
    equal_frame_counts = True
    authors_layout = "internvl2_5"
    system_message = INTERNVL_SYSTEM
    zero_shot_options = {"prompt_layout": "internvl2_5"}

    def tokens_per_frame(self, processor) -> int:
        return int(processor.image_seq_length)

    def image_kwargs(self, processor) -> dict[str, Any]:
        return {"crop_to_patches": False}
