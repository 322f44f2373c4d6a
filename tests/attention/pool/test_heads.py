"""The attention pool splitting heads (dilated attention): the split, and the pooled
call across processes against the float64 definition.

Shapes a model test does not give: causal and not, GQA with 6 query / 2 key-value
heads (2 members split at the group boundary; 3 members split heads two by two, so the
middle member reads both key/value heads and the base sums replicated dK/dV), a base
rank whose heads are global heads 6..11 of 12, a forward without gradients (nothing
kept on the pool), and bf16.
"""

import pytest
import torch

from megatron_fapool.attention.dilated import dilated_attention, dilated_attention_reference_vjp
from megatron_fapool.attention.pool.heads import PooledHeadsAttention, head_split
from megatron_fapool.testing.distributed import run_distributed


@pytest.mark.parametrize("heads, kv_heads, members", [(4, 2, 2), (4, 2, 3), (6, 3, 3), (6, 3, 4), (8, 8, 3), (6, 1, 6), (8, 2, 2)])
def test_head_split_covers_heads_once_and_respects_groups(heads, kv_heads, members):
    s = head_split(heads, kv_heads, members)
    g = heads // kv_heads
    assert s.bounds[0] == 0 and s.bounds[-1] == heads
    counts = [s.q_count(m) for m in range(members)]
    assert min(counts) >= 1
    kv_sent = sum(s.kv_count(m) for m in range(members))
    if kv_heads >= members:
        # whole groups only: every key/value head is sent once, shares differ by at most one group
        assert all(s.kv_aligned(m) for m in range(members))
        assert kv_sent == kv_heads and max(counts) - min(counts) <= g
    else:
        assert max(counts) - min(counts) <= 1
    for m in range(members):
        a, b = s.q_range(m)
        # the member's key/value heads are those its query heads read
        if s.kv_aligned(m):
            assert s.kv_index(m) == sorted({h // g for h in range(a, b)})
        else:
            assert s.kv_index(m) == [h // g for h in range(a, b)]


def test_head_split_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple"):
        head_split(6, 4, 2)
    with pytest.raises(ValueError, match="members"):
        head_split(2, 1, 3)
    with pytest.raises(ValueError, match="members"):
        head_split(4, 2, 1)


SEGS, RATES = (64, 128, 512), (1, 2, 4)


def _body(rank, world, cases):
    from megatron_fapool.attention.pool import PoolClient, PoolServer, PoolStats
    from megatron_fapool.parallel import compute_layout, initialize_parallel_groups

    layout = compute_layout(world, tp=1, pp=1, pool_size=world - 1, num_attention_heads=6, num_query_groups=2)
    groups = initialize_parallel_groups(layout)
    if groups.is_pool:
        server = PoolServer(groups, device=torch.device("cpu"))
        stats = server.serve()
        return {"stats": stats.as_dict(), "saved_left": len(server.saved)}
    client = PoolClient(groups, kv_chunk_tokens=100, stats=PoolStats())
    results = []
    for n, active, causal, dtype in cases:
        g = torch.Generator().manual_seed(n + active)
        # [b, n, h, d], 6 query heads on 2 key/value heads; global heads 6..11 of 12
        q, k, v = (torch.randn(2, n, h, 8, generator=g).to(dtype) for h in (6, 2, 2))
        dout = torch.randn(2, n, 6, 8, generator=g).to(dtype)
        with torch.no_grad():  # a forward without gradients: the pool keeps nothing
            nograd = PooledHeadsAttention.apply(q, k, v, client, active, SEGS, RATES, causal, 0.3, 6, 12)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = PooledHeadsAttention.apply(*leaves, client, active, SEGS, RATES, causal, 0.3, 6, 12)
        out.backward(dout)
        ref, rdq, rdk, rdv = dilated_attention_reference_vjp(
            dout, q, k, v, SEGS, RATES, causal, 0.3, head_offset=6, total_heads=12
        )
        local = dilated_attention(q, k, v, SEGS, RATES, causal, 0.3, head_offset=6, total_heads=12)

        def rel(a, b):
            return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()

        results.append(dict(
            out=rel(out.detach(), ref), nograd=rel(nograd, ref), local=rel(local, ref),
            dq=rel(leaves[0].grad, rdq), dk=rel(leaves[1].grad, rdk), dv=rel(leaves[2].grad, rdv),
        ))
    client.shutdown(torch.device("cpu"))
    return {"errors": results, "stats": client.stats.as_dict(), "live": len(client._live)}


def test_pooled_heads_match_float64_definition():
    f32, bf16 = torch.float32, torch.bfloat16
    cases = [(749, 2, True, f32), (300, 2, False, f32), (333, 1, True, f32), (256, 1, False, f32),
             (200, 2, True, bf16)]
    res = run_distributed(_body, 3, cases, timeout=180)
    base = res[0]
    for case, err in zip(cases, base["errors"]):
        tol = 1e-5 if case[3] == f32 else 3e-2
        for name, e in err.items():
            if name != "local":
                # the pooled call is as exact as the local kernel
                assert e <= max(tol, 2 * err["local"]), (case, name, e)
    assert base["stats"]["pooled_forward"] == 2 * len(cases) and base["stats"]["pooled_backward"] == len(cases)
    assert base["live"] == 0
    for slot in (1, 2):
        s = res[slot]
        used = sum(1 for _, a, _, _ in cases if a >= slot)
        assert s["stats"]["served_forward"] == 2 * used and s["stats"]["served_backward"] == used, (slot, s)
        assert s["saved_left"] == 0
