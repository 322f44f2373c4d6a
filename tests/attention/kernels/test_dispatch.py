"""The public calls against the dense float64 reference: every CPU backend, empty rows,
``merge_partials`` and the block decomposition (ring / pool convention), the autograd
wrapper, and the errors for bad calls.  Cases and tolerances: ``kernel_cases``."""

from __future__ import annotations

import pytest
import torch

from kernel_cases import BF16_TOL, CASES, CPU_BACKENDS, FP32_TOL, make_inputs, reference, supports_backward
from megatron_fapool.attention.kernels import attention_backward, attention_forward, local_attention, merge_partials
from megatron_fapool.attention.kernels.reference import reference_attention
from megatron_fapool.testing.compare import assert_rel_close


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_forward_backward_fp32_cpu(backend, case):
    (q, k, v, dout), kw = make_inputs(case)
    ref_out, ref_lse, ref_dq, ref_dk, ref_dv = reference(case)
    out, lse = attention_forward(q, k, v, backend=backend, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == torch.float32
    assert_rel_close(out, ref_out, rel=FP32_TOL)
    assert_rel_close(lse, ref_lse, rel=FP32_TOL)
    if not supports_backward(backend, "cpu"):
        with pytest.raises(ValueError, match=backend):
            attention_backward(dout, q, k, v, out, lse, backend=backend, **kw)
        return
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, backend=backend, **kw)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert_rel_close(dq, ref_dq, rel=FP32_TOL)
    assert_rel_close(dk, ref_dk, rel=FP32_TOL)
    assert_rel_close(dv, ref_dv, rel=FP32_TOL)
    if kw["causal"] and q.shape[1] > k.shape[1]:
        n_empty = q.shape[1] - k.shape[1]
        assert torch.all(out[:, :n_empty] == 0) and torch.all(dq[:, :n_empty] == 0)
        assert torch.all(torch.isneginf(lse[..., :n_empty]))


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if supports_backward(b, "cpu", torch.bfloat16)])
def test_bf16_cpu(backend):
    case = "bottom_right_gqa_d80"
    (q, k, v, dout), kw = make_inputs(case, dtype=torch.bfloat16)
    ref = reference(case, "cpu", torch.bfloat16)
    out, lse = attention_forward(q, k, v, backend=backend, **kw)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    grads = attention_backward(dout, q, k, v, out, lse, backend=backend, **kw)
    for got, want in zip((out, lse, *grads), ref):
        assert_rel_close(got, want, rel=BF16_TOL)


def test_float64_lse_is_float64():
    (q, k, v, _), kw = make_inputs("empty_rows_gqa", dtype=torch.float64)
    for backend in ("math", "sdpa_flash"):
        out, lse = attention_forward(q, k, v, backend=backend, **kw)
        assert out.dtype == torch.float64 and lse.dtype == torch.float64
        ref_out, ref_lse = reference_attention(q, k, v, **kw)
        assert_rel_close(out, ref_out, rel=1e-12)
        assert_rel_close(lse, ref_lse, rel=1e-12)


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


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if supports_backward(b, "cpu")])
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
    assert_rel_close(out, ref_out, rel=FP32_TOL)
    assert_rel_close(lse, ref_lse, rel=FP32_TOL)
    full_out, full_lse = attention_forward(q, k, v, causal=True, backend=backend)
    assert_rel_close(out, full_out, rel=FP32_TOL)

    dq = torch.zeros_like(q)
    dks, dvs = [], []
    for lo, hi, causal in blocks:
        gq, gk, gv = attention_backward(dout, q, k[:, lo:hi], v[:, lo:hi], out, lse, causal=causal, backend=backend)
        dq += gq
        dks.append(gk)
        dvs.append(gv)
    assert_rel_close(dq, ref_dq, rel=FP32_TOL)
    assert_rel_close(torch.cat(dks, 1), ref_dk, rel=FP32_TOL)
    assert_rel_close(torch.cat(dvs, 1), ref_dv, rel=FP32_TOL)


def test_backward_uses_given_out_and_lse():
    """With a wrong lse the gradient must change (the kernel must not recompute its own)."""
    (q, k, v, dout), kw = make_inputs("noncausal_gqa_b2")
    for backend in [b for b in CPU_BACKENDS if supports_backward(b, "cpu")]:
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
        assert_rel_close(got, want, rel=FP32_TOL)
    with torch.no_grad():
        assert isinstance(local_attention(q, k, v, **kw), torch.Tensor)


# --------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------


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
