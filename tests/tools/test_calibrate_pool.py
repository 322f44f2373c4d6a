"""tools/calibrate_pool.py on 2 gloo ranks (base + 1 pool rank) with a tiny model.

The JSON it writes must load through ``load_calibration`` into the resource manager and
give a working ``CostModel``; the sweep's measurements must be complete and sane. The fit
itself (threshold, overhead, cost model, break-even) is tests/attention/pool/test_calibrate.py's.
"""

import json
import os
import signal
import subprocess
import sys

import pytest

from megatron_fapool.attention.pool.manager import CostModel, PoolResourceManager
from megatron_fapool.config.calibration import load_calibration
from megatron_fapool.testing.distributed import find_free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 60


def _run_torchrun(args, timeout):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(find_free_port()), *args,
    ]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers
        out, _ = proc.communicate()
        pytest.fail(f"calibrate_pool did not finish within {timeout} s:\n{out[-4000:]}")
    return proc.returncode, out


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT_S + 30)
def test_calibration_json_loads_into_the_resource_manager(tmp_path):
    out_path = tmp_path / "pool_calibration.json"
    seqlens = [64, 128, 256, 512]
    code, out = _run_torchrun([
        "tools/calibrate_pool.py", "--device", "cpu",
        "--deepspeed_config", "configs/tiny_dense_pool.json", "--tp", "1", "--pool-size", "1",
        "--seqlens", ",".join(map(str, seqlens)), "--reps", "2", "--warmup", "1", "--bw-mib", "4",
        "--output", str(out_path),
    ], TIMEOUT_S)
    assert code == 0, out[-4000:]
    assert "threshold =" in out and "break-even" in out, out[-4000:]

    data = load_calibration(str(out_path))
    raw = json.loads(out_path.read_text())
    for key in ("device", "date", "model", "seqlens", "attention_time", "ffn_time", "overhead", "pooled_time",
                "threshold", "measured_break_even", "predicted_break_even", "cost_model"):
        assert key in raw, key
    assert raw["seqlens"] == seqlens
    for key in ("attention_time", "ffn_time", "overhead", "pooled_time"):
        assert len(raw[key]) == len(seqlens)
        assert all(isinstance(x, float) and x >= 0 for x in raw[key]), (key, raw[key])
    assert all(x > 0 for x in raw["attention_time"] + raw["ffn_time"] + raw["pooled_time"])
    # --tp 1 on the tiny model: all 4 heads and 2 query groups on the one base rank
    assert raw["model"]["heads_per_rank"] == 4 and raw["model"]["kv_heads_per_rank"] == 2
    assert isinstance(data["threshold"], int) and data["threshold"] >= seqlens[0]

    cost = CostModel(**data["cost_model"])
    elt = 4  # the tiny config trains in fp32
    assert cost.kv_bytes_per_token == 2 * 2 * 16 * elt and cost.q_bytes_per_token == 4 * 16 * elt
    assert cost.attention_s_per_token2 > 0 and cost.link_bytes_per_s > 0

    # what the config path does with threshold "auto"
    class _PoolCfg:
        threshold = "auto"
        calibration_file = str(out_path)
        max_active = None
        hysteresis = 2

    mgr = PoolResourceManager.from_config(_PoolCfg, pool_share=1)
    assert mgr.threshold == data["threshold"] and mgr.cost_model == cost
    assert mgr.decide(data["threshold"]) == 0
