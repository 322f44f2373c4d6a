"""The training and inference benchmark tools run the real entry points (CPU smoke, tiny model)."""

import json
import os
import subprocess
import sys

from megatron_fapool.testing.launch import build_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny_dense_pool.json")


def _run(args, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_bench_inference_single_vs_pool(tmp_path):
    out = tmp_path / "r.json"
    text = _run([os.path.join(ROOT, "tools", "bench_inference.py"), "--deepspeed_config", TINY, "--lengths", "100", "300",
                 "--batch-sizes", "1", "2", "--strategies", "single", "pool", "--new-tokens", "2", "--output", str(out),
                 "--calibration", os.path.join(ROOT, "configs", "calibration", "h200x2_paper_dense.json")])
    rows = json.loads(out.read_text())["rows"]
    # one launch per strategy sweeps every (length, batch); the pool engages above the threshold (128) only
    assert [(r["strategy"], r["n"], r["batch"], r["pooled"]) for r in rows] == [
        ("single", 100, 1, 0), ("single", 100, 2, 0), ("single", 300, 1, 0), ("single", 300, 2, 0),
        ("pool", 100, 1, 0), ("pool", 100, 2, 0), ("pool", 300, 1, 1), ("pool", 300, 2, 2)]
    assert all(r["ttft_s"] > 0 and r["tpot_s"] > 0 and r["tpot_p50_s"] > 0 for r in rows)
    assert "| pool | 2 | 300 | 2 |" in text and "batch 2: pool TPS >= 1 GPU from" in text


def test_break_even_interpolates_where_the_pool_stays_ahead(load_tool):
    break_even = load_tool("bench_inference").break_even

    def rows(ratios):
        out = []
        for n, r in ratios.items():
            out += [{"strategy": "single", "n": n, "batch": 1, "tps": 100.0},
                    {"strategy": "pool", "n": n, "batch": 1, "tps": 100.0 * r}]
        return out
    assert break_even(rows({1024: 0.5, 4096: 1.5}), 1) == 2048.0  # halfway in log2
    assert break_even(rows({1024: 1.2, 2048: 0.9, 4096: 0.8, 8192: 1.2}), 1) == 2 ** 12.5  # from where it stays ahead
    assert break_even(rows({1024: 1.0, 4096: 1.1}), 1) == 1024.0
    assert break_even(rows({1024: 0.5, 4096: 0.9}), 1) is None


def test_bench_training_pool(tmp_path, build_once):
    """The tool's run, metrics parsing and table (pool on = pool off is tests/launch/test_train.py's)."""
    # the session's 20-file corpus (tools/preprocess_data.py; tests/convert reads the same one)
    data = build_once("corpus20", lambda d: build_corpus(str(d / "stdlib"), max_files=20))
    md = tmp_path / "t.md"
    _run([os.path.join(ROOT, "tools", "bench_training.py"), "--deepspeed_config", TINY, "--data-path", str(data),
          "--seq-lengths", "256", "--strategies", "pool", "--train-iters", "3", "--warmup", "1",
          "--markdown", str(md)])
    lines = [line for line in md.read_text().splitlines() if line.startswith("| pool")]
    assert len(lines) == 1 and "failed" not in md.read_text()
    assert lines[0].split("|")[8].strip() == "2/2"  # pooled steps of the timed iterations
    assert float(lines[0].split("|")[9]) > 0  # the last loss


def test_bench_decode_attention_smoke(tmp_path):
    md = tmp_path / "d.md"
    _run([os.path.join(ROOT, "tools", "bench_decode_attention.py"), "--device", "cpu", "--dtype", "fp32",
          "--lengths", "600", "--heads", "2", "--head-dim", "16", "--backends", "math", "--splits", "1", "3",
          "--copy-gib", "0.01", "--reps", "1", "--markdown", str(md)])
    rows = [line for line in md.read_text().splitlines() if line.startswith("| 600 |")]
    assert len(rows) == 4 and not any("differs" in r or "failed" in r for r in rows)


def test_mixed_workload_draws_and_percentiles(load_tool):
    tool = load_tool("bench_mixed_workload")
    percentile, workload = tool.percentile, tool.workload

    lengths = workload(40, 0.1, (512, 2048), (32768, 131072), 131040, seed=0)
    assert len(lengths) == 40 and sum(x >= 32768 for x in lengths) == 4
    assert all(512 <= x <= 2048 or 32768 <= x <= 131040 for x in lengths)
    assert lengths == workload(40, 0.1, (512, 2048), (32768, 131072), 131040, seed=0)  # seeded
    assert percentile(list(range(1, 101)), 50) == 50 and percentile(list(range(1, 101)), 99) == 99
    assert percentile([3.0], 99) == 3.0


def test_strategy_names(load_tool):
    strategies = load_tool("_strategies")
    Strategy, strategy = strategies.Strategy, strategies.strategy

    assert strategy("single") == Strategy(gpus=1)
    assert strategy("pool") == Strategy(gpus=2, pool_size=1)
    assert strategy("pool3") == Strategy(gpus=4, pool_size=3)  # issue 7: base TP 1 with pool 0..3 on 4 GPUs
    assert strategy("tp2pool6") == Strategy(gpus=8, tp=2, pool_size=6)
    assert strategy("tp4pp2") == Strategy(gpus=8, tp=4, pp=2)
    for bad in ("tp0", "pooltp2", "tp2pool3", "x"):
        try:
            strategy(bad)
        except ValueError as e:
            assert repr(bad) in str(e)
        else:
            raise AssertionError(bad)
