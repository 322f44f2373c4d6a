"""Gather-free stacks: the strided views hold exactly the definition's blocks, and GQA
runs through them when the offset classes cover whole kv groups."""

from __future__ import annotations

import pytest
import torch

from megatron_fapool.attention.dilated import dilated_attention, dilated_attention_reference_vjp
from megatron_fapool.attention.dilated.plan import plan_branch
from megatron_fapool.attention.dilated.strided import plan_stacks, stack_chunks, stack_view, to_blocks
from megatron_fapool.testing.compare import assert_rel_close


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
    for name, a, r in zip(("out", "dq", "dk", "dv"), (out, q.grad, k.grad, v.grad), ref):
        assert_rel_close(a, r, rel=1e-5, msg=name)


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
