"""Decode against a pool-resident, sequence-sharded KV cache (gloo) vs a float64 reference.

Proves that the pool ranks hold the shards (each about 1/(p+1) of the sequence, the base
rank never the whole), that every decode step equals dense attention over prompt + new
tokens, and that bad input on the base leaves the pool's state of other requests intact.
"""

import pytest
import torch

from megatron_fapool.attention.pool import PoolClient, PoolServer, PoolStats
from megatron_fapool.attention.pool.decode import PoolKVCache, next_owner, prefill_shards
from megatron_fapool.parallel import compute_layout, initialize_parallel_groups
from megatron_fapool.testing.distributed import run_distributed

H, HK, D, LAYERS, STEPS = 4, 2, 16, 2, 5
SCALE = 0.25


def test_prefill_shards_and_owner():
    assert prefill_shards(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert prefill_shards(2, 3) == [(0, 1), (1, 2), (2, 2)]
    assert next_owner([4, 3, 3]) == 1 and next_owner([3, 3, 3]) == 0
    sizes = [hi - lo for lo, hi in prefill_shards(749, 3)]
    for _ in range(100):  # appends keep the shards balanced
        sizes[next_owner(sizes)] += 1
    assert max(sizes) - min(sizes) <= 1


def _reference(q, k, v):
    """q [hq, d], k/v [s, hk, d] -> [hq, d], float64, GQA."""
    rep = q.shape[0] // k.shape[1]
    kk, vv = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    scores = torch.einsum("hd,shd->hs", q.double(), kk) * SCALE
    return torch.einsum("hs,shd->hd", scores.softmax(-1), vv)


def _body(rank, world, requests):
    layout = compute_layout(world, tp=1, pp=1, pool_size=world - 1, num_attention_heads=H, num_query_groups=HK)
    groups = initialize_parallel_groups(layout)
    if groups.is_pool:
        server = PoolServer(groups, device=torch.device("cpu"))
        kept = {}

        def snapshot():  # what this pool rank holds, per request
            kept.update({r: server.kv.tokens_of(r) for r in {key[0] for key in server.kv.shards}})

        orig = server.kv.free

        def free(request):
            snapshot()
            orig(request)
        server.kv.free = free
        stats = server.serve()
        snapshot()
        return {"held": kept, "left": len(server.kv.shards), "stats": stats.as_dict()}
    client = PoolClient(groups, kv_chunk_tokens=1 << 20, stats=PoolStats())
    cache = PoolKVCache(client)
    g = torch.Generator().manual_seed(0)
    full = {}
    for rid, (n, members) in requests.items():
        for layer in range(LAYERS):
            k, v = torch.randn(n, HK, D, generator=g), torch.randn(n, HK, D, generator=g)
            cache.store(rid, layer, k, v, members=members)
            full[(rid, layer)] = (k, v)
    held_by_base = {rid: cache.tokens_held(rid) for rid in requests}
    errors, misuse = [], []
    # bad input first: it must fail on the base and leave every request decodable
    bad = []
    ids = list(requests)
    for call in (lambda: cache.decode([ids[0], 99], 0, torch.randn(2, H, D), torch.randn(2, HK, D),
                                      torch.randn(2, HK, D), softmax_scale=SCALE),
                 lambda: cache.decode([ids[0], ids[0]], 0, torch.randn(2, H, D), torch.randn(2, HK, D),
                                      torch.randn(2, HK, D), softmax_scale=SCALE),
                 lambda: cache.store(1, 0, torch.randn(5, HK, D), torch.randn(5, HK, D), members=requests[1][1]),
                 lambda: cache.decode([1], 0, torch.randn(1, H, D), torch.randn(1, HK, D + 1),
                                      torch.randn(1, HK, D + 1), softmax_scale=SCALE)):
        try:
            call()
        except (KeyError, ValueError) as e:
            bad.append(type(e).__name__)
    for step in range(STEPS):
        # one batch of every request per layer (requests spread over different numbers of
        # members share the exchange), then each request alone: both orders of use
        batches = [ids] if step % 2 == 0 else [[rid] for rid in reversed(ids)]
        for batch in batches:
            for layer in range(LAYERS):
                q = torch.randn(len(batch), H, D, generator=g)
                kn, vn = torch.randn(len(batch), HK, D, generator=g), torch.randn(len(batch), HK, D, generator=g)
                out = cache.decode(batch, layer, q, kn, vn, softmax_scale=SCALE)
                if step == 0 and layer == 0:  # mid-step misuse is refused before anything moves
                    for call in (lambda: cache.decode(batch, 0, q, kn, vn, softmax_scale=SCALE),
                                 lambda: cache.free(batch[0])):
                        try:
                            call()
                        except RuntimeError as e:
                            misuse.append(str(e))
                for i, rid in enumerate(batch):
                    k, v = full[(rid, layer)]
                    full[(rid, layer)] = (torch.cat((k, kn[i, None])), torch.cat((v, vn[i, None])))
                    ref = _reference(q[i], *full[(rid, layer)])
                    errors.append(((out[i].double() - ref).abs().max() / ref.abs().max()).item())
    for rid in requests:
        cache.free(rid)
    client.shutdown(torch.device("cpu"))
    return {"errors": errors, "held_by_base": held_by_base, "bad": bad, "misuse": misuse,
            "stats": client.stats.as_dict()}


@pytest.mark.parametrize("world, requests", [
    (2, {1: (749, 2), 2: (100, 2)}),
    (4, {1: (749, 4), 2: (300, 3), 3: (64, 2)}),
])
def test_decode_over_sharded_cache(world, requests):
    res = run_distributed(_body, world, requests, timeout=120)
    base = res[0]
    assert max(base["errors"]) < 1e-5, max(base["errors"])
    assert base["bad"] == ["KeyError", "ValueError", "ValueError", "ValueError"]
    assert "expects layer 1 next" in base["misuse"][0] and "middle of a decode step" in base["misuse"][1]
    for rid, (n, members) in requests.items():
        # the base holds only its shard: about 1/members of the prompt, per layer
        assert base["held_by_base"][rid] == LAYERS * prefill_shards(n, members)[0][1]
        total = base["held_by_base"][rid]
        for r in range(1, members):
            held = res[r]["held"][rid]
            lo, hi = prefill_shards(n, members)[r]
            assert LAYERS * (hi - lo) <= held <= LAYERS * (hi - lo + STEPS)  # its shard + its share of new tokens
            total += held
        assert total <= LAYERS * (n + STEPS)  # nothing replicated
    for r in range(1, world):
        assert res[r]["left"] == 0  # freed everywhere
        assert res[r]["stats"]["served_forward"] > 0


@pytest.mark.parametrize("n, splits", [(1, 4), (100, 1), (100, 3), (4099, 8), (513, 512)])
def test_decode_partial_split_equals_whole(n, splits):
    from megatron_fapool.attention.pool.decode import decode_partial

    g = torch.Generator().manual_seed(n)
    q = torch.randn(H, D, generator=g, dtype=torch.float64)
    kv = torch.randn(n + 7, 2, HK, D, generator=g, dtype=torch.float64)  # a cache with spare rows, as stored
    k, v = kv[:n, 0], kv[:n, 1]
    out, lse = decode_partial(q, k, v, softmax_scale=SCALE, splits=splits)
    ref = _reference(q, k, v)
    assert (out.double() - ref).abs().max() < 1e-5
    scores = torch.einsum("hd,shd->hs", q, k.repeat_interleave(H // HK, 1)) * SCALE
    assert (lse.double() - scores.logsumexp(-1)).abs().max() < 1e-5


def test_decode_splits_rule():
    from megatron_fapool.attention.pool.decode import decode_splits

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert decode_splits(1 << 17, 32, cpu, "math") == 1
    assert decode_splits(1 << 17, 32, cuda, "sdpa_efficient") == 16  # 512 work items / 32 kv heads
    assert decode_splits(8192, 32, cuda, "flex") == 4  # at least 2048 keys per piece
    assert decode_splits(1000, 8, cuda, "sdpa_efficient") == 1
    assert decode_splits(1 << 17, 32, cuda, "sdpa_cudnn") == 1  # splits the keys itself


def test_decode_partial_refuses_mismatched_inputs():
    from megatron_fapool.attention.pool.decode import decode_partial

    q, k = torch.randn(H, D), torch.randn(10, HK, D)
    for args in ((q, k, torch.randn(10, HK, D + 1)), (q, k.double(), k.double()), (torch.randn(3, D), k, k)):
        with pytest.raises(ValueError, match="decode takes q"):
            decode_partial(*args, softmax_scale=SCALE)


def test_kernel_forward_equals_attention_forward():
    from megatron_fapool.attention.kernels import attention_forward, kernel_forward

    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 1, H, D, generator=g), torch.randn(2, 33, HK, D, generator=g), torch.randn(2, 33, HK, D, generator=g)
    for backend in ("math", "sdpa_flash"):
        out, lse = kernel_forward(q, k, v, causal=False, softmax_scale=SCALE, backend=backend)
        ref_out, ref_lse = attention_forward(q, k, v, causal=False, softmax_scale=SCALE, backend=backend)
        assert torch.allclose(out, ref_out, atol=1e-6) and torch.allclose(lse.float(), ref_lse.float(), atol=1e-6)
