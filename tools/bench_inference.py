"""Inference TTFT / TPOT / TPS per strategy, prompt length and batch size, side by side, with a plot.

    python tools/bench_inference.py --deepspeed_config configs/paper_dense_pool.json \\
        --lengths 512 2048 8192 16384 32768 65536 131072 --batch-sizes 1 4 --new-tokens 32 \\
        --calibration configs/calibration/h200x2_paper_dense.json \\
        --output runs/bench_inference.json --plot runs/bench_inference.png

For every strategy it runs the real entry point once (launch/infer.py, torchrun, random
weights of the config's model) with ``--sweep``: every (length, batch size) in turn on
the same model, each batch served once untimed (``--warmup``) and then timed. A batch
is ``b`` prompts of the length, prefilled one by one and decoded ``b`` per forward.
Strategies on the same GPUs and weights:

* ``single`` - the base GPU alone (1 GPU, no pool);
* ``tp2``    - static tensor parallelism over 2 GPUs, no pool;
* ``pp2``    - static pipeline parallelism over 2 GPUs (2 stages, each its layers' KV cache), no pool;
* ``pool``   - 1 base + 1 pool GPU: prefill through the pool above the threshold, KV
  cache sharded over both GPUs, decode merging their partial results;
* any other layout by name (``--strategies single pool3 tp4 tp2pp2`` on 4 GPUs,
  ``tp2 tp2pool2 tp2pool4 tp2pool6 tp8 tp4pp2 tp2pp4`` on 8): ``tp<N>``, ``pp<M>``,
  ``pool<P>`` joined, P pool ranks shared by the TP x PP base ranks.

A length at or above the model's ``max_position_embeddings`` is run at the longest
prompt that still fits the new tokens (131072 -> 131056 with 16 new tokens).
TTFT = mean time to first token (prefill); TPOT = mean decode step time (p50: median
step); TPS = (input + output tokens) / wall time of the batch. With ``--calibration``
the measured break-even of each pooled strategy (the length from which its TPS stays
at or above the base GPU alone) is set beside the calibrated threshold. ``--plot`` needs
matplotlib (``pip install matplotlib``); ``--plot-only FILE.json`` redraws a saved result.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile

from megatron_fapool.config import ConfigError
from megatron_fapool.runtime import exit_on_user_error

from _strategies import STRATEGIES, launch, strategy, strategy_arg, write_strategy_config


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deepspeed_config", "--deepspeed-config", help="DeepSpeed JSON with a fapool section")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192, 16384, 32768, 65536, 131072])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1], help="prompts per batch (each is swept)")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), type=strategy_arg,
                   help="single, tp2, pp2, pool (1 base + 1 pool) or any tp<N>pp<M>pool<P> (e.g. pool3, tp4pp2)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--calibration", default=None, help="calibration JSON whose threshold the break-even is set beside")
    p.add_argument("--timeout", type=int, default=540, help="seconds per strategy (all its lengths and batches)")
    p.add_argument("--output", default=None, help="write all results as JSON here")
    p.add_argument("--plot", default=None, help="write a PNG of TPOT and TPS against length here")
    p.add_argument("--plot-only", default=None, metavar="JSON", help="only redraw the plot from a saved --output")
    p.add_argument("--log-dir", default=None, help="keep each run's log here")
    return p.parse_args(argv)


def _median(xs):
    xs = sorted(xs)
    return 0.5 * (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) if xs else 0.0


def run_strategy(args, name: str, workdir: str) -> list[dict]:
    """One launch of launch/infer.py sweeping every (length, batch size); a row per pair."""
    st = strategy(name)
    points = [(min(n, args.max_positions - args.new_tokens), b) for n in args.lengths for b in args.batch_sizes]
    cfg = write_strategy_config(args.deepspeed_config, st, workdir, name)
    metrics = os.path.join(workdir, f"{name}.out.json")
    wall, error = launch(
        "infer.py", st.gpus,
        ["--deepspeed_config", cfg, "--random-weights", "--sweep", *[f"{n}x{b}" for n, b in points],
         "--max-new-tokens", str(args.new_tokens), "--warmup", "--metrics-json", metrics],
        port=29300 + len(name), timeout=args.timeout,
        log_path=os.path.join(args.log_dir, f"{name}.log") if args.log_dir else None,
    )
    done = {w["name"]: w for w in json.load(open(metrics))["workloads"]} if os.path.exists(metrics) else {}
    rows = []
    for n, b in points:
        row = {"strategy": name, "n": n, "gpus": st.gpus, "batch": b, "run_wall_s": wall}
        w = done.get(f"{n}x{b}")
        if w is None:
            row["error"] = error or "no metrics written"
            rows.append(row)
            continue
        reqs = w["requests"]
        tokens = sum(r["prompt_len"] + r["new_tokens"] for r in reqs)
        row.update(
            ttft_s=sum(r["ttft_s"] for r in reqs) / len(reqs), tpot_s=sum(r["tpot_s"] for r in reqs) / len(reqs),
            tpot_p50_s=_median([t for r in reqs for t in r["decode_s"]]), tps=tokens / w["wall_s"],
            pooled=sum(r["pooled"] for r in reqs),
        )
        rows.append(row)
    return rows


def table(rows) -> str:
    single = {(r["n"], r["batch"]): r for r in rows if r["strategy"] == "single" and "error" not in r}
    out = ["| strategy | GPUs | prompt | batch | TTFT (ms) | TPOT (ms) | TPOT p50 (ms) | TPS | TPOT vs 1 GPU"
           " | TPS vs 1 GPU | pooled |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    order = list(dict.fromkeys(r["strategy"] for r in rows))  # as run
    for r in sorted(rows, key=lambda r: (r["batch"], r["n"], order.index(r["strategy"]))):
        if "error" in r:
            out.append(f"| {r['strategy']} | {r['gpus']} | {r['n']} | {r['batch']} | failed: {r['error']} |"
                       " | | | | | |")
            continue
        b = single.get((r["n"], r["batch"]))
        sp = f"{b['tpot_s'] / r['tpot_s']:.2f}x" if b else "-"
        tp = f"{r['tps'] / b['tps']:.2f}x" if b else "-"
        out.append(f"| {r['strategy']} | {r['gpus']} | {r['n']} | {r['batch']} | {r['ttft_s'] * 1e3:.1f} |"
                   f" {r['tpot_s'] * 1e3:.2f} | {r['tpot_p50_s'] * 1e3:.2f} | {r['tps']:.0f} | {sp} | {tp} |"
                   f" {r['pooled']}/{r['batch']} |")
    return "\n".join(out)


def break_even(rows, batch: int, pooled: str = "pool") -> float | None:
    """The prompt length from which ``pooled``'s TPS stays >= the base GPU alone's (log-interpolated).

    ``None`` when it never catches up; the shortest length when it never falls behind.
    """
    ratio = {}
    for r in rows:
        if r["batch"] == batch and "error" not in r and r["strategy"] in ("single", pooled):
            ratio.setdefault(r["n"], {})[r["strategy"]] = r["tps"]
    pts = sorted((n, v[pooled] / v["single"]) for n, v in ratio.items() if len(v) == 2)
    if not pts or pts[-1][1] < 1:
        return None
    i = len(pts) - 1
    while i > 0 and pts[i - 1][1] >= 1:
        i -= 1
    if i == 0:
        return float(pts[0][0])
    (n0, r0), (n1, r1) = pts[i - 1], pts[i]
    t = (1 - r0) / (r1 - r0)
    return float(2 ** (math.log2(n0) + t * (math.log2(n1) - math.log2(n0))))


def break_even_report(rows, calibration: str | None) -> str:
    """One line per batch size and pooled strategy: its break-even, beside the calibrated threshold."""
    threshold = json.load(open(calibration))["threshold"] if calibration else None
    pooled = sorted({r["strategy"] for r in rows if strategy(r["strategy"]).pool_size})
    lines = []
    for b in sorted({r["batch"] for r in rows}):
        for s in pooled:
            be = break_even(rows, b, s)
            line = f"batch {b}: {s} TPS >= 1 GPU from {'never' if be is None else f'{be:,.0f} tokens'}"
            if threshold and be:
                line += f"; calibrated threshold {threshold:,} tokens ({(threshold - be) / be * 100:+.0f}% off)"
            lines.append(line)
    return "\n".join(lines)


def plot(rows, path: str, title: str = "") -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot", "matplotlib is not installed: pip install matplotlib (or drop --plot)") from None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    batches = sorted({r.get("batch", 1) for r in rows})
    styles = ["-", "--", ":", "-."]
    names = sorted({r["strategy"] for r in rows})
    for s in names:
        for j, b in enumerate(batches):
            ok = sorted((r for r in rows if r["strategy"] == s and r.get("batch", 1) == b and "error" not in r),
                        key=lambda r: r["n"])
            if not ok:
                continue
            xs, label = [r["n"] for r in ok], s if len(batches) == 1 else f"{s}, batch {b}"
            color = f"C{names.index(s) % 10}"
            kw = dict(marker="o", label=label, linestyle=styles[j % len(styles)], color=color)
            axes[0].plot(xs, [r["tpot_s"] * 1e3 for r in ok], **kw)
            axes[1].plot(xs, [r["tps"] for r in ok], **kw)
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
        for i, s in enumerate(args.strategies):
            print(f"[{i + 1}/{len(args.strategies)}] {s}: lengths {args.lengths} x batch sizes {args.batch_sizes} ...",
                  flush=True)
            got = run_strategy(args, s, workdir)
            rows += got
            for row in got:
                msg = row.get("error") or (f"TTFT {row['ttft_s'] * 1e3:.1f} ms, TPOT {row['tpot_s'] * 1e3:.2f} ms,"
                                           f" TPS {row['tps']:.0f}")
                print(f"    {row['n']} x {row['batch']}: {msg}", flush=True)
            if args.output:  # after every strategy: a sweep cut short keeps what it measured
                with open(args.output, "w") as f:
                    json.dump({"rows": rows, "config": args.deepspeed_config,
                               "title": os.path.basename(args.deepspeed_config)}, f, indent=1)
    print(table(rows))
    print(break_even_report(rows, args.calibration))
    if args.plot:
        plot(rows, args.plot, os.path.basename(args.deepspeed_config))
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
