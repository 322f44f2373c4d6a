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
from .sharing import StepShare, shared_manager
from .stats import PoolStats

__all__ = ["AttentionPool", "PoolClient", "PoolServer"]


class PoolClient(ServiceClient):
    """A base rank's end of its pool: headers, call ids and the groups of each active size.

    Dedicated pool: its own pool ranks for the whole job. Shared pool: none until a step's
    assignment gives it a block (:meth:`use`)."""

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
        return self.groups.group_of_members((self.rank,) + self.pool_ranks[:active])

    def use(self, block: tuple[int, ...]) -> None:
        """Shared pool: this step's pool ranks (``()``: none); headers go to all of them."""
        self.pool_ranks = self.peers = tuple(block)
        self.max_members = len(block) + 1
        self.control_group = self.group(len(block)) if block else None


class PoolServer(ServiceMember):
    """A pool rank: serves its base rank's pooled calls until SHUTDOWN (holds no weights).

    Dedicated pool: one base rank for the whole job. Shared pool: the base rank of a step's
    block, until that base rank ends the step (:meth:`serve_for`)."""

    HANDLERS = merge_handlers(zigzag.HANDLERS, heads.HANDLERS, decode.HANDLERS, slot_kv.HANDLERS)

    def __init__(self, groups, *, device, stats: PoolStats | None = None):
        if not groups.is_pool:
            raise ValueError(f"rank {groups.rank} is not a pool rank")
        self.groups = groups
        base = groups.role.serves
        shared = groups.layout.pool_shared
        per_base = groups.layout.pool_per_base
        super().__init__(
            rank=groups.rank, leader=base, member=0 if shared else groups.role.pool_index + 1,
            control_group=None if shared else groups.attention_group(base, per_base),
            group_of=None if shared else (lambda members: groups.attention_group(base, members - 1)),
            device=device, stats=stats or PoolStats(), handlers=self.HANDLERS,
        )
        self.kv = decode.KVShardStore()  # inference: K/V shards of pooled requests (session path)
        self.slot_kv: slot_kv.SlotKV | None = None  # inference: pooled K/V in slots (slots engine)
        self.selector = BackendSelector()  # "auto" and its run-time fallbacks, for this rank's calls

    def serve_for(self, base: int, block: tuple[int, ...]):
        """Shared pool: serve ``base``'s calls over ``block`` (which holds this rank) until it ends the step."""
        group_of = self.groups.group_of_members
        self.leader, self.leaders = base, (base,)
        self.member = block.index(self.rank) + 1
        self.control_group = group_of((base,) + block)
        self.group_of = lambda members: group_of((base,) + block[: members - 1])
        return self.serve()


@dataclass
class AttentionPool:
    """A base rank's pool: ``manager`` decides per call how many pool ranks join (a dedicated pool's
    :class:`PoolResourceManager`, or a shared pool's :class:`~.sharing.StepShare`, which also frames
    each training step: :meth:`begin_step` / :meth:`end_step`)."""

    client: PoolClient
    manager: PoolResourceManager | StepShare
    stats: PoolStats

    @classmethod
    def for_base_rank(cls, groups, pool_cfg, *, backend: str = "auto", device=None) -> "AttentionPool":
        stats = PoolStats()
        client = PoolClient(groups, kv_chunk_tokens=pool_cfg.kv_chunk_tokens, backend=backend, stats=stats)
        if groups.layout.pool_shared:
            manager = StepShare(groups, client, shared_manager(pool_cfg, groups.layout), stats, device)
        else:
            manager = PoolResourceManager.from_config(pool_cfg, pool_share=groups.layout.pool_per_base, stats=stats)
        return cls(client=client, manager=manager, stats=stats)

    @property
    def shared(self) -> bool:
        return isinstance(self.manager, StepShare)

    def begin_step(self, demand: int) -> None:
        """A training step whose longest micro-batch has ``demand`` tokens starts (shared pool: agree on blocks)."""
        if self.shared:
            self.manager.begin_step(demand)

    def end_step(self) -> None:
        """The step's pooled calls are done (shared pool: its block is released)."""
        if self.shared:
            self.manager.end_step()

    def forward_pass(self, calls: int):
        """A micro-batch's forward through ``calls`` pooled layers (in order, all over the same tokens): their
        pooled calls share one header, and so do their backward calls (in reverse order). A pooled layer that
        takes another path breaks the pass with a clear error (:class:`~...parallel.service.PassBroken`)."""
        return self.client.forward_pass(calls)

    def shutdown(self, device) -> None:
        if self.shared:
            self.manager.finish()
        else:
            self.client.shutdown(device)
