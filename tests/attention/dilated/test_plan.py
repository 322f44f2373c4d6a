"""Block plans: every attended (query, key, head) triple is the definition's, exactly once."""

from __future__ import annotations

import pytest
import torch

from megatron_fapool.attention.dilated.plan import (
    DEVICE_PLAN_CACHE_SIZE,
    _plan_branch_on_device,
    block_len,
    ceil_div,
    dilated_attention_flops,
    offset_classes,
    plan_branch,
    segment_runs,
)
from megatron_fapool.attention.dilated.reference import dilated_multiplicity


def test_offset_classes_use_global_heads():
    assert offset_classes(3, 5, 0, 5) == [(0, 0, 2), (1, 2, 4), (2, 4, 5)]  # ceil(5/3) = 2
    assert offset_classes(3, 5, 3, 2) == [(1, 0, 1), (2, 1, 2)]  # heads 3, 4 of 5
    assert offset_classes(8, 3, 0, 3) == [(0, 0, 1), (1, 1, 2), (2, 2, 3)]  # r > H
    assert offset_classes(1, 4, 0, 4) == [(0, 0, 4)]


def attended_triples(groups, key_position=lambda rows, heads: rows):
    """{(query pos, key pos, head)} from the plan, applying the bottom-right causal rule."""
    out = []
    for g in groups:
        for j in range(g.num_blocks):
            nq, nk = g.q_len, g.k_len
            keys = key_position(g.k_rows[j], g.k_heads[j])
            for c, h in enumerate(g.q_heads[j].tolist()):
                for t in range(nq):
                    limit = t + nk - nq if g.causal else nk - 1
                    for u in range(limit + 1):
                        out.append((int(g.q_rows[j, t]), int(keys[u] if keys.dim() == 1 else keys[u, c]), h))
    return out


def definition_triples(n, w, r, total_heads, first_head, num_heads, causal, rows=None):
    out = []
    for h in range(num_heads):
        c = dilated_multiplicity(n, (w,), (r,), global_head=first_head + h, total_heads=total_heads, causal=causal)
        for i, j in c.nonzero().tolist():
            if rows is None or rows[0] <= i < rows[1]:
                out.append((i, j, h))
    return out


CASES = [(29, 8, 3, 5, True), (29, 8, 3, 5, False), (40, 100, 4, 3, True), (33, 10, 1, 2, True), (50, 12, 16, 4, False)]


@pytest.mark.parametrize("n,w,r,heads,causal", CASES)
def test_single_process_plan_covers_the_definition_exactly(n, w, r, heads, causal):
    groups = plan_branch(n, w, r, total_heads=heads, causal=causal)
    got = attended_triples(groups)
    assert len(got) == len(set(got))
    assert sorted(got) == sorted(definition_triples(n, w, r, heads, 0, heads, causal))
    assert max(g.q_len for g in groups) <= ceil_div(min(w, n), r)  # dense blocks of ~w/r


def test_head_subset_plan_uses_global_offsets():
    groups = plan_branch(30, 12, 4, total_heads=6, first_head=2, num_heads=3, causal=True)
    assert sorted(attended_triples(groups)) == sorted(definition_triples(30, 12, 4, 6, 2, 3, True))


def test_gqa_plan_reads_the_key_head_of_each_query_head():
    # 6 query heads over 2 kv heads, r=4: offset classes {0,1},{2,3},{4,5} cut kv groups.
    groups = plan_branch(30, 12, 4, total_heads=6, kv_group=3, causal=True)
    assert sorted(attended_triples(groups)) == sorted(definition_triples(30, 12, 4, 6, 0, 6, True))
    for g in groups:
        assert g.k_heads_total == 2 and torch.equal(g.k_heads, g.q_heads // 3)
        assert torch.equal(g.k_rows, g.q_rows) and g.k_slice is None


def test_segment_runs_and_block_lengths():
    assert segment_runs(29, 8) == [(0, 3, 8), (3, 1, 5)]
    assert segment_runs(32, 8) == [(0, 4, 8)]
    assert segment_runs(5, 8) == [(0, 1, 5)]  # caller passes w~ = min(w, n); here a bare tail
    assert segment_runs(0, 1) == []
    assert [block_len(5, s, 4) for s in range(4)] == [2, 1, 1, 1]  # ceil((5 - s) / r)
    assert block_len(3, 5, 8) == 0  # a partial segment shorter than the offset: no block


def test_paper_shapes_run_one_dense_call_per_branch():
    # h 32, w = 2048 r: each branch is one group of 2048-row blocks; r=1 needs no gather.
    n = 1 << 17
    for r in (1, 2, 4, 8, 16):
        (group,) = plan_branch(n, 2048 * r, r, total_heads=32)
        assert group.q_len == 2048 and group.num_heads == 32 // r and group.num_blocks == n // 2048
        assert (group.q_slice is not None) == (r == 1)


@pytest.mark.parametrize("causal", [True, False])
def test_flops_count_the_attended_pairs_with_multiplicity(causal):
    n, segs, rates, heads, d = 45, (8, 20, 64), (1, 3, 4), 5, 16
    pairs = sum(
        int(dilated_multiplicity(n, segs, rates, global_head=h, total_heads=heads, causal=causal).sum())
        for h in range(heads)
    )
    assert dilated_attention_flops(n, segs, rates, num_heads=heads, head_dim=d, causal=causal) == 4 * d * pairs
    # Paper shapes: ~1.94x the pairs of one dense 2048-segment branch per head.
    n = 1 << 20
    f = dilated_attention_flops(n, [2048 * r for r in (1, 2, 4, 8, 16)], [1, 2, 4, 8, 16], num_heads=32, head_dim=128)
    assert f == 4 * 128 * 32 * sum((n // (2048 * r)) * 2048 * 2049 // 2 for r in (1, 2, 4, 8, 16))


def test_device_plans_are_a_bounded_cache_of_the_cpu_plans():
    # Index tensors on an accelerator hold its memory: at most DEVICE_PLAN_CACHE_SIZE plans stay.
    for n in range(1, 2 * DEVICE_PLAN_CACHE_SIZE + 1):
        groups = plan_branch(8 * n, 8, 2, total_heads=2, device=torch.device("meta"))
        assert groups and all(g.q_index.device.type == "meta" for g in groups)
    info = _plan_branch_on_device.cache_info()
    assert info.maxsize == DEVICE_PLAN_CACHE_SIZE and info.currsize <= DEVICE_PLAN_CACHE_SIZE
