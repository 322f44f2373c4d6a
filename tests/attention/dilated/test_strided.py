"""Gather-free stacks: the strided views hold exactly the definition's blocks, and the
fast path is what runs (no index gathers) wherever it can express the branch."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from megatron_fapool.attention.dilated import local as DL
from megatron_fapool.attention import kernels as L
from megatron_fapool.attention.dilated import dilated_attention, dilated_attention_reference_vjp
from megatron_fapool.attention.dilated.args import check_dilated_args
from megatron_fapool.attention.dilated.plan import plan_branch
from megatron_fapool.attention.dilated.strided import plan_stacks, stack_chunks, stack_view, to_blocks


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def make_qkv(b, n, h, d, hkv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(b, n, h, d), (b, n, hkv or h, d), (b, n, hkv or h, d), (b, n, h, d)]
    return [torch.randn(*s, generator=g, dtype=torch.float64).float() for s in shapes]


def check_against_reference(n, h, d, segs, rates, causal, *, hkv=None, b=1):
    q, k, v, do = make_qkv(b, n, h, d, hkv)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = dilated_attention(q, k, v, segs, rates, causal)
    out.backward(do)
    ref = dilated_attention_reference_vjp(do, q.detach(), k.detach(), v.detach(), segs, rates, causal)
    errs = [rel_err(a, r) for a, r in zip((out, q.grad, k.grad, v.grad), ref)]
    assert max(errs) <= 1e-5, errs

# (n, w, r, total heads, first head, local heads): partial last segments, w > n, r > H,
# r not dividing H, r > w, head subsets with global offsets.
CASES = [
    (29, 8, 3, 5, 0, 5),
    (40, 100, 4, 3, 0, 3),
    (33, 10, 1, 2, 0, 2),
    (50, 12, 16, 4, 0, 4),
    (30, 12, 4, 6, 2, 3),
    (64, 16, 4, 8, 0, 8),
    (7, 4, 8, 8, 0, 8),
    (64, 16, 2, 5, 1, 3),
]


def block_sets_from_stacks(n, w, r, total, first, heads):
    """{(head, (positions...))} of every dense block, read through the views."""
    ids = torch.arange(n * heads).view(1, n, heads, 1)
    out = []
    for stack in plan_stacks(n, w, r, total, first, heads):
        for chunk in stack_chunks(stack, 1, 3, 5):  # tiny limits: many chunks
            blocks = to_blocks(stack_view(ids, chunk))[..., 0]  # [count, m, heads]
            for blk in blocks:
                for c in range(blk.shape[1]):
                    col = blk[:, c]
                    hs = {int(x) % heads for x in col}
                    assert len(hs) == 1
                    out.append((hs.pop(), tuple(int(x) // heads for x in col)))
    return out


def block_sets_from_index_plan(n, w, r, total, first, heads):
    out = []
    for g in plan_branch(n, w, r, total_heads=total, first_head=first, num_heads=heads, causal=True):
        for j in range(g.num_blocks):
            for c, h in enumerate(g.q_heads[j].tolist()):
                out.append((h, tuple(int(x) for x in g.q_rows[j])))
    return out


@pytest.mark.parametrize("n,w,r,total,first,heads", CASES)
def test_stacks_hold_exactly_the_index_plan_blocks(n, w, r, total, first, heads):
    got = block_sets_from_stacks(n, w, r, total, first, heads)
    assert len(got) == len(set(got))
    assert sorted(got) == sorted(block_sets_from_index_plan(n, w, r, total, first, heads))


def test_paper_shapes_are_one_stack_per_branch_with_all_heads():
    # h 32, w = 2048 r: every branch is ONE call shape [n/w, 2048, 32 heads]: the r offset
    # classes stack in the head dimension.
    n = 1 << 17
    for r in (1, 2, 4, 8, 16):
        (stack,) = plan_stacks(n, 2048 * r, r, 32, 0, 32)
        assert (stack.m, stack.heads, stack.count, stack.classes) == (2048, 32, n // (2048 * r), r)
    # The r = 1 call needs no copy: its blocks are a view of q.
    q = torch.zeros(1, 4096, 4, 8)
    (stack,) = plan_stacks(4096, 2048, 1, 4, 0, 4)
    assert to_blocks(stack_view(q, stack)).data_ptr() == q.data_ptr()


def test_gqa_uses_stacks_when_classes_cover_whole_kv_groups():
    assert plan_stacks(64, 16, 2, 8, 0, 8, 2) is not None  # classes of 4 heads, groups of 2
    assert plan_stacks(64, 16, 4, 6, 0, 6, 2) is not None  # classes {0,1},{2,3},{4,5}, groups of 2
    assert plan_stacks(64, 16, 4, 6, 0, 6, 3) is None  # classes of 2 heads cut groups of 3


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_gqa_fast_path_matches_reference(causal):
    # 8 query heads over 4 kv heads: rates 2 and 4 give classes of 4 and 2 heads, whole
    # kv groups, so every branch runs through the strided views (GQA-native kernel calls).
    check_against_reference(200, 8, 8, (16, 50, 96), (1, 2, 4), causal, hkv=4, b=2)


def _count_calls(monkeypatch):
    calls = Counter()
    fwd = L.attention_forward

    def counting(q, k, v, **kw):
        calls[(q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], kw["causal"])] += 1
        return fwd(q, k, v, **kw)

    monkeypatch.setattr(DL, "attention_forward", counting)
    return calls


@pytest.mark.parametrize("max_view", [None, 64 * 4 * 8])
def test_kernel_calls_lists_the_calls_the_forward_makes(monkeypatch, max_view):
    n, h, d, segs, rates = 300, 4, 8, (64, 100, 256), (1, 2, 4)
    calls = _count_calls(monkeypatch)
    q, k, v, _ = make_qkv(1, n, h, d)
    dilated_attention(q, k, v, segs, rates, max_rows_x_heads=500, max_view_elements=max_view)
    args = check_dilated_args(q, k, v, segs, rates, None, 0, None)
    planned = Counter(DL.kernel_calls(n, args, h, d, True, 500, max_view))
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
        assert rel_err(a, b) <= 1e-6 and rel_err(a, r) <= 1e-5


def test_no_index_gather_on_the_fast_path(monkeypatch):
    # The index path's gathers/scatters must not run when every branch has stacks.
    import megatron_fapool.attention.dilated.blocks as B

    def boom(*a, **kw):
        raise AssertionError("index path used")

    monkeypatch.setattr(DL, "blocks_forward_", boom)
    monkeypatch.setattr(DL, "blocks_backward_", boom)
    monkeypatch.setattr(B, "gather_blocks", boom)
    q, k, v, do = make_qkv(2, 333, 5, 8)
    q.requires_grad_()
    out = dilated_attention(q, k, v, (64, 100, 1000), (1, 3, 8))
    out.backward(do)
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
