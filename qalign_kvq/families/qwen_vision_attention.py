"""Qwen-VL vision attention in one call per layer.

The vision towers of Qwen2-VL, Qwen2.5-VL and Qwen3-VL pack the patches of every image and video
of a batch into one sequence; ``cu_seqlens`` cuts it into attention segments (frames in the
full-attention layers, Qwen2.5-VL's 112-pixel windows in the others). Unless flash-attn is
requested, transformers' attention module calls attention once per segment: thousands of small
calls per layer for a 12-frame video. :class:`PackedVisionAttention` computes the same attention in
one call: ``torch.nn.attention.varlen.varlen_attn`` on a CUDA device (sm80+, half precision), else
one ``scaled_dot_product_attention`` over the segments laid out as a padded batch
``(segments, longest, heads, head_dim)`` with a key-padding mask (no mask, and no copy, when every
segment has the same length).

:func:`set_vision_attention` swaps the modules of a loaded model (as peft swaps layers): each new
module holds the original's ``qkv`` and ``proj`` layers themselves, so parameter names, state
dicts, checkpoints, LoRA and DeepSpeed see the same model, and ``"stock"`` puts the original
modules back. The projection, rotary embedding (transformers' own function, in float32), scaling
and dtypes are those of the original module; only the segment loop is gone.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

#: ``vision_attention`` choices: one call per layer, or transformers' module as loaded.
VISION_ATTENTION_CHOICES = ("packed", "stock")


def _stock_classes() -> tuple[type[nn.Module], ...]:
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionAttention
    from transformers.models.qwen2_vl.modeling_qwen2_vl import VisionAttention
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionAttention

    return VisionAttention, Qwen2_5_VLVisionAttention, Qwen3VLVisionAttention


@dataclass
class SegmentLayout:
    """How the segments of one ``cu_seqlens`` lie in a padded ``(count, longest)`` batch.
    ``slots`` (None when every segment has length ``longest``) holds the padded-batch slot of each
    token; ``valid`` (count, longest) marks the slots that hold a token."""

    cu_seqlens: torch.Tensor  # int32, segment boundaries without empty segments
    count: int
    longest: int
    slots: torch.Tensor | None
    valid: torch.Tensor | None

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor) -> SegmentLayout:
        cu = cu_seqlens.long()
        lengths = cu[1:] - cu[:-1]
        keep = lengths > 0
        lengths = lengths[keep]
        count, longest = len(lengths), int(lengths.max())
        cu = torch.cat([cu[:1], cu[1:][keep]]).to(torch.int32)
        if bool((lengths == longest).all()):
            return cls(cu, count, longest, None, None)
        valid = torch.arange(longest, device=cu.device) < lengths[:, None]
        return cls(cu, count, longest, valid.reshape(-1).nonzero().squeeze(1), valid)


class _LayoutCache:
    """The layouts of the last few ``cu_seqlens`` tensors, by identity: a vision forward passes the
    same tensor to every layer (one for the windowed layers, one for the full ones), so the layout,
    and its one device-to-host read, is computed once a forward, not once a layer. The tensors are
    held, so an identity cannot be reused while cached."""

    def __init__(self, size: int = 4):
        self.size = size
        self.entries: list[tuple[torch.Tensor, SegmentLayout]] = []

    def get(self, cu_seqlens: torch.Tensor) -> SegmentLayout:
        for tensor, layout in self.entries:
            if tensor is cu_seqlens:
                return layout
        layout = SegmentLayout.from_cu_seqlens(cu_seqlens)
        self.entries = [(cu_seqlens, layout), *self.entries[: self.size - 1]]
        return layout


def _varlen_supported(query: torch.Tensor) -> bool:
    return (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)
            and query.shape[-1] % 8 == 0 and query.shape[-1] <= 256
            and torch.cuda.get_device_capability(query.device)[0] >= 8)


def segment_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: SegmentLayout,
                      scale: float, dropout: float = 0.0, backend: str = "auto") -> torch.Tensor:
    """Attention within each segment of ``layout`` (no attention across segments), in one call.

    ``query``/``key``/``value``: ``(tokens, heads, head_dim)``; returns the same shape. ``backend``:
    ``auto`` (varlen on a capable CUDA device without dropout, else padded SDPA), ``varlen`` or
    ``sdpa``."""
    if backend not in ("auto", "varlen", "sdpa"):
        raise ValueError(f"backend must be auto, varlen or sdpa, not {backend!r}")
    if backend == "varlen" or (backend == "auto" and dropout == 0.0 and _varlen_supported(query)):
        from torch.nn.attention.varlen import varlen_attn

        cu = layout.cu_seqlens.to(query.device)
        return varlen_attn(query.contiguous(), key.contiguous(), value.contiguous(), cu, cu,
                           layout.longest, layout.longest, scale=scale)
    heads, dim = query.shape[1:]
    shape = (layout.count, layout.longest, heads, dim)
    if layout.slots is None:
        q, k, v = (t.reshape(shape).transpose(1, 2) for t in (query, key, value))
        mask = None
    else:
        def pad(t: torch.Tensor) -> torch.Tensor:
            padded = t.new_zeros((layout.count * layout.longest, heads, dim)).index_put((layout.slots,), t)
            return padded.reshape(shape).transpose(1, 2)

        q, k, v = pad(query), pad(key), pad(value)
        mask = layout.valid[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)
    out = out.transpose(1, 2).reshape(layout.count * layout.longest, heads, dim)
    return out if layout.slots is None else out[layout.slots]


class PackedVisionAttention(nn.Module):
    """Drop-in for a Qwen-VL vision attention module (same ``forward`` arguments), computing the
    attention of all segments in one call. Holds the original's ``qkv``/``proj`` (same parameter
    names); the original module is kept aside (not a submodule) for :func:`set_vision_attention`."""

    def __init__(self, stock: nn.Module, layouts: _LayoutCache | None = None, backend: str = "auto"):
        super().__init__()
        self.qkv, self.proj = stock.qkv, stock.proj
        self.num_heads, self.head_dim, self.scaling = stock.num_heads, stock.head_dim, stock.scaling
        self.attention_dropout = float(getattr(stock, "attention_dropout", 0.0))
        self.config = stock.config
        # transformers' rotary function of the module's own model file (float32, cast back)
        self._rotary = sys.modules[type(stock).__module__].apply_rotary_pos_emb_vision
        self._stock = (stock,)  # a tuple: not registered, not in the state dict
        self._layouts = layouts if layouts is not None else _LayoutCache()
        self.backend = backend

    @property
    def stock(self) -> nn.Module:
        return self._stock[0]

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                max_seqlen: int | None = None, **kwargs) -> torch.Tensor:
        seq_length = hidden_states.shape[0]
        query, key, value = (
            self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        )
        cos, sin = position_embeddings
        query, key = self._rotary(query, key, cos, sin)
        out = segment_attention(query, key, value, self._layouts.get(cu_seqlens), self.scaling,
                                dropout=self.attention_dropout if self.training else 0.0, backend=self.backend)
        return self.proj(out.reshape(seq_length, -1))


def _flash_requested(module: nn.Module) -> bool:
    from transformers.utils.generic import is_flash_attention_requested

    return is_flash_attention_requested(module.config)


def set_vision_attention(model: nn.Module, choice: str = "packed", backend: str = "auto") -> int:
    """Make every Qwen-VL vision attention module of ``model`` ``"packed"`` (one call per layer) or
    ``"stock"`` (transformers' module as loaded); returns how many modules are now of that kind.

    Modules whose config requests flash-attn stay stock: transformers already calls flash-attn's
    varlen kernel once per layer there. Models without Qwen-VL vision attention are left alone
    (returns 0). The swap keeps every parameter name, so it can be done before or after peft."""
    if choice not in VISION_ATTENTION_CHOICES:
        raise ValueError(f"vision_attention must be one of {', '.join(VISION_ATTENTION_CHOICES)}, not {choice!r}")
    stock_classes = _stock_classes()
    layouts = _LayoutCache()
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, (PackedVisionAttention, *stock_classes))]
    count = 0
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if choice == "stock" and isinstance(module, PackedVisionAttention):
            stock = module.stock
            stock.qkv, stock.proj = module.qkv, module.proj  # peft may have wrapped them since
            stock.train(module.training)
            setattr(parent, attr, stock)
        elif choice == "packed" and not isinstance(module, PackedVisionAttention):
            if _flash_requested(module):
                continue
            packed = PackedVisionAttention(module, layouts, backend)
            packed.train(module.training)
            setattr(parent, attr, packed)
        elif choice == "packed":
            module._layouts, module.backend = layouts, backend
        count += 1
    return count
