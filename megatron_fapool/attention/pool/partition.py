"""Zigzag query blocks for an attention group (pure functions, DESIGN.md §2).

The sequence of length ``n`` is cut into ``2P`` chunks (``P`` = group size = base +
active pool ranks) with boundaries ``floor(c * n / 2P)``, so any ``n`` works and no
padding is visible. Member ``i`` takes chunks ``i`` and ``2P - 1 - i``: under a causal
mask every member then does the same amount of work. A member needs the K/V prefix
up to the end of its later chunk (the whole sequence without a causal mask).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ZigzagPlan", "zigzag_plan"]


@dataclass(frozen=True)
class ZigzagPlan:
    n: int
    members: int  # P
    causal: bool
    bounds: tuple[int, ...]  # 2P + 1 chunk boundaries

    def chunks_of(self, member: int) -> tuple[int, int]:
        return member, 2 * self.members - 1 - member

    def span(self, chunk: int) -> tuple[int, int]:
        return self.bounds[chunk], self.bounds[chunk + 1]

    def spans_of(self, member: int) -> tuple[tuple[int, int], tuple[int, int]]:
        a, b = self.chunks_of(member)
        return self.span(a), self.span(b)

    def kv_prefix(self, member: int) -> int:
        """Keys/values member ``member`` must hold: the prefix its later chunk sees."""
        return self.span(self.chunks_of(member)[1])[1] if self.causal else self.n

    @property
    def pool_kv_prefix(self) -> int:
        """Longest prefix any pool member (member >= 1) needs: what is sent."""
        return max(self.kv_prefix(m) for m in range(1, self.members))

    @property
    def padded_chunk(self) -> int:
        """Longest chunk: per-member transfer buffers hold two chunks of this length."""
        return max(self.bounds[c + 1] - self.bounds[c] for c in range(2 * self.members))

    def kv_pieces(self, max_tokens: int) -> list[tuple[int, int]]:
        """How the K/V prefix ``[0, pool_kv_prefix)`` is sent: pieces of ``max_tokens``.

        Measured on 2 x H200 (docs/benchmarks.md): fewer, larger pieces are faster. A
        collective issued once attention kernels occupy the GPU waits for free SMs, so
        pieces sent behind the first one do not overlap with compute; they only add
        launches. The default (config ``kv_chunk_tokens``) therefore sends one piece.
        """
        e_max = self.pool_kv_prefix
        return [(lo, min(lo + max_tokens, e_max)) for lo in range(0, e_max, max_tokens)]

    def work(self, member: int) -> int:
        """Query-key pairs member ``member`` computes (causal: ~ equal for all members)."""
        total = 0
        for lo, hi in self.spans_of(member):
            rows = hi - lo
            total += rows * (lo + (rows + 1) / 2) if self.causal else rows * self.n
        return int(total)


def zigzag_plan(n: int, members: int, causal: bool) -> ZigzagPlan:
    if members < 2:
        raise ValueError(f"an attention group has the base rank and >= 1 pool rank, got {members} members")
    if n < 2 * members:
        raise ValueError(f"sequence of {n} tokens is too short to split over {members} members (needs >= {2 * members})")
    chunks = 2 * members
    return ZigzagPlan(n=n, members=members, causal=causal, bounds=tuple(c * n // chunks for c in range(chunks + 1)))
