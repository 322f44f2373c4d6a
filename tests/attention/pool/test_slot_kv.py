"""Pooled K/V in slots (gloo): placement rules, and decode steps over a base + 2 pool ranks vs a float64 reference.

The closed-form placement (:func:`member_tokens`, :func:`decode_rows`) is checked against the
session path's rules (``prefill_shards`` then ``next_owner`` per token). The distributed test
stores requests spread over 1, 2 and 3 members in slots, runs decode steps of a padded bucket
through :class:`PooledSlots` (one announcement, one exchange per layer), and compares every row
with dense attention over all its tokens; each pool rank's slots hold exactly its share.
"""

import contextlib

import pytest
import torch

from megatron_fapool.attention.kernels import slot_decode
from megatron_fapool.attention.pool import PoolClient, PoolServer, PoolStats
from megatron_fapool.attention.pool.decode import next_owner, prefill_shards
from megatron_fapool.attention.pool.slot_kv import PooledSlots, SlotKV, attend_rows, decode_rows, member_tokens
from megatron_fapool.parallel import compute_layout, initialize_parallel_groups
from megatron_fapool.testing.distributed import run_distributed

H, HK, D, LAYERS, STEPS, SLOTS, CAP = 4, 2, 16, 2, 4, 4, 64
SCALE = 0.25
REQUESTS = {0: (70, 3), 1: (20, 1), 2: (45, 2)}  # slot -> (prompt tokens, members)


@pytest.mark.parametrize("n,members", [(10, 3), (2, 3), (749, 3), (7, 1), (9, 2), (1, 4)])
def test_member_tokens_follow_the_session_rules(n, members):
    sizes = [hi - lo for lo, hi in prefill_shards(n, members)]
    prompt, m = torch.tensor([n]), torch.tensor([members])
    for total in range(n, n + 12):
        got = [int(member_tokens(j, prompt, m, torch.tensor([total]))) for j in range(members + 1)]
        assert got == sizes + [0], (total, got, sizes)
        owner = next_owner(sizes)
        assert owner == total % members  # the token at position `total` goes there
        sizes[owner] += 1


def test_decode_rows_of_an_unpooled_row_are_a_plain_step():
    table = torch.tensor([[5, 3, 1, 2], [0, 0, 1, 7]])  # a row at position 5 in slot 2; a padding row
    read, lengths, write, write_pos = decode_rows(0, table, scratch=7)
    assert read.tolist() == [2, 7] and lengths.tolist() == [6, 1]
    assert write.tolist() == [2, 7] and write_pos.tolist() == [5, 0]
    read, lengths, write, _ = decode_rows(1, table, scratch=7)  # a pool rank holds nothing of them
    assert read.tolist() == [7, 7] and lengths.tolist() == [0, 0] and write.tolist() == [7, 7]


def test_attend_rows_equals_slot_decode_on_one_member():
    g = torch.Generator().manual_seed(1)
    kv = SlotKV(layers=1, slots=2, capacity=16, kv_heads=HK, head_dim=D, dtype=torch.float64, device="cpu")
    k, v = torch.randn(9, HK, D, generator=g, dtype=torch.float64), torch.randn(9, HK, D, generator=g, dtype=torch.float64)
    kv.write_prefix(0, 1, k[:8], v[:8])
    q = torch.randn(1, H, D, generator=g, dtype=torch.float64)
    rows = decode_rows(0, torch.tensor([[8, 8, 1, 1]]), kv.scratch)
    out, lse = attend_rows(kv, 0, rows, q, k[8:], v[8:], SCALE, "torch")
    cache_k = torch.zeros(1, 16, HK, D, dtype=torch.float64)
    cache_v = torch.zeros_like(cache_k)
    cache_k[0, :9], cache_v[0, :9] = k, v
    ref, ref_lse = slot_decode(q, cache_k, cache_v, torch.tensor([0]), torch.tensor([9]), softmax_scale=SCALE,
                               backend="torch")
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)


def _reference(q, k, v):
    """q [hq, d], k/v [s, hk, d] -> [hq, d], float64, GQA."""
    rep = q.shape[0] // k.shape[1]
    kk, vv = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    return torch.einsum("hs,shd->hd", (torch.einsum("hd,shd->hs", q.double(), kk) * SCALE).softmax(-1), vv)


def _held(kv: SlotKV, layer: int) -> list[int]:
    return [int((kv.k[layer][s].abs().sum((-1, -2)) > 0).sum()) for s in range(kv.slots)]


def _body(rank, world):
    layout = compute_layout(world, tp=1, pp=1, pool_size=world - 1, num_attention_heads=H, num_query_groups=HK)
    groups = initialize_parallel_groups(layout)
    if groups.is_pool:
        server = PoolServer(groups, device=torch.device("cpu"))
        stats = server.serve()
        return {"held": [_held(server.slot_kv, layer) for layer in range(LAYERS)], "stats": stats.as_dict(),
                "headers": server.headers}
    client = PoolClient(groups, kv_chunk_tokens=1 << 20, stats=PoolStats())
    kv = SlotKV(layers=LAYERS, slots=SLOTS, capacity=CAP, kv_heads=HK, head_dim=D, dtype=torch.float32, device="cpu")
    pooled = PooledSlots(client, kv, dtype=torch.float32, backend="torch")
    g = torch.Generator().manual_seed(0)
    full, prefill_errors = {}, []
    for slot, (n, members) in REQUESTS.items():
        with pooled.prefill_pass() if members > 1 else contextlib.nullcontext():  # one header for all layers
            for layer in range(LAYERS):
                k, v = torch.randn(n, HK, D, generator=g), torch.randn(n, HK, D, generator=g)
                full[slot, layer] = (k, v)
                if members > 1:
                    q = torch.randn(n, 1, H, D, generator=g).transpose(0, 1)  # views of [n, b, ...], as Megatron's
                    out = pooled.prefill(layer, slot, slot, q, k[:, None].transpose(0, 1), v[:, None].transpose(0, 1),
                                         SCALE, members)
                    ref = torch.stack([_reference(q[0, i], k[: i + 1], v[: i + 1]) for i in range(n)])
                    prefill_errors.append(float((out[0].double() - ref).abs().max()))
                else:
                    kv.write_prefix(layer, slot, k, v)
    order = [2, 0, 1]  # rows in a different order than slots; a padding row at the end (bucket of 4)
    table = torch.zeros((4, 4), dtype=torch.long)
    table[:, 2], table[:, 3] = 1, kv.scratch
    for i, slot in enumerate(order):
        n, members = REQUESTS[slot]
        table[i] = torch.tensor([n, n, members, slot])
    errors = []
    for step in range(STEPS):
        pooled.announce(table, heads=H, softmax_scale=SCALE)
        rows = decode_rows(0, table, kv.scratch)
        for layer in range(LAYERS):
            q = torch.randn(4, H, D, generator=g)
            k_new, v_new = torch.randn(4, HK, D, generator=g), torch.randn(4, HK, D, generator=g)
            out, lse = attend_rows(kv, layer, rows, q, k_new, v_new, SCALE, "torch")
            out = pooled.merge(layer, q, k_new, v_new, out, lse)
            for i, slot in enumerate(order):
                k, v = full[slot, layer]
                full[slot, layer] = k, v = torch.cat((k, k_new[i: i + 1])), torch.cat((v, v_new[i: i + 1]))
                errors.append(float((out[i].double() - _reference(q[i], k, v)).abs().max()))
        table[:3, 0] += 1
    client.shutdown(torch.device("cpu"))
    return {"held": [_held(kv, layer) for layer in range(LAYERS)], "max_error": max(errors),
            "prefill_error": max(prefill_errors), "headers": client.headers}


def test_pooled_decode_over_slots_equals_dense_attention():
    base, *pools = run_distributed(_body, 3, timeout=120)
    assert base["max_error"] < 1e-5 and base["prefill_error"] < 1e-5
    pooled_prompts = sum(members > 1 for _, members in REQUESTS.values())
    assert base["headers"] == 1 + pooled_prompts + STEPS + 1  # init, a pass per pooled prompt, decode steps, shutdown
    for slot, (n, members) in REQUESTS.items():  # every member holds exactly its share, nothing twice
        total = n + STEPS
        shares = [member_tokens(j, torch.tensor([n]), torch.tensor([members]), torch.tensor([total])).item()
                  for j in range(3)]
        assert sum(shares) == total and max(shares) - min(s for s in shares[:members]) <= 1
        for layer in range(LAYERS):
            held = [base["held"][layer][slot]] + [p["held"][layer][slot] for p in pools]
            assert held == shares, (slot, layer, held, shares)
    for j, p in enumerate(pools, start=1):  # decode layers, and prefill layers of the prompts it is a member of
        prefills = sum(members > j for _, members in REQUESTS.values()) * LAYERS
        assert p["stats"]["served_forward"] == STEPS * LAYERS + prefills
        assert p["held"][0][3] == 0  # the unused slot stays empty
