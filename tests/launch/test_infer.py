"""launch/infer.py: bad input is one line before any work; a real run serves mixed lengths with the pool.

MA separation (and data-parallel replicas) are in test_infer_ma.py."""

import json
import re
import os
import subprocess
import sys

from megatron_fapool.testing.distributed import find_free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INFER = os.path.join(ROOT, "launch", "infer.py")
TINY = os.path.join(ROOT, "configs", "tiny_dense_pool.json")


def _env():
    return dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")


def _infer(rank0, args):
    return rank0("infer", ["--deepspeed_config", TINY, *args])


def _error_line(proc) -> str:
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fapool: error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[0]


def test_prompt_longer_than_the_model(rank0):
    line = _error_line(_infer(rank0, ["--random-weights", "--prompt-lengths", "100", "5000", "--max-new-tokens", "4"]))
    assert "request 1: prompt 5000 + 4 new tokens = 5004 exceeds the model's max_position_embeddings 4096" in line


def test_empty_prompt(rank0):
    assert "request 0: empty prompt" in _error_line(_infer(rank0, ["--random-weights", "--prompt", ""]))


def test_no_prompt_and_no_weights(rank0):
    assert "--prompt: no prompt given" in _error_line(_infer(rank0, ["--random-weights"]))
    proc = _infer(rank0, ["--prompt", "x"])
    assert proc.returncode == 2 and "one of the arguments --load --random-weights is required" in proc.stderr


def test_bad_sweep(rank0):
    assert "--sweep: '8k': expected LENxBATCH" in _error_line(_infer(rank0, ["--random-weights", "--sweep", "8k"]))
    line = _error_line(_infer(rank0, ["--random-weights", "--sweep", "100x2", "5000x1", "--max-new-tokens", "4"]))
    assert "--sweep: 5000x1: request 0: prompt 5000 + 4 new tokens" in line
    line = _error_line(_infer(rank0, ["--random-weights", "--sweep", "100x2", "--prompt", "x"]))
    assert "replaces the prompts" in line


def test_ma_separation_over_pipeline_stages_is_refused(rank0, tmp_path):
    """MA separation is served at TP 1 and PP 1 only yet (an MoE model at TP > 1 is refused on CPU before)."""
    yaml = open(os.path.join(ROOT, "configs", "models", "tiny_moe.yaml")).read()
    untied = yaml.replace("language_model:\n", "language_model:\n  untie_embeddings_and_output_weights: true\n")
    (tmp_path / "m.yaml").write_text(untied + "model_parallel:\n  pipeline_model_parallel_size: 2\n")
    data = json.load(open(os.path.join(ROOT, "configs", "tiny_moe_ma.json")))
    data["fapool"]["model_yaml"] = str(tmp_path / "m.yaml")
    data["fapool"]["ma_separation"]["attention_expert_ratio"] = "1:1"
    (tmp_path / "c.json").write_text(json.dumps(data))
    line = _error_line(rank0("infer", ["--deepspeed_config", str(tmp_path / "c.json"), "--random-weights",
                                       "--prompt", "x"]))
    assert "fapool.ma_separation.enabled: serving with MA separation at TP 1 x PP 2 is not built yet" in line


def test_checkpoint_of_another_shape(rank0, tmp_path):
    ckpt = tmp_path / "ckpt"
    (ckpt / "iter_0000010").mkdir(parents=True)
    from megatron_fapool.config import load_run_config
    from megatron_fapool.training.checkpoint import model_shape

    meta = {"iteration": 10, "model": dict(model_shape(load_run_config(TINY)), hidden_size=96)}
    (ckpt / "iter_0000010" / "fapool_checkpoint.json").write_text(json.dumps(meta))
    (ckpt / "latest").write_text("iter_0000010")
    line = _error_line(_infer(rank0, ["--load", str(ckpt), "--prompt", "x"]))
    assert "checkpoint of another model" in line and "hidden_size=96 (this run: 64)" in line


def test_serves_a_mixed_batch_with_the_pool(tmp_path):
    metrics = tmp_path / "m.json"
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", "4",
           "--master_port", str(find_free_port()), INFER, "--deepspeed_config", TINY, "--random-weights",
           "--prompt", "def main():", "--prompt-lengths", "300", "749", "--max-new-tokens", "5",
           "--sampling", "--top-k", "20", "--metrics-json", str(metrics)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(metrics.read_text())
    rows = m["workloads"][0]["requests"]
    assert m["engine"] == "slots" and [r["pooled"] for r in rows] == [False, True, True]  # threshold 128
    assert all(r["new_tokens"] == 5 and r["ttft_s"] > 0 and r["tpot_s"] > 0 for r in rows)
    assert "per length bucket" in proc.stdout and "512-2K: 1 requests" in proc.stdout
    assert "pool rank for base rank 0:" in proc.stdout


def test_dilated_model_is_refused_before_any_work(rank0):
    proc = rank0("infer", ["--deepspeed_config", os.path.join(ROOT, "configs", "tiny_dilated.json"),
                           "--random-weights", "--prompt", "x"])
    assert "fapool.dilated_attention.enabled: KV-cached inference serves dense attention only" in _error_line(proc)


ROPE = os.path.join(ROOT, "configs", "tiny_dense_rope.json")
TRACE = os.path.join(ROOT, "configs", "traces", "mixed_small.jsonl")


def test_bad_serving_flags(rank0, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"arrival_s": 0, "prompt_len": 5}\n{"arrival_s": 0.1, "prompt_len": 5, "when": 2}\n')
    line = _error_line(rank0("infer", ["--deepspeed_config", ROPE, "--random-weights", "--trace", str(bad)], world=1))
    assert "--trace: trace" in line and "line 2: unknown key(s) ['when']" in line
    line = _error_line(rank0("infer", ["--deepspeed_config", ROPE, "--random-weights", "--trace", TRACE,
                                       "--prompt", "x"], world=1))
    assert "--trace: replaces the prompts and arrivals" in line
    ma = ["--deepspeed_config", os.path.join(ROOT, "configs", "tiny_moe_ma.json"), "--random-weights", "--prompt", "x"]
    line = _error_line(rank0("infer", ma + ["--arrival-rate", "5"]))
    assert "--arrival-rate: continuous batching runs on the slots engine, which does not serve MA separation" in line
    line = _error_line(rank0("infer", ma + ["--engine", "slots"]))
    assert "--engine: the slots engine does not serve MA separation (fapool.ma_separation.enabled) yet" in line
    line = _error_line(rank0("infer", ["--deepspeed_config", ROPE, "--random-weights", "--prompt", "x",
                                       "--arrival-rate", "0"], world=1))
    assert "--arrival-rate: must be > 0" in line


def test_serves_a_trace_with_continuous_batching(tmp_path):
    """The README's serving command: 9 requests arriving over 1.5 s through 4 slots (TP 2 ranks in lockstep);
    the one too long for a slot (4000 + 8 tokens) is refused with a message and the others finish."""
    metrics = tmp_path / "m.json"
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", "2",
           "--master_port", str(find_free_port()), INFER, "--deepspeed_config", os.path.join(ROOT, "configs",
                                                                                              "tiny_dense_pool.json"),
           "--random-weights", "--trace", TRACE, "--slots", "4", "--slot-capacity", "2048", "--slo-ttft-ms",
           "2000", "--slo-tpot-ms", "500", "--metrics-json", str(metrics)]
    data = json.load(open(TINY))
    data["fapool"]["attention_pool"]["enabled"] = False
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(data).replace('"models/tiny_dense.yaml"', json.dumps(
        os.path.join(ROOT, "configs", "models", "tiny_dense.yaml"))))
    cmd[cmd.index(os.path.join(ROOT, "configs", "tiny_dense_pool.json"))] = str(cfg)
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(metrics.read_text())
    assert m["engine"] == "slots"
    (w,) = m["workloads"]
    rows = {r["id"]: r for r in w["requests"]}
    assert "exceeds the slot capacity 2048" in rows[8]["refused"] and rows[8]["new_tokens"] == 0
    served = [r for r in rows.values() if r["refused"] is None]
    assert len(served) == 8 and all(r["ttft_s"] > 0 and r["new_tokens"] >= 1 for r in served)
    assert [r["arrival_s"] for r in served] == sorted(r["arrival_s"] for r in served)
    s = w["summary"]
    assert s["requests"] == 8 and s["refused"] == 1 and s["ttft_p99_s"] >= s["ttft_p50_s"] > 0
    assert s["slo_met"] <= 8 and s["goodput_rps"] > 0
    assert "== serving ==" in proc.stdout and "SLO (TTFT <= 2000 ms and TPOT <= 500 ms)" in proc.stdout
    assert "refused: request 8: prompt + new tokens = 4008 exceeds the slot capacity 2048" in proc.stdout


def test_serves_a_trace_from_a_shared_pool(tmp_path):
    """2 replicas of TP 2 + 2 shared pool ranks through torchrun: the front scheduler spreads the trace over the
    replicas, the long requests are pooled (the 4000-token one fits only over a base and a pool rank), the
    pool's ledger ends with nothing held. (TP 1 replicas: tests/inference/test_shared_serving.py.)"""
    data = json.load(open(os.path.join(ROOT, "configs", "tiny_dense_rope_pool.json")))
    data["fapool"]["model_yaml"] = os.path.join(ROOT, "configs", "models", "tiny_dense_rope.yaml")
    data["fapool"]["parallel"]["tensor_model_parallel_size"] = 2
    data["fapool"]["attention_pool"].update(pool_size=2, sharing="shared", max_active=1)
    cfg = tmp_path / "shared.json"
    cfg.write_text(json.dumps(data))
    metrics = tmp_path / "m.json"
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", "6",
           "--master_port", str(find_free_port()), INFER, "--deepspeed_config", str(cfg), "--random-weights",
           "--trace", TRACE, "--slots", "4", "--slot-capacity", "2048", "--metrics-json", str(metrics)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["id"]: r for r in json.loads(metrics.read_text())["workloads"][0]["requests"]}
    assert len(rows) == 9 and all(r["refused"] is None and r["new_tokens"] >= 1 for r in rows.values())
    assert {i for i, r in rows.items() if r["pooled"]} == {i for i, r in rows.items() if r["prompt_len"] > 128}
    assert "shared pool: 3 aligned blocks" in proc.stdout
    busy = [float(b) for b in re.findall(r"shared pool rank: served [1-9]\d* calls.*busy ([0-9.]+) s", proc.stdout)]
    assert busy and all(b > 0 for b in busy), proc.stdout[-2000:]  # the ranks that served say how long
    counters = json.loads(re.search(r"shared pool counters: (\{.*\})", proc.stdout).group(1))
    assert all(c["kv_tokens_held"] == 0 for c in counters["pool_ranks"].values())
    assert sum(c["activations"] for c in counters["replicas"].values()) == sum(r["pooled"] for r in rows.values())


def test_sigkill_of_a_shared_pool_rank_ends_every_rank(tmp_path):
    """Pool rank 4 holds part of every replica's long requests (each spans both pool ranks): SIGKILLed mid-decode,
    every rank exits non-zero within 60 s, naming it."""
    from megatron_fapool.testing.launch import run_and_kill

    data = json.load(open(os.path.join(ROOT, "configs", "tiny_dense_rope_pool.json")))
    data["fapool"]["model_yaml"] = os.path.join(ROOT, "configs", "models", "tiny_dense_rope.yaml")
    data["fapool"]["parallel"]["tensor_model_parallel_size"] = 1
    data["fapool"]["attention_pool"].update(pool_size=2, sharing="shared")
    cfg = tmp_path / "shared.json"
    cfg.write_text(json.dumps(data))
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", "5",
           "--master_port", str(find_free_port()), INFER, "--deepspeed_config", str(cfg), "--random-weights",
           "--prompt-lengths", "300", "300", "300", "300", "300", "300", "--max-new-tokens", "400",
           "--log-interval", "1"]
    rc, out, took = run_and_kill(cmd, "decode step 5:", 4)
    assert rc != 0 and took < 60, out[-3000:]
    named = ("lost rank 4 (pool)" in out or re.search(r"lost contact with rank\(s\) \[[0-9, ]*4\]", out)
             or re.search(r"Root Cause.*?rank\s*:\s*4 \(local_rank: 4\)", out, re.S))
    assert named, out[-3000:]
