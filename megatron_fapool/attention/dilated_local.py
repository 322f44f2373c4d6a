"""Single-process dilated attention: all branches of all local heads, one autograd Function.

Forward: every branch's dense blocks go through ``attention_forward`` and are merged by
log-sum-exp into one (out, lse). Backward: every block goes through
``attention_backward`` with the merged out/lse, and the contributions add up, so the
gradient is exact including through the merge weights.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_fapool.attention.dilated_args import DilatedArgs
from megatron_fapool.attention.dilated_blocks import (
    DEFAULT_MAX_ROWS_X_HEADS,
    accumulator_dtype,
    blocks_backward_,
    blocks_forward_,
)
from megatron_fapool.attention.dilated_plan import BlockGroup, plan_branch

__all__ = ["DilatedLocalFunction", "dilated_local", "lse_dtype", "new_accumulators", "plan_all_branches"]

Plans = tuple[tuple[BlockGroup, ...], ...]


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def new_accumulators(q: torch.Tensor, seq_len: int, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero output [b, n, H, d] and -inf lse [b, n, H] (sequence-major) accumulators."""
    b, d = q.shape[0], q.shape[3]
    acc_out = torch.zeros(b, seq_len, num_heads, d, dtype=accumulator_dtype(q.dtype), device=q.device)
    acc_lse = torch.full((b, seq_len, num_heads), float("-inf"), dtype=lse_dtype(q.dtype), device=q.device)
    return acc_out, acc_lse


def plan_all_branches(
    seq_len: int, args: DilatedArgs, num_heads: int, causal: bool, device: torch.device
) -> Plans:
    return tuple(
        plan_branch(
            seq_len, w, r, total_heads=args.total_heads, first_head=args.head_offset,
            num_heads=num_heads, kv_group=args.kv_group, causal=causal, device=device,
        )
        for w, r in zip(args.segment_lengths, args.dilation_rates)
    )


class DilatedLocalFunction(torch.autograd.Function):
    """(q, k, v) -> (out [b, n, H, d] in q.dtype, lse [b, H, n] fp32, not differentiable)."""

    @staticmethod
    def forward(ctx, q, k, v, plans: Plans, softmax_scale: float, backend: str, max_rows: Optional[int]):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # gathers index [b, n*H, d] views
        acc_out, acc_lse = new_accumulators(q, q.shape[1], q.shape[2])
        for i, groups in enumerate(plans):
            blocks_forward_(
                acc_out, acc_lse, q, k, v, groups,
                softmax_scale=softmax_scale, backend=backend, max_rows_x_heads=max_rows, merge=i > 0,
            )
        out = acc_out.to(q.dtype)
        del acc_out
        lse = acc_lse.transpose(1, 2).contiguous()
        ctx.save_for_backward(q, k, v, out, acc_lse)  # lse kept sequence-major for gathers
        ctx.mark_non_differentiable(lse)
        ctx.plans, ctx.softmax_scale, ctx.backend, ctx.max_rows = plans, softmax_scale, backend, max_rows
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse_seq = ctx.saved_tensors
        dout = dout.contiguous()
        acc = accumulator_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        for groups in ctx.plans:
            blocks_backward_(
                dq, dk, dv, dout, q, k, v, out, lse_seq, groups,
                softmax_scale=ctx.softmax_scale, backend=ctx.backend, max_rows_x_heads=ctx.max_rows,
            )
        # Cast one at a time: each fp32 accumulator is freed before the next cast (peak memory).
        dq = dq.to(q.dtype)
        dk = dk.to(k.dtype)
        dv = dv.to(v.dtype)
        return dq, dk, dv, None, None, None, None


def dilated_local(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    args: DilatedArgs,
    causal: bool,
    backend: str,
    max_rows_x_heads: Optional[int] = DEFAULT_MAX_ROWS_X_HEADS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked args in, (out, lse) out; the sequence is q.shape[1] long."""
    plans = plan_all_branches(q.shape[1], args, q.shape[2], causal, q.device)
    return DilatedLocalFunction.apply(q, k, v, plans, args.softmax_scale, backend, max_rows_x_heads)
