"""The chunked ``math`` backend: chunk boundaries, empty chunks, key ranges cut per chunk."""

from __future__ import annotations

from kernel_cases import FP32_TOL, make_inputs, reference
from megatron_fapool.attention.kernels import attention_backward, attention_forward
from megatron_fapool.attention.kernels import math as M
from megatron_fapool.attention.kernels.reference import reference_attention
from megatron_fapool.testing.compare import assert_rel_close


def test_math_chunking(monkeypatch):
    """Small chunks: several query chunks, some fully empty (sq > sk), key ranges cut per chunk."""
    monkeypatch.setattr(M, "MATH_CHUNK_ROWS", 37)
    for case in ("bottom_right_gqa_d80", "empty_rows_gqa"):
        (q, k, v, dout), kw = make_inputs(case)
        ref = reference(case)
        out, lse = attention_forward(q, k, v, backend="math", **kw)
        grads = attention_backward(dout, q, k, v, out, lse, backend="math", **kw)
        for got, want in zip((out, lse, *grads), ref):
            assert_rel_close(got, want, rel=FP32_TOL)
    monkeypatch.setattr(M, "MATH_CHUNK_ELEMENTS", 1)  # forces one row per chunk
    (q, k, v, dout), kw = make_inputs("empty_rows_gqa")
    out, lse = attention_forward(q[:, :64], k[:, :40], v[:, :40], backend="math", **kw)
    ref_out, ref_lse = reference_attention(q[:, :64].double(), k[:, :40].double(), v[:, :40].double(), **kw)
    assert_rel_close(out, ref_out, rel=FP32_TOL)
    assert_rel_close(lse, ref_lse, rel=FP32_TOL)
