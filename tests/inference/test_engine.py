"""Issue 15 (CPU part): the slot engine's decode step and continuous batching.

One process (TP 1, gloo), the tiny RoPE model with random weights. Served alone, each
request gives the reference tokens; under continuous batching with staggered arrivals,
fewer slots than requests (some wait), a request too long for a slot (refused with a
message) and a stop token, every request gets the same tokens as alone, greedy and
sampled. A decode step makes one host read (the new tokens) and its Python work is the
same for 1 and for 5 running rows. The test that the slot engine equals today's path and
Megatron at TP 2 is in test_generate.py.
"""

import dataclasses
import os
import sys

import torch

from megatron_fapool.testing.distributed import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "tiny_dense_rope_pool.json")
LENGTHS = (37, 300, 5, 120, 64)
NEW = (6, 3, 9, 1, 5)


class SimClock:
    """A clock that advances a quarter second each time it is read; sleeping advances it too."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        self.t += 0.25
        return self.t

    def sleep(self, s):
        self.t += s


def _build(slots, capacity, sampling):
    from megatron_fapool.config import load_run_config
    from megatron_fapool.inference.engine import ServingEngine
    from megatron_fapool.inference.slots import SlotCache, slot_layer_spec
    from megatron_fapool.models.gpt import build_gpt_model
    from megatron_fapool.parallel import initialize_parallel_groups, layout_from_config

    cfg = load_run_config(CONFIG)
    off = cfg.fapool.attention_pool.model_copy(update={"enabled": False})
    cfg = dataclasses.replace(cfg, tensor_model_parallel_size=1, fapool=cfg.fapool.model_copy(
        update={"attention_pool": off}))
    from megatron.core import parallel_state
    if not parallel_state.model_parallel_is_initialized():
        initialize_parallel_groups(layout_from_config(cfg, 1))
    spec, attention = slot_layer_spec(cfg)
    torch.manual_seed(4)
    model = build_gpt_model(cfg, layer_spec=spec)
    c = model.config
    cache = SlotCache(layers=c.num_layers, slots=slots, capacity=capacity, kv_heads=c.num_query_groups,
                      head_dim=c.kv_channels, dtype=torch.float32, device="cpu")
    lm = cfg.model.language_model
    return ServingEngine(model, attention, cache, device="cpu", sampling=sampling, max_new_tokens=16), lm


def _requests(vocab):
    from megatron_fapool.inference.generate import Request

    g = torch.Generator().manual_seed(9)
    return [Request(i, torch.randint(0, vocab, (n,), generator=g).tolist(), new)
            for i, (n, new) in enumerate(zip(LENGTHS, NEW))]


def _reference(model, prompt, new):
    """No cache: Megatron's forward over the whole sequence each step (the model outside a step)."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(new):
            logits = model(torch.tensor([seq]), torch.arange(len(seq))[None], None)
            seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):]


def _count_python_calls(fn) -> int:
    calls = [0]

    def prof(frame, event, arg):
        if event in ("call", "c_call"):
            calls[0] += 1
    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls[0]


class HostReads(torch.overrides.TorchFunctionMode):
    """Records every tensor -> host read (item, tolist, bool, ...) and copies into a given host buffer."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__bool__,
             torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__}

    def __init__(self, host_buffer):
        super().__init__()
        self.host = host_buffer
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.reads.append(func.__name__)
        elif func is torch.Tensor.copy_ and args[0].data_ptr() >= self.host.data_ptr() and \
                args[0].data_ptr() < self.host.data_ptr() + self.host.numel() * 8:
            self.reads.append("copy_to_host")
        return func(*args, **(kwargs or {}))


def _body(rank, world):
    from megatron_fapool.inference.batching import TimedRequest, serve
    from megatron_fapool.inference.sampling import Sampling

    out = {}
    for mode, sampling in (("greedy", Sampling()), ("sampled", Sampling(greedy=False, temperature=0.8, top_k=20,
                                                                         seed=3))):
        engine, lm = _build(slots=3, capacity=320, sampling=sampling)
        requests = _requests(lm.vocab_size)
        if mode == "greedy":
            out["reference"] = {r.id: _reference(engine.model, r.prompt, r.max_new_tokens) for r in requests}
        alone = {}
        for r in requests:
            clock = SimClock()
            (g,) = serve(engine, [TimedRequest(r, 0.0)], clock=clock, sleep=clock.sleep)
            alone[r.id] = g.tokens
        assert engine.running == 0 and engine.cache.busy == 0
        too_long = dataclasses.replace(requests[1], id=99, max_new_tokens=30)  # 300 + 30 > 320
        timed = [TimedRequest(r, t) for r, t in zip(requests, (0.0, 0.3, 0.4, 0.5, 3.1))] + [TimedRequest(too_long, 1.0)]
        steps = []
        clock = SimClock()
        gens = serve(engine, timed, clock=clock, sleep=clock.sleep,
                     on_step=lambda kind, rows, waiting: steps.append((kind, rows, waiting)))
        assert all(len(g.decode_s) == len(g.tokens) - 1 and all(t > 0 for t in g.decode_s)
                   for g in gens if g.refused is None)  # the engine's step count carries over between serve calls
        out[mode] = {"alone": alone, "batched": {g.id: g.tokens for g in gens if g.refused is None},
                     "refused": {g.id: g.refused for g in gens if g.refused}, "steps": steps,
                     "ttft": {g.id: g.ttft_s for g in gens}, "busy_after": engine.cache.busy}
        if mode == "greedy":  # a stop token: the request leaves at it, the others go on
            stop = alone[0][2]
            clock = SimClock()
            gens = serve(engine, timed[:3], clock=clock, sleep=clock.sleep, stop_token=stop)
            out["stopped"] = {g.id: g.tokens for g in gens}, stop
            # host reads and Python work of one decode step, with 1 and with 5 running rows
            from megatron_fapool.inference.engine import ServingEngine
            from megatron_fapool.inference.slots import SlotCache

            c = engine.cache
            cache = SlotCache(layers=c.layers, slots=5, capacity=64, kv_heads=c.kv_heads, head_dim=c.head_dim,
                              dtype=torch.float32, device="cpu")
            engine = ServingEngine(engine.model, engine.attention, cache, device="cpu", sampling=Sampling(),
                                   max_new_tokens=8)
            counts, reads = {}, {}
            for n in (1, 5):
                batch = [(100 + i, requests[i % 3].prompt[:30]) for i in range(n)]
                for rid, _ in batch:
                    engine.admit(rid, 64)
                engine.prefill(batch)
                engine.decode()  # warm
                counts[n] = _count_python_calls(engine.decode)
                mode_ = HostReads(engine.host_tokens)
                with mode_:
                    engine.decode()
                reads[n] = mode_.reads
                engine.leave([rid for rid, _ in batch])
            out["calls"], out["reads"] = counts, reads
    return out


def test_continuous_batching_gives_every_request_its_alone_tokens():
    (res,) = run_distributed(_body, 1, timeout=240)
    greedy, sampled = res["greedy"], res["sampled"]
    assert greedy["alone"] == res["reference"]  # the slot engine equals Megatron without a cache
    for r in (greedy, sampled):
        assert r["batched"] == r["alone"]
        assert list(r["refused"]) == [99] and "slot capacity 320" in r["refused"][99]
        assert r["busy_after"] == 0
        decode_rows = [rows for kind, rows, _ in r["steps"] if kind == "decode"]
        assert max(decode_rows) == 3  # three slots: never more rows, and they filled
        assert any(waiting for _, _, waiting in r["steps"])  # some request waited for a slot
    assert sampled["alone"] != greedy["alone"]  # sampling really sampled
    stopped, stop = res["stopped"]
    for rid in (0, 1, 2):  # each left at its first stop token, the others went on
        toks = greedy["alone"][rid]
        assert stopped[rid] == (toks[: toks.index(stop) + 1] if stop in toks else toks)
    assert len(stopped[0]) < len(greedy["alone"][0])
    assert res["calls"][1] == res["calls"][5]  # per-step Python work does not grow with the batch
    assert res["reads"] == {1: ["copy_to_host"], 5: ["copy_to_host"]}  # one host read per step
