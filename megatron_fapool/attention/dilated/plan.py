"""Index plans for dilated attention (DESIGN.md §4): which rows and heads form each dense block.

Pure functions of integers (no torch.distributed, no kernels), so they are cheap to test.

For one branch (segment length ``w``, dilation rate ``r``) and sequence length ``n`` the
effective segment is ``w~ = min(w, n)``. Head ``h`` (global index, ``H`` heads in all)
uses offset ``s = h // ceil(H / r)``. Inside segment ``g`` the positions with
``l = i - g*w~ ≡ s (mod r)`` are ``g*w~ + s + r*t`` for ``t = 0 .. M_g - 1``; they form a
dense *block* of length ``M_g = ceil((len_g - s) / r)``. Every query of a block attends to
the keys of the same block (causal: the keys up to itself, which is plain square causal
on the block because the positions are increasing). Blocks of equal shape are *grouped*
so that one kernel call covers them: the segments go into the batch dimension and the
heads sharing an offset stay in the head dimension.

A query range ``[query_start, query_stop)`` restricts the plan to the queries one rank
holds (the sequence-parallel fallback); each block then has query rows ``[t0, t1)`` and
keys ``[0, t1)`` (causal, bottom-right aligned) or ``[0, M_g)``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch

__all__ = [
    "BlockGroup",
    "PackedKeyLayout",
    "ceil_div",
    "class_positions_before",
    "dilated_attention_flops",
    "effective_segment",
    "head_offset",
    "offset_classes",
    "plan_branch",
    "branch_is_shard_local",
]


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def effective_segment(segment_length: int, seq_len: int) -> int:
    """w~ = min(w, n) (at least 1 so that an empty sequence plans to nothing)."""
    return max(1, min(segment_length, seq_len))


def head_offset(global_head: int, total_heads: int, rate: int) -> int:
    """s_{k,h} = h // ceil(H / r_k) for the global head index h."""
    return global_head // ceil_div(total_heads, rate)


def offset_classes(
    rate: int, total_heads: int, first_head: int, num_heads: int
) -> list[tuple[int, int, int]]:
    """Group local heads by offset: ``[(s, local_start, local_stop), ...]``.

    The local heads are the global heads ``first_head .. first_head + num_heads - 1``;
    heads sharing an offset are contiguous because the offset is monotone in ``h``.
    """
    classes: list[tuple[int, int, int]] = []
    for local in range(num_heads):
        s = head_offset(first_head + local, total_heads, rate)
        if classes and classes[-1][0] == s:
            classes[-1] = (s, classes[-1][1], local + 1)
        else:
            classes.append((s, local, local + 1))
    return classes


def _block_len(seg_len: int, s: int, r: int) -> int:
    return ceil_div(seg_len - s, r) if seg_len > s else 0


def class_positions_before(x: torch.Tensor, seq_len: int, seg: int, s: int, r: int) -> torch.Tensor:
    """Number of positions p < x (elementwise, 0 <= x <= n) with (p mod seg) mod r == s."""
    full = torch.div(x, seg, rounding_mode="floor")
    rem = x - full * seg
    per_full = _block_len(seg, s, r)
    partial = torch.div(rem - s + r - 1, r, rounding_mode="floor").clamp_min(0)
    return full * per_full + partial


@dataclass(frozen=True)
class PackedKeyLayout:
    """Where sparsified keys live after the sequence-parallel all-gather.

    Rank ``p`` holds positions ``[p*shard_len, (p+1)*shard_len)``. For each head it packs
    the positions of its head's offset class, in increasing order, into rows
    ``0 .. count-1`` of a ``[b, rows_per_rank, H, d]`` buffer; the all-gather stacks the
    buffers of all ranks, so key position ``j`` of class ``s`` is found at row
    ``owner(j) * rows_per_rank + (rank of j among its owner's class-s positions)``.
    """

    shard_len: int
    world_size: int
    rows_per_rank: int


@dataclass(frozen=True)
class BlockGroup:
    """Blocks of one shape, run as one dense kernel call.

    ``q_index[j, t, c] = row * q_heads_total + head`` addresses query row ``t``, head
    ``c`` of block ``j`` in the query tensor viewed as ``[b, n*H, ...]`` (so one
    ``index_select`` gathers a whole group, moving ``head_dim`` contiguous elements per
    index); ``k_index`` likewise into the key source (the local K/V, or the packed
    all-gathered sparse K/V) with ``k_heads_total`` heads. ``q_slice`` / ``k_slice`` are
    ``(row_start, row_stop)`` when the group is exactly those rows with all heads in
    order, so a view replaces the gather. Under GQA a ``k_index`` entry can repeat
    (several query heads read one key head): gradient scatters sum repeats.
    """

    q_index: torch.Tensor  # [J, nq, hc] int64
    k_index: torch.Tensor  # [J, nk, hc] int64
    q_heads_total: int
    k_heads_total: int
    causal: bool
    q_slice: Optional[tuple[int, int]]
    k_slice: Optional[tuple[int, int]]

    @property
    def num_blocks(self) -> int:
        return self.q_index.shape[0]

    @property
    def q_len(self) -> int:
        return self.q_index.shape[1]

    @property
    def k_len(self) -> int:
        return self.k_index.shape[1]

    @property
    def num_heads(self) -> int:
        return self.q_index.shape[2]

    @property
    def q_rows(self) -> torch.Tensor:  # [J, nq]
        return torch.div(self.q_index[:, :, 0], self.q_heads_total, rounding_mode="floor")

    @property
    def q_heads(self) -> torch.Tensor:  # [J, hc]
        return self.q_index[:, 0, :] % self.q_heads_total

    @property
    def k_rows(self) -> torch.Tensor:  # [J, nk]
        return torch.div(self.k_index[:, :, 0], self.k_heads_total, rounding_mode="floor")

    @property
    def k_heads(self) -> torch.Tensor:  # [J, hc]
        return self.k_index[:, 0, :] % self.k_heads_total

    def to(self, device: torch.device) -> "BlockGroup":
        q_index = self.q_index.to(device)
        k_index = q_index if self.k_index is self.q_index else self.k_index.to(device)
        return replace(self, q_index=q_index, k_index=k_index)

    def chunks(self, max_rows_x_heads: Optional[int]) -> list["BlockGroup"]:
        """Split along blocks so that one call sees at most ``max_rows_x_heads`` query
        rows x heads (at least one block per call)."""
        per_block = max(1, self.q_len * self.num_heads)
        if not max_rows_x_heads or per_block * self.num_blocks <= max_rows_x_heads:
            return [self]
        step = max(1, max_rows_x_heads // per_block)
        out = []
        for j0 in range(0, self.num_blocks, step):
            j1 = min(self.num_blocks, j0 + step)
            q_slice = k_slice = None
            if self.q_slice is not None:
                q_slice = (self.q_slice[0] + j0 * self.q_len, self.q_slice[0] + j1 * self.q_len)
            if self.k_slice is not None:
                k_slice = (self.k_slice[0] + j0 * self.k_len, self.k_slice[0] + j1 * self.k_len)
            q_index = self.q_index[j0:j1]
            k_index = q_index if self.k_index is self.q_index else self.k_index[j0:j1]
            out.append(replace(self, q_index=q_index, k_index=k_index, q_slice=q_slice, k_slice=k_slice))
        return out


@dataclass(frozen=True)
class _Job:
    """Segments ``g0 .. g1-1`` of one offset class, all with query rows ``[t0, t1)`` and
    keys ``[0, kend)`` of their block."""

    s: int
    h0: int
    h1: int
    g0: int
    g1: int
    t0: int
    t1: int
    kend: int


def _jobs(
    seq_len: int,
    seg: int,
    rate: int,
    classes: Sequence[tuple[int, int, int]],
    causal: bool,
    query_start: int,
    query_stop: int,
) -> list[_Job]:
    jobs: list[_Job] = []
    if query_stop <= query_start:
        return jobs
    num_segments = ceil_div(seq_len, seg)
    g_first = query_start // seg
    g_last = (query_stop - 1) // seg
    # Segments whose shape can differ from a full one: the two ends of the query range
    # and the (possibly partial) last segment of the sequence.
    special = sorted({g_first, g_last} | ({num_segments - 1} if g_first <= num_segments - 1 <= g_last else set()))
    ranges: list[tuple[int, int]] = []
    prev = g_first
    for g in special:
        if g > prev:
            ranges.append((prev, g))
        ranges.append((g, g + 1))
        prev = g + 1
    for s, h0, h1 in classes:
        for g0, g1 in ranges:
            start = g0 * seg
            seg_len = min(seg, seq_len - start)
            m = _block_len(seg_len, s, rate)
            if m == 0:
                continue
            # t0 = #block rows before query_start, t1 = #block rows before query_stop.
            t0 = min(m, max(0, ceil_div(query_start - start - s, rate)))
            t1 = min(m, max(0, ceil_div(query_stop - start - s, rate)))
            if t1 <= t0:
                continue
            kend = t1 if causal else m
            if jobs and (jobs[-1].s, jobs[-1].g1, jobs[-1].t0, jobs[-1].t1, jobs[-1].kend) == (s, g0, t0, t1, kend):
                jobs[-1] = replace(jobs[-1], g1=g1)
            else:
                jobs.append(_Job(s, h0, h1, g0, g1, t0, t1, kend))
    return jobs


def _slice_of(rows: torch.Tensor) -> Optional[tuple[int, int]]:
    flat = rows.reshape(-1)
    if flat.numel() == 0:
        return None
    start = int(flat[0])
    if torch.equal(flat, torch.arange(start, start + flat.numel(), dtype=flat.dtype)):
        return (start, start + flat.numel())
    return None


def _packed_rows(layout: PackedKeyLayout, pos: torch.Tensor, seq_len: int, seg: int, s: int, r: int) -> torch.Tensor:
    owner = torch.div(pos, layout.shard_len, rounding_mode="floor")
    base = (owner * layout.shard_len).clamp_max(seq_len)
    row = class_positions_before(pos, seq_len, seg, s, r) - class_positions_before(base, seq_len, seg, s, r)
    return owner * layout.rows_per_rank + row


@functools.lru_cache(maxsize=256)
def _plan_branch_cpu(
    seq_len: int,
    segment_length: int,
    rate: int,
    total_heads: int,
    first_head: int,
    num_heads: int,
    kv_group: int,
    causal: bool,
    query_start: int,
    query_stop: int,
    key_base: int,
    key_layout: Optional[PackedKeyLayout],
) -> tuple[BlockGroup, ...]:
    seg = effective_segment(segment_length, seq_len)
    classes = offset_classes(rate, total_heads, first_head, num_heads)
    jobs = _jobs(seq_len, seg, rate, classes, causal, query_start, query_stop)
    by_shape: dict[tuple[int, int, int], list[_Job]] = {}
    for job in jobs:
        by_shape.setdefault((job.t1 - job.t0, job.kend, job.h1 - job.h0), []).append(job)
    groups = []
    for (nq, nk, hc), members in by_shape.items():
        q_rows, k_rows, q_heads, k_heads = [], [], [], []
        for job in members:
            g = torch.arange(job.g0, job.g1).unsqueeze(1) * seg + job.s
            q_pos = g + rate * torch.arange(job.t0, job.t1).unsqueeze(0)
            k_pos = g + rate * torch.arange(0, job.kend).unsqueeze(0)
            heads = torch.arange(job.h0, job.h1).unsqueeze(0).expand(job.g1 - job.g0, hc)
            q_rows.append(q_pos - query_start)
            q_heads.append(heads)
            if key_layout is None:
                k_rows.append(k_pos - key_base)
                k_heads.append(torch.div(heads, kv_group, rounding_mode="floor"))
            else:  # packed per query head (the fallback packs K/V by query head)
                k_rows.append(_packed_rows(key_layout, k_pos, seq_len, seg, job.s, rate))
                k_heads.append(heads)
        q_rows_t = torch.cat(q_rows)
        k_rows_t = torch.cat(k_rows)
        q_heads_t = torch.cat(q_heads)
        k_heads_t = torch.cat(k_heads)
        k_total = num_heads if key_layout is not None else num_heads // kv_group
        q_index = q_rows_t.unsqueeze(2) * num_heads + q_heads_t.unsqueeze(1)
        k_index = k_rows_t.unsqueeze(2) * k_total + k_heads_t.unsqueeze(1)
        if k_total == num_heads and torch.equal(k_index, q_index):
            k_index = q_index  # square local blocks: one index serves both
        all_heads = hc == num_heads
        groups.append(
            BlockGroup(
                q_index=q_index,
                k_index=k_index,
                q_heads_total=num_heads,
                k_heads_total=k_total,
                causal=causal,
                q_slice=_slice_of(q_rows_t) if all_heads else None,
                k_slice=_slice_of(k_rows_t) if all_heads and k_total == num_heads else None,
            )
        )
    return tuple(groups)


def plan_branch(
    seq_len: int,
    segment_length: int,
    rate: int,
    *,
    total_heads: int,
    first_head: int = 0,
    num_heads: Optional[int] = None,
    kv_group: int = 1,
    causal: bool = True,
    query_start: int = 0,
    query_stop: Optional[int] = None,
    key_base: int = 0,
    key_layout: Optional[PackedKeyLayout] = None,
    device: Optional[torch.device] = None,
) -> tuple[BlockGroup, ...]:
    """Dense block groups of one branch (cached per shape; indices on ``device``).

    ``first_head`` is the global index of local head 0 and ``num_heads`` the number of
    local heads (default ``total_heads - first_head``). Query rows are relative to
    ``query_start``; key rows to ``key_base`` or, with ``key_layout``, rows of the packed
    all-gathered sparse K/V. ``kv_group`` = query heads per key head (GQA).
    """
    if num_heads is None:
        num_heads = total_heads - first_head
    if query_stop is None:
        query_stop = seq_len
    args = (
        seq_len, segment_length, rate, total_heads, first_head, num_heads, kv_group,
        bool(causal), query_start, min(query_stop, seq_len), key_base, key_layout,
    )
    if device is None or torch.device(device).type == "cpu":
        return _plan_branch_cpu(*args)
    return _plan_branch_on_device(*args, str(torch.device(device)))


@functools.lru_cache(maxsize=256)
def _plan_branch_on_device(*args_and_device) -> tuple[BlockGroup, ...]:
    *args, device = args_and_device
    return tuple(g.to(torch.device(device)) for g in _plan_branch_cpu(*args))


def branch_is_shard_local(seq_len: int, segment_length: int, shard_len: int, world_size: int) -> bool:
    """True when no segment of the branch crosses a shard boundary (no communication)."""
    seg = effective_segment(segment_length, seq_len)
    return all(
        (p * shard_len) % seg == 0 for p in range(1, world_size) if p * shard_len < seq_len
    )


def packed_rows_per_rank(
    seq_len: int, segment_length: int, rate: int, classes: Sequence[tuple[int, int, int]], shard_len: int, world_size: int
) -> int:
    """Rows of the per-rank sparse K/V buffer: the most class positions any rank holds."""
    seg = effective_segment(segment_length, seq_len)
    bounds = torch.tensor([min(p * shard_len, seq_len) for p in range(world_size + 1)])
    most = 0
    for s, _, _ in classes:
        counts = class_positions_before(bounds, seq_len, seg, s, rate)
        most = max(most, int((counts[1:] - counts[:-1]).max()))
    return max(most, 1)


@functools.lru_cache(maxsize=256)
def packing_indices(
    seq_len: int,
    segment_length: int,
    rate: int,
    total_heads: int,
    first_head: int,
    num_heads: int,
    shard_len: int,
    rank: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(local_pos, head, row) of every element this rank packs into its sparse buffer."""
    seg = effective_segment(segment_length, seq_len)
    start = min(rank * shard_len, seq_len)
    stop = min(start + shard_len, seq_len)
    pos = torch.arange(start, stop)
    cls = (pos % seg) % rate
    out_pos, out_head, out_row = [], [], []
    for s, h0, h1 in offset_classes(rate, total_heads, first_head, num_heads):
        p = pos[cls == s]
        heads = torch.arange(h0, h1)
        out_pos.append((p - start).unsqueeze(1).expand(-1, h1 - h0).reshape(-1))
        out_head.append(heads.unsqueeze(0).expand(p.numel(), -1).reshape(-1))
        out_row.append(torch.arange(p.numel()).unsqueeze(1).expand(-1, h1 - h0).reshape(-1))
    return torch.cat(out_pos), torch.cat(out_head), torch.cat(out_row)


def dilated_attention_flops(
    seq_len: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    num_heads: int,
    head_dim: int,
    causal: bool = True,
    batch: int = 1,
    total_heads: Optional[int] = None,
    first_head: int = 0,
) -> int:
    """Forward matmul FLOPs (4 * d per attended (query, key) pair, summed over branches).

    Backward is conventionally counted as 2.5x forward (5 matmuls vs 2). Causal blocks
    count the lower triangle including the diagonal.
    """
    total = total_heads if total_heads is not None else first_head + num_heads
    pairs = 0
    for w, r in zip(segment_lengths, dilation_rates):
        for group in _plan_branch_cpu(
            seq_len, w, r, total, first_head, num_heads, 1, bool(causal), 0, seq_len, 0, None
        ):
            m = group.q_len
            per_block = m * (m + 1) // 2 if causal else m * m
            pairs += per_block * group.num_blocks * group.num_heads
    return 4 * head_dim * pairs * batch
