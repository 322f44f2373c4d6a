"""Request traces and serving metrics: bad lines are named, Poisson arrivals, percentiles, goodput under an SLO."""

import json

import pytest

from megatron_fapool.inference.generate import Generation
from megatron_fapool.inference.trace import TraceError, load_trace, percentile, poisson_arrivals, summarize


def _load(tmp_path, lines, **kw):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return load_trace(str(path), tokenize=lambda s: [ord(c) for c in s], vocab_size=256, default_new_tokens=4, **kw)


def test_trace_lines(tmp_path):
    items = _load(tmp_path, ['# comment', '', '{"arrival_s": 0.5, "prompt": "ab", "max_new_tokens": 2}',
                             '{"prompt_len": 3}', '{"arrival_s": 1, "prompt_tokens": [1, 2]}'], seed=1)
    assert items[0] == (0.5, [97, 98], 2)
    assert items[1][0] == 0.0 and len(items[1][1]) == 3 and items[1][2] == 4
    assert items[2] == (1.0, [1, 2], 4)
    assert _load(tmp_path, ['{"prompt_len": 3}'], seed=1)[0][1] == items[1][1]  # seeded


@pytest.mark.parametrize("line, message", [
    ("{nope", "line 1: not JSON"),
    ('[1, 2]', "line 1: expected an object"),
    ('{"prompt_len": 3, "when": 1}', "unknown key(s) ['when']"),
    ('{"prompt_len": 3, "prompt": "x"}', "give exactly one of prompt, prompt_tokens, prompt_len"),
    ('{"arrival_s": -1, "prompt_len": 3}', "arrival_s must be a number >= 0"),
    ('{"prompt_len": 0}', "prompt_len must be an integer >= 1"),
    ('{"prompt_tokens": [300]}', "prompt_tokens must be a non-empty list of ids in [0, 256)"),
    ('{"prompt_len": 2, "max_new_tokens": 0}', "max_new_tokens must be an integer >= 1"),
])
def test_bad_trace_lines_are_named(tmp_path, line, message):
    with pytest.raises(TraceError, match=None) as e:
        _load(tmp_path, [line])
    assert message in str(e.value) and "t.jsonl line 1" in str(e.value)


def test_empty_or_missing_trace(tmp_path):
    with pytest.raises(TraceError, match="no requests"):
        _load(tmp_path, ["# nothing"])
    with pytest.raises(TraceError, match="no such file"):
        load_trace(str(tmp_path / "none.jsonl"), tokenize=list, vocab_size=4, default_new_tokens=1)


def test_poisson_arrivals():
    times = poisson_arrivals(2000, 50.0, seed=3)
    assert times[0] == 0.0 and all(b >= a for a, b in zip(times, times[1:]))
    assert abs(len(times) / times[-1] - 50.0) < 5.0  # the rate, within sampling noise
    assert poisson_arrivals(5, 2.0, seed=3) == poisson_arrivals(5, 2.0, seed=3)
    with pytest.raises(ValueError, match="> 0"):
        poisson_arrivals(3, 0.0)


def test_percentiles_and_goodput():
    assert percentile([3, 1, 2], 50) == 2 and percentile([0, 10], 99) == pytest.approx(9.9)
    gens = [Generation(id=0, prompt_len=10, tokens=[1, 2, 3], ttft_s=0.1, decode_s=[0.01, 0.03]),
            Generation(id=1, prompt_len=20, tokens=[1, 2], ttft_s=0.5, decode_s=[0.01]),
            Generation(id=2, prompt_len=5, refused="too long")]
    m = summarize(gens, 2.0, slo_ttft_s=0.2, slo_tpot_s=0.05)
    assert m["requests"] == 2 and m["refused"] == 1
    assert m["tps"] == pytest.approx((13 + 22) / 2.0) and m["output_tps"] == pytest.approx(5 / 2.0)
    assert m["ttft_p50_s"] == pytest.approx(0.3) and m["tpot_mean_s"] == pytest.approx(0.015)
    assert m["slo_met"] == 1 and m["goodput_rps"] == pytest.approx(0.5) and m["goodput_tps"] == pytest.approx(6.5)
    json.dumps(m)  # the metrics file takes it as it is
