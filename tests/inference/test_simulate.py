"""The layout simulator: the real scheduler over a simulated engine, costs from the calibration (CPU, seconds)."""

import json

import pytest

from megatron_fapool.inference.simulate import (Calibration, SimulatedEngine, VirtualTime, mixed_requests,
                                                parse_layout, simulate)

CAL = Calibration()


def test_one_request_costs_the_model_prefill_and_decode():
    n, new = 8192, 9
    r = simulate(parse_layout("dp", 1), [(0.0, n, new)], CAL)
    g = r["generations"][0]
    flops = 2 * CAL.weight_bytes / 2 * n + CAL.layers * 4 * CAL.heads * CAL.head_dim * n * (n + 1) // 2
    assert g.ttft_s == pytest.approx(max(CAL.prefill_host_s, flops / CAL.prefill_flops_per_s) + CAL.prefill_per_prompt_s)
    steps = [(CAL.weight_bytes + (n + k) * CAL.kv_bytes_per_token) / CAL.hbm_bytes_per_s + CAL.decode_fixed_s
             for k in range(new - 1)]
    assert g.decode_s == pytest.approx(steps)
    assert len(g.tokens) == new and r["requests"] == 1 and r["refused"] == 0


def test_tp_divides_the_read_and_adds_all_reduces():
    one = simulate(parse_layout("dp", 1), [(0.0, 1024, 3)], CAL)["tpot_p50_s"]
    tp2 = simulate(parse_layout("tp2", 2), [(0.0, 1024, 3)], CAL)["tpot_p50_s"]
    read = (CAL.weight_bytes + 1024.5 * CAL.kv_bytes_per_token) / CAL.hbm_bytes_per_s  # mean of its 2 steps
    assert one - tp2 == pytest.approx(read / 2 - 2 * CAL.layers * CAL.allreduce_s)


def test_virtual_time_runs_the_earliest_job_first():
    vt, order = VirtualTime(), []

    def job(name, gaps):
        def run(clock, sleep):
            for gap in gaps:
                sleep(gap)
                order.append((name, clock()))
            return name
        return run

    assert vt.run([job("a", [3, 3]), job("b", [1, 1, 1, 4])]) == ["a", "b"]
    assert order == [("b", 1), ("b", 2), ("a", 3), ("b", 3), ("a", 6), ("b", 7)]


def test_pool_ranks_hold_long_requests_and_are_released():
    layout = parse_layout("2+2", 2, threshold=16384)
    reqs = [(0.0, 65536, 8), (0.0, 1024, 8), (0.1, 100000, 8)]
    r = simulate(layout, reqs, CAL)
    gens = r["generations"]
    assert [g.pooled for g in gens] == [True, False, True] and r["pooled"] == 2
    # the long prompt's prefill attention is split: faster than on one GPU alone
    alone = simulate(parse_layout("dp", 1), reqs[:1], CAL)["generations"][0]
    assert gens[0].ttft_s < alone.ttft_s


def test_pool_manager_accounting_charges_and_frees(monkeypatch):
    seen = []
    real = SimulatedEngine.leave

    def leave(self, requests):
        out = real(self, requests)
        seen.append(self.pool.counters()["pool_ranks"])
        return out

    monkeypatch.setattr(SimulatedEngine, "leave", leave)
    simulate(parse_layout("1+2", 1, threshold=16384), [(0.0, 60000, 4)], CAL)
    final = seen[-1]
    assert all(c["kv_tokens_held"] == 0 for c in final.values())
    assert [c["kv_tokens_peak"] for c in final.values()] == [20001, 20001]  # 60004 tokens: 20002 on the base, 40002 over 2 ranks


def test_a_request_that_can_never_fit_is_refused_with_a_message():
    small = Calibration(kv_bytes_per_gpu=65536 * 10000)
    r = simulate(parse_layout("dp", 1), [(0.0, 20000, 4), (0.0, 500, 4)], small)
    assert r["refused"] == 1 and r["requests"] == 1
    assert "can never fit" in r["refusals"][0] and "holds 10000" in r["refusals"][0]
    pooled = simulate(parse_layout("1+1", 1, threshold=1000), [(0.0, 30000, 4), (0.0, 19000, 4)], small)
    assert pooled["refused"] == 1 and "15002 K/V tokens on its replica" in pooled["refusals"][0]
    assert pooled["generations"][1].pooled  # 19004 tokens: too many for the base alone, fit with the pool


def test_a_long_request_waits_for_pool_room():
    small = Calibration(kv_bytes_per_gpu=65536 * 20000)  # a pool rank holds one request's half
    r = simulate(parse_layout("2+1", 1, threshold=1000), [(0.0, 30000, 4), (0.0, 30000, 4)], small)
    first, second = r["generations"]
    assert r["refused"] == 0 and second.ttft_s > first.done_s  # one request's pool share at a time


def test_round_robin_ignores_length_and_the_front_scheduler_spreads_long_ones():
    reqs = [(0.0, 65536, 4), (0.01, 65536, 4), (0.02, 512, 4), (0.03, 512, 4)]
    rr = simulate(parse_layout("dp-rr", 2), reqs, CAL)
    ll = simulate(parse_layout("dp", 2), reqs, CAL)
    assert rr["requests"] == ll["requests"] == 4
    # least-loaded puts the two long prompts on different replicas, so the second does not wait for the first
    assert ll["generations"][1].ttft_s < rr["generations"][1].ttft_s + 1e-9


def test_mixed_requests_are_90_10_and_seeded():
    a, b = mixed_requests(500, 4.0, seed=3), mixed_requests(500, 4.0, seed=3)
    assert a == b
    longs = [n for _, n, _ in a if n >= 32768]
    assert 30 <= len(longs) <= 75 and all(512 <= n <= 2048 for _, n, _ in a if n < 32768)
    assert all(32 <= new <= 256 for _, _, new in a)


def test_calibration_json_overrides_and_rejects_unknown(tmp_path):
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({"hbm_bytes_per_s": 1e12}))
    assert Calibration.from_json(str(path)).hbm_bytes_per_s == 1e12
    path.write_text(json.dumps({"hbm_bandwidth": 1e12}))
    with pytest.raises(ValueError, match="unknown parameter"):
        Calibration.from_json(str(path))


def test_layouts_count_their_gpus():
    assert [parse_layout(t, 8).gpus for t in ("dp", "tp2", "tp8", "6+2")] == [8, 8, 8, 8]
    assert parse_layout("tp8pp2", 16).gpus == 16 and parse_layout("8+32", 8).gpus == 40
    with pytest.raises(ValueError, match="layout"):
        parse_layout("tp3", 8)
