"""Head-parallel dilated attention, pipelined over chunks of each rank's heads.

Rank ``p`` holds sequence shard ``p`` with all heads; it ends up running the local
kernel over the whole sequence for its run of heads (global indices, so the result does
not depend on the number of ranks). The exchange is an all-to-all per tensor, split by
head chunks so that communication overlaps computation:

forward, for chunk ``c`` of every rank's heads::

    all-to-all q, k, v of chunk c+1   (started before chunk c computes)
    local forward of chunk c          (while chunk c+1 is in flight)
    all-to-all out of chunk c         (placed into the output after chunk c+1 computes)

backward likewise with dout in, and dq, dk, dv out. Heads are independent, so chunking
changes nothing in the result. One autograd Function covers the whole exchange: the
local forward/backward (:mod:`.dilated_local`) are called directly per chunk, with the
head-shard q/k/v and the merged out/lse of each chunk saved for the backward.

Each all-to-all moves one ``[P, b, n/P, heads_per_chunk, d]`` buffer: building it from
the ``[b, n/P, H, d]`` shard is one strided copy (sending q/k/v/dout), and turning a
received buffer into the ``[b, n, h, d]`` head shard is a view for batch 1 (receiving
q/k/v/dout) or one strided copy into the output (receiving out/dq/dk/dv).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_fapool.attention.dilated import local as DL
from megatron_fapool.attention.dilated.args import DilatedArgs
from megatron_fapool.attention.dilated.comm import all_to_all_async
from megatron_fapool.attention.dilated.plan import ceil_div

__all__ = ["DEFAULT_HEAD_CHUNKS", "MIN_CHUNK_ELEMENTS", "head_chunks", "head_parallel"]

#: Head chunks per rank for the communication / computation pipeline (when they divide
#: the heads evenly and each chunk is big enough to be worth a separate exchange).
DEFAULT_HEAD_CHUNKS = 2
#: A chunk's q head shard must have at least this many elements to be pipelined.
MIN_CHUNK_ELEMENTS = 1 << 24


def balanced_head_counts(num_heads: int, world_size: int) -> list[int]:
    """Contiguous head runs per rank, sizes differing by at most one (first ranks larger)."""
    base, extra = divmod(num_heads, world_size)
    return [base + (p < extra) for p in range(world_size)]


def head_chunks(
    q_heads: int, kv_heads: int, world: int, batch: int, seq_len: int, head_dim: int, requested: Optional[int] = None
) -> int:
    """How many head chunks each rank pipelines: the largest ``c <= requested`` (default
    :data:`DEFAULT_HEAD_CHUNKS`) dividing both head runs, with chunks of at least
    :data:`MIN_CHUNK_ELEMENTS` unless ``requested`` is given; 1 for uneven head splits."""
    if q_heads % world or kv_heads % world:
        return 1
    slots, kv_slots = q_heads // world, kv_heads // world
    c = requested if requested is not None else DEFAULT_HEAD_CHUNKS
    c = max(1, int(c))
    while c > 1:
        big = requested is not None or batch * seq_len * (slots // c) * head_dim >= MIN_CHUNK_ELEMENTS
        if slots % c == 0 and kv_slots % c == 0 and big:
            return c
        c -= 1
    return 1


def _pad_heads(x: torch.Tensor, counts: Sequence[int], slots: int) -> torch.Tensor:
    """[b, s, H, d] -> contiguous [b, s, P*slots, d]: rank p's heads, zero-padded to ``slots``."""
    if all(c == slots for c in counts):
        return x.contiguous()
    pieces, start = [], 0
    for c in counts:
        pieces.append(x[:, :, start : start + c])
        if slots > c:
            pieces.append(x.new_zeros(x.shape[0], x.shape[1], slots - c, x.shape[3]))
        start += c
    return torch.cat(pieces, dim=2)


def _unpad_heads(y: torch.Tensor, counts: Sequence[int], slots: int) -> torch.Tensor:
    if all(c == slots for c in counts):
        return y
    return torch.cat([y[:, :, p * slots : p * slots + c] for p, c in enumerate(counts)], dim=2)


def _send_chunk(x: torch.Tensor, world: int, slots: int, c: int, per: int) -> torch.Tensor:
    """Chunk ``c`` (``per`` heads) of every rank's heads of ``x`` [b, nl, P*slots, d] as the
    contiguous send buffer [P, b, nl, per, d] (one strided copy)."""
    b, nl, _, d = x.shape
    return x.view(b, nl, world, slots, d)[:, :, :, c * per : (c + 1) * per].permute(2, 0, 1, 3, 4).contiguous()


def _received_heads(recv: torch.Tensor, n: int, heads: int) -> torch.Tensor:
    """[P, b, nl, per, d] from all ranks -> my head shard [b, n, heads, d] (a view for b = 1)."""
    world, b, nl, per, d = recv.shape
    y = recv.permute(1, 0, 2, 3, 4).reshape(b, world * nl, per, d)[:, :n, :heads]
    return y if y.is_contiguous() else y.contiguous()


def _send_heads(y: torch.Tensor, world: int, nl: int, per: int) -> torch.Tensor:
    """My head shard [b, n, heads, d] -> send buffer [P, b, nl, per, d] (zero rows/heads of
    padding added only when needed; a view for b = 1 otherwise)."""
    b, n, heads, d = y.shape
    if n < world * nl or heads < per:
        y = F.pad(y, (0, 0, 0, per - heads, 0, world * nl - n))
    return y.view(b, world, nl, per, d).permute(1, 0, 2, 3, 4).contiguous()


def _place(dst: torch.Tensor, recv: torch.Tensor, slots: int, c: int, per: int) -> None:
    """Write chunk ``c`` received from every rank ([P, b, nl, per, d]) into ``dst`` [b, nl, P*slots, d]."""
    world = recv.shape[0]
    b, nl, _, d = dst.shape
    dst.view(b, nl, world, slots, d)[:, :, :, c * per : (c + 1) * per].copy_(recv.permute(1, 2, 0, 3, 4))


@dataclass(frozen=True)
class _Spec:
    group: Optional[dist.ProcessGroup]
    world: int
    n: int
    counts: tuple[int, ...]
    kv_counts: tuple[int, ...]
    slots: int
    kv_slots: int
    chunks: int
    heads: tuple[int, ...]  # real q heads of each chunk on this rank
    kv_heads: tuple[int, ...]
    plans: tuple  # per chunk: dilated_local plans
    opts: object  # dilated_local._Opts

    @property
    def per(self) -> int:
        return self.slots // self.chunks

    @property
    def kv_per(self) -> int:
        return self.kv_slots // self.chunks


class _Pipeline:
    """Outstanding all-to-alls; results are placed into their destination in issue order."""

    def __init__(self, spec: _Spec):
        self.spec = spec
        self.pending: list = []

    def send(self, dst: torch.Tensor, send: torch.Tensor, slots: int, c: int, per: int) -> None:
        recv, work = all_to_all_async(send, self.spec.group)
        self.pending.append((dst, recv, work, send, slots, c, per))

    def drain(self, keep: int = 0) -> None:
        while len(self.pending) > keep:
            dst, recv, work, _send, slots, c, per = self.pending.pop(0)
            work.wait()
            _place(dst, recv, slots, c, per)


def _start_in(spec: _Spec, tensors, c: int):
    """Start the all-to-alls bringing chunk ``c`` of ``tensors`` (q-like then kv-like) in."""
    started = []
    for x, kind in tensors:
        slots, per = (spec.slots, spec.per) if kind == "q" else (spec.kv_slots, spec.kv_per)
        send = _send_chunk(x, spec.world, slots, c, per)
        recv, work = all_to_all_async(send, spec.group)
        started.append((recv, work, send))
    return started


def _finish_in(spec: _Spec, started, kinds, c: int) -> list[torch.Tensor]:
    out = []
    for (recv, work, _send), kind in zip(started, kinds):
        work.wait()
        out.append(_received_heads(recv, spec.n, spec.heads[c] if kind == "q" else spec.kv_heads[c]))
    return out


class _HeadParallelFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spec: _Spec):
        b, nl, _, d = q.shape
        qp = _pad_heads(q, spec.counts, spec.slots)
        kp = _pad_heads(k, spec.kv_counts, spec.kv_slots)
        vp = _pad_heads(v, spec.kv_counts, spec.kv_slots)
        kinds = ("q", "kv", "kv")
        out_seq = torch.empty(b, nl, spec.world * spec.slots, d, dtype=q.dtype, device=q.device)
        pipe = _Pipeline(spec)
        saved = []
        started = _start_in(spec, zip((qp, kp, vp), kinds), 0)
        for c in range(spec.chunks):
            nxt = _start_in(spec, zip((qp, kp, vp), kinds), c + 1) if c + 1 < spec.chunks else None
            qh, kh, vh = _finish_in(spec, started, kinds, c)
            out_h, lse_h = DL._forward(qh, kh, vh, spec.plans[c], spec.opts)
            pipe.drain()  # the previous chunk's output (enqueued after this chunk's compute)
            pipe.send(out_seq, _send_heads(out_h, spec.world, nl, spec.per), spec.slots, c, spec.per)
            saved += [qh, kh, vh, out_h, lse_h]
            started = nxt
        pipe.drain()
        del qp, kp, vp
        ctx.save_for_backward(*saved)
        ctx.spec = spec
        return _unpad_heads(out_seq, spec.counts, spec.slots)

    @staticmethod
    def backward(ctx, dout):
        spec: _Spec = ctx.spec
        saved = ctx.saved_tensors
        b, nl, _, d = dout.shape
        dop = _pad_heads(dout, spec.counts, spec.slots)
        dq = torch.empty(b, nl, spec.world * spec.slots, d, dtype=dout.dtype, device=dout.device)
        dk = torch.empty(b, nl, spec.world * spec.kv_slots, d, dtype=dout.dtype, device=dout.device)
        dv = torch.empty_like(dk)
        pipe = _Pipeline(spec)
        started = _start_in(spec, [(dop, "q")], 0)
        for c in range(spec.chunks):
            nxt = _start_in(spec, [(dop, "q")], c + 1) if c + 1 < spec.chunks else None
            (do_h,) = _finish_in(spec, started, ("q",), c)
            qh, kh, vh, out_h, lse_h = saved[5 * c : 5 * c + 5]
            dq_h, dk_h, dv_h = DL._backward(do_h, qh, kh, vh, out_h, lse_h, spec.plans[c], spec.opts)
            pipe.drain()
            pipe.send(dq, _send_heads(dq_h, spec.world, nl, spec.per), spec.slots, c, spec.per)
            pipe.send(dk, _send_heads(dk_h, spec.world, nl, spec.kv_per), spec.kv_slots, c, spec.kv_per)
            pipe.send(dv, _send_heads(dv_h, spec.world, nl, spec.kv_per), spec.kv_slots, c, spec.kv_per)
            del dq_h, dk_h, dv_h, do_h
            started = nxt
        pipe.drain()
        return (
            _unpad_heads(dq, spec.counts, spec.slots),
            _unpad_heads(dk, spec.kv_counts, spec.kv_slots),
            _unpad_heads(dv, spec.kv_counts, spec.kv_slots),
            None,
        )


def head_parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    args: DilatedArgs,
    causal: bool,
    backend: str,
    group: Optional[dist.ProcessGroup],
    n: int,
    max_rows: Optional[int],
    max_view: Optional[int] = None,
    chunks: Optional[int] = None,
) -> torch.Tensor:
    """This rank's output shard [b, nl, H, d] of head-parallel dilated attention (checked
    inputs: equal shards on every rank, ``n`` real positions in all)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    b, nl, hq, d = q.shape
    hkv = k.shape[2]
    counts = balanced_head_counts(hq, world)
    kv_counts = balanced_head_counts(hkv, world)
    slots, kv_slots = ceil_div(hq, world), ceil_div(hkv, world)
    num_chunks = head_chunks(hq, hkv, world, b, n, d, chunks)
    per, kv_per = slots // num_chunks, kv_slots // num_chunks
    first = args.head_offset + sum(counts[:rank])
    heads, kv_heads, plans = [], [], []
    for c in range(num_chunks):
        h = min(per, counts[rank] - c * per)
        heads.append(h)
        kv_heads.append(min(kv_per, kv_counts[rank] - c * kv_per))
        chunk_args = DilatedArgs(
            args.segment_lengths, args.dilation_rates, args.softmax_scale, first + c * per, args.total_heads, args.kv_group
        )
        plans.append(DL.plan_all_branches(n, chunk_args, h, causal, q.device))
    opts = DL.make_opts(args, causal, backend, max_rows, max_view)
    spec = _Spec(
        group, world, n, tuple(counts), tuple(kv_counts), slots, kv_slots, num_chunks,
        tuple(heads), tuple(kv_heads), tuple(plans), opts,
    )
    return _HeadParallelFunction.apply(q, k, v, spec)
