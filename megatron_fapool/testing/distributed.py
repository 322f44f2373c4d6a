"""Run a test body on N ranks in separate processes, with a hard timeout.

The harness is :func:`megatron_fapool.runtime.spawn.spawn_world` (fresh ``spawn``
processes, gloo through a rendezvous store the parent holds, fail fast with the failing
rank's traceback, every rank killed on timeout, so a hang costs seconds, never a CI job);
this module is its form for tests:

    def body(rank: int, world_size: int, *args) -> Any: ...

is a module-level function (it is pickled by reference); its return value (picklable)
is collected per rank.
"""

from __future__ import annotations

import socket
from typing import Any, Callable

from ..runtime.spawn import SpawnError, spawn_world

__all__ = ["DistributedRunError", "find_free_port", "run_distributed"]

#: A rank failed, exited without reporting, or the run timed out.
DistributedRunError = SpawnError


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    backend: str = "gloo",
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes (one thread each); return per-rank
    results. Raises :class:`DistributedRunError` naming the failing rank (with its traceback), a rank
    that died without reporting (its exit code), or a timeout (all ranks killed)."""
    return spawn_world(fn, world_size, *args, timeout=timeout, backend=backend, env=env, threads=1)
