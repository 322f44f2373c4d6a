"""The dilated-attention autograd Function: all branches of all heads of one call.

Forward: every branch's dense blocks go through ``attention_forward`` and are merged by
log-sum-exp into one running (out, lse). Backward: every block goes through
``attention_backward`` with the merged out/lse, and the contributions add up, so the
gradient is exact including through the merge weights.

Blocks come from the gather-free strided plan (:mod:`.strided`) whenever the branch
allows it (always without GQA), else from the index-gather plan (:mod:`.plan`,
:mod:`.blocks`). A rate-1 branch runs first: it covers every (row, head), so its kernel
output *is* the initial accumulator (no zero fill, no merge) and likewise its gradients
start the gradient accumulators.

Accumulators are in the input dtype (the lse in fp32, fp64 for fp64 inputs): each merge
step is one ``lerp_`` computed in fp32 and rounded once, each gradient step one ``add_``
computed in fp32 and rounded once; at most one rounding per branch, no fp32 copies of
``[b, n, H, d]`` tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import attention_backward, attention_forward
from ..kernels.layout import accumulator_dtype
from .args import DilatedArgs
from .blocks import DEFAULT_MAX_ROWS_X_HEADS, blocks_backward_, blocks_forward_
from .plan import BlockGroup, plan_branch
from .strided import (
    DEFAULT_MAX_VIEW_ELEMENTS,
    Stack,
    from_blocks,
    lse_from_blocks,
    lse_to_blocks,
    plan_stacks,
    stack_chunks,
    stack_view,
    to_blocks,
)

__all__ = [
    "BranchPlan",
    "DilatedAttentionFunction",
    "kernel_calls",
    "plan_all_branches",
    "run_dilated",
]


@dataclass(frozen=True)
class BranchPlan:
    """One branch: gather-free ``stacks``, or (when those cannot express it) index ``groups``."""

    stacks: tuple[Stack, ...] | None
    groups: tuple[BlockGroup, ...] = ()

    @property
    def covers_all(self) -> bool:
        """Rate 1 through stacks: every (row, head) is in exactly one block."""
        return self.stacks is not None and bool(self.stacks) and all(s.covers_all for s in self.stacks)


Plans = tuple[BranchPlan, ...]


def plan_all_branches(seq_len: int, args: DilatedArgs, num_heads: int, device: torch.device) -> Plans:
    """Branch plans, a covering (rate-1) branch first when there is one."""
    plans = []
    for w, r in zip(args.segment_lengths, args.dilation_rates):
        stacks = plan_stacks(seq_len, w, r, args.total_heads, args.head_offset, num_heads, args.kv_group)
        if stacks is not None:
            plans.append(BranchPlan(stacks))
            continue
        groups = plan_branch(
            seq_len, w, r, total_heads=args.total_heads, first_head=args.head_offset,
            num_heads=num_heads, kv_group=args.kv_group, causal=args.causal, device=device,
        )
        plans.append(BranchPlan(None, groups))
    first = next((i for i, p in enumerate(plans) if p.covers_all), None)
    if first:
        plans.insert(0, plans.pop(first))
    return tuple(plans)


@dataclass(frozen=True)
class _Opts:
    causal: bool
    softmax_scale: float
    backend: str
    kv_group: int
    max_rows: int | None
    max_view: int | None


def _chunks(plan: BranchPlan, head_dim: int, o: _Opts):
    for stack in plan.stacks:
        yield from stack_chunks(stack, head_dim, o.max_rows, o.max_view)


def _whole(chunk: Stack, x: torch.Tensor) -> bool:
    """The chunk is the whole sequence in kernel layout (its result is a [b, n, ...] view)."""
    return chunk.rate == 1 and chunk.g0 == 0 and chunk.count * chunk.m == x.shape[1]


def _forward(q, k, v, plans: Plans, o: _Opts) -> tuple[torch.Tensor, torch.Tensor]:
    b, n, heads, d = q.shape
    acc_out = acc_lse = None
    start = 0
    if plans and plans[0].covers_all:
        chunks = list(_chunks(plans[0], d, o))
        for chunk in chunks:
            out_b, lse_b = _stack_attention(q, k, v, chunk, o)
            lse_v = lse_from_blocks(lse_b, b, chunk.classes)
            if len(chunks) == 1 and _whole(chunk, q):
                acc_out = out_b.view(b, n, heads, d)
                # later branches merge into strided views of the accumulators: keep them contiguous
                acc_lse = lse_v.reshape(b, n, heads).contiguous()
                break
            if acc_out is None:
                acc_out = torch.empty_like(q)
                acc_lse = torch.empty(b, n, heads, dtype=accumulator_dtype(q.dtype), device=q.device)
            stack_view(acc_out, chunk).copy_(from_blocks(out_b, b, chunk.classes))
            stack_view(acc_lse, chunk).copy_(lse_v)
            del out_b, lse_b, lse_v
        start = 1
    else:
        acc_out = torch.zeros_like(q)
        acc_lse = torch.full((b, n, heads), float("-inf"), dtype=accumulator_dtype(q.dtype), device=q.device)
    for plan in plans[start:]:
        if plan.stacks is None:
            blocks_forward_(
                acc_out, acc_lse, q, k, v, plan.groups, softmax_scale=o.softmax_scale,
                backend=o.backend, max_rows_x_heads=o.max_rows,
            )
            continue
        for chunk in _chunks(plan, d, o):
            out_b, lse_b = _stack_attention(q, k, v, chunk, o)
            _merge_(acc_out, acc_lse, chunk, out_b, lse_b)
            del out_b, lse_b
    return acc_out, acc_lse


def _stack_attention(q, k, v, chunk: Stack, o: _Opts):
    qb = to_blocks(stack_view(q, chunk))
    kb = to_blocks(stack_view(k, chunk, o.kv_group))
    vb = to_blocks(stack_view(v, chunk, o.kv_group))
    return attention_forward(qb, kb, vb, causal=o.causal, softmax_scale=o.softmax_scale, backend=o.backend)


def _merge_(acc_out, acc_lse, chunk: Stack, out_b, lse_b) -> None:
    """LSE-merge one call's blocks into the accumulators, in place, at their entries only."""
    b = acc_out.shape[0]
    out_v = stack_view(acc_out, chunk)
    lse_v = stack_view(acc_lse, chunk)
    new_lse = lse_from_blocks(lse_b, b, chunk.classes)
    merged = torch.logaddexp(lse_v, new_lse)  # new_lse is finite: every block row sees itself
    weight = torch.exp(new_lse - merged)  # share of the new block, (0, 1]
    lse_v.copy_(merged)
    out_v.lerp_(from_blocks(out_b, b, chunk.classes), weight.unsqueeze(-1).to(out_v.dtype))


def _backward(dout, q, k, v, out, lse_seq, plans: Plans, o: _Opts):
    b, n, heads, d = q.shape
    g = o.kv_group
    grads = None
    start = 0
    if plans and plans[0].covers_all:
        chunks = list(_chunks(plans[0], d, o))
        for chunk in chunks:
            got = _stack_backward(dout, q, k, v, out, lse_seq, chunk, o)
            if len(chunks) == 1 and _whole(chunk, q):
                grads = [got[0].view(q.shape), got[1].view(k.shape), got[2].view(v.shape)]
                break
            if grads is None:
                grads = [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)]
            for acc, div, x in zip(grads, (1, g, g), got):
                stack_view(acc, chunk, div).copy_(from_blocks(x, b, chunk.classes))
            del got
        start = 1
    else:
        grads = [torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)]
    dq, dk, dv = grads
    for plan in plans[start:]:
        if plan.stacks is None:
            blocks_backward_(
                dq, dk, dv, dout, q, k, v, out, lse_seq, plan.groups,
                softmax_scale=o.softmax_scale, backend=o.backend, max_rows_x_heads=o.max_rows,
            )
            continue
        for chunk in _chunks(plan, d, o):
            got = _stack_backward(dout, q, k, v, out, lse_seq, chunk, o)
            for acc, div, x in zip(grads, (1, g, g), got):
                stack_view(acc, chunk, div).add_(from_blocks(x, b, chunk.classes))
            del got
    return dq, dk, dv


def _stack_backward(dout, q, k, v, out, lse_seq, chunk: Stack, o: _Opts):
    g = o.kv_group
    qb = to_blocks(stack_view(q, chunk))
    kb = to_blocks(stack_view(k, chunk, g))
    vb = to_blocks(stack_view(v, chunk, g))
    dob = to_blocks(stack_view(dout, chunk))
    ob = to_blocks(stack_view(out, chunk))
    lb = lse_to_blocks(stack_view(lse_seq, chunk))
    return attention_backward(dob, qb, kb, vb, ob, lb, causal=o.causal, softmax_scale=o.softmax_scale, backend=o.backend)


class DilatedAttentionFunction(torch.autograd.Function):
    """(q, k, v) -> (out [b, n, H, d] in q.dtype, lse [b, H, n] fp32, not differentiable)."""

    @staticmethod
    def forward(ctx, q, k, v, plans: Plans, opts: _Opts):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # the block views assume it
        out, lse_seq = _forward(q, k, v, plans, opts)
        lse = lse_seq.transpose(1, 2).contiguous()
        ctx.save_for_backward(q, k, v, out, lse_seq)  # lse kept sequence-major for the views
        ctx.mark_non_differentiable(lse)
        ctx.plans, ctx.opts = plans, opts
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse_seq = ctx.saved_tensors
        dq, dk, dv = _backward(dout.contiguous(), q, k, v, out, lse_seq, ctx.plans, ctx.opts)
        return dq, dk, dv, None, None


def run_dilated(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    args: DilatedArgs,
    backend: str,
    max_rows_x_heads: int | None = DEFAULT_MAX_ROWS_X_HEADS,
    max_view_elements: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked args in, (out, lse) out; the sequence is q.shape[1] long."""
    plans = plan_all_branches(q.shape[1], args, q.shape[2], q.device)
    opts = _Opts(args.causal, args.softmax_scale, backend, args.kv_group, max_rows_x_heads,
                 DEFAULT_MAX_VIEW_ELEMENTS if max_view_elements is None else max_view_elements)
    return DilatedAttentionFunction.apply(q, k, v, plans, opts)


def kernel_calls(
    seq_len: int,
    args: DilatedArgs,
    num_heads: int,
    head_dim: int,
    max_rows_x_heads: int | None = DEFAULT_MAX_ROWS_X_HEADS,
    max_view_elements: int | None = None,
    batch: int = 1,
) -> list[tuple[int, int, int, int, int, bool]]:
    """The kernel calls one forward makes, ``(batch, q rows, k rows, q heads, kv heads,
    causal)`` each (the backward makes the same calls): for benchmarks of the bare kernel.

    It walks the plans exactly as :class:`DilatedAttentionFunction` does (same chunking),
    which is why it lives here and not in the benchmark."""
    if max_view_elements is None:
        max_view_elements = DEFAULT_MAX_VIEW_ELEMENTS
    g, causal = args.kv_group, args.causal
    calls = []
    for plan in plan_all_branches(seq_len, args, num_heads, torch.device("cpu")):
        if plan.stacks is not None:
            for stack in plan.stacks:
                for c in stack_chunks(stack, head_dim, max_rows_x_heads, max_view_elements):
                    calls.append((batch * c.count, c.m, c.m, c.heads, c.heads // g, causal))
            continue
        for group in plan.groups:
            for c in group.chunks(max_rows_x_heads):
                calls.append((batch * c.num_blocks, c.q_len, c.k_len, c.num_heads, c.num_heads, c.causal))
    return calls
