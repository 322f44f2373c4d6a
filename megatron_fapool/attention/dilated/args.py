"""The dilated-attention call, defined once: its arguments, their defaults and their checks.

:func:`check_dilated_args` is the one definition of what a dilated call takes besides the
tensors and the kernel options. :func:`~megatron_fapool.attention.dilated.dilated_attention`
and the float64 references take those arguments as they come (``*call, **heads``) and hand
them to it, so their names, order and defaults are written here only. Each error names the
argument at fault.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["DilatedArgs", "check_dilated_args"]


@dataclass(frozen=True)
class DilatedArgs:
    """One checked, normalised dilated call (everything but the tensors and the kernel options)."""

    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    causal: bool
    softmax_scale: float
    head_offset: int  # global index of local head 0
    total_heads: int
    kv_group: int  # query heads per key/value head (GQA)


def _positive_ints(name: str, values) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        try:
            values = list(values)
        except TypeError:
            raise ValueError(f"{name} must be a sequence of positive ints, got {values!r}") from None
    out = []
    for i, x in enumerate(values):
        if isinstance(x, bool) or not isinstance(x, numbers.Integral):
            raise ValueError(f"{name}[{i}] must be an int, got {x!r}")
        if x <= 0:
            raise ValueError(f"{name}[{i}] must be > 0, got {x}")
        out.append(int(x))
    if not out:
        raise ValueError(f"{name} must not be empty")
    return tuple(out)


def _check_tensors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, seq, heads, head_dim], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[1] != q.shape[1]:
        raise ValueError(
            "k must share q's batch and sequence dims (dilated attention is self-attention),"
            f" got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"k head_dim {k.shape[3]} must equal q head_dim {q.shape[3]}")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"q heads ({q.shape[2]}) must be a multiple of k heads ({k.shape[2]}) (GQA)")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def check_dilated_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    causal: bool = True,
    softmax_scale: float | None = None,
    *,
    head_offset: int = 0,
    total_heads: int | None = None,
) -> DilatedArgs:
    """Validate and normalise one dilated call (DESIGN.md §4).

    q ``[batch, seq, H, head_dim]``, k/v ``[batch, seq, H_kv, head_dim]`` (self-attention,
    ``H % H_kv == 0``: GQA). Branch i has segment length ``segment_lengths[i]`` and
    dilation rate ``dilation_rates[i]``. ``softmax_scale`` defaults to
    ``1 / sqrt(head_dim)``. The local heads are global heads ``head_offset ..
    head_offset + H - 1`` of ``total_heads`` (default ``head_offset + H``): head offsets
    use the global index, so a process holding a subset of the heads computes exactly
    those heads of the full result.
    """
    _check_tensors(q, k, v)
    segs = _positive_ints("segment_lengths", segment_lengths)
    rates = _positive_ints("dilation_rates", dilation_rates)
    if len(segs) != len(rates):
        raise ValueError(
            f"segment_lengths and dilation_rates must have the same length, got {len(segs)} and {len(rates)}"
        )
    if isinstance(head_offset, bool) or not isinstance(head_offset, numbers.Integral) or head_offset < 0:
        raise ValueError(f"head_offset must be an int >= 0, got {head_offset!r}")
    heads = q.shape[2]
    if total_heads is None:
        total_heads = head_offset + heads
    if isinstance(total_heads, bool) or not isinstance(total_heads, numbers.Integral):
        raise ValueError(f"total_heads must be an int, got {total_heads!r}")
    if total_heads < head_offset + heads:
        raise ValueError(
            f"total_heads ({total_heads}) must be >= head_offset + local heads ({head_offset} + {heads})"
        )
    if softmax_scale is None:
        scale = 1.0 / math.sqrt(q.shape[3])
    else:
        scale = float(softmax_scale)
        if not math.isfinite(scale):
            raise ValueError(f"softmax_scale must be finite, got {softmax_scale!r}")
    return DilatedArgs(segs, rates, bool(causal), scale, int(head_offset), int(total_heads), heads // k.shape[2])
