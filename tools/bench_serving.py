"""Decode TPOT of the slot engine beside the HBM bound and the eager path; batched prefill beside one packed forward.

    python tools/bench_serving.py --deepspeed_config configs/paper_dense_pool.json \\
        --markdown runs/bench_serving.md --output runs/bench_serving.json --plot runs/bench_serving.svg

One GPU, random weights of the config's model (the pool switched off), one process. For
each ``CONTEXTxBATCH`` case the slots of a fresh :class:`~megatron_fapool.inference.slots.SlotCache`
are filled with ``CONTEXT`` tokens of random K/V, the requests join with a first token,
and the engine decodes ``--warmup`` + ``--steps`` steps: once eagerly and once replaying
its CUDA graph, from the same state. Printed per case: the median TPOT of each, the HBM
bound ``(weights read + K/V read) / copy bandwidth`` (the weights every step reads: all
parameters but the input embedding table, of which only the batch's rows are read;
K/V: ``batch x context x`` the K/V bytes per token; the copy bandwidth of a large
``dst.copy_(src)`` measured in the same run), the ratio to the bound, and whether graph
and eager produced the same tokens. The per-request cost per step is the growth of
(TPOT - bound) from the smallest to the largest batch at the first context, per added
request.

Prefill (``--prefill 64x512``): ``N`` prompts of ``L`` tokens arriving together, prefilled
in one packed forward by the engine, against one plain forward over all ``N x L`` tokens
as one sequence (the model outside a step), and against ``N`` prefills of one prompt
each (what a one-request-per-forward server does).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import torch

from megatron_fapool.config import ConfigError, load_run_config
from megatron_fapool.inference.engine import ServingEngine
from megatron_fapool.inference.sampling import Sampling
from megatron_fapool.inference.slots import SlotCache, slot_layer_spec
from megatron_fapool.models.gpt import build_gpt_model
from megatron_fapool.runtime import exit_on_user_error

from _common import copy_bandwidth, free_memory, megatron_world_of_one, sync

CASES = ("8192x1", "8192x16", "8192x64", "8192x128", "32768x1", "32768x4", "131072x1", "131072x4")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deepspeed_config", "--deepspeed-config", required=True)
    p.add_argument("--cases", nargs="+", default=list(CASES), metavar="CTXxBATCH")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per case and path")
    p.add_argument("--warmup", type=int, default=4, help="untimed decode steps first")
    p.add_argument("--prefill", default="64x512", metavar="NxLEN", help="batched prefill case ('' to skip)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--copy-gib", type=float, default=4.0, help="buffer size of the copy-bandwidth measurement")
    p.add_argument("--markdown", default=None)
    p.add_argument("--output", default=None, help="all results as JSON")
    p.add_argument("--plot", default=None, help="an SVG of TPOT against batch size at the first context")
    return p.parse_args(argv)


def _case(item: str) -> tuple[int, int]:
    parts = item.lower().split("x")
    if len(parts) != 2 or not all(x.isdigit() and int(x) > 0 for x in parts):
        raise ConfigError("--cases", f"{item!r}: expected CTXxBATCH with positive integers, e.g. 8192x16")
    return int(parts[0]), int(parts[1])


def _build(path, device):
    cfg = load_run_config(path)
    cfg = dataclasses.replace(cfg, tensor_model_parallel_size=1, fapool=cfg.fapool.model_copy(update={
        "attention_pool": cfg.fapool.attention_pool.model_copy(update={"enabled": False})}))
    spec, attention = slot_layer_spec(cfg)
    torch.manual_seed(0)
    model = build_gpt_model(cfg, layer_spec=spec).to(device).eval()
    return cfg, model, attention


def weight_bytes_read(model) -> int:
    """Bytes of parameters one decode step reads: all but the input embedding table (only its rows are read),
    which is counted once if the output layer shares it."""
    emb = model.embedding.word_embeddings.weight
    total = sum(p.numel() * p.element_size() for p in model.parameters() if p is not emb)
    if model.share_embeddings_and_output_weights:
        total += emb.numel() * emb.element_size()
    return total


def _decode_run(engine, ctx: int, b: int, first, steps: int, warmup: int):
    """Join ``b`` requests over ``ctx`` cached tokens, decode; (per-step seconds of the timed steps, tokens)."""
    for r in range(b):
        engine.admit(r, ctx + warmup + steps + 1)
    engine.join(list(range(b)), [ctx] * b, first)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        engine.decode()  # ends with the step's one host synchronisation
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times, engine.leave(list(range(b)))


def bench_decode(model, attention, device, ctx: int, b: int, *, steps: int, warmup: int, bw: float, wbytes: int):
    c = model.config
    cache = SlotCache(layers=c.num_layers, slots=b, capacity=ctx + warmup + steps + 1, kv_heads=c.num_query_groups,
                      head_dim=c.kv_channels, dtype=c.params_dtype, device=device)
    for t in cache.k + cache.v:
        t.normal_()
    first = torch.randint(0, model.vocab_size, (b,), generator=torch.Generator().manual_seed(ctx + b))
    kw = dict(device=device, sampling=Sampling(), max_new_tokens=warmup + steps + 2, buckets=(b,))
    out = {"context": ctx, "batch": b}
    tokens = {}
    for name, graphs in (("eager", False), ("graph", device.type == "cuda")):
        engine = ServingEngine(model, attention, cache, cuda_graphs=graphs, **kw)
        times, tokens[name] = _decode_run(engine, ctx, b, first, steps, warmup)
        out[f"{name}_ms"] = 1e3 * statistics.median(times)
        del engine
    kv_per_token = 2 * c.num_layers * c.num_query_groups * c.kv_channels * cache.k[0].element_size()
    kv = b * (ctx + warmup + steps // 2) * kv_per_token
    out.update(weights_gb=wbytes / 1e9, kv_gb=kv / 1e9, bound_ms=1e3 * (wbytes + kv) / bw,
               same_tokens=tokens["eager"] == tokens["graph"])
    out["ratio"] = out["graph_ms"] / out["bound_ms"]
    del cache
    free_memory(device)
    return out


def bench_prefill(model, attention, device, n: int, length: int, reps: int = 3) -> dict:
    c = model.config
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, model.vocab_size, (length,), generator=g).tolist() for _ in range(n)]
    cache = SlotCache(layers=c.num_layers, slots=n, capacity=length + 1, kv_heads=c.num_query_groups,
                      head_dim=c.kv_channels, dtype=c.params_dtype, device=device)
    engine = ServingEngine(model, attention, cache, device=device, sampling=Sampling(), max_new_tokens=1,
                           cuda_graphs=False)

    def timed(fn):
        times = []
        for _ in range(reps + 1):  # the first is a warm-up
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(times[1:])

    def packed():
        for r in range(n):
            engine.admit(r, length + 1)
        engine.prefill([(r, p) for r, p in enumerate(prompts)])
        engine.leave(list(range(n)))

    def one_by_one():
        for r, p in enumerate(prompts):
            engine.admit(r, length + 1)
            engine.prefill([(r, p)])
            engine.leave([r])

    ids = torch.tensor([t for p in prompts for t in p], device=device)[None]
    pos = torch.arange(ids.shape[1], device=device)[None]
    with torch.no_grad():
        plain = timed(lambda: model(ids, pos, None))
    out = {"prompts": n, "length": length, "packed_ms": timed(packed), "one_forward_ms": plain,
           "one_by_one_ms": timed(one_by_one)}
    out["ratio"] = out["packed_ms"] / out["one_forward_ms"]
    del engine, cache
    free_memory(device)
    return out


def _svg(rows, path: str) -> None:
    """TPOT (graph, eager) and the bound against batch size at one context, as a small SVG line chart."""
    xs = [r["batch"] for r in rows]
    series = (("graph", "#1f77b4"), ("eager", "#d62728"), ("bound", "#2ca02c"))
    ymax = max(max(r[f"{k}_ms"] for k, _ in series) for r in rows) * 1.1
    w, h, m = 560, 340, 50
    X = lambda x: m + (w - 2 * m) * (xs.index(x) / max(len(xs) - 1, 1))  # noqa: E731 - even spacing
    Y = lambda y: h - m - (h - 2 * m) * y / ymax  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
             f'font-size="12"><rect width="{w}" height="{h}" fill="white"/>',
             f'<text x="{w / 2}" y="20" text-anchor="middle">decode TPOT at context {rows[0]["context"]}'
             f' ({rows[0].get("device", "")})</text>',
             f'<line x1="{m}" y1="{h - m}" x2="{w - m}" y2="{h - m}" stroke="black"/>',
             f'<line x1="{m}" y1="{m}" x2="{m}" y2="{h - m}" stroke="black"/>',
             f'<text x="{w / 2}" y="{h - 12}" text-anchor="middle">batch size</text>',
             f'<text x="14" y="{h / 2}" transform="rotate(-90 14 {h / 2})" text-anchor="middle">TPOT (ms)</text>']
    for x in xs:
        parts.append(f'<text x="{X(x)}" y="{h - m + 16}" text-anchor="middle">{x}</text>')
    for i in range(5):
        y = ymax * i / 4
        parts.append(f'<text x="{m - 6}" y="{Y(y) + 4}" text-anchor="end">{y:.1f}</text>')
    for j, (k, color) in enumerate(series):
        pts = " ".join(f"{X(r['batch']):.1f},{Y(r[f'{k}_ms']):.1f}" for r in rows)
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"/>')
        parts.append(f'<text x="{m + 10}" y="{m + 14 * j}" fill="{color}">{k}</text>')
    parts.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(parts))


def main(argv=None) -> int:
    args = parse_args(argv)
    cases = [_case(c) for c in args.cases]
    prefill = None
    if args.prefill:
        prefill = _case(args.prefill)
    with megatron_world_of_one(args.device) as device:
        _, model, attention = _build(args.deepspeed_config, device)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        bw = copy_bandwidth(device, args.copy_gib, 10)
        wbytes = weight_bytes_read(model)
        print(f"{name}: copy bandwidth {bw / 1e12:.2f} TB/s; weights read per step {wbytes / 1e9:.2f} GB", flush=True)
        rows = []
        for ctx, b in cases:
            r = bench_decode(model, attention, device, ctx, b, steps=args.steps, warmup=args.warmup, bw=bw,
                             wbytes=wbytes)
            r["device"] = name
            rows.append(r)
            print(f"{ctx:>7} x {b:<4} graph {r['graph_ms']:7.3f} ms  eager {r['eager_ms']:7.3f} ms  bound"
                  f" {r['bound_ms']:7.3f} ms  graph/bound {r['ratio']:.2f}x  same tokens {r['same_tokens']}",
                  flush=True)
        first = [r for r in rows if r["context"] == rows[0]["context"]]
        per_request_us = None
        if len(first) > 1:
            lo, hi = min(first, key=lambda r: r["batch"]), max(first, key=lambda r: r["batch"])
            per_request_us = 1e3 * ((hi["graph_ms"] - hi["bound_ms"]) - (lo["graph_ms"] - lo["bound_ms"])) / (
                hi["batch"] - lo["batch"])
            print(f"per-request cost per step above the bound (context {lo['context']}, batch {lo['batch']} ->"
                  f" {hi['batch']}): {per_request_us:.1f} us", flush=True)
        pre = None
        if prefill is not None:
            pre = bench_prefill(model, attention, device, prefill[0], prefill[1])
            print(f"prefill {pre['prompts']} x {pre['length']}: packed {pre['packed_ms']:.1f} ms, one forward over"
                  f" {pre['prompts'] * pre['length']} tokens {pre['one_forward_ms']:.1f} ms ({pre['ratio']:.2f}x),"
                  f" one prompt per forward {pre['one_by_one_ms']:.1f} ms", flush=True)
    result = {"device": name, "date": time.strftime("%Y-%m-%d"), "copy_bandwidth_tbs": bw / 1e12,
              "weights_gb": wbytes / 1e9, "decode": rows, "per_request_us": per_request_us, "prefill": pre}
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
    if args.markdown:
        lines = [f"{name}, {result['date']}, copy bandwidth {bw / 1e12:.2f} TB/s, weights read per step"
                 f" {wbytes / 1e9:.2f} GB, {args.warmup} + {args.steps} steps (median of the timed ones)", "",
                 "| context x batch | slot engine, CUDA graph (ms) | same engine, eager (ms) | HBM bound (ms) |"
                 " graph / bound | graph == eager tokens |", "|---|---:|---:|---:|---:|---|"]
        for r in rows:
            ctx = f"{r['context'] // 1024}K" if r["context"] % 1024 == 0 else str(r["context"])
            lines.append(f"| {ctx} x {r['batch']} | {r['graph_ms']:.3f} | {r['eager_ms']:.3f} |"
                         f" {r['bound_ms']:.3f} | {r['ratio']:.2f}x | {'yes' if r['same_tokens'] else 'NO'} |")
        if per_request_us is not None:
            lines += ["", f"Per-request cost per step above the bound: {per_request_us:.1f} us."]
        if pre is not None:
            lines += ["", f"Prefill of {pre['prompts']} prompts x {pre['length']} tokens arriving together: packed"
                      f" {pre['packed_ms']:.1f} ms; one forward over all {pre['prompts'] * pre['length']} tokens"
                      f" {pre['one_forward_ms']:.1f} ms (ratio {pre['ratio']:.2f}); one prompt per forward"
                      f" {pre['one_by_one_ms']:.1f} ms."]
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")
    if args.plot and len(first) > 1:
        _svg(first, args.plot)
    return 0 if all(r["same_tokens"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
