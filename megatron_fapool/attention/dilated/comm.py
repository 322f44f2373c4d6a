"""Collectives for head-parallel dilated attention, autograd-aware, with byte counters.

``seq_to_heads`` turns sequence shards ``[b, n/P, P*Hp, d]`` into head shards
``[b, n, Hp, d]`` with one ``all_to_all_single`` (equal splits, so it also runs on gloo);
``heads_to_seq`` is its inverse, and each is the other's backward.

Every collective is counted in :data:`COMM_COUNTERS` (calls and bytes sent, per kind), so
tests and logs can prove that the distributed path ran.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional

import torch
import torch.distributed as dist

__all__ = [
    "COMM_COUNTERS",
    "all_gather_stacked",
    "all_to_all_async",
    "all_to_all_stacked",
    "comm_counters",
    "heads_to_seq",
    "reduce_scatter_stacked",
    "reset_comm_counters",
    "seq_to_heads",
]

COMM_COUNTERS: Counter = Counter()


def comm_counters() -> dict[str, int]:
    """Snapshot: ``{'<kind>_calls': n, '<kind>_bytes': n}`` for all_to_all, all_gather,
    reduce_scatter (bytes = this rank's send buffer)."""
    return dict(COMM_COUNTERS)


def reset_comm_counters() -> None:
    COMM_COUNTERS.clear()


def _count(kind: str, t: torch.Tensor) -> None:
    COMM_COUNTERS[f"{kind}_calls"] += 1
    COMM_COUNTERS[f"{kind}_bytes"] += t.numel() * t.element_size()


def all_to_all_stacked(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """``x[p]`` goes to rank p; returns ``y`` with ``y[p]`` from rank p. x: [P, ...]."""
    x = x.contiguous()
    out = torch.empty_like(x)
    _count("all_to_all", x)
    dist.all_to_all_single(out, x, group=group)
    return out


def all_to_all_async(x: torch.Tensor, group: Optional[dist.ProcessGroup]):
    """Start ``all_to_all_stacked``; returns ``(out, work)``: ``out`` is valid (on the
    current stream) after ``work.wait()``. ``x`` must be contiguous and stay alive until then."""
    if not x.is_contiguous():
        raise ValueError("all_to_all_async needs a contiguous send buffer")
    out = torch.empty_like(x)
    _count("all_to_all", x)
    work = dist.all_to_all_single(out, x, group=group, async_op=True)
    return out, work


def all_gather_stacked(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """``[P, *x.shape]`` with rank p's ``x`` at index p (x at least 1-D)."""
    x = x.contiguous()
    world = dist.get_world_size(group)
    # Collectives want the output concatenated along dim 0, not stacked.
    out = torch.empty((world * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _count("all_gather", x)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x, group=group)
    return out.view((world,) + tuple(x.shape))


def reduce_scatter_stacked(x: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Sum over ranks of ``x[rank]``. x: [P, ...]."""
    x = x.contiguous()
    out = torch.empty(tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _count("reduce_scatter", x)
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(out, x.flatten(0, 1), group=group)
    return out


def _seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    b, nl, h, d = x.shape
    hp = h // world
    send = x.reshape(b, nl, world, hp, d).permute(2, 0, 1, 3, 4)  # [P, b, nl, Hp, d]
    recv = all_to_all_stacked(send, group)  # recv[p] = rank p's sequence shard, my heads
    return recv.permute(1, 0, 2, 3, 4).reshape(b, world * nl, hp, d)


def _heads_to_seq(y: torch.Tensor, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    b, n, hp, d = y.shape
    nl = n // world
    send = y.reshape(b, world, nl, hp, d).permute(1, 0, 2, 3, 4)  # [P, b, nl, Hp, d]
    recv = all_to_all_stacked(send, group)  # recv[p] = my sequence shard, rank p's heads
    return recv.permute(1, 2, 0, 3, 4).reshape(b, nl, world * hp, d)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _seq_to_heads(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_seq(grad, ctx.group), None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, group):
        ctx.group = group
        return _heads_to_seq(y, group)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(grad, ctx.group), None


def seq_to_heads(x: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """[b, n/P, H, d] sequence shard -> [b, n, H/P, d] head shard (rank p: heads p*H/P..)."""
    world = dist.get_world_size(group)
    if x.shape[2] % world:
        raise ValueError(f"seq_to_heads: heads ({x.shape[2]}) must be a multiple of the group size ({world})")
    return x if world == 1 else _SeqToHeads.apply(x, group)


def heads_to_seq(y: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """[b, n, H/P, d] head shard -> [b, n/P, H, d] sequence shard (inverse of seq_to_heads)."""
    world = dist.get_world_size(group)
    if y.shape[1] % world:
        raise ValueError(f"heads_to_seq: sequence ({y.shape[1]}) must be a multiple of the group size ({world})")
    return y if world == 1 else _HeadsToSeq.apply(y, group)
