"""The roles function: paper layouts and impossible ones, without starting processes."""

import pytest

from megatron_fapool.parallel import LayoutError, compute_layout


@pytest.mark.parametrize("pool", [0, 8, 16, 24, 32])
def test_paper_pool_layouts_8_base_tp_ranks(pool):
    lay = compute_layout(8 + pool, tp=8, pool_size=pool, num_attention_heads=32)
    assert (lay.num_base, lay.dp, lay.pool_per_base) == (8, 1, pool // 8)
    roles = [r.role for r in lay.roles]
    assert roles == ["base"] * 8 + ["pool"] * pool
    # each TP rank's heads are served by its own share of the pool
    shares = [lay.pool_of(b) for b in range(8)]
    assert sorted(r for s in shares for r in s) == list(range(8, 8 + pool))
    for b in range(8):
        for r in lay.pool_of(b):
            role = lay.role_of(r)
            assert role.serves == b and role.tp == b
        for p in range(1, pool // 8 + 1):
            assert lay.attention_group(b, p) == (b,) + lay.pool_of(b)[:p]
    assert len(lay.attention_groups()) == 8 * (pool // 8)
    assert f"+ {pool} pool" in lay.describe()


def test_paper_ma_separation_16_gpus_12_attention_4_expert():
    lay = compute_layout(16, tp=4, attention_expert_ratio=(3, 1), num_attention_heads=32, num_experts=16)
    assert (lay.num_base, lay.num_expert, lay.dp) == (12, 4, 3)
    assert [r.role for r in lay.roles] == ["base"] * 12 + ["expert"] * 4
    assert lay.expert_group(0) == (12, 13, 14, 15)
    assert lay.dispatch_group(0) == tuple(range(16))


def test_data_parallel_counts_base_ranks_only():
    lay = compute_layout(16, tp=2, pp=2, pool_size=8, num_attention_heads=8, num_layers=4)
    assert (lay.num_base, lay.dp, lay.pool_per_base) == (8, 2, 1)
    # Megatron's rank order tp-cp-ep-dp-pp
    assert lay.base_rank(tp=1, dp=1, pp=1) == 1 + 2 * (1 + 2 * 1)
    assert lay.base_coords(7) == (1, 1, 1)
    # pool ranks carry the coordinates (incl. pipeline stage) of the base rank they serve
    assert lay.role_of(8 + 7).serves == 7 and lay.role_of(15).pp == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(world_size=4, tp=2, pool_size=4, num_attention_heads=8), "pool_size=4 does not fit a world of 4"),
        (dict(world_size=5, tp=2, pool_size=2, num_attention_heads=8), "not a multiple of TP"),
        (dict(world_size=7, tp=2, pool_size=3, num_attention_heads=8), "pool_size=3 is not a multiple of the 4 base"),
        (dict(world_size=4, tp=3, num_attention_heads=8), "num_attention_heads=8 is not divisible by tensor_model_parallel_size=3"),
        (dict(world_size=4, tp=4, num_attention_heads=8, num_query_groups=2), "num_query_groups=2 is not divisible"),
        (dict(world_size=4, pool_size=-1, num_attention_heads=8), "pool_size must be >= 0"),
        (dict(world_size=6, attention_expert_ratio=(3, 1), num_attention_heads=8), "ratio 3:1 does not split 6"),
        (dict(world_size=4, pp=3, num_attention_heads=8, num_layers=4), "num_layers=4 is not divisible"),
    ],
)
def test_impossible_layouts_say_how_to_fix(kwargs, match):
    world = kwargs.pop("world_size")
    with pytest.raises(LayoutError, match=match):
        compute_layout(world, **kwargs)
