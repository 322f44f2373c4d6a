"""Dilated attention (LongNet), exactly as DESIGN.md §4 defines it, on one process.

Public entry points:

- :func:`dilated_attention` — ``[b, n, H, d]`` in and out, exact gradients. A process
  holding a subset of the heads passes their global offset (``head_offset``,
  ``total_heads``); that is how the attention pool's heads split
  (:mod:`megatron_fapool.attention.pool.heads`) and tensor parallelism use it.
- :func:`dilated_attention_flops` — forward FLOPs of the attended pairs (for logs and
  benchmarks: Megatron's formula assumes dense attention).
- :func:`dilated_attention_reference`, :func:`dilated_attention_reference_vjp` — dense
  float64 definition (tests and benchmark checks).
- :func:`check_dilated_args` / :class:`DilatedArgs` — the call's arguments, defined and
  checked once (:mod:`.args`).

Modules: :mod:`.args` (the call), :mod:`.plan` (the definition's arithmetic and the index
plans), :mod:`.strided` (gather-free blocks: strided views, in-place LSE merge),
:mod:`.blocks` (index gather, kernel, LSE merge, scatter), :mod:`.function` (the autograd
Function over both), :mod:`.reference` (float64 definition).

Words for the pieces of a sequence (one each):

- *branch*: one (segment length ``w``, dilation rate ``r``) pair.
- *segment*: ``w~ = min(w, n)`` consecutive positions; a *segment run* is consecutive
  segments of one length (the full ones, or the partial last one).
- *offset class*: the heads sharing one offset ``s`` and, in each segment, the positions
  ``≡ s (mod r)``.
- *block*: one offset class inside one segment: a dense attention problem of
  ``ceil((len - s) / r)`` rows.
- *stack*: blocks of one shape that one strided view holds; *group*: blocks of one shape
  gathered by index (:class:`~.plan.BlockGroup`).
- *chunk*: the part of a stack or group that one kernel call takes (bounded in memory).

Head parallelism over ranks is the attention pool's heads split
(:mod:`megatron_fapool.attention.pool.heads`).
"""

from __future__ import annotations

import torch

from collections.abc import Sequence

from .args import DilatedArgs, check_dilated_args
from .blocks import DEFAULT_MAX_ROWS_X_HEADS
from .function import run_dilated
from .plan import dilated_attention_flops
from .reference import dilated_attention_reference, dilated_attention_reference_vjp

__all__ = [
    "DilatedArgs",
    "check_dilated_args",
    "dilated_attention",
    "dilated_attention_flops",
    "dilated_attention_reference",
    "dilated_attention_reference_vjp",
]


def dilated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    causal: bool = True,
    softmax_scale: float | None = None,
    *,
    head_offset: int = 0,
    total_heads: int | None = None,
    backend: str = "auto",
    return_lse: bool = False,
    max_rows_x_heads: int | None = DEFAULT_MAX_ROWS_X_HEADS,
    max_view_elements: int | None = None,
):
    """Dilated attention on ``[batch, seq, heads, head_dim]``; returns ``[b, n, H, d]``.

    Branch ``k`` has segment length ``segment_lengths[k]`` and dilation rate
    ``dilation_rates[k]``; the local heads are global heads ``head_offset ..`` of
    ``total_heads`` (checked by :func:`check_dilated_args`). Gradients are exact (flow to
    q, k, v). The other named arguments are kernel options: ``backend`` the kernel
    (:mod:`megatron_fapool.attention.kernels`); with ``return_lse`` ``(out, lse [b, H, n]
    fp32)`` (lse not differentiable); ``max_rows_x_heads`` bounds the query rows x heads of
    one kernel call on copied blocks (memory); ``max_view_elements`` the q elements of one
    call made straight on the input (rate-1 branches; default
    :data:`~.strided.DEFAULT_MAX_VIEW_ELEMENTS`).
    """
    args = check_dilated_args(q, k, v, segment_lengths, dilation_rates, causal, softmax_scale,
                              head_offset=head_offset, total_heads=total_heads)
    out, lse = run_dilated(q, k, v, args, backend, max_rows_x_heads, max_view_elements)
    return (out, lse) if return_lse else out
