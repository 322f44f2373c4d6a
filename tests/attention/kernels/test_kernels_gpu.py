"""GPU (marker ``gpu``; run on a CUDA machine: ``pytest -m gpu tests/attention/kernels``):
every CUDA backend in bf16 against the float64 reference within 2.5e-2, block
decomposition, float32 paths, and ``auto`` with the autograd wrapper."""

from __future__ import annotations

import warnings

import pytest
import torch

from kernel_cases import BF16_TOL
from megatron_fapool.attention.kernels import (
    BACKENDS,
    BackendSelector,
    attention_backward,
    attention_forward,
    auto_failures,
    available_backends,
    backend_unsupported_reason,
    local_attention,
    merge_partials,
    select_backend,
)
from megatron_fapool.attention.kernels.backends import _device_unavailable_reason
from megatron_fapool.attention.kernels.reference import reference_attention
from megatron_fapool.testing.compare import assert_rel_close

GPU_CASES = {
    "square_causal_b2": (2, 749, 749, 4, 4, 64, True, None),
    "bottom_right_gqa_d128": (1, 131, 749, 8, 2, 128, True, None),
    "bottom_right_d80": (1, 200, 1000, 4, 4, 80, True, None),
    "empty_rows_gqa": (2, 300, 131, 4, 2, 64, True, 0.3),
    "noncausal_d256": (1, 131, 749, 4, 4, 256, False, None),
    "causal_d256_gqa": (1, 256, 512, 4, 1, 256, True, None),
}


# flex compiles once per shape (about a minute for forward + backward), so it runs a subset.
FLEX_GPU_CASES = ("bottom_right_gqa_d128", "empty_rows_gqa")


def _cuda_backends() -> list[str]:
    return available_backends("cuda") if torch.cuda.is_available() else []


def _gpu_inputs(case: str, dtype):
    b, sq, sk, hq, hkv, d, causal, scale = GPU_CASES[case]
    g = torch.Generator().manual_seed(11)
    q = torch.randn(b, sq, hq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, sk, hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, sk, hkv, d, generator=g, dtype=torch.float64)
    dout = torch.randn(b, sq, hq, d, generator=g, dtype=torch.float64)
    xs = tuple(x.to(device="cuda", dtype=dtype) for x in (q, k, v, dout))
    return xs, dict(causal=causal, softmax_scale=scale)


def _gpu_reference(xs, kw):
    q, k, v, dout = xs
    q64, k64, v64 = (x.double().requires_grad_(True) for x in (q, k, v))
    out, lse = reference_attention(q64, k64, v64, **kw)
    grads = torch.autograd.grad(out, (q64, k64, v64), dout.double())
    return (out.detach(), lse.detach(), *grads)


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_bf16_against_reference(backend, case):
    if backend == "flex" and case not in FLEX_GPU_CASES:
        pytest.skip("flex: compile time; covered by FLEX_GPU_CASES")
    if backend not in _cuda_backends():
        pytest.skip(f"{backend} not available: {_device_unavailable_reason(backend, torch.device('cuda'))}")
    xs, kw = _gpu_inputs(case, torch.bfloat16)
    q, k, v, dout = xs
    reason = backend_unsupported_reason(backend, q, k, v, requires_backward=True)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    ref = _gpu_reference(xs, kw)
    out, lse = attention_forward(q, k, v, backend=backend, **kw)
    grads = attention_backward(dout, q, k, v, out, lse, backend=backend, **kw)
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), ref):
        assert_rel_close(got, want, rel=BF16_TOL, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_block_decomposition_bf16(backend):
    if backend not in _cuda_backends():
        pytest.skip(f"{backend} not available")
    g = torch.Generator().manual_seed(3)
    b, hq, hkv, d = 1, 8, 2, 128
    q = torch.randn(b, 131, hq, d, generator=g).cuda().bfloat16()
    k = torch.randn(b, 431, hkv, d, generator=g).cuda().bfloat16()
    v = torch.randn(b, 431, hkv, d, generator=g).cuda().bfloat16()
    dout = torch.randn(b, 131, hq, d, generator=g).cuda().bfloat16()
    if backend_unsupported_reason(backend, q, k, v, requires_backward=True):
        pytest.skip("unsupported")
    ref = _gpu_reference((q, k, v, dout), dict(causal=True))
    blocks = [(0, 125, False), (125, 250, False), (250, 431, True)]  # last: sq=131 < sk=181
    out = lse = None
    for lo, hi, causal in blocks:
        o, s = attention_forward(q, k[:, lo:hi], v[:, lo:hi], causal=causal, backend=backend)
        out, lse = (o, s) if out is None else merge_partials(out, lse, o, s)
    dq = torch.zeros_like(q, dtype=torch.float32)
    dks, dvs = [], []
    for lo, hi, causal in blocks:
        gq, gk, gv = attention_backward(dout, q, k[:, lo:hi], v[:, lo:hi], out, lse, causal=causal, backend=backend)
        dq += gq.float()
        dks.append(gk)
        dvs.append(gv)
    got = (out, lse, dq, torch.cat(dks, 1), torch.cat(dvs, 1))
    for name, a, r in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
        assert_rel_close(a, r, rel=BF16_TOL, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["math", "sdpa_efficient", "sdpa_math"])
def test_gpu_fp32(backend):
    if backend not in _cuda_backends():
        pytest.skip(f"{backend} not available")
    xs, kw = _gpu_inputs("bottom_right_gqa_d128", torch.float32)
    q, k, v, dout = xs
    ref = _gpu_reference(xs, kw)
    out, lse = attention_forward(q, k, v, backend=backend, **kw)
    grads = attention_backward(dout, q, k, v, out, lse, backend=backend, **kw)
    tol = 1e-4  # IEEE float32 paths (TF32 is off by default for matmuls)
    for name, a, r in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), ref):
        assert_rel_close(a, r, rel=tol, msg=name)


@pytest.mark.gpu
def test_gpu_auto_and_autograd():
    xs, kw = _gpu_inputs("bottom_right_gqa_d128", torch.bfloat16)
    q, k, v, dout = xs
    for rb in (False, True):
        name = select_backend(q, k, v, causal=True, requires_backward=rb)
        assert name in available_backends("cuda")
        assert backend_unsupported_reason(name, q, k, v, requires_backward=rb) is None
    assert select_backend(q.float(), k.float(), v.float(), causal=True, requires_backward=True) in ("sdpa_efficient", "flex", "math")
    ref = _gpu_reference(xs, kw)
    qg, kg, vg = (x.clone().requires_grad_(True) for x in (q, k, v))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # an auto fallback would be a bug here
        selector = BackendSelector()
        out = local_attention(qg, kg, vg, selector=selector, **kw)
        out.backward(dout)
    for name, a, r in zip(("out", "dq", "dk", "dv"), (out, qg.grad, kg.grad, vg.grad), (ref[0], *ref[2:])):
        assert_rel_close(a, r, rel=BF16_TOL, msg=name)
    assert not auto_failures(selector), auto_failures(selector)
