"""Pooled attention across processes (gloo) against a float64 dense reference.

The pool ranks must really compute: their work counters and bytes are checked, and
the base rank's own share alone would give wrong rows.
"""

import pytest
import torch
import torch.distributed as dist

from megatron_fapool.attention.pool import PooledAttention, PoolClient, PoolServer, PoolStats
from megatron_fapool.attention.kernels.reference import reference_attention
from megatron_fapool.parallel import compute_layout, initialize_parallel_groups
from megatron_fapool.testing.distributed import run_distributed


def _inputs(n, b, h, hk, d, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, b, h, d, generator=g)
    k = torch.randn(n, b, hk, d, generator=g)
    v = torch.randn(n, b, hk, d, generator=g)
    dout = torch.randn(n, b, h, d, generator=g)
    return q, k, v, dout


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _body(rank, world, pool_size, cases, tp=1, pp=1):
    layout = compute_layout(world, tp=tp, pp=pp, pool_size=pool_size, num_attention_heads=4, num_query_groups=2)
    groups = initialize_parallel_groups(layout)
    if groups.is_pool:
        stats = PoolServer(groups, device=torch.device("cpu")).serve()
        return stats.as_dict()
    client = PoolClient(groups, kv_chunk_tokens=100, stats=PoolStats())
    errors = []
    for n, active, causal in cases:
        q, k, v, dout = _inputs(n, 2, 4, 2, 16, seed=n + active)
        q.requires_grad_(); k.requires_grad_(); v.requires_grad_()
        out = PooledAttention.apply(q, k, v, client, active, causal, 0.25)
        out.backward(dout)
        # reference: float64 dense, [b, s, h, d] layout
        qd, kd, vd = (t.detach().double().transpose(0, 1).requires_grad_() for t in (q, k, v))
        ref = reference_attention(qd, kd, vd, causal=causal, softmax_scale=0.25)
        ref = ref[0] if isinstance(ref, tuple) else ref
        ref.backward(dout.double().transpose(0, 1))
        errors.append(dict(
            out=_rel(out.detach(), ref.detach().transpose(0, 1)),
            dq=_rel(q.grad, qd.grad.transpose(0, 1)),
            dk=_rel(k.grad, kd.grad.transpose(0, 1)),
            dv=_rel(v.grad, vd.grad.transpose(0, 1)),
        ))
    client.shutdown(torch.device("cpu"))
    return {"errors": errors, "stats": client.stats.as_dict()}


@pytest.mark.parametrize("pool_size, cases", [
    (1, [(749, 1, True), (256, 1, False)]),
    (3, [(749, 3, True), (749, 2, True), (300, 1, True), (333, 3, False)]),
])
def test_pooled_attention_matches_float64_reference(pool_size, cases):
    res = run_distributed(_body, 1 + pool_size, pool_size, cases, timeout=180)
    base = res[0]
    for case, err in zip(cases, base["errors"]):
        for name, e in err.items():
            assert e <= 1e-5, (case, name, e)
    assert base["stats"]["pooled_forward"] == len(cases) == base["stats"]["pooled_backward"]
    # every pool rank that was active computed its rows and moved bytes
    for slot in range(1, pool_size + 1):
        pool = res[slot]
        used = sum(1 for n, active, _ in cases if active >= slot)
        assert pool["served_forward"] == used and pool["served_backward"] == used
        assert pool["query_rows"] > 0 and pool["bytes_received"] > 0 and pool["bytes_sent"] > 0


def test_each_pipeline_stage_and_tp_rank_uses_its_own_pool_share():
    """TP 2 x PP 2 base grid + 4 pool ranks: all four base ranks pool at once, each with its own pool rank."""
    cases = [(300, 1, True)]
    res = run_distributed(_body, 8, 4, cases, 2, 2, timeout=240)
    for base in res[:4]:
        assert all(e <= 1e-5 for err in base["errors"] for e in err.values()), base["errors"]
        assert base["stats"]["pooled_forward"] == 1
    for pool in res[4:]:
        assert pool["served_forward"] == 1 and pool["served_backward"] == 1
