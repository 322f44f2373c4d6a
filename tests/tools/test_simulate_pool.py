"""tools/simulate_pool.py: --help runs, --check computes its errors right, the SVG is written."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_help_runs():
    out = subprocess.run([sys.executable, "tools/simulate_pool.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0 and "--check" in out.stdout and "--plot" in out.stdout


def test_check_errors_are_predicted_minus_measured_over_measured(load_tool, monkeypatch):
    tool = load_tool("simulate_pool")
    monkeypatch.setattr(tool, "MEASURED", [
        ("src A", "decode 8192x1", "dp", 1, "graph", "tpot_ms", 0.5, "why A"),
        ("src B", "ttft 8192", "dp", 1, "eager", "ttft_ms", 31.0, ""),
    ])
    monkeypatch.setattr(tool, "predict", lambda case, layout, gpus, cal, metric: 1.0 if "decode" in case else 32.0)
    rows = tool.check(tool.Calibration())
    assert [r["error"] for r in rows] == [1.0, (32.0 - 31.0) / 31.0]
    assert [r["within"] for r in rows] == [False, True]
    lines = tool.print_check(rows)
    assert "1 of 2 within 15%." in lines and any(l.startswith("- miss, dp decode 8192x1") and "why A" in l
                                                 for l in lines)
    assert any("+100.0%" in l for l in lines) and any("+3.2%" in l for l in lines)


def test_check_predicts_a_measured_case(load_tool):
    tool = load_tool("simulate_pool")
    cal = tool.Calibration()
    want = (cal.weight_bytes + 8224 * cal.kv_bytes_per_token) / cal.hbm_bytes_per_s + cal.decode_fixed_s
    # the last decode step of 32 after an 8192-token prompt; the TPOT is the mean over the 32
    mean = sum((cal.weight_bytes + (8192 + k) * cal.kv_bytes_per_token) / cal.hbm_bytes_per_s + cal.decode_fixed_s
               for k in range(32)) / 32
    got = tool.predict("decode 8192x1", "dp", 1, cal, "tpot_ms")
    assert abs(got - 1e3 * mean) < 1e-9 and got < 1e3 * want


def test_sweep_writes_an_svg(load_tool, tmp_path):
    tool = load_tool("simulate_pool")
    svg, md = tmp_path / "s.svg", tmp_path / "s.md"
    assert tool.main(["--requests", "20", "--rate", "20", "--layouts", "dp", "--gpus", "2", "--bases", "2",
                      "--pool-sizes", "0", "1", "--plot", str(svg), "--markdown", str(md)]) == 0
    text = svg.read_text()
    assert text.startswith("<svg") and text.count("<polyline") == 2
    assert "2+1" in md.read_text()
