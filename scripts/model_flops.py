"""Model FLOPs of one Qwen2.5-VL training sample, from the model's weights and the sample's shapes.

The formula (docs/benchmarks.md): a weight matrix of ``n`` elements applied to ``r`` rows costs
``2·n·r`` forward; attention over a segment of ``s`` tokens of width ``d`` (heads x head size) costs
``4·s²·d`` (QKᵀ and AV; causal masking not discounted). Rows: the language model's linears see the
``T`` tokens of the sample, its head only the ``K`` positions the loss reads; the vision blocks and the
patch embedding see the ``P`` patches, the merger ``P/4`` merged tokens; the vision attention runs per
window (windowed blocks) or per frame pair (full-attention blocks), the language model's over all T.

Backward: a trained weight costs 2x its forward (input and weight gradients), a frozen weight the
gradient has to pass through 1x (input gradient only), a frozen part nothing reaches (LoRA's vision
tower) nothing; attention the gradient passes through 2x. Gradient checkpointing recomputes the
forward of the checkpointed blocks the gradient reaches (decoder layers; vision blocks when they
train) up to the last tensor the backward needs: all but each block's MLP down projection (torch's
non-reentrant checkpoint stops early). ``model`` FLOPs (for MFU) are forward + backward; ``hardware`` FLOPs add the recompute and
count the head at the positions actually projected (all T when the loss takes full logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def _weights(module: nn.Module, lora: bool | None = None) -> tuple[int, int]:
    """``(elements, trained elements)`` of the Linear / Conv weights under ``module``; ``lora``: only
    adapter weights (True), only the others (False), all (None)."""
    total = trained = 0
    for name, sub in module.named_modules():
        if not isinstance(sub, (nn.Linear, nn.Conv3d, nn.Conv2d)):
            continue
        if lora is not None and (".lora_" in f".{name}") != lora:
            continue
        total += sub.weight.numel()
        trained += sub.weight.numel() if sub.weight.requires_grad else 0
    return total, trained


def _down_projections(module: nn.Module) -> int:
    """Elements of the MLP output projections (``mlp.down_proj``) under ``module``, LoRA adapters included."""
    return sum(sub.weight.numel() for name, sub in module.named_modules()
               if isinstance(sub, nn.Linear) and ".mlp.down_proj" in f".{name}")


def segment_lengths(grid_thw: torch.Tensor, window_size: int, patch_size: int, merge: int) -> tuple[list, list]:
    """``(frame_segments, window_segments)``: patch counts of the full-attention segments (one per
    temporal patch) and of the windows (``window_size`` pixels square, cut at the frame's edge)."""
    frames, windows = [], []
    side = window_size // merge // patch_size  # window side in merged tokens
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        rows = [min(side, gh - i) for i in range(0, gh, side)]
        cols = [min(side, gw - j) for j in range(0, gw, side)]
        frames += [h * w] * t
        windows += [r * c * merge * merge for r in rows for c in cols] * t
    return frames, windows


@dataclass
class SampleFlops:
    """FLOPs of one sample: forward, backward, recompute; ``model`` = forward + backward."""

    forward: float
    backward: float
    recompute: float
    head_extra: float  # hardware head FLOPs beyond the kept positions (full-logits loss)

    @property
    def model(self) -> float:
        return self.forward + self.backward

    @property
    def hardware(self) -> float:
        return self.forward + self.backward + self.recompute + self.head_extra


def qwen2_5_vl_sample_flops(model: nn.Module, tokens: int, kept_positions: int, grid_thw: torch.Tensor,
                            gradient_checkpointing: bool, head_positions: int | None = None) -> SampleFlops:
    """FLOPs of one training sample of a Qwen2.5-VL model (plain or peft-wrapped): ``tokens`` T,
    ``kept_positions`` K (the positions the loss reads), ``grid_thw`` its visual grid(s);
    ``head_positions``: the positions the head actually projects (default K)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    visual, language = inner.model.visual, inner.model.language_model
    head = inner.get_output_embeddings()
    vcfg, tcfg = visual.config, language.config
    merge = vcfg.spatial_merge_size
    patches = int(grid_thw.prod(dim=1).sum())
    frames, windows = segment_lengths(grid_thw, vcfg.window_size, vcfg.patch_size, merge)
    full_blocks = len(vcfg.fullatt_block_indexes)
    vision_attention = 4 * vcfg.hidden_size * (full_blocks * sum(s * s for s in frames)
                                               + (vcfg.depth - full_blocks) * sum(s * s for s in windows))
    blocks, blocks_trained = _weights(visual.blocks)
    embed, embed_trained = _weights(visual.patch_embed)
    merger, merger_trained = _weights(visual.merger)
    linear, linear_trained = _weights(language, lora=False)
    adapters, _ = _weights(language, lora=True)
    head_size = head.weight.numel()
    heads_width = tcfg.num_attention_heads * getattr(tcfg, "head_dim", tcfg.hidden_size // tcfg.num_attention_heads)
    lm_attention = 4 * tcfg.num_hidden_layers * tokens * tokens * heads_width

    f_vision = 2 * (blocks + embed) * patches + vision_attention
    f_merger = 2 * merger * patches // (merge * merge)
    f_lm = 2 * (linear + adapters) * tokens + lm_attention
    f_head = 2 * head_size * kept_positions
    vision_trains = blocks_trained + embed_trained > 0
    projector_trains = merger_trained > 0
    # backward: trained weights 2x, frozen weights the gradient passes through 1x, attention 2x
    # (the patch embedding's input is the pixels: no input gradient, a weight gradient when it trains)
    b_vision = (2 * 2 * blocks * patches + 2 * embed_trained * patches + 2 * vision_attention) if vision_trains else 0
    b_merger = (2 if projector_trains else 1 if vision_trains else 0) * f_merger
    b_lm = 2 * 2 * adapters * tokens + 2 * lm_attention + (2 if linear_trained else 1) * 2 * linear * tokens
    b_head = (2 if head.weight.requires_grad else 1) * f_head
    recompute = 0.0
    if gradient_checkpointing:
        down_lm, down_vision = _down_projections(language), _down_projections(visual.blocks)
        recompute = f_lm - 2 * down_lm * tokens
        if vision_trains:
            recompute += 2 * (blocks - down_vision) * patches + vision_attention
    extra = 0.0
    if head_positions is not None and head_positions != kept_positions:
        extra = (1 + (2 if head.weight.requires_grad else 1)) * 2 * head_size * (head_positions - kept_positions)
    return SampleFlops(forward=float(f_vision + f_merger + f_lm + f_head),
                       backward=float(b_vision + b_merger + b_lm + b_head), recompute=float(recompute),
                       head_extra=float(extra))
