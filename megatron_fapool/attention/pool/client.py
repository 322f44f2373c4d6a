"""Base-rank side of the attention pool: send work, compute its own share, gather.

:class:`PoolClient` runs one pooled attention call over the group ``{base} + p pool
ranks`` (forward and backward as pure-ish methods); :class:`PooledAttention` is the thin
autograd layer. All groups exist already (created at start-up); a call only uses them.

Transfers (DESIGN.md §2): the query chunks of each member are scattered; the K/V
prefix the pool members need is broadcast (in pieces of ``kv_chunk`` tokens, one by
default: :meth:`ZigzagPlan.kv_pieces` says why); the base
computes its own chunks meanwhile; outputs are gathered. Backward: dO scattered, dQ
gathered, dK/dV partial sums reduced to the base (a tree inside the collective).
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist

from ...config.schema import ATTENTION_BACKENDS
from .blocks import chunks_backward, chunks_forward
from .partition import ZigzagPlan, zigzag_plan
from .protocol import DTYPES, Header, Op
from .stats import PoolStats

__all__ = ["PoolClient", "PoolRankLost", "PooledAttention", "pack_member_chunks", "unpack_member_chunks"]


class PoolRankLost(RuntimeError):
    """A collective with the pool failed: a member process died or the link broke."""


def _named_failure(what: str, peers, fn, *args, **kwargs):
    """Run ``fn``; turn a communication failure into an error naming the peer ranks."""
    try:
        return fn(*args, **kwargs)
    except PoolRankLost:
        raise
    except (RuntimeError, ConnectionError) as e:  # torch's DistBackendError is a RuntimeError
        raise PoolRankLost(f"{what}: lost contact with rank(s) {list(peers)}: {str(e).splitlines()[0]}") from e


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def pack_member_chunks(x: torch.Tensor, plan: ZigzagPlan) -> torch.Tensor:
    """``[n, ...]`` -> ``[P, 2L, ...]``: each member's two chunks, zero-padded to ``L`` rows."""
    pad = plan.padded_chunk
    buf = x.new_zeros((plan.members, 2 * pad) + tuple(x.shape[1:]))
    for m in range(plan.members):
        for slot, (lo, hi) in enumerate(plan.spans_of(m)):
            buf[m, slot * pad : slot * pad + hi - lo] = x[lo:hi]
    return buf


def unpack_member_chunks(buf: torch.Tensor, plan: ZigzagPlan, out: torch.Tensor, members=None) -> torch.Tensor:
    """Inverse of :func:`pack_member_chunks` into ``out`` ``[n, ...]`` (for ``members``)."""
    pad = plan.padded_chunk
    for m in members if members is not None else range(plan.members):
        for slot, (lo, hi) in enumerate(plan.spans_of(m)):
            out[lo:hi] = buf[m, slot * pad : slot * pad + hi - lo]
    return out


def member_views(buf: torch.Tensor, plan: ZigzagPlan, member: int) -> list[torch.Tensor]:
    """The two chunk views (unpadded) of one member's ``[2L, ...]`` buffer."""
    pad = plan.padded_chunk
    return [buf[slot * pad : slot * pad + hi - lo] for slot, (lo, hi) in enumerate(plan.spans_of(member))]


class PoolClient:
    """Pooled attention calls of one base rank (one per base rank, shared by its layers)."""

    def __init__(self, groups, *, kv_chunk_tokens: int, backend: str = "auto", stats: PoolStats | None = None):
        layout = groups.layout
        if not groups.is_base:
            raise ValueError(f"rank {groups.rank} is not a base rank")
        self.groups = groups
        self.rank = groups.rank
        self.pool_ranks = layout.pool_of(self.rank)
        self.max_members = len(self.pool_ranks) + 1
        self.control_group = groups.attention_group(self.rank, len(self.pool_ranks)) if self.pool_ranks else None
        self.kv_chunk = kv_chunk_tokens
        self.backend = backend
        self.stats = stats or PoolStats()
        self._next_id = 1
        self._live: set[int] = set()

    # -- control ------------------------------------------------------------------------
    def send_header(self, device, **fields) -> None:
        """Broadcast a control header to every pool rank of this base rank.

        Every header carries ``drop_before``: the pool may free the saved state of older calls.
        """
        t = Header(drop_before=self._drop_before(), **fields).to_tensor(device)
        dist.broadcast(t, src=self.rank, group=self.control_group)
        self.stats.bytes_sent += _nbytes(t)

    def _drop_before(self) -> int:
        return min(self._live) if self._live else self._next_id

    def open_call(self, save: bool) -> int:
        """A new call id; with ``save``, the pool keeps the call's state until its backward."""
        call_id = self._next_id
        self._next_id += 1
        if save:
            self._live.add(call_id)
        return call_id

    def close_call(self, call_id: int) -> None:
        """The call's state may be freed on the pool (sent with the next header)."""
        self._live.discard(call_id)

    def gather_chunks(self, buf, plan: ZigzagPlan, group, own_spans, own_chunks, like):
        """Gather every member's ``[2L, ...]`` result into ``like``-shaped rows in sequence order."""
        gathered = torch.empty_like(buf)
        mine = torch.empty_like(buf[0])
        dist.gather(mine, list(gathered.unbind(0)), dst=self.rank, group=group)
        self.stats.bytes_received += _nbytes(gathered) - _nbytes(mine)
        out = torch.empty_like(like)
        unpack_member_chunks(gathered, plan, out, members=range(1, plan.members))
        for (lo, hi), chunk in zip(own_spans, own_chunks):
            out[lo:hi] = chunk
        return out

    def shutdown(self, device) -> None:
        """Tell every pool rank of this base rank to leave its serving loop."""
        if self.control_group is not None:
            self.send_header(device, op=Op.SHUTDOWN)

    # -- forward ------------------------------------------------------------------------
    def forward(self, q, k, v, *, active: int, causal: bool, softmax_scale: float, save: bool):
        """q ``[n, b, h, d]``, k/v ``[n, b, hk, d]`` (Megatron layout). Returns (out, lse_own, plan, call_id)."""
        return _named_failure(
            f"attention pool forward of base rank {self.rank}", self.pool_ranks[:active],
            self._forward, q, k, v, active=active, causal=causal, softmax_scale=softmax_scale, save=save,
        )

    def _forward(self, q, k, v, *, active: int, causal: bool, softmax_scale: float, save: bool):
        n, b, h, d = q.shape
        hk = k.shape[2]
        members = active + 1
        plan = zigzag_plan(n, members, causal)
        group = self.groups.attention_group(self.rank, active)
        call_id = self.open_call(save)
        self.send_header(
            q.device, op=Op.FORWARD, call_id=call_id, n=n, batch=b, heads=h,
            kv_heads=hk, head_dim=d, dtype=DTYPES.index(q.dtype), causal=int(causal), members=members,
            kv_chunk=self.kv_chunk, save=int(save), scale_bits=Header.scale_to_bits(softmax_scale),
            backend=ATTENTION_BACKENDS.index(self.backend),
        )

        # 1. queries: scatter each member's two chunks
        qbuf = pack_member_chunks(q, plan)
        my_q = torch.empty_like(qbuf[0])
        works = [dist.scatter(my_q, list(qbuf.unbind(0)), src=self.rank, group=group, async_op=True)]
        self.stats.bytes_sent += _nbytes(qbuf) - _nbytes(qbuf[0])
        # 2. K/V prefix for the pool members, in chunks (pool members compute on arrival)
        e_max = plan.pool_kv_prefix
        kv = torch.stack((k[:e_max], v[:e_max]), dim=1)  # [e, 2, b, hk, d], contiguous
        for lo, hi in plan.kv_pieces(self.kv_chunk):
            piece = kv[lo:hi]
            works.append(dist.broadcast(piece, src=self.rank, group=group, async_op=True))
            self.stats.bytes_sent += _nbytes(piece) * active
        # 3. own chunks, overlapped with the transfers
        spans = plan.spans_of(0)
        qs = [q[lo:hi] for lo, hi in spans]
        outs, lses = chunks_forward(qs, spans, k, v, causal=causal, softmax_scale=softmax_scale, backend=self.backend)
        self.stats.query_rows += sum(hi - lo for lo, hi in spans)
        for w in works:
            w.wait()
        # 4. gather outputs
        out = self.gather_chunks(qbuf, plan, group, spans, outs, like=q)
        self.stats.pooled_forward += 1
        return out, lses, plan, call_id

    # -- backward -----------------------------------------------------------------------
    def backward(self, dout, q, k, v, out, lses, *, plan: ZigzagPlan, call_id: int, softmax_scale: float):
        return _named_failure(
            f"attention pool backward of base rank {self.rank}", self.pool_ranks[: plan.members - 1],
            self._backward, dout, q, k, v, out, lses, plan=plan, call_id=call_id, softmax_scale=softmax_scale,
        )

    def _backward(self, dout, q, k, v, out, lses, *, plan: ZigzagPlan, call_id: int, softmax_scale: float):
        n = q.shape[0]
        members = plan.members
        group = self.groups.attention_group(self.rank, members - 1)
        # this call's state stays live on the pool until its backward header has been read
        self.send_header(q.device, op=Op.BACKWARD, call_id=call_id, members=members)
        self.close_call(call_id)
        dbuf = pack_member_chunks(dout.contiguous(), plan)
        my_d = torch.empty_like(dbuf[0])
        work = dist.scatter(my_d, list(dbuf.unbind(0)), src=self.rank, group=group, async_op=True)
        self.stats.bytes_sent += _nbytes(dbuf) - _nbytes(dbuf[0])

        spans = plan.spans_of(0)
        dqs, dk, dv = chunks_backward(
            [dout[lo:hi] for lo, hi in spans], [q[lo:hi] for lo, hi in spans], spans, k, v,
            [out[lo:hi] for lo, hi in spans], lses, causal=plan.causal, softmax_scale=softmax_scale,
            backend=self.backend, kv_len=n,
        )
        work.wait()
        e_max = plan.pool_kv_prefix
        # partial sums travel in the input dtype (bf16 on GPU: half the bytes of fp32)
        dkv = torch.stack((dk[:e_max], dv[:e_max]), dim=1).to(k.dtype)  # [e, 2, b, hk, d]
        dist.reduce(dkv, dst=self.rank, op=dist.ReduceOp.SUM, group=group)
        self.stats.bytes_received += _nbytes(dkv) * (members - 1)
        dk[:e_max], dv[:e_max] = dkv[:, 0], dkv[:, 1]
        dq = self.gather_chunks(dbuf, plan, group, spans, dqs, like=q)
        self.stats.pooled_backward += 1
        return dq, dk, dv  # chunks_backward accumulates in the input dtype


class _CallToken:
    """Lives exactly as long as the autograd context of one pooled call."""


class PooledAttention(torch.autograd.Function):
    """Autograd layer: ``out = attention(q, k, v)`` computed by the base rank and its pool."""

    @staticmethod
    def forward(ctx, q, k, v, client: PoolClient, active: int, causal: bool, softmax_scale: float):
        save = torch.is_grad_enabled() or any(t.requires_grad for t in (q, k, v))
        out, lses, plan, call_id = client.forward(
            q, k, v, active=active, causal=causal, softmax_scale=softmax_scale, save=save
        )
        ctx.save_for_backward(q, k, v, out, *lses)
        ctx.client, ctx.plan, ctx.call_id, ctx.softmax_scale = client, plan, call_id, softmax_scale
        # if autograd drops this graph without a backward, let the pool free the state
        ctx.token = _CallToken()
        weakref.finalize(ctx.token, client.close_call, call_id)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, *lses = ctx.saved_tensors
        dq, dk, dv = ctx.client.backward(
            dout, q, k, v, out, lses, plan=ctx.plan, call_id=ctx.call_id, softmax_scale=ctx.softmax_scale
        )
        return dq, dk, dv, None, None, None, None
