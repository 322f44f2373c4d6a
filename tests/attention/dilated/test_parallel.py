"""Dilated attention over 1, 2 and 4 gloo ranks equals the single-process result.

Head-parallel (all-to-all) when heads >= ranks, LongNet's sequence-parallel fallback
otherwise; the collective counters prove which path ran (a silent fallback fails).
"""

from __future__ import annotations

import pytest
import torch

from megatron_fapool.attention.dilated import (
    comm_counters,
    dilated_attention,
    dilated_attention_parallel,
    reset_comm_counters,
    shard_sequence,
)
from megatron_fapool.attention.dilated.parallel import shards_are_independent
from megatron_fapool.attention.dilated.plan import branch_is_shard_local, ceil_div
from megatron_fapool.testing.distributed import run_distributed

pytestmark = pytest.mark.slow

TOL = 1e-5


# (name, n, heads, kv heads, segment lengths, rates, causal, mode)
CASES = {
    "heads-749-H5": (749, 5, 5, (64, 200, 1000), (1, 3, 8), True, "auto"),
    "heads-1000-full": (1000, 4, 4, (96, 384, 640), (2, 8, 3), False, "auto"),
    "heads-6-over-4": (749, 6, 6, (64, 200, 1000), (1, 3, 8), True, "auto"),
    "heads-gqa": (300, 4, 2, (40, 130), (1, 4), True, "auto"),
    "seq-749-H1": (749, 1, 1, (64, 200, 1000), (1, 3, 8), True, "auto"),
    "seq-1000-H2-mixed": (1000, 2, 2, (50, 125, 400, 2000), (1, 2, 4, 8), True, "auto"),
    "seq-gqa-full": (600, 2, 1, (50, 150, 700), (1, 2, 4), False, "sequence"),
    "seq-all-local": (256, 1, 1, (32, 64, 128), (1, 2, 4), True, "auto"),
    # Every segment inside a shard: each rank runs its own shard, no communication, also
    # with heads >= ranks (auto); a padded last shard; GQA; and the same forced to heads.
    "local-padded": (471, 4, 4, (59, 118, 236), (1, 2, 4), True, "auto"),
    "local-gqa-full": (400, 4, 2, (50, 100, 200), (1, 2, 4), False, "auto"),
    "local-forced-heads": (471, 4, 4, (59, 118, 236), (1, 2, 4), True, "heads"),
    # Head-parallel pipelined in 2 head chunks per rank (the exchange of one chunk overlaps
    # the computation of the other): 8 heads on 2 ranks, 4 kv heads (GQA), padded rows.
    "heads-chunked": (749, 8, 4, (64, 200, 1000), (1, 2, 4), True, "heads:2"),
}


def inputs(name):
    n, h, hkv, *_ = CASES[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    q = torch.randn(1, n, h, 16, generator=g)
    k = torch.randn(1, n, hkv, 16, generator=g)
    v = torch.randn(1, n, hkv, 16, generator=g)
    do = torch.randn(1, n, h, 16, generator=g)
    return q, k, v, do


def _run_cases(rank, world, names):
    results = {}
    for name in names:
        n, h, hkv, segs, rates, causal, mode = CASES[name]
        q, k, v, do = inputs(name)
        qs, ks, vs = (shard_sequence(x, rank, world).requires_grad_() for x in (q, k, v))
        reset_comm_counters()
        mode, chunks = (mode.split(":")[0], int(mode.split(":")[1])) if ":" in mode else (mode, None)
        out = dilated_attention_parallel(qs, ks, vs, segs, rates, causal, seq_len=n, mode=mode, head_chunks=chunks)
        out.backward(shard_sequence(do, rank, world))
        results[name] = tuple(t.detach().numpy() for t in (out, qs.grad, ks.grad, vs.grad)) + (comm_counters(),)
    return results


def _mismatched_shards(rank, world):
    q = torch.randn(1, 10 + rank, 2, 8)
    try:
        dilated_attention_parallel(q, q, q, (4,), (1,))
    except ValueError as e:
        return str(e)
    return None


def expected_comm(name, world):
    n, h, hkv, segs, rates, causal, mode = CASES[name]
    chunks = int(mode.split(":")[1]) if ":" in mode else 1
    mode = mode.split(":")[0]
    if world == 1:
        return {}
    shard = ceil_div(n, world)
    if mode != "heads" and shards_are_independent(n, segs, shard, world):
        return {}
    heads_mode = mode != "sequence" and h >= world and (h == hkv or (h % world == 0 and hkv % world == 0))
    if heads_mode:
        return {"all_to_all_calls": 8 * chunks}  # q, k, v, out forward; dout, dq, dk, dv backward
    remote = sum(not branch_is_shard_local(n, w, shard, world) for w in segs)
    if remote == 0:
        return {}
    return {"all_gather_calls": 4 * remote, "reduce_scatter_calls": 2 * remote}


@pytest.fixture(scope="module")
def single_process():
    out = {}
    for name, (n, h, hkv, segs, rates, causal, mode) in CASES.items():
        q, k, v, do = inputs(name)
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        o = dilated_attention(q, k, v, segs, rates, causal)
        o.backward(do)
        out[name] = (o.detach(), q.grad, k.grad, v.grad)
    return out


WORLD_CASES = {
    1: ["heads-749-H5", "seq-gqa-full", "heads-gqa"],
    2: [
        "heads-749-H5", "heads-1000-full", "heads-gqa", "seq-749-H1", "seq-gqa-full", "seq-all-local",
        "local-padded", "local-gqa-full", "local-forced-heads", "heads-chunked",
    ],
    4: [
        "heads-749-H5", "heads-6-over-4", "heads-gqa", "seq-1000-H2-mixed", "seq-gqa-full", "local-padded",
        "local-gqa-full",
    ],
}


@pytest.mark.parametrize("world", [1, 2, 4])
def test_same_outputs_and_gradients_on_1_2_4_ranks(world, single_process):
    results = run_distributed(_run_cases, world, WORLD_CASES[world], timeout=150)
    for name in WORLD_CASES[world]:
        n = CASES[name][0]
        for i, label in enumerate(("out", "dq", "dk", "dv")):
            got = torch.cat([torch.from_numpy(r[name][i]) for r in results], dim=1)
            assert torch.equal(got[:, n:], torch.zeros_like(got[:, n:])), f"{name} {label}: padding not zero"
            ref = single_process[name][i]
            err = ((got[:, :n] - ref).abs().max() / ref.abs().max()).item()
            assert err <= TOL, f"{name} on {world} ranks: {label} rel err {err:.2e}"
        expected = expected_comm(name, world)
        for r, res in enumerate(results):
            counters = res[name][4]
            calls = {key: val for key, val in counters.items() if key.endswith("_calls")}
            assert calls == expected, f"{name} rank {r}: collectives {counters}, expected {expected}"
            for key in expected:
                assert counters[key.replace("_calls", "_bytes")] > 0


def test_mismatched_shards_raise_the_same_clear_error_on_every_rank():
    messages = run_distributed(_mismatched_shards, 2, timeout=60)
    assert all(m is not None and "equal splits" in m and "seq_len" in m for m in messages), messages
