"""Dense pooled attention: zigzag query chunks, K/V prefix replicated (DESIGN.md §2).

One file, ring-flash-attention's shape: the plan (pure), a member's compute over its
chunks (pure), the base side, the member side, and the thin autograd Function.

The sequence of length ``n`` is cut into ``2P`` chunks (``P`` = base + active pool
ranks) with boundaries ``floor(c * n / 2P)``, so any ``n`` works and no padding is
visible. Member ``i`` takes chunks ``i`` and ``2P - 1 - i``: under a causal mask every
member then does the same amount of work. Chunk ``(lo, hi)`` attends (causal:
bottom-right aligned) to the key prefix ``[0, hi)``, so its output rows are complete and
nothing is merged across members.

Transfers: each member's query chunks are scattered; the K/V prefix the pool members
need is broadcast (in pieces of ``kv_chunk`` tokens); the base computes its own chunks
meanwhile; outputs are gathered. Backward: dO scattered, dQ gathered, dK/dV partial sums
reduced to the base (a tree inside the collective).

Tensors are ``[b, s, h, d]`` (the kernels' layout). Wire buffers are sequence-major
(``[2L, b, h, d]`` per member, K/V ``[e, 2, b, hk, d]``) so that chunks and K/V pieces
are contiguous rows; members compute on ``[b, s, h, d]`` views of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ...parallel.service import Header, ServiceMember, named_failure, nbytes
from ..kernels import attention_backward, attention_forward

__all__ = [
    "FORWARD",
    "BACKWARD",
    "HANDLERS",
    "PooledAttention",
    "ZigzagPlan",
    "pack_member_chunks",
    "unpack_member_chunks",
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
        """Longest prefix any pool member (member >= 1) needs: what is sent."""
        return max(self.kv_prefix(m) for m in range(1, self.members))

    @property
    def padded_chunk(self) -> int:
        """Longest chunk: per-member transfer buffers hold two chunks of this length."""
        return max(self.bounds[c + 1] - self.bounds[c] for c in range(2 * self.members))

    def kv_pieces(self, max_tokens: int) -> list[tuple[int, int]]:
        """How the K/V prefix ``[0, pool_kv_prefix)`` is sent: pieces of ``max_tokens``.

        Fewer, larger pieces measured faster (docs/benchmarks.md, "FA Pool attention"), so the
        default (config ``kv_chunk_tokens``) sends one piece.
        """
        e_max = self.pool_kv_prefix
        return [(lo, min(lo + max_tokens, e_max)) for lo in range(0, e_max, max_tokens)]

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
# wire buffers (pure): [b, n, ...] <-> per member [2L, b, ...], sequence-major
# --------------------------------------------------------------------------------------
def pack_member_chunks(x: torch.Tensor, plan: ZigzagPlan) -> torch.Tensor:
    """``[b, n, ...]`` -> ``[P, 2L, b, ...]``: each member's two chunks, zero-padded to ``L`` rows."""
    pad = plan.padded_chunk
    buf = x.new_zeros((plan.members, 2 * pad, x.shape[0]) + tuple(x.shape[2:]))
    for m in range(plan.members):
        for slot, (lo, hi) in enumerate(plan.spans_of(m)):
            buf[m, slot * pad : slot * pad + hi - lo] = x[:, lo:hi].transpose(0, 1)
    return buf


def unpack_member_chunks(buf: torch.Tensor, plan: ZigzagPlan, out: torch.Tensor, members=None) -> torch.Tensor:
    """Inverse of :func:`pack_member_chunks` into ``out`` ``[b, n, ...]`` (for ``members``)."""
    for m in members if members is not None else range(plan.members):
        for (lo, hi), view in zip(plan.spans_of(m), member_views(buf[m], plan, m)):
            out[:, lo:hi] = view
    return out


def member_views(buf: torch.Tensor, plan: ZigzagPlan, member: int) -> list[torch.Tensor]:
    """The two chunks of one member's ``[2L, b, ...]`` buffer as ``[b, rows, ...]`` views (unpadded)."""
    pad = plan.padded_chunk
    return [buf[slot * pad : slot * pad + hi - lo].transpose(0, 1)
            for slot, (lo, hi) in enumerate(plan.spans_of(member))]


def _kv_wire(k: torch.Tensor, v: torch.Tensor, e: int) -> torch.Tensor:
    """``[b, >=e, hk, d]`` k, v -> ``[e, 2, b, hk, d]`` (one copy; pieces along dim 0 are contiguous)."""
    kv = k.new_empty((e, 2, k.shape[0]) + tuple(k.shape[2:]))
    kv[:, 0], kv[:, 1] = k[:, :e].transpose(0, 1), v[:, :e].transpose(0, 1)
    return kv


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


def chunks_backward(douts, qs, spans, k, v, outs, lses, *, causal, softmax_scale, backend, kv_len, selector=None):
    """Gradients of the chunks: ``dq`` per chunk and ``dk``, ``dv`` ``[b, kv_len, hk, d]`` summed over chunks."""
    # accumulate in the input dtype: one addition per chunk (two chunks per member), and
    # half the memory traffic of an fp32 buffer in bf16
    dk = k.new_zeros((k.shape[0], kv_len) + tuple(k.shape[2:]))
    dv = torch.zeros_like(dk)
    dqs = []
    for dout, q, (lo, hi), out, lse in zip(douts, qs, spans, outs, lses):
        kk, vv = (k[:, :hi], v[:, :hi]) if causal else (k[:, :kv_len], v[:, :kv_len])
        dq, dkc, dvc = attention_backward(dout, q, kk, vv, out, lse, causal=causal, softmax_scale=softmax_scale,
                                          backend=backend, selector=selector)
        dqs.append(dq)
        dk[:, : kk.shape[1]] += dkc
        dv[:, : vv.shape[1]] += dvc
    return dqs, dk, dv


# --------------------------------------------------------------------------------------
# base side
# --------------------------------------------------------------------------------------
def _gather_chunks(client, buf, plan: ZigzagPlan, group, own_spans, own_chunks, like):
    """Gather every member's ``[2L, b, ...]`` result into ``like``-shaped ``[b, n, ...]`` rows in order."""
    gathered = torch.empty_like(buf)
    mine = torch.empty_like(buf[0])
    dist.gather(mine, list(gathered.unbind(0)), dst=client.rank, group=group)
    client.stats.bytes_received += nbytes(gathered) - nbytes(mine)
    out = torch.empty_like(like)
    unpack_member_chunks(gathered, plan, out, members=range(1, plan.members))
    for (lo, hi), chunk in zip(own_spans, own_chunks):
        out[:, lo:hi] = chunk
    return out


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
    client.send_header(
        q.device, op=FORWARD, call_id=call_id, n=n, batch=b, heads=h, kv_heads=k.shape[2], head_dim=d,
        causal=int(causal), members=members, kv_chunk=client.kv_chunk, save=int(save),
        **Header.encode(dtype=q.dtype, softmax_scale=softmax_scale, backend=client.backend),
    )
    # 1. queries: scatter each member's two chunks
    qbuf = pack_member_chunks(q, plan)
    my_q = torch.empty_like(qbuf[0])
    works = [dist.scatter(my_q, list(qbuf.unbind(0)), src=client.rank, group=group, async_op=True)]
    client.stats.bytes_sent += nbytes(qbuf) - nbytes(qbuf[0])
    # 2. K/V prefix for the pool members, in pieces (pool members compute on arrival)
    kv = _kv_wire(k, v, plan.pool_kv_prefix)
    for lo, hi in plan.kv_pieces(client.kv_chunk):
        piece = kv[lo:hi]
        works.append(dist.broadcast(piece, src=client.rank, group=group, async_op=True))
        client.stats.bytes_sent += nbytes(piece) * active
    # 3. own chunks, overlapped with the transfers
    spans = plan.spans_of(0)
    outs, lses = chunks_forward([q[:, lo:hi] for lo, hi in spans], spans, k, v, causal=causal,
                                softmax_scale=softmax_scale, backend=client.backend, selector=client.selector)
    client.stats.query_rows += sum(hi - lo for lo, hi in spans)
    for w in works:
        w.wait()
    # 4. gather outputs
    out = _gather_chunks(client, qbuf, plan, group, spans, outs, like=q)
    client.stats.pooled_forward += 1
    return out, lses, plan, call_id


def zigzag_backward(client, dout, q, k, v, out, lses, *, plan: ZigzagPlan, call_id: int, softmax_scale: float):
    """Exact dq, dk, dv ``[b, n, ...]`` of a pooled forward."""
    return named_failure(
        f"attention pool backward of base rank {client.rank}", client.pool_ranks[: plan.members - 1],
        _backward, client, dout, q, k, v, out, lses, plan=plan, call_id=call_id, softmax_scale=softmax_scale,
    )


def _backward(client, dout, q, k, v, out, lses, *, plan, call_id, softmax_scale):
    n = q.shape[1]
    members = plan.members
    group = client.group(members - 1)
    # this call's state stays live on the pool until its backward header has been read
    client.send_header(q.device, op=BACKWARD, call_id=call_id, members=members)
    client.close_call(call_id)
    dbuf = pack_member_chunks(dout, plan)
    my_d = torch.empty_like(dbuf[0])
    work = dist.scatter(my_d, list(dbuf.unbind(0)), src=client.rank, group=group, async_op=True)
    client.stats.bytes_sent += nbytes(dbuf) - nbytes(dbuf[0])

    spans = plan.spans_of(0)
    rows = [slice(lo, hi) for lo, hi in spans]
    dqs, dk, dv = chunks_backward(
        [dout[:, r] for r in rows], [q[:, r] for r in rows], spans, k, v, [out[:, r] for r in rows], lses,
        causal=plan.causal, softmax_scale=softmax_scale, backend=client.backend, kv_len=n, selector=client.selector,
    )
    work.wait()
    e_max = plan.pool_kv_prefix
    # partial sums travel in the input dtype (bf16 on GPU: half the bytes of fp32)
    dkv = _kv_wire(dk.to(k.dtype), dv.to(k.dtype), e_max)
    dist.reduce(dkv, dst=client.rank, op=dist.ReduceOp.SUM, group=group)
    client.stats.bytes_received += nbytes(dkv) * (members - 1)
    dk[:, :e_max], dv[:, :e_max] = dkv[:, 0].transpose(0, 1), dkv[:, 1].transpose(0, 1)
    dq = _gather_chunks(client, dbuf, plan, group, spans, dqs, like=q)
    client.stats.pooled_backward += 1
    return dq, dk, dv  # chunks_backward accumulates in the input dtype


# --------------------------------------------------------------------------------------
# member side
# --------------------------------------------------------------------------------------
@dataclass
class _Saved:
    plan: ZigzagPlan
    qbuf: torch.Tensor
    kv: torch.Tensor
    obuf: torch.Tensor
    lses: list
    header: Header


def serve_forward(member: ServiceMember, h: Header) -> None:
    plan = zigzag_plan(h.n, h.members, bool(h.causal))
    group = member.group_of(h.members)
    dt = h.torch_dtype
    qbuf = torch.empty((2 * plan.padded_chunk, h.batch, h.heads, h.head_dim), dtype=dt, device=member.device)
    dist.scatter(qbuf, None, src=member.leader, group=group)
    member.stats.bytes_received += nbytes(qbuf)
    e_max = plan.pool_kv_prefix
    kv = torch.empty((e_max, 2, h.batch, h.kv_heads, h.head_dim), dtype=dt, device=member.device)
    works = []
    for lo, hi in plan.kv_pieces(h.kv_chunk):
        piece = kv[lo:hi]
        works.append((lo, dist.broadcast(piece, src=member.leader, group=group, async_op=True)))
        member.stats.bytes_received += nbytes(piece)
    k, v = kv[:, 0].transpose(0, 1), kv[:, 1].transpose(0, 1)  # [b, e, hk, d] views
    spans = plan.spans_of(member.member)
    outs, lses = [], []
    for q, span in zip(member_views(qbuf, plan, member.member), spans):
        need = span[1] if plan.causal else e_max
        while works and works[0][0] < need:  # K/V pieces this chunk sees have arrived
            works.pop(0)[1].wait()
        o, l = chunks_forward([q], [span], k, v, causal=plan.causal, softmax_scale=h.softmax_scale,
                              backend=h.backend_name, selector=member.selector)
        outs += o
        lses += l
    for _, w in works:
        w.wait()
    obuf = torch.zeros_like(qbuf)
    for o, view in zip(outs, member_views(obuf, plan, member.member)):
        view.copy_(o)
    dist.gather(obuf, None, dst=member.leader, group=group)
    member.stats.bytes_sent += nbytes(obuf)
    member.stats.served_forward += 1
    member.stats.query_rows += sum(hi - lo for lo, hi in spans)
    if h.save:
        member.saved[h.call_id] = _Saved(plan, qbuf, kv, obuf, lses, h)


def serve_backward(member: ServiceMember, h: Header) -> None:
    s = member.take_saved(h.call_id, _Saved, "backward")
    plan, fh, me = s.plan, s.header, member.member
    group = member.group_of(h.members)
    dbuf = torch.empty_like(s.qbuf)
    dist.scatter(dbuf, None, src=member.leader, group=group)
    member.stats.bytes_received += nbytes(dbuf)
    e_max = plan.pool_kv_prefix
    dqs, dk, dv = chunks_backward(
        member_views(dbuf, plan, me), member_views(s.qbuf, plan, me), plan.spans_of(me),
        s.kv[:, 0].transpose(0, 1), s.kv[:, 1].transpose(0, 1), member_views(s.obuf, plan, me), s.lses,
        causal=plan.causal, softmax_scale=fh.softmax_scale, backend=fh.backend_name, kv_len=e_max,
        selector=member.selector,
    )
    dkv = _kv_wire(dk.to(fh.torch_dtype), dv.to(fh.torch_dtype), e_max)  # the base reduces in the input dtype
    dist.reduce(dkv, dst=member.leader, op=dist.ReduceOp.SUM, group=group)
    member.stats.bytes_sent += nbytes(dkv)
    gbuf = torch.zeros_like(s.qbuf)
    for g, view in zip(dqs, member_views(gbuf, plan, me)):
        view.copy_(g)
    dist.gather(gbuf, None, dst=member.leader, group=group)
    member.stats.bytes_sent += nbytes(gbuf)
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
