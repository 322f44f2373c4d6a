"""A function on N fresh processes with ``torch.distributed`` between them, with a hard timeout.

For work that needs a world of its own inside one command (the checkpoint converter's
source and target worlds) and for the multi-process tests (:mod:`..testing.distributed`).
Every rank is a new process (on a CPU-only machine forked from a fork server that imported torch and
Megatron once, so a rank starts in a fraction of a second; with CUDA spawned), its default group on
``backend`` (gloo on
CPU unless told otherwise) through a rendezvous store the parent holds, on a port the
OS picked as it bound, so runs side by side never race for one. The parent waits for
all ranks:

* a rank that raises ends the run at once with that rank's traceback
  (:class:`SpawnError`); a :class:`~megatron_fapool.config.ConfigError` is raised again
  in the parent as itself, so bad input found by a worker is one line, like any other;
* a rank that dies without reporting (killed, out of memory) names itself and its exit
  code;
* a run past ``timeout`` seconds (a hung collective) kills every rank and names those
  that did not finish.

The function must be importable by reference (a module-level function)::

    def fn(rank: int, world_size: int, *args) -> Any: ...

Its return value is sent back through a pipe (``torch.save``): keep it small (numbers,
names, a summary); large results belong in files the workers write.
"""

from __future__ import annotations

import io
import os
import queue as queue_mod
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

from ..config import ConfigError

__all__ = ["SpawnError", "spawn_world"]

_OK, _FAILED, _CONFIG = "ok", "failed", "config"

#: Imported once by the fork server that every rank is forked from on a machine without a GPU (a missing one
#: is skipped): a rank then starts without re-importing torch and Megatron (seconds of CPU each). The server
#: is a fresh process that has run no torch op, so forking it is safe. With CUDA, ranks are spawned (those
#: imports query the GPU, and a forked child cannot initialise CUDA again).
PRELOAD = ("torch", "torch.distributed", "megatron.core", "megatron_fapool.models.gpt", "megatron_fapool.parallel")


class SpawnError(RuntimeError):
    """A rank failed, exited without reporting, or the run timed out."""


def _rank_main(fn, rank, world_size, port, backend, env, args_bytes, results, collective_timeout, threads):
    """One rank: joins the parent's store, initialises the default group, runs ``fn``, reports."""
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

    if threads:
        torch.set_num_threads(threads)
    try:
        args = torch.load(io.BytesIO(args_bytes), weights_only=False)
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=collective_timeout))
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=collective_timeout)
        )
        value = fn(rank, world_size, *args)
        # Serialise here: tensors put on the queue directly are shared through file
        # descriptors that vanish when this process exits.
        buf = io.BytesIO()
        torch.save(value, buf)
        results.put((rank, _OK, buf.getvalue()))
    except ConfigError as e:
        results.put((rank, _CONFIG, (e.key, e.reason, e.source, traceback.format_exc())))
    except BaseException:  # noqa: BLE001 - reported to the parent verbatim
        results.put((rank, _FAILED, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


def spawn_world(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    backend: str = "gloo",
    env: dict[str, str] | None = None,
    threads: int | None = 1,
    daemon: bool = True,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` new processes; return the per-rank results.

    ``threads``: ``torch.set_num_threads`` in each rank (``None``: torch's default). ``daemon=False``
    lets the ranks start processes of their own (megatron-core's checkpoint writer does); they are
    killed here all the same when the run fails or times out. Raises
    :class:`SpawnError` (see the module doc) or the :class:`ConfigError` a rank raised.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if torch.cuda.is_available():  # the preloaded imports query CUDA, which a forked child cannot use
        ctx = mp.get_context("spawn")
    else:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(list(PRELOAD))
    results = ctx.Queue()
    # The rendezvous store lives here, on a port the OS picks as it binds: a port chosen first and
    # bound later by rank 0 can be taken meanwhile by a run beside this one.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=max(5.0, timeout)))
    env = {k: str(v) for k, v in (env or {}).items()}
    # Arguments travel as bytes: tensors pickled for a child process would each take a file descriptor,
    # and the fork server passes a child at most a few hundred.
    buf = io.BytesIO()
    torch.save(tuple(args), buf)
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(fn, r, world_size, store.port, backend, env, buf.getvalue(), results, max(5.0, timeout), threads),
            daemon=daemon,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    collected: dict[int, tuple[str, Any]] = {}
    try:
        while len(collected) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(collected))
                raise SpawnError(f"timed out after {timeout:.0f}s waiting for rank(s) {missing}"
                                 + _failures_text(collected))
            try:
                rank, status, value = results.get(timeout=min(remaining, 0.5))
                collected[rank] = (status, value)
                if status == _CONFIG:
                    key, reason, source, _ = value
                    raise ConfigError(key, reason, source=source)
                if status != _OK:  # fail fast: one rank's error usually leaves the others blocked
                    raise SpawnError(_failures_text(collected).lstrip())
            except queue_mod.Empty:
                _check_dead(procs, results, collected)
    finally:
        for p in procs:
            p.join(timeout=5 if len(collected) == world_size else 0.1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        del store
    return [torch.load(io.BytesIO(collected[r][1]), weights_only=False) for r in range(world_size)]


def _check_dead(procs, results, collected) -> None:
    """Ranks that exited without a report fail the run (after a last look at the queue)."""
    dead = [(r, p.exitcode) for r, p in enumerate(procs) if r not in collected and p.exitcode is not None]
    if not dead:
        return
    time.sleep(0.2)  # let a last report arrive
    while True:
        try:
            rank, status, value = results.get_nowait()
            collected[rank] = (status, value)
        except queue_mod.Empty:
            break
    failed = [(r, s, v) for r, (s, v) in sorted(collected.items()) if s == _CONFIG]
    if failed:
        key, reason, source, _ = failed[0][2]
        raise ConfigError(key, reason, source=source)
    dead = [(r, c) for r, c in dead if r not in collected]
    if dead:
        raise SpawnError("rank(s) exited without reporting: "
                         + ", ".join(f"rank {r} (exit code {c})" for r, c in dead)
                         + _failures_text(collected))
    if any(s == _FAILED for s, _ in collected.values()):
        raise SpawnError(_failures_text(collected).lstrip())


def _failures_text(collected: dict[int, tuple[str, Any]]) -> str:
    return "".join(f"\n--- rank {r} failed ---\n{v}" for r, (s, v) in sorted(collected.items()) if s == _FAILED)
