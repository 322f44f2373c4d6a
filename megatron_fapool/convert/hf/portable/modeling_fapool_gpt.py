"""``fapool_gpt``: the function of a Megatron-Core ``GPTModel`` built with the fapool layer spec, in PyTorch.

Self-contained (imports only ``torch`` and ``transformers``): copied into every ``fapool_gpt``
export with :mod:`configuration_fapool_gpt` (``auto_map`` in ``config.json``). For models no
transformers architecture computes exactly: learned absolute positions, non-gated (GELU)
experts, LayerNorm, q/k layernorm, ...

Each block follows Megatron's op order (megatron-core 0.16.1, local spec):

* embeddings: ``embed_tokens(ids) (+ embed_positions(position_ids))``;
* layer: ``x + o_proj(attn(input_layernorm(x)))``, then ``x + mlp(post_attention_layernorm(x))``;
  torch's ``RMSNorm`` / ``LayerNorm`` (what Megatron builds without Apex or TE);
* attention: q, k, v per head (GQA: query head ``i`` uses kv head ``i // (heads / kv_heads)``),
  q/k layernorm over the head dim, then half-split RoPE (``rotate_half``, Megatron's
  non-interleaved convention), causal softmax attention scaled by ``1 / sqrt(head_dim)``;
* MLP: ``down(act(up(x)))``, or ``down(act(gate(x)) * up(x))`` when gated;
* MoE (Megatron's ``TopKRouter`` defaults, ``SequentialMLP`` experts): logits
  ``x W_r^T (+ b_r)`` in ``router_dtype``; per token the top-k logits, softmax over those k
  (fp32); each chosen expert ``e`` computes ``act(x W1_e^T + b1_e) * p_e`` then
  ``W2_e (+ b2_e * p_e)``; the outputs are summed. No capacity: no token is dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_fapool_gpt import FapoolGPTConfig

__all__ = ["FapoolGPTForCausalLM", "FapoolGPTModel", "FapoolGPTPreTrainedModel"]

_ROUTER_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


def _norm(config: FapoolGPTConfig, size: int) -> nn.Module:
    if config.normalization == "RMSNorm":
        return nn.RMSNorm(size, eps=config.norm_eps)
    return nn.LayerNorm(size, eps=config.norm_eps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class FapoolGPTRotaryEmbedding(nn.Module):
    """Half-split RoPE: ``inv_freq = 1 / base^(2i/d)``, ``emb = cat(freqs, freqs)`` (Megatron's and HF's default).

    The frequencies are computed at each forward (no buffer: ``from_pretrained`` builds modules on
    the meta device and would leave a non-persistent buffer uninitialised)."""

    def __init__(self, config: FapoolGPTConfig):
        super().__init__()
        self.dim = config.head_dim
        self.base = float(config.rotary_base)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        exponent = torch.arange(0, self.dim, 2, dtype=torch.int64, device=x.device).float() / self.dim
        inv_freq = 1.0 / (self.base ** exponent)
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    rep = module.num_key_value_groups
    if rep > 1:
        key = key.repeat_interleave(rep, dim=1)
        value = value.repeat_interleave(rep, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


class FapoolGPTAttention(nn.Module):
    def __init__(self, config: FapoolGPTConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = 1.0 / math.sqrt(self.head_dim)
        self.is_causal = True
        qkv_bias = config.linear_bias or config.qkv_bias
        h, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(h, config.num_attention_heads * d, bias=qkv_bias)
        self.k_proj = nn.Linear(h, config.num_key_value_heads * d, bias=qkv_bias)
        self.v_proj = nn.Linear(h, config.num_key_value_heads * d, bias=qkv_bias)
        self.o_proj = nn.Linear(config.num_attention_heads * d, h, bias=config.linear_bias)
        if config.qk_layernorm:
            self.q_norm = _norm(config, d)
            self.k_norm = _norm(config, d)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape)
        k = self.k_proj(hidden_states).view(shape)
        v = self.v_proj(hidden_states).view(shape)
        if self.config.qk_layernorm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, heads, s, d]
        if position_embeddings is not None:
            cos, sin = (t.unsqueeze(1) for t in position_embeddings)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, _eager_attention)
        out, weights = attention(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
        out = out.reshape(*hidden_states.shape[:-1], -1).contiguous()
        return self.o_proj(out), weights


class FapoolGPTMLP(nn.Module):
    def __init__(self, config: FapoolGPTConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.linear_bias
        self.gated = config.gated_mlp
        if self.gated:
            self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        if self.gated:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act_fn(self.up_proj(x)))


class FapoolGPTRouter(nn.Module):
    """Megatron's ``TopKRouter`` (softmax score function, ``pre_softmax=False``, no capacity)."""

    def __init__(self, config: FapoolGPTConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.dtype = _ROUTER_DTYPES[config.router_dtype]
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.bias = nn.Parameter(torch.empty(config.num_experts)) if config.linear_bias else None

    def forward(self, x: torch.Tensor):
        """``x [tokens, h]`` -> ``(top-k probabilities [tokens, k] fp32, expert ids [tokens, k])``."""
        w = self.weight.to(self.dtype)
        logits = x.to(self.dtype) @ w.t()
        if self.bias is not None:
            logits = logits + self.bias.to(self.dtype)
        top, ids = torch.topk(logits, k=self.top_k, dim=1)
        probs = torch.softmax(top, dim=-1, dtype=torch.float32).type_as(logits)
        return probs, ids


class FapoolGPTExperts(nn.Module):
    """Experts as 3D tensors: ``up_proj [E, I, H]`` (``[E, 2I, H]`` gate first when gated), ``down_proj [E, H, I]``."""

    def __init__(self, config: FapoolGPTConfig):
        super().__init__()
        e, h, i = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gated = config.gated_mlp
        fc1 = 2 * i if self.gated else i
        self.up_proj = nn.Parameter(torch.empty(e, fc1, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))
        if config.linear_bias:
            self.up_proj_bias = nn.Parameter(torch.empty(e, fc1))
            self.down_proj_bias = nn.Parameter(torch.empty(e, h))
        else:
            self.up_proj_bias = self.down_proj_bias = None
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor, probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e in torch.unique(ids).tolist():
            token, slot = torch.where(ids == e)
            p = probs[token, slot].unsqueeze(-1)
            y = F.linear(x[token], self.up_proj[e], None if self.up_proj_bias is None else self.up_proj_bias[e])
            if self.gated:
                gate, up = y.chunk(2, dim=-1)
                y = self.act_fn(gate) * up
            else:
                y = self.act_fn(y)
            y = (y * p).to(x.dtype)
            y = F.linear(y, self.down_proj[e])
            if self.down_proj_bias is not None:
                y = y + self.down_proj_bias[e] * p
            out.index_add_(0, token, y.to(out.dtype))
        return out


class FapoolGPTMoE(nn.Module):
    def __init__(self, config: FapoolGPTConfig):
        super().__init__()
        self.router = FapoolGPTRouter(config)
        self.experts = FapoolGPTExperts(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        probs, ids = self.router(flat)
        return self.experts(flat, probs, ids).reshape(shape)


class FapoolGPTDecoderLayer(nn.Module):
    def __init__(self, config: FapoolGPTConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = _norm(config, config.hidden_size)
        self.self_attn = FapoolGPTAttention(config, layer_idx)
        self.post_attention_layernorm = _norm(config, config.hidden_size)
        self.mlp = FapoolGPTMoE(config) if config.num_experts else FapoolGPTMLP(config)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, past_key_values=None, **kwargs):
        attn, _ = self.self_attn(self.input_layernorm(hidden_states), position_embeddings=position_embeddings,
                                 attention_mask=attention_mask, past_key_values=past_key_values, **kwargs)
        hidden_states = hidden_states + attn
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class FapoolGPTPreTrainedModel(PreTrainedModel):
    config_class = FapoolGPTConfig
    config: FapoolGPTConfig
    base_model_prefix = "model"
    _no_split_modules = ["FapoolGPTDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module):
        # transformers' init functions skip tensors already loaded from a checkpoint
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, FapoolGPTExperts):
            for p in (module.up_proj, module.down_proj):
                init.normal_(p, mean=0.0, std=std)
            for p in (module.up_proj_bias, module.down_proj_bias):
                if p is not None:
                    init.zeros_(p)
        elif isinstance(module, FapoolGPTRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)


class FapoolGPTModel(FapoolGPTPreTrainedModel):
    def __init__(self, config: FapoolGPTConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position_embedding_type == "learned_absolute":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.rotary_emb = FapoolGPTRotaryEmbedding(config) if config.position_embedding_type == "rope" else None
        self.layers = nn.ModuleList(FapoolGPTDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = _norm(config, config.hidden_size)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values: Cache | None = None,
                inputs_embeds=None, use_cache: bool | None = None, **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + seen).unsqueeze(0)
        mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  past_key_values=past_key_values, position_ids=position_ids)
        hidden = inputs_embeds
        if self.config.position_embedding_type == "learned_absolute":
            hidden = hidden + self.embed_positions(position_ids)
        rope = self.rotary_emb(hidden, position_ids) if self.rotary_emb is not None else None
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rope, past_key_values=past_key_values,
                           **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden), past_key_values=past_key_values)


class FapoolGPTForCausalLM(FapoolGPTPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: FapoolGPTConfig):
        super().__init__(config)
        self.model = FapoolGPTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs) -> CausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)
