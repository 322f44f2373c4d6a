"""One job of base and pool ranks, from an initialised default group to its teardown.

An entry point parses its flags and runs every check that needs no process group
(its *preflight*: config, :func:`layout_of`, files), then hands the result to
:func:`run`::

    cfg = load_run_config(path)
    layout = job.layout_of(cfg)        # a bad layout fails here, before any group exists
    job.run(cfg, layout, lambda groups, device: ..., timeout_s=600.0)

:func:`run` is the whole start-up and teardown of launch/train.py and launch/infer.py:
default group, liveness monitor, the role/pid line, the resolved config and layout,
every process group; then base ranks run the entry point's function, pool ranks serve
their base rank until it shuts them down, and all ranks meet at a barrier before the
group is destroyed.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from ..attention.pool import PoolServer
from ..attention.pool.sharing import agree_step, shared_manager
from ..config import RunConfig
from ..parallel import Layout, ParallelGroups, initialize_parallel_groups, layout_from_config
from ..parallel.liveness import LivenessMonitor
from ..parallel.service import PeerLost
from . import init_distributed, log0, world_from_env

__all__ = ["BaseWork", "describe_rank", "layout_of", "run", "serve_pool"]

#: What a base rank (or, with MA separation, an expert rank) does between start-up and
#: teardown: ``work(groups, device)``.
BaseWork = Callable[[ParallelGroups, torch.device], None]


def layout_of(cfg: RunConfig) -> Layout:
    """The rank layout of ``cfg`` for the world the launcher set up (its environment); no group needed."""
    _, world, _ = world_from_env()
    return layout_from_config(cfg, world)


def serve_pool(groups: ParallelGroups, device: torch.device, pool_cfg=None) -> None:
    """A pool rank's part of the job: serve its base rank until released (dedicated pool), or the base rank
    of each step's block until the job is done (shared pool), then print what it did."""
    server = PoolServer(groups, device=device)
    if groups.layout.pool_shared:
        manager, steps, served = shared_manager(pool_cfg, groups.layout), 0, {}
        while (agreed := agree_step(groups, manager, 0, device)) is not None:
            steps, blocks = steps + 1, agreed[1]
            for base, block in blocks.items():
                if groups.rank in block:
                    t0 = time.perf_counter()
                    server.serve_for(base, block)
                    server.stats.busy_s += time.perf_counter() - t0
                    served[base] = served.get(base, 0) + 1
        stats, whom = server.stats, f"a shared pool ({steps} steps; steps per base rank served: {served})"
    else:
        stats, whom = server.serve(), f"base rank {groups.role.serves}"
    print(
        f"[rank {dist.get_rank()}] pool rank for {whom}: served"
        f" {stats.served_forward} forward / {stats.served_backward} backward calls in {server.headers} headers,"
        f" {stats.query_rows} query rows, {stats.bytes_received / 1e6:.1f} MB in, {stats.bytes_sent / 1e6:.1f} MB out"
        + (f", busy {stats.busy_s:.2f} s" if groups.layout.pool_shared else ""),
        flush=True,
    )


def describe_rank(cfg: RunConfig, layout: Layout, rank: int) -> str:
    """A rank as the liveness monitor names it, e.g. ``expert rank 3 (experts 0-15)``."""
    role = layout.role_of(rank)
    if role.role != "expert":
        return f"rank {rank} ({role.role})"
    ids = layout.experts_of(rank)
    return f"expert rank {rank} (experts {ids.start}-{ids.stop - 1})"


def _exit_naming(e: PeerLost, monitor: LivenessMonitor) -> None:
    """A lost peer, named: one line and out at once (no teardown: a peer is gone)."""
    monitor.stop(done=False)  # it would only add "lost the store" once rank 0 is gone
    rank = dist.get_rank()
    print(f"fapool: error: [rank {rank}] {e}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    if rank == 0 and not os.environ.get("TORCHELASTIC_USE_AGENT_STORE"):
        time.sleep(2.0)  # this process hosts the rendezvous store: let the others say why they stop
    os._exit(1)


def run(cfg: RunConfig, layout: Layout, base_work: BaseWork, *, expert_work: BaseWork | None = None,
        pool_work: BaseWork | None = None, timeout_s: float = 600.0, exit_on_peer_lost: bool = False) -> int:
    """Run one job on this rank: start-up, ``base_work`` (base ranks), serving (pool ranks: ``pool_work``, by
    default :func:`serve_pool`) or ``expert_work`` (expert ranks, MA separation), teardown.

    ``timeout_s`` bounds every collective (a pool rank waits this long for its base rank).
    Returns 0. An exception leaves without the teardown on purpose: the liveness monitor
    must not mark this rank as finished, so the other ranks report it as lost and exit.
    With ``exit_on_peer_lost`` a lost peer (:class:`PeerLost`) is one line naming it and
    exit code 1 at once. The work functions reach the liveness monitor as ``groups.liveness``.
    """
    if layout.num_expert and expert_work is None:
        raise ValueError("this layout has expert ranks (MA separation): pass expert_work")
    device = init_distributed(timeout_s=timeout_s)
    rank = dist.get_rank()
    monitor = LivenessMonitor(
        rank=rank, world_size=layout.world_size, describe_rank=lambda r: describe_rank(cfg, layout, r),
    ).start()
    print(f"fapool: rank {rank} pid {os.getpid()} role {layout.role_of(rank).role} device {device}", flush=True)
    log0("== resolved config ==\n" + cfg.describe())
    log0("== layout ==\n" + layout.describe())
    t0 = time.perf_counter()
    groups = initialize_parallel_groups(layout, timeout_s=timeout_s)
    groups.liveness = monitor
    log0(f"== groups created in {time.perf_counter() - t0:.2f}s ==")

    try:
        if groups.is_base:
            base_work(groups, device)
        elif groups.is_pool and pool_work is not None:
            pool_work(groups, device)
        elif groups.is_pool:
            serve_pool(groups, device, cfg.fapool.attention_pool)
        else:
            expert_work(groups, device)
    except PeerLost as e:
        if not exit_on_peer_lost:
            raise
        _exit_naming(e, monitor)
    dist.barrier()
    monitor.stop()
    dist.destroy_process_group()
    return 0
