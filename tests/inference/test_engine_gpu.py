"""Issue 15 on a GPU: the slot engine's CUDA-graph decode equals its eager decode, token for token, and
an eager decode step makes no synchronising call (torch's sync debug mode set to raise).

One GPU, the tiny RoPE model in fp32 (random weights); a continuous-batching run with
staggered arrivals gives every request the tokens it gets alone.
"""

import dataclasses
import os

import pytest
import torch

from megatron_fapool.testing.distributed import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "tiny_dense_rope.json")


def _body(rank, world):
    from megatron_fapool.config import load_run_config
    from megatron_fapool.inference.batching import TimedRequest, serve
    from megatron_fapool.inference.engine import ServingEngine
    from megatron_fapool.inference.generate import Request
    from megatron_fapool.inference.sampling import Sampling
    from megatron_fapool.inference.slots import SlotAttention, SlotCache
    from megatron_fapool.models.gpt import build_gpt_model
    from megatron_fapool.models.specs import layer_spec_for
    from megatron_fapool.parallel import initialize_parallel_groups, layout_from_config

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    cfg = load_run_config(CONFIG)
    initialize_parallel_groups(layout_from_config(cfg, 1))
    strategies = []
    spec = layer_spec_for(cfg, None, wrap=lambda a: strategies.append(SlotAttention(a)) or strategies[0])
    torch.manual_seed(3)
    model = build_gpt_model(cfg, layer_spec=spec).to(device).eval()  # fp32: batch-size rounding stays tiny
    c = model.config
    g = torch.Generator().manual_seed(5)
    lengths, new = (700, 33, 250, 1200, 9, 64), (12, 20, 7, 5, 16, 10)
    requests = [Request(i, torch.randint(0, 250, (n,), generator=g).tolist(), m)
                for i, (n, m) in enumerate(zip(lengths, new))]
    out = {}
    for name, graphs, sampling in (("eager", False, Sampling()), ("graph", True, Sampling()),
                                   ("eager_sampled", False, Sampling(greedy=False, top_k=8, seed=2)),
                                   ("graph_sampled", True, Sampling(greedy=False, top_k=8, seed=2))):
        cache = SlotCache(layers=c.num_layers, slots=3, capacity=1300, kv_heads=c.num_query_groups,
                          head_dim=c.kv_channels, dtype=torch.float32, device=device)
        engine = ServingEngine(model, strategies[0], cache, device=device, sampling=sampling, max_new_tokens=32,
                               cuda_graphs=graphs)
        timed = [TimedRequest(r, 0.002 * i) for i, r in enumerate(requests)]
        gens = serve(engine, timed)
        alone = {r.id: serve(engine, [TimedRequest(r)])[0].tokens for r in requests}
        out[name] = {"batched": {x.id: x.tokens for x in gens}, "alone": alone, "graphs": sorted(engine.graphs)}
        if name == "eager":  # no synchronising call inside an eager decode step
            engine.admit(50, 200)
            engine.prefill([(50, requests[1].prompt)])
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                engine._decode_forward(engine._bucket_of[engine.running])
            finally:
                torch.cuda.set_sync_debug_mode("default")
            engine.leave([50])
    return out


@pytest.mark.gpu
def test_graph_decode_equals_eager_decode():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    (res,) = run_distributed(_body, 1, timeout=300, backend="nccl")
    for mode in ("", "_sampled"):
        eager, graph = res["eager" + mode], res["graph" + mode]
        assert graph["graphs"] == [1, 2, 3] and eager["graphs"] == []
        assert graph["batched"] == eager["batched"]
        assert eager["batched"] == eager["alone"] and graph["batched"] == graph["alone"]
    assert res["eager"]["batched"] != res["eager_sampled"]["batched"]
