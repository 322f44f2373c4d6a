"""Dilated attention (LongNet), exactly as DESIGN.md §4 defines it.

Public entry points:

- :func:`dilated_attention` — one process, ``[b, n, H, d]`` in and out.
- :func:`dilated_attention_parallel` — the sequence sharded over a process group;
  head-parallel (all-to-all) when heads >= ranks, LongNet's sequence-parallel scheme
  otherwise (see :mod:`.dilated_parallel`).
- :func:`dilated_attention_flops` — forward FLOPs of the attended pairs (for logs and
  benchmarks: Megatron's formula assumes dense attention).
- :func:`dilated_attention_reference` — dense float64 reference (tests only).

Implementation map: :mod:`.dilated_strided` (gather-free blocks: strided views, in-place
LSE merge), :mod:`.dilated_plan` (index plans: which rows/heads form each dense block,
for GQA layouts the views cannot express and for the sequence-parallel fallback),
:mod:`.dilated_blocks` (index gather, local kernel, LSE merge, scatter),
:mod:`.dilated_local` (the autograd Function), :mod:`.dilated_comm` (all-to-all).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron_fapool.attention.dilated.args import check_dilated_args
from megatron_fapool.attention.dilated.blocks import DEFAULT_MAX_ROWS_X_HEADS
from megatron_fapool.attention.dilated.comm import comm_counters, reset_comm_counters
from megatron_fapool.attention.dilated.local import dilated_local
from megatron_fapool.attention.dilated.parallel import dilated_attention_parallel, shard_sequence
from megatron_fapool.attention.dilated.plan import dilated_attention_flops
from megatron_fapool.attention.dilated.reference import (
    dilated_attention_reference,
    dilated_attention_reference_vjp,
)

__all__ = [
    "comm_counters",
    "dilated_attention",
    "dilated_attention_flops",
    "dilated_attention_parallel",
    "dilated_attention_reference",
    "dilated_attention_reference_vjp",
    "reset_comm_counters",
    "shard_sequence",
]


def dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    *,
    head_offset: int = 0,
    total_heads: Optional[int] = None,
    backend: str = "auto",
    return_lse: bool = False,
    max_rows_x_heads: Optional[int] = DEFAULT_MAX_ROWS_X_HEADS,
    max_view_elements: Optional[int] = None,
):
    """Dilated attention on ``[batch, seq, heads, head_dim]``; returns ``[b, n, H, d]``.

    Branch k has segment length ``segment_lengths[k]`` and dilation rate
    ``dilation_rates[k]``. The local heads are global heads ``head_offset ..
    head_offset + H - 1`` of ``total_heads`` (default: ``head_offset + H``); head offsets
    ``s = h // ceil(total_heads / r)`` use the global index, so a rank holding a subset
    of heads computes the same result as one holding all of them. K/V may have fewer
    heads (GQA, ``H % H_kv == 0``). Gradients are exact (flow to q, k, v).

    With ``return_lse``: ``(out, lse [b, H, n] fp32)``; lse is not differentiable.
    ``max_rows_x_heads`` bounds the query rows x heads of one kernel call on copied blocks
    (memory); ``max_view_elements`` the q elements of one call made straight on the input
    (rate-1 branches; default :data:`~.dilated_strided.DEFAULT_MAX_VIEW_ELEMENTS`).
    """
    args = check_dilated_args(q, k, v, segment_lengths, dilation_rates, softmax_scale, head_offset, total_heads)
    out, lse = dilated_local(q, k, v, args, causal, backend, max_rows_x_heads, max_view_elements)
    return (out, lse) if return_lse else out
