"""The multi-process harness itself: results, errors and hangs are reported, never hang."""

import time

import pytest
import torch
import torch.distributed as dist

from megatron_fapool.testing.distributed import DistributedRunError, run_distributed


def _allreduce_rank(rank, world_size):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return t.item()


def _raise_on_rank_1(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank 1")
    dist.barrier()


def _hang_on_rank_0(rank, world_size):
    if rank == 0:
        time.sleep(600)
    return rank


def test_collects_results_from_every_rank():
    assert run_distributed(_allreduce_rank, 3, timeout=60) == [3.0, 3.0, 3.0]


def test_rank_error_fails_with_its_traceback():
    t0 = time.monotonic()
    with pytest.raises(DistributedRunError, match="rank 1 failed(.|\n)*boom on rank 1"):
        run_distributed(_raise_on_rank_1, 2, timeout=60)
    assert time.monotonic() - t0 < 45


def test_hang_times_out_quickly():
    t0 = time.monotonic()
    # rank 1 may still be starting on a loaded machine; rank 0 (the hung one) must be named
    with pytest.raises(DistributedRunError, match=r"timed out after 10s waiting for rank\(s\) \[0(, 1)?\]"):
        run_distributed(_hang_on_rank_0, 2, timeout=10)
    assert time.monotonic() - t0 < 25
