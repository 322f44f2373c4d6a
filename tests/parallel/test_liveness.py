"""The liveness monitor ends a rank whose peer went silent, naming the silent rank."""

import time

import pytest
import torch.distributed as dist

from megatron_fapool.parallel.liveness import EXIT_CODE, LivenessMonitor
from megatron_fapool.testing.distributed import DistributedRunError, run_distributed


def _silent_peer(rank, world):
    store = dist.distributed_c10d._get_default_store()
    if rank == 1:
        store.set("fapool/heartbeat/1", "0")  # one beat, then silence (a hung or frozen rank)
        time.sleep(60)
        return "rank 1 woke up"
    LivenessMonitor(rank=0, world_size=2, interval=0.2, timeout=2.0,
                    describe_rank=lambda r: f"rank {r} (pool)").start()
    time.sleep(60)
    return "rank 0 was not stopped"


def _finished_peer(rank, world):
    mon = LivenessMonitor(rank=rank, world_size=2, interval=0.2, timeout=1.0).start()
    if rank == 1:
        mon.stop()  # finished normally: must not be reported
        return "done"
    time.sleep(3)
    mon.stop()
    return "still alive"


def test_silent_rank_is_named_and_ends_the_watcher():
    t0 = time.monotonic()
    with pytest.raises(DistributedRunError, match=f"rank 0 \\(exit code {EXIT_CODE}\\)"):
        run_distributed(_silent_peer, 2, timeout=45)
    assert time.monotonic() - t0 < 40


def test_rank_that_finished_is_not_reported():
    assert run_distributed(_finished_peer, 2, timeout=45) == ["still alive", "done"]
