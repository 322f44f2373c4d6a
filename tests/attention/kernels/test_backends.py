"""Backend tables and ``auto``: which backends exist, what ``auto`` picks, what it remembers."""

from __future__ import annotations

import pytest
import torch

from kernel_cases import CPU_BACKENDS, FP32_TOL, make_inputs, reference
from megatron_fapool.attention.kernels import (
    BACKENDS,
    BackendSelector,
    attention_forward,
    auto_failures,
    available_backends,
    local_attention,
    select_backend,
)
from megatron_fapool.attention.kernels import backends as B
from megatron_fapool.attention.kernels import dispatch as D
from megatron_fapool.config.schema import ATTENTION_BACKENDS
from megatron_fapool.testing.compare import assert_rel_close


def test_backend_names_come_from_the_config_schema():
    assert BACKENDS == tuple(n for n in ATTENTION_BACKENDS if n != "auto")
    assert set(D._KERNELS) == set(BACKENDS)


def test_cpu_backends_present():
    assert "math" in CPU_BACKENDS and "sdpa_flash" in CPU_BACKENDS
    assert set(CPU_BACKENDS) <= set(BACKENDS)
    assert "sdpa_cudnn" not in CPU_BACKENDS and "sdpa_efficient" not in CPU_BACKENDS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("requires_backward", [False, True])
def test_auto_on_cpu(dtype, requires_backward):
    q = torch.randn(1, 16, 4, 32, dtype=dtype)
    k = torch.randn(1, 16, 2, 32, dtype=dtype)
    name = select_backend(q, k, k, causal=True, requires_backward=requires_backward)
    assert name in available_backends("cpu")
    assert name == select_backend(q, k, k, causal=False, requires_backward=requires_backward)
    expected = B.AUTO_PREFERENCE[("cpu", {torch.float32: "32", torch.float64: "64"}.get(dtype, "16"), requires_backward)][0]
    assert name == expected
    assert B._unsupported_reason(name, q.device, dtype, 32, requires_backward) is None


def _broken(*args, **kwargs):
    raise RuntimeError("simulated kernel failure")


def test_auto_falls_back_on_kernel_failure(monkeypatch):
    """A kernel that raises under 'auto' is recorded in the selector and skipped; explicitly it raises."""
    fwd, bwd, br = D._KERNELS["sdpa_flash"]["cpu"]
    monkeypatch.setitem(D._KERNELS["sdpa_flash"], "cpu", (_broken, bwd, br))
    (q, k, v, _), kw = make_inputs("noncausal_gqa_b2")
    selector = BackendSelector()
    assert select_backend(q, k, v, causal=False, requires_backward=False, selector=selector) == "sdpa_flash"
    with pytest.warns(RuntimeWarning, match="simulated kernel failure"):
        out, lse = attention_forward(q, k, v, selector=selector, **kw)
    assert_rel_close(out, reference("noncausal_gqa_b2")[0], rel=FP32_TOL)
    assert any("simulated" in why for why in auto_failures(selector).values())
    assert select_backend(q, k, v, causal=False, requires_backward=False, selector=selector) == "math"
    # the memory is the selector's: a call without one starts afresh (and falls back again)
    assert select_backend(q, k, v, causal=False, requires_backward=False) == "sdpa_flash"
    with pytest.warns(RuntimeWarning, match="simulated kernel failure"):
        attention_forward(q, k, v, **kw)
    with pytest.raises(RuntimeError, match="simulated"):
        attention_forward(q, k, v, backend="sdpa_flash", **kw)


def test_local_attention_backward_falls_back_into_the_same_selector(monkeypatch):
    fwd, bwd, br = D._KERNELS["sdpa_flash"]["cpu"]
    monkeypatch.setitem(D._KERNELS["sdpa_flash"], "cpu", (fwd, _broken, br))
    case = "noncausal_gqa_b2"
    (q, k, v, dout), kw = make_inputs(case)
    qg, kg, vg = (x.clone().requires_grad_(True) for x in (q, k, v))
    selector = BackendSelector()
    out = local_attention(qg, kg, vg, selector=selector, **kw)
    with pytest.warns(RuntimeWarning, match="simulated kernel failure"):
        out.backward(dout)
    for got, want in zip((qg.grad, kg.grad, vg.grad), reference(case)[2:]):
        assert_rel_close(got, want, rel=FP32_TOL)
    assert [key[3:] for key in selector.failures()] == [("sdpa_flash", "bwd")]
