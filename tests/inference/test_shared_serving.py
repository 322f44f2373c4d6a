"""Serving replicas sharing two pool ranks, continuous batching with staggered arrivals (gloo): three TP 1
replicas, and two TP 2 replicas (each TP rank keeps its heads' K/V in its own slot on the same pool ranks).

Long requests (prompt over the threshold 128) of different replicas overlap in time; each gets one pool
rank (``max_active`` 1) from the coordinator, which spreads them over the two. Every request's greedy
tokens equal serving it alone without the pool; each pool rank's slots hold exactly the K/V ranges of the
long requests placed there and nothing else; every slot is released at the end; a request too long for
its ranks' slots is refused with a message while the others finish.
"""

import dataclasses
import os

import pytest
import torch

from megatron_fapool.testing.distributed import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "tiny_dense_rope_pool.json")
CAPACITY, NEW = 320, 5
# request -> (prompt tokens, arrival in decode steps of its replica)
REQUESTS = {0: (400, 0), 1: (60, 0), 2: (500, 0), 3: (90, 1), 4: (300, 2), 5: (45, 2), 6: (700, 0), 7: (250, 3)}


def _config(tp):
    from megatron_fapool.config import load_run_config

    cfg = load_run_config(CONFIG)
    pool = cfg.fapool.attention_pool.model_copy(update={"pool_size": 2, "sharing": "shared", "max_active": 1})
    # untied output weights: with tied ones a random model repeats its input token, whatever the K/V
    lm = cfg.model.language_model.model_copy(update={"untie_embeddings_and_output_weights": True})
    return dataclasses.replace(cfg, tensor_model_parallel_size=tp, model=cfg.model.model_copy(update={"language_model": lm}),
                               fapool=cfg.fapool.model_copy(update={"attention_pool": pool}))


def _held(kv, layer=0):
    return [int((kv.k[layer][s].abs().sum((-1, -2)) > 0).sum()) for s in range(kv.slots)]


def _body(rank, world, tp):
    from megatron_fapool.attention.pool import PoolStats
    from megatron_fapool.attention.pool.mailbox import MailboxClient, MailboxServer
    from megatron_fapool.inference.batching import TimedRequest, place_on_replicas, serve
    from megatron_fapool.inference.engine import ServingEngine
    from megatron_fapool.inference.generate import Request
    from megatron_fapool.inference.sampling import Sampling
    from megatron_fapool.inference.slots import SlotCache, slot_layer_spec
    from megatron_fapool.models.gpt import build_gpt_model
    from megatron_fapool.parallel import initialize_parallel_groups, layout_from_config
    from megatron.core import parallel_state

    cfg = _config(tp)
    groups = initialize_parallel_groups(layout_from_config(cfg, world))
    if groups.is_pool:
        server = MailboxServer(groups, device="cpu", stats=PoolStats(), pool_cfg=cfg.fapool.attention_pool)
        stats = server.serve()
        counters = server.manager.counters() if server.manager is not None else None
        return {"role": "pool", "held": _held(server.kv), "served": stats.served_forward, "counters": counters}
    torch.manual_seed(0)  # the same weights on every replica
    spec, attention = slot_layer_spec(cfg)
    model = build_gpt_model(cfg, layer_spec=spec)
    c, vocab = model.config, cfg.model.language_model.vocab_size
    g = torch.Generator().manual_seed(5)
    requests = [Request(rid, torch.randint(0, vocab, (n,), generator=g).tolist(), NEW) for rid, (n, _) in
                REQUESTS.items()]
    replicas = groups.layout.dp
    replica = place_on_replicas(requests, [0.0] * len(requests), replicas=replicas, threshold=128)  # given order
    mine = [r for r, rep in zip(requests, replica) if rep == parallel_state.get_data_parallel_rank()]
    kv_heads = c.num_query_groups // tp  # this TP rank's
    shape = dict(layers=c.num_layers, kv_heads=kv_heads, head_dim=c.kv_channels, dtype=torch.float32, device="cpu")
    tp_group = parallel_state.get_tensor_model_parallel_group() if tp > 1 else None
    pool = MailboxClient(groups, device="cpu", stats=PoolStats(), threshold=128, kv_heads=kv_heads,
                         head_dim=c.kv_channels, dtype=torch.float32, max_active=1, backend="torch", tp_group=tp_group)
    engine = ServingEngine(model, attention, SlotCache(slots=3, capacity=CAPACITY, **shape), device="cpu",
                           sampling=Sampling(), max_new_tokens=NEW, pool=pool, pool_slots=4)
    placed = {}
    admit = pool.admit

    def recording_admit(request, tokens, prompt_len):
        got = admit(request, tokens, prompt_len)
        if got is not None:
            placed[request] = got
        return got
    pool.admit = recording_admit
    gens = serve(engine, [TimedRequest(r, REQUESTS[r.id][1]) for r in mine], clock=lambda: float(engine.steps))
    pool.shutdown()
    # alone, without the pool, from one slot long enough
    alone = {}
    for r in mine:
        if len(r.prompt) + NEW <= 2 * CAPACITY:
            solo = ServingEngine(model, attention, SlotCache(slots=1, capacity=len(r.prompt) + NEW, **shape),
                                 device="cpu", sampling=Sampling(), max_new_tokens=NEW)
            alone[r.id] = serve(solo, [TimedRequest(r)])[0].tokens
    return {"role": "base", "tokens": {x.id: x.tokens for x in gens}, "alone": alone, "placed": placed,
            "pooled": sorted(x.id for x in gens if x.pooled), "refused": {x.id: x.refused for x in gens if x.refused},
            "mine": [r.id for r in mine]}


@pytest.mark.parametrize("tp, replicas, spread", [(1, 3, [2, 2, 1]), (2, 2, [3, 2])])
def test_replicas_share_two_pool_ranks(tp, replicas, spread):
    from megatron_fapool.attention.pool.slot_kv import member_tokens

    n_base = tp * replicas
    out = run_distributed(_body, n_base + 2, tp, timeout=300)
    bases, pools = out[:n_base], out[n_base:]
    assert sorted(i for b in bases[::tp] for i in b["mine"]) == list(REQUESTS)  # every request on one replica
    longs = {rid for rid, (n, _) in REQUESTS.items() if n > 128}
    assert [len(set(b["mine"]) & longs) for b in bases[::tp]] == spread  # the front scheduler spreads the long ones
    for b in bases:
        assert b["refused"].keys() <= {6}
        for rid, tokens in b["tokens"].items():
            if rid == 6:  # 705 tokens > 2 slots of 320 (its base + one pool rank)
                assert tokens == [] and "exceeds the slot capacity 320 x 2 ranks" in b["refused"][6]
            else:
                assert tokens == b["alone"][rid], rid
        assert b["pooled"] == sorted(set(b["mine"]) & longs - {6})
    # each pool rank's slots hold what was placed there: the member-1 range of each long request
    uses = {}
    for b in bases:
        for rid, placement in b["placed"].items():
            ((p, s),) = placement
            n = REQUESTS[rid][0]
            share = int(member_tokens(1, torch.tensor([n]), torch.tensor([2]), torch.tensor([n + NEW - 1])))
            uses.setdefault((p, s), []).append(share)
    assert {p for p, _ in uses} == {n_base, n_base + 1}  # both pool ranks served
    for i, pool in enumerate(pools):
        for s, held in enumerate(pool["held"]):
            assert held == max(uses.get((n_base + i, s), [0])), (n_base + i, s, held, uses)
        assert pool["served"] > 0
    counters = pools[0]["counters"]  # the coordinator's ledger: everything released
    assert all(c["kv_tokens_held"] == 0 for c in counters["pool_ranks"].values())
    assert all(c["kv_tokens_peak"] > 0 for c in counters["pool_ranks"].values())
