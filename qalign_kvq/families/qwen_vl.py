"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (transformers-native).

Frames are chosen by qalign-kvq (``qalign_kvq.video``), never by the processor: the clip is passed
as pre-decoded frames with ``do_sample_frames=False``. The vision tower merges frames in temporal
patches of 2; a clip with an odd number of frames gets its last frame repeated by the video
processor (so 7 frames cost as much as 8). Keep frame counts even to avoid the duplicate.

Time enters the prompt through ``video_metadata``, which the adapter fills saying that frame ``i`` of
a clip was taken at ``i / clip_fps`` seconds (``clip_fps``: the rate of the frames as sampled, 2 by
default, the rate these models sample at): Qwen2.5-VL turns it into ``second_per_grid_ts`` (the
temporal M-RoPE step; without metadata the processor would assume 24 fps), Qwen3-VL writes a
``<t seconds>`` timestamp before every temporal patch. Qwen2-VL has no notion of time.

The vision tower's attention runs in one call per layer (``vision_attention="packed"``, the
default of :meth:`Family.load`; ``"stock"`` keeps transformers' loop over windows and frames).

LoRA targets ``q_proj/k_proj/v_proj/o_proj``: in these models only the language model has modules
by those names (the vision blocks use ``qkv``/``proj``), so LoRA touches the language model only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qalign_kvq.families.base import Family


class _QwenVLFamily(Family):
    vision_prefixes = ("model.visual.blocks.", "model.visual.patch_embed.", "model.visual.pos_embed.")
    projector_prefixes = ("model.visual.merger.", "model.visual.deepstack_merger_list.")
    language_prefixes = ("model.language_model.", "lm_head.")

    def __init__(self, clip_fps: float = 2.0) -> None:
        if not clip_fps > 0:
            raise ValueError(f"clip_fps must be positive, got {clip_fps}")
        self.clip_fps = float(clip_fps)

    def set_vision_attention(self, model, choice: str) -> None:
        """``packed`` replaces transformers' per-window vision attention loop by one call per layer
        (:mod:`qalign_kvq.families.qwen_vision_attention`); ``stock`` restores it."""
        from qalign_kvq.families.qwen_vision_attention import set_vision_attention

        set_vision_attention(model, choice)

    def video_kwargs(self, videos: list[np.ndarray]) -> dict[str, Any]:
        """No re-sampling; metadata saying frame ``i`` of a clip is at ``i / clip_fps`` seconds."""
        metadata = [
            {"fps": self.clip_fps, "total_num_frames": len(video), "frames_indices": list(range(len(video))),
             "duration": len(video) / self.clip_fps}
            for video in videos
        ]
        return {"do_sample_frames": False, "video_metadata": metadata}


class Qwen2VLFamily(_QwenVLFamily):
    name = "qwen2_vl"
    model_types = ("qwen2_vl",)


class Qwen25VLFamily(_QwenVLFamily):
    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)


class Qwen3VLFamily(_QwenVLFamily):
    name = "qwen3_vl"
    model_types = ("qwen3_vl",)
