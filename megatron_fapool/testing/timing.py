"""Wall time of one call: CUDA events on a GPU (the call's stream), perf_counter on CPU."""

from __future__ import annotations

import time
from typing import Callable

import torch

__all__ = ["elapsed_ms"]


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
