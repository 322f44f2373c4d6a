"""Dispatch and the public calls: checks, empty rows, the ``sq < sk`` split, ``auto`` fallback.

Every call goes ``attention_forward`` / ``attention_backward`` (or the autograd wrapper
``local_attention``) -> ``_forward_impl`` / ``_backward_impl`` (checks, backend
candidates, empty rows cut off) -> ``_run`` (``auto`` fallback) -> ``_forward_live`` /
``_backward_live`` (the ``sq < sk`` split for top-left kernels) -> the backend's kernel
from :data:`_KERNELS`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from .backends import BACKENDS, BackendSelector, require_backend
from .flash_attn import flash_attn_backward, flash_attn_forward
from .flex import flex_backward, flex_forward
from .layout import accumulator_dtype, bhsd, check_qkv
from .math import math_backward, math_forward
from .sdpa import (
    sdpa_cudnn_backward,
    sdpa_cudnn_forward,
    sdpa_efficient_backward,
    sdpa_efficient_forward,
    sdpa_flash_cpu_backward,
    sdpa_flash_cpu_forward,
    sdpa_flash_cuda_backward,
    sdpa_flash_cuda_forward,
    sdpa_math_backward,
    sdpa_math_forward,
)

__all__ = [
    "attention_backward",
    "attention_forward",
    "kernel_forward",
    "local_attention",
    "merge_partials",
]

# name -> {device type -> (forward, backward, bottom-right causal natively?)}
_KERNELS: dict[str, dict[str, tuple[Callable, Callable, bool]]] = {
    "math": {"*": (math_forward, math_backward, True)},
    "sdpa_math": {"*": (sdpa_math_forward, sdpa_math_backward, True)},
    "sdpa_flash": {
        "cpu": (sdpa_flash_cpu_forward, sdpa_flash_cpu_backward, False),
        "cuda": (sdpa_flash_cuda_forward, sdpa_flash_cuda_backward, True),
    },
    "sdpa_efficient": {"cuda": (sdpa_efficient_forward, sdpa_efficient_backward, True)},
    "sdpa_cudnn": {"cuda": (sdpa_cudnn_forward, sdpa_cudnn_backward, False)},
    "flex": {"*": (flex_forward, flex_backward, True)},
    "flash_attn": {"cuda": (flash_attn_forward, flash_attn_backward, True)},
}


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


def _resolve_scale(softmax_scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if softmax_scale is None else float(softmax_scale)


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
# Dispatch
# --------------------------------------------------------------------------------------


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
    return out.contiguous(), lse.to(accumulator_dtype(q.dtype)).contiguous()


def _backward_live(
    name: str, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    _, bwd, bottom_right = _kernels(name, q.device)
    sq, sk = q.shape[1], k.shape[1]
    if causal and sq < sk and not bottom_right:
        p = sk - sq
        dq_a, dk_a, dv_a = bwd(dout, q, k[:, :p].contiguous(), v[:, :p].contiguous(), out, lse, False, scale)
        dq_b, dk_b, dv_b = bwd(dout, q, k[:, p:].contiguous(), v[:, p:].contiguous(), out, lse, True, scale)
        dq = (dq_a.to(accumulator_dtype(q.dtype)) + dq_b).to(q.dtype)
        return dq, torch.cat([dk_a, dk_b], dim=1), torch.cat([dv_a, dv_b], dim=1)
    dq, dk, dv = bwd(dout, q, k, v, out, lse, causal, scale)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _run(
    candidates: list[str],
    explicit: bool,
    key: tuple[str, torch.dtype, int],
    phase: str,
    fn: Callable[[str], tuple],
    selector: BackendSelector,
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
            selector.record_failure(key + (name, phase), reason)
            warnings.warn(
                f"attention backend {name!r} failed under 'auto' ({reason}); "
                f"falling back to {candidates[i + 1]!r} for {phase} {key}",
                RuntimeWarning,
                stacklevel=3,
            )
    raise AssertionError("unreachable")  # pragma: no cover


def _candidates(
    backend: str, q: Tensor, requires_backward: bool, phase: str, selector: BackendSelector, first: str | None = None
) -> tuple[list[str], bool]:
    """The backends to try, in order, and whether ``backend`` was explicit (no fallback)."""
    device, dtype, head_dim = q.device, q.dtype, q.shape[-1]
    if backend == "auto":
        cands = selector.candidates(device, dtype, head_dim, requires_backward, phase)
        if first is not None and first in cands:
            cands = [first] + [c for c in cands if c != first]
        return cands, False
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS + ('auto',)}")
    require_backend(backend, device, dtype, head_dim, requires_backward)
    return [backend], True


def _forward_impl(q, k, v, causal, softmax_scale, backend, requires_backward, selector, first=None):
    check_qkv(q, k, v)
    b, sq, hq, d = q.shape
    sk = k.shape[1]
    scale = _resolve_scale(softmax_scale, d)
    cands, explicit = _candidates(backend, q, requires_backward, "fwd", selector, first)
    n_empty = _num_empty_rows(sq, sk, causal)
    if n_empty == sq or b == 0 or hq == 0:
        out = torch.zeros_like(q, memory_format=torch.contiguous_format)
        lse = torch.full((b, hq, sq), float("-inf"), dtype=accumulator_dtype(q.dtype), device=q.device)
        return out, lse, cands[0]
    q_live = q[:, n_empty:].contiguous()
    k, v = k.contiguous(), v.contiguous()
    key = (q.device.type, q.dtype, d)
    with torch.no_grad():
        name, (out_l, lse_l) = _run(
            cands, explicit, key, "fwd", lambda n: _forward_live(n, q_live, k, v, causal, scale), selector
        )
    if n_empty == 0:
        return out_l, lse_l, name
    out = torch.zeros(b, sq, hq, d, dtype=q.dtype, device=q.device)
    lse = torch.full((b, hq, sq), float("-inf"), dtype=lse_l.dtype, device=q.device)
    out[:, n_empty:] = out_l
    lse[..., n_empty:] = lse_l
    return out, lse, name


def _backward_impl(dout, q, k, v, out, lse, causal, softmax_scale, backend, selector, first=None):
    check_qkv(q, k, v)
    _check_backward_args(dout, q, out, lse)
    b, sq, hq, d = q.shape
    sk = k.shape[1]
    scale = _resolve_scale(softmax_scale, d)
    cands, explicit = _candidates(backend, q, True, "bwd", selector, first)
    n_empty = _num_empty_rows(sq, sk, causal)
    if n_empty == sq or b == 0 or hq == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    live = slice(n_empty, sq)
    dout_l = dout[:, live].to(q.dtype).contiguous()
    q_l = q[:, live].contiguous()
    out_l = out[:, live].to(q.dtype).contiguous()
    lse_l = lse[..., live].to(accumulator_dtype(q.dtype)).contiguous()
    k, v = k.contiguous(), v.contiguous()
    key = (q.device.type, q.dtype, d)
    with torch.no_grad():
        _, (dq_l, dk, dv) = _run(
            cands, explicit, key, "bwd",
            lambda n: _backward_live(n, dout_l, q_l, k, v, out_l, lse_l, causal, scale), selector,
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
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    softmax_scale: float | None = None,
    backend: str = "auto",
    selector: BackendSelector | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention forward without autograd.

    Args:
        q: ``[b, sq, hq, d]``; k, v: ``[b, sk, hkv, d]``, same dtype and device.
        causal: bottom-right aligned causal mask (see the package docstring).
        softmax_scale: ``None`` means ``1/sqrt(d)``.
        backend: one of :data:`BACKENDS` or ``"auto"``.
        selector: resolves ``"auto"`` and keeps its run-time failures across the calls
            given it (:class:`BackendSelector`); ``None``: a fresh one for this call.

    Returns:
        ``(out [b, sq, hq, d] in q.dtype, lse [b, hq, sq] float32)`` (lse is float64
        for float64 inputs).  Empty rows give out 0 and lse ``-inf``.

    Raises:
        ValueError: bad shapes/dtypes, or an explicit backend that cannot do the call.
    """
    selector = selector if selector is not None else BackendSelector()
    out, lse, _ = _forward_impl(q, k, v, causal, softmax_scale, backend, False, selector)
    return out, lse


def kernel_forward(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, softmax_scale: float, backend: str):
    """The named backend's forward kernel called directly: no validation, backend choice or fallback.

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
    selector: BackendSelector | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Attention backward without autograd: ``(dq, dk, dv)`` in the input dtypes.

    ``out`` and ``lse`` may be the *global* (merged) output and lse of a larger
    attention of which (k, v) is one key block: probabilities are recomputed as
    ``exp(s - lse)`` and ``D = rowsum(dout * out)``, so the sum of the block
    results is the exact gradient.  For GQA, dk/dv are summed over the query heads
    of each group.  Rows that see no key get dq = 0 and contribute nothing.
    ``selector`` as in :func:`attention_forward`.
    """
    selector = selector if selector is not None else BackendSelector()
    return _backward_impl(dout, q, k, v, out, lse, causal, softmax_scale, backend, selector)


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
    wa = bhsd(torch.exp(la - lse_safe)).unsqueeze(-1)
    wb = bhsd(torch.exp(lb - lse_safe)).unsqueeze(-1)
    out = wa * out_a.to(cdt) + wb * out_b.to(cdt)
    return out.to(out_a.dtype), lse


class _LocalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale, backend, requires_backward, selector):
        out, lse, used = _forward_impl(q, k, v, causal, softmax_scale, backend, requires_backward, selector)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.softmax_scale, ctx.backend, ctx.used = causal, softmax_scale, backend, used
        ctx.selector = selector
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        first = ctx.used if ctx.backend == "auto" else None
        dq, dk, dv = _backward_impl(
            dout, q, k, v, out, lse, ctx.causal, ctx.softmax_scale, ctx.backend, ctx.selector, first
        )
        return dq, dk, dv, None, None, None, None, None


def local_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    softmax_scale: float | None = None,
    backend: str = "auto",
    return_lse: bool = False,
    selector: BackendSelector | None = None,
):
    """Autograd attention on this device over :func:`attention_forward` / :func:`attention_backward`.

    "Local" as everywhere in the package: computed here, with no other rank (not
    pooled, not sequence-parallel).  Returns ``out`` or, with ``return_lse``,
    ``(out, lse)``.  The lse is not differentiable (it is treated as a constant;
    gradients do not flow through it).  With ``backend="auto"`` the backend is chosen
    for forward+backward when any input requires grad, and the backward starts with
    the backend the forward used.  Forward and backward use one ``selector`` (a fresh
    one when ``None``; see :func:`attention_forward`).
    """
    requires_backward = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    selector = selector if selector is not None else BackendSelector()
    out, lse = _LocalAttention.apply(q, k, v, causal, softmax_scale, backend, requires_backward, selector)
    return (out, lse) if return_lse else out
