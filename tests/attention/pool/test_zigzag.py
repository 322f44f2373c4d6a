"""Dense pooled attention (zigzag): plans, the wire layout, and the pooled call across processes (gloo) against a float64 dense reference.

The pool ranks must really compute: their work counters and bytes are checked, and
the base rank's own share alone would give wrong rows.
"""

import pytest
import torch
import torch.distributed as dist

from megatron_fapool.attention.kernels.reference import reference_attention
from megatron_fapool.attention.pool import PooledAttention, PoolClient, PoolServer, PoolStats
from megatron_fapool.attention.pool.zigzag import member_messages, rows, zigzag_plan
from megatron_fapool.parallel import compute_layout, initialize_parallel_groups
from megatron_fapool.testing.compare import rel_err
from megatron_fapool.testing.distributed import run_distributed


def _inputs(n, b, h, hk, d, seed):
    """[b, n, h, d] q, dout and [b, n, hk, d] k, v: views of [n, b, ...] tensors, as Megatron's core attention passes."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, b, h, d, generator=g).transpose(0, 1)
    k = torch.randn(n, b, hk, d, generator=g).transpose(0, 1)
    v = torch.randn(n, b, hk, d, generator=g).transpose(0, 1)
    dout = torch.randn(n, b, h, d, generator=g).transpose(0, 1)
    return q, k, v, dout


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


def test_wire_rows_are_megatrons_tensor_and_chunks_are_contiguous_row_ranges():
    plan = zigzag_plan(749, 3, causal=True)
    megatron = torch.randn(749, 2, 3, 4)  # [n, b, h, d]
    x = megatron.transpose(0, 1)  # what the core attention passes
    wire = rows(x)
    assert wire.data_ptr() == megatron.data_ptr()  # no copy
    pieces = [t for m in range(3) for t in member_messages(plan, m, wire)]
    assert all(t.is_contiguous() for t in pieces)
    assert sorted(r for t in pieces for r in range(t.data_ptr(), t.data_ptr() + t.numel() * 4, 2 * 3 * 4 * 4)) == \
        list(range(megatron.data_ptr(), megatron.data_ptr() + megatron.numel() * 4, 2 * 3 * 4 * 4))


def test_too_short_or_single_member_rejected():
    with pytest.raises(ValueError, match="too short"):
        zigzag_plan(5, 3, causal=True)
    with pytest.raises(ValueError, match=">= 1 pool rank"):
        zigzag_plan(100, 1, causal=True)


def test_kv_pieces_cover_each_members_prefix():
    plan = zigzag_plan(16384, 2, causal=True)
    assert plan.kv_pieces(1, 1 << 20) == [(0, 12288)]  # one member: keys up to its later chunk's end
    assert plan.kv_pieces(1, 5000) == [(0, 5000), (5000, 10000), (10000, 12288)]
    three = zigzag_plan(600, 3, causal=True)
    assert [three.kv_prefix(m) for m in (1, 2)] == [500, 400]  # a member gets only the prefix it sees
    assert three.kv_pieces(2, 300) == [(0, 300), (300, 400)]
    assert zigzag_plan(1000, 3, causal=False).kv_pieces(2, 1 << 20) == [(0, 1000)]


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
        # reference: float64 dense
        qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref = reference_attention(qd, kd, vd, causal=causal, softmax_scale=0.25)
        ref = ref[0] if isinstance(ref, tuple) else ref
        ref.backward(dout.double())
        errors.append(dict(
            out=rel_err(out, ref), dq=rel_err(q.grad, qd.grad), dk=rel_err(k.grad, kd.grad), dv=rel_err(v.grad, vd.grad),
        ))
    client.shutdown(torch.device("cpu"))
    return {"errors": errors, "stats": client.stats.as_dict()}


# One world of 1 base + 3 pool ranks: active sizes 3, 2 and 1 (1 = the base and a single pool rank, what a
# pool of one rank runs; a world with pool_size 1 of its own only cost one more process start-up), uneven 749,
# causal and not.
POOL_SIZE = 3
CASES = [(749, 3, True), (749, 2, True), (749, 1, True), (300, 1, True), (333, 3, False), (256, 1, False)]


def test_pooled_attention_matches_float64_reference():
    pool_size, cases = POOL_SIZE, CASES
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
