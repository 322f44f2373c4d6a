"""Dilated attention over a process group (DESIGN.md §4, LongNet).

Input on rank p: the sequence shard ``[b, n_local, H, d]`` holding positions
``p*n_local .. (p+1)*n_local - 1`` (all ranks pass equal shards; when the true length
``seq_len`` is shorter than ``P*n_local`` the tail is padding, masked, never attended).

- **Independent shards** (any ``H``; ``mode`` "auto" or "sequence"): when no segment of
  any branch crosses a shard boundary (every ``min(w, n)`` divides the shard length) and
  every rank holds real positions, each rank's output is the dilated attention of its
  own shard alone: the local kernel runs on the shard, with no communication at all.
  This is the common long-context case (``n / P`` a multiple of every segment length).
- **Head-parallel** (``H >= P``, otherwise): an all-to-all turns sequence shards into
  head shards (rank p gets a contiguous, balanced run of heads; padded to equal splits
  when ``P`` does not divide ``H``), each rank runs the local dilated kernel over the
  whole sequence for its heads with their *global* indices, and a second all-to-all
  turns the output back; backward the same in reverse. The exchange is pipelined over
  chunks of each rank's heads so that it overlaps the kernel (:mod:`.dilated_heads`).
- **Sequence-parallel** (``H < P``, LongNet's scheme): a branch whose segments never
  cross a shard boundary needs no communication; any other branch all-gathers only
  the sparsified K/V (for each head, the rows ``l ≡ s (mod r)``), and its backward
  reduce-scatters the K/V gradient of those rows back to their owners.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_fapool.attention.dilated.args import DilatedArgs, check_dilated_args
from megatron_fapool.attention.dilated.blocks import (
    DEFAULT_MAX_ROWS_X_HEADS,
    accumulator_dtype,
    blocks_backward_,
    blocks_forward_,
)
from megatron_fapool.attention.dilated.comm import all_gather_stacked, reduce_scatter_stacked
from megatron_fapool.attention.dilated.heads import balanced_head_counts, head_parallel
from megatron_fapool.attention.dilated.local import dilated_local, new_accumulators
from megatron_fapool.attention.dilated.plan import (
    BlockGroup,
    PackedKeyLayout,
    branch_is_shard_local,
    ceil_div,
    effective_segment,
    offset_classes,
    packed_rows_per_rank,
    packing_indices,
    plan_branch,
)

__all__ = [
    "balanced_head_counts",
    "dilated_attention_parallel",
    "parallel_mode",
    "shard_sequence",
    "shards_are_independent",
]


def shard_sequence(x: torch.Tensor, rank: int, world_size: int, dim: int = 1) -> torch.Tensor:
    """Rank ``rank``'s equal shard of ``x`` along ``dim``, zero-padding the tail so that
    every rank gets ``ceil(n / world_size)`` rows (pass ``seq_len=n`` alongside)."""
    n = x.shape[dim]
    per_rank = ceil_div(n, world_size)
    pad = per_rank * world_size - n
    if pad:
        spec = [0, 0] * (x.dim() - 1 - dim) + [0, pad]
        x = F.pad(x, spec)
    return x.narrow(dim, rank * per_rank, per_rank)


def _check_equal_shards(q: torch.Tensor, k: torch.Tensor, group, seq_len: int) -> None:
    world = dist.get_world_size(group)
    mine = torch.tensor([*q.shape, *k.shape, seq_len], dtype=torch.int64, device=q.device)
    everyone = torch.empty(world * mine.numel(), dtype=torch.int64, device=q.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(everyone, mine, group=group)  # not counted: a shape check, not attention traffic
    rows = everyone.view(world, -1).tolist()
    if any(r != rows[0] for r in rows):
        shapes = "; ".join(f"rank {p}: q {tuple(r[:4])} k {tuple(r[4:8])} seq_len {r[8]}" for p, r in enumerate(rows))
        raise ValueError(
            "dilated_attention_parallel: every rank must pass equally shaped shards and the same"
            " seq_len (the all-to-all runs with equal splits, the only form gloo supports): pad the"
            " sequence to a multiple of the group size (shard_sequence does) and pass seq_len=<true"
            f" length>. Got {shapes}"
        )


def dilated_attention_parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    causal: bool = True,
    softmax_scale: Optional[float] = None,
    *,
    group: Optional[dist.ProcessGroup] = None,
    seq_len: Optional[int] = None,
    head_offset: int = 0,
    total_heads: Optional[int] = None,
    backend: str = "auto",
    mode: str = "auto",
    check_shapes: bool = True,
    max_rows_x_heads: Optional[int] = DEFAULT_MAX_ROWS_X_HEADS,
    max_view_elements: Optional[int] = None,
    head_chunks: Optional[int] = None,
) -> torch.Tensor:
    """Dilated attention of the sequence sharded over ``group``; returns this rank's
    output shard ``[b, n_local, H, d]`` (zeros at padding positions).

    ``mode``: ``"auto"`` (independent shards when no segment crosses a shard boundary, else
    head-parallel when ``H >= P`` -- with GQA when q and k/v heads are multiples of ``P``
    --, else sequence-parallel), ``"heads"`` (always head-parallel) or ``"sequence"``
    (independent shards when possible, else sequence-parallel); see :func:`parallel_mode`. ``head_offset`` / ``total_heads`` place the local heads
    in the global head numbering (e.g. under tensor parallelism). ``check_shapes`` runs
    one tiny all-gather to turn mismatched shards into a clear error instead of a hang.
    ``head_chunks``: head-parallel pipelines each rank's heads in this many chunks
    (communication of one overlaps computation of another); default
    :func:`~.dilated_heads.head_chunks`.
    """
    args = check_dilated_args(q, k, v, segment_lengths, dilation_rates, softmax_scale, head_offset, total_heads)
    world = dist.get_world_size(group)
    shard = q.shape[1]
    n = world * shard if seq_len is None else int(seq_len)
    if not 0 <= n <= world * shard:
        raise ValueError(f"seq_len must be in [0, world_size * n_local] = [0, {world * shard}], got {seq_len}")
    if mode not in ("auto", "heads", "sequence"):
        raise ValueError(f"mode must be 'auto', 'heads' or 'sequence', got {mode!r}")
    if check_shapes and world > 1:
        _check_equal_shards(q, k, group, n)
    if mode != "heads" and shards_are_independent(n, args.segment_lengths, shard, world):
        return _independent_shards(
            q, k, v, args, causal, backend, dist.get_rank(group), n, max_rows_x_heads, max_view_elements
        )
    if mode == "auto":
        mode = "heads" if _head_parallel_fits(q.shape[2], k.shape[2], world) else "sequence"
    if mode == "heads":
        return _head_parallel(
            q, k, v, args, causal, backend, group, n, max_rows_x_heads, max_view_elements, head_chunks
        )
    return _sequence_parallel(q, k, v, args, causal, backend, group, n, max_rows_x_heads)


def shards_are_independent(seq_len: int, segment_lengths: Sequence[int], shard_len: int, world: int) -> bool:
    """True when no segment of any branch crosses a shard boundary and every rank holds at
    least one real position: then each rank's output is dilated attention of its own shard
    alone, and no communication is needed at all (LongNet's local branches)."""
    if world == 1:
        return True
    if (world - 1) * shard_len >= seq_len:
        return False  # a rank holds only padding
    return all(branch_is_shard_local(seq_len, w, shard_len, world) for w in segment_lengths)


def parallel_mode(
    q_heads: int, kv_heads: int, seq_len: int, segment_lengths: Sequence[int], shard_len: int, world: int,
    mode: str = "auto",
) -> str:
    """What :func:`dilated_attention_parallel` runs: ``"local"`` (every shard on its own, no
    communication), ``"heads"`` (all-to-all) or ``"sequence"`` (sparse K/V all-gather)."""
    if mode != "heads" and shards_are_independent(seq_len, segment_lengths, shard_len, world):
        return "local"
    if mode == "auto":
        return "heads" if _head_parallel_fits(q_heads, kv_heads, world) else "sequence"
    return mode


def _independent_shards(q, k, v, args: DilatedArgs, causal, backend, rank, n, max_rows, max_view) -> torch.Tensor:
    """Each rank runs the local kernel on its own positions: segments start at multiples of
    the global effective segment length, which the shard boundaries are, so the shard is a
    sequence of its own with segment lengths ``min(w, n)`` (global ``n``)."""
    shard = q.shape[1]
    length = min(shard, n - rank * shard)
    local_args = replace(args, segment_lengths=tuple(effective_segment(w, n) for w in args.segment_lengths))
    if length == shard:
        out, _ = dilated_local(q, k, v, local_args, causal, backend, max_rows, max_view)
        return out
    out, _ = dilated_local(q[:, :length], k[:, :length], v[:, :length], local_args, causal, backend, max_rows, max_view)
    return F.pad(out, (0, 0, 0, 0, 0, shard - length))


def _head_parallel_fits(q_heads: int, kv_heads: int, world: int) -> bool:
    """At least one head per rank; with GQA, q and k/v heads must split evenly."""
    if q_heads < world:
        return False
    return q_heads == kv_heads or (q_heads % world == 0 and kv_heads % world == 0)


def _head_parallel(
    q, k, v, args: DilatedArgs, causal, backend, group, n, max_rows, max_view=None, chunks=None
) -> torch.Tensor:
    world = dist.get_world_size(group)
    hq, hkv = q.shape[2], k.shape[2]
    if hq < world:
        raise ValueError(
            f"mode='heads' needs at least one head per rank: {hq} heads on {world} ranks"
            " (use mode='sequence' or 'auto')"
        )
    if args.kv_group > 1 and (hq % world or hkv % world):
        raise ValueError(
            f"head-parallel GQA needs q heads ({hq}) and k/v heads ({hkv}) divisible by the group"
            f" size ({world}); use mode='sequence' or repeat k/v to {hq} heads"
        )
    return head_parallel(q, k, v, args, causal, backend, group, n, max_rows, max_view, chunks)


@dataclass(frozen=True)
class _SeqBranch:
    groups: tuple[BlockGroup, ...]
    # For branches needing remote keys: (local_pos, head, row) of the packed elements and
    # the packed rows per rank; None for shard-local branches.
    pack: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]


@dataclass(frozen=True)
class _SeqSpec:
    branches: tuple[_SeqBranch, ...]
    group: Optional[dist.ProcessGroup]
    world: int
    kv_group: int
    softmax_scale: float
    backend: str
    max_rows: Optional[int]


@functools.lru_cache(maxsize=256)
def _packing_on_device(*args_and_device):
    *args, device = args_and_device
    return tuple(t.to(torch.device(device)) for t in packing_indices(*args))


def _sequence_plan(q, args: DilatedArgs, causal, group, n, backend, max_rows) -> _SeqSpec:
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    shard, hq = q.shape[1], q.shape[2]
    q_start = min(rank * shard, n)
    q_stop = min(rank * shard + shard, n)
    common = dict(
        total_heads=args.total_heads, first_head=args.head_offset, num_heads=hq, kv_group=args.kv_group,
        causal=causal, query_start=q_start, query_stop=q_stop, device=q.device,
    )
    branches = []
    for w, r in zip(args.segment_lengths, args.dilation_rates):
        if branch_is_shard_local(n, w, shard, world):
            groups = plan_branch(n, w, r, key_base=rank * shard, **common)
            branches.append(_SeqBranch(groups, None))
            continue
        classes = offset_classes(r, args.total_heads, args.head_offset, hq)
        rows = packed_rows_per_rank(n, w, r, classes, shard, world)
        groups = plan_branch(n, w, r, key_layout=PackedKeyLayout(shard, world, rows), **common)
        pos, head, row = _packing_on_device(
            n, w, r, args.total_heads, args.head_offset, hq, shard, rank, str(q.device)
        )
        branches.append(_SeqBranch(groups, (pos, head, row, rows)))
    return _SeqSpec(tuple(branches), group, world, args.kv_group, args.softmax_scale, backend, max_rows)


def _gather_sparse(x: torch.Tensor, branch: _SeqBranch, spec: _SeqSpec, num_heads: int) -> torch.Tensor:
    """All ranks' sparsified rows of x (packed per query head): [b, P*rows, H, d]."""
    pos, head, row, rows = branch.pack
    b, d = x.shape[0], x.shape[3]
    packed = x.new_zeros(b, rows, num_heads, d)
    packed[:, row, head] = x[:, pos, torch.div(head, spec.kv_group, rounding_mode="floor")]
    stacked = all_gather_stacked(packed, spec.group)  # [P, b, rows, H, d]
    return stacked.permute(1, 0, 2, 3, 4).reshape(b, spec.world * rows, num_heads, d)


def _return_sparse_grad_(dx: torch.Tensor, dsrc: torch.Tensor, branch: _SeqBranch, spec: _SeqSpec) -> None:
    """Reduce-scatter the packed-row gradient to the owners and add it into dx."""
    pos, head, row, rows = branch.pack
    b, num_heads, d = dsrc.shape[0], dsrc.shape[2], dsrc.shape[3]
    send = dsrc.reshape(b, spec.world, rows, num_heads, d).permute(1, 0, 2, 3, 4)
    mine = reduce_scatter_stacked(send, spec.group)  # [b, rows, H, d]
    vals = mine[:, row, head]  # [b, E, d]
    kv_head = torch.div(head, spec.kv_group, rounding_mode="floor")
    if spec.kv_group == 1:
        dx[:, pos, kv_head] += vals
    else:
        dx.movedim(0, 2).index_put_((pos, kv_head), vals.movedim(0, 1), accumulate=True)


class _SequenceParallelFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spec: _SeqSpec):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        num_heads = q.shape[2]
        acc_out, acc_lse = new_accumulators(q, q.shape[1], num_heads)
        for i, br in enumerate(spec.branches):
            if br.pack is None:
                k_src, v_src = k, v
            else:
                k_src, v_src = _gather_sparse(k, br, spec, num_heads), _gather_sparse(v, br, spec, num_heads)
            blocks_forward_(
                acc_out, acc_lse, q, k_src, v_src, br.groups, softmax_scale=spec.softmax_scale,
                backend=spec.backend, max_rows_x_heads=spec.max_rows, merge=i > 0,
            )
        out = acc_out.to(q.dtype)
        del acc_out
        lse = acc_lse.transpose(1, 2).contiguous()
        ctx.save_for_backward(q, k, v, out, acc_lse)
        ctx.mark_non_differentiable(lse)
        ctx.spec = spec
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse_seq = ctx.saved_tensors
        dout = dout.contiguous()
        spec: _SeqSpec = ctx.spec
        acc = accumulator_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        num_heads = q.shape[2]
        kw = dict(softmax_scale=spec.softmax_scale, backend=spec.backend, max_rows_x_heads=spec.max_rows)
        for br in spec.branches:
            if br.pack is None:
                blocks_backward_(dq, dk, dv, dout, q, k, v, out, lse_seq, br.groups, **kw)
                continue
            # Re-gather the sparse K/V (memory over communication, as ring attention does).
            k_src, v_src = _gather_sparse(k, br, spec, num_heads), _gather_sparse(v, br, spec, num_heads)
            dk_src = torch.zeros(k_src.shape, dtype=acc, device=k.device)
            dv_src = torch.zeros(v_src.shape, dtype=acc, device=v.device)
            blocks_backward_(dq, dk_src, dv_src, dout, q, k_src, v_src, out, lse_seq, br.groups, **kw)
            _return_sparse_grad_(dk, dk_src, br, spec)
            _return_sparse_grad_(dv, dv_src, br, spec)
        # Cast one at a time: each fp32 accumulator is freed before the next cast (peak memory).
        dq = dq.to(q.dtype)
        dk = dk.to(k.dtype)
        dv = dv.to(v.dtype)
        return dq, dk, dv, None


def _sequence_parallel(q, k, v, args: DilatedArgs, causal, backend, group, n, max_rows) -> torch.Tensor:
    spec = _sequence_plan(q, args, causal, group, n, backend, max_rows)
    out, _ = _SequenceParallelFunction.apply(q, k, v, spec)
    return out
