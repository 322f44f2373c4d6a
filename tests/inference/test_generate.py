"""Greedy generation equals a single-process Megatron model with the same weights, token for token:
the static session path (TP 2, one request per decode forward), PP 2, and the slot engine (issue 15)
at TP 2 without and with the pool.

Prompts below (60) and above (749, 300) the pool threshold (128). With the pool, the long ones are
prefilled through it and their K/V is spread over the slots of the base rank and its pool rank (half
each, nothing twice; request 1 is longer than one slot); all rows decode in one forward per step,
pooled and local side by side, the third request joining the running batch late.
"""

import dataclasses
import os

import torch

from megatron_fapool.testing.distributed import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "tiny_dense_rope_pool.json")
PROMPTS = {1: 749, 2: 60, 3: 300}
NEW = 6
SLOT_CAPACITY = 400  # request 1 fits only spread over a base and a pool rank


def _load(untie: bool = False):
    """The tiny config; ``untie``: separate output weights (Megatron ties them across
    pipeline stages with a CUDA-only copy, so the CPU pipeline test unties them)."""
    from megatron_fapool.config import load_run_config

    cfg = load_run_config(CONFIG)
    if untie:
        lm = cfg.model.language_model.model_copy(update={"untie_embeddings_and_output_weights": True})
        cfg = dataclasses.replace(cfg, model=cfg.model.model_copy(update={"language_model": lm}))
    return cfg


def _prompts(vocab):
    g = torch.Generator().manual_seed(11)
    return {rid: torch.randint(0, vocab, (n,), generator=g).tolist() for rid, n in PROMPTS.items()}


def _reference_body(rank, world, untie=False):
    from megatron_fapool.testing.megatron_reference import cpu_reference_shims, reference_gpt_model

    cfg = _load(untie)
    lm = cfg.model.language_model
    model = reference_gpt_model(cfg).eval()
    tokens = {}
    with cpu_reference_shims(), torch.no_grad():
        for rid, prompt in _prompts(lm.vocab_size).items():
            seq = list(prompt)
            for _ in range(NEW):  # no cache: the whole sequence every step
                n = len(seq)
                mask = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)[None, None]
                logits = model(torch.tensor([seq]), torch.arange(n)[None], mask)
                seq.append(int(logits[0, -1].argmax()))
            tokens[rid] = seq[len(prompt):]
    return {"state": {k: v.detach().clone() for k, v in model.named_parameters()}, "tokens": tokens}


def _served_body(rank, world, reference, pool_on, decode_batch):
    from megatron.core import parallel_state

    from megatron_fapool.attention.pool import AttentionPool, PoolServer
    from megatron_fapool.inference.generate import Request, generate
    from megatron_fapool.inference.session import InferenceSession, KVCached
    from megatron_fapool.models.gpt import build_gpt_model
    from megatron_fapool.models.specs import layer_spec_for
    from megatron_fapool.parallel import initialize_parallel_groups, layout_from_config
    from megatron_fapool.testing.megatron_reference import load_sharded

    cfg = _load(untie=True)
    pool_cfg = cfg.fapool.attention_pool.model_copy(update={"enabled": pool_on, "pool_size": world - 2})
    cfg = dataclasses.replace(cfg, fapool=cfg.fapool.model_copy(update={"attention_pool": pool_cfg}))
    groups = initialize_parallel_groups(layout_from_config(cfg, world))
    if groups.is_pool:
        server = PoolServer(groups, device=torch.device("cpu"))
        held = {}
        free = server.kv.free

        def snapshot_then_free(request):
            held[request] = server.kv.tokens_of(request)
            free(request)
        server.kv.free = snapshot_then_free
        stats = server.serve()
        return {"role": "pool", "held": held, "left": len(server.kv.shards), "stats": stats.as_dict()}
    pool = AttentionPool.for_base_rank(groups, cfg.fapool.attention_pool) if pool_on else None
    session = InferenceSession(pool)
    spec = layer_spec_for(cfg, pool, wrap=lambda attend: KVCached(attend, session))
    model = build_gpt_model(cfg, layer_spec=spec)
    load_sharded(model, reference["state"], parallel_state.get_tensor_model_parallel_rank(), 2)
    lm = cfg.model.language_model
    requests = [Request(rid, p, NEW) for rid, p in _prompts(lm.vocab_size).items()]
    out = generate(model, session, requests, vocab_size=lm.vocab_size, max_positions=lm.max_position_embeddings,
                   device=torch.device("cpu"), tp_group=parallel_state.get_tensor_model_parallel_group(),
                   decode_batch=decode_batch)
    if pool is not None:
        pool.shutdown(torch.device("cpu"))
    return {"role": "base", "gens": [dataclasses.asdict(g) for g in out], "forwards": session.forwards,
            "decode_rows": session.decode_rows}


def _stage_state(full_state: dict, model, num_layers: int) -> dict:
    """The reference's parameters under this pipeline stage's (local) names."""
    from megatron.core import parallel_state

    per_stage = num_layers // parallel_state.get_pipeline_model_parallel_world_size()
    offset = parallel_state.get_pipeline_model_parallel_rank() * per_stage
    out = {}
    for name, _ in model.named_parameters():
        if name.startswith("decoder.layers."):
            _, _, j, rest = name.split(".", 3)
            out[name] = full_state[f"decoder.layers.{int(j) + offset}.{rest}"]
        elif name == "output_layer.weight" and name not in full_state:  # tied to the embedding
            out[name] = full_state["embedding.word_embeddings.weight"]
        else:
            out[name] = full_state[name]
    return out


def _pipeline_body(rank, world, reference):
    """Static pipeline parallelism (PP 2, no pool): each stage keeps its own layers' KV cache."""
    from megatron.core import parallel_state

    from megatron_fapool.inference.generate import Request, generate
    from megatron_fapool.inference.session import InferenceSession, KVCached
    from megatron_fapool.models.gpt import build_gpt_model
    from megatron_fapool.models.specs import layer_spec_for
    from megatron_fapool.parallel import initialize_parallel_groups, layout_from_config
    from megatron_fapool.testing.megatron_reference import load_sharded

    cfg = _load(untie=True)
    pool_cfg = cfg.fapool.attention_pool.model_copy(update={"enabled": False})
    cfg = dataclasses.replace(cfg, tensor_model_parallel_size=1, pipeline_model_parallel_size=2,
                              fapool=cfg.fapool.model_copy(update={"attention_pool": pool_cfg}))
    initialize_parallel_groups(layout_from_config(cfg, world))
    session = InferenceSession(None)
    spec = layer_spec_for(cfg, None, wrap=lambda attend: KVCached(attend, session))
    model = build_gpt_model(cfg, layer_spec=spec)
    lm = cfg.model.language_model
    load_sharded(model, _stage_state(reference["state"], model, lm.num_layers), 0, 1)
    requests = [Request(rid, p, NEW) for rid, p in _prompts(lm.vocab_size).items()]
    out = generate(model, session, requests, vocab_size=lm.vocab_size, max_positions=lm.max_position_embeddings,
                   device=torch.device("cpu"), pp_group=parallel_state.get_pipeline_model_parallel_group())
    return {"tokens": {g.id: g.tokens for g in out}, "kv": {g.id: g.kv_tokens_on_base for g in out}}


def _slots_body(reference):
    """The slot engine at TP 2 (groups made by the static run): all three requests in one packed prefill,
    then one decode forward per step for all of them."""
    from megatron.core import parallel_state

    from megatron_fapool.inference.batching import TimedRequest, serve
    from megatron_fapool.inference.engine import ServingEngine
    from megatron_fapool.inference.generate import Request
    from megatron_fapool.inference.sampling import Sampling
    from megatron_fapool.inference.slots import SlotAttention, SlotCache
    from megatron_fapool.models.gpt import build_gpt_model
    from megatron_fapool.models.specs import layer_spec_for
    from megatron_fapool.testing.megatron_reference import load_sharded

    cfg = _load(untie=True)
    cfg = dataclasses.replace(cfg, fapool=cfg.fapool.model_copy(update={
        "attention_pool": cfg.fapool.attention_pool.model_copy(update={"enabled": False})}))
    attention = []
    model = build_gpt_model(cfg, layer_spec=layer_spec_for(
        cfg, None, wrap=lambda attend: attention.append(SlotAttention(attend)) or attention[0]))
    load_sharded(model, reference["state"], parallel_state.get_tensor_model_parallel_rank(), 2)
    c, lm = model.config, cfg.model.language_model
    cache = SlotCache(layers=c.num_layers, slots=3, capacity=max(PROMPTS.values()) + NEW, kv_heads=c.num_query_groups // 2,
                      head_dim=c.kv_channels, dtype=torch.float32, device="cpu")
    engine = ServingEngine(model, attention[0], cache, device="cpu", sampling=Sampling(), max_new_tokens=NEW,
                           tp_group=parallel_state.get_tensor_model_parallel_group())
    prefills = []
    gens = serve(engine, [TimedRequest(Request(rid, p, NEW)) for rid, p in _prompts(lm.vocab_size).items()],
                 on_step=lambda kind, rows, waiting: prefills.append(rows) if kind == "prefill" else None)
    return {"tokens": {g.id: g.tokens for g in gens}, "prefills": prefills, "decode_steps": engine.steps}


def _pooled_slots_body(rank, world, reference):
    """The slot engine at TP 2 with the pool (one pool rank per base rank), continuous batching: requests 1
    and 2 at once, 3 later (it joins the running batch); 1 and 3 are pooled (1 is longer than a slot), 2 not."""
    from megatron.core import parallel_state

    from megatron_fapool.attention.pool import AttentionPool, PoolServer
    from megatron_fapool.inference.batching import TimedRequest, serve
    from megatron_fapool.inference.engine import ServingEngine
    from megatron_fapool.inference.generate import Request
    from megatron_fapool.inference.sampling import Sampling
    from megatron_fapool.inference.slots import SlotCache, slot_layer_spec
    from megatron_fapool.models.gpt import build_gpt_model
    from megatron_fapool.parallel import initialize_parallel_groups, layout_from_config
    from megatron_fapool.testing.megatron_reference import load_sharded

    def held(kv):  # K/V rows written in each slot of the first layer (the caches start zeroed)
        return [int((kv.k[0][s].abs().sum((-1, -2)) > 0).sum()) for s in range(kv.slots)]

    cfg = _load(untie=True)
    groups = initialize_parallel_groups(layout_from_config(cfg, world))
    if groups.is_pool:
        server = PoolServer(groups, device=torch.device("cpu"))
        stats = server.serve()
        return {"role": "pool", "held": held(server.slot_kv), "stats": stats.as_dict()}
    pool = AttentionPool.for_base_rank(groups, cfg.fapool.attention_pool)
    spec, attention = slot_layer_spec(cfg)
    model = build_gpt_model(cfg, layer_spec=spec)
    load_sharded(model, reference["state"], parallel_state.get_tensor_model_parallel_rank(), 2)
    c, lm = model.config, cfg.model.language_model
    cache = SlotCache(layers=c.num_layers, slots=3, capacity=SLOT_CAPACITY, kv_heads=c.num_query_groups // 2,
                      head_dim=c.kv_channels, dtype=torch.float32, device="cpu")
    engine = ServingEngine(model, attention, cache, device="cpu", sampling=Sampling(), max_new_tokens=NEW,
                           tp_group=parallel_state.get_tensor_model_parallel_group(), pool=pool)
    arrival = {1: 0.0, 2: 0.0, 3: 2.0}  # in decode steps: 3 joins after the second
    gens = serve(engine, [TimedRequest(Request(rid, p, NEW), arrival[rid]) for rid, p in _prompts(lm.vocab_size).items()],
                 clock=lambda: float(engine.steps))
    pool.shutdown(torch.device("cpu"))
    return {"role": "base", "tokens": {g.id: g.tokens for g in gens}, "pooled": [g.id for g in gens if g.pooled],
            "held": held(cache), "decode_steps": engine.steps}


def _static_then_pipeline_body(rank, world, reference):
    """Static TP 2 (one request per decode forward), the slot engine at TP 2, then PP 2, in one launch of two ranks."""
    from megatron.core import parallel_state

    static = _served_body(rank, world, reference, False, 1)
    slots = _slots_body(reference)
    parallel_state.destroy_model_parallel()
    return {"static": static, "slots": slots, "pipeline": _pipeline_body(rank, world, reference)}


def test_greedy_generation_pool_equals_static_equals_megatron():
    reference = run_distributed(_reference_body, 1, True, timeout=240)[0]  # untied: the CPU pipeline needs it
    # the slot engine with the pool, TP 2: two pooled requests and a local one, the third joining late
    pooled = run_distributed(_pooled_slots_body, 4, reference, timeout=300)
    # static: one request per decode forward; the slot engine without the pool; PP 2
    both = run_distributed(_static_then_pipeline_body, 2, reference, timeout=300)
    static, pipeline = [r["static"] for r in both], [r["pipeline"] for r in both]
    for r in both:  # the slot engine: the same tokens, one packed prefill and NEW - 1 decode forwards
        assert r["slots"] == {"tokens": reference["tokens"], "prefills": [3], "decode_steps": NEW - 1}
    for stage in pipeline:  # both stages end with the same tokens; each holds its own layer's K/V
        assert stage["tokens"] == reference["tokens"]
        assert stage["kv"][1] == PROMPTS[1] + NEW - 1
    for r in static:
        assert {g["id"]: g["tokens"] for g in r["gens"]} == reference["tokens"]
        assert r["forwards"] == {"prefill": 3, "decode": 3 * (NEW - 1)} and r["decode_rows"] == 3 * (NEW - 1)
    # pooled slots: the same tokens; 3 decoded from step 2 on beside the others (2 + NEW - 1 steps in all)
    bases = [r for r in pooled if r["role"] == "base"]
    pools = [r for r in pooled if r["role"] == "pool"]
    for b, p in zip(bases, pools):  # base rank i owns pool rank 2 + i
        assert b["tokens"] == reference["tokens"] and b["pooled"] == [1, 3]
        assert b["decode_steps"] == 2 + NEW - 1
        # K/V rows in slots 0, 1, 2 (requests 1, 2, 3): a pooled request's halves on the base and its pool
        # rank, nothing twice; the local one on the base only (the last token is never fed back)
        total = {rid: n + NEW - 1 for rid, n in PROMPTS.items()}
        assert b["held"] == [-(-total[1] // 2), total[2], -(-total[3] // 2)]
        assert p["held"] == [total[1] // 2, 0, total[3] // 2]
        layers = 2  # the pool served each layer of the two pooled prefills and of every decode step
        assert p["stats"]["served_forward"] == layers * (2 + (2 + NEW - 1))
