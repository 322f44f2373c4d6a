"""Process start-up shared by the entry points (deepspeed launcher, torchrun).

The helpers here need no process group (``world_from_env``, ``exit_on_user_error``) or
make the default one (``init_distributed``); :mod:`.job` runs a whole job on top of them.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from ..config import ConfigError
from ..parallel import LayoutError

__all__ = ["exit_on_user_error", "init_distributed", "log0", "world_from_env"]


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as set by torchrun / the deepspeed launcher."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as e:
        raise ConfigError("RANK/WORLD_SIZE/LOCAL_RANK", f"not an integer in the environment: {e}") from None
    return rank, world, local


def init_distributed(timeout_s: float = 600.0, *, cpu: bool = False) -> torch.device:
    """Initialise the default group: NCCL with one GPU per rank if CUDA is there, else (or with
    ``cpu``) gloo on CPU."""
    rank, world, local = world_from_env()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if torch.cuda.is_available() and not cpu:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        kwargs = dict(backend=backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
        if backend == "nccl":
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
    return device


def log0(*args, **kwargs) -> None:
    """Print on global rank 0 only (flushed, so launcher output interleaves sanely)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def exit_on_user_error(main):
    """Run ``main()``; a bad config or layout exits 2 with a one-line reason, no traceback."""
    try:
        return main()
    except (ConfigError, LayoutError) as e:
        rank, _, _ = world_from_env()
        if rank == 0:
            print(f"fapool: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
