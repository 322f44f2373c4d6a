"""What the tools share: start-up, timing, dtype names, one error measure, bytes and FLOPs.

A tool imports it as ``from _common import ...``: Python puts a script's own folder
(``tools/``) first on ``sys.path``. Nothing in the package imports it.

* :func:`init_process` - the default process group for ``--device auto|cuda|cpu``
  (:func:`megatron_fapool.runtime.init_distributed`, which takes the GPUs whenever there
  are any, plus a gloo group for a CPU run on a GPU host); :func:`run_distributed` - a
  multi-rank tool's ``main``: start-up, world-size check, errors, teardown.
* :func:`elapsed_ms`, :func:`median_ms`, :func:`time_fn` - wall time of a call: CUDA
  events on a GPU, ``perf_counter`` on CPU; :func:`time_fn` keeps every repetition and,
  over a group, the slowest rank's.
* :data:`DTYPES` - ``--dtype`` names to torch dtypes; :func:`default_tol` the check
  tolerance of a dtype.
* :func:`rel_err` - :func:`megatron_fapool.testing.compare.rel_err` (on the device, in chunks).
* :func:`copy_bandwidth` - bytes per second of a large ``dst.copy_(src)`` (read + write), the HBM
  bandwidth the memory-bound figures are set against.
* :func:`sync`, :func:`free_memory`, :func:`fmt_bytes`,
  :func:`attention_flops` (:func:`~megatron_fapool.training.flops.dense_attention_forward_flops`
  over a batch) and :data:`FWD_BWD_FLOPS` (backward = 2.5 x forward).
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import time
import traceback
from typing import Callable

import torch
import torch.distributed as dist

from megatron_fapool.runtime import init_distributed
from megatron_fapool.runtime.local import world_of_one
from megatron_fapool.testing.compare import rel_err
from megatron_fapool.training.flops import dense_attention_forward_flops

__all__ = [
    "DTYPES",
    "FWD_BWD_FLOPS",
    "attention_flops",
    "copy_bandwidth",
    "default_tol",
    "elapsed_ms",
    "fmt_bytes",
    "free_memory",
    "init_process",
    "median_ms",
    "rel_err",
    "run_distributed",
    "sync",
    "time_fn",
]

DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}

#: Forward + backward FLOPs of attention in units of its forward (backward = 2.5 x forward).
FWD_BWD_FLOPS = 3.5


def default_tol(dtype: torch.dtype) -> float:
    """Max relative error a check allows against the reference: 2.5e-2 for 16-bit, 1e-4 otherwise."""
    return 2.5e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4


# --------------------------------------------------------------------------------------
# Process start-up and device housekeeping
# --------------------------------------------------------------------------------------


def init_process(device: str = "auto", timeout_s: float = 600.0) -> tuple[torch.device, int, int]:
    """(device, rank, world size) after initialising the default group for ``--device``.

    :func:`megatron_fapool.runtime.init_distributed`: NCCL with one GPU per rank when CUDA
    is there (``auto``, ``cuda``), gloo on CPU otherwise or for ``cpu``.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    dev = init_distributed(timeout_s, cpu=device == "cpu")
    return dev, dist.get_rank(), dist.get_world_size()


def run_distributed(name: str, body: Callable[[torch.device, int, int], int], *, device: str, timeout_s: float,
                    usage: str, user_errors: tuple[type[BaseException], ...] = ()) -> int:
    """``body(device, rank, world)``'s exit code, on at least 2 ranks started by torchrun.

    Fewer ranks: exit code 2 with ``usage``. One of ``user_errors``: rank 0 prints it on one
    line, every rank exits 2. Any other error: its traceback, then this process exits 1 at
    once (torchrun stops the other ranks, which may wait in a collective).
    """
    device, rank, world = init_process(device, timeout_s)
    if world < 2:
        if rank == 0:
            print(f"{name}: run with torchrun --nproc_per_node 2 ({usage})", file=sys.stderr)
        dist.destroy_process_group()
        return 2
    try:
        code = body(device, rank, world)
    except user_errors as e:
        if rank == 0:
            print(f"{name}: error: {e}", file=sys.stderr, flush=True)
        os._exit(2)
    except Exception:  # noqa: BLE001 - print, then let torchrun stop the other ranks
        print(f"[rank {rank}] {name} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
    dist.barrier()
    dist.destroy_process_group()
    return code


def megatron_world_of_one(device: str = "auto"):
    """This process as a world of one with Megatron's groups (TP = PP = 1): a single-GPU tool's
    start-up (``--device auto|cuda|cpu``); yields the device, destroys the group on exit."""
    return world_of_one(device)


def copy_bandwidth(device, gib: float, reps: int) -> float:
    """Bytes per second of ``dst.copy_(src)`` (read + write)."""
    n = int(gib * (1 << 30)) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, reps=reps)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def sync(device: torch.device) -> None:
    """Wait for ``device``'s queued work (nothing to wait for on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Collect garbage and hand the caching allocator's free blocks back (between phases)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fmt_bytes(nbytes: float) -> str:
    """``1.25 GiB``, ``3.0 MiB`` or ``12.0 KiB``."""
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:.2f} GiB"
    if nbytes >= 2**20:
        return f"{nbytes / 2**20:.1f} MiB"
    return f"{nbytes / 2**10:.1f} KiB"


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


def elapsed_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds ``fn()`` takes on ``device`` (waits for its GPU work to finish)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def median_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, reps: int = 20) -> float:
    """Median of ``reps`` timed calls of ``fn`` after ``warmup`` untimed ones, in milliseconds."""
    return statistics.median(time_fn(fn, device=device, warmup=warmup, reps=reps))


def time_fn(fn: Callable[[], object], *, device: torch.device, reps: int, warmup: int,
            group: dist.ProcessGroup | None = None) -> list[float]:
    """Milliseconds of each of ``reps`` calls of ``fn()`` after ``warmup`` untimed ones.

    With ``group``, every repetition starts after a barrier of its ranks and counts the
    slowest rank's time (a collective; every rank of the group must call it).
    """
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(max(1, reps)):
        if group is not None:
            dist.barrier(group=group)
        sync(device)
        times.append(elapsed_ms(fn, device))
    if group is not None:
        t = torch.tensor(times, dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        times = t.tolist()
    return times


# --------------------------------------------------------------------------------------
# Checks and counts
# --------------------------------------------------------------------------------------


def attention_flops(batch: int, heads: int, n: int, head_dim: int, *, causal: bool = True) -> float:
    """Forward FLOPs of self-attention over ``batch`` sequences of ``n`` tokens (QK^T and PV)."""
    return float(batch * dense_attention_forward_flops(n, num_heads=heads, head_dim=head_dim, causal=causal))
