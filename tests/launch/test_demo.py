"""The demo entry point: bad input exits non-zero with one line; a killed pool rank ends every rank quickly."""

import json
import re
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from megatron_fapool.testing.distributed import find_free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(ROOT, "launch", "demo.py")
TINY = os.path.join(ROOT, "configs", "tiny_dense_pool.json")
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def _config(tmp_path, mutate=None, yaml_text=None):
    data = json.load(open(TINY))
    data["fapool"]["model_yaml"] = os.path.join(ROOT, "configs", "models", "tiny_dense.yaml")
    if yaml_text is not None:
        (tmp_path / "m.yaml").write_text(yaml_text)
        data["fapool"]["model_yaml"] = str(tmp_path / "m.yaml")
    if mutate:
        mutate(data)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(data))
    return str(path)


def _run_rank0(config, world=4):
    env = dict(os.environ, WORLD_SIZE=str(world), RANK="0", LOCAL_RANK="0", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, DEMO, "--deepspeed_config", config], env=env,
                          capture_output=True, text=True, timeout=120)


def _error_line(proc):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.splitlines() if l.startswith("fapool: error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_misspelt_key_exits_with_one_line(tmp_path):
    cfg = _config(tmp_path, lambda d: d["fapool"]["attention_pool"].update(treshold=64))
    assert "fapool.attention_pool.treshold: unknown key" in _error_line(_run_rank0(cfg))


def test_pool_that_does_not_fit_the_world(tmp_path):
    cfg = _config(tmp_path, lambda d: d["fapool"]["attention_pool"].update(pool_size=4))
    assert "attention_pool.pool_size=4 does not fit a world of 4 ranks" in _error_line(_run_rank0(cfg))


def test_negative_threshold_and_indivisible_heads(tmp_path):
    cfg = _config(tmp_path, lambda d: d["fapool"]["attention_pool"].update(threshold=-5))
    assert "fapool.attention_pool.threshold" in _error_line(_run_rank0(cfg))
    cfg = _config(tmp_path, lambda d: d["fapool"]["parallel"].update(tensor_model_parallel_size=3))
    assert "not divisible by tensor_model_parallel_size=3" in _error_line(_run_rank0(cfg, world=5))


def test_yaml_with_wrong_type(tmp_path):
    src = open(os.path.join(ROOT, "configs", "models", "tiny_dense.yaml")).read()
    cfg = _config(tmp_path, yaml_text=src.replace("num_attention_heads: 4", "num_attention_heads: four"))
    assert "language_model.num_attention_heads: got 'four'" in _error_line(_run_rank0(cfg))


@pytest.mark.slow
def test_killing_a_pool_rank_mid_step_ends_every_rank(tmp_path):
    """SIGKILL pool rank 2 while it serves: all ranks exit non-zero within 60 s, naming rank 2."""
    cmd = [TORCHRUN, "--nproc_per_node", "4", "--master_port", str(find_free_port()), DEMO,
           "--deepspeed_config", TINY, "--seq-lengths"] + ["1500"] * 400
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        victim = None
        deadline = time.monotonic() + 120
        while victim is None and time.monotonic() < deadline:
            time.sleep(1)
            for child in psutil.Process(proc.pid).children(recursive=True):
                try:
                    env_c = child.environ()
                except psutil.Error:
                    continue
                if env_c.get("RANK") == "2" and child.cpu_times().user > 3:  # started and working
                    victim = child
        assert victim is not None, "pool rank 2 never started"
        time.sleep(3)  # mid-step: the demo runs 400 pooled steps
        victim.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        out, _ = proc.communicate(timeout=90)
        elapsed = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert elapsed < 60, elapsed
    assert "demo done" not in out
    # Named by whoever sees it first: the base rank (its pooled call failed), the liveness
    # monitor, or the launcher's root-cause report (torchrun stops the others at once).
    named = (
        "lost contact with rank(s) [2]" in out
        or "lost rank 2 (pool)" in out
        or re.search(r"Root Cause.*?rank\s*:\s*2 \(local_rank: 2\)", out, re.S)
    )
    assert named, out[-3000:]
