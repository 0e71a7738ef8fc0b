"""LLaVA-OneVision (transformers-native, ``llava-hf/llava-onevision-*-hf``).

**Conversation.** The llava-hf chat template renders ``<|im_start|>user <video>\\nQ<|im_end|>
<|im_start|>assistant\\n``: no system turn, a space after the role, and a *stored* assistant turn
as ``<|im_start|>assistant \\n<text>``. With ``prompt_layout="chat_template"`` (the training
default) training text is built as the scoring prompt followed by the rest of the answer and the
template's end-of-turn marker, so that training and scoring see the same tokens before the level
word. ``qwen_1_5`` is the conversation LLaVA-OneVision was trained on (LLaVA-NeXT's ``conv_qwen``,
the prompt transformers' conversion script verifies the port with): ``<|im_start|>system\\nYou are a
helpful assistant.<|im_end|>\\n<|im_start|>user\\n<video>\\nQ<|im_end|>\\n<|im_start|>assistant\\n``;
public checkpoints are scored in it.

**Frames and images.** A frame is one 384x384 SigLIP input pooled 2x2 to 14x14 = 196 tokens (one
``image_newline`` token ends a video: 12 frames cost 2,353). An image is fed LLaVA-OneVision's way
for a single image (the whole image at 384x384 plus its anyres tiles, unpooled), but first shrunk to
fit the 384x384 frame, so that its tiling is one tile: at most 729 + 729 + 27 tokens (1,161 for a
9:16 view) instead of up to 10 tiles (7,425 tokens for a 1536x864 view).

**Training.** The SigLIP tower also has ``q_proj/k_proj/v_proj`` modules, so the language-model
LoRA targets are a regex limited to the language model; an unfrozen tower gets adapters on its
attention and MLP projections. ``model.image_newline`` is a bare parameter of the projector group:
with LoRA and the projector unfrozen it is trained and saved beside the adapter
(:mod:`qalign_kvq.bare_parameters`). Frames are never re-sampled by the processor. The model stacks
the videos of a batch into one tensor: every clip of a batch must have the same number of frames.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from qalign_kvq.families.base import ANSWER_PREFIX, LANGUAGE_MODEL_ATTENTION, answer_text
from qalign_kvq.families.fixed_size import FixedSizeFamily, fit_within, tower_size


class LlavaOneVisionFamily(FixedSizeFamily):
    name = "llava_onevision"
    model_types = ("llava_onevision",)
    lora_targets = LANGUAGE_MODEL_ATTENTION
    vision_lora_targets = (r"model\.vision_tower\..*encoder\.layers\.\d+\."
                           r"(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))")
    vision_prefixes = ("model.vision_tower.",)
    projector_prefixes = ("model.multi_modal_projector.", "model.image_newline")
    language_prefixes = ("model.language_model.", "lm_head.")
    equal_frame_counts = True
    authors_layout = "qwen_1_5"
    system_message = "You are a helpful assistant."
    zero_shot_options = {"prompt_layout": "qwen_1_5"}

    def tokens_per_frame(self, processor) -> int:
        """A frame's 27x27 SigLIP patches pooled 2x2 (bilinear, rounding up): 14x14 = 196."""
        side = math.ceil(math.isqrt(int(processor.num_image_tokens)) / 2)
        return side * side

    def processor_call(self, processor, texts: list[str], clips: Sequence[np.ndarray], timings=None, device=None):
        """Images (``T == 1``) are shrunk to fit the tower's frame first: one anyres tile."""
        height, width = tower_size(processor)
        clips = [fit_within(clip, height, width) if clip.shape[0] == 1 else clip for clip in clips]
        return super().processor_call(processor, texts, clips, timings, device)

    def template_texts(self, processor, question: str, clip: np.ndarray, level_word: str | None,
                       answer_prefix: str = ANSWER_PREFIX) -> tuple[str, str]:
        messages = [{"role": "user", "content": self.user_content(question, clip)}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + answer_prefix
        if level_word is None:
            return prompt, prompt
        answer = answer_text(level_word, answer_prefix)
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        rendered = processor.apply_chat_template(messages, tokenize=False)
        if answer not in rendered:
            raise ValueError(f"{self.name}: the chat template does not render the assistant answer")
        end_of_turn = rendered[rendered.rindex(answer) + len(answer):]
        return prompt, prompt + answer[len(answer_prefix):] + end_of_turn

