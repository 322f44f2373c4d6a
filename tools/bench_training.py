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
import subprocess
import sys
import tempfile
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_fapool.config import ConfigError, load_deepspeed_json  # noqa: E402
from megatron_fapool.runtime import exit_on_user_error  # noqa: E402

STRATEGIES = {
    # name: (world size, tensor parallel, pool on)
    "single": (1, 1, False),
    "tp2": (2, 2, False),
    "pool": (2, 1, True),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deepspeed_config", "--deepspeed-config", required=True, help="DeepSpeed JSON with a fapool section")
    p.add_argument("--data-path", required=True, help="indexed dataset prefix (tools/preprocess_data.py)")
    p.add_argument("--seq-lengths", type=int, nargs="+", default=[16384, 65536])
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    p.add_argument("--train-iters", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2, help="iterations left out of the timing")
    p.add_argument("--timeout", type=int, default=600, help="seconds per run")
    p.add_argument("--markdown", default=None, help="also write the table here")
    p.add_argument("--log-dir", default=None, help="keep each run's log here")
    return p.parse_args(argv)


def _variant(base: dict, json_dir: str, tp: int, pool: bool, workdir: str, name: str, pp: int = 1) -> dict:
    """The JSON with this strategy's TP, PP and pool; its model YAML copied without ``model_parallel``."""
    data = json.loads(json.dumps(base))
    fap = data["fapool"]
    model = yaml.safe_load(open(os.path.join(json_dir, fap["model_yaml"])))
    model.pop("model_parallel", None)
    fap["model_yaml"] = os.path.join(workdir, f"{name}.yaml")
    with open(fap["model_yaml"], "w") as f:
        yaml.safe_dump(model, f)
    fap["parallel"] = {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp}
    cal = fap.get("attention_pool", {}).get("calibration_file")
    if cal and not os.path.isabs(cal):
        fap["attention_pool"]["calibration_file"] = os.path.join(json_dir, cal)
    fap.setdefault("attention_pool", {})["enabled"] = pool
    if pool:
        fap["attention_pool"]["pool_size"] = 1
    return data


def run_one(args, base, json_dir, strategy: str, n: int, workdir: str) -> dict:
    world, tp, pool = STRATEGIES[strategy]
    cfg_path = os.path.join(workdir, f"{strategy}_{n}.json")
    with open(cfg_path, "w") as f:
        json.dump(_variant(base, json_dir, tp, pool, workdir, f"{strategy}_{n}"), f)
    metrics = os.path.join(workdir, f"{strategy}_{n}.jsonl")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port", str(29400 + n % 97),
        os.path.join(ROOT, "launch", "train.py"), "--deepspeed_config", cfg_path, "--data-path", args.data_path,
        "--data-mode", "packed", "--seq-length", str(n), "--train-iters", str(args.train_iters),
        "--log-interval", "1", "--metrics-file", metrics,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))))
    if args.log_dir:
        os.makedirs(args.log_dir, exist_ok=True)
        with open(os.path.join(args.log_dir, f"{strategy}_{n}.log"), "w") as f:
            f.write(proc.stdout + proc.stderr)
    row = {"strategy": strategy, "n": n, "gpus": world, "wall_s": time.perf_counter() - t0}
    if proc.returncode != 0 or not os.path.exists(metrics):
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        oom = any("out of memory" in line.lower() for line in lines)
        reasons = [line for line in lines if line.startswith("fapool: error:")] or [
            line for line in lines if "Error:" in line and "ChildFailedError" not in line]
        row["error"] = "out of memory" if oom else (reasons[-1][:200] if reasons else f"exit {proc.returncode}")
        return row
    rows = [json.loads(line) for line in open(metrics)]
    timed = [r for r in rows if r["iteration"] > args.warmup] or rows
    step = statistics.median(r["elapsed_s"] for r in timed)
    tokens = statistics.median(r["tokens"] for r in timed)
    flops = statistics.median(r["flops"] for r in timed)
    row.update(
        step_s=step, tokens_per_s=tokens / step, tflops_per_gpu=flops / step / world / 1e12,
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
    base = load_deepspeed_json(args.deepspeed_config)
    if "fapool" not in base:
        raise ConfigError("fapool", "section missing", source=args.deepspeed_config)
    for ext in (".bin", ".idx"):
        if not os.path.isfile(args.data_path + ext):
            raise ConfigError("--data-path", f"{args.data_path}{ext} not found: build it with tools/preprocess_data.py")
    if args.warmup >= args.train_iters:
        raise ConfigError("--warmup", f"{args.warmup} leaves no timed iteration of --train-iters {args.train_iters}")
    json_dir = os.path.dirname(os.path.abspath(args.deepspeed_config))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_training_") as workdir:
        total = len(args.seq_lengths) * len(args.strategies)
        for n in args.seq_lengths:
            for s in args.strategies:
                print(f"[{len(rows) + 1}/{total}] {s} at {n} tokens ...", flush=True)
                row = run_one(args, base, json_dir, s, n, workdir)
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
