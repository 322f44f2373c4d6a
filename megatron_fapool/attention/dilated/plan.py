"""Index plans for dilated attention (DESIGN.md §4): which rows and heads form each dense block.

Pure functions of integers (no kernels), so they are cheap to test; the definition's
arithmetic (effective segment, head offset, offset classes, block length) lives here and
the other modules import it.

For one branch (segment length ``w``, dilation rate ``r``) and sequence length ``n`` the
effective segment is ``w~ = min(w, n)``. Head ``h`` (global index, ``H`` heads in all)
uses offset ``s = h // ceil(H / r)``. Inside segment ``g`` the positions with
``l = i - g*w~ ≡ s (mod r)`` are ``g*w~ + s + r*t`` for ``t = 0 .. M_g - 1``; they form a
dense *block* of length ``M_g = ceil((len_g - s) / r)``. Every query of a block attends to
the keys of the same block (causal: the keys up to itself, which is plain square causal
on the block because the positions are increasing). Blocks of equal shape are *grouped*
so that one kernel call covers them: the segments go into the batch dimension and the
heads sharing an offset stay in the head dimension.

This index plan serves the branches the gather-free strided plan (:mod:`.strided`) cannot
express (GQA groups that straddle offset classes) and the FLOP count.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

__all__ = [
    "DEVICE_PLAN_CACHE_SIZE",
    "BlockGroup",
    "block_len",
    "ceil_div",
    "dilated_attention_flops",
    "effective_segment",
    "head_offset",
    "offset_classes",
    "plan_branch",
    "segment_runs",
]

#: Plans kept on an accelerator (their index tensors hold device memory): least recently
#: used first out. Enough for every branch of a model at a few sequence lengths (the
#: layers and steps of one shape share one plan); more shapes rebuild from the CPU cache.
DEVICE_PLAN_CACHE_SIZE = 16


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


def block_len(seg_len: int, s: int, rate: int) -> int:
    """Rows of offset class ``s`` in a segment of ``seg_len`` rows: ``ceil((seg_len - s) / r)``."""
    return ceil_div(seg_len - s, rate) if seg_len > s else 0


def segment_runs(seq_len: int, seg: int) -> list[tuple[int, int, int]]:
    """``[(first segment, segments, rows per segment), ...]``: the full segments, then the
    partial last one; within a run every segment has the same length."""
    full, tail = divmod(seq_len, seg)
    return ([(0, full, seg)] if full else []) + ([(full, 1, tail)] if tail else [])


@dataclass(frozen=True)
class BlockGroup:
    """Blocks of one shape, run as one dense kernel call.

    ``q_index[j, t, c] = row * q_heads_total + head`` addresses row ``t``, head ``c`` of
    block ``j`` in the query tensor viewed as ``[b, n*H, ...]`` (so one ``index_select``
    gathers a whole group, moving ``head_dim`` contiguous elements per index);
    ``k_index`` likewise into the key/value tensors with ``k_heads_total`` heads (the same
    tensor as ``q_index`` without GQA). ``q_slice`` / ``k_slice`` are ``(row_start,
    row_stop)`` when the group is exactly those rows with all heads in order, so a view
    replaces the gather. Under GQA a ``k_index`` entry can repeat (several query heads
    read one key head): gradient scatters sum repeats.
    """

    q_index: torch.Tensor  # [J, L, hc] int64
    k_index: torch.Tensor  # [J, L, hc] int64
    q_heads_total: int
    k_heads_total: int
    causal: bool
    q_slice: tuple[int, int] | None
    k_slice: tuple[int, int] | None

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
    def q_rows(self) -> torch.Tensor:  # [J, L]
        return torch.div(self.q_index[:, :, 0], self.q_heads_total, rounding_mode="floor")

    @property
    def q_heads(self) -> torch.Tensor:  # [J, hc]
        return self.q_index[:, 0, :] % self.q_heads_total

    @property
    def k_rows(self) -> torch.Tensor:  # [J, L]
        return torch.div(self.k_index[:, :, 0], self.k_heads_total, rounding_mode="floor")

    @property
    def k_heads(self) -> torch.Tensor:  # [J, hc]
        return self.k_index[:, 0, :] % self.k_heads_total

    def to(self, device: torch.device) -> BlockGroup:
        q_index = self.q_index.to(device)
        k_index = q_index if self.k_index is self.q_index else self.k_index.to(device)
        return replace(self, q_index=q_index, k_index=k_index)

    def chunks(self, max_rows_x_heads: int | None) -> list[BlockGroup]:
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
    """Segments ``g0 .. g1-1`` of one offset class (local heads ``h0 .. h1-1``), blocks of ``m`` rows."""

    s: int
    h0: int
    h1: int
    g0: int
    g1: int
    m: int


def _jobs(seq_len: int, seg: int, rate: int, classes: Sequence[tuple[int, int, int]]) -> list[_Job]:
    jobs = []
    for s, h0, h1 in classes:
        for g0, count, length in segment_runs(seq_len, seg):
            m = block_len(length, s, rate)
            if m:
                jobs.append(_Job(s, h0, h1, g0, g0 + count, m))
    return jobs


def _slice_of(rows: torch.Tensor) -> tuple[int, int] | None:
    flat = rows.reshape(-1)
    if flat.numel() == 0:
        return None
    start = int(flat[0])
    if torch.equal(flat, torch.arange(start, start + flat.numel(), dtype=flat.dtype)):
        return (start, start + flat.numel())
    return None


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
) -> tuple[BlockGroup, ...]:
    seg = effective_segment(segment_length, seq_len)
    classes = offset_classes(rate, total_heads, first_head, num_heads)
    by_shape: dict[tuple[int, int], list[_Job]] = {}
    for job in _jobs(seq_len, seg, rate, classes):
        by_shape.setdefault((job.m, job.h1 - job.h0), []).append(job)
    k_total = num_heads // kv_group
    groups = []
    for (m, hc), members in by_shape.items():
        rows, heads = [], []
        for job in members:
            g = torch.arange(job.g0, job.g1).unsqueeze(1) * seg + job.s
            rows.append(g + rate * torch.arange(m).unsqueeze(0))
            heads.append(torch.arange(job.h0, job.h1).unsqueeze(0).expand(job.g1 - job.g0, hc))
        rows_t = torch.cat(rows)
        heads_t = torch.cat(heads)
        q_index = rows_t.unsqueeze(2) * num_heads + heads_t.unsqueeze(1)
        if kv_group == 1:
            k_index = q_index  # one index serves both
        else:
            k_index = rows_t.unsqueeze(2) * k_total + torch.div(heads_t, kv_group, rounding_mode="floor").unsqueeze(1)
        all_heads = hc == num_heads
        groups.append(
            BlockGroup(
                q_index=q_index,
                k_index=k_index,
                q_heads_total=num_heads,
                k_heads_total=k_total,
                causal=causal,
                q_slice=_slice_of(rows_t) if all_heads else None,
                k_slice=_slice_of(rows_t) if all_heads and kv_group == 1 else None,
            )
        )
    return tuple(groups)


@functools.lru_cache(maxsize=DEVICE_PLAN_CACHE_SIZE)
def _plan_branch_on_device(*args_and_device) -> tuple[BlockGroup, ...]:
    *args, device = args_and_device
    return tuple(g.to(torch.device(device)) for g in _plan_branch_cpu(*args))


def plan_branch(
    seq_len: int,
    segment_length: int,
    rate: int,
    *,
    total_heads: int,
    first_head: int = 0,
    num_heads: int | None = None,
    kv_group: int = 1,
    causal: bool = True,
    device: torch.device | None = None,
) -> tuple[BlockGroup, ...]:
    """Dense block groups of one branch, indices on ``device`` (cached per shape).

    ``first_head`` is the global index of local head 0 and ``num_heads`` the number of
    local heads (default ``total_heads - first_head``); ``kv_group`` = query heads per key
    head (GQA). CPU plans are cached per shape (host memory, 256 shapes); plans on an
    accelerator are copies of them, at most :data:`DEVICE_PLAN_CACHE_SIZE` kept.
    """
    if num_heads is None:
        num_heads = total_heads - first_head
    args = (seq_len, segment_length, rate, total_heads, first_head, num_heads, kv_group, bool(causal))
    if device is None or torch.device(device).type == "cpu":
        return _plan_branch_cpu(*args)
    return _plan_branch_on_device(*args, str(torch.device(device)))


def dilated_attention_flops(
    seq_len: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    num_heads: int,
    head_dim: int,
    causal: bool = True,
    batch: int = 1,
    total_heads: int | None = None,
    first_head: int = 0,
) -> int:
    """Forward matmul FLOPs (4 * d per attended (query, key) pair, summed over branches).

    Backward is conventionally counted as 2.5x forward (5 matmuls vs 2). Causal blocks
    count the lower triangle including the diagonal.
    """
    total = total_heads if total_heads is not None else first_head + num_heads
    pairs = 0
    for w, r in zip(segment_lengths, dilation_rates):
        for group in _plan_branch_cpu(seq_len, w, r, total, first_head, num_heads, 1, bool(causal)):
            m = group.q_len
            per_block = m * (m + 1) // 2 if causal else m * m
            pairs += per_block * group.num_blocks * group.num_heads
    return 4 * head_dim * pairs * batch
