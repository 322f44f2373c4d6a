"""Block plans: every attended (query, key, head) triple is the definition's, exactly once."""

from __future__ import annotations

import pytest
import torch

from megatron_fapool.attention.dilated.plan import (
    PackedKeyLayout,
    branch_is_shard_local,
    ceil_div,
    dilated_attention_flops,
    offset_classes,
    packed_rows_per_rank,
    packing_indices,
    plan_branch,
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


@pytest.mark.parametrize("n,w,r,heads,causal", CASES)
@pytest.mark.parametrize("world", [2, 3])
def test_sequence_parallel_plan_with_packed_keys_covers_each_shard(n, w, r, heads, causal, world):
    shard = ceil_div(n, world)
    classes = offset_classes(r, heads, 0, heads)
    rows = packed_rows_per_rank(n, w, r, classes, shard, world)
    layout = PackedKeyLayout(shard, world, rows)
    # Where every packed row of every rank comes from: (rank, row, head) -> position.
    source = {}
    for p in range(world):
        pos, head, row = packing_indices(n, w, r, heads, 0, heads, shard, p)
        assert row.numel() == 0 or int(row.max()) < rows
        for a, h, b in zip(pos.tolist(), head.tolist(), row.tolist()):
            source[(p * rows + b, h)] = p * shard + a
    for p in range(world):
        start, stop = min(p * shard, n), min((p + 1) * shard, n)
        groups = plan_branch(
            n, w, r, total_heads=heads, causal=causal, query_start=start, query_stop=stop, key_layout=layout
        )
        got = [
            (i + start, j, h)
            for i, j, h in attended_triples(
                groups, key_position=lambda krows, kheads: torch.tensor(
                    [[source[(int(x), int(hh))] for hh in kheads] for x in krows]
                ),
            )
        ]
        assert sorted(got) == sorted(definition_triples(n, w, r, heads, 0, heads, causal, rows=(start, stop)))


def test_shard_local_branches():
    assert branch_is_shard_local(96, 12, 48, 2)  # segments tile each shard
    assert not branch_is_shard_local(96, 100, 48, 2)  # w~ = 96 spans both shards
    assert not branch_is_shard_local(97, 16, 25, 4)  # 25 is not a multiple of 16
    assert branch_is_shard_local(97, 5, 25, 4)  # 25, 50, 75 are multiples of 5
    assert branch_is_shard_local(40, 8, 48, 2)  # everything lives on rank 0


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
