"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (transformers-native).

Frames are chosen by qalign-kvq (``qalign_kvq.video``), never by the processor: the clip is passed
as pre-decoded frames with ``do_sample_frames=False``. The vision tower merges frames in temporal
patches of 2; a clip with an odd number of frames gets its last frame repeated by the video
processor (so 7 frames cost as much as 8). Keep frame counts even to avoid the duplicate.

**Resolution.** The hub repos of Qwen2-VL and Qwen2.5-VL ship no ``video_preprocessor_config.json``,
so transformers builds their video processor from the image limits (up to 12.8 M pixels a frame:
10,230 tokens for one 12-frame view of a 1080x1920 video). The adapter holds every frame and image
to :attr:`frame_pixels`, by default the cap of Qwen's own video pipeline (qwen-vl-utils: 768 merged
tokens a frame, i.e. 768 x 28 x 28 = 602,112 pixels for Qwen2/2.5-VL, 768 x 32 x 32 = 786,432 for
Qwen3-VL), or the processor's own smaller per-frame limit where it has one; a KVQ view (0.8 of
720x1280) then keeps its native resolution.

**Time.** A clip with its :class:`~qalign_kvq.families.base.ClipTiming` tells the processor the real
frame indices and rate of its video: Qwen2.5-VL turns them into ``second_per_grid_ts`` (the
temporal M-RoPE step: the mean spacing of the sampled frames), Qwen3-VL writes the frames' own
timestamps (``<t seconds>`` before every temporal patch). Frames without timing are taken to be
``1 / clip_fps`` seconds apart. Qwen2-VL has no notion of time.

The vision tower's attention runs in one call per layer (``vision_attention="packed"``, the
default of :meth:`Family.load`; ``"stock"`` keeps transformers' loop over windows and frames).

LoRA targets ``q_proj/k_proj/v_proj/o_proj``: in these models only the language model has modules
by those names (the vision blocks use ``qkv``/``proj``), so LoRA touches the language model only;
an unfrozen vision tower gets adapters on its blocks' attention and MLP.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qalign_kvq.families.base import ClipTiming, Family

#: Merged tokens per frame of Qwen's own video pipeline (qwen-vl-utils ``VIDEO_MAX_PIXELS`` / 28^2,
#: ``VIDEO_FRAME_MAX_PIXELS`` / 32^2 for Qwen3-VL).
QWEN_VL_UTILS_FRAME_TOKENS = 768


class _QwenVLFamily(Family):
    #: An unfrozen vision tower's LoRA targets: each block's attention and MLP (Qwen2-VL ``fc1/fc2``,
    #: Qwen2.5-VL ``gate/up/down_proj``, Qwen3-VL ``linear_fc1/2``), not the mergers.
    vision_lora_targets = (r"model\.visual\.blocks\.\d+\.(attn\.(qkv|proj)|"
                           r"mlp\.(fc1|fc2|gate_proj|up_proj|down_proj|linear_fc1|linear_fc2))")
    vision_prefixes = ("model.visual.blocks.", "model.visual.patch_embed.", "model.visual.pos_embed.")
    projector_prefixes = ("model.visual.merger.", "model.visual.deepstack_merger_list.")
    language_prefixes = ("model.language_model.", "lm_head.")
    #: qwen-vl-utils samples videos at 2 frames a second.
    authors_fps = 2.0

    def __init__(self, clip_fps: float = 2.0, frame_pixels: int | None = None) -> None:
        super().__init__(frame_pixels)
        if not clip_fps > 0:
            raise ValueError(f"clip_fps must be positive, got {clip_fps}")
        self.clip_fps = float(clip_fps)

    def set_vision_attention(self, model, choice: str) -> None:
        """``packed`` replaces transformers' per-window vision attention loop by one call per layer
        (:mod:`qalign_kvq.families.qwen_vision_attention`); ``stock`` restores it."""
        from qalign_kvq.families.qwen_vision_attention import set_vision_attention

        set_vision_attention(model, choice)

    def _own_options(self) -> dict[str, Any]:
        return {"clip_fps": self.clip_fps}

    @staticmethod
    def _factor(processor) -> int:
        video = processor.video_processor
        return int(video.patch_size) * int(video.merge_size)

    def default_frame_pixels(self, processor) -> int:
        """qwen-vl-utils' per-frame cap, or the video processor's own per-frame limit if smaller."""
        factor = self._factor(processor)
        return min(QWEN_VL_UTILS_FRAME_TOKENS * factor * factor, self._processor_frame_limit(processor))

    def _processor_frame_limit(self, processor) -> int:
        return int(processor.video_processor.size["longest_edge"])

    def tokens_per_frame(self, processor) -> float:
        """At most: the budget in merged tokens, two frames to a temporal patch."""
        video = processor.video_processor
        return self.frame_pixels / self._factor(processor) ** 2 / int(video.temporal_patch_size)

    def check_frame_pixels(self, default: int) -> None:
        pass  # any budget: the processor resizes each frame to fit it

    def media_kwargs(self, processor, images: list[np.ndarray], videos: list[np.ndarray]) -> dict[str, Any]:
        out = {}
        if videos:
            out["videos_kwargs"] = {"size": self._video_size(processor, videos), "cap_pixels_per_frame": False}
        if images:
            limits = processor.image_processor.size
            out["images_kwargs"] = {"size": {"shortest_edge": min(int(limits["shortest_edge"]), self.frame_pixels),
                                             "longest_edge": min(int(limits["longest_edge"]), self.frame_pixels)}}
        return out

    def _video_size(self, processor, videos: list[np.ndarray]) -> dict[str, int]:
        """The video processor's ``size`` (per frame for Qwen2/2.5-VL)."""
        shortest = int(processor.video_processor.size["shortest_edge"])
        return {"shortest_edge": min(shortest, self.frame_pixels), "longest_edge": self.frame_pixels}

    def video_kwargs(self, videos: list[np.ndarray], timings: list[ClipTiming | None]) -> dict[str, Any]:
        """No re-sampling; the frames' indices and rate (from their timing, else ``clip_fps``)."""
        metadata = []
        for video, timing in zip(videos, timings):
            if timing is None:
                timing = ClipTiming(tuple(range(len(video))), self.clip_fps, len(video))
            if len(timing.indices) != len(video):
                raise ValueError(f"{self.name}: a clip of {len(video)} frames with timing for {len(timing.indices)}")
            metadata.append(self._metadata(timing))
        return {"do_sample_frames": False, "video_metadata": metadata}

    def _metadata(self, timing: ClipTiming) -> dict[str, Any]:
        return {"fps": timing.fps, "total_num_frames": timing.total_frames, "frames_indices": list(timing.indices),
                "duration": timing.total_frames / timing.fps}


class Qwen2VLFamily(_QwenVLFamily):
    name = "qwen2_vl"
    model_types = ("qwen2_vl",)


class Qwen25VLFamily(_QwenVLFamily):
    """Qwen2.5-VL's temporal step is ``temporal_patch_size / sampled_fps`` with transformers'
    ``sampled_fps = len(frames_indices) / total_num_frames * fps``: the metadata is written so that
    ``sampled_fps`` is the clip's mean frame rate (frames over the span they cover)."""

    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)

    def _metadata(self, timing: ClipTiming) -> dict[str, Any]:
        indices = timing.indices
        span = max(indices) - min(indices)
        # n frames covering `span` source frames: the mean gap is span / (n - 1) frames
        total = span * len(indices) / (len(indices) - 1) if len(indices) > 1 and span > 0 else len(indices)
        return {"fps": timing.fps, "total_num_frames": total, "frames_indices": list(indices),
                "duration": total / timing.fps}


class Qwen3VLFamily(_QwenVLFamily):
    """Qwen3-VL's video processor takes a pixel budget for the whole clip (``size["longest_edge"]``)
    and caps each frame at ``max_video_tokens`` tokens of 32x32 pixels: during a processor call that
    cap is the per-frame budget (rounded down to whole tokens; put back afterwards, as
    ``build_inputs`` does with the tokenizer's padding side) and the clip budget is left wide, so
    clips of any frame count share a call."""

    name = "qwen3_vl"
    model_types = ("qwen3_vl",)

    def _processor_frame_limit(self, processor) -> int:
        factor = self._factor(processor)
        return int(getattr(processor.video_processor, "max_video_tokens", QWEN_VL_UTILS_FRAME_TOKENS)) * factor**2

    def _frame_tokens(self, processor) -> int:
        return max(1, self.frame_pixels // self._factor(processor) ** 2)

    def media_kwargs(self, processor, images: list[np.ndarray], videos: list[np.ndarray]) -> dict[str, Any]:
        out = super().media_kwargs(processor, images, videos)
        if videos:
            video = processor.video_processor
            frames = max(int(video.max_frames), max(len(v) for v in videos))
            out["videos_kwargs"] = {
                "size": {"shortest_edge": int(video.size["shortest_edge"]),
                         "longest_edge": self._frame_tokens(processor) * self._factor(processor) ** 2 * frames},
                "cap_pixels_per_frame": True}
        return out

    def processor_call(self, processor, texts, clips, timings=None, device=None):
        video = processor.video_processor
        saved = video.max_video_tokens
        self.resolve_frame_pixels(processor)
        video.max_video_tokens = self._frame_tokens(processor)
        try:
            return super().processor_call(processor, texts, clips, timings, device)
        finally:
            video.max_video_tokens = saved
