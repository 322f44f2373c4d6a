"""Pieces of degraded MA inference, in one process: undoing a half-done step, agreeing on the lost rank,
the survivors' geometry. (The whole thing, with a killed expert rank: tests/launch/test_infer_ma.py.)"""

import threading
import time

import pytest
import torch
import torch.distributed as dist

from megatron_fapool.inference.session import InferenceSession
from megatron_fapool.moe.fault import LossAgreement, survivor_geometry
from megatron_fapool.moe.wire import DispatchGeometry
from megatron_fapool.parallel.service import PeerLost

LAYERS, HQ, HK, D = 3, 4, 2, 8


def _qkv(g, b, s):
    return (torch.randn(b, s, HQ, D, generator=g), torch.randn(b, s, HK, D, generator=g),
            torch.randn(b, s, HK, D, generator=g))


def _forward(session, requests, mode, qkv, layers=LAYERS):
    """What a model's core attention layers do in one forward: attend at each layer in turn."""
    outs = []
    with session.step(requests, mode):
        for layer in range(1, layers + 1):
            outs.append(session.attend(layer, *qkv[layer - 1], softmax_scale=D ** -0.5))
    return outs


def _steps(seed):
    g = torch.Generator().manual_seed(seed)
    prefill = {r: [_qkv(g, 1, n) for _ in range(LAYERS)] for r, n in ((0, 5), (1, 9))}
    decode = [[_qkv(g, 2, 1) for _ in range(LAYERS)] for _ in range(3)]
    late = [_qkv(g, 1, 4) for _ in range(LAYERS)]  # the prefill of request 2, after the decode steps
    return prefill, decode, late


def test_a_step_that_failed_part_way_is_undone_and_redone_exactly():
    prefill, decode, late = _steps(0)
    straight = InferenceSession(None, backend="auto")
    for r in (0, 1):
        _forward(straight, r, "prefill", prefill[r])
    want = [_forward(straight, [0, 1], "decode", step) for step in decode] + [_forward(straight, 2, "prefill", late)]

    s = InferenceSession(None, backend="auto")
    for r in (0, 1):
        _forward(s, r, "prefill", prefill[r])
    got = [_forward(s, [0, 1], "decode", decode[0])]
    mark = s.mark([0, 1])
    _forward(s, [0, 1], "decode", decode[1], layers=2)  # an expert rank was lost in layer 2's MoE layer
    assert s.unpooled.tokens(0, 1) == 5 + 2 and s.unpooled.tokens(0, 3) == 5 + 1
    s.restore(mark)
    assert [s.unpooled.tokens(0, layer) for layer in (1, 2, 3)] == [5 + 1] * 3
    assert s.forwards == {"prefill": 2, "decode": 1} and s.decode_rows == 2
    got += [_forward(s, [0, 1], "decode", step) for step in decode[1:]]
    mark = s.mark(2)
    _forward(s, 2, "prefill", late, layers=1)  # a prefill that failed in its first layer
    s.restore(mark)
    assert 2 not in s.members and s.unpooled.tokens_of(2) == 0
    got.append(_forward(s, 2, "prefill", late))  # may be prefilled again
    for a, b in zip(got, want):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    assert {k: v.length for k, v in s.unpooled.shards.items()} == \
        {k: v.length for k, v in straight.unpooled.shards.items()}


def _agree_all(ranks, silent, *, timeout_s=20.0, late=None, store=None):
    """``LossAgreement.agree`` on each of ``ranks`` (threads); ``late``: rank -> seconds it checks in late."""
    store = store or dist.HashStore()
    results, errors = {}, {}

    def one(r):
        if late and r in late:
            time.sleep(late[r])
        a = LossAgreement(rank=r, members=(0, 1, 2, 3), leader=0, store=store, silent_s=lambda x: silent.get(x, 0.0),
                          stale_s=3.0, timeout_s=timeout_s)
        try:
            results[r] = a.agree()
        except PeerLost as e:
            errors[r] = str(e)

    threads = [threading.Thread(target=one, args=(r,)) for r in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results, errors


def test_the_lost_rank_is_the_silent_one_that_never_answers():
    results, errors = _agree_all((0, 1, 2), {3: 10.0})
    assert not errors and results == {0: (3,), 1: (3,), 2: (3,)}
    # a slow survivor (its heartbeat still moves) is waited for, not declared lost
    results, errors = _agree_all((0, 1, 2), {3: 10.0}, late={2: 0.5})
    assert not errors and set(results.values()) == {(3,)}
    results, _ = _agree_all((0, 1, 2, 3), {})
    assert set(results.values()) == {()}


def test_a_member_that_neither_answers_nor_goes_silent_fails_the_agreement():
    results, errors = _agree_all((0, 1), {3: 10.0}, timeout_s=0.5)
    assert not results and len(errors) == 2
    assert "rank(s) [2] neither answered nor went silent" in errors[0]


def test_survivor_geometry_degrades_one_expert_rank_or_names_the_loss():
    g = DispatchGeometry(members=(0, 1, 2, 3), num_attention=2, experts_per_rank=8)
    groups = {2: "group without 2", 3: "group without 3"}
    describe = {0: "rank 0 (base)", 2: "expert rank 2 (experts 0-7)", 3: "expert rank 3 (experts 8-15)"}.get
    survivor, group = survivor_geometry(g, (3,), groups, mode="degrade", describe=describe, what="rank 0")
    assert group == "group without 3" and survivor.expert_ranks == (2,)
    assert list(survivor.expert_ids(0)) == list(range(8))
    counts = torch.tensor([1] * 8 + [0] * 8)
    assert survivor.expert_counts(counts).tolist() == [[1] * 8]
    with pytest.raises(RuntimeError, match="8 rows routed to lost experts 8-15"):
        survivor.expert_counts(torch.ones(16, dtype=torch.int64))
    other, _ = survivor_geometry(g, (2,), groups, mode="degrade", describe=describe, what="rank 0")
    assert other.members == (0, 1, 3) and list(other.expert_ids(0)) == list(range(8, 16))
    with pytest.raises(PeerLost, match=r"rank 0: lost expert rank 3 \(experts 8-15\); .*on_expert_loss is 'fail'"):
        survivor_geometry(g, (3,), groups, mode="fail", describe=describe, what="rank 0")
    with pytest.raises(PeerLost, match="not of an attention rank or of several"):
        survivor_geometry(g, (0,), groups, mode="degrade", describe=describe, what="rank 1")
    with pytest.raises(PeerLost, match="after an earlier expert rank"):
        survivor_geometry(survivor, (2,), groups, mode="degrade", describe=describe, what="rank 0")
