"""Issue 5 on a GPU: batched decode with RoPE (each row at its own position) through the pool.

1 base + 1 pool GPU (NCCL), the tiny model with RoPE (megatron-core 0.16 builds RoPE on
CUDA only), prompts below and above the pool threshold. Greedy tokens of the batched
decode (all requests in one forward per step), of one request per forward, and of a
full recompute without any cache (Megatron's forward over the whole sequence every
step) must be the same.
"""

import dataclasses
import os

import pytest
import torch

from megatron_fapool.testing.distributed import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "tiny_dense_pool.json")
PROMPTS = {1: 749, 2: 60, 3: 300}
NEW = 6


def _body(rank, world):
    from megatron_fapool.attention.pool import AttentionPool, PoolServer
    from megatron_fapool.config import load_run_config
    from megatron_fapool.inference.generate import Request, generate
    from megatron_fapool.inference.session import InferenceSession, KVCached
    from megatron_fapool.models.gpt import build_gpt_model
    from megatron_fapool.models.specs import layer_spec_for
    from megatron_fapool.parallel import initialize_parallel_groups, layout_from_config

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    cfg = load_run_config(CONFIG)
    lm = cfg.model.language_model.model_copy(update={"position_embedding_type": "rope"})
    pool_cfg = cfg.fapool.attention_pool.model_copy(update={"pool_size": 1})
    cfg = dataclasses.replace(cfg, tensor_model_parallel_size=1,
                              model=cfg.model.model_copy(update={"language_model": lm}),
                              fapool=cfg.fapool.model_copy(update={"attention_pool": pool_cfg}))
    groups = initialize_parallel_groups(layout_from_config(cfg, world))
    if groups.is_pool:
        return {"served": PoolServer(groups, device=device).serve().served_forward}
    pool = AttentionPool.for_base_rank(groups, cfg.fapool.attention_pool)
    session = InferenceSession(pool)
    spec = layer_spec_for(cfg, pool, wrap=lambda attend: KVCached(attend, session))
    torch.manual_seed(3)
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(3)
    model = build_gpt_model(cfg, layer_spec=spec).to(device).eval()
    g = torch.Generator().manual_seed(5)
    prompts = {rid: torch.randint(0, lm.vocab_size, (n,), generator=g).tolist() for rid, n in PROMPTS.items()}
    requests = [Request(rid, p, NEW) for rid, p in prompts.items()]
    kw = dict(vocab_size=lm.vocab_size, max_positions=lm.max_position_embeddings, device=device)
    batched = {x.id: x.tokens for x in generate(model, session, requests, decode_batch=0, **kw)}
    forwards = dict(session.forwards)
    single = {x.id: x.tokens for x in generate(model, session, requests, decode_batch=1, **kw)}
    recomputed = {}
    with torch.no_grad():
        for rid, prompt in prompts.items():
            seq = list(prompt)
            for _ in range(NEW):  # no cache; long sequences run through the pool's training forward
                pool.manager.new_step()
                n = len(seq)
                logits = model(torch.tensor([seq], device=device), torch.arange(n, device=device)[None], None)
                seq.append(int(logits[0, -1].argmax()))
            recomputed[rid] = seq[len(prompt):]
    pool.shutdown(device)
    return {"batched": batched, "single": single, "recomputed": recomputed, "forwards": forwards}


@pytest.mark.gpu
def test_batched_rope_decode_through_the_pool_equals_recompute():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    base, pool = run_distributed(_body, 2, timeout=240, backend="nccl")
    assert base["batched"] == base["single"] == base["recomputed"]
    assert base["forwards"] == {"prefill": 3, "decode": NEW - 1}  # one forward per step for all three
    assert pool["served"] > 0
