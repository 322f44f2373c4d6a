"""The MA time predictor: fitting recovers known models, the file round-trips and refuses bad files
with one-line errors, the first-principles model reproduces the research's balance points, and the
ping-pong split follows the predicted times."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from megatron_fapool.config import ConfigError, load_run_config
from megatron_fapool.moe import predictor as P

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]

# the paper's MoE model (configs/models/paper_moe.yaml): hidden 4096, 32 heads, FFN 16384, 16 experts, top-2, GELU
PAPER = P.ModelShape(hidden=4096, heads=32, query_groups=32, head_dim=128, num_experts=16, top_k=2,
                     expert_ffn=16384, gated=False, tp=1, dtype_bytes=2, num_layers=4)


def _predictor(att: dict, exp: dict, **kw) -> P.TimePredictor:
    return P.TimePredictor({"attention": {p: dict(att) for p in P.ATTENTION_PHASES},
                            "expert": {p: dict(exp) for p in P.EXPERT_PHASES}}, **kw)


def test_shape_from_the_paper_config_and_refusals():
    shape = P.ModelShape.from_run_config(load_run_config(str(ROOT / "configs/paper_moe_ma.json")))
    assert shape == PAPER
    with pytest.raises(ConfigError, match="num_moe_experts"):
        P.ModelShape.from_run_config(load_run_config(str(ROOT / "configs/paper_dense_pool.json")))
    with pytest.raises(ValueError, match="divide by TP"):
        P.ModelShape(hidden=64, heads=4, query_groups=2, head_dim=16, num_experts=4, top_k=2, expert_ffn=64, tp=4)


def test_feature_counts_are_the_flop_formulas():
    f = P.attention_features(PAPER, "fwd", 16384, 1)
    h, n = 4096, 16384
    assert f["gemm_flops"] == 8 * h * h * n  # QKV 6 h^2 + output 2 h^2 per token
    assert f["attn_flops"] == 4 * 128 * 32 * n * (n + 1) / 2  # causal QK^T and PV
    fb = P.attention_features(PAPER, "fwd_bwd", 16384, 1)
    assert fb["gemm_flops"] == 3 * f["gemm_flops"] and fb["attn_flops"] == 3.5 * f["attn_flops"]
    d = P.attention_features(PAPER, "decode", 16384, 4)
    assert d["bytes"] >= 4 * n * 2 * 32 * 128 * 2 + 4 * h * h * 2  # K/V of 4 sequences + the 4 projections
    e = P.expert_features(PAPER, "fwd", [100, 0, 300])
    assert e["flops"] == 400 * 4 * h * 16384 and e["kernels"] == 3 * 5 + 2
    # the ridge: an active expert costs at least `ridge` tokens; idle ones cost none
    e = P.expert_features(PAPER, "fwd", [100, 0, 300], ridge=200)
    assert e["flops"] == (200 + 300) * 4 * h * 16384
    assert P.expected_active_experts(4, 0, num_experts=16, top_k=2) == 0
    assert P.expected_active_experts(4, 1, num_experts=16, top_k=2) == pytest.approx(0.5)
    assert P.expected_active_experts(4, 1000, num_experts=16, top_k=2) == pytest.approx(4)


def _attention_samples(pred, shape, phases=P.ATTENTION_PHASES):
    out = []
    for phase in phases:
        if phase == "decode":
            pts = [(ctx, b) for ctx in (4096, 16384) for b in (1, 2, 4, 8, 16, 32, 64)]
        else:
            pts = [(n, b) for n in (4096, 8192, 16384, 32768, 65536) for b in (1, 2)]
        for n, b in pts:
            out.append(P.Sample("attention", phase, pred.attention_time(shape, phase, n, b), seq_len=n, batch=b))
    return out


def _expert_samples(pred, shape, phases=P.EXPERT_PHASES):
    out = []
    for phase in phases:
        for L in (4, 16):
            loads = [(t,) * L for t in (1, 4, 16, 64, 128, 256, 512, 1024, 4096, 8192)]
            loads += [(8192,) + (0,) * (L - 1), tuple(max(1, 4096 // 4 ** i) for i in range(L))]
            for t in loads:
                out.append(P.Sample("expert", phase, pred.expert_time(shape, phase, t), tokens_per_expert=t))
    return out


def test_fit_recovers_known_coefficients_added():
    true_a = {"gemm_flops": 1 / 650e12, "attn_flops": 1 / 540e12, "bytes": 1 / 3.0e12, "kernels": 7e-6}
    true_e = {"flops": 1 / 560e12, "kernels": 11e-6}
    truth = _predictor(true_a, true_e, ridge={p: 0.0 for p in P.EXPERT_PHASES})
    samples = _attention_samples(truth, PAPER) + _expert_samples(truth, PAPER)
    got = P.fit(samples, PAPER)
    assert all(src == "fitted" for comp in got.sources.values() for src in comp.values())
    # the experts' terms are identifiable (kernels vary with the local experts): the coefficients come back
    for phase in P.EXPERT_PHASES:
        assert got.ridge[phase] == 0.0 and got.combine["expert"][phase] == "sum"
        for k, v in true_e.items():
            assert got.coefficients["expert"][phase][k] == pytest.approx(v, rel=1e-6), (phase, k)
    # attention's are partly collinear (the weights' bytes and the kernels are both constant per call; GEMM
    # FLOPs and activation bytes both grow with the tokens): the times come back, at every point
    ev = P.evaluate(got, PAPER, samples)
    assert ev["mape"]["all"]["fit"] < 1e-6
    for phase in ("fwd", "fwd_bwd"):
        assert got.coefficients["attention"][phase]["attn_flops"] == pytest.approx(true_a["attn_flops"], rel=1e-6)
    far = P.Sample("attention", "fwd_bwd", 1.0, seq_len=262144, batch=1)
    assert got.predict(PAPER, far) == pytest.approx(truth.predict(PAPER, far), rel=1e-6)


def test_fit_recovers_an_overlapped_model_with_its_ridge():
    ridge = P.RIDGE_GRID[10]  # 181 tokens: a grid point
    assert ridge == 181.0
    true_e = {"flops": 1 / 550e12, "kernels": 40e-6}
    truth = _predictor({"gemm_flops": 1e-15, "attn_flops": 2e-15, "bytes": 0.0, "kernels": 300e-6}, true_e,
                       ridge={p: ridge for p in P.EXPERT_PHASES},
                       combine={"attention": {p: "max" for p in P.ATTENTION_PHASES},
                                "expert": {p: "max" for p in P.EXPERT_PHASES}})
    samples = _attention_samples(truth, PAPER, ("fwd_bwd",)) + _expert_samples(truth, PAPER, ("fwd",))
    # some points on each side of the max
    bounds = {truth.combine["expert"]["fwd"]}
    host = [s for s in samples if s.component == "expert"
            and 40e-6 * P.expert_features(PAPER, "fwd", s.tokens_per_expert)["kernels"] >= s.measured_s * 0.999]
    assert host and len(host) < len([s for s in samples if s.component == "expert"]), bounds
    got = P.fit(samples, PAPER)
    assert got.combine["expert"]["fwd"] == "max" and got.ridge["fwd"] == ridge
    for k, v in true_e.items():
        assert got.coefficients["expert"]["fwd"][k] == pytest.approx(v, rel=1e-6)
    assert got.coefficients["attention"]["fwd_bwd"]["kernels"] == pytest.approx(300e-6, rel=1e-6)
    assert P.evaluate(got, PAPER, samples)["mape"]["all"]["fit"] < 1e-6
    # groups without samples keep the analytic coefficients, and say so
    assert got.sources["expert"]["decode"] == "analytic"
    assert got.coefficients["expert"]["decode"] == P.TimePredictor.analytic().coefficients["expert"]["decode"]


def test_held_out_points_are_not_fitted():
    truth = P.TimePredictor.analytic()
    samples = _attention_samples(truth, PAPER, ("fwd",))
    bad = P.Sample("attention", "fwd", samples[3].measured_s * 10, seq_len=samples[3].seq_len,
                   batch=samples[3].batch, held_out=True)
    got = P.fit(samples[:3] + [bad] + samples[4:], PAPER)
    ev = P.evaluate(got, PAPER, samples[:3] + [bad] + samples[4:])
    assert ev["mape"]["attention.fwd"]["fit"] < 1e-6
    assert ev["mape"]["attention.fwd"]["held_out"] == pytest.approx(90.0, rel=1e-6)
    assert "held out" in P.format_table(ev) and "MAPE all" in P.format_table(ev)


def test_nnls_is_non_negative_and_mape():
    # y = 2 x1 exactly, with a column that would want a negative weight
    rows = [[1.0, 1.0], [2.0, 1.0], [3.0, 1.0]]
    c = P.nnls_relative(rows, [2.0, 4.0, 6.0])
    assert c == pytest.approx([2.0, 0.0], abs=1e-9)
    c = P.nnls_relative([[1.0, 0.0], [2.0, 0.0]], [1.0, 1.0])  # a decreasing trend: best non-negative fit
    assert all(x >= 0 for x in c)
    assert P.mape([1.1, 0.9], [1.0, 1.0]) == pytest.approx(10.0)
    assert P.mape([], []) is None
    assert P.relative_errors([2.0], [1.0]) == [1.0]
    log = P.PredictionLog()
    assert log.record("step", 1.2, 1.0) == pytest.approx(20.0)
    log.record("step", 0.9, 1.0)
    assert log.mape("step") == pytest.approx(15.0) and "step 15.0% (2 points)" in log.summary()


def test_save_load_round_trip(tmp_path):
    truth = _predictor({"gemm_flops": 1 / 650e12, "attn_flops": 1 / 540e12, "bytes": 1 / 3e12, "kernels": 7e-6},
                       {"flops": 1 / 560e12, "kernels": 11e-6}, ridge={"fwd": 128.0, "fwd_bwd": 181.0, "decode": 0.0},
                       combine={"expert": {"fwd": "max"}}, comm=P.CommModel(15e-6, 250e9, measured=True))
    samples = [s for s in _attention_samples(truth, PAPER)[:5] + _expert_samples(truth, PAPER)[:5]]
    path = str(tmp_path / "cal.json")
    P.save(path, truth, PAPER, device="1 x NVIDIA H200", dtype="bfloat16", date="2026-12-01T00:00:00Z",
           samples=samples, notes=["a note"], config="configs/paper_moe_ma.json")
    pred, shape, data = P.load(path)
    assert shape == PAPER and data["device"] == "1 x NVIDIA H200" and data["config"] == "configs/paper_moe_ma.json"
    assert pred.coefficients == truth.coefficients and pred.ridge == truth.ridge and pred.combine == truth.combine
    assert pred.comm == truth.comm and pred.sources == truth.sources
    for s in P.samples_of(data):
        assert pred.predict(shape, s) == pytest.approx(truth.predict(PAPER, s), rel=1e-12)
    assert len(data["samples"]) == 10 and data["error"]["all"]["fit"] == pytest.approx(0.0, abs=1e-9)
    assert pred.mismatch(device="1 x NVIDIA H200", dtype="bfloat16") is None
    assert "float32" in pred.mismatch(dtype="float32")


def _write(tmp_path, data, name="bad.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


@pytest.fixture
def good(tmp_path):
    path = str(tmp_path / "good.json")
    P.save(path, P.TimePredictor.analytic(), PAPER, device="cpu", dtype="float32")
    return json.loads(open(path).read())


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d.pop("format"), "not a time-predictor calibration"),
    (lambda d: d.update(version=99), "version 99"),
    (lambda d: d["attention"].pop("decode"), "attention has no phase decode"),
    (lambda d: d["expert"]["fwd"]["coefficients"].pop("flops"), r"expert.fwd.coefficients must hold exactly"),
    (lambda d: d["expert"]["fwd"]["coefficients"].update(flops=-1.0), "expert.fwd.coefficients.flops"),
    (lambda d: d["expert"]["fwd"].update(combine="min"), "expert.fwd.combine"),
    (lambda d: d.pop("device"), "device: required key is missing"),
    (lambda d: d["comm"].update(bytes_per_s=0), "comm.bytes_per_s must be > 0"),
    (lambda d: d["shape"].update(hidden=0), "shape.hidden"),
])
def test_bad_files_are_refused_in_one_line(tmp_path, good, mutate, match):
    mutate(good)
    path = _write(tmp_path, good)
    with pytest.raises(ConfigError, match=match) as err:
        P.load(path)
    assert "\n" not in str(err.value) and P.KEY in str(err.value) and path in str(err.value)


def test_unreadable_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="file not found.*calibrate_ma"):
        P.load(str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="not valid JSON"):
        P.load(_write(tmp_path, "{not json"))
    with pytest.raises(ConfigError, match="holds a list"):
        P.load(_write(tmp_path, [1, 2]))


def test_first_principles_reproduce_the_research_balance_points():
    """Research notes 4.8: 3:1 (12 attention : 4 expert GPUs) balances prefill only near 180K tokens, and
    decode at 16K context at about 4 sequences per attention GPU; at 16K training the balanced
    ratio is about 1:2."""
    an = P.TimePredictor.analytic()
    prefill = P.balance_point(an, PAPER, P.Workload("prefill", 1), attention_gpus=12, expert_gpus=4)
    train = P.balance_point(an, PAPER, P.Workload("train", 1), attention_gpus=12, expert_gpus=4)
    decode = P.balance_point(an, PAPER, P.Workload("decode", 16384), attention_gpus=12, expert_gpus=4)
    assert 160_000 < prefill < 200_000, prefill
    assert 135_000 < train < prefill, train  # attention's backward is 2.5x its forward, the GEMMs' 2x
    assert 3.0 < decode < 5.5, decode
    bal = P.balanced_ratio(an, PAPER, P.Workload("train", 16384), expert_gpus=4)
    assert 0.4 < bal.ratio < 0.6, bal
    # the same ratio at 180K is balanced, at 16K it is off by ~6x and says so
    off = P.check_ratio(an, PAPER, (12, 4), P.Workload("train", 16384))
    assert not off.ok and off.attention_s < off.expert_s and 5 < off.off_by < 7
    assert "OFF by more than 25%" in off.message and "too many attention GPUs" in off.message
    assert "balances train" in off.message and "\n" not in off.message
    ok = P.check_ratio(an, PAPER, (12, 4), P.Workload("prefill", 180_000))
    assert ok.ok and "balanced within 25%" in ok.message
    dec = P.check_ratio(an, PAPER, (12, 4), P.Workload("decode", 16384, 4))
    assert dec.ok and dec.balance_point == pytest.approx(decode)
    # with one expert GPU holding all 16 experts, 3:1 needs ~4x the decode batch
    one = P.balance_point(an, PAPER, P.Workload("decode", 16384), attention_gpus=3, expert_gpus=1)
    assert 3.5 * decode < one < 5 * decode
    # the best split of 16 GPUs for 16K training gives the experts half of them or more
    best = P.best_split(an, PAPER, P.Workload("train", 16384), 16)[0]
    assert best["expert_gpus"] >= 8


def test_balanced_ratio_rises_with_the_sequence_length():
    an = P.TimePredictor.analytic()
    ratios = [P.balanced_ratio(an, PAPER, P.Workload("prefill", n), expert_gpus=4).ratio
              for n in (4096, 16384, 65536, 131072)]
    assert ratios == sorted(ratios) and 0.25 < ratios[0] < 0.35 and 1.5 < ratios[-1] < 3.0  # notes: 0.31 .. 2.25


def test_split_for_pingpong():
    an = P.TimePredictor.analytic()
    one = P.split_for_pingpong(an, PAPER, P.Workload("train", 16384, 1), attention_gpus=12, expert_gpus=4)
    assert one.m == 1 and list(one.layer_s) == [1] and "cannot be split" in one.reason
    # attention and experts alike (0.5:1 at 16K is about balanced), no communication: the split pays
    free = P.CommModel(0.0, 1e30)
    even = P.TimePredictor.analytic(comm=free)
    bal = P.balanced_ratio(even, PAPER, P.Workload("train", 16384, 2), expert_gpus=8).ratio
    two = P.split_for_pingpong(even, PAPER, P.Workload("train", 16384, 2), attention_gpus=round(bal * 8),
                               expert_gpus=8)
    assert two.m == 2 and two.layer_s[2] < 0.8 * two.layer_s[1], two
    # experts 6x slower than attention: overlapping hides at most the attention part, < 20%
    skew = P.split_for_pingpong(even, PAPER, P.Workload("train", 16384, 4), attention_gpus=12, expert_gpus=4,
                                min_gain=0.2)
    assert skew.m == 1 and "no split wins" in skew.reason
    # m must divide the batch and never exceed it
    three = P.split_for_pingpong(even, PAPER, P.Workload("decode", 16384, 3), attention_gpus=12, expert_gpus=4)
    assert set(three.layer_s) == {1, 3}
    with pytest.raises(ValueError, match="cannot split"):
        P.pingpong_layer_time(even, PAPER, P.Workload("decode", 16384, 2), 4, attention_gpus=12, expert_gpus=4)
    # host-bound parts (a fixed cost per call, as in eager decode): halves cost as much as wholes, no gain
    fixed = _predictor({"gemm_flops": 0.0, "attn_flops": 0.0, "bytes": 0.0, "kernels": 50e-6},
                       {"flops": 0.0, "kernels": 40e-6}, comm=free)
    host = P.split_for_pingpong(fixed, PAPER, P.Workload("decode", 16384, 8), attention_gpus=12, expert_gpus=4)
    assert host.m == 1 and host.layer_s[2] >= host.layer_s[1]


def test_predictor_refuses_bad_coefficients():
    with pytest.raises(ValueError, match="exactly"):
        P.TimePredictor({"attention": {p: {"bytes": 1.0} for p in P.ATTENTION_PHASES},
                         "expert": {p: {"flops": 1.0, "kernels": 0.0} for p in P.EXPERT_PHASES}})
    with pytest.raises(ValueError, match=">= 0"):
        _predictor({"gemm_flops": -1.0, "attn_flops": 0.0, "bytes": 0.0, "kernels": 0.0},
                   {"flops": 1.0, "kernels": 0.0})
    with pytest.raises(ValueError, match="'sum' or 'max'"):
        _predictor({"gemm_flops": 1.0, "attn_flops": 0.0, "bytes": 0.0, "kernels": 0.0},
                   {"flops": 1.0, "kernels": 0.0}, combine={"expert": {"fwd": "min"}})
    with pytest.raises(ValueError, match="phase must be one of"):
        P.Sample("expert", "prefill", 1.0, tokens_per_expert=(1,))
    with pytest.raises(ValueError, match="positive"):
        P.Sample("attention", "fwd", 0.0, seq_len=1)
    assert math.isfinite(P.TimePredictor.analytic().attention_time(PAPER, "decode", 1, 1))
