"""What every model family provides: chat prompt, processor call, level-token ids, module groups.

A *clip* is a ``numpy.ndarray`` of shape ``(T, H, W, 3)``, dtype ``uint8``, RGB. ``T == 1`` is fed
to the model as an image, ``T > 1`` as a video. Families differ only in how the chat prompt and the
processor call are made; the logic that finds the answer and the level-token position is shared
here so that every family trains and scores the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from qalign_kvq.families.qwen_vision_attention import VISION_ATTENTION_CHOICES
from qalign_kvq.levels import LEVEL_WORDS

ANSWER_PREFIX = "The quality of the video is"
#: LoRA targets for models whose vision tower also has q/k/v projections: the language model only.
LANGUAGE_MODEL_ATTENTION = r".*language_model\..*\.(q_proj|k_proj|v_proj|o_proj)"
DEFAULT_QUESTION = "How would you rate the quality of this video?"
QUESTIONS = (
    DEFAULT_QUESTION,
    "Can you rate the quality of this video?",
    "What do you think about the quality of this video?",
    "Rate the quality of this video.",
    "How is the quality of this video?",
)


def answer_text(level_word: str) -> str:
    """The full assistant answer for a level word, as Q-Align trains it."""
    return f"{ANSWER_PREFIX} {level_word}."


@dataclass
class ModelInputs:
    """A processed batch: ``batch`` goes to ``model(**batch)``; ``level_positions[i]`` is the index
    of the logit (in row ``i``) that predicts the level word. With training answers, ``batch``
    also holds ``labels`` (-100 everywhere but on the answer tokens)."""

    batch: dict[str, torch.Tensor]
    level_positions: torch.Tensor

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ModelInputs:
        """Move tensors to ``device``; floating tensors (pixels) are cast to ``dtype`` when given."""
        moved = {}
        for key, value in self.batch.items():
            if isinstance(value, torch.Tensor):
                value = value.to(device)
                if dtype is not None and value.is_floating_point():
                    value = value.to(dtype)
            moved[key] = value
        return ModelInputs(moved, self.level_positions.to(device))


class Family:
    """Base class of a model family adapter. Subclasses set the class attributes and override
    :meth:`user_content` / :meth:`processor_call` where their processor needs it."""

    name: str = ""
    #: ``config.model_type`` values this family handles.
    model_types: tuple[str, ...] = ()
    #: Default peft ``target_modules`` for LoRA (a list of names or a regex string).
    lora_targets: list[str] | str = ("q_proj", "k_proj", "v_proj", "o_proj")
    #: Parameter-name prefixes of the module groups that freeze switches act on.
    vision_prefixes: tuple[str, ...] = ()
    projector_prefixes: tuple[str, ...] = ()
    language_prefixes: tuple[str, ...] = ()
    #: Constructor options for scoring a public checkpoint that has no ``qalign_kvq.json`` the way its
    #: authors score it (a qalign-kvq checkpoint stores its own in ``CheckpointMeta.family_options``).
    zero_shot_options: dict[str, Any] = {}
    #: Whether the videos of one batch must have the same number of frames (the processor stacks them).
    equal_frame_counts: bool = False

    # ----- loading -------------------------------------------------------------------------
    def load(self, path: str, *, dtype: torch.dtype | None = None, vision_attention: str = "packed", **kwargs: Any):
        """Load ``(model, processor)`` from a local directory or hub id. ``vision_attention``:
        ``packed`` (one attention call per vision layer where the family has a per-window loop,
        see :meth:`set_vision_attention`) or ``stock``; ``kwargs`` go to ``from_pretrained``."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        check_vision_attention(vision_attention)
        processor = AutoProcessor.from_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, **kwargs)
        self.set_vision_attention(model, vision_attention)
        return model, processor

    def set_vision_attention(self, model, choice: str) -> None:
        """Swap the vision attention modules of a loaded model to ``choice`` (``packed`` or
        ``stock``). Families whose vision tower attends in one call anyway only check the choice."""
        check_vision_attention(choice)

    # ----- prompting -----------------------------------------------------------------------
    def user_content(self, question: str, clip: np.ndarray) -> list[dict[str, Any]]:
        """The user turn's content: one media placeholder, then the question."""
        media = {"type": "image"} if clip.shape[0] == 1 else {"type": "video"}
        return [media, {"type": "text", "text": question}]

    def chat_texts(self, processor, question: str, clip: np.ndarray, level_word: str | None) -> tuple[str, str]:
        """``(prompt, full)``: the prompt ends with :data:`ANSWER_PREFIX` (what scoring feeds);
        ``full`` is the whole conversation with the answer (training), or the prompt again."""
        messages = [{"role": "user", "content": self.user_content(question, clip)}]
        head = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt = head + ANSWER_PREFIX
        if level_word is None:
            return prompt, prompt
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer_text(level_word)}]})
        full = processor.apply_chat_template(messages, tokenize=False)
        if not full.startswith(head + answer_text(level_word)):
            raise ValueError(f"{self.name}: the chat template does not render the answer after the prompt")
        return prompt, full

    def answer_head(self, prompt: str) -> str:
        """The prompt up to where the trained answer starts (``labels`` cover the rest of ``full``)."""
        return prompt[: -len(ANSWER_PREFIX)]

    def video_kwargs(self, videos: list[np.ndarray]) -> dict[str, Any]:
        """Extra processor arguments for the videos of a batch (frame metadata, no re-sampling)."""
        return {"do_sample_frames": False}

    def processor_call(self, processor, texts: list[str], clips: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        """Run the processor on texts and clips (images when ``T == 1``); returns every key. The
        padding side is passed explicitly: some processors (InternVL) otherwise impose their own."""
        images = [clip[0] for clip in clips if clip.shape[0] == 1]
        videos = [clip for clip in clips if clip.shape[0] > 1]
        kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True,
                                  "padding_side": processor.tokenizer.padding_side}
        if images:
            kwargs["images"] = images
        if videos:
            if self.equal_frame_counts and len({len(video) for video in videos}) > 1:
                raise ValueError(f"{self.name}: the clips of one batch must have the same number of frames "
                                 f"(got {sorted(len(video) for video in videos)}); the processor stacks them")
            kwargs["videos"] = videos
            kwargs.update(self.video_kwargs(videos))
        return dict(processor(**kwargs))

    # ----- the shared logic ------------------------------------------------------------------
    def build_inputs(
        self,
        processor,
        clips: Sequence[np.ndarray],
        questions: Sequence[str] | str = DEFAULT_QUESTION,
        level_words: Sequence[str] | None = None,
        padding_side: str = "left",
    ) -> ModelInputs:
        """Process a batch of clips. Without ``level_words`` (scoring) each prompt ends with
        :data:`ANSWER_PREFIX`; with them (training) the answers follow and ``labels`` mask all but
        the answer tokens. Left padding puts every scoring position last (``logits_to_keep=1``)."""
        if isinstance(questions, str):
            questions = [questions] * len(clips)
        words = list(level_words) if level_words is not None else [None] * len(clips)
        if not (len(clips) == len(questions) == len(words)):
            raise ValueError("clips, questions and level_words must have the same length")
        tokenizer = processor.tokenizer
        fulls, suffix_lens, answer_lens = [], [], []
        for clip, question, word in zip(clips, questions, words):
            prompt, full = self.chat_texts(processor, question, clip, word)
            head = self.answer_head(prompt)
            ids_head = _text_ids(tokenizer, head)
            ids_prompt = _text_ids(tokenizer, prompt)
            ids_full = _text_ids(tokenizer, full)
            if ids_full[: len(ids_prompt)] != ids_prompt or ids_prompt[: len(ids_head)] != ids_head:
                raise ValueError(f"{self.name}: tokenization of the answer is not stable at the prompt boundary")
            fulls.append(full)
            suffix_lens.append(len(ids_full) - len(ids_prompt))
            answer_lens.append(len(ids_full) - len(ids_head))
        old_side = tokenizer.padding_side
        tokenizer.padding_side = padding_side
        try:
            batch = self.processor_call(processor, fulls, clips)
        finally:
            tokenizer.padding_side = old_side
        mask = batch["attention_mask"]
        width = mask.shape[1]
        ends = mask.sum(dim=1) if padding_side == "right" else torch.full((mask.shape[0],), width)
        suffix = torch.tensor(suffix_lens)
        level_positions = ends - suffix - 1
        if level_words is not None:
            labels = torch.full_like(batch["input_ids"], -100)
            for row, (end, n_answer) in enumerate(zip(ends.tolist(), answer_lens)):
                labels[row, end - n_answer : end] = batch["input_ids"][row, end - n_answer : end]
            batch["labels"] = labels
        return ModelInputs(batch=batch, level_positions=level_positions)

    def level_token_ids(self, tokenizer, words: Sequence[str] = LEVEL_WORDS) -> list[int]:
        """Id of the first sub-token of each level word as it follows :data:`ANSWER_PREFIX`."""
        base = _text_ids(tokenizer, ANSWER_PREFIX)
        ids = []
        for word in words:
            full = _text_ids(tokenizer, f"{ANSWER_PREFIX} {word}")
            if full[: len(base)] != base or len(full) == len(base):
                raise ValueError(f"{self.name}: cannot locate the token of level word {word!r}")
            ids.append(full[len(base)])
        if len(set(ids)) != len(ids):
            raise ValueError(f"{self.name}: level words share a first token: {dict(zip(words, ids))}")
        return ids


def check_vision_attention(choice: str) -> None:
    """Raise ``ValueError`` unless ``choice`` is a ``vision_attention`` value."""
    if choice not in VISION_ATTENTION_CHOICES:
        raise ValueError(f"vision_attention must be one of {', '.join(VISION_ATTENTION_CHOICES)}, not {choice!r}")


def _text_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
