"""This process as a world of one, with Megatron's groups (TP = PP = 1).

For work that needs Megatron's modules but no other process: a single-GPU tool, the
checkpoint converter's TP 1 model. The default group lives on an in-memory store, so no
port is taken and two such processes never race for one.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["world_of_one"]


@contextlib.contextmanager
def world_of_one(device: str = "cpu"):
    """``with world_of_one("auto"|"cuda"|"cpu") as device:`` a default group of one rank and
    Megatron's parallel state at TP = PP = 1; both are torn down on exit."""
    from megatron.core import parallel_state

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if dist.is_initialized():
        raise RuntimeError("world_of_one: a default process group exists already in this process")
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dev = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if use_cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                            timeout=timedelta(seconds=600))
    try:
        parallel_state.initialize_model_parallel(1, 1, create_gloo_process_groups=False)
        yield dev
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
