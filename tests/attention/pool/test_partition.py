"""Zigzag plans and the resource manager (pure, no processes)."""

import pytest
import torch

from megatron_fapool.attention.pool.client import pack_member_chunks, unpack_member_chunks
from megatron_fapool.attention.pool.manager import CostModel, PoolResourceManager
from megatron_fapool.attention.pool.partition import zigzag_plan


@pytest.mark.parametrize("n, members", [(749, 2), (749, 3), (749, 4), (4096, 2), (64, 4)])
def test_zigzag_covers_sequence_once_and_balances_causal_work(n, members):
    plan = zigzag_plan(n, members, causal=True)
    seen = []
    for m in range(members):
        for lo, hi in plan.spans_of(m):
            seen += range(lo, hi)
    assert sorted(seen) == list(range(n))
    work = [plan.work(m) for m in range(members)]
    total = n * (n + 1) / 2
    assert abs(sum(work) - total) <= members * 2
    assert max(work) - min(work) <= 0.02 * total + 2 * n / members
    assert plan.kv_prefix(0) == n and plan.pool_kv_prefix < n


def test_pack_unpack_roundtrip_uneven():
    plan = zigzag_plan(749, 3, causal=True)
    x = torch.randn(749, 2, 3)
    buf = pack_member_chunks(x, plan)
    assert buf.shape == (3, 2 * plan.padded_chunk, 2, 3)
    assert torch.equal(unpack_member_chunks(buf, plan, torch.empty_like(x)), x)


def test_too_short_or_single_member_rejected():
    with pytest.raises(ValueError, match="too short"):
        zigzag_plan(5, 3, causal=True)
    with pytest.raises(ValueError, match=">= 1 pool rank"):
        zigzag_plan(100, 1, causal=True)


def test_manager_threshold_counters_and_hysteresis():
    m = PoolResourceManager(threshold=100, pool_share=3, hysteresis=2)
    assert m.decide(100) == 0 and m.stats.activations == 0
    m.new_step()
    assert m.decide(101) == 3 and m.stats.activations == 1
    assert m.decide(101) == 3 and m.stats.activations == 1  # cached within the step
    m.new_step()
    assert m.decide(50) == 0 and m.stats.releases == 1
    with pytest.raises(ValueError):
        PoolResourceManager(threshold=-1, pool_share=1)


def test_manager_cost_model_and_hysteresis_between_sizes():
    # attention 1e-9 s/token^2; fast link; overhead 1 ms: more ranks pay off only for long n
    cost = CostModel(attention_s_per_token2=1e-9, link_bytes_per_s=1e11, call_overhead_s=1e-3,
                     kv_bytes_per_token=4096, q_bytes_per_token=2048)
    assert cost.best_active(2_000, 4) < cost.best_active(200_000, 4) == 4
    m = PoolResourceManager(threshold=1000, pool_share=4, hysteresis=2, cost_model=cost)
    short, long = 2_000, 200_000
    p_short = m.decide(short)
    assert p_short == cost.best_active(short, 4)
    m.new_step()
    assert m.decide(long) == p_short  # first step asking for 4: held back by hysteresis
    m.new_step()
    assert m.decide(long) == 4 and m.stats.resizes == 1
    assert 1 < cost.break_even() < 2_000_000


def test_kv_pieces_cover_the_pool_prefix():
    plan = zigzag_plan(16384, 2, causal=True)
    assert plan.kv_pieces(1 << 20) == [(0, 12288)]  # one member: keys up to its later chunk's end
    assert plan.kv_pieces(5000) == [(0, 5000), (5000, 10000), (10000, 12288)]
    assert zigzag_plan(1000, 3, causal=False).kv_pieces(1 << 20) == [(0, 1000)]
