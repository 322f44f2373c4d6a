"""Training throughput of launch/train.py per strategy and sequence length, side by side.

    python tools/bench_training.py --deepspeed_config configs/paper_dense_pool.json \\
        --data-path runs/data/pystdlib --seq-lengths 16384 65536 --markdown runs/bench_training.md

For every (strategy, length) it writes a variant of the JSON, runs the real entry point
with ``torchrun`` (packed data: every sample exactly the length), and reads the
per-iteration metrics it logs. Strategies (same model, weights seed and data):

* ``single`` - 1 GPU, no pool;
* ``tp2``    - 2 GPUs, tensor parallel 2, no pool;
* ``pool``   - 1 base GPU + 1 pool GPU (the pool joins every layer's attention above
  the JSON's threshold).

Reported: median step time over the iterations after ``--warmup``, tokens/s, model
TFLOP/s per GPU (model FLOPs / time / GPUs of the strategy) and the speedup over
``single``. A run that fails (e.g. out of memory) is reported as such and the sweep goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

from megatron_fapool.config import ConfigError, load_deepspeed_json
from megatron_fapool.runtime import exit_on_user_error

from _strategies import launch, strategy, strategy_arg, write_strategy_config


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deepspeed_config", "--deepspeed-config", required=True, help="DeepSpeed JSON with a fapool section")
    p.add_argument("--data-path", required=True, help="indexed dataset prefix (tools/preprocess_data.py)")
    p.add_argument("--seq-lengths", type=int, nargs="+", default=[16384, 65536])
    p.add_argument("--strategies", nargs="+", default=["single", "tp2", "pool"], type=strategy_arg,
                   help="single, tp2, pool (1 base + 1 pool) or any tp<N>pool<P> (e.g. pool3, tp2pool2)")
    p.add_argument("--train-iters", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2, help="iterations left out of the timing")
    p.add_argument("--timeout", type=int, default=600, help="seconds per run")
    p.add_argument("--markdown", default=None, help="also write the table here")
    p.add_argument("--log-dir", default=None, help="keep each run's log here")
    return p.parse_args(argv)


def run_one(args, name: str, n: int, workdir: str) -> dict:
    st = strategy(name)
    cfg = write_strategy_config(args.deepspeed_config, st, workdir, f"{name}_{n}")
    metrics = os.path.join(workdir, f"{name}_{n}.jsonl")
    wall, error = launch(
        "train.py", st.gpus,
        ["--deepspeed_config", cfg, "--data-path", args.data_path, "--data-mode", "packed", "--seq-length", str(n),
         "--train-iters", str(args.train_iters), "--log-interval", "1", "--metrics-file", metrics],
        port=29400 + n % 97, timeout=args.timeout,
        log_path=os.path.join(args.log_dir, f"{name}_{n}.log") if args.log_dir else None,
    )
    row = {"strategy": name, "n": n, "gpus": st.gpus, "wall_s": wall}
    if error or not os.path.exists(metrics):
        row["error"] = error or "no metrics written"
        return row
    rows = [json.loads(line) for line in open(metrics)]
    timed = [r for r in rows if r["iteration"] > args.warmup] or rows
    step = statistics.median(r["elapsed_s"] for r in timed)
    tokens = statistics.median(r["tokens"] for r in timed)
    flops = statistics.median(r["flops"] for r in timed)
    row.update(
        step_s=step, tokens_per_s=tokens / step, tflops_per_gpu=flops / step / st.gpus / 1e12,
        pooled=sum(r["pooled_micro_batches"] for r in timed), micro_batches=sum(r["micro_batches"] for r in timed),
        loss_last=rows[-1]["loss"],
    )
    return row


def table(rows: list[dict]) -> str:
    single = {r["n"]: r for r in rows if r["strategy"] == "single" and "error" not in r}
    out = [
        "| strategy | GPUs | seq len | step (ms) | tokens/s | TFLOP/s per GPU | speedup vs 1 GPU | pooled steps | loss (last) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['strategy']} | {r['gpus']} | {r['n']} | failed: {r['error']} | | | | | |")
            continue
        base = single.get(r["n"])
        speed = f"{base['step_s'] / r['step_s']:.2f}x" if base else "-"
        out.append(
            f"| {r['strategy']} | {r['gpus']} | {r['n']} | {r['step_s'] * 1e3:.0f} | {r['tokens_per_s']:.0f} |"
            f" {r['tflops_per_gpu']:.1f} | {speed} | {r['pooled']:.0f}/{r['micro_batches']:.0f} | {r['loss_last']:.4f} |"
        )
    return "\n".join(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    if "fapool" not in load_deepspeed_json(args.deepspeed_config):
        raise ConfigError("fapool", "section missing", source=args.deepspeed_config)
    for ext in (".bin", ".idx"):
        if not os.path.isfile(args.data_path + ext):
            raise ConfigError("--data-path", f"{args.data_path}{ext} not found: build it with tools/preprocess_data.py")
    if args.warmup >= args.train_iters:
        raise ConfigError("--warmup", f"{args.warmup} leaves no timed iteration of --train-iters {args.train_iters}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_training_") as workdir:
        total = len(args.seq_lengths) * len(args.strategies)
        for n in args.seq_lengths:
            for s in args.strategies:
                print(f"[{len(rows) + 1}/{total}] {s} at {n} tokens ...", flush=True)
                row = run_one(args, s, n, workdir)
                rows.append(row)
                msg = row.get("error") or f"{row['step_s'] * 1e3:.0f} ms/step, {row['tflops_per_gpu']:.1f} TFLOP/s per GPU"
                print(f"    {msg} ({row['wall_s']:.0f}s)", flush=True)
    text = table(rows)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
