"""The training and inference benchmark tools run the real entry points (CPU smoke, tiny model)."""

import json
import os
import subprocess
import sys
import sysconfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny_dense_pool.json")


def _run(args, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_bench_inference_single_vs_pool(tmp_path):
    out = tmp_path / "r.json"
    text = _run([os.path.join(ROOT, "tools", "bench_inference.py"), "--deepspeed_config", TINY, "--lengths", "300",
                 "--strategies", "single", "pool", "--new-tokens", "3", "--output", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["strategy"], r["pooled"]) for r in rows] == [("single", 0), ("pool", 1)]
    assert all(r["ttft_s"] > 0 and r["tpot_s"] > 0 for r in rows)
    assert "| pool | 2 | 300 |" in text


def test_bench_training_single_vs_pool(tmp_path):
    data = tmp_path / "d"
    _run([os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", sysconfig.get_paths()["stdlib"],
          "--output-prefix", str(data), "--max-files", "20"])
    md = tmp_path / "t.md"
    _run([os.path.join(ROOT, "tools", "bench_training.py"), "--deepspeed_config", TINY, "--data-path", str(data),
          "--seq-lengths", "256", "--strategies", "single", "pool", "--train-iters", "3", "--warmup", "1",
          "--markdown", str(md)])
    lines = [line for line in md.read_text().splitlines() if line.startswith("| single") or line.startswith("| pool")]
    assert len(lines) == 2 and "failed" not in md.read_text()
    assert lines[1].split("|")[8].strip() == "2/2"  # pooled steps of the timed iterations
    losses = {line.split("|")[9].strip() for line in lines}
    assert len(losses) == 1  # same model, weights and data: the same loss
