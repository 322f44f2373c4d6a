"""DeepSpeed on the base ranks only: the ``mpu`` it is given and the world it sees.

Pool ranks hold no weights and never call ``deepspeed.initialize``; they sit in their
serving loop (``attention/pool/endpoints.py``). DeepSpeed, however, calls a few
collectives on its *world* (``deepspeed.comm.barrier()`` around checkpoint saves, the
checkpoint-tag check, ...), which would wait for ranks that never come. Two pieces fix
that without touching DeepSpeed's code:

* :class:`MegatronMPU` — the model-parallel unit DeepSpeed asks for its data-parallel
  group (ZeRO partitions and gradient averaging) and its model-parallel group
  (gradient-norm reduction, checkpoint file names): Megatron's own groups, which span
  the base ranks only.
* :func:`base_ranks_as_world` — while active, DeepSpeed's communication backend
  answers "the world" with the group of base ranks: collectives called without a
  group run over the base ranks, ``get_world_size()`` is their number. Base ranks are
  the prefix ``[0, num_base)`` of the world, so a rank's number is the same in both.
  Nothing outside DeepSpeed is affected (Megatron and the pool always name a group),
  and this context is the only code that changes DeepSpeed's state; it restores all
  of it on exit.
"""

from __future__ import annotations

import contextlib

import torch.distributed as dist

__all__ = ["MegatronMPU", "base_ranks_as_world"]


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


# DeepSpeed backend methods that take a process group. DeepSpeed's ``comm.py`` passes it
# by keyword, except for the methods listed with the position it passes it at. (The
# backend's methods are wrapped without ``functools.wraps``, so their signatures cannot
# be read; tests/training/test_deepspeed_world.py checks these against DeepSpeed.)
_GROUP_METHODS = frozenset({
    "all_gather", "all_gather_coalesced", "all_gather_into_tensor", "all_gather_object", "all_reduce",
    "all_reduce_coalesced", "all_to_all", "all_to_all_single", "barrier", "broadcast", "broadcast_object_list",
    "gather", "get_rank", "inference_all_reduce", "irecv", "isend", "monitored_barrier", "recv", "reduce",
    "reduce_scatter", "reduce_scatter_tensor", "scatter", "send",
})
_POSITIONAL_GROUP = {"all_reduce": 2, "all_reduce_coalesced": 2, "inference_all_reduce": 2, "get_rank": 0}


def _is_world(group) -> bool:
    return group is None or group is dist.GroupMember.WORLD


class _BaseRanksBackend:
    """Wraps DeepSpeed's backend object; a missing or WORLD ``group`` becomes the base group."""

    def __init__(self, inner, base_group, num_base: int):
        self._inner = inner
        self._base = base_group
        self._num_base = num_base

    def get_world_group(self):
        return self._base

    def get_world_size(self, group=None):
        return self._num_base if _is_world(group) else self._inner.get_world_size(group)

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if name not in _GROUP_METHODS:
            return attr
        pos = _POSITIONAL_GROUP.get(name)

        def call(*args, **kwargs):
            if pos is not None and len(args) > pos:
                if _is_world(args[pos]):
                    args = args[:pos] + (self._base,) + args[pos + 1:]
            elif _is_world(kwargs.get("group")):
                kwargs["group"] = self._base
            return attr(*args, **kwargs)

        return call


_SHM_COMM_OP = "deepspeed_shm_comm"
_ABSENT = object()


@contextlib.contextmanager
def base_ranks_as_world(base_group, num_base: int):
    """DeepSpeed's collectives without a group run over ``base_group`` inside this block.

    The one place where DeepSpeed's own state is changed, all of it undone on exit:
    its communication backend object (``deepspeed.comm.comm.cdb``, wrapped when the
    base ranks are not the whole world) and its table of buildable ops
    (``deepspeed.ops.__compatible_ops__``). Call after the default group exists:
    ``deepspeed.comm.init_distributed`` (which :func:`deepspeed.initialize` does too)
    is done here first, on that group.
    """
    import deepspeed.comm as ds_comm
    import deepspeed.ops
    from deepspeed.comm import comm as ds_comm_impl

    if dist.get_rank() >= num_base:
        raise RuntimeError(f"rank {dist.get_rank()} is not a base rank: it must not run DeepSpeed")
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
        if num_base != dist.get_world_size():
            inner = ds_comm_impl.cdb
            ds_comm_impl.cdb = _BaseRanksBackend(inner, base_group, num_base)
        yield
    finally:
        if inner is not None:
            ds_comm_impl.cdb = inner
        if shm_before is _ABSENT:
            ops.pop(_SHM_COMM_OP, None)
        else:
            ops[_SHM_COMM_OP] = shm_before
