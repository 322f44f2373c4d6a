"""Run a test body on N ranks in separate processes, with a hard timeout.

Every rank is a fresh process (``spawn``), with ``torch.distributed`` initialised on
gloo through a rendezvous store the parent holds (on a port the OS picked as it bound,
so runs side by side never race for one). The parent waits for all ranks; if any rank raises,
the whole run fails with that rank's traceback; if the run takes longer than
``timeout`` seconds (a hung collective), every rank is killed and the run fails, so a
hang costs seconds, never a CI job.

The body must be a module-level function (it is pickled by reference):

    def body(rank: int, world_size: int, *args) -> Any: ...

Its return value (picklable) is collected per rank.
"""

from __future__ import annotations

import io
import os
import queue as queue_mod
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch.multiprocessing as mp

__all__ = ["DistributedRunError", "find_free_port", "run_distributed"]


class DistributedRunError(RuntimeError):
    """A rank failed, exited without reporting, or the run timed out."""


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn, rank, world_size, port, backend, env, args, results, collective_timeout):
    """One rank: joins the parent's store (the parent holds the listening port, so no two runs
    can race for it), initialises the default group, runs ``fn``, reports."""
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=collective_timeout))
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=collective_timeout)
        )
        value = fn(rank, world_size, *args)
        # Serialise here: tensors put on the queue directly are shared through file
        # descriptors that vanish when this process exits.
        buf = io.BytesIO()
        torch.save(value, buf)
        results.put((rank, True, buf.getvalue()))
    except BaseException:  # noqa: BLE001 - reported to the parent verbatim
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    backend: str = "gloo",
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return per-rank results.

    Raises :class:`DistributedRunError` naming the failing rank (with its traceback), a
    rank that died without reporting (its exit code), or a timeout (all ranks killed).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    import torch.distributed as dist

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    # The rendezvous store lives here, on a port the OS picks as it binds: a port chosen first and
    # bound later by rank 0 can be taken meanwhile by a test running beside this one.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=max(5.0, timeout)))
    port = store.port
    env = {k: str(v) for k, v in (env or {}).items()}
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(fn, r, world_size, port, backend, env, tuple(args), results, max(5.0, timeout)),
            daemon=True,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    collected: dict[int, tuple[bool, Any]] = {}
    try:
        while len(collected) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(collected))
                raise DistributedRunError(
                    f"timed out after {timeout:.0f}s waiting for rank(s) {missing}"
                    + _failures_text(collected)
                )
            try:
                rank, ok, value = results.get(timeout=min(remaining, 0.5))
                collected[rank] = (ok, value)
                if not ok:
                    # Fail fast: one rank's error usually leaves the others blocked.
                    raise DistributedRunError(_failures_text(collected).lstrip())
            except queue_mod.Empty:
                dead = [
                    (r, p.exitcode)
                    for r, p in enumerate(procs)
                    if r not in collected and p.exitcode is not None
                ]
                if dead:
                    time.sleep(0.2)  # let a last report arrive
                    while True:
                        try:
                            rank, ok, value = results.get_nowait()
                            collected[rank] = (ok, value)
                        except queue_mod.Empty:
                            break
                    dead = [(r, c) for r, c in dead if r not in collected]
                    if dead:
                        raise DistributedRunError(
                            "rank(s) exited without reporting: "
                            + ", ".join(f"rank {r} (exit code {c})" for r, c in dead)
                            + _failures_text(collected)
                        )
    finally:
        for p in procs:
            p.join(timeout=5 if len(collected) == world_size else 0.1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        del store
    import torch

    return [torch.load(io.BytesIO(collected[r][1]), weights_only=False) for r in range(world_size)]


def _failures_text(collected: dict[int, tuple[bool, Any]]) -> str:
    return "".join(
        f"\n--- rank {r} failed ---\n{v}" for r, (ok, v) in sorted(collected.items()) if not ok
    )
