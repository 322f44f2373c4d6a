"""The aten SDPA backends: ``sdpa_flash`` (CPU and CUDA), ``sdpa_efficient``, ``sdpa_cudnn``, ``sdpa_math``.

``sdpa_flash``
    CUDA: ``aten._scaled_dot_product_flash_attention`` (+ ``_backward``), FA2, native
    GQA, causal with ``sq < sk`` is bottom-right.  CPU:
    ``aten._scaled_dot_product_flash_attention_for_cpu`` (+ ``_backward``), native GQA,
    causal is *top-left* (the dispatcher splits ``sq < sk``).
``sdpa_efficient``
    CUDA: ``aten._efficient_attention_forward`` / ``_backward`` with
    ``custom_mask_type=2`` (causal-from-bottom-right).  k/v are expanded for GQA.  LSE is
    padded to a multiple of 32 by the kernel; we slice / pad it.
``sdpa_cudnn``
    CUDA: ``aten._scaled_dot_product_cudnn_attention`` (+ ``_backward``).  Causal is
    top-left (split by the dispatcher); k/v are expanded for GQA; LSE comes as
    ``[b, h, s, 1]``.
``sdpa_math``
    ``F.scaled_dot_product_attention`` under the MATH backend with a materialised
    bottom-right mask; the LSE is a ``logsumexp`` of the same masked scores (one extra
    QK^T).  Backward: :func:`.flex.recompute_backward`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .flex import recompute_backward
from .layout import accumulator_dtype, bhsd, expand_kv, grouped, reduce_kv_grad
from .math import chunk_mask

__all__ = [
    "sdpa_cudnn_backward",
    "sdpa_cudnn_forward",
    "sdpa_efficient_backward",
    "sdpa_efficient_forward",
    "sdpa_flash_cpu_backward",
    "sdpa_flash_cpu_forward",
    "sdpa_flash_cuda_backward",
    "sdpa_flash_cuda_forward",
    "sdpa_math_backward",
    "sdpa_math_forward",
]

_aten = torch.ops.aten


def _kernel_placeholders(name: str, device: torch.device) -> tuple:
    return _placeholders(name, str(device))


@functools.cache
def _placeholders(name: str, device: str) -> tuple:
    """RNG tensors (and cuDNN's LSE rank) exactly as this torch's forward returns them
    without dropout, taken once per (kernel, device) from a tiny forward call.  The
    backward ops take the forward's RNG state as arguments; with dropout_p = 0 they are
    not read, but passing tensors of the right kind keeps us independent of
    torch-version details.
    """
    x = torch.zeros(1, 1, 128, 64, dtype=torch.bfloat16, device=device)  # [b, h, s, d]
    with torch.no_grad():
        if name == "sdpa_flash":
            r = _aten._scaled_dot_product_flash_attention(x, x, x, 0.0, False, False, scale=1.0)
            return (r[6], r[7])
        if name == "sdpa_efficient":
            xt = bhsd(x)
            r = _aten._efficient_attention_forward(xt, xt, xt, None, None, None, None, None, 0.0, 0, True, scale=1.0)
            return (r[2], r[3])
        if name == "sdpa_cudnn":
            r = _aten._scaled_dot_product_cudnn_attention(x, x, x, None, True, 0.0, False, False, scale=1.0)
            return (r[6], r[7], r[1].dim())
    raise KeyError(name)  # pragma: no cover


# ---- sdpa_flash, CPU -------------------------------------------------------------------


def sdpa_flash_cpu_forward(q, k, v, causal, scale):
    out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(bhsd(q), bhsd(k), bhsd(v), 0.0, causal, scale=scale)
    return bhsd(out), lse


def sdpa_flash_cpu_backward(dout, q, k, v, out, lse, causal, scale):
    dq, dk, dv = _aten._scaled_dot_product_flash_attention_for_cpu_backward(
        bhsd(dout), bhsd(q), bhsd(k), bhsd(v), bhsd(out), lse.to(accumulator_dtype(q.dtype)), 0.0, causal, scale=scale
    )
    return bhsd(dq), bhsd(dk), bhsd(dv)


# ---- sdpa_flash, CUDA (FA2 inside torch) -----------------------------------------------


def sdpa_flash_cuda_forward(q, k, v, causal, scale):
    r = _aten._scaled_dot_product_flash_attention(bhsd(q), bhsd(k), bhsd(v), 0.0, causal, False, scale=scale)
    return bhsd(r[0]), r[1]


def sdpa_flash_cuda_backward(dout, q, k, v, out, lse, causal, scale):
    seed, offset = _kernel_placeholders("sdpa_flash", q.device)
    dq, dk, dv = _aten._scaled_dot_product_flash_attention_backward(
        bhsd(dout), bhsd(q), bhsd(k), bhsd(v), bhsd(out), lse.float().contiguous(),
        None, None, q.shape[1], k.shape[1], 0.0, causal, seed, offset, scale=scale,
    )
    return bhsd(dq), bhsd(dk), bhsd(dv)


# ---- sdpa_efficient (CUDA) -------------------------------------------------------------


def _efficient_mask_type(causal: bool) -> int:
    return 2 if causal else 0  # 2 = CausalFromBottomRight (torch.nn.attention.bias.CausalVariant)


def sdpa_efficient_forward(q, k, v, causal, scale):
    g = q.shape[2] // k.shape[2]
    r = _aten._efficient_attention_forward(
        q, expand_kv(k, g), expand_kv(v, g), None, None, None, None, None,
        0.0, _efficient_mask_type(causal), True, scale=scale,
    )
    return r[0], r[1][..., : q.shape[1]]


def sdpa_efficient_backward(dout, q, k, v, out, lse, causal, scale):
    b, sq, hq, _ = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    seed, offset = _kernel_placeholders("sdpa_efficient", q.device)
    padded = ((sq + 31) // 32) * 32
    lse_p = torch.zeros(b, hq, padded, dtype=torch.float32, device=q.device)
    lse_p[..., :sq] = lse
    ke, ve = expand_kv(k, g), expand_kv(v, g)
    dq, dk, dv, _ = _aten._efficient_attention_backward(
        dout, q, ke, ve, None, out, None, None, sq, k.shape[1], lse_p,
        0.0, seed, offset, _efficient_mask_type(causal), False, scale=scale,
    )
    return dq, reduce_kv_grad(dk, hkv, k.dtype), reduce_kv_grad(dv, hkv, v.dtype)


# ---- sdpa_cudnn (CUDA) -----------------------------------------------------------------


def sdpa_cudnn_forward(q, k, v, causal, scale):
    b, sq, hq, _ = q.shape
    g = hq // k.shape[2]
    r = _aten._scaled_dot_product_cudnn_attention(
        bhsd(q), bhsd(expand_kv(k, g)), bhsd(expand_kv(v, g)), None, True, 0.0, causal, False, scale=scale
    )
    return bhsd(r[0]), r[1].reshape(b, hq, sq)


def sdpa_cudnn_backward(dout, q, k, v, out, lse, causal, scale):
    b, sq, hq, _ = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    seed, offset, lse_rank = _kernel_placeholders("sdpa_cudnn", q.device)
    lse_k = lse.float().contiguous()
    if lse_rank == 4:
        lse_k = lse_k.unsqueeze(-1)
    ke, ve = expand_kv(k, g), expand_kv(v, g)
    dq, dk, dv = _aten._scaled_dot_product_cudnn_attention_backward(
        bhsd(dout), bhsd(q), bhsd(ke), bhsd(ve), bhsd(out), lse_k, seed, offset, None, None, None,
        sq, k.shape[1], 0.0, causal, scale=scale,
    )
    return bhsd(dq), reduce_kv_grad(bhsd(dk), hkv, k.dtype), reduce_kv_grad(bhsd(dv), hkv, v.dtype)


# ---- sdpa_math -------------------------------------------------------------------------


def _sdpa_math_diff(q, k, v, causal, scale):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    mask = None
    if causal:
        mask = ~chunk_mask(0, sq, sk, sq, sk, q.device)
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(
            bhsd(q), bhsd(k), bhsd(v), attn_mask=mask, scale=scale, enable_gqa=hq != hkv
        )
    # The math kernel does not return the LSE: compute it from the same masked scores.
    cdt = accumulator_dtype(q.dtype)
    qg = grouped(q, hkv).to(cdt).reshape(b, hkv, -1, d)  # [b, hkv, g*sq, d]
    s = torch.matmul(qg, bhsd(k).to(cdt).transpose(-1, -2)) * scale
    if causal:
        s = s.view(b, hkv, hq // hkv, sq, sk).masked_fill(~mask, float("-inf")).view(b, hkv, -1, sk)
    lse = torch.logsumexp(s, dim=-1).view(b, hq, sq).to(accumulator_dtype(q.dtype))
    return bhsd(out), lse


def sdpa_math_forward(q, k, v, causal, scale):
    return _sdpa_math_diff(q, k, v, causal, scale)


def sdpa_math_backward(dout, q, k, v, out, lse, causal, scale):
    return recompute_backward(lambda a, b_, c: _sdpa_math_diff(a, b_, c, causal, scale), dout, q, k, v, out, lse)

