"""The dispatch group's geometry and the header agreement check (pure, no processes)."""

from dataclasses import astuple, replace

import pytest
import torch

from megatron_fapool.moe.serve import _merge_orders
from megatron_fapool.moe.wire import MOE_FORWARD, DispatchGeometry, agreed_header
from megatron_fapool.parallel import compute_layout
from megatron_fapool.parallel.service import Header

HEADER = len(astuple(Header(op=0)))


def _geometry(world=4, ratio=(1, 1), experts=16):
    layout = compute_layout(world, attention_expert_ratio=ratio, num_attention_heads=4, num_experts=experts)
    return DispatchGeometry.of_stage(layout, 0, experts)


def test_geometry_of_a_stage():
    g = _geometry()  # 2 attention + 2 expert ranks, 8 experts each
    assert g.attention_ranks == (0, 1) and g.expert_ranks == (2, 3)
    assert list(g.expert_ids(1)) == list(range(8, 16))  # Megatron's EP numbering: contiguous blocks
    assert g.to_experts([5, 0]) == [0, 0, 5, 0]
    assert g.from_attention([3, 4]) == [3, 4, 0, 0]
    with pytest.raises(ValueError, match="cannot be split"):
        DispatchGeometry.of_stage(compute_layout(4, attention_expert_ratio=(1, 1), num_attention_heads=4), 0, 7)


def _received(g, headers, counts):
    rows = torch.zeros(len(g.members), HEADER + g.experts_per_rank, dtype=torch.int64)
    for a, (h, c) in enumerate(zip(headers, counts)):
        rows[a, :HEADER] = torch.tensor(astuple(h))
        rows[a, HEADER:] = torch.tensor(c)
    return rows


def test_agreed_header_sums_rows_and_takes_the_smallest_drop_before():
    g = _geometry(world=4, ratio=(3, 1), experts=4)  # 3 attention ranks, one expert rank with 4 experts
    base = Header(op=MOE_FORWARD, call_id=7, layer=1, extra=4, members=4)
    counts = [[1, 0, 2, 0], [0, 0, 0, 0], [5, 1, 0, 3]]
    hs = [replace(base, n=sum(c), drop_before=d) for c, d in zip(counts, (5, 3, 6))]
    h, got = agreed_header(g, _received(g, hs, counts), rank=3)
    assert (h.op, h.call_id, h.layer, h.n, h.drop_before) == (MOE_FORWARD, 7, 1, 12, 3)
    assert got.tolist() == counts


def test_attention_ranks_that_disagree_are_named():
    g = _geometry(world=4, ratio=(3, 1), experts=4)
    base = Header(op=MOE_FORWARD, call_id=7, layer=1, extra=4, members=4)
    hs = [base, base, replace(base, layer=0)]
    with pytest.raises(RuntimeError, match=r"attention ranks 0 and 2 sent different operations \(layer 1 vs 0\)"):
        agreed_header(g, _received(g, hs, [[0] * 4] * 3), rank=3)


def test_merge_orders_are_inverse_permutations():
    to_expert_major, back = _merge_orders(num_attention=3, k=4)
    chunks = torch.arange(12)  # chunk (a, e) at index a * 4 + e
    assert chunks[to_expert_major][back].tolist() == chunks.tolist()
    assert chunks[to_expert_major].tolist()[:3] == [0, 4, 8]  # expert 0 of attention ranks 0, 1, 2
