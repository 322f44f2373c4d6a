"""DeepSpeed's group-less collectives are sent to one role's group (checked against DeepSpeed's own comm.py),
its world ranks are translated when the role's ranks are not a prefix of the world (expert ranks), and every
change to DeepSpeed's state is undone when the block ends. (tests/training/test_expert_engine.py runs real
engines in such a world.)"""

import torch

from megatron_fapool.testing.distributed import run_distributed
from megatron_fapool.training.deepspeed_world import _RoleRanksBackend, base_ranks_as_world

BASE = object()  # stands for the base ranks' process group


class _Recorder:
    """A stand-in for DeepSpeed's TorchBackend that records what it was asked."""

    def __init__(self):
        self.calls = []

    def is_initialized(self):
        return True

    def has_all_gather_into_tensor(self):
        return True

    def has_reduce_scatter_tensor(self):
        return True

    def __getattr__(self, name):
        def record(*args, **kwargs):
            self.calls.append((name, args, kwargs))
        return record


def _group_of(call):
    name, args, kwargs = call
    if "group" in kwargs:
        return kwargs["group"]
    pos = {"all_reduce": 2, "all_reduce_coalesced": 2, "inference_all_reduce": 2, "get_rank": 0}[name]
    return args[pos]


def test_groupless_collectives_go_to_the_base_ranks(monkeypatch):
    import deepspeed.comm as ds
    from deepspeed.comm import comm as impl

    rec = _Recorder()
    monkeypatch.setattr(impl, "cdb", _RoleRanksBackend(rec, BASE, ranks=(0, 1)))
    t = torch.zeros(4)
    ds.barrier()
    ds.all_reduce(t)
    ds.all_reduce_coalesced([t])
    ds.broadcast(t, src=0)
    ds.all_gather_into_tensor(torch.zeros(8), t)
    ds.reduce_scatter_tensor(torch.zeros(2), t)
    ds.get_rank()
    assert ds.get_world_size() == 2 and ds.get_world_group() is BASE
    names = [c[0] for c in rec.calls]
    assert {"barrier", "all_reduce", "all_reduce_coalesced", "broadcast", "all_gather_into_tensor",
            "reduce_scatter_tensor", "get_rank"} <= set(names), names
    for call in rec.calls:
        assert _group_of(call) is BASE, call
    # an explicit group is left alone
    other = object()
    ds.all_reduce(t, group=other)
    assert _group_of(rec.calls[-1]) is other


def test_world_ranks_of_a_role_that_is_not_a_prefix(monkeypatch):
    """Expert ranks 5 and 7 of a world of 8: DeepSpeed's world rank i is global rank (5, 7)[i]."""
    import deepspeed.comm as ds
    from deepspeed.comm import comm as impl

    rec = _Recorder()
    monkeypatch.setattr(impl, "cdb", _RoleRanksBackend(rec, BASE, ranks=(5, 7)))
    t = torch.zeros(4)
    ds.broadcast(t, src=1)
    ds.broadcast_object_list([None], src=0)
    ds.send(t, dst=1)
    ds.recv(t, src=0)
    ds.reduce(t, dst=1)
    ds.gather(t, dst=0)
    ds.scatter(t, src=1)
    keyword = {"broadcast": "src", "broadcast_object_list": "src", "send": "dst", "recv": "src", "reduce": "dst",
               "gather": "dst", "scatter": "src"}
    seen = {name: kwargs[keyword[name]] for name, _, kwargs in rec.calls}
    assert seen == {"broadcast": 7, "broadcast_object_list": 5, "send": 7, "recv": 5, "reduce": 7, "gather": 5,
                    "scatter": 7}, seen
    for call in rec.calls:
        assert _group_of(call) is BASE, call
    assert ds.get_global_rank(None, 1) == 7 and ds.get_world_size() == 2
    assert ds.get_all_ranks_from_group(None) == [5, 7]
    # with a group named, ranks are DeepSpeed's caller's (global) and left alone
    other = object()
    ds.broadcast(t, src=3, group=other)
    assert rec.calls[-1][2]["src"] == 3 and rec.calls[-1][2]["group"] is other


def _scoped_body(rank, world_size):
    import deepspeed.comm as ds
    import deepspeed.ops
    import torch.distributed as dist
    from deepspeed.comm import comm as impl

    base = dist.new_group([0])
    if rank != 0:  # rank 1 stands for a pool rank: it never runs DeepSpeed
        dist.barrier()
        return None
    ops = deepspeed.ops.__compatible_ops__
    ops["deepspeed_shm_comm"] = "before"
    with base_ranks_as_world(base, num_base=1):
        inside = {"shm": ops["deepspeed_shm_comm"], "world": ds.get_world_size(),
                  "wrapped": type(impl.cdb).__name__}
        backend = impl.cdb._inner
    after = {"shm": ops["deepspeed_shm_comm"], "restored": impl.cdb is backend}
    dist.barrier()
    return inside, after


def test_every_change_to_deepspeed_is_undone_on_exit():
    """Inside: DeepSpeed's world is the base ranks and its shared-memory op is off; after: both as before."""
    inside, after = run_distributed(_scoped_body, 2, timeout=120)[0]
    assert inside == {"shm": False, "world": 1, "wrapped": "_RoleRanksBackend"}
    assert after == {"shm": "before", "restored": True}
