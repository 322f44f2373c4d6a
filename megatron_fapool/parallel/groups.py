"""Create every process group a layout can use, once, at start-up (DESIGN.md §1).

0. The group of all base ranks (DeepSpeed's world, see ``training/deepspeed_world.py``).
1. Megatron's own groups for the base ranks, made by Megatron's
   ``initialize_model_parallel`` over the base ranks ``[0, num_base)`` only (the
   world also holds pool and expert ranks, which Megatron must not count as data
   parallel replicas): :func:`_initialize_megatron_over_base_ranks` says how and why.
2. One attention group per base rank and candidate active pool size (dedicated pool), or per
   base rank and aligned block of the pool plus one coordination group of the base and pool
   ranks (shared pool, :mod:`.roles`).
3. MA separation: the expert group and the dispatch group of each pipeline stage, and a
   group of each expert rank alone (the expert-parallel / expert-TP group its Megatron
   expert MLPs are built with: it is in none of Megatron's groups).

``torch.distributed.new_group`` is collective over the whole world, so every rank
creates every group in the same order; a rank keeps the handles of those it is in.
Activating or releasing pool ranks later creates no communicator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from unittest import mock

import torch.distributed as dist

from .roles import BASE, EXPERT, POOL, Layout, RankRole

__all__ = ["ParallelGroups", "create_survivor_groups", "initialize_parallel_groups"]


@dataclass
class ParallelGroups:
    """This rank's role and the groups it belongs to."""

    layout: Layout
    rank: int
    attention: dict[tuple[int, ...], dist.ProcessGroup] = field(default_factory=dict)
    base: dist.ProcessGroup | None = None  # all base ranks (the world when there are no others)
    expert: dist.ProcessGroup | None = None
    dispatch: dist.ProcessGroup | None = None
    expert_self: dist.ProcessGroup | None = None  # an expert rank alone (Megatron's expert TP/EP/DP of its MLPs)
    # degraded inference (create_survivor_groups): lost expert rank -> this stage's dispatch group
    # without it, and -> the world without it
    coordination: dist.ProcessGroup | None = None  # shared pool: the base and pool ranks (per-step assignment)
    liveness: object = None  # this process's LivenessMonitor (set by runtime.job.run), for degraded inference
    survivors: dict[int, dist.ProcessGroup] = field(default_factory=dict)
    survivor_world: dict[int, dist.ProcessGroup] = field(default_factory=dict)

    @property
    def role(self) -> RankRole:
        return self.layout.role_of(self.rank)

    @property
    def is_base(self) -> bool:
        return self.role.role == BASE

    @property
    def is_pool(self) -> bool:
        return self.role.role == POOL

    @property
    def is_expert(self) -> bool:
        return self.role.role == EXPERT

    def attention_group(self, base_rank: int, active: int) -> dist.ProcessGroup:
        return self.group_of_members((base_rank,) + self.layout.attention_group(base_rank, active)[1:])

    def group_of_members(self, members: tuple[int, ...]) -> dist.ProcessGroup:
        """The attention group of exactly ``members`` (a base rank first, then pool ranks)."""
        if members not in self.attention:
            raise KeyError(f"rank {self.rank} is not a member of attention group {list(members)}")
        return self.attention[members]


def _initialize_megatron_over_base_ranks(layout: Layout, timeout_s: float) -> None:
    """Megatron's ``parallel_state`` over the base ranks ``[0, num_base)`` only: the one adapter.

    Why a patch: megatron-core 0.16.1's ``initialize_model_parallel`` takes the world it
    divides into TP x PP x DP from ``torch.distributed.get_world_size()``
    (parallel_state.py:736) and builds its ``RankGenerator`` with ``rank_offset=0``
    (parallel_state.py:782, 805); it has no argument for a grid smaller than the world,
    so here, while it runs, the no-group query answers ``num_base`` (the base ranks are
    a prefix of the world; ``new_group`` itself sizes by the default group, and every
    query naming a group is answered as usual). Paths below are under ``megatron/core/``.

    Why not ``HyperCommGrid(shape, dim_names, rank_offset=0)`` plus an explicit
    ``ProcessGroupCollection`` for ``GPTModel``: the grid makes the same groups over a
    prefix of the world, but nothing in 0.16.1 installs them in ``parallel_state``, and
    parts of the model read its globals whatever ``pg_collection`` says. The unfused
    loss of ``GPTModel(labels=...)`` calls ``vocab_parallel_cross_entropy`` without a
    group (``models/common/language_module/language_module.py:167``), which takes the TP
    group from ``parallel_state`` (``tensor_parallel/cross_entropy.py:131-157``: with
    only a grid it fails "tensor model parallel group is not initialized"); the matmul
    buffer of ``DotProductAttention`` and of sequence-parallel linears
    (``transformer/dot_product_attention.py:189``, ``tensor_parallel/layers.py:482``)
    exists only after ``initialize_model_parallel``; the RNG seed reads the TP and
    expert ranks there unless given (``tensor_parallel/random.py:405-408``). DeepSpeed's
    ``mpu`` (``training/deepspeed_world.MegatronMPU``), inference and tests read it too.
    """
    from megatron.core import parallel_state

    real = dist.get_world_size

    def world_size(group=None):
        return layout.num_base if group is None else real(group)

    with mock.patch.object(dist, "get_world_size", world_size):
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp,
            # MoE: every base rank holding experts holds whole experts (no Megatron EP); with the
            # default expert TP (= TP) the allgather dispatcher would gather the sequence over TP.
            expert_model_parallel_size=1,
            expert_tensor_parallel_size=1,
            create_gloo_process_groups=False,
            distributed_timeout_minutes=max(1, int(timeout_s // 60)),
        )


def initialize_parallel_groups(layout: Layout, *, timeout_s: float = 600.0) -> ParallelGroups:
    """Create all groups of ``layout`` on the initialised default process group."""
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call init_process_group first")
    world = dist.get_world_size()
    if world != layout.world_size:
        raise RuntimeError(f"layout is for {layout.world_size} ranks but the world has {world}")
    rank = dist.get_rank()
    timeout = timedelta(seconds=timeout_s)

    _initialize_megatron_over_base_ranks(layout, timeout_s)
    groups = ParallelGroups(layout=layout, rank=rank)
    if layout.num_base == world:
        groups.base = dist.group.WORLD
    else:
        base = dist.new_group(list(range(layout.num_base)), timeout=timeout)
        groups.base = base if rank < layout.num_base else None
    for members in layout.attention_groups():
        pg = dist.new_group(list(members), timeout=timeout)
        if rank in members:
            groups.attention[members] = pg
    if layout.pool_shared:
        members = layout.coordination_group()
        pg = dist.new_group(list(members), timeout=timeout) if len(members) < world else dist.group.WORLD
        groups.coordination = pg if rank in members else None
    for stage in range(layout.pp if layout.num_expert else 0):
        expert = dist.new_group(list(layout.expert_group(stage)), timeout=timeout)
        dispatch = dist.new_group(list(layout.dispatch_group(stage)), timeout=timeout)
        if rank in layout.expert_group(stage):
            groups.expert = expert
        if rank in layout.dispatch_group(stage):
            groups.dispatch = dispatch
        for r in layout.expert_group(stage):
            alone = dist.new_group([r], timeout=timeout)
            if r == rank:
                groups.expert_self = alone
    return groups


def create_survivor_groups(groups: ParallelGroups, *, timeout_s: float = 600.0) -> None:
    """MA separation, degraded inference: for every expert rank ``r``, the dispatch group of its stage
    without ``r`` and the world without ``r`` (``groups.survivors[r]``, ``groups.survivor_world[r]``
    on the ranks in them), so that losing one expert rank needs no new communicator.

    Collective over the whole world, like :func:`initialize_parallel_groups` (every rank calls it
    once, after it): ``new_group`` cannot be called once a member is gone.
    """
    layout = groups.layout
    timeout = timedelta(seconds=timeout_s)
    world = list(range(layout.world_size))
    for stage in range(layout.pp if layout.num_expert else 0):
        dispatch = layout.dispatch_group(stage)
        for lost in layout.expert_group(stage):
            members = [r for r in dispatch if r != lost]
            pg = dist.new_group(members, timeout=timeout)
            if groups.rank in members:
                groups.survivors[lost] = pg
            rest = [r for r in world if r != lost]
            pg = dist.new_group(rest, timeout=timeout)
            if groups.rank in rest:
                groups.survivor_world[lost] = pg
