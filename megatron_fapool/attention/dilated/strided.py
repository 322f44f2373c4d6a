"""Gather-free block layout for dilated attention: every block is a strided view.

For a branch (segment ``w~``, rate ``r``) the rows of offset class ``s`` in segment ``g``
are ``g*w~ + s + r*t``, and the heads of that class are one contiguous run (DESIGN.md §4:
``s = h // ceil(H / r)``). So for a run of segments, the block rows x heads of class ``s``
are the strided view ``x[b, g*w~ + s + r*t, h0 + h']`` of a contiguous ``[b, n, H, *tail]``
tensor; consecutive classes with the same block length and head count step by one row
and ``hc`` heads, so a whole run of classes is ONE ``as_strided`` view::

    [b, segments, m, classes, hc, *tail]
    strides (n*H*T, w~*H*T, r*H*T, H*T + hc*T, T, ...)   (T = prod(tail))

A :class:`Stack` describes such a run. One kernel call covers a stack (chunked along
segments): its q/k/v are the view copied once into a dense ``[b*segments, m,
classes*hc, d]`` tensor (for ``r = 1`` the view already is that tensor, no copy), and its
results go back through the same views: the forward merges a block's (out, lse) in
place into the running accumulators at exactly the block's (row, head) entries
(``logaddexp`` for the lse, one ``lerp_`` for the output), the backward adds the block
gradients into the gradient accumulators the same way. Nothing is gathered by index,
nothing is scattered by index, and the merge touches only the entries a branch owns,
so a branch of rate ``r`` moves about ``n*H*d/r`` elements.

A segment run is either all full segments (``w~`` rows each) or the one partial last
segment, so every block of a stack has the same length. GQA works when every offset
class covers whole kv groups (``h0`` and ``hc`` multiples of the group size); otherwise
:func:`plan_stacks` returns ``None`` and the caller uses the index-gather plan
(:mod:`.plan`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .plan import block_len, effective_segment, offset_classes, segment_runs

__all__ = [
    "DEFAULT_MAX_VIEW_ELEMENTS",
    "Stack",
    "from_blocks",
    "lse_from_blocks",
    "lse_to_blocks",
    "plan_stacks",
    "stack_chunks",
    "stack_view",
    "to_blocks",
]

#: Largest q/k/v tensor (elements) of one kernel call made straight on a view (rate 1,
#: nothing copied). Calls are chunked along segments to stay below it: kernels index
#: with 32-bit offsets in places, so stay well inside 2^31.
DEFAULT_MAX_VIEW_ELEMENTS = 1 << 30


@dataclass(frozen=True)
class Stack:
    """Classes ``s0 .. s0+classes-1`` of segments ``g0 .. g0+count-1`` (one kernel call,
    chunked along segments): blocks of ``m`` rows, ``classes*hc`` heads.

    Class ``c`` has the rows ``g*seg + s0 + c + rate*t`` (``t < m``) and the local heads
    ``h0 + c*hc .. h0 + (c+1)*hc - 1``.
    """

    seg: int
    rate: int
    g0: int
    count: int
    m: int
    s0: int
    classes: int
    h0: int
    hc: int

    @property
    def heads(self) -> int:
        return self.classes * self.hc

    @property
    def is_view(self) -> bool:
        """Rate 1: the q/k/v of a call are row slices, no copy needed (for batch 1)."""
        return self.rate == 1

    @property
    def covers_all(self) -> bool:
        return self.rate == 1

    def part(self, c0: int, c1: int) -> Stack:
        """Segments ``c0 .. c1-1`` of this stack (relative)."""
        return Stack(self.seg, self.rate, self.g0 + c0, c1 - c0, self.m, self.s0, self.classes, self.h0, self.hc)


@functools.lru_cache(maxsize=512)
def plan_stacks(
    seq_len: int,
    segment_length: int,
    rate: int,
    total_heads: int,
    first_head: int,
    num_heads: int,
    kv_group: int = 1,
) -> tuple[Stack, ...] | None:
    """The stacks of one branch over local heads ``first_head ..`` (global index) of
    ``total_heads``; ``None`` when GQA groups straddle offset classes (use the index plan)."""
    if seq_len <= 0 or num_heads <= 0:
        return ()
    seg = effective_segment(segment_length, seq_len)
    classes = offset_classes(rate, total_heads, first_head, num_heads)
    if kv_group > 1 and any(h0 % kv_group or (h1 - h0) % kv_group for _, h0, h1 in classes):
        return None
    stacks: list[Stack] = []
    for g0, count, length in segment_runs(seq_len, seg):
        run: Stack | None = None
        for s, h0, h1 in classes:
            m = block_len(length, s, rate)
            if m == 0:
                continue
            hc = h1 - h0
            if run is not None and run.m == m and run.hc == hc and run.s0 + run.classes == s:
                run = Stack(seg, rate, g0, count, m, run.s0, run.classes + 1, run.h0, hc)
                continue
            if run is not None:
                stacks.append(run)
            run = Stack(seg, rate, g0, count, m, s, 1, h0, hc)
        if run is not None:
            stacks.append(run)
    return tuple(stacks)


def stack_chunks(
    stack: Stack, head_dim: int, max_rows_x_heads: int | None, max_view_elements: int | None
) -> list[Stack]:
    """Split along segments: a copied stack's call sees at most ``max_rows_x_heads`` rows x
    heads (temporaries), a view stack's at most ``max_view_elements`` q elements."""
    per_segment = stack.m * stack.heads
    if stack.is_view:
        limit = None if not max_view_elements else max(1, max_view_elements // max(1, head_dim))
    else:
        limit = max_rows_x_heads or None
    if limit is None or per_segment * stack.count <= limit:
        return [stack]
    step = max(1, limit // per_segment)
    return [stack.part(c0, min(stack.count, c0 + step)) for c0 in range(0, stack.count, step)]


def stack_view(x: torch.Tensor, stack: Stack, head_div: int = 1) -> torch.Tensor:
    """The stack's entries of contiguous ``x`` [b, n, H, *tail] as a strided view
    ``[b, count, m, classes, hc // head_div, *tail]`` (``head_div``: the GQA group, for K/V)."""
    if not x.is_contiguous():
        raise ValueError("stack_view needs a contiguous tensor")
    b, n, heads = x.shape[:3]
    tail = tuple(x.shape[3:])
    inner = 1
    for t in tail:
        inner *= t
    hc = stack.hc // head_div
    row = heads * inner
    tail_strides = []
    acc = 1
    for t in reversed(tail):
        tail_strides.append(acc)
        acc *= t
    tail_strides.reverse()
    size = (b, stack.count, stack.m, stack.classes, hc, *tail)
    stride = (n * row, stack.seg * row, stack.rate * row, row + hc * inner, inner, *tail_strides)
    offset = x.storage_offset() + (stack.g0 * stack.seg + stack.s0) * row + (stack.h0 // head_div) * inner
    return x.as_strided(size, stride, offset)


def to_blocks(view: torch.Tensor) -> torch.Tensor:
    """``[b, count, m, classes, hc, *tail]`` view -> kernel layout ``[b*count, m, classes*hc, *tail]``
    (a view when the entries are already laid out that way, else one copy)."""
    b, count, m, classes, hc = view.shape[:5]
    return view.reshape(b * count, m, classes * hc, *view.shape[5:])


def from_blocks(x: torch.Tensor, b: int, classes: int) -> torch.Tensor:
    """Kernel layout ``[b*count, m, classes*hc, *tail]`` -> ``[b, count, m, classes, hc, *tail]``."""
    bc, m, heads = x.shape[:3]
    return x.view(b, bc // b, m, classes, heads // classes, *x.shape[3:])


def lse_from_blocks(lse: torch.Tensor, b: int, classes: int) -> torch.Tensor:
    """Kernel lse ``[b*count, classes*hc, m]`` -> ``[b, count, m, classes, hc]`` (a view)."""
    bc, heads, m = lse.shape
    return lse.view(b, bc // b, classes, heads // classes, m).permute(0, 1, 4, 2, 3)


def lse_to_blocks(view: torch.Tensor) -> torch.Tensor:
    """``[b, count, m, classes, hc]`` lse view -> kernel lse ``[b*count, classes*hc, m]`` (contiguous)."""
    b, count, m, classes, hc = view.shape
    return view.permute(0, 1, 3, 4, 2).reshape(b * count, classes * hc, m).contiguous()
