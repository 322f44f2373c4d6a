"""The calibration fit (threshold, cost model, break-even) on made-up sweeps, and its file round trip."""

import math

import pytest

from megatron_fapool.attention.pool.calibrate import Measurements, calibration_file, fit, overheads
from megatron_fapool.attention.pool.manager import CostModel, PoolResourceManager
from megatron_fapool.config import ConfigError
from megatron_fapool.config.calibration import load_calibration, write_calibration

A_COEF, F_COEF, FIXED = 1e-9, 1e-6, 1e-3  # A = a t^2, F = f t, pooled = A / 2 + FIXED


def sweep(seqlens, *, a=A_COEF, f=F_COEF, fixed=FIXED, link=1e10):
    A = [a * t * t for t in seqlens]
    return Measurements(
        seqlens=list(seqlens), attention_time=A, ffn_time=[f * t for t in seqlens],
        pooled_time=[x / 2 + fixed for x in A], link_bytes_per_s=link,
        kv_bytes_per_token=2 * 2 * 16 * 4, q_bytes_per_token=4 * 16 * 4,
    )


def test_overhead_is_the_pooled_time_beyond_half_the_attention_floored_at_zero():
    assert overheads([4.0, 4.0], [3.0, 1.0]) == [1.0, 0.0]
    m = sweep([1024, 2048])
    for a, p, o in zip(m.attention_time, m.pooled_time, m.overhead):
        assert o == pytest.approx(max(0.0, p - a / 2))


def test_threshold_is_the_log2_interpolated_zero_crossing():
    m = sweep([1024, 2048, 4096])
    r = fit(m)
    g0, g1 = (a - f - o for a, f, o in list(zip(m.attention_time, m.ffn_time, m.overhead))[:2])
    assert g0 <= 0 < g1
    assert r.threshold == math.floor(2 ** (10 + g0 / (g0 - g1)))
    assert isinstance(r.threshold, int) and r.threshold >= m.seqlens[0]
    assert "interpolated" in r.notes[-1]


def test_threshold_when_the_condition_holds_at_once_or_never():
    early = fit(sweep([4096, 8192], f=1e-9))
    assert early.threshold == 4096 and "smallest" in early.notes[-1]
    # attention never outgrows FFN + overhead in the sweep: extrapolated past its end
    late = fit(sweep([64, 128, 256], f=1e-3))
    assert late.threshold > 256 and "extrapolated" in late.notes[-1]
    a, f, model = A_COEF, 1e-3, late.cost_model

    def holds(t):
        return a * t * t > f * t + max(0.0, model.time(t, 1) - a * t * t / 2)

    assert holds(late.threshold) and not holds(late.threshold - 1)


def test_cost_model_and_break_even():
    m = sweep([1024, 2048, 4096, 8192])
    r = fit(m)
    cost = r.cost_model
    assert cost.attention_s_per_token2 == pytest.approx(A_COEF)  # exact fit of A = a t^2
    assert cost.link_bytes_per_s == 1e10 and cost.call_overhead_s >= 0
    assert cost.kv_bytes_per_token == 2 * 2 * 16 * 4 and cost.q_bytes_per_token == 4 * 16 * 4
    # pooled < local from A > 2 FIXED on: t = 2048; the call overhead averages the points up to it
    assert r.measured_break_even == 2048 and r.call_overhead_points == [1024, 2048]
    assert cost.call_overhead_s == pytest.approx(FIXED)
    h0, h1 = (a - p for a, p in list(zip(m.attention_time, m.pooled_time))[:2])
    assert r.measured_break_even_interpolated == pytest.approx(2 ** (10 + h0 / (h0 - h1)))
    assert r.predicted_break_even == cost.break_even()
    assert r.break_even_difference_percent() == pytest.approx(100 * (cost.break_even() - 2048) / 2048)
    assert cost.best_active(1 << 20, 1) == 1


def test_no_measured_break_even_averages_the_three_smallest_points():
    r = fit(sweep([64, 128, 256, 512], fixed=1.0))
    assert r.measured_break_even is None and r.measured_break_even_interpolated is None
    assert r.call_overhead_points == [64, 128, 256] and r.break_even_difference_percent() is None


def test_a_sweep_must_be_complete_and_increasing():
    with pytest.raises(ValueError, match="one time of each kind"):
        Measurements([64, 128], [1.0], [1.0, 1.0], [1.0, 1.0], 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="must increase"):
        Measurements([128, 64], [1.0] * 2, [1.0] * 2, [1.0] * 2, 1.0, 1.0, 1.0)


def test_the_file_loads_into_the_resource_manager(tmp_path):
    m = sweep([1024, 2048, 4096])
    r = fit(m)
    path = str(tmp_path / "cal.json")
    write_calibration(path, calibration_file(m, r, pool_bytes_per_call=[1, 2, 3], device="cpu", model={"tp": 1}))
    data = load_calibration(path)
    assert data["threshold"] == r.threshold and data["seqlens"] == m.seqlens and data["overhead"] == m.overhead
    assert data["predicted_break_even"] == r.predicted_break_even and data["pool_bytes_per_call"] == [1, 2, 3]
    assert CostModel(**data["cost_model"]) == r.cost_model

    class _PoolCfg:
        threshold = "auto"
        calibration_file = path
        max_active = None
        hysteresis = 2

    mgr = PoolResourceManager.from_config(_PoolCfg, pool_share=1)
    assert mgr.threshold == r.threshold and mgr.cost_model == r.cost_model
    assert mgr.decide(r.threshold) == 0 and mgr.decide(r.threshold + 1) == 1


@pytest.mark.parametrize("content, match", [
    (None, "calibration_file: file not found"),
    ("{", "is not valid JSON"),
    ('{"cost_model": {}}', "has no 'threshold'"),
    ('{"threshold": 5, "cost_model": {"link_bytes_per_s": 1}}', "cost_model.attention_s_per_token2: required"),
])
def test_a_bad_file_is_one_config_error(tmp_path, content, match):
    path = tmp_path / "cal.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=match):
        load_calibration(str(path))
