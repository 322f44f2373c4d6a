"""dilated_attention against the float64 definition (DESIGN.md §4, §7)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_fapool.attention.dilated import (
    dilated_attention,
    dilated_attention_reference,
    dilated_attention_reference_vjp,
)
from megatron_fapool.attention.dilated.plan import effective_segment, head_offset
from megatron_fapool.testing.compare import assert_rel_close, rel_err

TOL = 1e-5  # fp32 bar: max|a - b| <= TOL * max|ref|


def make_qkv(b, n, h, d, hkv=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, h, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, n, hkv or h, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, n, hkv or h, d, generator=g, dtype=torch.float64)
    do = torch.randn(b, n, h, d, generator=g, dtype=torch.float64)
    return [x.to(dtype) for x in (q, k, v, do)]


def check_against_reference(n, h, d, segs, rates, causal, *, hkv=None, b=1, head_offset=0, total_heads=None, **kw):
    q, k, v, do = make_qkv(b, n, h, d, hkv)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = dilated_attention(q, k, v, segs, rates, causal, head_offset=head_offset, total_heads=total_heads, **kw)
    out.backward(do)
    ref_kw = dict(head_offset=head_offset, total_heads=total_heads)
    ref, rdq, rdk, rdv = dilated_attention_reference_vjp(
        do, q.detach(), k.detach(), v.detach(), segs, rates, causal, **ref_kw
    )
    assert out.dtype == torch.float32 and out.shape == q.shape
    for name, a, r in (("out", out, ref), ("dq", q.grad, rdq), ("dk", k.grad, rdk), ("dv", v.grad, rdv)):
        assert_rel_close(a, r, rel=TOL, msg=name)
    return out, ref


# n not a multiple of any w or of 128; r not dividing H; r > H; w > n.
AWKWARD = [
    pytest.param(749, 5, (64, 200, 1000), (1, 3, 8), id="n749-H5-r3-r8-w>n"),
    pytest.param(1000, 4, (96, 384, 640), (2, 8, 3), id="n1000-H4-no-r1-branch"),
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("n,h,segs,rates", AWKWARD)
def test_matches_reference_awkward_shapes(n, h, segs, rates, causal):
    check_against_reference(n, h, 16, segs, rates, causal, b=2)


def test_matches_reference_at_4096():
    # 4096 is not a multiple of 1000 or 3000; 5000 > n; r=16 > H=3; r=2 does not divide 3.
    check_against_reference(4096, 3, 16, (512, 1000, 3000, 5000), (1, 2, 5, 16), True)


def test_gqa_with_offset_classes_across_kv_groups():
    # 6 query heads over 2 kv heads; with r=4 the offset classes {0,1},{2,3},{4,5} cut kv groups.
    check_against_reference(300, 6, 8, (40, 130), (1, 4), True, hkv=2)


def test_head_subset_matches_slice_of_all_heads():
    # A rank holding global heads 3..5 of 8 computes exactly those heads of the full result.
    n, segs, rates = 257, (32, 100), (2, 5)
    q, k, v, _ = make_qkv(1, n, 8, 8)
    full = dilated_attention(q, k, v, segs, rates)
    part = dilated_attention(q[:, :, 3:6], k[:, :, 3:6], v[:, :, 3:6], segs, rates, head_offset=3, total_heads=8)
    assert_rel_close(part, full[:, :, 3:6], rel=TOL)
    check_against_reference(n, 3, 8, segs, rates, True, head_offset=3, total_heads=8)
    # Offsets really depend on the global index: treating the subset as heads 0..2 differs.
    wrong = dilated_attention(q[:, :, 3:6], k[:, :, 3:6], v[:, :, 3:6], segs, rates)
    assert rel_err(wrong, full[:, :, 3:6]) > 0.1


def test_kernel_call_chunking_gives_same_result():
    n, segs, rates = 600, (64, 256), (1, 4)
    q, k, v, do = make_qkv(1, n, 4, 8)
    results = []
    for max_rows in (None, 100):  # 100 rows x heads per call forces many small calls
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        out = dilated_attention(qq, kk, vv, segs, rates, max_rows_x_heads=max_rows)
        out.backward(do)
        results.append((out, qq.grad, kk.grad, vv.grad))
    for a, b in zip(*results):
        assert_rel_close(a, b, rel=TOL)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_gradcheck_float64_tiny(causal):
    # 3 heads with r=2 (offset classes of 2 and 1 heads), w=20 > n, a partial last segment.
    q, k, v, _ = make_qkv(1, 14, 3, 2, dtype=torch.float64, seed=3)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    # The math kernel: the CPU flash kernel costs ~1 ms a call, gradcheck makes thousands.
    fn = lambda a, b, c: dilated_attention(a, b, c, (4, 6, 20), (1, 2, 4), causal, backend="math")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_causal_leak_changing_token_j_leaves_earlier_outputs_bit_identical():
    n, j, segs, rates = 300, 170, (32, 96, 400), (1, 2, 4)
    q, k, v, _ = make_qkv(1, n, 4, 8)
    out = dilated_attention(q, k, v, segs, rates, True)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x in (q2, k2, v2):
        x[:, j] += 10.0
    out2 = dilated_attention(q2, k2, v2, segs, rates, True)
    assert torch.equal(out[:, :j], out2[:, :j])
    assert not torch.equal(out[:, j:], out2[:, j:])  # the change is visible from j on
    # Without the causal mask the change leaks backwards (so the check above can fail).
    full = dilated_attention(q, k, v, segs, rates, False)
    full2 = dilated_attention(q2, k2, v2, segs, rates, False)
    assert not torch.equal(full[:, :j], full2[:, :j])


def test_rows_without_keys_output_zero_with_zero_gradient():
    # Only a dilated branch (r=4): head 0 (offset 0) sees rows l % 4 == 0 only.
    n = 50
    q, k, v, do = make_qkv(1, n, 2, 8)
    q.requires_grad_()
    out, lse = dilated_attention(q, k, v, (20,), (4,), return_lse=True)
    out.backward(do)
    l = torch.arange(n) % 20
    off = torch.tensor([head_offset(h, 2, 4) for h in range(2)])
    empty = (l[:, None] % 4) != off[None, :]  # [n, H]
    assert empty.any() and (~empty).any()
    assert torch.equal(out[0][empty], torch.zeros_like(out[0][empty]))
    assert torch.isneginf(lse[0].t()[empty]).all() and torch.isfinite(lse[0].t()[~empty]).all()
    assert torch.equal(q.grad[0][empty], torch.zeros_like(q.grad[0][empty]))
    assert (out[0][~empty].abs().sum(-1) > 0).all()


def test_multiplicity_counts_keys_in_several_branches_twice():
    # Two identical branches double every key: same softmax as one branch (log 2 cancels);
    # a dilated branch on top re-weights only its keys, unlike a plain union of masks.
    q, k, v, _ = make_qkv(1, 40, 2, 8, dtype=torch.float64)
    one = dilated_attention(q, k, v, (16,), (1,))
    two = dilated_attention(q, k, v, (16, 16), (1, 1))
    assert_rel_close(two, one, rel=1e-12)
    mixed = dilated_attention(q, k, v, (16, 16), (1, 2))
    ref, _ = dilated_attention_reference(q, k, v, (16, 16), (1, 2))
    assert_rel_close(mixed, ref, rel=1e-12)
    assert rel_err(mixed, one) > 1e-3


def _row_reference(q, k, v, rows, segs, rates, causal, scale):
    """Output rows of head 0 straight from the definition, O(n) per row (for large n)."""
    n = q.shape[1]
    j = torch.arange(n)
    outs = []
    for i in rows:
        count = torch.zeros(n, dtype=torch.float64)
        for w, r in zip(segs, rates):
            seg = effective_segment(w, n)
            s = head_offset(0, q.shape[2], r)
            if (i % seg) % r != s:
                continue
            keep = (j // seg == i // seg) & ((j % seg) % r == s) & ((j <= i) if causal else True)
            count += keep.double()
        logits = (k[0, :, 0].double() @ q[0, i, 0].double()) * scale + count.log()
        outs.append(torch.softmax(logits, 0) @ v[0, :, 0].double() if count.any() else torch.zeros(q.shape[3]))
    return torch.stack(outs)


def test_long_sequence_without_quadratic_memory():
    # n = 131072 with a branch as long as the sequence: a dense n x n fp32 buffer would
    # be 64 GiB; the block kernel needs O(n) and checks out against the definition.
    n, segs, rates = 131072, (256, 131072), (1, 64)
    q, k, v, _ = make_qkv(1, n, 1, 8)
    out = dilated_attention(q, k, v, segs, rates)
    rows = [0, 1, 255, 256, 4095, 4096, 100000, n - 64, n - 1]
    ref = _row_reference(q, k, v, rows, segs, rates, True, 1 / math.sqrt(8))
    assert_rel_close(out[0, rows, 0], ref, rel=TOL)


def test_bfloat16_runs_and_stays_within_bf16_bar():
    q, k, v, do = make_qkv(1, 333, 4, 16, dtype=torch.bfloat16)
    q.requires_grad_()
    out = dilated_attention(q, k, v, (64, 200), (1, 4))
    out.backward(do)
    ref, rdq, _, _ = dilated_attention_reference_vjp(do, q.detach(), k, v, (64, 200), (1, 4))
    assert out.dtype == torch.bfloat16 and q.grad.dtype == torch.bfloat16
    assert_rel_close(out, ref, rel=2.5e-2)
    assert_rel_close(q.grad, rdq, rel=2.5e-2)


def test_short_sequence_gqa_several_branches_matches_reference():
    # Found through the model: a sequence shorter than every segment, GQA, several branches.
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 100, 4, 16, generator=g)
    k = torch.randn(2, 100, 2, 16, generator=g)
    v = torch.randn(2, 100, 2, 16, generator=g)
    out = dilated_attention(q, k, v, (128, 256, 512), (1, 2, 4))
    ref, _ = dilated_attention_reference(q.double(), k.double(), v.double(), (128, 256, 512), (1, 2, 4))
    assert_rel_close(out, ref, rel=1e-5)
