"""LLaVA-OneVision (transformers-native, ``llava-hf/llava-onevision-*-hf``).

Its chat template renders a *stored* assistant turn as ``<|im_start|>assistant \\n<text>`` (a space
after the role) but the generation prompt as ``<|im_start|>assistant\\n``. Training text is therefore
built as the scoring prompt followed by the rest of the answer and the template's end-of-turn
marker, so that training and scoring see the same tokens before the level word.

The SigLIP vision tower also has ``q_proj/k_proj/v_proj`` modules, so the LoRA targets are a regex
limited to the language model. Frames are never re-sampled by the processor. The model stacks the
videos of a batch into one tensor: every clip of a batch must have the same number of frames.
"""

from __future__ import annotations

import numpy as np

from qalign_kvq.families.base import ANSWER_PREFIX, LANGUAGE_MODEL_ATTENTION, Family, answer_text


class LlavaOneVisionFamily(Family):
    name = "llava_onevision"
    model_types = ("llava_onevision",)
    lora_targets = LANGUAGE_MODEL_ATTENTION
    vision_prefixes = ("model.vision_tower.",)
    projector_prefixes = ("model.multi_modal_projector.", "model.image_newline")
    language_prefixes = ("model.language_model.", "lm_head.")
    equal_frame_counts = True

    def chat_texts(self, processor, question: str, clip: np.ndarray, level_word: str | None,
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
