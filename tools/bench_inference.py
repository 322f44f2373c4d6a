"""Inference TTFT / TPOT / TPS per strategy and prompt length, side by side, with a plot.

    python tools/bench_inference.py --deepspeed_config configs/paper_dense_pool.json \\
        --lengths 512 2048 8192 16384 32768 65536 131072 --batch 1 --new-tokens 32 \\
        --output runs/bench_inference.json --plot runs/bench_inference.png

For every (strategy, length) it runs the real entry point (launch/infer.py, torchrun,
random weights of the config's model, ``--warmup`` so kernels are loaded before the
timed pass) on ``--batch`` prompts of that length, and reads its metrics. Strategies on
the same GPUs and weights:

* ``single`` - the base GPU alone (1 GPU, no pool);
* ``tp2``    - static tensor parallelism over 2 GPUs, no pool;
* ``pp2``    - static pipeline parallelism over 2 GPUs (2 stages, each its layers' KV cache), no pool;
* ``pool``   - 1 base + 1 pool GPU: prefill through the pool above the threshold, KV
  cache sharded over both GPUs, decode merging their partial results.

A length at or above the model's ``max_position_embeddings`` is run at the longest
prompt that still fits the new tokens (131072 -> 131056 with 16 new tokens).
TTFT = mean time to first token (prefill); TPOT = mean decode step time; TPS = (input +
output tokens) / wall time of the batch. ``--plot`` needs matplotlib
(``pip install matplotlib``); ``--plot-only FILE.json`` redraws a saved result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_fapool.benchmarking import STRATEGIES, launch, write_strategy_config  # noqa: E402
from megatron_fapool.config import ConfigError  # noqa: E402
from megatron_fapool.runtime import exit_on_user_error  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deepspeed_config", "--deepspeed-config", help="DeepSpeed JSON with a fapool section")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192, 16384, 32768, 65536, 131072])
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    p.add_argument("--batch", type=int, default=1, help="prompts per run, all of the length")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--timeout", type=int, default=300, help="seconds per run")
    p.add_argument("--output", default=None, help="write all results as JSON here")
    p.add_argument("--plot", default=None, help="write a PNG of TPOT and TPS against length here")
    p.add_argument("--plot-only", default=None, metavar="JSON", help="only redraw the plot from a saved --output")
    p.add_argument("--log-dir", default=None, help="keep each run's log here")
    return p.parse_args(argv)


def run_one(args, strategy: str, n: int, workdir: str) -> dict:
    st = STRATEGIES[strategy]
    n = min(n, args.max_positions - args.new_tokens)  # the longest prompt the model can still extend
    cfg = write_strategy_config(args.deepspeed_config, st, workdir, f"{strategy}_{n}")
    metrics = os.path.join(workdir, f"{strategy}_{n}.out.json")
    wall, error = launch(
        "infer.py", st.gpus,
        ["--deepspeed_config", cfg, "--random-weights", "--prompt-lengths", *[str(n)] * args.batch,
         "--max-new-tokens", str(args.new_tokens), "--warmup", "--metrics-json", metrics],
        port=29300 + n % 97, timeout=args.timeout,
        log_path=os.path.join(args.log_dir, f"{strategy}_{n}.log") if args.log_dir else None,
    )
    row = {"strategy": strategy, "n": n, "gpus": st.gpus, "batch": args.batch, "wall_s": wall}
    if error or not os.path.exists(metrics):
        row["error"] = error or "no metrics written"
        return row
    m = json.load(open(metrics))
    reqs = m["requests"]
    tokens = sum(r["prompt_len"] + r["new_tokens"] for r in reqs)
    row.update(
        ttft_s=sum(r["ttft_s"] for r in reqs) / len(reqs), tpot_s=sum(r["tpot_s"] for r in reqs) / len(reqs),
        tps=tokens / m["wall_s"], pooled=sum(r["pooled"] for r in reqs),
    )
    return row


def table(rows) -> str:
    single = {r["n"]: r for r in rows if r["strategy"] == "single" and "error" not in r}
    out = ["| strategy | GPUs | prompt | TTFT (ms) | TPOT (ms) | TPS | TPOT vs 1 GPU | TPS vs 1 GPU | pooled |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['strategy']} | {r['gpus']} | {r['n']} | failed: {r['error']} | | | | | |")
            continue
        b = single.get(r["n"])
        sp = f"{b['tpot_s'] / r['tpot_s']:.2f}x" if b else "-"
        tp = f"{r['tps'] / b['tps']:.2f}x" if b else "-"
        out.append(f"| {r['strategy']} | {r['gpus']} | {r['n']} | {r['ttft_s'] * 1e3:.1f} | {r['tpot_s'] * 1e3:.2f} |"
                   f" {r['tps']:.0f} | {sp} | {tp} | {r['pooled']}/{r['batch']} |")
    return "\n".join(out)


def plot(rows, path: str, title: str = "") -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot", "matplotlib is not installed: pip install matplotlib (or drop --plot)") from None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for s in sorted({r["strategy"] for r in rows}):
        ok = sorted((r for r in rows if r["strategy"] == s and "error" not in r), key=lambda r: r["n"])
        if not ok:
            continue
        xs = [r["n"] for r in ok]
        axes[0].plot(xs, [r["tpot_s"] * 1e3 for r in ok], marker="o", label=s)
        axes[1].plot(xs, [r["tps"] for r in ok], marker="o", label=s)
    for ax, name in zip(axes, ("TPOT (ms, lower is better)", "TPS (tokens/s, higher is better)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt length (tokens)")
        ax.set_title(name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot_only:
        data = json.load(open(args.plot_only))
        plot(data["rows"], args.plot or args.plot_only.replace(".json", ".png"), data.get("title", ""))
        return 0
    if not args.deepspeed_config:
        raise ConfigError("--deepspeed_config", "required (unless --plot-only)")
    from megatron_fapool.config import load_run_config

    args.max_positions = load_run_config(args.deepspeed_config).model.language_model.max_position_embeddings
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_inference_") as workdir:
        total = len(args.lengths) * len(args.strategies)
        for n in args.lengths:
            for s in args.strategies:
                print(f"[{len(rows) + 1}/{total}] {s} at {n} tokens ...", flush=True)
                row = run_one(args, s, n, workdir)
                rows.append(row)
                msg = row.get("error") or f"TTFT {row['ttft_s'] * 1e3:.1f} ms, TPOT {row['tpot_s'] * 1e3:.2f} ms"
                print(f"    {msg} ({row['wall_s']:.0f}s)", flush=True)
                if args.output:  # after every run: a sweep cut short keeps what it measured
                    with open(args.output, "w") as f:
                        json.dump({"rows": rows, "config": args.deepspeed_config,
                                   "title": os.path.basename(args.deepspeed_config)}, f, indent=1)
    print(table(rows))
    if args.plot:
        plot(rows, args.plot, os.path.basename(args.deepspeed_config))
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
