"""Create every process group a layout can use, once, at start-up (DESIGN.md §1).

0. The group of all base ranks (DeepSpeed's world, see ``training/deepspeed_world.py``).
1. Megatron's own groups for the base ranks, made by Megatron's
   ``initialize_model_parallel`` over the base ranks ``[0, num_base)`` only (the
   world also holds pool and expert ranks, which Megatron must not count as data
   parallel replicas).
2. One attention group per base rank and candidate active pool size.
3. MA separation: the expert group and the dispatch group of each pipeline stage.

``torch.distributed.new_group`` is collective over the whole world, so every rank
creates every group in the same order; a rank keeps the handles of those it is in.
Activating or releasing pool ranks later creates no communicator.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from datetime import timedelta
from unittest import mock

import torch
import torch.distributed as dist

from .roles import BASE, EXPERT, POOL, Layout, RankRole

__all__ = ["ParallelGroups", "destroy_parallel_groups", "initialize_parallel_groups"]


@dataclass
class ParallelGroups:
    """This rank's role and the groups it belongs to."""

    layout: Layout
    rank: int
    attention: dict[tuple[int, ...], dist.ProcessGroup] = field(default_factory=dict)
    base: dist.ProcessGroup | None = None  # all base ranks (the world when there are no others)
    expert: dist.ProcessGroup | None = None
    dispatch: dist.ProcessGroup | None = None

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
        members = self.layout.attention_group(base_rank, active)
        if members not in self.attention:
            raise KeyError(f"rank {self.rank} is not a member of attention group {list(members)}")
        return self.attention[members]


@contextlib.contextmanager
def _megatron_world_of(num_ranks: int):
    """Make Megatron's initializer see a world of ``num_ranks`` (the base ranks).

    ``initialize_model_parallel`` derives the data-parallel size from the default
    group's size; here the base ranks are a prefix of the world. Only the no-group
    query is answered differently; ``new_group`` itself sizes by the default group.
    """
    real = dist.get_world_size

    def world_size(group=None):
        return num_ranks if group is None else real(group)

    with mock.patch.object(dist, "get_world_size", world_size):
        yield


def initialize_parallel_groups(layout: Layout, *, timeout_s: float = 600.0) -> ParallelGroups:
    """Create all groups of ``layout`` on the initialised default process group."""
    from megatron.core import parallel_state

    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call init_process_group first")
    world = dist.get_world_size()
    if world != layout.world_size:
        raise RuntimeError(f"layout is for {layout.world_size} ranks but the world has {world}")
    rank = dist.get_rank()
    timeout = timedelta(seconds=timeout_s)

    with _megatron_world_of(layout.num_base):
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp,
            create_gloo_process_groups=False,
            distributed_timeout_minutes=max(1, int(timeout_s // 60)),
        )

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
    for stage in range(layout.pp if layout.num_expert else 0):
        expert = dist.new_group(list(layout.expert_group(stage)), timeout=timeout)
        dispatch = dist.new_group(list(layout.dispatch_group(stage)), timeout=timeout)
        if rank in layout.expert_group(stage):
            groups.expert = expert
        if rank in layout.dispatch_group(stage):
            groups.dispatch = dispatch
    return groups


def destroy_parallel_groups() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


def megatron_process_groups():
    """Megatron's ``ProcessGroupCollection`` of this base rank (for ``GPTModel``)."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection.use_mpu_process_groups()


def device_for_backend() -> torch.device:
    """The device this rank computes on: its CUDA device under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
