"""Pool-rank side: a serving loop that computes attention blocks for its base rank.

A pool rank holds no weights. It waits for a header from the base rank it serves
(broadcast over that base rank's largest attention group), and, if it is among the
active members, receives its query chunks and the K/V prefix, computes its blocks and
sends the outputs back; for a backward it computes dQ and its dK/dV partial sums from
the state it kept. It leaves the loop on SHUTDOWN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .blocks import chunks_backward, chunks_forward
from .client import _named_failure, _nbytes, member_views
from .heads import serve_heads_backward, serve_heads_forward
from .kv_cache import KVShardStore, serve_kv_decode, serve_kv_free, serve_kv_store
from .partition import ZigzagPlan, zigzag_plan
from .protocol import Header, Op
from .stats import PoolStats

__all__ = ["PoolServer"]


@dataclass
class _Saved:
    plan: ZigzagPlan
    qbuf: torch.Tensor
    kv: torch.Tensor
    obuf: torch.Tensor
    lses: list
    header: Header


class PoolServer:
    def __init__(self, groups, *, device, stats: PoolStats | None = None):
        if not groups.is_pool:
            raise ValueError(f"rank {groups.rank} is not a pool rank")
        role = groups.role
        layout = groups.layout
        self.groups = groups
        self.base = role.serves
        self.member = role.pool_index + 1  # member index inside any group it is active in
        self.control_group = groups.attention_group(self.base, layout.pool_per_base)
        self.device = device
        self.stats = stats or PoolStats()
        self.saved: dict[int, _Saved] = {}
        self.kv = KVShardStore()  # inference: K/V shards of pooled requests

    def _group(self, members: int):
        return self.groups.attention_group(self.base, members - 1)

    def _recv_header(self) -> Header:
        t = Header.empty(self.device)
        dist.broadcast(t, src=self.base, group=self.control_group)
        self.stats.bytes_received += _nbytes(t)
        return Header.from_tensor(t)

    def serve(self) -> PoolStats:
        """Serve until the base rank sends SHUTDOWN; returns this rank's counters."""
        return _named_failure(f"pool rank {self.groups.rank}", [self.base], self._serve)

    def _serve(self) -> PoolStats:
        while True:
            h = self._recv_header()
            if h.op == Op.SHUTDOWN:
                self.saved.clear()
                return self.stats
            for cid in [c for c in self.saved if c < h.drop_before]:
                del self.saved[cid]
            if self.member >= h.members:
                continue  # not active for this call
            if h.op == Op.FORWARD:
                self._forward(h)
            elif h.op == Op.BACKWARD:
                self._backward(h)
            elif h.op == Op.HEADS_FORWARD:
                serve_heads_forward(self, h)
            elif h.op == Op.HEADS_BACKWARD:
                serve_heads_backward(self, h)
            elif h.op == Op.KV_STORE:
                serve_kv_store(self, h)
            elif h.op == Op.KV_DECODE:
                serve_kv_decode(self, h)
            elif h.op == Op.KV_FREE:
                serve_kv_free(self, h)
            else:
                raise RuntimeError(f"pool rank {self.groups.rank}: unknown op {h.op} from base rank {self.base}")

    def _forward(self, h: Header) -> None:
        plan = zigzag_plan(h.n, h.members, bool(h.causal))
        group = self._group(h.members)
        dt = h.torch_dtype
        pad = plan.padded_chunk
        qbuf = torch.empty((2 * pad, h.batch, h.heads, h.head_dim), dtype=dt, device=self.device)
        dist.scatter(qbuf, None, src=self.base, group=group)
        self.stats.bytes_received += _nbytes(qbuf)
        e_max = plan.pool_kv_prefix
        kv = torch.empty((e_max, 2, h.batch, h.kv_heads, h.head_dim), dtype=dt, device=self.device)
        works = []
        for lo, hi in plan.kv_pieces(h.kv_chunk):
            piece = kv[lo:hi]
            works.append((lo, dist.broadcast(piece, src=self.base, group=group, async_op=True)))
            self.stats.bytes_received += _nbytes(piece)
        spans = plan.spans_of(self.member)
        qs = member_views(qbuf, plan, self.member)
        outs, lses = [], []
        for q, span in zip(qs, spans):
            need = span[1] if plan.causal else e_max
            while works and works[0][0] < need:  # K/V chunks this block sees have arrived
                works.pop(0)[1].wait()
            o, l = chunks_forward(
                [q], [span], kv[:, 0], kv[:, 1], causal=plan.causal,
                softmax_scale=h.softmax_scale, backend=h.backend_name,
            )
            outs += o
            lses += l
        for _, w in works:
            w.wait()
        obuf = torch.zeros_like(qbuf)
        for o, view in zip(outs, member_views(obuf, plan, self.member)):
            view.copy_(o)
        dist.gather(obuf, None, dst=self.base, group=group)
        self.stats.bytes_sent += _nbytes(obuf)
        self.stats.served_forward += 1
        self.stats.query_rows += sum(hi - lo for lo, hi in spans)
        if h.save:
            self.saved[h.call_id] = _Saved(plan, qbuf, kv, obuf, lses, h)

    def _backward(self, h: Header) -> None:
        s = self.saved.pop(h.call_id, None)
        if s is None:
            raise RuntimeError(
                f"pool rank {self.groups.rank}: backward for call {h.call_id} from base rank {self.base}"
                " without its forward state"
            )
        plan, fh = s.plan, s.header
        group = self._group(h.members)
        dbuf = torch.empty_like(s.qbuf)
        dist.scatter(dbuf, None, src=self.base, group=group)
        self.stats.bytes_received += _nbytes(dbuf)
        spans = plan.spans_of(self.member)
        e_max = plan.pool_kv_prefix
        dqs, dk, dv = chunks_backward(
            member_views(dbuf, plan, self.member), member_views(s.qbuf, plan, self.member), spans,
            s.kv[:, 0], s.kv[:, 1], member_views(s.obuf, plan, self.member), s.lses,
            causal=plan.causal, softmax_scale=fh.softmax_scale, backend=fh.backend_name, kv_len=e_max,
        )
        dkv = torch.stack((dk, dv), dim=1).to(fh.torch_dtype)  # the base reduces in the input dtype
        dist.reduce(dkv, dst=self.base, op=dist.ReduceOp.SUM, group=group)
        self.stats.bytes_sent += _nbytes(dkv)
        gbuf = torch.zeros_like(s.qbuf)
        for g, view in zip(dqs, member_views(gbuf, plan, self.member)):
            view.copy_(g)
        dist.gather(gbuf, None, dst=self.base, group=group)
        self.stats.bytes_sent += _nbytes(gbuf)
        self.stats.served_backward += 1
