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
        """How the K/V prefix ``[0, pool_kv_prefix)`` is sent: as few collectives as possible.

        Pieces end where some pool member's first chunk has all the keys it sees, so that
        member starts computing while the rest is on the wire; no piece exceeds
        ``max_tokens``. (Each collective costs a kernel that must find free SMs next to the
        attention kernels, so many small pieces are slower than a few large ones.)
        """
        e_max = self.pool_kv_prefix
        cuts = {e_max}
        if self.causal:
            cuts |= {self.span(m)[1] for m in range(1, self.members)}
        edges = [0]
        for cut in sorted(c for c in cuts if 0 < c <= e_max):
            while cut - edges[-1] > max_tokens:
                edges.append(edges[-1] + max_tokens)
            if cut > edges[-1]:
                edges.append(cut)
        return list(zip(edges[:-1], edges[1:]))

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
