"""Counters that prove the pool ran (and how much it moved), on both sides."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ...parallel.service import TransferStats

__all__ = ["PoolStats"]


@dataclass
class PoolStats(TransferStats):
    """Pool counters; ``bytes_sent`` / ``bytes_received`` come from :class:`TransferStats`."""

    # resource manager (base rank)
    activations: int = 0  # 0 -> p > 0
    releases: int = 0  # p > 0 -> 0
    resizes: int = 0  # p -> p' with both > 0
    # calls (base rank)
    local_calls: int = 0
    pooled_forward: int = 0
    pooled_backward: int = 0
    # work (both sides)
    served_forward: int = 0  # pool rank: forward calls it computed
    served_backward: int = 0
    query_rows: int = 0  # query rows this rank computed for pooled calls
    busy_s: float = 0.0  # pool rank: seconds spent serving (from a call's header to its last reply)

    def as_dict(self) -> dict:
        return asdict(self)

    def reset(self) -> None:
        for k in asdict(self):
            setattr(self, k, 0)
