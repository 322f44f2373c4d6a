"""DeepSpeed on one role's ranks: the ``mpu`` it is given and the world it sees.

Pool ranks hold no weights and never call ``deepspeed.initialize``; they sit in their
serving loop (``attention/pool/endpoints.py``). With MA separation there are *two*
kinds of DeepSpeed engine: the base (attention) ranks' engine over Megatron's model
without its experts, and one engine per expert rank over its experts
(``training/experts.py``). DeepSpeed, however, calls a few collectives on its *world*
(``deepspeed.comm.barrier()`` around checkpoint saves, the checkpoint-tag check, ...),
which would wait for ranks that never come. Three pieces fix that without touching
DeepSpeed's code:

* :class:`MegatronMPU` — the model-parallel unit of the base ranks' engine: DeepSpeed
  asks it for its data-parallel group (ZeRO partitions and gradient averaging) and its
  model-parallel group (gradient-norm reduction, checkpoint file names): Megatron's own
  groups, which span the base ranks only.
* :class:`ExpertMPU` — the one of an expert rank's engine: data parallel is this rank
  alone (its experts exist nowhere else: nothing is averaged or partitioned across
  ranks), model parallel is the stage's expert group (every expert rank's gradient norm
  counts, and checkpoint files are named ``mp_rank_<expert index>``), tensor and
  pipeline parallel are this rank alone.
* :func:`role_ranks_as_world` — while active, DeepSpeed's communication backend answers
  "the world" with the group of one role's ranks: collectives called without a group
  run over them, ``get_world_size()`` is their number, ``get_rank()`` is the rank's
  index among them, and a source or destination rank given without a group (DeepSpeed
  means a world rank) is translated to the global rank at that index. Nothing outside
  DeepSpeed is affected (Megatron, the pool and the MA transport always name a group),
  and this context is the only code that changes DeepSpeed's state; it restores all of
  it on exit. :func:`base_ranks_as_world` is its base-rank form.
"""

from __future__ import annotations

import contextlib

import torch.distributed as dist

__all__ = ["ExpertMPU", "MegatronMPU", "base_ranks_as_world", "role_ranks_as_world"]


class MegatronMPU:
    """Megatron-core ``parallel_state`` in the shape DeepSpeed's ``mpu`` argument expects."""

    def __init__(self):
        from megatron.core import parallel_state

        self._ps = parallel_state

    # model parallel = TP x PP (DeepSpeed reduces gradient norms and names checkpoint files by it)
    def get_model_parallel_group(self):
        return self._ps.get_model_parallel_group()

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(group=self.get_model_parallel_group())

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(group=self.get_model_parallel_group())

    def get_tensor_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return self._ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self._ps.get_tensor_model_parallel_src_rank()

    def get_pipeline_model_parallel_group(self):
        return self._ps.get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_rank(self) -> int:
        return self._ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self._ps.get_pipeline_model_parallel_world_size()

    # data parallel: replicas of the model among the base ranks
    def get_data_parallel_group(self):
        return self._ps.get_data_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return self._ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return self._ps.get_data_parallel_world_size()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.get_data_parallel_group())


class ExpertMPU:
    """The ``mpu`` of an expert rank's engine: data/tensor/pipeline parallel = ``self_group``
    (this rank alone), model parallel = ``expert_group`` (the stage's expert ranks)."""

    def __init__(self, expert_group, self_group):
        if dist.get_world_size(group=self_group) != 1:
            raise ValueError("ExpertMPU: self_group must hold this rank alone")
        self._expert = expert_group
        self._self = self_group

    def get_model_parallel_group(self):
        return self._expert

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(group=self._expert)

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(group=self._expert)

    def get_tensor_model_parallel_group(self):
        return self._self

    def get_tensor_model_parallel_rank(self) -> int:
        return 0

    def get_tensor_model_parallel_world_size(self) -> int:
        return 1

    def get_tensor_model_parallel_src_rank(self) -> int:
        return dist.get_rank()

    def get_pipeline_model_parallel_group(self):
        return self._self

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_data_parallel_group(self):
        return self._self

    def get_data_parallel_rank(self) -> int:
        return 0

    def get_data_parallel_world_size(self) -> int:
        return 1

    def get_data_parallel_group_ranks(self) -> list[int]:
        return [dist.get_rank()]


# DeepSpeed backend methods that take a process group. DeepSpeed's ``comm.py`` passes it
# by keyword, except for the methods listed with the position it passes it at. (The
# backend's methods are wrapped without ``functools.wraps``, so their signatures cannot
# be read; tests/training/test_deepspeed_world.py checks these against DeepSpeed.)
_GROUP_METHODS = frozenset({
    "all_gather", "all_gather_coalesced", "all_gather_into_tensor", "all_gather_object", "all_reduce",
    "all_reduce_coalesced", "all_to_all", "all_to_all_single", "barrier", "broadcast", "broadcast_object_list",
    "gather", "get_rank", "inference_all_reduce", "irecv", "isend", "monitored_barrier", "recv",
    "reduce", "reduce_scatter", "reduce_scatter_tensor", "scatter", "send",
})
_POSITIONAL_GROUP = {"all_reduce": 2, "all_reduce_coalesced": 2, "inference_all_reduce": 2, "get_rank": 0}
# the rank argument of the methods that take one (a world rank when no group is named), by the
# keyword comm.py passes it with; ``get_global_rank(group, group_rank)`` is translated on its own
_RANK_KEYWORD = {"broadcast": "src", "broadcast_object_list": "src", "scatter": "src", "recv": "src",
                 "irecv": "src", "send": "dst", "isend": "dst", "gather": "dst", "reduce": "dst"}


def _is_world(group) -> bool:
    return group is None or group is dist.GroupMember.WORLD


class _RoleRanksBackend:
    """Wraps DeepSpeed's backend object; a missing or WORLD ``group`` becomes the role's group,
    and a rank meant in that world (an index among the role's ranks) becomes a global rank."""

    def __init__(self, inner, group, ranks):
        self._inner = inner
        self._group = group
        self._ranks = tuple(int(r) for r in ranks)

    def get_world_group(self):
        return self._group

    def get_world_size(self, group=None):
        return len(self._ranks) if _is_world(group) else self._inner.get_world_size(group)

    def _global(self, rank):
        if rank is None:
            return None
        if not 0 <= rank < len(self._ranks):
            raise RuntimeError(f"DeepSpeed named rank {rank} of a world of {len(self._ranks)} ranks {list(self._ranks)}")
        return self._ranks[rank]

    def get_global_rank(self, group, group_rank):
        return self._global(group_rank) if _is_world(group) else self._inner.get_global_rank(group, group_rank)

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if name not in _GROUP_METHODS:
            return attr
        pos = _POSITIONAL_GROUP.get(name)
        rank_kw = _RANK_KEYWORD.get(name)

        def call(*args, **kwargs):
            if pos is not None and len(args) > pos:
                if not _is_world(args[pos]):
                    return attr(*args, **kwargs)
                args = args[:pos] + (self._group,) + args[pos + 1:]
            else:
                if not _is_world(kwargs.get("group")):
                    return attr(*args, **kwargs)
                kwargs["group"] = self._group
            if rank_kw is not None and rank_kw in kwargs:
                kwargs[rank_kw] = self._global(kwargs[rank_kw])
            return attr(*args, **kwargs)

        return call


_SHM_COMM_OP = "deepspeed_shm_comm"
_ABSENT = object()


@contextlib.contextmanager
def role_ranks_as_world(group, ranks):
    """DeepSpeed's collectives without a group run over ``group`` (global ranks ``ranks``, in
    group order) inside this block, and its world ranks are indices into ``ranks``.

    The one place where DeepSpeed's own state is changed, all of it undone on exit:
    its communication backend object (``deepspeed.comm.comm.cdb``, wrapped when the
    role's ranks are not the whole world) and its table of buildable ops
    (``deepspeed.ops.__compatible_ops__``). Call after the default group exists:
    ``deepspeed.comm.init_distributed`` (which :func:`deepspeed.initialize` does too)
    is done here first, on that group.
    """
    import deepspeed.comm as ds_comm
    import deepspeed.ops
    from deepspeed.comm import comm as ds_comm_impl

    ranks = tuple(int(r) for r in ranks)
    if dist.get_rank() not in ranks:
        raise RuntimeError(f"rank {dist.get_rank()} is not one of the ranks {list(ranks)}: it must not run this"
                           " DeepSpeed engine")
    # DeepSpeed's CPU shared-memory all-reduce (used by its inference all-reduce only) is
    # JIT-compiled when its backend starts and then waits in shared memory for every
    # process of the world, pool ranks included, which never come: training does not
    # need it, so it is not built.
    ops = deepspeed.ops.__compatible_ops__
    shm_before = ops.get(_SHM_COMM_OP, _ABSENT)
    ops[_SHM_COMM_OP] = False
    inner = None
    try:
        ds_comm.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
        if ranks != tuple(range(dist.get_world_size())):
            inner = ds_comm_impl.cdb
            ds_comm_impl.cdb = _RoleRanksBackend(inner, group, ranks)
        yield
    finally:
        if inner is not None:
            ds_comm_impl.cdb = inner
        if shm_before is _ABSENT:
            ops.pop(_SHM_COMM_OP, None)
        else:
            ops[_SHM_COMM_OP] = shm_before


def base_ranks_as_world(base_group, num_base: int):
    """:func:`role_ranks_as_world` for the base ranks, the prefix ``[0, num_base)`` of the world."""
    if dist.get_rank() >= num_base:
        raise RuntimeError(f"rank {dist.get_rank()} is not a base rank: it must not run DeepSpeed")
    return role_ranks_as_world(base_group, range(num_base))
