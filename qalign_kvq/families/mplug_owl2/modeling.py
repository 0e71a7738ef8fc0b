"""mPLUG-Owl2 (the Q-Align / OneAlign backbone) written for current transformers.

A LLaMA-2 decoder whose ``k_proj``, ``v_proj`` and both RMSNorms have a text branch (0) and a visual
branch (1), chosen per token; a ViT (fused, per-head interleaved ``query_key_value``); a visual
abstractor (learnable queries cross-attending to the ViT tokens, with fixed sin-cos position
embeddings), then ``visual_fc`` and one ``vit_eos`` token per image. Parameter names are those of the
public checkpoints, so their weights load unchanged.

Unlike the original (one ``-200`` id expanded inside the model), the processor puts
``config.num_image_tokens`` placeholder ids (``config.image_token_index``) per image or video frame
into ``input_ids``; the model writes the visual tokens at those positions, so ``labels``,
``attention_mask`` and logits keep the length of ``input_ids`` and both padding sides work.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from qalign_kvq.families.mplug_owl2.configuration import AbstractorSettings, MPLUGOwl2Config, VisionSettings


def _attention(impl: str | None) -> Callable:
    """The attention function of ``config._attn_implementation`` (eager, sdpa, ...)."""
    return ALL_ATTENTION_FUNCTIONS.get_interface(impl or "eager", eager_attention_forward)


# ----- sin-cos position embeddings of the abstractor (MAE style, float32 like the original) -----
def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    omega = np.arange(dim // 2, dtype=np.float32) / np.float32(dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", positions.reshape(-1).astype(np.float32), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d_with_cls(dim: int, grid_size: int) -> np.ndarray:
    """``(1 + grid², dim)``: a zero row for CLS, then the grid (half the channels per axis)."""
    grid = np.stack(np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32)))
    emb = np.concatenate([sincos_1d(dim // 2, grid[0]), sincos_1d(dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, dim]), emb], axis=0)


# ----- modality-adaptive modules ------------------------------------------------------------------
class Multiway(nn.Module):
    """Two copies of a module: token ``i`` goes through ``multiway[modality[i]]`` (0 text, 1 visual).
    Both branches always run (on possibly empty selections), so distributed hooks see every call."""

    def __init__(self, make: Callable[[], nn.Module]):
        super().__init__()
        self.multiway = nn.ModuleList([make(), make()])

    def forward(self, hidden_states: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        outputs = [branch(hidden_states[modality == idx]) for idx, branch in enumerate(self.multiway)]
        result = outputs[0].new_empty(*hidden_states.shape[:-1], outputs[0].shape[-1])
        for idx, output in enumerate(outputs):
            result[modality == idx] = output
        return result


class MPLUGOwl2Attention(nn.Module):
    """LLaMA self-attention with modality-adaptive ``k_proj`` / ``v_proj``."""

    def __init__(self, config: MPLUGOwl2Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        bias = config.attention_bias
        hidden, kv_dim = config.hidden_size, config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = Multiway(lambda: nn.Linear(hidden, kv_dim, bias=bias))
        self.v_proj = Multiway(lambda: nn.Linear(hidden, kv_dim, bias=bias))
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, hidden, bias=bias)

    def forward(self, hidden_states, modality, position_embeddings, attention_mask, cache=None, **kwargs):
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states, modality).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states, modality).view(shape).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        attention = _attention(self.config._attn_implementation)
        out, _ = attention(
            self, query, key, value, attention_mask,
            dropout=self.config.attention_dropout if self.training else 0.0, scaling=self.scaling,
        )
        return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous())


class MPLUGOwl2DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: MPLUGOwl2Config, layer_idx: int):
        super().__init__()
        norm = lambda: LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = MPLUGOwl2Attention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = Multiway(norm)
        self.post_attention_layernorm = Multiway(norm)

    def forward(self, hidden_states, modality=None, position_embeddings=None, attention_mask=None, cache=None):
        attn = self.self_attn(self.input_layernorm(hidden_states, modality), modality, position_embeddings,
                              attention_mask, cache)
        hidden_states = hidden_states + attn
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states, modality))


# ----- ViT --------------------------------------------------------------------------------------
class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionSettings):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.patch_embed = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, bias=False)
        num_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.position_embedding = nn.Parameter(torch.zeros(1, num_patches + 1, cfg.hidden_size))
        self.pre_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(patches.shape[0], 1, -1).to(patches.dtype)
        embeddings = torch.cat([cls, patches], dim=1)
        embeddings = embeddings + self.position_embedding[:, : embeddings.shape[1]].to(patches.dtype)
        return self.pre_layernorm(embeddings)


class VisionAttention(nn.Module):
    """Fused ``query_key_value`` laid out per head: ``[h0: q k v, h1: q k v, ...]``."""

    def __init__(self, cfg: VisionSettings, config: MPLUGOwl2Config):
        super().__init__()
        self.config = config
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.num_key_value_groups = 1
        self.is_causal = False
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        qkv = self.query_key_value(hidden_states).reshape(batch, length, self.num_heads, 3, self.head_dim)
        query, key, value = qkv.permute(3, 0, 2, 1, 4).unbind(0)
        out, _ = _attention(self.config._attn_implementation)(
            self, query, key, value, None, dropout=0.0, scaling=self.scaling, is_causal=False
        )
        return self.dense(out.reshape(batch, length, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionSettings):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid(1.702 * x))  # QuickGELU


class VisionLayer(GradientCheckpointingLayer):
    def __init__(self, cfg: VisionSettings, config: MPLUGOwl2Config):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg, config)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states))
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionSettings, config: MPLUGOwl2Config):
        super().__init__()
        self.layers = nn.ModuleList([VisionLayer(cfg, config) for _ in range(cfg.num_hidden_layers)])


class VisionModel(nn.Module):
    """Pre-LN ViT; returns every token (CLS included) after ``post_layernorm``."""

    def __init__(self, config: MPLUGOwl2Config):
        super().__init__()
        cfg = config.vision_settings
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoder(cfg, config)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            hidden_states = layer(hidden_states)
        return self.post_layernorm(hidden_states)


# ----- visual abstractor --------------------------------------------------------------------------
class AbstractorAttention(nn.Module):
    """Queries attend to ``[queries; ViT tokens]``; sin-cos positions on queries and keys only."""

    def __init__(self, cfg: AbstractorSettings, config: MPLUGOwl2Config):
        super().__init__()
        self.config = config
        self.cfg = cfg
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.num_key_value_groups = 1
        self.is_causal = False
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.encoder_hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.encoder_hidden_size, cfg.hidden_size)
        q_pos, k_pos = self.sincos_tables(cfg)
        self.register_buffer("q_pos_embed", q_pos)
        self.register_buffer("k_pos_embed", k_pos)

    @staticmethod
    def sincos_tables(cfg: AbstractorSettings) -> tuple[torch.Tensor, torch.Tensor]:
        q_pos = sincos_1d(cfg.hidden_size, np.arange(cfg.num_learnable_queries, dtype=np.float32))
        k_pos = sincos_2d_with_cls(cfg.hidden_size, cfg.grid_size)
        # torch.tensor (not from_numpy) so that the tables follow a `with torch.device(...)` context
        return torch.tensor(q_pos, dtype=torch.float32), torch.tensor(k_pos, dtype=torch.float32)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, queries: torch.Tensor, keys_values: torch.Tensor) -> torch.Tensor:
        pos = torch.cat([self.q_pos_embed, self.k_pos_embed]).unsqueeze(0).to(queries.dtype)
        key = self._heads(self.key(keys_values + pos))
        value = self._heads(self.value(keys_values))
        query = self._heads(self.query(queries + self.q_pos_embed.unsqueeze(0).to(queries.dtype)))
        out, _ = _attention(self.config._attn_implementation)(
            self, query, key, value, None, dropout=0.0, scaling=self.scaling, is_causal=False
        )
        return out.reshape(*queries.shape[:-1], -1)


class AbstractorMLP(nn.Module):
    def __init__(self, cfg: AbstractorSettings):
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.w3 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.ffn_ln = nn.LayerNorm(cfg.intermediate_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.ffn_ln(nn.functional.silu(self.w1(x)) * self.w3(x)))


class AbstractorOutput(nn.Module):
    def __init__(self, cfg: AbstractorSettings):
        super().__init__()
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm2 = nn.LayerNorm(cfg.hidden_size)  # eps 1e-5, as in the original
        self.mlp = AbstractorMLP(cfg)

    def forward(self, context: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        hidden = residual + self.out_proj(context)
        return hidden + self.mlp(self.norm2(hidden))


class AbstractorCrossAttention(nn.Module):
    def __init__(self, cfg: AbstractorSettings, config: MPLUGOwl2Config):
        super().__init__()
        self.attention = AbstractorAttention(cfg, config)
        self.output = AbstractorOutput(cfg)
        self.norm1 = nn.LayerNorm(cfg.hidden_size)  # eps 1e-5, as in the original
        self.normk = nn.LayerNorm(cfg.hidden_size)

    def forward(self, queries: torch.Tensor, vision: torch.Tensor) -> torch.Tensor:
        queries = self.norm1(queries)
        keys_values = torch.cat([queries, self.normk(vision)], dim=1)
        return self.output(self.attention(queries, keys_values), queries)


class AbstractorLayer(GradientCheckpointingLayer):
    def __init__(self, cfg: AbstractorSettings, config: MPLUGOwl2Config):
        super().__init__()
        self.crossattention = AbstractorCrossAttention(cfg, config)

    def forward(self, queries: torch.Tensor, vision: torch.Tensor) -> torch.Tensor:
        return self.crossattention(queries, vision)


class AbstractorEncoder(nn.Module):
    def __init__(self, cfg: AbstractorSettings, config: MPLUGOwl2Config):
        super().__init__()
        self.layers = nn.ModuleList([AbstractorLayer(cfg, config) for _ in range(cfg.num_hidden_layers)])


class VisualAbstractor(nn.Module):
    """ViT tokens ``(N, 1+P, Dv)`` -> ``(N, Q+1, D)``: queries, ``visual_fc``, then ``vit_eos``."""

    def __init__(self, config: MPLUGOwl2Config):
        super().__init__()
        cfg = config.abstractor_settings
        self.encoder = AbstractorEncoder(cfg, config)
        self.query_embeds = nn.Parameter(torch.zeros(1, cfg.num_learnable_queries, cfg.hidden_size))
        self.visual_fc = nn.Linear(cfg.hidden_size, config.hidden_size)
        self.vit_eos = nn.Parameter(torch.zeros(1, 1, config.hidden_size))

    def queries(self, vision: torch.Tensor) -> torch.Tensor:
        """The learnable queries after the cross-attention layers (before ``visual_fc``)."""
        hidden = self.query_embeds.expand(vision.shape[0], -1, -1).to(vision.dtype)
        for layer in self.encoder.layers:
            hidden = layer(hidden, vision)
        return hidden

    def forward(self, vision: torch.Tensor) -> torch.Tensor:
        tokens = self.visual_fc(self.queries(vision))
        return torch.cat([tokens, self.vit_eos.expand(tokens.shape[0], -1, -1).to(tokens.dtype)], dim=1)


# ----- the models ---------------------------------------------------------------------------------
class MPLUGOwl2PreTrainedModel(PreTrainedModel):
    config: MPLUGOwl2Config
    config_class = MPLUGOwl2Config
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MPLUGOwl2DecoderLayer", "VisionLayer", "AbstractorLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False
    # Older conversions of the public checkpoints store RoPE tables; they are recomputed here.
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, VisionEmbeddings):
            init.normal_(module.cls_token, std=std)
            init.normal_(module.position_embedding, std=std)
        elif isinstance(module, VisualAbstractor):
            init.normal_(module.query_embeds, std=std)
            init.normal_(module.vit_eos, std=std)
        elif isinstance(module, AbstractorAttention):
            q_pos, k_pos = module.sincos_tables(module.cfg)
            init.copy_(module.q_pos_embed, q_pos)
            init.copy_(module.k_pos_embed, k_pos)


class MPLUGOwl2Model(MPLUGOwl2PreTrainedModel):
    """Embeddings, decoder layers and final norm of the LLaMA-2 decoder, plus the ViT and abstractor."""

    def __init__(self, config: MPLUGOwl2Config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([MPLUGOwl2DecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.vision_model = VisionModel(config)
        self.visual_abstractor = VisualAbstractor(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` images or frames -> ``(N, Q+1, hidden)`` visual tokens."""
        return self.visual_abstractor(self.vision_model(pixel_values))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs_embeds, modality_indicators)``: the visual tokens of all images, in order, are
        written at the placeholder positions, which get modality 1."""
        is_image = input_ids == self.config.image_token_index
        embeds = self.embed_tokens(input_ids.masked_fill(is_image, 0))
        n_slots = int(is_image.sum())
        if pixel_values is None:
            if n_slots:
                raise ValueError(f"input_ids hold {n_slots} image placeholders but no pixel_values were given")
            return embeds, is_image.long()
        features = self.get_image_features(pixel_values.to(embeds.dtype)).reshape(-1, embeds.shape[-1])
        if features.shape[0] != n_slots:
            raise ValueError(
                f"{pixel_values.shape[0]} images give {features.shape[0]} visual tokens but input_ids hold "
                f"{n_slots} placeholders ({self.config.num_image_tokens} per image or frame)"
            )
        embeds = embeds.masked_scatter(is_image.unsqueeze(-1), features.to(embeds.dtype))
        return embeds, is_image.long()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        modality_indicators: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds, modality_indicators = self.embed(input_ids, pixel_values)
        elif modality_indicators is None:
            modality_indicators = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = _position_ids(attention_mask, inputs_embeds.shape[1], past, inputs_embeds.device)
        mask = create_causal_mask(
            config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache
        )
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)
        hidden_states, all_hidden = inputs_embeds, []
        for layer in self.layers:
            all_hidden.append(hidden_states)
            hidden_states = layer(hidden_states, modality=modality_indicators,
                                  position_embeddings=position_embeddings, attention_mask=mask, cache=cache)
        hidden_states = self.norm(hidden_states)
        all_hidden.append(hidden_states)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache,
                                       hidden_states=tuple(all_hidden) if output_hidden_states else None)


def _position_ids(attention_mask: torch.Tensor | None, length: int, past: int, device) -> torch.Tensor:
    """``0..n-1`` counted from each row's first real token (left padding safe); without a mask,
    or with right padding, plain ``arange`` as in the original."""
    positions = torch.arange(past, past + length, device=device).unsqueeze(0)
    if attention_mask is None or attention_mask.dim() != 2:
        return positions
    leading_pads = (attention_mask != 0).long().argmax(dim=1, keepdim=True)
    return (positions - leading_pads).clamp(min=0)


def _kept_positions(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """The hidden states to project onto the vocabulary, as transformers' ``slice_logits_to_keep``
    (5.21+) selects them: an int keeps the last ``n`` positions (0: all), a 1-D tensor the same
    positions of every row, a 2-D integer tensor ``(batch, n)`` positions per row, a 2-D boolean
    ``(batch, length)`` mask its True positions (flattened to ``(kept, hidden)``)."""
    if isinstance(logits_to_keep, int):
        return hidden_states[:, slice(-logits_to_keep, None), :]
    if logits_to_keep.dim() == 2 and logits_to_keep.dtype == torch.bool:
        return hidden_states[logits_to_keep]
    if logits_to_keep.dim() == 2:
        return torch.take_along_dim(hidden_states, logits_to_keep[..., None], dim=1)
    return hidden_states[:, logits_to_keep, :]


class MPLUGOwl2ForConditionalGeneration(MPLUGOwl2PreTrainedModel, GenerationMixin):
    """The full model (``model.*`` + ``lm_head``); ``forward`` returns logits and the LM loss."""

    _tied_weights_keys: dict[str, str] = {}

    def __init__(self, config: MPLUGOwl2Config):
        super().__init__(config)
        self.model = MPLUGOwl2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """``pixel_values``: ``(N, 3, H, W)``, every image or video frame of the batch in order;
        ``input_ids`` hold ``config.num_image_tokens`` placeholders for each of them.
        ``logits_to_keep`` selects the positions projected onto the vocabulary as transformers'
        models do (see :func:`_kept_positions`)."""
        out = self.model(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
            position_ids=position_ids, cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = out.last_hidden_state
        logits = self.lm_head(_kept_positions(hidden_states, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size,
                                      num_items_in_batch=kwargs.get("num_items_in_batch"))
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache, hidden_states=out.hidden_states)

    def prepare_inputs_for_generation(self, input_ids, cache=None, pixel_values=None, **kwargs):
        inputs = super().prepare_inputs_for_generation(input_ids, cache=cache, **kwargs)
        if cache is None or cache.get_seq_length() == 0:
            inputs["pixel_values"] = pixel_values  # the images are needed only for the prompt
        return inputs
