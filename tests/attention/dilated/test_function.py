"""The autograd Function: the kernel calls it makes, the covering branch first, and the
fast path (strided views, no index gathers) wherever the branch allows it."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from megatron_fapool.attention.dilated import blocks, check_dilated_args, dilated_attention, function
from megatron_fapool.attention.dilated import dilated_attention_reference_vjp
from megatron_fapool.testing.compare import assert_rel_close


def make_qkv(b, n, h, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, h, d, generator=g, dtype=torch.float64).float() for _ in range(4)]


def _count_calls(monkeypatch):
    calls = Counter()
    fwd = function.attention_forward

    def counting(q, k, v, **kw):
        calls[(q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], kw["causal"])] += 1
        return fwd(q, k, v, **kw)

    monkeypatch.setattr(function, "attention_forward", counting)
    return calls


@pytest.mark.parametrize("max_view", [None, 64 * 4 * 8])
def test_kernel_calls_lists_the_calls_the_forward_makes(monkeypatch, max_view):
    n, h, d, segs, rates = 300, 4, 8, (64, 100, 256), (1, 2, 4)
    calls = _count_calls(monkeypatch)
    q, k, v, _ = make_qkv(1, n, h, d)
    dilated_attention(q, k, v, segs, rates, max_rows_x_heads=500, max_view_elements=max_view)
    args = check_dilated_args(q, k, v, segs, rates)
    planned = Counter(function.kernel_calls(n, args, h, d, 500, max_view))
    assert calls == planned
    assert sum(planned.values()) > len(segs)  # the limits really split calls


def test_view_chunking_and_covering_branch_order_give_the_same_result():
    # A rate-1 branch listed last still runs first (it starts the accumulators); a tiny
    # view limit splits it into many calls that are copied into place.
    n, segs, rates = 600, (256, 64), (4, 1)
    q, k, v, do = make_qkv(1, n, 4, 8)
    results = []
    for max_view in (None, 64 * 4 * 8):
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        out = dilated_attention(qq, kk, vv, segs, rates, max_view_elements=max_view)
        out.backward(do)
        results.append((out, qq.grad, kk.grad, vv.grad))
    ref = dilated_attention_reference_vjp(do, q, k, v, segs, rates, True)
    for a, b, r in zip(*results, ref):
        assert_rel_close(a, b, rel=1e-6)
        assert_rel_close(a, r, rel=1e-5)


def test_no_index_gather_on_the_fast_path(monkeypatch):
    # The index path's gathers/scatters must not run when every branch has stacks.
    def boom(*a, **kw):
        raise AssertionError("index path used")

    monkeypatch.setattr(function, "blocks_forward_", boom)
    monkeypatch.setattr(function, "blocks_backward_", boom)
    monkeypatch.setattr(blocks, "gather_blocks", boom)
    q, k, v, do = make_qkv(2, 333, 5, 8)
    q.requires_grad_()
    out = dilated_attention(q, k, v, (64, 100, 1000), (1, 3, 8))
    out.backward(do)
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
