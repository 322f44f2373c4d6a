"""The control header a base rank broadcasts to its pool ranks before each call.

One small int64 tensor, broadcast over the base rank's largest attention group (all
of its pool ranks), so that every pool rank learns whether it takes part, and with
which shapes, before any data moves.
"""

from __future__ import annotations

import struct
from dataclasses import astuple, dataclass

import torch

from ...config.schema import ATTENTION_BACKENDS

__all__ = ["DTYPES", "Header", "Op", "int64_tensor"]


class Op:
    FORWARD = 1
    BACKWARD = 2
    SHUTDOWN = 3
    HEADS_FORWARD = 4  # the pool splitting heads (dilated attention): see heads.py
    HEADS_BACKWARD = 5
    KV_STORE = 6  # inference: keep a shard of a layer's prefill K/V (kv_cache.py)
    KV_DECODE = 7  # inference: one decode step (all layers) of a batch over their sharded caches
    KV_FREE = 8  # inference: drop a request's shards


def int64_tensor(values, device) -> torch.Tensor:
    """Host integers as an int64 tensor on ``device``, without blocking the host.

    On CUDA the copy is pinned and non-blocking: a pageable copy would wait until the
    GPU has finished all queued work, serialising every pooled call.
    """
    t = torch.tensor(list(values), dtype=torch.int64)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True)
class Header:
    op: int
    call_id: int = 0
    drop_before: int = 0  # the pool may free saved state of calls with smaller ids
    n: int = 0
    batch: int = 0
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    dtype: int = 0
    causal: int = 1
    members: int = 0  # base + active pool ranks
    kv_chunk: int = 0
    save: int = 1  # keep state for a backward
    scale_bits: int = 0
    backend: int = 0
    # HEADS_FORWARD: int64 entries of the parameter tensor that follows;
    # KV_DECODE: int64 entries of the layers, then (request, owner) pairs, that follow
    # (n = requests, layer = number of layers)
    extra: int = 0
    layer: int = 0  # KV_*: the layer (KV_STORE / KV_FREE: call_id is the request)

    @property
    def softmax_scale(self) -> float:
        return struct.unpack("<d", struct.pack("<q", self.scale_bits))[0]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def backend_name(self) -> str:
        return ATTENTION_BACKENDS[self.backend]

    @staticmethod
    def scale_to_bits(scale: float) -> int:
        return struct.unpack("<q", struct.pack("<d", float(scale)))[0]

    def to_tensor(self, device) -> torch.Tensor:
        return int64_tensor(astuple(self), device)

    @classmethod
    def empty(cls, device) -> torch.Tensor:
        return torch.zeros(len(astuple(cls(op=0))), dtype=torch.int64, device=device)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "Header":
        return cls(*[int(x) for x in t.tolist()])
