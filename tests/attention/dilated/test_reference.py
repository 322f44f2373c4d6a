"""The float64 reference itself: LongNet's branch-wise form and autograd agree with it."""

from __future__ import annotations

import math

import torch

from megatron_fapool.attention.dilated import dilated_attention_reference, dilated_attention_reference_vjp
from megatron_fapool.attention.dilated.plan import effective_segment, head_offset
from megatron_fapool.attention.dilated.reference import dilated_multiplicity
from megatron_fapool.testing.compare import assert_rel_close


def branchwise_longnet(q, k, v, segs, rates, causal):
    """LongNet: softmax inside each branch's sparse key set, branches merged by their lse."""
    b, n, hq, d = q.shape
    idx = torch.arange(n)
    outs, lses = [], []
    for w, r in zip(segs, rates):
        seg = effective_segment(w, n)
        out_k = torch.zeros(b, n, hq, d, dtype=torch.float64)
        lse_k = torch.full((b, n, hq), float("-inf"), dtype=torch.float64)
        for h in range(hq):
            sel = ((idx % seg) % r) == head_offset(h, hq, r)
            mask = (idx[:, None] // seg == idx[None, :] // seg) & sel[:, None] & sel[None, :]
            if causal:
                mask &= idx[None, :] <= idx[:, None]
            logits = (q[:, :, h] @ k[:, :, h].transpose(1, 2)) / math.sqrt(d)
            logits = logits.masked_fill(~mask, float("-inf"))
            rows = mask.any(1)
            lse_k[:, rows, h] = torch.logsumexp(logits[:, rows], -1)
            out_k[:, rows, h] = torch.softmax(logits[:, rows], -1) @ v[:, :, h]
        outs.append(out_k)
        lses.append(lse_k)
    lse = torch.logsumexp(torch.stack(lses), 0)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return sum(torch.exp(l - safe)[..., None] * o for o, l in zip(outs, lses)), lse


def test_definition_equals_longnet_branchwise_lse_merge():
    g = torch.Generator().manual_seed(0)
    for causal in (True, False):
        q, k, v = (torch.randn(2, 61, 5, 4, dtype=torch.float64, generator=g) for _ in range(3))
        segs, rates = (8, 20, 100), (1, 3, 8)
        out, lse = dilated_attention_reference(q, k, v, segs, rates, causal)
        out_b, lse_b = branchwise_longnet(q, k, v, segs, rates, causal)
        assert_rel_close(out, out_b, rel=1e-12)
        assert torch.equal(torch.isfinite(lse), torch.isfinite(lse_b.transpose(1, 2)))


def test_multiplicity_of_a_small_case_by_hand():
    # n=6, one branch w=4 r=2, head 1 of 2 (offset 1): segments [0..3], [4,5];
    # rows/keys with l % 2 == 1 are positions 1, 3 and 5.
    c = dilated_multiplicity(6, (4,), (2,), global_head=1, total_heads=2, causal=True)
    expected = torch.zeros(6, 6, dtype=torch.int32)
    expected[1, 1] = expected[3, 1] = expected[3, 3] = expected[5, 5] = 1
    assert torch.equal(c, expected)
    # A second, dense branch adds one to every causal pair in its segments of 3.
    c2 = dilated_multiplicity(6, (4, 3), (2, 1), global_head=1, total_heads=2, causal=True)
    assert c2[3, 3] == 2 and c2[4, 3] == 1 and c2[3, 1] == 1 and c2[3, 2] == 0


def test_vjp_equals_autograd_of_the_reference_forward():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 37, 4, 8, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(1, 37, 2, 8, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(1, 37, 2, 8, dtype=torch.float64, generator=g, requires_grad=True)
    do = torch.randn(1, 37, 4, 8, dtype=torch.float64, generator=g)
    segs, rates = (8, 30), (1, 3)  # an r=1 branch: every row has a key (autograd NaN-free)
    out, _ = dilated_attention_reference(q, k, v, segs, rates, True, head_offset=1, total_heads=6)
    grads = torch.autograd.grad(out, (q, k, v), do)
    out2, *vjp = dilated_attention_reference_vjp(do, q, k, v, segs, rates, True, head_offset=1, total_heads=6)
    assert_rel_close(out2, out, rel=1e-14)
    for a, b in zip(vjp, grads):
        assert_rel_close(a, b, rel=1e-12)
