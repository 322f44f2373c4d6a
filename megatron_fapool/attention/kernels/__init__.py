"""Local (single-device) attention kernels that also return the log-sum-exp.

This is the kernel layer under FA Pool, ring/zigzag attention, sharded decode and
dilated attention: pure functions for forward and backward plus one thin
autograd wrapper, in the style of ring-flash-attention.

Conventions
-----------
* Layout ``[batch, seq, heads, head_dim]`` (flash-attn layout) for q, k, v, out
  and the gradients; LSE ``[batch, heads, seq]``, natural log, float32 (float64
  when the inputs are float64, so that float64 pipelines stay exact).
* GQA: q has ``hq`` heads, k/v ``hkv`` heads, ``hq % hkv == 0``; query head ``i``
  uses kv head ``i // (hq // hkv)``.  dk/dv are summed over each group.
* ``softmax_scale=None`` means ``1/sqrt(head_dim)``.
* Causal masking is **bottom-right** aligned: query ``i`` (of ``sq``) sees key
  ``j`` (of ``sk``) iff ``j <= i + (sk - sq)``.  When ``sq > sk`` the first
  ``sq - sk`` rows see no key: they output 0, their lse is ``-inf`` and their
  gradients are 0.  These rows are cut off before any kernel runs, so no kernel
  ever sees an empty row (kernels disagree on what such rows return).
* Backward follows the ring-flash-attention convention: ``out`` and ``lse`` may
  be the *global* (merged) results of a larger attention of which this call
  covers one key block.  Probabilities are recomputed as ``exp(s - lse)`` and
  ``D = rowsum(dout * out)``, so summing the per-block dq (and concatenating /
  summing dk, dv) gives exact gradients of the whole attention.

Backends
--------
``math``
    Pure torch, any device and dtype; computes in float32 (float64 stays
    float64); processes query rows in chunks (:data:`MATH_CHUNK_ROWS`, capped so
    one score chunk has at most :data:`MATH_CHUNK_ELEMENTS` elements) and skips
    fully masked key columns of a chunk.  Correctness anchor and CPU fallback.
``sdpa_flash``
    CUDA: ``aten._scaled_dot_product_flash_attention`` (+ ``_backward``), FA2,
    native GQA, causal with ``sq < sk`` is bottom-right.  CPU:
    ``aten._scaled_dot_product_flash_attention_for_cpu`` (+ ``_backward``),
    native GQA, causal is *top-left*, so ``sq < sk`` is split (see below).
``sdpa_efficient``
    CUDA: ``aten._efficient_attention_forward`` / ``_backward`` (the kernel under
    SDPA's memory-efficient backend) with ``custom_mask_type=2``
    (causal-from-bottom-right).  k/v are expanded for GQA.  LSE is padded to a
    multiple of 32 by the kernel; we slice / pad it.
``sdpa_cudnn``
    CUDA: ``aten._scaled_dot_product_cudnn_attention`` (+ ``_backward``).  Its
    causal mask is top-left, so ``sq < sk`` is split; k/v are expanded for GQA;
    LSE comes as ``[b, h, s, 1]``.
``sdpa_math``
    PyTorch's math SDPA (``F.scaled_dot_product_attention`` under the MATH
    backend) with a materialised bottom-right mask; it does not return the LSE,
    so the LSE is a ``logsumexp`` of the same masked scores (one extra QK^T).
    Unchunked: a baseline, never chosen by ``auto``.  Backward: see
    "recompute backward" below.
``flex``
    ``torch.nn.attention.flex_attention`` with a bottom-right ``mask_mod`` and
    ``return_aux=AuxRequest(lse=True)``; ``torch.compile``-d on CUDA.  On CPU it
    runs eagerly (torch's CPU compile path cannot return the LSE) and has no
    backward (torch raises), so ``flex`` on CPU is forward-only and an explicit
    backward request raises ``ValueError``.  Backward: "recompute backward".
``flash_attn``
    The ``flash_attn`` package (FA2) when it imports (see
    :mod:`megatron_fapool._optional`); bottom-right causal and native GQA.

*Split for top-left kernels*: a causal call with ``sq < sk`` is done as a
non-causal call on the unmasked key prefix ``[0, sk - sq)`` plus a square causal
call on the last ``sq`` keys, merged with :func:`merge_partials`; the backward
runs both parts with the global out/lse and adds dq.

*Recompute backward* (``flex``, ``sdpa_math``, which cannot take a given
out/lse): the block is recomputed with autograd, giving its local ``out_l`` and
``lse_l``.  With ``c = exp(lse_l - lse)`` per row, the exact block gradient for
the global ``(out, lse)`` is the autograd gradient with upstream gradients
``g_out = c * dout`` and ``g_lse = rowsum(g_out * out_l) - c * rowsum(dout * out)``
(the second term turns the kernel's local ``D`` into the global one).

``auto``
    :func:`select_backend` walks :data:`AUTO_PREFERENCE` for the device type and
    takes the first backend that supports the dtype / head_dim / backward.  If
    that backend then raises at run time (anything but out-of-memory), the
    failure is recorded (:func:`auto_failures`), a warning is issued, and the
    next candidate runs; explicit backends never fall back.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_fapool import _optional

__all__ = [
    "BACKENDS",
    "AUTO_PREFERENCE",
    "kernel_forward",
    "MATH_CHUNK_ROWS",
    "MATH_CHUNK_ELEMENTS",
    "attention_forward",
    "attention_backward",
    "merge_partials",
    "local_attention",
    "select_backend",
    "available_backends",
    "backend_unsupported_reason",
    "auto_failures",
]

BACKENDS: tuple[str, ...] = (
    "math",
    "sdpa_flash",
    "sdpa_efficient",
    "sdpa_cudnn",
    "sdpa_math",
    "flex",
    "flash_attn",
)

#: What ``auto`` tries, in order, keyed by ``(device type, precision,
#: requires_backward)`` with precision ``"16"`` (fp16/bf16), ``"32"`` or ``"64"``.
#: Backends that do not support the call (device, dtype, head_dim, backward)
#: are skipped; ``math`` always closes the list.  With ``requires_backward`` the
#: order is by forward+backward time of one backend (``local_attention`` runs
#: both passes on the backend it picked).  This is the single place the
#: preference lives; ``tools/bench_local_attention.py`` checks it against
#: measurements ("auto picks fastest: yes/no").
#:
#: CUDA: cuDNN is about 2x SDPA's FA2 kernel for causal bf16 on H200 (DESIGN.md
#: section 9); the flash_attn package is the same FA2 as sdpa_flash; for float32
#: only the memory-efficient kernel and flex are fused; flex compiles per shape
#: (tens of seconds the first time), so it comes after the SDPA kernels.
#:
#: CPU, measured with the benchmark tool on the 2-core development machine
#: (torch 2.13, b=1, h=8, d=64, causal, n=1024/2048/4096):
#:   float32  forward: sdpa_flash 3.8-6.7x faster than math; fwd+bwd: 1.9-4.9x.
#:   float64  forward: sdpa_flash 2.3x; backward 2.0x (n=1024).
#:   bf16/fp16 forward: sdpa_flash 2.6-5.2x faster, but its backward is 2.5-5x
#:   *slower* than math, so math wins forward+backward.
#: ``flex`` on CPU is eager (materialises all scores) and forward-only: never chosen.
_CUDA_16 = ("sdpa_cudnn", "flash_attn", "sdpa_flash", "sdpa_efficient", "flex", "math")
_CUDA_32 = ("sdpa_efficient", "flex", "math")
AUTO_PREFERENCE: dict[tuple[str, str, bool], tuple[str, ...]] = {
    ("cuda", "16", False): _CUDA_16,
    ("cuda", "16", True): _CUDA_16,
    ("cuda", "32", False): _CUDA_32,
    ("cuda", "32", True): _CUDA_32,
    ("cuda", "64", False): ("math",),
    ("cuda", "64", True): ("math",),
    ("cpu", "16", False): ("sdpa_flash", "math"),
    ("cpu", "16", True): ("math", "sdpa_flash"),
    ("cpu", "32", False): ("sdpa_flash", "math"),
    ("cpu", "32", True): ("sdpa_flash", "math"),
    ("cpu", "64", False): ("sdpa_flash", "math"),
    ("cpu", "64", True): ("sdpa_flash", "math"),
}

#: Query rows per chunk of the ``math`` backend (at most).
MATH_CHUNK_ROWS: int = 1024
#: Upper bound on the elements of one ``math`` score chunk (b * hq * rows * keys).
MATH_CHUNK_ELEMENTS: int = 1 << 27

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_FUSED_HEAD_DIM = 256

# (device type, dtype, head_dim, backend, phase) -> reason; filled by ``auto`` fallbacks.
_AUTO_DISABLED: dict[tuple[str, torch.dtype, int, str, str], str] = {}

_aten = torch.ops.aten


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


def _precision(dtype: torch.dtype) -> str:
    return {torch.float64: "64", torch.float32: "32"}.get(dtype, "16")


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _resolve_scale(softmax_scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)


def _t(x: Tensor) -> Tensor:
    """[b, s, h, d] <-> [b, h, s, d] (a view)."""
    return x.transpose(1, 2)


def _expand_kv(x: Tensor, group: int) -> Tensor:
    """[b, s, hkv, d] -> [b, s, hkv*group, d], head i of the result = head i // group."""
    if group == 1:
        return x
    b, s, h, d = x.shape
    return x.unsqueeze(3).expand(b, s, h, group, d).reshape(b, s, h * group, d)


def _reduce_kv_grad(dx: Tensor, hkv: int, dtype: torch.dtype) -> Tensor:
    """Sum an expanded-kv gradient [b, s, hq, d] back to [b, s, hkv, d] (fp32 accumulation)."""
    b, s, hq, d = dx.shape
    if hq == hkv:
        return dx.to(dtype).contiguous()
    acc = dx.reshape(b, s, hkv, hq // hkv, d).sum(dim=3, dtype=_compute_dtype(dtype))
    return acc.to(dtype)


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
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
    if q.dtype not in _FLOATS:
        raise ValueError(f"unsupported dtype {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")


def _check_backward_args(dout: Tensor, q: Tensor, out: Tensor, lse: Tensor) -> None:
    b, sq, hq, _ = q.shape
    if dout.shape != q.shape or out.shape != q.shape:
        raise ValueError(
            f"dout {tuple(dout.shape)} and out {tuple(out.shape)} must have q's shape {tuple(q.shape)}"
        )
    if tuple(lse.shape) != (b, hq, sq):
        raise ValueError(f"lse must be [batch, heads, seq] = {(b, hq, sq)}, got {tuple(lse.shape)}")


def _num_empty_rows(sq: int, sk: int, causal: bool) -> int:
    """Leading query rows that see no key (bottom-right causal with sq > sk, or sk == 0)."""
    if sk == 0:
        return sq
    if causal and sq > sk:
        return sq - sk
    return 0


# --------------------------------------------------------------------------------------
# Capability tables
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _cudnn_version() -> int:
    try:
        return int(torch.backends.cudnn.version() or 0)
    except Exception:  # noqa: BLE001
        return 0


@functools.lru_cache(maxsize=None)
def _flex_importable() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


@functools.lru_cache(maxsize=None)
def _has_triton() -> bool:
    try:
        from torch.utils._triton import has_triton

        return bool(has_triton())
    except Exception:  # noqa: BLE001
        return False


def _device_unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device`` at all (None if it can)."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; choose one of {BACKENDS + ('auto',)}"
    if name in ("math", "sdpa_math"):
        return None
    kind = device.type
    if kind == "cpu":
        if name == "sdpa_flash":
            if not hasattr(_aten, "_scaled_dot_product_flash_attention_for_cpu"):
                return "this torch has no CPU flash attention op"
            return None
        if name == "flex":
            return None if _flex_importable() else "torch.nn.attention.flex_attention is missing"
        return "CUDA only"
    if kind != "cuda":
        return f"not implemented for device type {kind!r}"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    cap = _cuda_capability(_cuda_index(device))
    if name == "sdpa_flash":
        ok = getattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)()
        if not ok:
            return "this torch was built without flash attention"
        if cap < (8, 0):
            return f"needs compute capability >= 8.0, device has {cap[0]}.{cap[1]}"
        return None
    if name == "sdpa_efficient":
        if not hasattr(_aten, "_efficient_attention_forward"):
            return "this torch has no memory-efficient attention op"
        if cap < (5, 0):
            return f"needs compute capability >= 5.0, device has {cap[0]}.{cap[1]}"
        return None
    if name == "sdpa_cudnn":
        if torch.version.hip:
            return "cuDNN attention is not available on ROCm"
        if not torch.backends.cudnn.is_available() or _cudnn_version() < 90000:
            return f"needs cuDNN >= 9.0 (found {_cudnn_version() or 'none'})"
        if cap < (8, 0):
            return f"needs compute capability >= 8.0, device has {cap[0]}.{cap[1]}"
        return None
    if name == "flex":
        if not _flex_importable():
            return "torch.nn.attention.flex_attention is missing"
        if not _has_triton():
            return "triton is not available"
        if cap < (8, 0):
            return f"needs compute capability >= 8.0, device has {cap[0]}.{cap[1]}"
        return None
    if name == "flash_attn":
        if not _optional.HAS_FLASH_ATTN:
            return f"flash_attn is not importable ({_optional.IMPORT_ERRORS.get('flash_attn', '?')})"
        if cap < (8, 0):
            return f"needs compute capability >= 8.0, device has {cap[0]}.{cap[1]}"
        return None
    return "unsupported"  # pragma: no cover


def _unsupported_reason(
    name: str, device: torch.device, dtype: torch.dtype, head_dim: int, requires_backward: bool
) -> str | None:
    """Why backend ``name`` cannot do this call (None if it can)."""
    reason = _device_unavailable_reason(name, device)
    if reason is not None:
        return reason
    if name in ("math", "sdpa_math"):
        return None
    kind = device.type

    def need_dtypes(allowed: Sequence[torch.dtype]) -> str | None:
        if dtype not in allowed:
            return f"dtype {dtype} not supported (supports {', '.join(str(a) for a in allowed)})"
        return None

    def need_head_dim(multiple: int, max_dim: int = _MAX_FUSED_HEAD_DIM) -> str | None:
        if head_dim % multiple != 0 or head_dim > max_dim:
            return f"head_dim {head_dim} not supported (needs a multiple of {multiple}, <= {max_dim})"
        return None

    if kind == "cpu":
        if name == "sdpa_flash":
            return need_dtypes(_FLOATS)
        if name == "flex":
            if requires_backward:
                return "torch's FlexAttention has no backward on CPU (forward only)"
            return need_dtypes(_FLOATS)
        return "CUDA only"

    if name in ("sdpa_flash", "flash_attn"):
        return need_dtypes(_LOW_PRECISION) or need_head_dim(8)
    if name == "sdpa_efficient":
        return need_dtypes((*_LOW_PRECISION, torch.float32)) or need_head_dim(
            4 if dtype == torch.float32 else 8
        )
    if name == "sdpa_cudnn":
        cap = _cuda_capability(_cuda_index(device))
        max_dim = 256 if (cap[0] == 9 and _cudnn_version() >= 90500) else 128
        return need_dtypes(_LOW_PRECISION) or need_head_dim(8, max_dim)
    if name == "flex":
        if head_dim < 16:
            return f"head_dim {head_dim} < 16 not supported by the Triton kernels"
        return need_dtypes((*_LOW_PRECISION, torch.float32)) or need_head_dim(1)
    return None


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can run on ``device`` for at least some dtype (order of BACKENDS)."""
    dev = torch.device(device)
    return [n for n in BACKENDS if _device_unavailable_reason(n, dev) is None]


def backend_unsupported_reason(
    backend: str, q: Tensor, k: Tensor, v: Tensor, *, requires_backward: bool
) -> str | None:
    """``None`` if ``backend`` can run this call, else a human-readable reason."""
    _check_qkv(q, k, v)
    return _unsupported_reason(backend, q.device, q.dtype, q.shape[-1], requires_backward)


def _auto_candidates(device: torch.device, dtype: torch.dtype, head_dim: int, requires_backward: bool, phase: str) -> list[str]:
    pref = AUTO_PREFERENCE.get((device.type, _precision(dtype), requires_backward), ("math",))
    names = [
        n
        for n in pref
        if _unsupported_reason(n, device, dtype, head_dim, requires_backward) is None
        and (device.type, dtype, head_dim, n, phase) not in _AUTO_DISABLED
    ]
    if "math" not in names:
        names.append("math")
    return names


def select_backend(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, requires_backward: bool) -> str:
    """The backend ``'auto'`` resolves to for this call (deterministic).

    ``causal`` does not change the choice: every backend supports both masks
    (top-left-only kernels via the prefix split).
    """
    del causal
    _check_qkv(q, k, v)
    phase = "bwd" if requires_backward else "fwd"
    return _auto_candidates(q.device, q.dtype, q.shape[-1], requires_backward, phase)[0]


def auto_failures() -> dict[tuple[str, torch.dtype, int, str, str], str]:
    """Backends that ``auto`` dropped after a run-time failure: key -> error text."""
    return dict(_AUTO_DISABLED)


def _require(name: str, device: torch.device, dtype: torch.dtype, head_dim: int, requires_backward: bool) -> None:
    reason = _unsupported_reason(name, device, dtype, head_dim, requires_backward)
    if reason is not None:
        what = "backward" if requires_backward else "forward"
        raise ValueError(
            f"attention backend {name!r} cannot run this {what} "
            f"(device={device}, dtype={dtype}, head_dim={head_dim}): {reason}"
        )


# --------------------------------------------------------------------------------------
# math backend
# --------------------------------------------------------------------------------------


def _math_rows_per_chunk(batch_heads: int, keys: int) -> int:
    return max(1, min(MATH_CHUNK_ROWS, MATH_CHUNK_ELEMENTS // max(1, batch_heads * keys)))


def _grouped(x: Tensor, hkv: int) -> Tensor:
    """[b, s, hq, d] -> [b, hkv, g, s, d] view."""
    b, s, hq, d = x.shape
    return x.view(b, s, hkv, hq // hkv, d).permute(0, 2, 3, 1, 4)


def _chunk_keys(i0: int, i1: int, sq: int, sk: int, causal: bool) -> int:
    """Keys [0, kv) that rows [i0, i1) can see at all."""
    return min(sk, i1 + sk - sq) if causal else sk


def _chunk_mask(i0: int, i1: int, kv: int, sq: int, sk: int, device: torch.device) -> Tensor:
    """[rows, kv] bool, True where the key is masked out (bottom-right causal)."""
    i = torch.arange(i0, i1, device=device).unsqueeze(1)
    j = torch.arange(kv, device=device).unsqueeze(0)
    return j > i + (sk - sq)


def _math_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    cdt = _compute_dtype(q.dtype)
    kh = _t(k).to(cdt)  # [b, hkv, sk, d]
    vh = _t(v).to(cdt)
    qg = _grouped(q, hkv)
    out = torch.zeros(b, sq, hq, d, dtype=q.dtype, device=q.device)
    lse = torch.full((b, hq, sq), float("-inf"), dtype=_lse_dtype(q.dtype), device=q.device)
    out_g = out.view(b, sq, hkv, g, d)
    lse_g = lse.view(b, hkv, g, sq)
    rows = _math_rows_per_chunk(b * hq, sk)
    for i0 in range(0, sq, rows):
        i1 = min(sq, i0 + rows)
        cs = i1 - i0
        kv = _chunk_keys(i0, i1, sq, sk, causal)
        if kv <= 0:
            continue  # every row of the chunk is empty: out 0, lse -inf
        qc = qg[:, :, :, i0:i1].to(cdt).reshape(b, hkv, g * cs, d)
        s = torch.matmul(qc, kh[:, :, :kv].transpose(-1, -2)).mul_(scale)
        if causal:
            s.view(b, hkv, g, cs, kv).masked_fill_(_chunk_mask(i0, i1, kv, sq, sk, q.device), float("-inf"))
        m = s.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        p = s.sub_(m).exp_()
        denom = p.sum(dim=-1, keepdim=True)
        o = torch.matmul(p, vh[:, :, :kv]).div_(torch.where(denom > 0, denom, torch.ones_like(denom)))
        lse_c = (m + torch.log(denom)).view(b, hkv, g, cs)
        out_g[:, i0:i1] = o.view(b, hkv, g, cs, d).permute(0, 3, 1, 2, 4).to(q.dtype)
        lse_g[..., i0:i1] = lse_c.to(lse.dtype)
    return out, lse


def _math_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    cdt = _compute_dtype(q.dtype)
    kh = _t(k).to(cdt)
    vh = _t(v).to(cdt)
    qg, dog, og = _grouped(q, hkv), _grouped(dout, hkv), _grouped(out, hkv)
    lse_g = lse.reshape(b, hkv, g, sq)
    dq = torch.zeros(b, sq, hq, d, dtype=q.dtype, device=q.device)
    dq_g = dq.view(b, sq, hkv, g, d)
    dk_acc = torch.zeros(b, hkv, sk, d, dtype=cdt, device=q.device)
    dv_acc = torch.zeros(b, hkv, sk, d, dtype=cdt, device=q.device)
    rows = _math_rows_per_chunk(b * hq, sk)
    for i0 in range(0, sq, rows):
        i1 = min(sq, i0 + rows)
        cs = i1 - i0
        kv = _chunk_keys(i0, i1, sq, sk, causal)
        if kv <= 0:
            continue
        qc = qg[:, :, :, i0:i1].to(cdt).reshape(b, hkv, g * cs, d)
        doc = dog[:, :, :, i0:i1].to(cdt).reshape(b, hkv, g * cs, d)
        oc = og[:, :, :, i0:i1].to(cdt).reshape(b, hkv, g * cs, d)
        delta = (doc * oc).sum(dim=-1, keepdim=True)
        lse_c = lse_g[..., i0:i1].to(cdt).reshape(b, hkv, g * cs, 1)
        # A row with lse = -inf has no probability mass anywhere: make p = 0 there.
        lse_c = torch.where(torch.isneginf(lse_c), torch.full_like(lse_c, float("inf")), lse_c)
        k_c, v_c = kh[:, :, :kv], vh[:, :, :kv]
        s = torch.matmul(qc, k_c.transpose(-1, -2)).mul_(scale)
        if causal:
            s.view(b, hkv, g, cs, kv).masked_fill_(_chunk_mask(i0, i1, kv, sq, sk, q.device), float("-inf"))
        p = s.sub_(lse_c).exp_()
        dv_acc[:, :, :kv] += torch.matmul(p.transpose(-1, -2), doc)
        ds = torch.matmul(doc, v_c.transpose(-1, -2)).sub_(delta).mul_(p)
        dq_c = torch.matmul(ds, k_c).mul_(scale)
        dk_acc[:, :, :kv] += torch.matmul(ds.transpose(-1, -2), qc).mul_(scale)
        dq_g[:, i0:i1] = dq_c.view(b, hkv, g, cs, d).permute(0, 3, 1, 2, 4).to(q.dtype)
    dk = _t(dk_acc).to(k.dtype).contiguous()
    dv = _t(dv_acc).to(v.dtype).contiguous()
    return dq, dk, dv


# --------------------------------------------------------------------------------------
# SDPA (aten) backends
# --------------------------------------------------------------------------------------

_PLACEHOLDERS: dict[tuple[str, str], tuple] = {}


def _kernel_placeholders(name: str, device: torch.device) -> tuple:
    """RNG tensors (and cuDNN's LSE rank) exactly as this torch's forward returns them
    without dropout, taken once from a tiny forward call.  The backward ops take the
    forward's RNG state as arguments; with dropout_p = 0 they are not read, but
    passing tensors of the right kind keeps us independent of torch-version details.
    """
    key = (name, str(device))
    if key not in _PLACEHOLDERS:
        x = torch.zeros(1, 1, 128, 64, dtype=torch.bfloat16, device=device)  # [b, h, s, d]
        with torch.no_grad():
            if name == "sdpa_flash":
                r = _aten._scaled_dot_product_flash_attention(x, x, x, 0.0, False, False, scale=1.0)
                _PLACEHOLDERS[key] = (r[6], r[7])
            elif name == "sdpa_efficient":
                xt = _t(x)
                r = _aten._efficient_attention_forward(xt, xt, xt, None, None, None, None, None, 0.0, 0, True, scale=1.0)
                _PLACEHOLDERS[key] = (r[2], r[3])
            elif name == "sdpa_cudnn":
                r = _aten._scaled_dot_product_cudnn_attention(x, x, x, None, True, 0.0, False, False, scale=1.0)
                _PLACEHOLDERS[key] = (r[6], r[7], r[1].dim())
            else:  # pragma: no cover
                raise KeyError(name)
    return _PLACEHOLDERS[key]


# ---- sdpa_flash, CPU -------------------------------------------------------------------


def _fwd_sdpa_flash_cpu(q, k, v, causal, scale):
    out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(_t(q), _t(k), _t(v), 0.0, causal, scale=scale)
    return _t(out), lse


def _bwd_sdpa_flash_cpu(dout, q, k, v, out, lse, causal, scale):
    dq, dk, dv = _aten._scaled_dot_product_flash_attention_for_cpu_backward(
        _t(dout), _t(q), _t(k), _t(v), _t(out), lse.to(_lse_dtype(q.dtype)), 0.0, causal, scale=scale
    )
    return _t(dq), _t(dk), _t(dv)


# ---- sdpa_flash, CUDA (FA2 inside torch) -----------------------------------------------


def _fwd_sdpa_flash_cuda(q, k, v, causal, scale):
    r = _aten._scaled_dot_product_flash_attention(_t(q), _t(k), _t(v), 0.0, causal, False, scale=scale)
    return _t(r[0]), r[1]


def _bwd_sdpa_flash_cuda(dout, q, k, v, out, lse, causal, scale):
    seed, offset = _kernel_placeholders("sdpa_flash", q.device)
    dq, dk, dv = _aten._scaled_dot_product_flash_attention_backward(
        _t(dout), _t(q), _t(k), _t(v), _t(out), lse.float().contiguous(),
        None, None, q.shape[1], k.shape[1], 0.0, causal, seed, offset, scale=scale,
    )
    return _t(dq), _t(dk), _t(dv)


# ---- sdpa_efficient (CUDA) -------------------------------------------------------------


def _efficient_mask_type(causal: bool) -> int:
    return 2 if causal else 0  # 2 = CausalFromBottomRight (torch.nn.attention.bias.CausalVariant)


def _fwd_sdpa_efficient(q, k, v, causal, scale):
    g = q.shape[2] // k.shape[2]
    r = _aten._efficient_attention_forward(
        q, _expand_kv(k, g), _expand_kv(v, g), None, None, None, None, None,
        0.0, _efficient_mask_type(causal), True, scale=scale,
    )
    return r[0], r[1][..., : q.shape[1]]


def _bwd_sdpa_efficient(dout, q, k, v, out, lse, causal, scale):
    b, sq, hq, _ = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    seed, offset = _kernel_placeholders("sdpa_efficient", q.device)
    padded = ((sq + 31) // 32) * 32
    lse_p = torch.zeros(b, hq, padded, dtype=torch.float32, device=q.device)
    lse_p[..., :sq] = lse
    ke, ve = _expand_kv(k, g), _expand_kv(v, g)
    dq, dk, dv, _ = _aten._efficient_attention_backward(
        dout, q, ke, ve, None, out, None, None, sq, k.shape[1], lse_p,
        0.0, seed, offset, _efficient_mask_type(causal), False, scale=scale,
    )
    return dq, _reduce_kv_grad(dk, hkv, k.dtype), _reduce_kv_grad(dv, hkv, v.dtype)


# ---- sdpa_cudnn (CUDA) -----------------------------------------------------------------


def _fwd_sdpa_cudnn(q, k, v, causal, scale):
    b, sq, hq, _ = q.shape
    g = hq // k.shape[2]
    r = _aten._scaled_dot_product_cudnn_attention(
        _t(q), _t(_expand_kv(k, g)), _t(_expand_kv(v, g)), None, True, 0.0, causal, False, scale=scale
    )
    return _t(r[0]), r[1].reshape(b, hq, sq)


def _bwd_sdpa_cudnn(dout, q, k, v, out, lse, causal, scale):
    b, sq, hq, _ = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    seed, offset, lse_rank = _kernel_placeholders("sdpa_cudnn", q.device)
    lse_k = lse.float().contiguous()
    if lse_rank == 4:
        lse_k = lse_k.unsqueeze(-1)
    ke, ve = _expand_kv(k, g), _expand_kv(v, g)
    dq, dk, dv = _aten._scaled_dot_product_cudnn_attention_backward(
        _t(dout), _t(q), _t(ke), _t(ve), _t(out), lse_k, seed, offset, None, None, None,
        sq, k.shape[1], 0.0, causal, scale=scale,
    )
    return _t(dq), _reduce_kv_grad(_t(dk), hkv, k.dtype), _reduce_kv_grad(_t(dv), hkv, v.dtype)


# ---- flash_attn package ----------------------------------------------------------------


def _fwd_flash_attn(q, k, v, causal, scale):
    from flash_attn import flash_attn_func

    out, lse, _ = flash_attn_func(
        q, k, v, dropout_p=0.0, softmax_scale=scale, causal=causal, return_attn_probs=True
    )
    return out, lse[..., : q.shape[1]]


@functools.lru_cache(maxsize=None)
def _flash_attn_backward_params() -> frozenset[str]:
    from flash_attn.flash_attn_interface import _flash_attn_backward

    try:
        return frozenset(inspect.signature(_flash_attn_backward).parameters)
    except (TypeError, ValueError):  # custom-op wrappers without a Python signature
        schema = getattr(getattr(_flash_attn_backward, "_opoverload", None), "_schema", None)
        if schema is None:
            raise RuntimeError("cannot read the signature of flash_attn's _flash_attn_backward") from None
        return frozenset(a.name for a in schema.arguments)


def _bwd_flash_attn(dout, q, k, v, out, lse, causal, scale):
    from flash_attn.flash_attn_interface import _flash_attn_backward

    params = _flash_attn_backward_params()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    kw = dict(
        dout=dout, q=q, k=k, v=v, out=out, softmax_lse=lse.float().contiguous(),
        dq=dq, dk=dk, dv=dv, dropout_p=0.0, softmax_scale=scale, causal=causal,
    )
    optional = {
        "window_size": (-1, -1), "window_size_left": -1, "window_size_right": -1,
        "softcap": 0.0, "alibi_slopes": None, "deterministic": False, "rng_state": None,
    }
    kw.update({key: val for key, val in optional.items() if key in params})
    _flash_attn_backward(**kw)
    return dq, dk, dv


# ---- recompute-through-autograd backward (flex, sdpa_math) -----------------------------


def _recompute_backward(
    fwd_diff: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]],
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact block gradients for a given global (out, lse) from a kernel that can
    only differentiate its own forward (see the module docstring for the algebra)."""
    with torch.enable_grad():
        qd, kd, vd = (x.detach().requires_grad_(True) for x in (q, k, v))
        out_l, lse_l = fwd_diff(qd, kd, vd)
    lse_g = lse.float()
    lse_l32 = lse_l.detach().float()
    # c = exp(lse_l - lse) <= 1; rows with no mass globally (lse = -inf) get c = 0.
    c = torch.where(torch.isneginf(lse_g), torch.zeros_like(lse_g), torch.exp(lse_l32 - lse_g))
    c_rows = _t(c).unsqueeze(-1)  # [b, s, h, 1]
    g_out = (dout.float() * c_rows).to(out_l.dtype)
    d_kernel = (g_out.float() * out_l.detach().float()).sum(-1)  # what the kernel will use as D
    d_global = (dout.float() * out.float()).sum(-1) * c_rows.squeeze(-1)
    g_lse = _t(d_kernel - d_global).to(lse_l.dtype)
    if not lse_l.requires_grad:
        raise RuntimeError(
            "this torch cannot differentiate the kernel's LSE, which the backward from a given "
            "(global) out/lse needs; use another backend"
        )
    dq, dk, dv = torch.autograd.grad((out_l, lse_l), (qd, kd, vd), (g_out, g_lse.contiguous()))
    return dq, dk, dv


# ---- sdpa_math -------------------------------------------------------------------------


def _sdpa_math_diff(q, k, v, causal, scale):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    mask = None
    if causal:
        mask = ~_chunk_mask(0, sq, sk, sq, sk, q.device)
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(
            _t(q), _t(k), _t(v), attn_mask=mask, scale=scale, enable_gqa=hq != hkv
        )
    # The math kernel does not return the LSE: compute it from the same masked scores.
    cdt = _compute_dtype(q.dtype)
    qg = _grouped(q, hkv).to(cdt).reshape(b, hkv, -1, d)  # [b, hkv, g*sq, d]
    s = torch.matmul(qg, _t(k).to(cdt).transpose(-1, -2)) * scale
    if causal:
        s = s.view(b, hkv, hq // hkv, sq, sk).masked_fill(~mask, float("-inf")).view(b, hkv, -1, sk)
    lse = torch.logsumexp(s, dim=-1).view(b, hq, sq).to(_lse_dtype(q.dtype))
    return _t(out), lse


def _fwd_sdpa_math(q, k, v, causal, scale):
    return _sdpa_math_diff(q, k, v, causal, scale)


def _bwd_sdpa_math(dout, q, k, v, out, lse, causal, scale):
    return _recompute_backward(lambda a, b_, c: _sdpa_math_diff(a, b_, c, causal, scale), dout, q, k, v, out, lse)


# ---- flex ------------------------------------------------------------------------------

_FLEX_COMPILED: Callable | None = None


def _flex_fn(device: torch.device) -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention  # eager: torch's CPU compile path cannot return the LSE
    global _FLEX_COMPILED
    if _FLEX_COMPILED is None:
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED


@functools.lru_cache(maxsize=64)
def _flex_block_mask(sq: int, sk: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    offset = sk - sq

    def bottom_right_causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + offset

    dev = torch.device(device)
    return create_block_mask(bottom_right_causal, None, None, sq, sk, device=dev, _compile=dev.type == "cuda")


def _flex_diff(q, k, v, causal, scale):
    block_mask = _flex_block_mask(q.shape[1], k.shape[1], str(q.device)) if causal else None
    fn = _flex_fn(q.device)
    kwargs = dict(block_mask=block_mask, scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # older torch
        out, lse = fn(_t(q), _t(k), _t(v), return_lse=True, **kwargs)
    else:
        out, aux = fn(_t(q), _t(k), _t(v), return_aux=AuxRequest(lse=True), **kwargs)
        lse = aux.lse
    return _t(out), lse


def _fwd_flex(q, k, v, causal, scale):
    with warnings.catch_warnings():
        # eager flex on CPU warns that it is unfused; that is known and documented
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return _flex_diff(q, k, v, causal, scale)


def _bwd_flex(dout, q, k, v, out, lse, causal, scale):
    return _recompute_backward(lambda a, b_, c: _flex_diff(a, b_, c, causal, scale), dout, q, k, v, out, lse)


# --------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------

# name -> {device type -> (forward, backward, bottom-right causal natively?)}
_KERNELS: dict[str, dict[str, tuple[Callable, Callable, bool]]] = {
    "math": {"*": (_math_forward, _math_backward, True)},
    "sdpa_math": {"*": (_fwd_sdpa_math, _bwd_sdpa_math, True)},
    "sdpa_flash": {
        "cpu": (_fwd_sdpa_flash_cpu, _bwd_sdpa_flash_cpu, False),
        "cuda": (_fwd_sdpa_flash_cuda, _bwd_sdpa_flash_cuda, True),
    },
    "sdpa_efficient": {"cuda": (_fwd_sdpa_efficient, _bwd_sdpa_efficient, True)},
    "sdpa_cudnn": {"cuda": (_fwd_sdpa_cudnn, _bwd_sdpa_cudnn, False)},
    "flex": {"*": (_fwd_flex, _bwd_flex, True)},
    "flash_attn": {"cuda": (_fwd_flash_attn, _bwd_flash_attn, True)},
}


def _kernels(name: str, device: torch.device) -> tuple[Callable, Callable, bool]:
    table = _KERNELS[name]
    return table.get(device.type) or table["*"]


def _forward_live(name: str, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """Forward for a problem with no empty rows (causal implies sq <= sk)."""
    fwd, _, bottom_right = _kernels(name, q.device)
    sq, sk = q.shape[1], k.shape[1]
    if causal and sq < sk and not bottom_right:
        p = sk - sq
        out_a, lse_a = fwd(q, k[:, :p].contiguous(), v[:, :p].contiguous(), False, scale)
        out_b, lse_b = fwd(q, k[:, p:].contiguous(), v[:, p:].contiguous(), True, scale)
        return merge_partials(out_a, lse_a, out_b, lse_b)
    out, lse = fwd(q, k, v, causal, scale)
    return out.contiguous(), lse.to(_lse_dtype(q.dtype)).contiguous()


def _backward_live(
    name: str, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    _, bwd, bottom_right = _kernels(name, q.device)
    sq, sk = q.shape[1], k.shape[1]
    if causal and sq < sk and not bottom_right:
        p = sk - sq
        dq_a, dk_a, dv_a = bwd(dout, q, k[:, :p].contiguous(), v[:, :p].contiguous(), out, lse, False, scale)
        dq_b, dk_b, dv_b = bwd(dout, q, k[:, p:].contiguous(), v[:, p:].contiguous(), out, lse, True, scale)
        dq = (dq_a.to(_compute_dtype(q.dtype)) + dq_b).to(q.dtype)
        return dq, torch.cat([dk_a, dk_b], dim=1), torch.cat([dv_a, dv_b], dim=1)
    dq, dk, dv = bwd(dout, q, k, v, out, lse, causal, scale)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _run(
    candidates: list[str], explicit: bool, key: tuple[str, torch.dtype, int], phase: str, fn: Callable[[str], tuple]
) -> tuple[str, tuple]:
    """Run ``fn(name)`` for the first candidate that works (auto) or the only one (explicit)."""
    for i, name in enumerate(candidates):
        if explicit or i == len(candidates) - 1:
            return name, fn(name)
        try:
            return name, fn(name)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - auto falls back on any kernel failure
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            _AUTO_DISABLED[key + (name, phase)] = reason
            warnings.warn(
                f"attention backend {name!r} failed under 'auto' ({reason}); "
                f"falling back to {candidates[i + 1]!r} for {phase} {key}",
                RuntimeWarning,
                stacklevel=3,
            )
    raise AssertionError("unreachable")  # pragma: no cover


def _plan(backend: str, q: Tensor, requires_backward: bool, phase: str, first: str | None = None) -> tuple[list[str], bool]:
    device, dtype, head_dim = q.device, q.dtype, q.shape[-1]
    if backend == "auto":
        cands = _auto_candidates(device, dtype, head_dim, requires_backward, phase)
        if first is not None and first in cands:
            cands = [first] + [c for c in cands if c != first]
        return cands, False
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS + ('auto',)}")
    _require(backend, device, dtype, head_dim, requires_backward)
    return [backend], True


def _forward_impl(q, k, v, causal, softmax_scale, backend, requires_backward, first=None):
    _check_qkv(q, k, v)
    b, sq, hq, d = q.shape
    sk = k.shape[1]
    scale = _resolve_scale(softmax_scale, d)
    cands, explicit = _plan(backend, q, requires_backward, "fwd", first)
    n_empty = _num_empty_rows(sq, sk, causal)
    if n_empty == sq or b == 0 or hq == 0:
        out = torch.zeros_like(q, memory_format=torch.contiguous_format)
        lse = torch.full((b, hq, sq), float("-inf"), dtype=_lse_dtype(q.dtype), device=q.device)
        return out, lse, cands[0]
    q_live = q[:, n_empty:].contiguous()
    k, v = k.contiguous(), v.contiguous()
    key = (q.device.type, q.dtype, d)
    with torch.no_grad():
        name, (out_l, lse_l) = _run(cands, explicit, key, "fwd", lambda n: _forward_live(n, q_live, k, v, causal, scale))
    if n_empty == 0:
        return out_l, lse_l, name
    out = torch.zeros(b, sq, hq, d, dtype=q.dtype, device=q.device)
    lse = torch.full((b, hq, sq), float("-inf"), dtype=lse_l.dtype, device=q.device)
    out[:, n_empty:] = out_l
    lse[..., n_empty:] = lse_l
    return out, lse, name


def _backward_impl(dout, q, k, v, out, lse, causal, softmax_scale, backend, first=None):
    _check_qkv(q, k, v)
    _check_backward_args(dout, q, out, lse)
    b, sq, hq, d = q.shape
    sk = k.shape[1]
    scale = _resolve_scale(softmax_scale, d)
    cands, explicit = _plan(backend, q, True, "bwd", first)
    n_empty = _num_empty_rows(sq, sk, causal)
    if n_empty == sq or b == 0 or hq == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    live = slice(n_empty, sq)
    dout_l = dout[:, live].to(q.dtype).contiguous()
    q_l = q[:, live].contiguous()
    out_l = out[:, live].to(q.dtype).contiguous()
    lse_l = lse[..., live].to(_lse_dtype(q.dtype)).contiguous()
    k, v = k.contiguous(), v.contiguous()
    key = (q.device.type, q.dtype, d)
    with torch.no_grad():
        _, (dq_l, dk, dv) = _run(
            cands, explicit, key, "bwd", lambda n: _backward_live(n, dout_l, q_l, k, v, out_l, lse_l, causal, scale)
        )
    if n_empty == 0:
        dq = dq_l.contiguous()
    else:
        dq = torch.zeros(b, sq, hq, d, dtype=q.dtype, device=q.device)
        dq[:, live] = dq_l
    return dq, dk.contiguous(), dv.contiguous()


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def attention_forward(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool, softmax_scale: float | None = None, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Attention forward without autograd.

    Args:
        q: ``[b, sq, hq, d]``; k, v: ``[b, sk, hkv, d]``, same dtype and device.
        causal: bottom-right aligned causal mask (see module docstring).
        softmax_scale: ``None`` means ``1/sqrt(d)``.
        backend: one of :data:`BACKENDS` or ``"auto"``.

    Returns:
        ``(out [b, sq, hq, d] in q.dtype, lse [b, hq, sq] float32)`` (lse is float64
        for float64 inputs).  Empty rows give out 0 and lse ``-inf``.

    Raises:
        ValueError: bad shapes/dtypes, or an explicit backend that cannot do the call.
    """
    out, lse, _ = _forward_impl(q, k, v, causal, softmax_scale, backend, requires_backward=False)
    return out, lse


def kernel_forward(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, softmax_scale: float, backend: str):
    """The named backend's forward kernel called directly: no validation, planning or fallback.

    For hot loops (a decode step: one call per layer and request) whose inputs the
    caller has checked once and whose backend it resolved once (:func:`select_backend`):
    ``backend`` must be able to do the call, q/k/v ``[b, s, h, d]`` with the last dim
    contiguous, ``causal`` only with ``sq == sk``. Returns ``(out, lse)`` as the kernel
    gives them (out in q's dtype; lse ``[b, hq, sq]``, float32 or wider).
    """
    fwd, _, _ = _kernels(backend, q.device)
    return fwd(q, k, v, causal, softmax_scale)


def attention_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    *,
    causal: bool,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """Attention backward without autograd: ``(dq, dk, dv)`` in the input dtypes.

    ``out`` and ``lse`` may be the *global* (merged) output and lse of a larger
    attention of which (k, v) is one key block: probabilities are recomputed as
    ``exp(s - lse)`` and ``D = rowsum(dout * out)``, so the sum of the block
    results is the exact gradient.  For GQA, dk/dv are summed over the query heads
    of each group.  Rows that see no key get dq = 0 and contribute nothing.
    """
    return _backward_impl(dout, q, k, v, out, lse, causal, softmax_scale, backend)


def merge_partials(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Merge two partial attentions over disjoint key sets (log-sum-exp rule).

    ``lse = logaddexp(lse_a, lse_b)``, ``out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b``,
    computed in float32 (float64 if an lse is float64).  ``-inf`` on one side gives the
    other side; ``-inf`` on both gives out 0 and lse ``-inf``.  Returns out in
    ``out_a.dtype``.  Plain torch ops, so it is differentiable too.
    """
    cdt = torch.promote_types(torch.float32, torch.promote_types(lse_a.dtype, lse_b.dtype))
    la, lb = lse_a.to(cdt), lse_b.to(cdt)
    lse = torch.logaddexp(la, lb)
    lse_safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    wa = _t(torch.exp(la - lse_safe)).unsqueeze(-1)
    wb = _t(torch.exp(lb - lse_safe)).unsqueeze(-1)
    out = wa * out_a.to(cdt) + wb * out_b.to(cdt)
    return out.to(out_a.dtype), lse


class _LocalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale, backend, requires_backward):
        out, lse, used = _forward_impl(q, k, v, causal, softmax_scale, backend, requires_backward)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.softmax_scale, ctx.backend, ctx.used = causal, softmax_scale, backend, used
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        first = ctx.used if ctx.backend == "auto" else None
        dq, dk, dv = _backward_impl(dout, q, k, v, out, lse, ctx.causal, ctx.softmax_scale, ctx.backend, first)
        return dq, dk, dv, None, None, None, None


def local_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    softmax_scale: float | None = None,
    backend: str = "auto",
    return_lse: bool = False,
):
    """Autograd attention over :func:`attention_forward` / :func:`attention_backward`.

    Returns ``out`` or, with ``return_lse``, ``(out, lse)``.  The lse is not
    differentiable (it is treated as a constant; gradients do not flow through it).
    With ``backend="auto"`` the backend is chosen for forward+backward when any
    input requires grad, and the backward starts with the backend the forward used.
    """
    requires_backward = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    out, lse = _LocalAttention.apply(q, k, v, causal, softmax_scale, backend, requires_backward)
    return (out, lse) if return_lse else out
