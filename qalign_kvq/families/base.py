"""What every model family provides: chat prompt, processor call, level-token ids, module groups,
and the per-frame pixel budget.

A *clip* is a ``numpy.ndarray`` of shape ``(T, H, W, 3)``, dtype ``uint8``, RGB. ``T == 1`` is fed
to the model as an image, ``T > 1`` as a video; as in Q-Align, an image is asked about as an image
("How would you rate the quality of this image?" ... "The quality of the image is"). A clip may come
with its :class:`ClipTiming` (which frames of which video it holds), from which the families that
know about time (Qwen2.5-VL, Qwen3-VL) take the frames' real timestamps. Families differ only in
how the chat prompt and the processor call are made; the logic that finds the answer and the
level-token position is shared here so that every family trains and scores the same way.
"""

from __future__ import annotations

import re
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


def for_media(text: str, is_image: bool) -> str:
    """A question or answer prefix worded for the media: "video" becomes "image" for an image."""
    return re.sub(r"\bvideo\b", "image", text) if is_image else text


def answer_text(level_word: str, answer_prefix: str = ANSWER_PREFIX) -> str:
    """The full assistant answer for a level word, as Q-Align trains it."""
    return f"{answer_prefix} {level_word}."


@dataclass(frozen=True)
class ClipTiming:
    """Which frames of a video a clip holds, in the order shown: ``indices`` into the video's
    ``total_frames`` frames, which run at ``fps``. A clip shown in reverse carries mirrored indices
    (time still runs forward through it, with the gaps of the reversed frames)."""

    indices: tuple[int, ...]
    fps: float
    total_frames: int

    def __post_init__(self):
        if not self.fps > 0 or self.total_frames < 1 or not self.indices:
            raise ValueError(f"invalid clip timing: {self}")

    @property
    def times(self) -> np.ndarray:
        """Seconds of each frame from the start of the video."""
        return np.asarray(self.indices, dtype=float) / self.fps

    def reversed(self) -> ClipTiming:
        """The timing of the same frames shown last to first: mirrored indices, still ascending."""
        first, last = self.indices[0], self.indices[-1]
        return ClipTiming(tuple(first + last - i for i in reversed(self.indices)), self.fps, self.total_frames)


#: Batch keys cast to the model dtype; everything else (ids, grids, timing) keeps its dtype.
PIXEL_KEYS = ("pixel_values", "pixel_values_videos")


@dataclass
class ModelInputs:
    """A processed batch: ``batch`` goes to ``model(**batch)``; ``level_positions[i]`` is the index
    of the logit (in row ``i``) that predicts the level word. With training answers, ``batch``
    also holds ``labels`` (-100 everywhere but on the answer tokens). ``visual_tokens[i]`` is the
    number of visual-token placeholders of row ``i``."""

    batch: dict[str, torch.Tensor]
    level_positions: torch.Tensor
    visual_tokens: list[int] | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ModelInputs:
        """Move tensors to ``device``; pixel tensors only are cast to ``dtype`` when given (frame
        timings such as Qwen2.5-VL's ``second_per_grid_ts`` stay float32)."""
        moved = {}
        for key, value in self.batch.items():
            if isinstance(value, torch.Tensor):
                value = value.to(device)
                if dtype is not None and key in PIXEL_KEYS and value.is_floating_point():
                    value = value.to(dtype)
            moved[key] = value
        return ModelInputs(moved, self.level_positions.to(device), self.visual_tokens)


class MissingWeightsError(ValueError):
    """A checkpoint lacks weights its model needs (transformers would only warn and go on)."""


def load_model_strict(model_class, path: str, **kwargs):
    """``model_class.from_pretrained(path, **kwargs)``, failing with the names of the weights the
    checkpoint lacks or holds with the wrong shape (buffers the model rebuilds are not weights)."""
    model, info = model_class.from_pretrained(path, output_loading_info=True, **kwargs)
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys") or ())
    if missing or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({', '.join(missing[:8])}{', ...' if len(missing) > 8 else ''})")
        if mismatched:
            parts.append(f"{len(mismatched)} with another shape ({', '.join(mismatched[:8])})")
        raise MissingWeightsError(f"{path}: the checkpoint's weights do not fit the model: {'; '.join(parts)}")
    return model


class Family:
    """Base class of a model family adapter. Subclasses set the class attributes and override
    :meth:`user_content` / :meth:`processor_call` / :meth:`media_kwargs` where their processor
    needs it.

    ``frame_pixels`` is the per-frame pixel budget: no frame (or image) is fed with more pixels.
    None resolves, on first use, to the model's own video default (:meth:`default_frame_pixels`);
    :meth:`options` then holds the number, which a checkpoint stores so that training and scoring
    feed frames alike."""

    name: str = ""
    #: ``config.model_type`` values this family handles.
    model_types: tuple[str, ...] = ()
    #: Default peft ``target_modules`` for LoRA (a list of names or a regex string).
    lora_targets: list[str] | str = ("q_proj", "k_proj", "v_proj", "o_proj")
    #: LoRA targets in the vision tower (a regex), used when it is unfrozen; None: the family has none
    #: and LoRA with an unfrozen tower is refused.
    vision_lora_targets: str | None = None
    #: Parameter-name prefixes of the module groups that freeze switches act on.
    vision_prefixes: tuple[str, ...] = ()
    projector_prefixes: tuple[str, ...] = ()
    language_prefixes: tuple[str, ...] = ()
    #: Constructor options for scoring a public checkpoint that has no ``qalign_kvq.json`` the way its
    #: authors score it (a qalign-kvq checkpoint stores its own in ``CheckpointMeta.family_options``).
    zero_shot_options: dict[str, Any] = {}
    #: How its authors score videos with a public checkpoint of the family (``ViewOptions`` fields of
    #: the ``authors`` protocol, see :mod:`qalign_kvq.scoring`): the frame rate of the full frames.
    authors_fps: float = 1.0
    #: Whether the videos of one batch must have the same number of frames (the processor stacks them).
    equal_frame_counts: bool = False
    #: Whether the processor's image/video processors take ``device`` (transformers' torchvision
    #: backends: resizing and normalising run there).
    processor_takes_device: bool = True

    def __init__(self, frame_pixels: int | None = None) -> None:
        self.frame_pixels = _check_pixels(frame_pixels)

    def options(self) -> dict[str, Any]:
        """The constructor options of this adapter as they stand (``get_family(name, **options)``
        rebuilds it); ``frame_pixels`` is included once resolved."""
        out = {"frame_pixels": self.frame_pixels} if self.frame_pixels is not None else {}
        return {**self._own_options(), **out}

    def _own_options(self) -> dict[str, Any]:
        return {}

    # ----- loading -------------------------------------------------------------------------
    def load(self, path: str, *, dtype: torch.dtype | None = None, processor_path: str | None = None,
             vision_attention: str = "packed", **kwargs: Any):
        """Load ``(model, processor)`` from a local directory or hub id (the processor from
        ``processor_path`` when given); missing weights are an error; the frame budget is
        resolved against the processor. ``vision_attention``: ``packed`` (one attention call per
        vision layer where the family has a per-window loop, see :meth:`set_vision_attention`) or
        ``stock``; ``kwargs`` go to ``from_pretrained``."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        check_vision_attention(vision_attention)
        processor = AutoProcessor.from_pretrained(processor_path or path)
        model = load_model_strict(AutoModelForImageTextToText, path, dtype=dtype, **kwargs)
        self.set_vision_attention(model, vision_attention)
        self.resolve_frame_pixels(processor)
        return model, processor

    def set_vision_attention(self, model, choice: str) -> None:
        """Swap the vision attention modules of a loaded model to ``choice`` (``packed`` or
        ``stock``). Families whose vision tower attends in one call anyway only check the choice."""
        check_vision_attention(choice)

    # ----- the per-frame budget --------------------------------------------------------------
    def default_frame_pixels(self, processor) -> int:
        """The model's own per-frame pixel count for videos (fixed-size families: their frame size)."""
        size = processor.video_processor.size
        return int(size["height"]) * int(size["width"])

    def resolve_frame_pixels(self, processor) -> int:
        """Set :attr:`frame_pixels` to the default when unset, check it, return it."""
        default = self.default_frame_pixels(processor)
        if self.frame_pixels is None:
            self.frame_pixels = default
        self.check_frame_pixels(default)
        return self.frame_pixels

    def check_frame_pixels(self, default: int) -> None:
        """Fixed-size families refuse a budget they cannot apply."""
        if self.frame_pixels != default:
            raise ValueError(f"{self.name} feeds every video frame at {default:,} pixels; frame_pixels="
                             f"{self.frame_pixels:,} cannot change that (leave it unset)")

    def tokens_per_frame(self, processor) -> float | None:
        """Visual tokens one video frame costs at the budget (None: not known for the family)."""
        return None

    def media_kwargs(self, processor, images: list[np.ndarray], videos: list[np.ndarray]) -> dict[str, Any]:
        """Processor-call arguments that hold images and video frames to :attr:`frame_pixels`
        (``images_kwargs`` / ``videos_kwargs``; the processor itself is left as loaded). None by
        default: fixed-size families feed every frame at their one size."""
        return {}

    # ----- prompting -----------------------------------------------------------------------
    def user_content(self, question: str, clip: np.ndarray) -> list[dict[str, Any]]:
        """The user turn's content: one media placeholder, then the question."""
        media = {"type": "image"} if clip.shape[0] == 1 else {"type": "video"}
        return [media, {"type": "text", "text": question}]

    def chat_texts(self, processor, question: str, clip: np.ndarray, level_word: str | None,
                   answer_prefix: str = ANSWER_PREFIX) -> tuple[str, str]:
        """``(prompt, full)``: the prompt ends with ``answer_prefix`` (what scoring feeds); ``full``
        is the whole conversation with the answer (training), or the prompt again."""
        messages = [{"role": "user", "content": self.user_content(question, clip)}]
        head = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt = head + answer_prefix
        if level_word is None:
            return prompt, prompt
        answer = answer_text(level_word, answer_prefix)
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        full = processor.apply_chat_template(messages, tokenize=False)
        if not full.startswith(head + answer):
            raise ValueError(f"{self.name}: the chat template does not render the answer after the prompt")
        return prompt, full

    def answer_head(self, prompt: str, answer_prefix: str = ANSWER_PREFIX) -> str:
        """The prompt up to where the trained answer starts (``labels`` cover the rest of ``full``)."""
        return prompt[: -len(answer_prefix)]

    def video_kwargs(self, videos: list[np.ndarray], timings: list[ClipTiming | None]) -> dict[str, Any]:
        """Extra processor arguments for the videos of a batch (frame metadata, no re-sampling)."""
        return {"do_sample_frames": False}

    def processor_call(self, processor, texts: list[str], clips: Sequence[np.ndarray],
                       timings: Sequence[ClipTiming | None] | None = None,
                       device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
        """Run the processor on texts and clips (images when ``T == 1``); returns every key. The
        padding side is passed explicitly: some processors (InternVL) otherwise impose their own.
        ``device``: where the image/video processors resize and normalise (their outputs stay there)."""
        timings = list(timings) if timings is not None else [None] * len(clips)
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
            kwargs["videos"] = [processor_video(video) for video in videos]
            kwargs.update(self.video_kwargs(videos, [t for c, t in zip(clips, timings) if c.shape[0] > 1]))
        self.resolve_frame_pixels(processor)
        kwargs.update(self.media_kwargs(processor, images, videos))
        if device is not None:
            self.check_processor_device(device)
            for key, present in (("images_kwargs", images), ("videos_kwargs", videos)):
                if present:
                    kwargs[key] = {**kwargs.get(key, {}), "device": str(device)}
        return dict(processor(**kwargs))

    def check_processor_device(self, device: str | torch.device | None) -> None:
        """Refuse a processor device the family's processor cannot use."""
        if device is not None and not self.processor_takes_device:
            raise ValueError(f"{self.name}: its image processor runs on the CPU only (no processor device)")

    def visual_token_ids(self, processor) -> set[int]:
        """Ids of the placeholders the processor writes for visual tokens."""
        ids = set()
        for attr in ("image_token_id", "video_token_id"):
            value = getattr(processor, attr, None)
            if isinstance(value, int):
                ids.add(value)
        return ids

    # ----- the shared logic ------------------------------------------------------------------
    def build_inputs(
        self,
        processor,
        clips: Sequence[np.ndarray],
        questions: Sequence[str] | str = DEFAULT_QUESTION,
        level_words: Sequence[str] | None = None,
        padding_side: str = "left",
        timings: Sequence[ClipTiming | None] | None = None,
        answer_prefix: str = ANSWER_PREFIX,
        device: str | torch.device | None = None,
    ) -> ModelInputs:
        """Process a batch of clips. Without ``level_words`` (scoring) each prompt ends with the
        answer prefix; with them (training) the answers follow and ``labels`` mask all but the
        answer tokens. Questions and the answer prefix say "image" for single-frame clips. Left
        padding puts every scoring position last (``logits_to_keep=1``). ``device``: where the
        processor works on the pixels (see :meth:`processor_call`)."""
        if isinstance(questions, str):
            questions = [questions] * len(clips)
        words = list(level_words) if level_words is not None else [None] * len(clips)
        if not (len(clips) == len(questions) == len(words)):
            raise ValueError("clips, questions and level_words must have the same length")
        tokenizer = processor.tokenizer
        fulls, suffix_lens, answer_lens = [], [], []
        for clip, question, word in zip(clips, questions, words):
            image = clip.shape[0] == 1
            prefix = for_media(answer_prefix, image)
            prompt, full = self.chat_texts(processor, for_media(question, image), clip, word, prefix)
            head = self.answer_head(prompt, prefix)
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
            batch = self.processor_call(processor, fulls, clips, timings, device)
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
        visual = self.visual_token_ids(processor)
        counts = None
        if visual:
            is_visual = torch.isin(batch["input_ids"], torch.tensor(sorted(visual))) & mask.bool()
            counts = is_visual.sum(dim=1).tolist()
        return ModelInputs(batch=batch, level_positions=level_positions, visual_tokens=counts)

    def level_token_ids(self, tokenizer, words: Sequence[str] = LEVEL_WORDS,
                        answer_prefix: str = ANSWER_PREFIX) -> list[int]:
        """Id of each level word as it follows the answer prefix, for videos and images alike.
        A word that is more than one token, or whose token changes when the trained answer's full
        stop follows it, is refused: scoring reads one token, training must teach that token."""
        ids = None
        for prefix in (answer_prefix, for_media(answer_prefix, True)):
            found = [_word_token(self.name, tokenizer, prefix, word) for word in words]
            if ids is not None and found != ids:
                raise ValueError(f"{self.name}: the level words' tokens differ after {prefix!r}: {found} vs {ids}")
            ids = found
        if len(set(ids)) != len(ids):
            raise ValueError(f"{self.name}: level words share a token: {dict(zip(words, ids))}")
        return ids

    def check_level_tokens(self, processor, words: Sequence[str] = LEVEL_WORDS, question: str = DEFAULT_QUESTION,
                           answer_prefix: str = ANSWER_PREFIX) -> list[int]:
        """:meth:`level_token_ids`, then, in the family's whole conversation (video and image), the
        token training puts after the prompt must be the one scoring reads. Returns the ids."""
        ids = self.level_token_ids(processor.tokenizer, words, answer_prefix)
        for frames in (2, 1):
            clip = np.zeros((frames, 28, 28, 3), np.uint8)
            prefix = for_media(answer_prefix, frames == 1)
            for word, token in zip(words, ids):
                prompt, full = self.chat_texts(processor, for_media(question, frames == 1), clip, word, prefix)
                ids_prompt = _text_ids(processor.tokenizer, prompt)
                ids_full = _text_ids(processor.tokenizer, full)
                if ids_full[: len(ids_prompt)] != ids_prompt or ids_full[len(ids_prompt)] != token:
                    raise ValueError(f"{self.name}: in the training conversation the level word {word!r} is not "
                                     f"token {token} (the one scoring reads) right after the prompt")
        return ids


def processor_video(clip: np.ndarray) -> np.ndarray | torch.Tensor:
    """A clip as the video processor gets it: a planar clip (``qalign_kvq.video.crops.planar_clip``,
    e.g. a scoring view) as a ``(T, 3, H, W)`` tensor over the same memory (the processor stacks
    or resizes it as is: the pixels are not copied one by one into channels-first order, and the
    processed values are the same); any other clip unchanged."""
    from qalign_kvq.video.crops import is_planar

    if isinstance(clip, np.ndarray) and is_planar(clip):
        return torch.from_numpy(clip).permute(0, 3, 1, 2)
    return clip


def _check_pixels(value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 1:
        raise ValueError(f"frame_pixels must be a positive whole number of pixels, not {value!r}")
    return int(value)


def _word_token(family: str, tokenizer, prefix: str, word: str) -> int:
    """The single token ``word`` adds after ``prefix``; refuses words of several tokens."""
    base = _text_ids(tokenizer, prefix)
    spoken = _text_ids(tokenizer, f"{prefix} {word}")
    if spoken[: len(base)] != base or len(spoken) != len(base) + 1:
        pieces = tokenizer.convert_ids_to_tokens(spoken[len(base):]) if spoken[: len(base)] == base else spoken
        raise ValueError(f"{family}: the level word {word!r} is not one token after {prefix!r} (it is {pieces}); "
                         "scoring reads a single token: choose level words the tokenizer keeps whole")
    token = spoken[len(base)]
    trained = _text_ids(tokenizer, answer_text(word, prefix))
    if trained[: len(base) + 1] != base + [token]:
        raise ValueError(f"{family}: in the trained answer {answer_text(word, prefix)!r} the level word is not "
                         f"token {token} (the full stop merges with it); scoring and training would disagree")
    return token


def check_vision_attention(choice: str) -> None:
    """Raise ``ValueError`` unless ``choice`` is a ``vision_attention`` value."""
    if choice not in VISION_ATTENTION_CHOICES:
        raise ValueError(f"vision_attention must be one of {', '.join(VISION_ATTENTION_CHOICES)}, not {choice!r}")


def _text_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
