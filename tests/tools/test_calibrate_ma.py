"""tools/calibrate_ma.py end to end on CPU with the tiny MoE model: it measures attention (fwd, fwd_bwd,
decode) and Megatron's SequentialMLP (fwd, fwd_bwd, decode-sized), fits, reports held-out errors and
writes a calibration file that loads back into a working predictor."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_fapool.moe import predictor as P

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 120


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    try:
        return subprocess.run([sys.executable, str(ROOT / "tools" / "calibrate_ma.py"), *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"calibrate_ma did not finish in {TIMEOUT_S} s:\n{(e.stdout or '')[-3000:]}")


@pytest.mark.timeout(TIMEOUT_S + 30)
def test_calibration_file_loads_into_a_working_predictor(tmp_path):
    out = tmp_path / "ma.json"
    proc = _run("--device", "cpu", "--config", "configs/tiny_moe_ma.json", "--seqlens", "32,64,96,128",
                "--batches", "1", "--decode-contexts", "64", "--decode-batches", "1,2,4,8", "--expert-tokens",
                "2,8,32,64", "--local-experts", "4", "--reps", "1", "--warmup", "1", "--output", str(out))
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    for what in ("[attention]", "[experts]", "== predicted vs measured", "held-out MAPE", "== coefficients ==",
                 "MA ratio 12:4", f"wrote {out}"):
        assert what in text, what

    predictor, shape, data = P.load(str(out))
    assert data["device"].startswith("cpu") and data["dtype"] == "float32" and data["date"]
    assert shape.hidden == 64 and shape.heads == 4 and shape.query_groups == 2 and shape.num_experts == 16
    samples = P.samples_of(data)
    groups = {(s.component, s.phase) for s in samples}
    assert groups == {("attention", p) for p in P.ATTENTION_PHASES} | {("expert", p) for p in P.EXPERT_PHASES}
    assert all(s.measured_s > 0 for s in samples)
    # every third interior point of a sweep is held out, never a sweep's ends
    held = [s for s in samples if s.held_out]
    assert held and len(held) < len(samples) / 2
    fwd = [s.seq_len for s in samples if s.component == "attention" and s.phase == "fwd"]
    assert fwd == [32, 64, 96, 128] and [s.held_out for s in samples if s.component == "attention"
                                          and s.phase == "fwd"] == [False, True, False, False]
    # the file's coefficients are the fit on the points not held out (and reproduce its table)
    refit = P.fit(samples, shape)
    assert refit.ridge == predictor.ridge and refit.combine == predictor.combine
    for comp, phases in predictor.coefficients.items():
        for phase, c in phases.items():
            assert refit.coefficients[comp][phase] == pytest.approx(c, rel=1e-9)
    for row, s in zip(data["samples"], samples):
        assert row["predicted_s"] == pytest.approx(predictor.predict(shape, s), rel=1e-9)
    assert data["error"]["all"]["held_out"] is not None and "error_refit_all_points" in data
    assert all(src == "fitted" for comp in predictor.sources.values() for src in comp.values())
    assert any("comm: not measurable" in n for n in data["notes"])
    # usable: a ratio check and a split decision from the calibrated model
    check = P.check_ratio(predictor, shape, (12, 4), P.Workload("train", 512))
    assert "MA ratio 12:4" in check.message
    assert P.split_for_pingpong(predictor, shape, P.Workload("decode", 256, 4), attention_gpus=12,
                                expert_gpus=4).m in (1, 2, 4)


def test_a_dense_config_is_refused_in_one_line(tmp_path, load_tool, capsys):
    tool = load_tool("calibrate_ma")  # refused before any process group or tensor exists
    code = tool.main(["--device", "cpu", "--config", str(ROOT / "configs/tiny_dense_pool.json"), "--output",
                      str(tmp_path / "x.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "calibrate_ma: error:" in err[0] and "num_moe_experts" in err[0]
    assert not (tmp_path / "x.json").exists()
