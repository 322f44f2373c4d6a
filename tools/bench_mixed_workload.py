#!/usr/bin/env python
"""Mixed-length serving: throughput per GPU and request latency, pool against static layouts.

    python tools/bench_mixed_workload.py --deepspeed_config configs/paper_dense_pool.json \\
        --requests 40 --strategies single tp2 pool --markdown runs/mixed.md

The workload of the research: request lengths drawn (seeded) 90% short (512-2K tokens)
and 10% long (32K-128K), in random order, each generating ``--new-tokens``. Every
strategy serves the same requests with the same model and weights through the real
entry point (launch/infer.py, torchrun, one batch: each request prefilled in turn,
through the pool only when it is above the threshold, then all decoded together),
once untimed (``--warmup``) and once timed. Reported per strategy: tokens (input +
output) per second per GPU, and p50 / p99 over requests of the time to first token
and of the completion time (first prefill started -> last token), both counted from
the start of the batch.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile

from megatron_fapool.config import ConfigError
from megatron_fapool.runtime import exit_on_user_error

from _strategies import launch, strategy, strategy_arg, write_strategy_config


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deepspeed_config", "--deepspeed-config", required=True)
    p.add_argument("--strategies", nargs="+", default=["single", "tp2", "pool"], type=strategy_arg,
                   help="single, tp2, pp2, pool (1 base + 1 pool) or any tp<N>pp<M>pool<P> (e.g. pool3, tp4pp2)")
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--long-share", type=float, default=0.1)
    p.add_argument("--short", type=int, nargs=2, default=[512, 2048], metavar=("MIN", "MAX"))
    p.add_argument("--long", type=int, nargs=2, default=[32768, 131072], metavar=("MIN", "MAX"))
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=int, default=300, help="seconds per strategy")
    p.add_argument("--markdown", default=None)
    p.add_argument("--output", default=None, help="all per-request results as JSON")
    p.add_argument("--log-dir", default=None)
    return p.parse_args(argv)


def workload(n: int, long_share: float, short, long, max_len: int, seed: int) -> list[int]:
    """``n`` prompt lengths: ``round(n * long_share)`` long ones, the rest short, shuffled (seeded)."""
    rng = random.Random(seed)
    n_long = round(n * long_share)
    lengths = [rng.randint(*long) for _ in range(n_long)] + [rng.randint(*short) for _ in range(n - n_long)]
    rng.shuffle(lengths)
    return [min(x, max_len) for x in lengths]


def percentile(xs, q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, -(-len(xs) * q // 100) - 1))] if xs else 0.0


def summarize(strategy: str, gpus: int, m: dict) -> dict:
    w = m["workloads"][0]
    reqs = w["requests"]
    tokens = sum(r["prompt_len"] + r["new_tokens"] for r in reqs)
    ttft, done = [r["ttft_s"] for r in reqs], [r["done_s"] for r in reqs]
    return {"strategy": strategy, "gpus": gpus, "requests": len(reqs), "pooled": sum(r["pooled"] for r in reqs),
            "tokens": tokens, "wall_s": w["wall_s"], "tps_per_gpu": tokens / w["wall_s"] / gpus,
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "done_p50_s": percentile(done, 50), "done_p99_s": percentile(done, 99)}


def main(argv=None) -> int:
    args = parse_args(argv)
    if not 0 <= args.long_share <= 1:
        raise ConfigError("--long-share", f"must be in [0, 1], got {args.long_share}")
    from megatron_fapool.config import load_run_config

    max_len = load_run_config(args.deepspeed_config).model.language_model.max_position_embeddings - args.new_tokens
    lengths = workload(args.requests, args.long_share, args.short, args.long, max_len, args.seed)
    print(f"{len(lengths)} requests: {sum(x >= args.long[0] for x in lengths)} long, {sum(lengths):,} prompt tokens",
          flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_mixed_") as workdir:
        for s in args.strategies:
            st = strategy(s)
            cfg = write_strategy_config(args.deepspeed_config, st, workdir, s)
            metrics = os.path.join(workdir, f"{s}.json")
            wall, error = launch(
                "infer.py", st.gpus,
                ["--deepspeed_config", cfg, "--random-weights", "--prompt-lengths", *map(str, lengths),
                 "--max-new-tokens", str(args.new_tokens), "--warmup", "--metrics-json", metrics],
                port=29400 + len(s), timeout=args.timeout,
                log_path=os.path.join(args.log_dir, f"mixed_{s}.log") if args.log_dir else None)
            if error or not os.path.exists(metrics):
                rows.append({"strategy": s, "gpus": st.gpus, "error": error or "no metrics written"})
            else:
                rows.append(summarize(s, st.gpus, json.load(open(metrics))))
            r = rows[-1]
            print(f"  {s}: {r['error'] if 'error' in r else format(r['tps_per_gpu'], '.0f') + ' tokens/s per GPU'}"
                  f" ({wall:.0f}s)", flush=True)
    lines = ["| strategy | GPUs | requests (pooled) | tokens/s per GPU | TTFT p50 / p99 (s) | completion p50 / p99 (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['strategy']} | {r['gpus']} | failed: {r['error']} | | | |")
            continue
        lines.append(f"| {r['strategy']} | {r['gpus']} | {r['requests']} ({r['pooled']}) | {r['tps_per_gpu']:,.0f} |"
                     f" {r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f} | {r['done_p50_s']:.2f} / {r['done_p99_s']:.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"Workload: {len(lengths)} requests, lengths {lengths}, {args.new_tokens} new tokens each\n\n{text}\n")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"lengths": lengths, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
