"""Megatron core-attention module backed by the local kernels.

A drop-in replacement for Megatron's ``DotProductAttention`` (same constructor and
``forward`` signature, ``[sq, b, heads, head_dim]`` in, ``[sq, b, hidden]`` out), so a
layer spec swaps only this submodule. Unlike Megatron's local one it needs no CUDA
memory buffer, so it runs on CPU, and it uses the fastest kernel for the device
(SDPA flash / cuDNN, FlexAttention, flash-attn) with GQA handled natively.
Subclasses (the attention pool, dilated attention) override :meth:`attend`.
"""

from __future__ import annotations

import math

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide

from .kernels import local_attention

__all__ = ["LocalCoreAttention"]


class LocalCoreAttention(MegatronModule):
    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        backend: str = "auto",
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
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp_size = pg_collection.tp.size()
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.backend = backend
        self.num_heads = divide(config.num_attention_heads, tp_size)
        self.num_query_groups = divide(config.num_query_groups, tp_size)
        self.head_dim = config.kv_channels
        # apply_query_key_layer_scaling only changes fp16 numerics in Megatron (scores / coeff,
        # then softmax(coeff * scores)); the kernels here accumulate in fp32, so the scale is unchanged.
        self.softmax_scale = 1.0 / math.sqrt(self.head_dim) if softmax_scale is None else softmax_scale

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool) -> torch.Tensor:
        """``[b, s, h, d]`` attention of this rank's heads; override to distribute it."""
        return local_attention(q, k, v, causal=causal, softmax_scale=self.softmax_scale, backend=self.backend)

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
        # [s, b, h, d] -> [b, s, h, d] (views; kernels take strided inputs or copy once)
        out = self.attend(query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), causal=causal)
        return out.transpose(0, 1).reshape(sq, b, self.num_heads * self.head_dim)
