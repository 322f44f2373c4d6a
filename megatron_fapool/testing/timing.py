"""Wall time of one call: CUDA events on a GPU (the call's stream), perf_counter on CPU."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

__all__ = ["elapsed_ms", "median_ms"]


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
    for _ in range(warmup):
        fn()
    return statistics.median(elapsed_ms(fn, device) for _ in range(max(1, reps)))
