"""Dense pooled attention: zigzag query chunks, K/V prefix replicated (DESIGN.md §2).

One file, ring-flash-attention's shape: the plan (pure), a member's compute over its
chunks (pure), the base side, the member side, and the thin autograd Function.

The sequence of length ``n`` is cut into ``2P`` chunks (``P`` = base + active pool
ranks) with boundaries ``floor(c * n / 2P)``, so any ``n`` works and no padding is
visible. Member ``i`` takes chunks ``i`` and ``2P - 1 - i``: under a causal mask every
member then does the same amount of work. Chunk ``(lo, hi)`` attends (causal:
bottom-right aligned) to the key prefix ``[0, hi)``, so its output rows are complete and
nothing is merged across members.

Transfers (:mod:`.transport`, point-to-point): the wire layout is Megatron's own
sequence-major ``[n, b, heads, d]``, in which a chunk is a contiguous row range, so a
member's two query chunks and its K/V prefix ``[0, kv_prefix)`` are sent straight from the
base's tensors and its outputs are received straight into the rows of the base's output
(no packing or unpacking pass). The base computes its own chunks meanwhile. Backward: dO
chunks sent, dQ chunks received into the base's dQ rows, each member's dK/dV partial over
its prefix received into persistent buffers and added. A pool rank receives into
persistent buffers (:class:`~.transport.BufferPool`) allocated once per shape.

A forward call is ``2 + (pieces - 1)`` posts on the base (inputs with the first K/V piece,
further K/V pieces of ``kv_chunk_tokens``, outputs) and as many on a pool rank; a backward
is 2 and 2. Inside an announced pass (:meth:`~...parallel.service.ServiceClient.plan_pass`:
one header for a micro-batch's forward, one for its backward) a call sends no header and the
pool reads nothing on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...parallel.service import Header, ServiceMember, named_failure
from ..kernels import attention_backward, attention_forward

__all__ = [
    "FORWARD",
    "BACKWARD",
    "HANDLERS",
    "PooledAttention",
    "ZigzagPlan",
    "zigzag_plan",
]

FORWARD = 1
BACKWARD = 2


# --------------------------------------------------------------------------------------
# plan (pure)
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ZigzagPlan:
    n: int
    members: int  # P
    causal: bool
    bounds: tuple[int, ...]  # 2P + 1 chunk boundaries

    def chunks_of(self, member: int) -> tuple[int, int]:
        return member, 2 * self.members - 1 - member

    def span(self, chunk: int) -> tuple[int, int]:
        return self.bounds[chunk], self.bounds[chunk + 1]

    def spans_of(self, member: int) -> tuple[tuple[int, int], tuple[int, int]]:
        a, b = self.chunks_of(member)
        return self.span(a), self.span(b)

    def kv_prefix(self, member: int) -> int:
        """Keys/values member ``member`` must hold: the prefix its later chunk sees."""
        return self.span(self.chunks_of(member)[1])[1] if self.causal else self.n

    @property
    def pool_kv_prefix(self) -> int:
        """Longest prefix any pool member (member >= 1) needs."""
        return max(self.kv_prefix(m) for m in range(1, self.members))

    def kv_pieces(self, member: int, max_tokens: int, rows: int | None = None) -> list[tuple[int, int]]:
        """How member ``member``'s K/V prefix (or its first ``rows`` rows, if more are sent for it) is
        sent: pieces of at most ``max_tokens`` rows.

        Piece ``j`` is the same row range for every member (clipped to its prefix), so the base
        posts piece ``j`` of all members at once. Fewer, larger pieces measured faster
        (docs/benchmarks.md, "FA Pool attention"), so the default (config ``kv_chunk_tokens``)
        sends one piece.
        """
        e = self.kv_prefix(member) if rows is None else rows
        return [(lo, min(lo + max_tokens, e)) for lo in range(0, e, max_tokens)]

    def work(self, member: int) -> int:
        """Query-key pairs member ``member`` computes (causal: ~ equal for all members)."""
        total = 0
        for lo, hi in self.spans_of(member):
            rows = hi - lo
            total += rows * (lo + (rows + 1) / 2) if self.causal else rows * self.n
        return int(total)


def zigzag_plan(n: int, members: int, causal: bool) -> ZigzagPlan:
    if members < 2:
        raise ValueError(f"an attention group has the base rank and >= 1 pool rank, got {members} members")
    if n < 2 * members:
        raise ValueError(f"sequence of {n} tokens is too short to split over {members} members (needs >= {2 * members})")
    chunks = 2 * members
    return ZigzagPlan(n=n, members=members, causal=causal, bounds=tuple(c * n // chunks for c in range(chunks + 1)))


# --------------------------------------------------------------------------------------
# wire layout (pure): kernels take [b, n, ...]; the wire is sequence-major [n, b, ...]
# --------------------------------------------------------------------------------------
def rows(x: torch.Tensor) -> torch.Tensor:
    """``[b, n, ...]`` -> ``[n, b, ...]`` contiguous: a view of Megatron's own tensor (no copy) whenever
    ``x`` is the ``[b, n, ...]`` view of a contiguous ``[n, b, ...]`` one, as the core attention passes."""
    return x.transpose(0, 1).contiguous()


def member_messages(plan: ZigzagPlan, member: int, x_rows: torch.Tensor) -> list[torch.Tensor]:
    """The row ranges of ``x_rows`` (``[n, b, ...]``) holding member ``member``'s two chunks."""
    return [x_rows[lo:hi] for lo, hi in plan.spans_of(member)]


# --------------------------------------------------------------------------------------
# a member's chunks (pure)
# --------------------------------------------------------------------------------------
def chunks_forward(qs, spans, k, v, *, causal, softmax_scale, backend, selector=None):
    """``qs[i]``: ``[b, hi-lo, h, d]`` queries of chunk ``spans[i]``; ``k``, ``v``: ``[b, >=hi, hk, d]``.

    Returns lists of outputs ``[b, hi-lo, h, d]`` and lse ``[b, h, hi-lo]`` (fp32).
    """
    outs, lses = [], []
    for q, (lo, hi) in zip(qs, spans):
        kk, vv = (k[:, :hi], v[:, :hi]) if causal else (k, v)
        out, lse = attention_forward(q, kk, vv, causal=causal, softmax_scale=softmax_scale, backend=backend,
                                     selector=selector)
        outs.append(out)
        lses.append(lse)
    return outs, lses


def chunks_backward(douts, qs, spans, k, v, outs, lses, dk, dv, *, causal, softmax_scale, backend, selector=None):
    """Gradients of the chunks: ``dq`` per chunk; ``dk``, ``dv`` (``[b, kv_len, hk, d]``, zero) get the
    sum over chunks, accumulated in the input dtype (one addition per chunk, two chunks per member)."""
    kv_len = dk.shape[1]
    dqs = []
    for dout, q, (lo, hi), out, lse in zip(douts, qs, spans, outs, lses):
        kk, vv = (k[:, :hi], v[:, :hi]) if causal else (k[:, :kv_len], v[:, :kv_len])
        dq, dkc, dvc = attention_backward(dout, q, kk, vv, out, lse, causal=causal, softmax_scale=softmax_scale,
                                          backend=backend, selector=selector)
        dqs.append(dq)
        dk[:, : kk.shape[1]] += dkc
        dv[:, : vv.shape[1]] += dvc
    return dqs


# --------------------------------------------------------------------------------------
# base side
# --------------------------------------------------------------------------------------
def post_inputs(client, plan: ZigzagPlan, peers, qr, kr, vr, group_of, kv_chunk: int, kv_rows=None):
    """Post each member's query chunks and K/V prefix pieces (``qr``, ``kr``, ``vr``: ``[n, b, ...]``)
    to ``peers`` (member ``1..``): the queries with the first piece, then one post per further piece.
    ``kv_rows[m - 1]``: K/V rows member ``m`` gets if not its prefix (serving sends a member what it stores)."""
    posted = []
    pieces = {m: plan.kv_pieces(m, kv_chunk, None if kv_rows is None else kv_rows[m - 1])
              for m in range(1, len(peers) + 1)}
    for j in range(max(len(p) for p in pieces.values())):
        by_group = {}
        for m, peer in enumerate(peers, start=1):
            if j < len(pieces[m]):
                lo, hi = pieces[m][j]
                msgs = (member_messages(plan, m, qr) if j == 0 else []) + [kr[lo:hi], vr[lo:hi]]
                by_group.setdefault(group_of(peer), []).extend((peer, t) for t in msgs)
        posted += [client.transport.post(sends, [], g) for g, sends in by_group.items()]
    return posted


def post_output_rows(client, plan: ZigzagPlan, peers, out_rows, group_of):
    """Receive each member's two output chunks straight into their rows of ``out_rows`` (``[n, b, h, d]``)."""
    by_group = {}
    for m, peer in enumerate(peers, start=1):
        by_group.setdefault(group_of(peer), []).extend((peer, t) for t in member_messages(plan, m, out_rows))
    return [client.transport.post([], recvs, g) for g, recvs in by_group.items()]


def wait_all(posted) -> None:
    for p in posted:
        p.wait()


def base_forward(client, plan: ZigzagPlan, peers, q, k, v, *, group_of, causal, softmax_scale, backend, kv_chunk,
                 kv_rows=None):
    """The base's side of one pooled forward after its header: inputs posted, own chunks computed meanwhile,
    members' outputs received into their rows. Returns ``(out [b, n, h, d], own lses)``."""
    qr, kr, vr = rows(q), rows(k), rows(v)
    out_rows = torch.empty_like(qr)
    posted = post_inputs(client, plan, peers, qr, kr, vr, group_of, kv_chunk, kv_rows)
    posted += post_output_rows(client, plan, peers, out_rows, group_of)
    spans = plan.spans_of(0)
    outs, lses = chunks_forward([q[:, lo:hi] for lo, hi in spans], spans, k, v, causal=causal,
                                softmax_scale=softmax_scale, backend=backend, selector=client.selector)
    for (lo, hi), o in zip(spans, outs):
        out_rows[lo:hi] = o.transpose(0, 1)
    client.stats.query_rows += sum(hi - lo for lo, hi in spans)
    wait_all(posted)
    return out_rows.transpose(0, 1), lses


def zigzag_forward(client, q, k, v, *, active: int, causal: bool, softmax_scale: float, save: bool):
    """q ``[b, n, h, d]``, k/v ``[b, n, hk, d]`` -> (out, own lse, plan, call id)."""
    return named_failure(
        f"attention pool forward of base rank {client.rank}", client.pool_ranks[:active],
        _forward, client, q, k, v, active=active, causal=causal, softmax_scale=softmax_scale, save=save,
    )


def _forward(client, q, k, v, *, active, causal, softmax_scale, save):
    b, n, h, d = q.shape
    members = active + 1
    plan = zigzag_plan(n, members, causal)
    group = client.group(active)
    call_id = client.open_call(save)
    client.announce_call(
        q.device, op=FORWARD, call_id=call_id, n=n, batch=b, heads=h, kv_heads=k.shape[2], head_dim=d,
        causal=int(causal), members=members, kv_chunk=client.kv_chunk, save=int(save),
        **Header.encode(dtype=q.dtype, softmax_scale=softmax_scale, backend=client.backend),
    )
    out, lses = base_forward(client, plan, client.pool_ranks[:active], q, k, v, group_of=lambda _: group,
                             causal=causal, softmax_scale=softmax_scale, backend=client.backend,
                             kv_chunk=client.kv_chunk)
    client.stats.pooled_forward += 1
    return out, lses, plan, call_id


def zigzag_backward(client, dout, q, k, v, out, lses, *, plan: ZigzagPlan, call_id: int, softmax_scale: float):
    """Exact dq, dk, dv ``[b, n, ...]`` of a pooled forward."""
    return named_failure(
        f"attention pool backward of base rank {client.rank}", client.pool_ranks[: plan.members - 1],
        _backward, client, dout, q, k, v, out, lses, plan=plan, call_id=call_id, softmax_scale=softmax_scale,
    )


def _partials(plan: ZigzagPlan, like: torch.Tensor):
    """Receive buffers of every member's dK and dV partials ``[kv_prefix, b, hk, d]`` (``like``: ``[n, b, hk, d]``)."""
    return [(like.new_empty((plan.kv_prefix(m),) + like.shape[1:]), like.new_empty((plan.kv_prefix(m),) + like.shape[1:]))
            for m in range(1, plan.members)]


def _backward(client, dout, q, k, v, out, lses, *, plan, call_id, softmax_scale):
    members = plan.members
    peers = client.pool_ranks[: members - 1]
    group = client.group(members - 1)
    # this call's state stays live on the pool until its backward header has been read
    client.announce_call(q.device, op=BACKWARD, call_id=call_id, members=members, backward=True)
    client.close_call(call_id)
    dor = rows(dout)
    dq_rows = torch.empty_like(dor)
    dk_rows = k.new_zeros((k.shape[1], k.shape[0]) + tuple(k.shape[2:]))
    dv_rows = torch.zeros_like(dk_rows)
    key = ("zigzag-dkv", plan, tuple(dk_rows.shape), dk_rows.dtype)
    partials = client.buffers.take(key, lambda: _partials(plan, dk_rows))
    sends = [(p, t) for m, p in enumerate(peers, start=1) for t in member_messages(plan, m, dor)]
    recvs = [(p, t) for m, p in enumerate(peers, start=1)
             for t in member_messages(plan, m, dq_rows) + list(partials[m - 1])]
    posted = [client.transport.post(sends, [], group), client.transport.post([], recvs, group)]

    spans = plan.spans_of(0)
    sl = [slice(lo, hi) for lo, hi in spans]
    dqs = chunks_backward(
        [dout[:, r] for r in sl], [q[:, r] for r in sl], spans, k, v, [out[:, r] for r in sl], lses,
        dk_rows.transpose(0, 1), dv_rows.transpose(0, 1), causal=plan.causal, softmax_scale=softmax_scale,
        backend=client.backend, selector=client.selector,
    )
    for (lo, hi), g in zip(spans, dqs):
        dq_rows[lo:hi] = g.transpose(0, 1)
    wait_all(posted)
    for pk, pv in partials:  # member order: the same sum on every run
        dk_rows[: pk.shape[0]] += pk
        dv_rows[: pv.shape[0]] += pv
    client.buffers.give(key, partials)
    client.stats.pooled_backward += 1
    return dq_rows.transpose(0, 1), dk_rows.transpose(0, 1), dv_rows.transpose(0, 1)


# --------------------------------------------------------------------------------------
# member side
# --------------------------------------------------------------------------------------
@dataclass
class _Buffers:
    """A member's persistent receive buffers for one call's shapes: its query chunks and K/V rows ``[e, b, ...]``
    (held with a forward's saved state until its backward)."""

    q: list[torch.Tensor]
    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def allocate(cls, plan: ZigzagPlan, member: int, h: Header, kv_rows: int, device) -> "_Buffers":
        dt, b = h.torch_dtype, h.batch
        q = [torch.empty((hi - lo, b, h.heads, h.head_dim), dtype=dt, device=device) for lo, hi in plan.spans_of(member)]
        kv = (kv_rows, b, h.kv_heads, h.head_dim)
        return cls(q, torch.empty(kv, dtype=dt, device=device), torch.empty(kv, dtype=dt, device=device))


@dataclass
class _GradBuffers:
    """A member's backward buffers: dO chunks received, dK/dV partials sent; one set serves every layer in turn."""

    dout: list[torch.Tensor]
    dk: torch.Tensor
    dv: torch.Tensor

    @classmethod
    def like(cls, bufs: _Buffers) -> "_GradBuffers":
        return cls([torch.empty_like(t) for t in bufs.q], torch.empty_like(bufs.k), torch.empty_like(bufs.v))


@dataclass
class _Saved:
    plan: ZigzagPlan
    key: tuple
    buffers: _Buffers
    outs: list
    lses: list
    header: Header


def member_forward(end, plan: ZigzagPlan, me: int, leader: int, group, h: Header, *, kv_rows: int | None = None):
    """Member ``me``'s side of one pooled forward after its header: its chunks and K/V rows (its prefix, or
    ``kv_rows``) received into persistent buffers, its chunks computed as the K/V pieces arrive, its outputs
    sent. ``end``: the rank's ``transport``, ``buffers``, ``selector`` and ``stats``. Returns
    ``(buffer key, buffers, outs, lses)``; the caller gives the buffers back when it no longer needs them."""
    e = plan.kv_prefix(me) if kv_rows is None else kv_rows
    key = ("zigzag", plan, me, e, h.batch, h.heads, h.kv_heads, h.head_dim, h.dtype)
    bufs = end.buffers.take(key, lambda: _Buffers.allocate(plan, me, h, e, end.device))
    posted = []
    for j, (lo, hi) in enumerate(plan.kv_pieces(me, h.kv_chunk, e)):
        recvs = (bufs.q if j == 0 else []) + [bufs.k[lo:hi], bufs.v[lo:hi]]
        posted.append((lo, end.transport.post([], [(leader, t) for t in recvs], group)))
    k, v = bufs.k.transpose(0, 1), bufs.v.transpose(0, 1)  # [b, e, hk, d] views
    spans = plan.spans_of(me)
    outs, lses = [], []
    for q, span in zip(bufs.q, spans):
        need = span[1] if plan.causal else plan.n
        while posted and posted[0][0] < need:  # the queries and the K/V pieces this chunk sees have arrived
            posted.pop(0)[1].wait()
        o, l = chunks_forward([q.transpose(0, 1)], [span], k, v, causal=plan.causal, softmax_scale=h.softmax_scale,
                              backend=h.backend_name, selector=end.selector)
        outs += o
        lses += l
    wait_all(p for _, p in posted)
    end.transport.post([(leader, rows(o)) for o in outs], [], group).wait()
    end.stats.served_forward += 1
    end.stats.query_rows += sum(hi - lo for lo, hi in spans)
    return key, bufs, outs, lses


def serve_forward(member: ServiceMember, h: Header) -> None:
    plan = zigzag_plan(h.n, h.members, bool(h.causal))
    key, bufs, outs, lses = member_forward(member, plan, member.member, member.leader, member.group_of(h.members), h)
    if h.save:
        member.saved[h.call_id] = _Saved(plan, key, bufs, outs, lses, h)
    else:
        member.buffers.give(key, bufs)


def serve_backward(member: ServiceMember, h: Header) -> None:
    s = member.take_saved(h.call_id, _Saved, "backward")
    plan, fh, me, bufs = s.plan, s.header, member.member, s.buffers
    group = member.group_of(h.members)
    grad_key = ("zigzag-grad",) + s.key[1:]
    g = member.buffers.take(grad_key, lambda: _GradBuffers.like(bufs))
    member.transport.post([], [(member.leader, t) for t in g.dout], group).wait()
    g.dk.zero_()
    g.dv.zero_()
    dqs = chunks_backward(
        [t.transpose(0, 1) for t in g.dout], [t.transpose(0, 1) for t in bufs.q], plan.spans_of(me),
        bufs.k.transpose(0, 1), bufs.v.transpose(0, 1), s.outs, s.lses, g.dk.transpose(0, 1),
        g.dv.transpose(0, 1), causal=plan.causal, softmax_scale=fh.softmax_scale, backend=fh.backend_name,
        selector=member.selector,
    )
    sends = [rows(d) for d in dqs] + [g.dk, g.dv]
    member.transport.post([(member.leader, t) for t in sends], [], group).wait()
    member.buffers.give(s.key, bufs)
    member.buffers.give(grad_key, g)
    member.stats.served_backward += 1


HANDLERS = {FORWARD: serve_forward, BACKWARD: serve_backward}


# --------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------
class PooledAttention(torch.autograd.Function):
    """``out = attention(q, k, v)`` (``[b, n, h, d]``) computed by the base rank and ``active`` pool ranks."""

    @staticmethod
    def forward(ctx, q, k, v, client, active: int, causal: bool, softmax_scale: float):
        save = torch.is_grad_enabled() or any(t.requires_grad for t in (q, k, v))
        out, lses, plan, call_id = zigzag_forward(
            client, q, k, v, active=active, causal=causal, softmax_scale=softmax_scale, save=save
        )
        ctx.save_for_backward(q, k, v, out, *lses)
        ctx.client, ctx.plan, ctx.call_id, ctx.softmax_scale = client, plan, call_id, softmax_scale
        client.close_when_dropped(ctx, call_id)  # the pool frees its state if no backward comes
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, *lses = ctx.saved_tensors
        dq, dk, dv = zigzag_backward(
            ctx.client, dout, q, k, v, out, lses, plan=ctx.plan, call_id=ctx.call_id, softmax_scale=ctx.softmax_scale
        )
        return dq, dk, dv, None, None, None, None
