"""The attention pool splitting *heads* (dilated attention, DESIGN.md §4).

Dilated attention is cheap per head but every head needs the whole sequence, so the
zigzag query split of the dense pool (which replicates the K/V prefix) is the wrong
cut. Here the base rank gives each active member a contiguous subset of its heads:
the queries of those heads and the key/value heads they read, over the whole
sequence. Each member runs :func:`dilated_attention` with the global head offset of
its subset (offsets use global head indices, so the result does not depend on the
split) and sends its heads' output back. Backward: dO of the member's heads out,
dQ/dK/dV of its heads back; heads are disjoint, so nothing is reduced.

GQA: heads are split at query-group boundaries whenever there are at least as many
key/value heads as members, so no K/V head is sent twice. With fewer key/value heads
than members, query heads are split one by one and a member whose heads do not
cover whole groups gets one key/value head per query head (replicated); the base
then sums the dK/dV of the replicas.

Wire protocol (after the header, op ``HEADS_FORWARD`` / ``HEADS_BACKWARD``, sent on
the control group as for the dense pool), all on the group ``{base} + active``:

1. forward: broadcast of an int64 parameter tensor of ``header.extra`` entries
   ``[head_offset, total_heads, w_1..w_m, r_1..r_m]``; scatter of each member's
   ``q | k | v`` (flattened, concatenated, zero-padded to the longest member); gather of
   each member's output (flattened, padded).
2. backward: scatter of each member's dO; gather of each member's ``dq | dk | dv``.

Members' shares come from :func:`head_split`, a pure function both sides evaluate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from ...parallel.service import Header, ServiceMember, int64_tensor, named_failure, nbytes
from ..dilated import dilated_attention

__all__ = ["HANDLERS", "HEADS_BACKWARD", "HEADS_FORWARD", "HeadSplit", "PooledHeadsAttention", "head_split"]

HEADS_FORWARD = 4
HEADS_BACKWARD = 5


# ---------------------------------------------------------------------------------------
# the split (pure)
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeadSplit:
    """Which query heads (and key/value heads) each member of a pooled call computes."""

    heads: int  # query heads of the base rank
    kv_heads: int
    members: int
    bounds: tuple[int, ...]  # members + 1 query-head boundaries

    @property
    def kv_group(self) -> int:
        return self.heads // self.kv_heads

    def q_range(self, member: int) -> tuple[int, int]:
        return self.bounds[member], self.bounds[member + 1]

    def q_count(self, member: int) -> int:
        a, b = self.q_range(member)
        return b - a

    def kv_aligned(self, member: int) -> bool:
        a, b = self.q_range(member)
        return a % self.kv_group == 0 and b % self.kv_group == 0

    def kv_index(self, member: int) -> list[int]:
        """Key/value heads (base-local indices) sent to ``member``, in the member's order.

        Group-aligned: each group's key/value head once. Otherwise one per query head.
        """
        a, b = self.q_range(member)
        g = self.kv_group
        if self.kv_aligned(member):
            return list(range(a // g, b // g))
        return [h // g for h in range(a, b)]

    def kv_count(self, member: int) -> int:
        return len(self.kv_index(member))

    def payload(self, member: int, batch: int, n: int, head_dim: int) -> int:
        """Elements of ``q | k | v`` (and of ``dq | dk | dv``) of one member."""
        return batch * n * head_dim * (self.q_count(member) + 2 * self.kv_count(member))

    def out_payload(self, member: int, batch: int, n: int, head_dim: int) -> int:
        return batch * n * head_dim * self.q_count(member)


def head_split(heads: int, kv_heads: int, members: int) -> HeadSplit:
    """Contiguous, balanced head ranges for ``members`` (base first); see the module doc."""
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    if not 2 <= members <= heads:
        raise ValueError(f"a pooled heads split needs 2..{heads} members (one head each at least), got {members}")
    unit = heads // kv_heads if kv_heads >= members else 1
    units = heads // unit
    bounds = tuple(unit * (m * units // members) for m in range(members + 1))
    return HeadSplit(heads=heads, kv_heads=kv_heads, members=members, bounds=bounds)


# ---------------------------------------------------------------------------------------
# packing
# ---------------------------------------------------------------------------------------
def _member_inputs(q, k, v, split: HeadSplit, member: int):
    """Views / gathers of ``[b, n, h, d]`` q, k, v for one member."""
    a, b = split.q_range(member)
    if split.kv_aligned(member):
        ka, kb = a // split.kv_group, b // split.kv_group
        return q[:, :, a:b], k[:, :, ka:kb], v[:, :, ka:kb]
    idx = torch.tensor(split.kv_index(member), device=k.device)
    return q[:, :, a:b], k.index_select(2, idx), v.index_select(2, idx)


def _pack(parts, length: int, out: torch.Tensor) -> torch.Tensor:
    """Write the flattened ``parts`` one after another into ``out`` (1-D, >= their total)."""
    pos = 0
    for p in parts:
        size = p.numel()
        out[pos : pos + size].view_as(p).copy_(p)
        pos += size
    if pos < length:
        out[pos:length].zero_()
    return out


def _unpack(flat: torch.Tensor, shapes) -> list[torch.Tensor]:
    out, pos = [], 0
    for shape in shapes:
        size = 1
        for s in shape:
            size *= s
        out.append(flat[pos : pos + size].view(shape))
        pos += size
    return out


def _member_shapes(split: HeadSplit, member: int, b: int, n: int, d: int):
    return (b, n, split.q_count(member), d), (b, n, split.kv_count(member), d), (b, n, split.kv_count(member), d)


def _params_tensor(head_offset, total_heads, segment_lengths, dilation_rates, device) -> torch.Tensor:
    return int64_tensor([head_offset, total_heads, *segment_lengths, *dilation_rates], device)


def _parse_params(t: torch.Tensor):
    vals = [int(x) for x in t.tolist()]
    m = (len(vals) - 2) // 2
    return vals[0], vals[1], tuple(vals[2 : 2 + m]), tuple(vals[2 + m :])


@dataclass
class _Branches:
    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    causal: bool
    softmax_scale: float
    backend: str


def _run_dilated(q, k, v, br: _Branches, head_offset: int, total_heads: int, save: bool):
    """Dilated attention on one head subset; with ``save`` also the leaves to differentiate."""
    if not save:
        with torch.no_grad():
            out = dilated_attention(
                q, k, v, br.segment_lengths, br.dilation_rates, br.causal, br.softmax_scale,
                head_offset=head_offset, total_heads=total_heads, backend=br.backend,
            )
        return out, None
    leaves = tuple(t.detach().requires_grad_(True) for t in (q, k, v))
    with torch.enable_grad():
        out = dilated_attention(
            *leaves, br.segment_lengths, br.dilation_rates, br.causal, br.softmax_scale,
            head_offset=head_offset, total_heads=total_heads, backend=br.backend,
        )
    return out, leaves


def _grads(out, leaves, dout):
    return torch.autograd.grad(out, leaves, dout)


# ---------------------------------------------------------------------------------------
# base rank
# ---------------------------------------------------------------------------------------
@dataclass
class _BaseState:
    split: HeadSplit
    call_id: int
    out: torch.Tensor  # own heads' output (with its graph)
    leaves: tuple
    shape: tuple  # (b, n, d)
    dtypes: tuple  # q, k, v dtypes


def heads_forward(client, q, k, v, *, active, br: _Branches, head_offset, total_heads, save):
    return named_failure(
        f"attention pool (heads) forward of base rank {client.rank}", client.pool_ranks[:active],
        _heads_forward, client, q, k, v, active=active, br=br, head_offset=head_offset,
        total_heads=total_heads, save=save,
    )


def _heads_forward(client, q, k, v, *, active, br: _Branches, head_offset, total_heads, save):
    b, n, h, d = q.shape
    hk = k.shape[2]
    members = active + 1
    split = head_split(h, hk, members)
    group = client.group(active)
    call_id = client.open_call(save)
    params = _params_tensor(head_offset, total_heads, br.segment_lengths, br.dilation_rates, q.device)
    client.announce_call(
        q.device, op=HEADS_FORWARD, call_id=call_id, n=n, batch=b, heads=h, kv_heads=hk, head_dim=d,
        causal=int(br.causal), members=members, save=int(save), extra=params.numel(),
        **Header.encode(dtype=q.dtype, softmax_scale=br.softmax_scale, backend=br.backend),
    )
    dist.broadcast(params, src=client.rank, group=group)
    client.stats.bytes_sent += nbytes(params) * active

    # 1. each member's q | k | v (the base's own slot stays unused)
    length = max(split.payload(m, b, n, d) for m in range(members))
    buf = torch.empty((members, length), dtype=q.dtype, device=q.device)
    for m in range(1, members):
        _pack(_member_inputs(q, k, v, split, m), length, buf[m])
    mine = torch.empty((length,), dtype=q.dtype, device=q.device)
    work = dist.scatter(mine, list(buf.unbind(0)), src=client.rank, group=group, async_op=True)
    client.stats.bytes_sent += nbytes(buf) - nbytes(buf[0])
    # 2. own heads, overlapped with the transfer
    a, _ = split.q_range(0)
    own_out, leaves = _run_dilated(*_member_inputs(q, k, v, split, 0), br, head_offset + a, total_heads, save)
    client.stats.query_rows += n
    work.wait()
    del buf
    # 3. outputs
    olen = max(split.out_payload(m, b, n, d) for m in range(members))
    obuf = torch.empty((members, olen), dtype=q.dtype, device=q.device)
    dist.gather(torch.empty((olen,), dtype=q.dtype, device=q.device), list(obuf.unbind(0)), dst=client.rank, group=group)
    client.stats.bytes_received += nbytes(obuf) - nbytes(obuf[0])
    out = torch.empty((b, n, h, d), dtype=q.dtype, device=q.device)
    for m in range(members):
        lo, hi = split.q_range(m)
        src = own_out if m == 0 else obuf[m, : split.out_payload(m, b, n, d)].view(b, n, hi - lo, d)
        out[:, :, lo:hi] = src
    client.stats.pooled_forward += 1
    state = _BaseState(split, call_id, own_out, leaves, (b, n, d), (q.dtype, k.dtype, v.dtype))
    return out, state


def heads_backward(client, dout, state: _BaseState):
    return named_failure(
        f"attention pool (heads) backward of base rank {client.rank}", client.pool_ranks[: state.split.members - 1],
        _heads_backward, client, dout, state,
    )


def _heads_backward(client, dout, state: _BaseState):
    split = state.split
    members = split.members
    b, n, d = state.shape
    group = client.group(members - 1)
    client.announce_call(dout.device, op=HEADS_BACKWARD, call_id=state.call_id, members=members, backward=True)
    client.close_call(state.call_id)
    # 1. dO of each member's heads
    olen = max(split.out_payload(m, b, n, d) for m in range(members))
    dbuf = torch.empty((members, olen), dtype=dout.dtype, device=dout.device)
    for m in range(1, members):
        lo, hi = split.q_range(m)
        _pack([dout[:, :, lo:hi]], olen, dbuf[m])
    mine = torch.empty((olen,), dtype=dout.dtype, device=dout.device)
    work = dist.scatter(mine, list(dbuf.unbind(0)), src=client.rank, group=group, async_op=True)
    client.stats.bytes_sent += nbytes(dbuf) - nbytes(dbuf[0])
    # 2. own heads
    lo, hi = split.q_range(0)
    own = _grads(state.out, state.leaves, dout[:, :, lo:hi])
    state.out = state.leaves = None
    work.wait()
    del dbuf
    # 3. dq | dk | dv of each member
    length = max(split.payload(m, b, n, d) for m in range(members))
    gbuf = torch.empty((members, length), dtype=dout.dtype, device=dout.device)
    dist.gather(torch.empty((length,), dtype=dout.dtype, device=dout.device), list(gbuf.unbind(0)),
                dst=client.rank, group=group)
    client.stats.bytes_received += nbytes(gbuf) - nbytes(gbuf[0])
    qdt, kdt, vdt = state.dtypes
    dq = torch.empty((b, n, split.heads, d), dtype=qdt, device=dout.device)
    acc = torch.float32 if kdt in (torch.bfloat16, torch.float16) else kdt
    dk = torch.zeros((b, n, split.kv_heads, d), dtype=acc, device=dout.device)
    dv = torch.zeros_like(dk)
    for m in range(members):
        gq, gk, gv = own if m == 0 else _unpack(gbuf[m], _member_shapes(split, m, b, n, d))
        lo, hi = split.q_range(m)
        dq[:, :, lo:hi] = gq
        idx = torch.tensor(split.kv_index(m), device=dout.device)
        dk.index_add_(2, idx, gk.to(acc))
        dv.index_add_(2, idx, gv.to(acc))
    client.stats.pooled_backward += 1
    return dq, dk.to(kdt), dv.to(vdt)


class PooledHeadsAttention(torch.autograd.Function):
    """``out = dilated_attention(q, k, v)`` ([b, n, h, d]) with the heads spread over the pool."""

    @staticmethod
    def forward(
        ctx, q, k, v, client, active: int, segment_lengths: Sequence[int], dilation_rates: Sequence[int],
        causal: bool, softmax_scale: float, head_offset: int, total_heads: int,
    ):
        save = torch.is_grad_enabled() or any(t.requires_grad for t in (q, k, v))
        br = _Branches(tuple(segment_lengths), tuple(dilation_rates), bool(causal), float(softmax_scale), client.backend)
        out, state = heads_forward(
            client, q, k, v, active=active, br=br, head_offset=head_offset, total_heads=total_heads, save=save
        )
        ctx.client, ctx.state = client, state
        client.close_when_dropped(ctx, state.call_id)
        return out

    @staticmethod
    def backward(ctx, dout):
        state, ctx.state = ctx.state, None
        if state is None:
            raise RuntimeError("PooledHeadsAttention: backward called twice (retain_graph is not supported)")
        dq, dk, dv = heads_backward(ctx.client, dout, state)
        return dq, dk, dv, None, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------
# pool rank
# ---------------------------------------------------------------------------------------
@dataclass
class _MemberState:
    split: HeadSplit
    out: torch.Tensor
    leaves: tuple
    header: Header


def serve_heads_forward(server: ServiceMember, h: Header) -> None:
    """A pool member's side of ``HEADS_FORWARD``."""
    group = server.group_of(h.members)
    params = torch.empty((h.extra,), dtype=torch.int64, device=server.device)
    dist.broadcast(params, src=server.leader, group=group)
    server.stats.bytes_received += nbytes(params)
    head_offset, total_heads, segs, rates = _parse_params(params)
    split = head_split(h.heads, h.kv_heads, h.members)
    m, b, n, d = server.member, h.batch, h.n, h.head_dim
    dt = h.torch_dtype
    length = max(split.payload(i, b, n, d) for i in range(h.members))
    buf = torch.empty((length,), dtype=dt, device=server.device)
    dist.scatter(buf, None, src=server.leader, group=group)
    server.stats.bytes_received += nbytes(buf)
    q, k, v = _unpack(buf, _member_shapes(split, m, b, n, d))
    br = _Branches(segs, rates, bool(h.causal), h.softmax_scale, h.backend_name)
    a, _ = split.q_range(m)
    out, leaves = _run_dilated(q, k, v, br, head_offset + a, total_heads, bool(h.save))
    olen = max(split.out_payload(i, b, n, d) for i in range(h.members))
    obuf = _pack([out.detach()], olen, torch.empty((olen,), dtype=dt, device=server.device))
    dist.gather(obuf, None, dst=server.leader, group=group)
    server.stats.bytes_sent += nbytes(obuf)
    server.stats.served_forward += 1
    server.stats.query_rows += n
    if h.save:
        server.saved[h.call_id] = _MemberState(split, out, leaves, h)


def serve_heads_backward(server: ServiceMember, h: Header) -> None:
    s = server.take_saved(h.call_id, _MemberState, "heads backward")
    fh, split = s.header, s.split
    group = server.group_of(h.members)
    m, b, n, d = server.member, fh.batch, fh.n, fh.head_dim
    dt = fh.torch_dtype
    olen = max(split.out_payload(i, b, n, d) for i in range(split.members))
    dbuf = torch.empty((olen,), dtype=dt, device=server.device)
    dist.scatter(dbuf, None, src=server.leader, group=group)
    server.stats.bytes_received += nbytes(dbuf)
    dout = dbuf[: split.out_payload(m, b, n, d)].view(b, n, split.q_count(m), d)
    grads = _grads(s.out, s.leaves, dout)
    del s
    length = max(split.payload(i, b, n, d) for i in range(split.members))
    gbuf = _pack(grads, length, torch.empty((length,), dtype=dt, device=server.device))
    dist.gather(gbuf, None, dst=server.leader, group=group)
    server.stats.bytes_sent += nbytes(gbuf)
    server.stats.served_backward += 1


HANDLERS = {HEADS_FORWARD: serve_heads_forward, HEADS_BACKWARD: serve_heads_backward}
