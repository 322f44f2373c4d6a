"""Tensor conventions every kernel module shares: layout views, GQA, dtypes, input checks.

Kept apart from :mod:`.dispatch` so that the backend modules and :mod:`.backends` can use
these helpers while :mod:`.dispatch` imports all of them (imports stay acyclic).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "FLOATS",
    "LOW_PRECISION",
    "accumulator_dtype",
    "bhsd",
    "check_qkv",
    "expand_kv",
    "grouped",
    "reduce_kv_grad",
]

LOW_PRECISION = (torch.float16, torch.bfloat16)
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, else float32: the dtype of the LSE and of every accumulation."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def bhsd(x: Tensor) -> Tensor:
    """[b, s, h, d] <-> [b, h, s, d] (a view)."""
    return x.transpose(1, 2)


def expand_kv(x: Tensor, group: int) -> Tensor:
    """[b, s, hkv, d] -> [b, s, hkv*group, d], head i of the result = head i // group."""
    if group == 1:
        return x
    b, s, h, d = x.shape
    return x.unsqueeze(3).expand(b, s, h, group, d).reshape(b, s, h * group, d)


def reduce_kv_grad(dx: Tensor, hkv: int, dtype: torch.dtype) -> Tensor:
    """Sum an expanded-kv gradient [b, s, hq, d] back to [b, s, hkv, d] (fp32 accumulation)."""
    b, s, hq, d = dx.shape
    if hq == hkv:
        return dx.to(dtype).contiguous()
    acc = dx.reshape(b, s, hkv, hq // hkv, d).sum(dim=3, dtype=accumulator_dtype(dtype))
    return acc.to(dtype)


def grouped(x: Tensor, hkv: int) -> Tensor:
    """[b, s, hq, d] -> [b, hkv, g, s, d] view."""
    b, s, hq, d = x.shape
    return x.view(b, s, hkv, hq // hkv, d).permute(0, 2, 3, 1, 4)


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Raise ``ValueError`` unless q, k, v follow the layout, GQA, dtype and device conventions."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [batch, seq, heads, head_dim]")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch and head_dim"
        )
    if k.shape[2] == 0 or q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in FLOATS:
        raise ValueError(f"unsupported dtype {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
