"""Dense pooled attention (zigzag): plans, the wire layout, and the pooled call across processes (gloo) against a float64 dense reference.

The pool ranks must really compute: their work counters and bytes are checked, and
the base rank's own share alone would give wrong rows.
"""

import pytest
import torch
import torch.distributed as dist

from megatron_fapool.attention.kernels.reference import reference_attention
from megatron_fapool.attention.pool import PooledAttention, PoolClient, PoolServer, PoolStats
from megatron_fapool.attention.pool.zigzag import member_messages, rows, zigzag_plan
from megatron_fapool.parallel import compute_layout, initialize_parallel_groups
from megatron_fapool.testing.compare import rel_err
from megatron_fapool.testing.distributed import run_distributed


def _inputs(n, b, h, hk, d, seed):
    """[b, n, h, d] q, dout and [b, n, hk, d] k, v: views of [n, b, ...] tensors, as Megatron's core attention passes."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, b, h, d, generator=g).transpose(0, 1)
    k = torch.randn(n, b, hk, d, generator=g).transpose(0, 1)
    v = torch.randn(n, b, hk, d, generator=g).transpose(0, 1)
    dout = torch.randn(n, b, h, d, generator=g).transpose(0, 1)
    return q, k, v, dout


@pytest.mark.parametrize("n, members", [(749, 2), (749, 3), (749, 4), (4096, 2), (64, 4)])
def test_zigzag_covers_sequence_once_and_balances_causal_work(n, members):
    plan = zigzag_plan(n, members, causal=True)
    seen = []
    for m in range(members):
        for lo, hi in plan.spans_of(m):
            seen += range(lo, hi)
    assert sorted(seen) == list(range(n))
    work = [plan.work(m) for m in range(members)]
    total = n * (n + 1) / 2
    assert abs(sum(work) - total) <= members * 2
    assert max(work) - min(work) <= 0.02 * total + 2 * n / members
    assert plan.kv_prefix(0) == n and plan.pool_kv_prefix < n


def test_wire_rows_are_megatrons_tensor_and_chunks_are_contiguous_row_ranges():
    plan = zigzag_plan(749, 3, causal=True)
    megatron = torch.randn(749, 2, 3, 4)  # [n, b, h, d]
    x = megatron.transpose(0, 1)  # what the core attention passes
    wire = rows(x)
    assert wire.data_ptr() == megatron.data_ptr()  # no copy
    pieces = [t for m in range(3) for t in member_messages(plan, m, wire)]
    assert all(t.is_contiguous() for t in pieces)
    assert sorted(r for t in pieces for r in range(t.data_ptr(), t.data_ptr() + t.numel() * 4, 2 * 3 * 4 * 4)) == \
        list(range(megatron.data_ptr(), megatron.data_ptr() + megatron.numel() * 4, 2 * 3 * 4 * 4))


def test_too_short_or_single_member_rejected():
    with pytest.raises(ValueError, match="too short"):
        zigzag_plan(5, 3, causal=True)
    with pytest.raises(ValueError, match=">= 1 pool rank"):
        zigzag_plan(100, 1, causal=True)


def test_kv_pieces_cover_each_members_prefix():
    plan = zigzag_plan(16384, 2, causal=True)
    assert plan.kv_pieces(1, 1 << 20) == [(0, 12288)]  # one member: keys up to its later chunk's end
    assert plan.kv_pieces(1, 5000) == [(0, 5000), (5000, 10000), (10000, 12288)]
    three = zigzag_plan(600, 3, causal=True)
    assert [three.kv_prefix(m) for m in (1, 2)] == [500, 400]  # a member gets only the prefix it sees
    assert three.kv_pieces(2, 300) == [(0, 300), (300, 400)]
    assert zigzag_plan(1000, 3, causal=False).kv_pieces(2, 1 << 20) == [(0, 1000)]


def _body(rank, world, pool_size, cases, tp=1, pp=1):
    layout = compute_layout(world, tp=tp, pp=pp, pool_size=pool_size, num_attention_heads=4, num_query_groups=2)
    groups = initialize_parallel_groups(layout)
    if groups.is_pool:
        stats = PoolServer(groups, device=torch.device("cpu")).serve()
        return stats.as_dict()
    client = PoolClient(groups, kv_chunk_tokens=100, stats=PoolStats())
    errors = []
    for n, active, causal in cases:
        q, k, v, dout = _inputs(n, 2, 4, 2, 16, seed=n + active)
        q.requires_grad_(); k.requires_grad_(); v.requires_grad_()
        out = PooledAttention.apply(q, k, v, client, active, causal, 0.25)
        out.backward(dout)
        # reference: float64 dense
        qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref = reference_attention(qd, kd, vd, causal=causal, softmax_scale=0.25)
        ref = ref[0] if isinstance(ref, tuple) else ref
        ref.backward(dout.double())
        errors.append(dict(
            out=rel_err(out, ref), dq=rel_err(q.grad, qd.grad), dk=rel_err(k.grad, kd.grad), dv=rel_err(v.grad, vd.grad),
        ))
    client.shutdown(torch.device("cpu"))
    return {"errors": errors, "stats": client.stats.as_dict()}


# One world of 1 base + 3 pool ranks: active sizes 3, 2 and 1 (1 = the base and a single pool rank, what a
# pool of one rank runs; a world with pool_size 1 of its own only cost one more process start-up), uneven 749,
# causal and not.
POOL_SIZE = 3
CASES = [(749, 3, True), (749, 2, True), (749, 1, True), (300, 1, True), (333, 3, False), (256, 1, False)]


def test_pooled_attention_matches_float64_reference():
    pool_size, cases = POOL_SIZE, CASES
    res = run_distributed(_body, 1 + pool_size, pool_size, cases, timeout=180)
    base = res[0]
    for case, err in zip(cases, base["errors"]):
        for name, e in err.items():
            assert e <= 1e-5, (case, name, e)
    assert base["stats"]["pooled_forward"] == len(cases) == base["stats"]["pooled_backward"]
    # every pool rank that was active computed its rows and moved bytes
    for slot in range(1, pool_size + 1):
        pool = res[slot]
        used = sum(1 for n, active, _ in cases if active >= slot)
        assert pool["served_forward"] == used and pool["served_backward"] == used
        assert pool["query_rows"] > 0 and pool["bytes_received"] > 0 and pool["bytes_sent"] > 0


def test_each_pipeline_stage_and_tp_rank_uses_its_own_pool_share():
    """TP 2 x PP 2 base grid + 4 pool ranks: all four base ranks pool at once, each with its own pool rank."""
    cases = [(300, 1, True)]
    res = run_distributed(_body, 8, 4, cases, 2, 2, timeout=240)
    for base in res[:4]:
        assert all(e <= 1e-5 for err in base["errors"] for e in err.values()), base["errors"]
        assert base["stats"]["pooled_forward"] == 1
    for pool in res[4:]:
        assert pool["served_forward"] == 1 and pool["served_backward"] == 1


# --------------------------------------------------------------------------------------
# what one pooled layer call costs once its pass is announced
# --------------------------------------------------------------------------------------
#: torch.distributed calls, each one launch (NCCL) or message round (gloo); nested calls (the isends of a
#: batch_isend_irecv) are not counted again.
COMMUNICATION = ("broadcast", "scatter", "gather", "reduce", "all_reduce", "all_gather", "send", "recv", "isend",
                 "irecv", "batch_isend_irecv", "all_to_all_single")
#: Tensor methods that read a device value on the host (a device-to-host synchronisation on CUDA).
HOST_READS = ("tolist", "item", "__int__", "__float__", "__bool__", "__index__")
#: Before the pass and the point-to-point transport (the collective path of 2026-12-03): per pooled call the base
#: broadcast a header, then scatter, broadcast, gather (forward) or scatter, reduce, gather (backward); each pool
#: rank the same four, and one host read of the header.
BEFORE = {"base_per_call": 4, "pool_per_call": 4, "pool_reads_per_call": 1}
#: The bound now, per pooled layer call after its pass's header: two posts on each side (inputs out and
#: results back), no host read on either side.
BOUND = {"base_per_call": 2, "pool_per_call": 2, "pool_reads_per_call": 0}
LAYERS = 3


class _Counting:
    """Counts torch.distributed calls and host reads of tensors while active (test instrumentation)."""

    def __init__(self):
        self.counts = {"communication": 0, "host_reads": 0}
        self._depth = 0
        self._undo = []

    def _wrap(self, owners, name, kind):
        original = getattr(owners[0], name)

        def counted(*args, **kwargs):
            if self._depth == 0:
                self.counts[kind] += 1
            self._depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._depth -= 1

        for owner in owners:
            self._undo.append((owner, name, getattr(owner, name)))
            setattr(owner, name, counted)

    def __enter__(self):
        import torch.distributed.distributed_c10d as c10d

        for name in COMMUNICATION:  # both namespaces: P2POp checks its op against c10d's own isend / irecv
            self._wrap((c10d, dist), name, "communication")
        for name in HOST_READS:
            self._wrap((torch.Tensor,), name, "host_reads")
        return self.counts

    def __exit__(self, *exc):
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)


def _pass_body(rank, world, announce: bool, broken: str | None = None):
    layout = compute_layout(world, tp=1, pp=1, pool_size=world - 1, num_attention_heads=4, num_query_groups=2)
    groups = initialize_parallel_groups(layout)
    if groups.is_pool:
        with _Counting() as counts:
            server = PoolServer(groups, device=torch.device("cpu"))
            server.serve()
        return {"counts": counts, "headers": server.headers, "allocated": server.buffers.allocated}
    client = PoolClient(groups, kv_chunk_tokens=1 << 20, stats=PoolStats())
    q, k, v, dout = _inputs(301, 2, 4, 2, 8, seed=7)
    for t in (q, k, v):
        t.requires_grad_()
    results = []
    for step in range(2):  # the second micro-batch reuses the pool's buffers
        with _Counting() as counts:
            client.plan_pass(LAYERS if announce else 0)
            h = q
            calls = LAYERS - 1 if broken == "short" else LAYERS
            for layer in range(calls):
                x = h[:, :300] if broken == "shape" and layer == 1 else h
                h = PooledAttention.apply(x, k, v, client, world - 1, True, 0.3)
            client.end_forward_pass()
            h.backward(dout)
        results.append({"counts": counts, "out": h.detach(), "grads": [t.grad.clone() for t in (q, k, v)]})
        for t in (q, k, v):
            t.grad = None
    client.shutdown(torch.device("cpu"))
    return {"steps": results, "headers": client.headers, "posts": client.transport.counters.posts}


def test_an_announced_pass_costs_two_posts_per_call_and_no_host_reads():
    """1 base + 2 pool ranks, three chained pooled layers forward and backward, twice: with the pass announced,
    per call after its header each side makes at most BOUND's posts and no host read (BEFORE: 4 collectives and
    a host read per call); the same layers called one header each give bit-identical outputs and gradients."""
    passed = run_distributed(_pass_body, 3, True, timeout=120)
    per_call = run_distributed(_pass_body, 3, False, timeout=120)
    calls = 2 * LAYERS  # forward and backward
    for step in passed[0]["steps"]:
        base = step["counts"]
        headers = 2  # one for the forward pass, one for the backward pass
        assert base["host_reads"] == 0, base
        assert base["communication"] == headers + BOUND["base_per_call"] * calls, base
        assert BOUND["base_per_call"] < BEFORE["base_per_call"]
    assert passed[0]["headers"] == 2 * 2 + 1  # two micro-batches' passes and the shutdown
    assert passed[0]["posts"] == 2 * BOUND["base_per_call"] * calls  # every launch of the calls is a transport post
    for pool in passed[1:]:
        headers = 2 * 2 + 1
        assert pool["headers"] == headers
        assert pool["counts"]["host_reads"] == headers * 1 + BOUND["pool_reads_per_call"] * 2 * calls, pool
        assert pool["counts"]["communication"] == headers + BOUND["pool_per_call"] * 2 * calls, pool
        # the first micro-batch allocates a forward set per layer and one backward set for all; the second none
        assert pool["allocated"] == LAYERS + 1
    # without the pass: one header per call, and a host read of it on every pool rank
    assert per_call[0]["headers"] == 2 * calls + 1
    for pool in per_call[1:]:
        assert pool["counts"]["host_reads"] == 2 * calls + 1
    for a, b in zip(passed[0]["steps"], per_call[0]["steps"]):
        assert torch.equal(a["out"], b["out"])
        assert all(torch.equal(x, y) for x, y in zip(a["grads"], b["grads"]))


@pytest.mark.parametrize("broken, message", [("short", "ended after 2 calls"), ("shape", "breaks the pass")])
def test_a_pass_the_base_does_not_keep_fails_clearly(broken, message):
    from megatron_fapool.testing.distributed import DistributedRunError

    with pytest.raises(DistributedRunError, match=message):
        run_distributed(_pass_body, 2, True, broken, timeout=60)
