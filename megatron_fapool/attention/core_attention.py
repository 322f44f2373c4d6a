"""The one Megatron core-attention module of the package, with its behaviour composed.

:class:`FapoolCoreAttention` is a drop-in replacement for Megatron's
``DotProductAttention`` (same constructor and ``forward``: ``[sq, b, heads, head_dim]``
in, ``[sq, b, hidden]`` out), so a layer spec swaps only this submodule. Unlike
Megatron's local one it needs no CUDA memory buffer (it runs on CPU) and uses the
fastest kernel for the device, GQA handled natively.

What it computes is an *attend* strategy given in the spec's params (Megatron's idea:
variation in the spec, not in subclasses), called with ``[b, s, h, d]`` tensors:

* :class:`Dense` — the single-device kernels;
* :class:`Dilated` — LongNet dilated attention over this rank's heads;
* :class:`Pooled` — ``Pooled(Dense(...), pool)`` or ``Pooled(Dilated(...), pool)``: above
  the pool's threshold the call goes to the pool's algorithm for that kind of attention
  (zigzag query chunks for dense, a heads split for dilated);
* a KV-cached strategy for inference lives with the session
  (:class:`megatron_fapool.inference.session.KVCached`), wrapping one of these.

A strategy is called as ``attend(layer, q, k, v, causal=...)``; ``layer`` is this module,
which carries what strategies need of the layer (softmax scale, heads, the global index
of its first head, layer number).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide

from .dilated import dilated_attention
from .kernels import BackendSelector, local_attention
from .pool import AttentionPool, PooledAttention, PooledHeadsAttention

__all__ = ["Dense", "Dilated", "FapoolCoreAttention", "Pooled"]


class Dense:
    """Attention of the layer's heads on this rank, by the single-device kernels."""

    def __init__(self, backend: str = "auto"):
        self.backend = backend
        self.selector = BackendSelector()  # what "auto" learned at run time, for every layer of the model

    def __call__(self, layer: "FapoolCoreAttention", q, k, v, *, causal: bool) -> torch.Tensor:
        return local_attention(q, k, v, causal=causal, softmax_scale=layer.softmax_scale, backend=self.backend,
                               selector=self.selector)

    def pooled(self, layer: "FapoolCoreAttention", q, k, v, *, causal: bool, pool: AttentionPool, active: int):
        return PooledAttention.apply(q, k, v, pool.client, active, causal, layer.softmax_scale)

    def max_pool_members(self, layer: "FapoolCoreAttention") -> int | None:
        return None

    def __repr__(self) -> str:
        return f"Dense(backend={self.backend!r})"


class Dilated:
    """LongNet dilated attention (DESIGN.md §4) of the layer's heads, with global head offsets.

    Head offsets of the branches use the *global* head index, so the model computes the
    same function at any TP size.
    """

    self_attention_only = True

    def __init__(self, segment_lengths: Sequence[int], dilation_rates: Sequence[int], backend: str = "auto"):
        if len(segment_lengths) != len(dilation_rates) or not segment_lengths:
            raise ValueError(
                f"segment_lengths {list(segment_lengths)} and dilation_rates {list(dilation_rates)} must be"
                " non-empty and of equal length (one (w, r) pair per branch)"
            )
        self.segment_lengths = tuple(int(w) for w in segment_lengths)
        self.dilation_rates = tuple(int(r) for r in dilation_rates)
        self.backend = backend

    def __call__(self, layer: "FapoolCoreAttention", q, k, v, *, causal: bool) -> torch.Tensor:
        return dilated_attention(
            q, k, v, self.segment_lengths, self.dilation_rates, causal, layer.softmax_scale,
            head_offset=layer.head_offset, total_heads=layer.total_heads, backend=self.backend,
        )

    def pooled(self, layer: "FapoolCoreAttention", q, k, v, *, causal: bool, pool: AttentionPool, active: int):
        return PooledHeadsAttention.apply(
            q, k, v, pool.client, active, self.segment_lengths, self.dilation_rates, causal,
            layer.softmax_scale, layer.head_offset, layer.total_heads,
        )

    def max_pool_members(self, layer: "FapoolCoreAttention") -> int | None:
        return layer.num_heads - 1  # a member needs at least one query head

    def __repr__(self) -> str:
        return f"Dilated({list(self.segment_lengths)}, {list(self.dilation_rates)}, backend={self.backend!r})"


class Pooled:
    """``inner`` on this rank for short sequences; through ``pool`` above its threshold."""

    def __init__(self, inner: Dense | Dilated, pool: AttentionPool):
        self.inner = inner
        self.pool = pool
        self.self_attention_only = getattr(inner, "self_attention_only", False)

    def active_for(self, layer: "FapoolCoreAttention", n: int) -> int:
        """Pool ranks that join a call over ``n`` tokens (0: the call stays on this rank)."""
        active = self.pool.manager.decide(n)
        cap = self.inner.max_pool_members(layer)
        return max(0, min(active, cap)) if cap is not None else active

    def __call__(self, layer: "FapoolCoreAttention", q, k, v, *, causal: bool) -> torch.Tensor:
        active = self.active_for(layer, q.shape[1])
        if active == 0:
            self.pool.stats.local_calls += 1
            return self.inner(layer, q, k, v, causal=causal)
        return self.inner.pooled(layer, q, k, v, causal=causal, pool=self.pool, active=active)

    def __repr__(self) -> str:
        return f"Pooled({self.inner!r})"


class FapoolCoreAttention(MegatronModule):
    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
        *,
        attend=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context_parallel_size must be 1: the attention pool replaces context parallelism")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(
                f"attention_dropout={dropout} is not supported by the fapool core attention: set"
                " attention_dropout: 0.0 in the model YAML (long-context training runs without it)"
            )
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask, AttnMaskType.padding_causal):
            raise ValueError(f"attn_mask_type {attn_mask_type} is not supported (causal or no_mask)")
        self.attend = attend if attend is not None else Dense()
        if getattr(self.attend, "self_attention_only", False) and attention_type != "self":
            raise ValueError(f"{self.attend!r} is self-attention only, got attention_type={attention_type!r}")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp = pg_collection.tp
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.num_heads = divide(config.num_attention_heads, tp.size())
        self.num_query_groups = divide(config.num_query_groups, tp.size())
        self.head_dim = config.kv_channels
        self.total_heads = config.num_attention_heads
        self.head_offset = tp.rank() * self.num_heads  # global index of this rank's first head
        # apply_query_key_layer_scaling only changes fp16 numerics in Megatron (scores / coeff,
        # then softmax(coeff * scores)); the kernels here accumulate in fp32, so the scale is unchanged.
        self.softmax_scale = 1.0 / math.sqrt(self.head_dim) if softmax_scale is None else softmax_scale

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None:
            raise NotImplementedError("packed sequences are not supported by the fapool core attention")
        if attention_bias is not None:
            raise NotImplementedError("attention bias is not supported by the fapool core attention")
        mask_type = attn_mask_type or self.attn_mask_type
        causal = mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        if not causal and attention_mask is not None:
            raise NotImplementedError(
                "arbitrary attention masks are not supported: use a causal or no-mask attention type"
            )
        sq, b = query.shape[:2]
        # [s, b, h, d] -> [b, s, h, d]: views; everything below this line is [b, s, h, d]
        q, k, v = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        out = self.attend(self, q, k, v, causal=causal)
        return out.transpose(0, 1).reshape(sq, b, self.num_heads * self.head_dim)
