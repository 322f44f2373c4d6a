"""Group creation on gloo: Megatron's groups over the base ranks only, every attention group up front."""

import pytest
import torch
import torch.distributed as dist

from megatron_fapool.parallel import compute_layout, initialize_parallel_groups
from megatron_fapool.testing.distributed import run_distributed


LAYOUTS = {  # (tp, pool_size, attention_expert_ratio) of a world of 4
    "tp2_pool2": (2, 2, None),
    "pool3": (1, 3, None),
    "ma_3_1": (1, 0, (3, 1)),
}


def _layouts_body(rank, world_size):
    """Every layout in turn in one launch (Megatron's groups destroyed between them)."""
    from megatron.core import parallel_state as ps

    out = {}
    for name, (tp, pool_size, ratio) in LAYOUTS.items():
        out[name] = _groups_body(rank, world_size, tp, pool_size, ratio)
        ps.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def layouts():
    res = run_distributed(_layouts_body, 4, timeout=180)
    return {name: [r[name] for r in res] for name in LAYOUTS}


def _groups_body(rank, world_size, tp, pool_size, ratio):
    from megatron.core import parallel_state as ps

    layout = compute_layout(world_size, tp=tp, pool_size=pool_size, attention_expert_ratio=ratio, num_attention_heads=8)
    groups = initialize_parallel_groups(layout)
    out = {"role": groups.role.role, "attention": sorted(groups.attention), "world": dist.get_world_size()}
    if groups.is_base:
        out["tp"] = (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank())
        out["dp"] = ps.get_data_parallel_world_size()
        t = torch.ones(1)
        dist.all_reduce(t, group=ps.get_data_parallel_group())
        out["dp_sum"] = t.item()
    else:
        out["megatron_initialised"] = ps.model_parallel_is_initialized()
    # every attention group this rank is in really communicates with exactly its members
    for members, pg in sorted(groups.attention.items()):
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=pg)
        assert t.item() == float(sum(members)), (members, t.item())
    if groups.dispatch is not None:
        t = torch.ones(1)
        dist.all_reduce(t, group=groups.dispatch)
        out["dispatch_size"] = t.item()
    dist.barrier()
    return out


def test_two_base_tp2_plus_two_pool(layouts):
    res = layouts["tp2_pool2"]
    assert [r["role"] for r in res] == ["base", "base", "pool", "pool"]
    assert all(r["world"] == 4 for r in res)  # Megatron saw 2 ranks only while it made its groups
    for r in res[:2]:
        assert r["dp"] == 1 and r["dp_sum"] == 1.0  # pool ranks are not data-parallel replicas
    assert res[0]["tp"] == (2, 0) and res[1]["tp"] == (2, 1)
    assert res[0]["attention"] == [(0, 2)] and res[2]["attention"] == [(0, 2)]
    assert res[1]["attention"] == [(1, 3)] and res[3]["attention"] == [(1, 3)]
    assert res[2]["megatron_initialised"] is False


def test_one_base_three_pool_all_candidate_groups(layouts):
    res = layouts["pool3"]
    assert res[0]["attention"] == [(0, 1), (0, 1, 2), (0, 1, 2, 3)]
    assert res[3]["attention"] == [(0, 1, 2, 3)]


def test_ma_separation_dispatch_group(layouts):
    res = layouts["ma_3_1"]
    assert [r["role"] for r in res] == ["base", "base", "base", "expert"]
    assert res[0]["dp"] == 3
    assert all(r["dispatch_size"] == 4.0 for r in res)
