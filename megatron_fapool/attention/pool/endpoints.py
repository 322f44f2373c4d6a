"""The two ends of the attention pool over the serving transport, and the per-base-rank bundle.

* :class:`PoolClient`: a base rank's end (one per base rank, shared by its layers).
* :class:`PoolServer`: a pool rank's serving loop, with the handlers of every pooled
  algorithm (:mod:`.zigzag`, :mod:`.heads`, :mod:`.decode`, :mod:`.slot_kv`) and the K/V shards it keeps
  for inference.
* :class:`AttentionPool`: a base rank's client, resource manager and counters, built once
  at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...parallel.service import ServiceClient, ServiceMember, merge_handlers
from ..kernels import BackendSelector
from . import decode, heads, slot_kv, zigzag
from .manager import PoolResourceManager
from .stats import PoolStats

__all__ = ["AttentionPool", "PoolClient", "PoolServer"]


class PoolClient(ServiceClient):
    """A base rank's end of its pool: headers, call ids and the groups of each active size."""

    def __init__(self, groups, *, kv_chunk_tokens: int, backend: str = "auto", stats: PoolStats | None = None):
        if not groups.is_base:
            raise ValueError(f"rank {groups.rank} is not a base rank")
        pool_ranks = groups.layout.pool_of(groups.rank)
        control = groups.attention_group(groups.rank, len(pool_ranks)) if pool_ranks else None
        super().__init__(rank=groups.rank, peers=pool_ranks, control_group=control, stats=stats or PoolStats())
        self.groups = groups
        self.pool_ranks = pool_ranks
        self.max_members = len(pool_ranks) + 1
        self.kv_chunk = kv_chunk_tokens
        self.backend = backend
        self.selector = BackendSelector()  # "auto" and its run-time fallbacks, for this rank's calls

    def group(self, active: int):
        """The group of this base rank and its first ``active`` pool ranks."""
        return self.groups.attention_group(self.rank, active)


class PoolServer(ServiceMember):
    """A pool rank: serves its base rank's pooled calls until SHUTDOWN (holds no weights)."""

    HANDLERS = merge_handlers(zigzag.HANDLERS, heads.HANDLERS, decode.HANDLERS, slot_kv.HANDLERS)

    def __init__(self, groups, *, device, stats: PoolStats | None = None):
        if not groups.is_pool:
            raise ValueError(f"rank {groups.rank} is not a pool rank")
        base = groups.role.serves
        per_base = groups.layout.pool_per_base
        super().__init__(
            rank=groups.rank, leader=base, member=groups.role.pool_index + 1,
            control_group=groups.attention_group(base, per_base),
            group_of=lambda members: groups.attention_group(base, members - 1),
            device=device, stats=stats or PoolStats(), handlers=self.HANDLERS,
        )
        self.kv = decode.KVShardStore()  # inference: K/V shards of pooled requests (session path)
        self.slot_kv: slot_kv.SlotKV | None = None  # inference: pooled K/V in slots (slots engine)
        self.selector = BackendSelector()  # "auto" and its run-time fallbacks, for this rank's calls


@dataclass
class AttentionPool:
    client: PoolClient
    manager: PoolResourceManager
    stats: PoolStats

    @classmethod
    def for_base_rank(cls, groups, pool_cfg, *, backend: str = "auto") -> "AttentionPool":
        stats = PoolStats()
        client = PoolClient(groups, kv_chunk_tokens=pool_cfg.kv_chunk_tokens, backend=backend, stats=stats)
        manager = PoolResourceManager.from_config(pool_cfg, pool_share=groups.layout.pool_per_base, stats=stats)
        return cls(client=client, manager=manager, stats=stats)

    def shutdown(self, device) -> None:
        self.client.shutdown(device)
