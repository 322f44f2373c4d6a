"""Tests of the local attention kernels against a dense float64 reference.

CPU tests run every CPU backend in float32 at awkward shapes (749 keys, sq < sk
bottom-right causal, sq > sk with empty rows, GQA, head_dim 64/80/256, batch 2)
and require relative error <= 1e-5 (max|a-b| / max|ref|) for out, lse, dq, dk, dv.
GPU tests (marker ``gpu``) do the same in bf16 for every CUDA backend within 2.5e-2.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

from megatron_fapool.attention import kernels as L
from megatron_fapool.attention.kernels import (
    BACKENDS,
    attention_backward,
    attention_forward,
    available_backends,
    local_attention,
    merge_partials,
    select_backend,
)
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


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max|a - ref| / max|ref| over finite reference entries; -inf must match exactly."""
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    assert not torch.isnan(a).any(), "NaN in result"
    fin = torch.isfinite(ref)
    assert torch.equal(fin, torch.isfinite(a)), "the -inf pattern differs from the reference"
    assert torch.equal(ref[~fin], a[~fin]), "non-finite values differ"
    if not fin.any():
        return 0.0
    return ((a[fin] - ref[fin]).abs().max() / ref[fin].abs().max()).item()


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


def _supports_backward(backend: str, device: str, dtype=torch.float32, d: int = 64) -> bool:
    return L._unsupported_reason(backend, torch.device(device), dtype, d, True) is None


# --------------------------------------------------------------------------------------
# reference self-check (so the anchor itself is not trusted blindly)
# --------------------------------------------------------------------------------------


def test_reference_matches_naive_loop():
    g = torch.Generator().manual_seed(1)
    b, sq, sk, hq, hkv, d = 1, 5, 7, 4, 2, 3
    q = torch.randn(b, sq, hq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, sk, hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, sk, hkv, d, generator=g, dtype=torch.float64)
    out, lse = reference_attention(q, k, v, causal=True, softmax_scale=0.7)
    for h in range(hq):
        kh = h // (hq // hkv)
        for i in range(sq):
            keys = [j for j in range(sk) if j <= i + (sk - sq)]
            s = torch.stack([(q[0, i, h] * k[0, j, kh]).sum() * 0.7 for j in keys])
            p = torch.softmax(s, 0)
            o = sum(p[t] * v[0, j, kh] for t, j in enumerate(keys))
            torch.testing.assert_close(out[0, i, h], o)
            torch.testing.assert_close(lse[0, h, i], torch.logsumexp(s, 0))
    # sq > sk: leading rows see nothing
    q2 = torch.randn(1, 7, 2, 3, generator=g, dtype=torch.float64)
    k2 = torch.randn(1, 5, 2, 3, generator=g, dtype=torch.float64)
    out, lse = reference_attention(q2, k2, k2, causal=True)  # sq=7 > sk=5
    assert torch.all(out[:, :2] == 0) and torch.all(torch.isneginf(lse[..., :2]))
    assert torch.isfinite(lse[..., 2:]).all()


# --------------------------------------------------------------------------------------
# every CPU backend against the float64 reference, fp32
# --------------------------------------------------------------------------------------


def test_cpu_backends_present():
    assert "math" in CPU_BACKENDS and "sdpa_flash" in CPU_BACKENDS
    assert set(CPU_BACKENDS) <= set(BACKENDS)
    assert "sdpa_cudnn" not in CPU_BACKENDS and "sdpa_efficient" not in CPU_BACKENDS


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_forward_backward_fp32_cpu(backend, case):
    (q, k, v, dout), kw = make_inputs(case)
    ref_out, ref_lse, ref_dq, ref_dk, ref_dv = reference(case)
    out, lse = attention_forward(q, k, v, backend=backend, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == torch.float32
    assert rel_err(out, ref_out) <= FP32_TOL
    assert rel_err(lse, ref_lse) <= FP32_TOL
    if not _supports_backward(backend, "cpu"):
        with pytest.raises(ValueError, match=backend):
            attention_backward(dout, q, k, v, out, lse, backend=backend, **kw)
        return
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, backend=backend, **kw)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert rel_err(dq, ref_dq) <= FP32_TOL
    assert rel_err(dk, ref_dk) <= FP32_TOL
    assert rel_err(dv, ref_dv) <= FP32_TOL
    if kw["causal"] and q.shape[1] > k.shape[1]:
        n_empty = q.shape[1] - k.shape[1]
        assert torch.all(out[:, :n_empty] == 0) and torch.all(dq[:, :n_empty] == 0)
        assert torch.all(torch.isneginf(lse[..., :n_empty]))


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if _supports_backward(b, "cpu", torch.bfloat16)])
def test_bf16_cpu(backend):
    case = "bottom_right_gqa_d80"
    (q, k, v, dout), kw = make_inputs(case, dtype=torch.bfloat16)
    ref = reference(case, "cpu", torch.bfloat16)
    out, lse = attention_forward(q, k, v, backend=backend, **kw)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    grads = attention_backward(dout, q, k, v, out, lse, backend=backend, **kw)
    for got, want in zip((out, lse, *grads), ref):
        assert rel_err(got, want) <= BF16_TOL


def test_math_chunking(monkeypatch):
    """Small chunks: several query chunks, some fully empty (sq > sk), key ranges cut per chunk."""
    monkeypatch.setattr(L, "MATH_CHUNK_ROWS", 37)
    for case in ("bottom_right_gqa_d80", "empty_rows_gqa"):
        (q, k, v, dout), kw = make_inputs(case)
        ref = reference(case)
        out, lse = attention_forward(q, k, v, backend="math", **kw)
        grads = attention_backward(dout, q, k, v, out, lse, backend="math", **kw)
        for got, want in zip((out, lse, *grads), ref):
            assert rel_err(got, want) <= FP32_TOL
    monkeypatch.setattr(L, "MATH_CHUNK_ELEMENTS", 1)  # forces one row per chunk
    (q, k, v, dout), kw = make_inputs("empty_rows_gqa")
    out, lse = attention_forward(q[:, :64], k[:, :40], v[:, :40], backend="math", **kw)
    ref_out, ref_lse = reference_attention(q[:, :64].double(), k[:, :40].double(), v[:, :40].double(), **kw)
    assert rel_err(out, ref_out) <= FP32_TOL and rel_err(lse, ref_lse) <= FP32_TOL


def test_float64_lse_is_float64():
    (q, k, v, _), kw = make_inputs("empty_rows_gqa", dtype=torch.float64)
    for backend in ("math", "sdpa_flash"):
        out, lse = attention_forward(q, k, v, backend=backend, **kw)
        assert out.dtype == torch.float64 and lse.dtype == torch.float64
        ref_out, ref_lse = reference_attention(q, k, v, **kw)
        assert rel_err(out, ref_out) <= 1e-12 and rel_err(lse, ref_lse) <= 1e-12


def test_no_keys_at_all():
    q = torch.randn(1, 5, 2, 8)
    k = torch.randn(1, 0, 2, 8)
    for causal in (True, False):
        out, lse = attention_forward(q, k, k, causal=causal, backend="math")
        assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
        dq, dk, dv = attention_backward(torch.randn_like(q), q, k, k, out, lse, causal=causal)
        assert torch.all(dq == 0) and dk.shape == k.shape and dv.shape == k.shape


# --------------------------------------------------------------------------------------
# merge_partials and the block decomposition (ring / pool convention)
# --------------------------------------------------------------------------------------


def test_merge_partials_inf_handling():
    b, s, h, d = 1, 4, 2, 3
    out_a, out_b = torch.randn(b, s, h, d), torch.randn(b, s, h, d)
    lse_a, lse_b = torch.randn(b, h, s), torch.randn(b, h, s)
    ninf = float("-inf")
    lse_a[0, 0, 0] = ninf  # only b present
    lse_b[0, 0, 1] = ninf  # only a present
    lse_a[0, 1, 2] = ninf  # neither
    lse_b[0, 1, 2] = ninf
    out, lse = merge_partials(out_a, lse_a, out_b, lse_b)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out[0, 0, 0], out_b[0, 0, 0])
    torch.testing.assert_close(lse[0, 0, 0], lse_b[0, 0, 0])
    torch.testing.assert_close(out[0, 1, 0], out_a[0, 1, 0])
    assert torch.all(out[0, 2, 1] == 0) and lse[0, 1, 2] == ninf
    w_a = torch.exp(lse_a[0, 1, 3] - lse[0, 1, 3])
    w_b = torch.exp(lse_b[0, 1, 3] - lse[0, 1, 3])
    torch.testing.assert_close(out[0, 3, 1], w_a * out_a[0, 3, 1] + w_b * out_b[0, 3, 1])
    assert lse.dtype == torch.float32
    out16, _ = merge_partials(out_a.bfloat16(), lse_a, out_b.bfloat16(), lse_b)
    assert out16.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if _supports_backward(b, "cpu")])
def test_block_decomposition(backend):
    """A query chunk (rows 300..430 of a 749-token causal sequence) against its key prefix
    [0, 431), split into 3 key blocks: two fully visible (non-causal) and a last block with
    sq=131 < sk=181 (bottom-right causal).  Forward by merge, backward with the global
    out/lse per block, summed: both equal the whole attention."""
    g = torch.Generator().manual_seed(3)
    b, hq, hkv, d = 1, 4, 2, 64
    n = 749
    q_all = torch.randn(b, n, hq, d, generator=g, dtype=torch.float64)
    k_all = torch.randn(b, n, hkv, d, generator=g, dtype=torch.float64)
    v_all = torch.randn(b, n, hkv, d, generator=g, dtype=torch.float64)
    rows = slice(300, 431)
    q = q_all[:, rows].float()
    k, v = k_all[:, :431].float(), v_all[:, :431].float()
    dout = torch.randn(b, 131, hq, d, generator=g).float()

    q64, k64, v64 = (x.double().requires_grad_(True) for x in (q, k, v))
    ref_out, ref_lse = reference_attention(q64, k64, v64, causal=True)
    ref_dq, ref_dk, ref_dv = torch.autograd.grad(ref_out, (q64, k64, v64), dout.double())

    blocks = [(0, 150, False), (150, 250, False), (250, 431, True)]
    out = lse = None
    for lo, hi, causal in blocks:
        o, s = attention_forward(q, k[:, lo:hi], v[:, lo:hi], causal=causal, backend=backend)
        out, lse = (o, s) if out is None else merge_partials(out, lse, o, s)
    assert rel_err(out, ref_out) <= FP32_TOL and rel_err(lse, ref_lse) <= FP32_TOL
    full_out, full_lse = attention_forward(q, k, v, causal=True, backend=backend)
    assert rel_err(out, full_out.double()) <= FP32_TOL

    dq = torch.zeros_like(q)
    dks, dvs = [], []
    for lo, hi, causal in blocks:
        gq, gk, gv = attention_backward(dout, q, k[:, lo:hi], v[:, lo:hi], out, lse, causal=causal, backend=backend)
        dq += gq
        dks.append(gk)
        dvs.append(gv)
    assert rel_err(dq, ref_dq) <= FP32_TOL
    assert rel_err(torch.cat(dks, 1), ref_dk) <= FP32_TOL
    assert rel_err(torch.cat(dvs, 1), ref_dv) <= FP32_TOL


def test_backward_uses_given_out_and_lse():
    """With a wrong lse the gradient must change (the kernel must not recompute its own)."""
    (q, k, v, dout), kw = make_inputs("noncausal_gqa_b2")
    for backend in [b for b in CPU_BACKENDS if _supports_backward(b, "cpu")]:
        out, lse = attention_forward(q, k, v, backend=backend, **kw)
        g_ok = attention_backward(dout, q, k, v, out, lse, backend=backend, **kw)
        g_bad = attention_backward(dout, q, k, v, out, lse + 1.0, backend=backend, **kw)
        # exp(s - (lse + 1)) = p / e: dv scales by exactly 1/e
        torch.testing.assert_close(g_bad[2], g_ok[2] / torch.e, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------
# autograd wrapper
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("sq,sk,causal", [(4, 6, True), (6, 4, True), (5, 5, False)])
@pytest.mark.parametrize("backend", ["math", "sdpa_flash", "sdpa_math"])
def test_gradcheck_float64(backend, sq, sk, causal):
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, sq, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, sk, 1, 3, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, sk, 1, 3, generator=g, dtype=torch.float64, requires_grad=True)
    fn = lambda a, b_, c: local_attention(a, b_, c, causal=causal, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_local_attention_matches_functional_and_lse_constant():
    (q, k, v, dout), kw = make_inputs("bottom_right_gqa_d80")
    ref = reference("bottom_right_gqa_d80")
    qg, kg, vg = (x.clone().requires_grad_(True) for x in (q, k, v))
    out, lse = local_attention(qg, kg, vg, return_lse=True, **kw)
    assert not lse.requires_grad and out.requires_grad
    out.backward(dout)
    for got, want in zip((out, lse, qg.grad, kg.grad, vg.grad), ref):
        assert rel_err(got, want) <= FP32_TOL
    with torch.no_grad():
        assert isinstance(local_attention(q, k, v, **kw), torch.Tensor)


# --------------------------------------------------------------------------------------
# backend selection and errors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("requires_backward", [False, True])
def test_auto_on_cpu(dtype, requires_backward):
    q = torch.randn(1, 16, 4, 32, dtype=dtype)
    k = torch.randn(1, 16, 2, 32, dtype=dtype)
    name = select_backend(q, k, k, causal=True, requires_backward=requires_backward)
    assert name in available_backends("cpu")
    assert name == select_backend(q, k, k, causal=False, requires_backward=requires_backward)
    expected = L.AUTO_PREFERENCE[("cpu", {torch.float32: "32", torch.float64: "64"}.get(dtype, "16"), requires_backward)][0]
    assert name == expected
    assert L._unsupported_reason(name, q.device, dtype, 32, requires_backward) is None


def test_explicit_unsupported_backend_raises():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="sdpa_cudnn"):
        attention_forward(q, q, q, causal=True, backend="sdpa_cudnn")
    with pytest.raises(ValueError, match="sdpa_efficient"):
        attention_forward(q, q, q, causal=True, backend="sdpa_efficient")
    with pytest.raises(ValueError, match="unknown"):
        attention_forward(q, q, q, causal=True, backend="no_such_backend")
    out, lse = attention_forward(q, q, q, causal=True, backend="flex")  # forward works on CPU
    with pytest.raises(ValueError, match="flex.*backward"):
        attention_backward(q, q, q, q, out, lse, causal=True, backend="flex")
    with pytest.raises(ValueError, match="flex"):
        local_attention(q.clone().requires_grad_(True), q, q, causal=True, backend="flex")
    if "flash_attn" not in CPU_BACKENDS:
        with pytest.raises(ValueError, match="flash_attn"):
            attention_forward(q, q, q, causal=False, backend="flash_attn")


def test_bad_inputs_raise():
    q = torch.randn(1, 8, 3, 16)
    k = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="multiple"):
        attention_forward(q, k, k, causal=False, backend="math")
    with pytest.raises(ValueError, match="dtype"):
        attention_forward(q, q.double(), q, causal=False)
    with pytest.raises(ValueError, match="4-D"):
        attention_forward(q[0], q[0], q[0], causal=False)
    out, lse = attention_forward(q, q, q, causal=False)
    with pytest.raises(ValueError, match="lse"):
        attention_backward(q, q, q, q, out, lse[..., :4], causal=False)


def test_auto_falls_back_on_kernel_failure(monkeypatch):
    """A kernel that raises under 'auto' is recorded and skipped; explicitly it raises."""
    monkeypatch.setattr(L, "_AUTO_DISABLED", {})

    def broken(*args, **kwargs):
        raise RuntimeError("simulated kernel failure")

    fwd, bwd, br = L._KERNELS["sdpa_flash"]["cpu"]
    monkeypatch.setitem(L._KERNELS["sdpa_flash"], "cpu", (broken, bwd, br))
    (q, k, v, _), kw = make_inputs("noncausal_gqa_b2")
    assert select_backend(q, k, v, causal=False, requires_backward=False) == "sdpa_flash"
    with pytest.warns(RuntimeWarning, match="simulated kernel failure"):
        out, lse = attention_forward(q, k, v, **kw)
    assert rel_err(out, reference("noncausal_gqa_b2")[0]) <= FP32_TOL
    assert any("simulated" in why for why in L.auto_failures().values())
    assert select_backend(q, k, v, causal=False, requires_backward=False) == "math"
    with pytest.raises(RuntimeError, match="simulated"):
        attention_forward(q, k, v, backend="sdpa_flash", **kw)


# --------------------------------------------------------------------------------------
# GPU (run on a CUDA machine: pytest -m gpu tests/attention/test_local.py)
# --------------------------------------------------------------------------------------

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
        pytest.skip(f"{backend} not available: {L._device_unavailable_reason(backend, torch.device('cuda'))}")
    xs, kw = _gpu_inputs(case, torch.bfloat16)
    q, k, v, dout = xs
    reason = L.backend_unsupported_reason(backend, q, k, v, requires_backward=True)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    ref = _gpu_reference(xs, kw)
    out, lse = attention_forward(q, k, v, backend=backend, **kw)
    grads = attention_backward(dout, q, k, v, out, lse, backend=backend, **kw)
    names = ("out", "lse", "dq", "dk", "dv")
    errs = {n: rel_err(got, want) for n, got, want in zip(names, (out, lse, *grads), ref)}
    assert max(errs.values()) <= BF16_TOL, errs


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
    if L.backend_unsupported_reason(backend, q, k, v, requires_backward=True):
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
    errs = [rel_err(a, r) for a, r in zip(got, ref)]
    assert max(errs) <= BF16_TOL, errs


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
    errs = [rel_err(a, r) for a, r in zip((out, lse, *grads), ref)]
    assert max(errs) <= tol, errs


@pytest.mark.gpu
def test_gpu_auto_and_autograd():
    xs, kw = _gpu_inputs("bottom_right_gqa_d128", torch.bfloat16)
    q, k, v, dout = xs
    for rb in (False, True):
        name = select_backend(q, k, v, causal=True, requires_backward=rb)
        assert name in available_backends("cuda")
        assert L.backend_unsupported_reason(name, q, k, v, requires_backward=rb) is None
    assert select_backend(q.float(), k.float(), v.float(), causal=True, requires_backward=True) in ("sdpa_efficient", "flex", "math")
    ref = _gpu_reference(xs, kw)
    qg, kg, vg = (x.clone().requires_grad_(True) for x in (q, k, v))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # an auto fallback would be a bug here
        out = local_attention(qg, kg, vg, **kw)
        out.backward(dout)
    errs = [rel_err(a, r) for a, r in zip((out, qg.grad, kg.grad, vg.grad), (ref[0], *ref[2:]))]
    assert max(errs) <= BF16_TOL, errs
    assert not L.auto_failures(), L.auto_failures()
