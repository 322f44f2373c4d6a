"""Request traces (arrival times, prompts, output lengths) and the serving metrics over them.

A trace file is JSON Lines, one request per line (``#`` lines and blank lines skipped)::

    {"arrival_s": 0.0,  "prompt_len": 2048,  "max_new_tokens": 64}
    {"arrival_s": 0.15, "prompt": "def main(", "max_new_tokens": 32}
    {"arrival_s": 0.4,  "prompt_tokens": [1, 5, 9]}

``arrival_s`` is seconds after the start (>= 0); the prompt is one of ``prompt`` (text,
tokenized), ``prompt_tokens`` (ids) or ``prompt_len`` (that many random ids, seeded);
``max_new_tokens`` defaults to the command line's. :func:`poisson_arrivals` makes arrival
times at a given rate instead. :func:`summarize` computes TTFT / TPOT / TPS with p50 and
p99, and the goodput under an SLO (requests per second, and their tokens per second, that
met both the TTFT and the TPOT limit).
"""

from __future__ import annotations

import json
import math
import os

import torch

__all__ = ["TraceError", "load_trace", "percentile", "poisson_arrivals", "summarize"]


class TraceError(ValueError):
    """A trace file that cannot be served (names the line and the key)."""


def load_trace(path: str, *, tokenize, vocab_size: int, default_new_tokens: int, seed: int = 0,
               random_below: int | None = None):
    """``[(arrival_s, prompt ids, max_new_tokens)]`` from a JSON Lines trace, in file order.

    ``prompt_tokens`` must be ids below ``vocab_size``; ``prompt_len`` draws ids below ``random_below``
    (default ``vocab_size``; e.g. a tokenizer smaller than the model's vocabulary)."""
    if not os.path.isfile(path):
        raise TraceError(f"trace {path}: no such file")
    g = torch.Generator().manual_seed(seed)
    out = []
    with open(path, encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            where = f"trace {path} line {no}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceError(f"{where}: not JSON ({e.msg})") from None
            if not isinstance(item, dict):
                raise TraceError(f"{where}: expected an object like {{\"arrival_s\": 0.0, \"prompt_len\": 512}}")
            unknown = set(item) - {"arrival_s", "prompt", "prompt_tokens", "prompt_len", "max_new_tokens"}
            if unknown:
                raise TraceError(f"{where}: unknown key(s) {sorted(unknown)}")
            arrival = item.get("arrival_s", 0.0)
            if not isinstance(arrival, (int, float)) or isinstance(arrival, bool) or not arrival >= 0:
                raise TraceError(f"{where}: arrival_s must be a number >= 0, got {arrival!r}")
            given = [k for k in ("prompt", "prompt_tokens", "prompt_len") if k in item]
            if len(given) != 1:
                raise TraceError(f"{where}: give exactly one of prompt, prompt_tokens, prompt_len (got {given})")
            key = given[0]
            value = item[key]
            if key == "prompt":
                if not isinstance(value, str) or not value:
                    raise TraceError(f"{where}: prompt must be a non-empty string")
                prompt = list(tokenize(value))
            elif key == "prompt_tokens":
                if not isinstance(value, list) or not value or not all(
                        isinstance(t, int) and 0 <= t < vocab_size for t in value):
                    raise TraceError(f"{where}: prompt_tokens must be a non-empty list of ids in [0, {vocab_size})")
                prompt = value
            else:
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise TraceError(f"{where}: prompt_len must be an integer >= 1, got {value!r}")
                prompt = torch.randint(0, random_below or vocab_size, (value,), generator=g).tolist()
            new = item.get("max_new_tokens", default_new_tokens)
            if not isinstance(new, int) or isinstance(new, bool) or new < 1:
                raise TraceError(f"{where}: max_new_tokens must be an integer >= 1, got {new!r}")
            out.append((float(arrival), prompt, new))
    if not out:
        raise TraceError(f"trace {path}: no requests in it")
    return out


def poisson_arrivals(n: int, rate: float, seed: int = 0) -> list[float]:
    """``n`` arrival times (seconds) of a Poisson process of ``rate`` requests per second, the first at 0."""
    if not rate > 0:
        raise ValueError(f"the arrival rate must be > 0 requests per second, got {rate}")
    g = torch.Generator().manual_seed(seed)
    gaps = torch.empty(max(n - 1, 0), dtype=torch.float64).exponential_(rate, generator=g).tolist()
    times, t = [0.0], 0.0
    for gap in gaps:
        t += gap
        times.append(t)
    return times[:n]


def percentile(values, q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation; nan for no values."""
    values = sorted(values)
    if not values:
        return math.nan
    k = (len(values) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(gens, wall_s: float, *, slo_ttft_s: float | None = None, slo_tpot_s: float | None = None) -> dict:
    """Serving metrics of the served (not refused) generations over ``wall_s`` seconds."""
    served = [g for g in gens if g.refused is None]
    ttft = [g.ttft_s for g in served]
    tpot = [g.tpot_s for g in served if g.decode_s]
    tokens = sum(g.prompt_len + len(g.tokens) for g in served)
    out = {"requests": len(served), "refused": len(gens) - len(served), "wall_s": wall_s,
           "tps": tokens / wall_s if wall_s > 0 else math.nan,
           "output_tps": sum(len(g.tokens) for g in served) / wall_s if wall_s > 0 else math.nan}
    for name, values in (("ttft", ttft), ("tpot", tpot)):
        out[f"{name}_mean_s"] = sum(values) / len(values) if values else math.nan
        out[f"{name}_p50_s"] = percentile(values, 50)
        out[f"{name}_p99_s"] = percentile(values, 99)
    if slo_ttft_s is not None or slo_tpot_s is not None:
        good = [g for g in served if (slo_ttft_s is None or g.ttft_s <= slo_ttft_s)
                and (slo_tpot_s is None or g.tpot_s <= slo_tpot_s)]
        out.update(slo_ttft_s=slo_ttft_s, slo_tpot_s=slo_tpot_s, slo_met=len(good),
                   goodput_rps=len(good) / wall_s if wall_s > 0 else math.nan,
                   goodput_tps=sum(g.prompt_len + len(g.tokens) for g in good) / wall_s if wall_s > 0 else math.nan)
    return out
