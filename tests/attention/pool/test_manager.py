"""The resource manager and its cost model (pure, no processes)."""

import pytest

from megatron_fapool.attention.pool.manager import CostModel, PoolResourceManager


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
