"""Attention over a static slot cache (decode) and over packed prompts (prefill), for serving.

Serving keeps one static K/V cache per layer, ``k_cache, v_cache [S, cap, hk, d]``: ``S``
slots of room for ``cap`` tokens each, slot ``s`` holding one request's keys at positions
``0 .. len-1``.  Two calls read it:

:func:`slot_decode`
    One decode step: row ``i`` of ``B`` attends its single query over keys
    ``[0, lengths[i])`` of slot ``slots[i]``.  Slots and lengths live on the device and the
    output shapes depend only on the input shapes, so the call can be captured in a CUDA
    graph and replayed with new lengths/slots: nothing here reads a device value on the host.
    Two backends: ``"torch"`` (masked attention over the whole capacity, any device and
    dtype: the reference and the CPU path) and ``"triton"`` (a split-K "flash decoding"
    kernel in :mod:`.triton_decode`, written to read the cache at HBM bandwidth; Triton is
    imported there under a guard, so installs without it import this module).
:func:`packed_causal`
    Causal self-attention of several prompts packed along the sequence (prefill), through
    aten's FA2 varlen kernel on CUDA fp16/bf16, else a loop over the prompts calling
    :func:`~megatron_fapool.attention.kernels.local_attention`.

Conventions follow the kernel package (:mod:`megatron_fapool.attention.kernels`): GQA query
head ``j`` uses kv head ``j // (hq // hk)``; the lse is the natural log, float32 (float64
for float64 inputs); a row that sees no key gives out 0 and lse ``-inf``.

How many key pieces ("splits") a decode row is cut into for the Triton kernel is chosen by
:func:`decode_splits` from the shapes and the GPU's multiprocessor count; the constants
:data:`SPLIT_PROGRAMS_PER_SM`, :data:`MIN_KEYS_PER_SPLIT` and :data:`MAX_SPLITS` tune it.
The kernel's tile configuration lives in :mod:`.triton_decode` (``TILE_CONFIGS``).
"""

from __future__ import annotations

import functools
import math
import os

import torch
from torch import Tensor

from . import triton_decode
from .backends import BACKENDS
from .dispatch import local_attention
from .layout import FLOATS, LOW_PRECISION, accumulator_dtype

__all__ = [
    "DECODE_BACKENDS",
    "MAX_EXPLICIT_SPLITS",
    "MAX_SPLITS",
    "MIN_KEYS_PER_SPLIT",
    "PACKED_BACKENDS",
    "SPLIT_PROGRAMS_PER_SM",
    "TORCH_DECODE_CHUNK_ELEMENTS",
    "decode_splits",
    "packed_causal",
    "resolve_decode_backend",
    "slot_decode",
]

#: Backends of :func:`slot_decode` (``"auto"`` picks one of them).
DECODE_BACKENDS: tuple[str, ...] = ("torch", "triton")
#: Backends of :func:`packed_causal` besides the kernel package's (which run the per-prompt loop).
PACKED_BACKENDS: tuple[str, ...] = ("aten_varlen", "loop")

#: Split heuristic: aim for this many stage-1 programs per multiprocessor (``B * hk * splits``),
#: i.e. several waves, so that enough loads are in flight and rows of unequal length balance out.
SPLIT_PROGRAMS_PER_SM: int = 4
#: Split heuristic: no more splits than ``ceil(cap / MIN_KEYS_PER_SPLIT)``, so that a full-length
#: row gives each program at least this many keys (a few tiles) to amortise its setup and combine.
MIN_KEYS_PER_SPLIT: int = 256
#: Split heuristic: hard upper bound (the combine kernel holds one lse per split in registers).
MAX_SPLITS: int = 128
#: The most splits a caller may ask for explicitly.
MAX_EXPLICIT_SPLITS: int = 1024
#: Torch decode path: rows per chunk are capped so one chunk gathers at most this many cache
#: elements (``rows * cap * hk * d``) and holds at most this many scores (``rows * hq * cap``).
TORCH_DECODE_CHUNK_ELEMENTS: int = 1 << 24

#: What the Triton decode kernel supports (checked from dtype/shape only).
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_MAX_HEAD_DIM = 256
_TRITON_MIN_HEAD_DIM = 16
#: The largest grid dimension the Triton launch puts the batch on.
_MAX_GRID_BATCH = 65535
_INDEX_DTYPES = (torch.int32, torch.int64)


# --------------------------------------------------------------------------------------
# Capabilities (cached, never mutated otherwise)
# --------------------------------------------------------------------------------------


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)


#: Multiprocessor count assumed for CPU tensors (Triton's interpreter): small, so tests stay quick.
_INTERPRETER_SM_COUNT = 4


def _device_sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _INTERPRETER_SM_COUNT
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _triton_unsupported_reason(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> str | None:
    """Why the Triton kernel cannot do this call (None if it can): shapes, dtype and device only."""
    if triton_decode.TRITON_IMPORT_ERROR is not None:
        return f"triton is not importable ({triton_decode.TRITON_IMPORT_ERROR})"
    if not q.is_cuda and not _triton_interpret():
        return "needs CUDA tensors (or TRITON_INTERPRET=1 for Triton's CPU interpreter)"
    if q.dtype not in _TRITON_DTYPES:
        return f"dtype {q.dtype} not supported (supports float16, bfloat16, float32)"
    d = q.shape[-1]
    if d < _TRITON_MIN_HEAD_DIM or d > _TRITON_MAX_HEAD_DIM or d & (d - 1):
        return f"head_dim {d} not supported (needs a power of two in [{_TRITON_MIN_HEAD_DIM}, {_TRITON_MAX_HEAD_DIM}])"
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        return "k_cache/v_cache must have a contiguous last dimension"
    if q.shape[0] > _MAX_GRID_BATCH:
        return f"batch {q.shape[0]} > {_MAX_GRID_BATCH}"
    return None


def resolve_decode_backend(q: Tensor, k_cache: Tensor, v_cache: Tensor, backend: str = "auto") -> str:
    """The backend :func:`slot_decode` runs for these inputs (``"torch"`` or ``"triton"``).

    ``"auto"``: ``"triton"`` when q is on CUDA and the kernel supports the call (Triton
    imports, fp16/bf16/fp32, head_dim a power of two in [16, 256]), else ``"torch"``.
    An explicit ``"triton"`` that cannot run raises ``ValueError`` with the reason.
    """
    if backend == "auto":
        if q.is_cuda and _triton_unsupported_reason(q, k_cache, v_cache) is None:
            return "triton"
        return "torch"
    if backend == "torch":
        return "torch"
    if backend == "triton":
        reason = _triton_unsupported_reason(q, k_cache, v_cache)
        if reason is not None:
            raise ValueError(f"slot_decode backend 'triton' cannot run this call: {reason}")
        return "triton"
    raise ValueError(f"unknown slot_decode backend {backend!r}; choose one of {DECODE_BACKENDS + ('auto',)}")


def decode_splits(batch: int, kv_heads: int, cap: int, sm_count: int) -> int:
    """Key pieces per decode row for the Triton kernel, from shapes and the SM count only.

    ``ceil(SPLIT_PROGRAMS_PER_SM * sm_count / (batch * kv_heads))`` so that the stage-1 grid
    ``batch * kv_heads * splits`` covers the GPU several times over, clamped to
    ``[1, min(MAX_SPLITS, ceil(cap / MIN_KEYS_PER_SPLIT))]``.  Each row's actual keys
    ``[0, len)`` are then cut into ``splits`` pieces *on the device* (piece length
    ``ceil(len / splits)`` rounded up to the kernel's tile), so short rows still use every
    piece and the value stays valid for a captured graph whatever the lengths become.
    """
    programs = max(1, batch * kv_heads)
    want = -(-SPLIT_PROGRAMS_PER_SM * max(1, sm_count) // programs)
    most = max(1, min(MAX_SPLITS, -(-max(1, cap) // MIN_KEYS_PER_SPLIT)))
    return max(1, min(want, most))


# --------------------------------------------------------------------------------------
# Checks (shapes, dtypes, devices: never values)
# --------------------------------------------------------------------------------------


def _check_decode_args(q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, lengths: Tensor) -> None:
    for name, x, dims in (("q", q, "[B, hq, d]"), ("k_cache", k_cache, "[S, cap, hk, d]"),
                          ("v_cache", v_cache, "[S, cap, hk, d]"), ("slots", slots, "[B]"),
                          ("lengths", lengths, "[B]")):
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a tensor {dims}")
    if q.dim() != 3:
        raise ValueError(f"q must be [B, hq, d], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be [S, cap, hk, d], got shape {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must have the same shape")
    b, hq, d = q.shape
    _, _, hk, dk = k_cache.shape
    if dk != d:
        raise ValueError(f"q head_dim {d} != cache head_dim {dk}")
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({hk})")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(f"q, k_cache, v_cache dtypes differ: {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if q.dtype not in FLOATS:
        raise ValueError(f"unsupported dtype {q.dtype}")
    for name, x in (("slots", slots), ("lengths", lengths)):
        if x.dim() != 1 or x.shape[0] != b:
            raise ValueError(f"{name} must be [B] = [{b}], got shape {tuple(x.shape)}")
        if x.dtype not in _INDEX_DTYPES:
            raise ValueError(f"{name} must be int32 or int64, got {x.dtype}")
    devices = {q.device, k_cache.device, v_cache.device, slots.device, lengths.device}
    if len(devices) != 1:
        raise ValueError(f"q, k_cache, v_cache, slots, lengths must be on one device, got {sorted(map(str, devices))}")


def _resolve_scale(softmax_scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)


# --------------------------------------------------------------------------------------
# Decode
# --------------------------------------------------------------------------------------


def _torch_decode_rows(b: int, hq: int, cap: int, hk: int, d: int) -> int:
    per_row = max(1, cap * max(hq, hk * d))
    return max(1, min(b, TORCH_DECODE_CHUNK_ELEMENTS // per_row))


def _torch_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, lengths: Tensor,
                  scale: float) -> tuple[Tensor, Tensor]:
    """Masked attention over the whole capacity, chunked over rows; no host sync."""
    b, hq, d = q.shape
    cap, hk = k_cache.shape[1], k_cache.shape[2]
    g = hq // hk
    cdt = accumulator_dtype(q.dtype)
    out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, hq, dtype=cdt, device=q.device)
    if b == 0 or hq == 0:
        return out, lse
    pos = torch.arange(cap, device=q.device)
    slots = slots.long()
    rows = _torch_decode_rows(b, hq, cap, hk, d)
    for r0 in range(0, b, rows):
        r1 = min(b, r0 + rows)
        idx = slots[r0:r1]
        kk = k_cache.index_select(0, idx).to(cdt).permute(0, 2, 1, 3)  # [r, hk, cap, d]
        vv = v_cache.index_select(0, idx).to(cdt).permute(0, 2, 1, 3)
        qq = q[r0:r1].to(cdt).reshape(r1 - r0, hk, g, d)
        s = torch.matmul(qq, kk.transpose(-1, -2)).mul_(scale)  # [r, hk, g, cap]
        masked = pos.unsqueeze(0) >= lengths[r0:r1].unsqueeze(1)  # [r, cap]; len <= 0 masks all
        s.masked_fill_(masked[:, None, None, :], float("-inf"))
        m = s.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        p = s.sub_(m).exp_()
        denom = p.sum(dim=-1, keepdim=True)
        o = torch.matmul(p, vv).div_(torch.where(denom > 0, denom, torch.ones_like(denom)))
        out[r0:r1] = o.reshape(r1 - r0, hq, d).to(q.dtype)
        lse[r0:r1] = (m + torch.log(denom)).reshape(r1 - r0, hq)
    return out, lse


def slot_decode(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slots: Tensor,
    lengths: Tensor,
    *,
    softmax_scale: float | None,
    backend: str = "auto",
    splits: int | None = None,
) -> tuple[Tensor, Tensor]:
    """One decode step over a static slot cache: row ``i`` attends keys ``[0, lengths[i])`` of slot ``slots[i]``.

    Args:
        q: ``[B, hq, d]``, one query per row.
        k_cache, v_cache: ``[S, cap, hk, d]``, same dtype and device as q, ``hq % hk == 0``
            (GQA: q head ``j`` uses kv head ``j // (hq // hk)``).  The last dim must be
            contiguous for the Triton kernel; the caches are never copied whole.
        slots: ``[B]`` int64 (or int32) on q's device, each in ``[0, S)`` (not checked:
            checking would read the device; out-of-range slots are undefined behaviour).
        lengths: ``[B]`` int32/int64 on q's device, ``0 <= len <= cap`` (values outside are
            clamped to ``[0, cap]`` by both backends).
        softmax_scale: ``None`` means ``1/sqrt(d)``.
        backend: ``"torch"`` (masked attention over the whole capacity; any device/dtype),
            ``"triton"`` (split-K kernel; CUDA, or CPU under ``TRITON_INTERPRET=1``; fp16,
            bf16, fp32; head_dim a power of two in [16, 256]), or ``"auto"``
            (:func:`resolve_decode_backend`).
        splits: key pieces per row for the Triton kernel; ``None``: :func:`decode_splits`.
            Ignored by the torch backend.  Depends on shapes only, so a captured graph stays valid.

    Returns:
        ``(out [B, hq, d] in q.dtype, lse [B, hq])``, lse natural log, float32 (float64 for
        float64 inputs, torch backend only).  A row with length 0 gives out 0 and lse ``-inf``.

    Raises:
        ValueError: bad shapes/dtypes/devices, or an explicit backend that cannot run the call.

    Never reads a device value on the host (CUDA-graph capturable).
    """
    _check_decode_args(q, k_cache, v_cache, slots, lengths)
    if splits is not None and (
        not isinstance(splits, int) or isinstance(splits, bool) or not 1 <= splits <= MAX_EXPLICIT_SPLITS
    ):
        raise ValueError(f"splits must be an int in [1, {MAX_EXPLICIT_SPLITS}] or None, got {splits!r}")
    scale = _resolve_scale(softmax_scale, q.shape[-1])
    name = resolve_decode_backend(q, k_cache, v_cache, backend)
    if name == "torch":
        return _torch_decode(q, k_cache, v_cache, slots, lengths, scale)
    b, _, _ = q.shape
    cap, hk = k_cache.shape[1], k_cache.shape[2]
    if splits is None:
        splits = decode_splits(b, hk, cap, _device_sm_count(q.device))
    return triton_decode.triton_slot_decode(q, k_cache, v_cache, slots, lengths, scale, splits)


# --------------------------------------------------------------------------------------
# Packed causal prefill
# --------------------------------------------------------------------------------------


def _check_packed_args(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_len: int, lengths) -> list[int]:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor) or x.dim() != 3:
            raise ValueError(f"{name} must be a 3-D tensor [T, heads, head_dim]")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    t, hq, d = q.shape
    if k.shape[0] != t or k.shape[2] != d:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on T and head_dim")
    if k.shape[1] == 0 or hq % k.shape[1] != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({k.shape[1]})")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in FLOATS:
        raise ValueError(f"q, k, v must share one float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device == cu_seqlens.device):
        raise ValueError("q, k, v, cu_seqlens must be on one device")
    lens = [int(n) for n in lengths]
    if any(n < 0 for n in lens):
        raise ValueError(f"lengths must be >= 0, got {lens}")
    if sum(lens) != t:
        raise ValueError(f"sum(lengths) = {sum(lens)} != T = {t}")
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.shape[0] != len(lens) + 1:
        raise ValueError(f"cu_seqlens must be [n+1] = [{len(lens) + 1}]")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if int(max_len) != max(lens, default=0):
        raise ValueError(f"max_len {max_len} != max(lengths) {max(lens, default=0)}")
    return lens


def _aten_varlen_reason(q: Tensor) -> str | None:
    if not q.is_cuda:
        return "needs CUDA tensors"
    if q.dtype not in LOW_PRECISION:
        return f"dtype {q.dtype} not supported (float16/bfloat16 only)"
    d = q.shape[-1]
    if d % 8 != 0 or d > 256:
        return f"head_dim {d} not supported (multiple of 8, <= 256)"
    if not hasattr(torch.ops.aten, "_flash_attention_forward"):
        return "this torch has no aten._flash_attention_forward"
    return None


def packed_causal(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    *,
    max_len: int,
    lengths: list[int],
    softmax_scale: float | None,
    backend: str = "auto",
) -> Tensor:
    """Causal self-attention of prompts packed along the sequence; prompt ``i`` attends only within itself.

    Args:
        q: ``[T, hq, d]``; k, v: ``[T, hk, d]`` with ``T = sum(lengths)``, ``hq % hk == 0``.
        cu_seqlens: ``[n+1]`` int32 on q's device: ``0, l0, l0+l1, ...`` (must agree with
            ``lengths``; not checked, that would read the device).
        max_len: ``max(lengths)`` (host int).
        lengths: the prompts' lengths on the host.
        softmax_scale: ``None`` means ``1/sqrt(d)``.
        backend: ``"aten_varlen"`` (``aten._flash_attention_forward``, FA2 varlen: CUDA,
            fp16/bf16, head_dim a multiple of 8 <= 256), ``"loop"`` (one
            :func:`local_attention` call per prompt, its backend ``auto``), a name of the
            kernel package's ``BACKENDS`` (the loop with that backend), or ``"auto"``
            (``aten_varlen`` when it can run, else ``loop``).

    Returns:
        ``out [T, hq, d]`` in q.dtype.
    """
    lens = _check_packed_args(q, k, v, cu_seqlens, max_len, lengths)
    t, hq, d = q.shape
    scale = _resolve_scale(softmax_scale, d)
    if backend == "auto":
        backend = "aten_varlen" if _aten_varlen_reason(q) is None else "loop"
    if backend == "aten_varlen":
        reason = _aten_varlen_reason(q)
        if reason is not None:
            raise ValueError(f"packed_causal backend 'aten_varlen' cannot run this call: {reason}")
        if t == 0:
            return torch.empty_like(q)
        res = torch.ops.aten._flash_attention_forward(
            q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens, cu_seqlens,
            int(max_len), int(max_len), 0.0, True, False, scale=scale,
        )
        return res[0]
    if backend == "loop":
        kernel = "auto"
    elif backend in BACKENDS:
        kernel = backend
    else:
        raise ValueError(
            f"unknown packed_causal backend {backend!r}; choose one of {('auto',) + PACKED_BACKENDS + BACKENDS}"
        )
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    start = 0
    with torch.no_grad():
        for n in lens:
            if n:
                sl = slice(start, start + n)
                out[sl] = local_attention(q[None, sl], k[None, sl], v[None, sl], causal=True,
                                          softmax_scale=scale, backend=kernel)[0]
            start += n
    return out
