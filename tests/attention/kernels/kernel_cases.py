"""Shared inputs of the kernel tests: awkward CPU cases and their float64 reference.

CPU cases run at awkward shapes (749 keys, sq < sk bottom-right causal, sq > sk with
empty rows, GQA, head_dim 64/80/256, batch 2); results must be within 1e-5 of the
reference relative to its largest magnitude (``assert_rel_close``), for out, lse, dq, dk, dv.
"""

from __future__ import annotations

import functools

import torch

from megatron_fapool.attention.kernels import available_backends
from megatron_fapool.attention.kernels.backends import _unsupported_reason
from megatron_fapool.attention.kernels.reference import reference_attention

FP32_TOL = 1e-5
BF16_TOL = 2.5e-2

# name -> (batch, sq, sk, hq, hkv, head_dim, causal, softmax_scale)
CASES = {
    "square_causal_b2": (2, 749, 749, 4, 4, 64, True, None),
    "bottom_right_gqa_d80": (1, 131, 749, 8, 2, 80, True, None),
    "empty_rows_gqa": (2, 300, 131, 4, 2, 64, True, 0.3),
    "noncausal_d256": (1, 131, 749, 2, 2, 256, False, None),
    "noncausal_gqa_b2": (2, 200, 200, 8, 2, 64, False, None),
}

CPU_BACKENDS = available_backends("cpu")


def make_inputs(case: str, device="cpu", dtype=torch.float32, seed=0):
    b, sq, sk, hq, hkv, d, causal, scale = CASES[case]
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, hq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, sk, hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, sk, hkv, d, generator=g, dtype=torch.float64)
    dout = torch.randn(b, sq, hq, d, generator=g, dtype=torch.float64)
    cast = lambda x: x.to(device=device, dtype=dtype)  # noqa: E731
    return (cast(q), cast(k), cast(v), cast(dout)), dict(causal=causal, softmax_scale=scale)


@functools.lru_cache(maxsize=None)
def reference(case: str, device="cpu", dtype=torch.float32):
    """Float64 reference (out, lse, dq, dk, dv) for the rounded inputs of ``case``."""
    (q, k, v, dout), kw = make_inputs(case, device, dtype)
    q64, k64, v64 = (x.double().requires_grad_(True) for x in (q, k, v))
    out, lse = reference_attention(q64, k64, v64, **kw)
    dq, dk, dv = torch.autograd.grad(out, (q64, k64, v64), dout.double())
    return out.detach(), lse.detach(), dq, dk, dv


def supports_backward(backend: str, device: str, dtype=torch.float32, d: int = 64) -> bool:
    return _unsupported_reason(backend, torch.device(device), dtype, d, True) is None
