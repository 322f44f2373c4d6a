"""Pooled requests' K/V in static slots on the pool ranks, and the batched decode exchange over them.

The slot-serving engine (:mod:`megatron_fapool.inference.engine`) keeps every request in a
slot of a static cache (:class:`SlotKV`: per layer ``[slots + 1, capacity, kv_heads,
head_dim]``, the last slot a scratch slot for padding rows). A *pooled* request (its prompt
over the pool's threshold) is spread over ``members`` ranks: the base rank and its first
``members - 1`` pool ranks, each holding a part of its tokens in slot ``s``, the request's
slot on the base (every pool rank of a base has the base's slot count, so the base's slot
number names the request everywhere and the pool keeps no table of requests).

Placement is a closed form, so every member derives it on the device from four numbers per
row (position, prompt length, members, slot) and nothing else is exchanged:

* prefill: member ``j`` holds the ``j``-th contiguous, balanced range of the prompt
  (:func:`~megatron_fapool.attention.pool.decode.prefill_shards`);
* decode: the token at position ``p`` is stored by member ``p % members`` (the member that
  holds fewest of the request's tokens, lowest index first: the rule of
  :func:`~megatron_fapool.attention.pool.decode.next_owner`).

:func:`decode_rows` turns those numbers into each row's read length and write place on one
member; a row that member holds nothing of reads 0 keys (out 0, lse ``-inf``: it drops out
of the merge) and writes into the scratch slot. An unpooled row is the case ``members = 1``:
on the base it reads ``position + 1`` keys and writes at ``position``, as a plain slot step.

A decode step of a batch with pooled rows then costs, besides the base's own work:

* once per step, :meth:`PooledSlots.announce`: a header and one ``[B, 4]`` int64 broadcast
  (the rows' numbers, a view of the engine's persistent buffers: no host work per row);
* per layer, :meth:`PooledSlots.merge`: the batch's rotated q and new k, v in one broadcast,
  and each pool rank's ``[B, hq, d + 1]`` partials (out, lse) gathered to the base, merged
  there in member order.

Every shape depends on the batch bucket only (the whole bucket goes, rows of no pooled
request included), so the per-layer exchange can sit inside a captured CUDA graph where the
transport allows it (NCCL). The pool side runs eagerly: its handler reads the header on the
host, then queues every layer's collectives and kernels without another host read.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ...parallel.service import DTYPES, Header, ServiceMember, named_failure, nbytes
from ..kernels import merge_partials, slot_decode
from ..kernels.slots import DECODE_BACKENDS
from .decode import prefill_shards
from .zigzag import ZigzagPlan, base_forward, member_forward, zigzag_plan

__all__ = ["HANDLERS", "PooledSlots", "SlotKV", "decode_rows", "member_tokens", "store_rows"]

KV_SLOT_INIT = 9  # allocate (or replace) the pool rank's slot K/V
KV_SLOT_PREFILL = 10  # one layer of a pooled prompt: zigzag attention, each member keeping its range of the K/V
KV_SLOT_DECODE = 11  # one decode step (all layers) of a slot batch with pooled rows

#: Columns of the per-step row table: position of the new token, prompt length, members, slot.
POSITION, PROMPT, MEMBERS, SLOT = range(4)
#: The pool ranks' decode kernel choices; a decode header names one by its index (in ``call_id``).
SLOT_BACKENDS = ("auto",) + DECODE_BACKENDS


class SlotKV:
    """One rank's K/V of every layer in ``slots`` static slots of ``capacity`` tokens, plus a scratch slot."""

    def __init__(self, *, layers: int, slots: int, capacity: int, kv_heads: int, head_dim: int, dtype, device):
        if slots < 1 or capacity < 1 or layers < 1:
            raise ValueError(f"a slot cache needs layers, slots and capacity >= 1, got {layers}, {slots}, {capacity}")
        self.slots, self.capacity, self.layers = slots, capacity, layers
        self.kv_heads, self.head_dim = kv_heads, head_dim
        shape = (slots + 1, capacity, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.scratch = slots  # the padding rows' slot

    @staticmethod
    def bytes_per_slot(*, layers: int, capacity: int, kv_heads: int, head_dim: int, dtype) -> int:
        return 2 * layers * capacity * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def write_prefix(self, layer: int, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keys ``0..len(k)-1`` of ``slot`` in ``layer`` (a prefill's shard)."""
        self.k[layer][slot, : k.shape[0]] = k
        self.v[layer][slot, : v.shape[0]] = v


def _floor_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.div(a, b, rounding_mode="floor")


def member_tokens(member, prompt: torch.Tensor, members: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Tokens ``member`` holds of requests whose first ``total`` (``>= prompt``) tokens are stored, per row.

    ``prompt``, ``members``, ``total``: int64 tensors of one shape. The prefill part is the
    member's balanced range of the prompt; decode tokens ``p = prompt .. total-1`` go to
    ``p % members``. A member at or above ``members`` holds nothing.
    """
    j = member if torch.is_tensor(member) else torch.full_like(prompt, member)
    share = _floor_div(prompt, members) + (j < prompt.remainder(members)).long()
    decoded = _floor_div(total - 1 - j, members) - _floor_div(prompt - 1 - j, members)
    return torch.where(members > j, share + decoded, torch.zeros_like(prompt))


def decode_rows(member, table: torch.Tensor, scratch: int):
    """One member's view of a decode step from the row table ``[B, 4]`` (:data:`POSITION`, ...); ``member``:
    this rank's member index, the same for every row or one per row (``[B]``, a shared pool's ranks).

    Returns ``(read_slots [B] int64, lengths [B] int32, write_slots [B] int64, write_pos [B] int64)``:
    row ``i`` appends its new k, v at ``(write_slots[i], write_pos[i])`` (the scratch slot
    unless this member stores the row's new token), then attends keys ``[0, lengths[i])`` of
    ``read_slots[i]``. Device tensor arithmetic only (graph-capturable).
    """
    pos, prompt, members, slot = table.unbind(1)
    held = member_tokens(member, prompt, members, pos + 1)
    owner = (pos.remainder(members) == member) & (members > member)
    scratch_t = torch.full_like(slot, scratch)
    read = torch.where(held > 0, slot, scratch_t)
    write = torch.where(owner, slot, scratch_t)
    return read, held.int(), write, torch.where(owner, held - 1, torch.zeros_like(held))


def attend_rows(kv: SlotKV, layer: int, rows, q, k_new, v_new, scale: float, backend: str):
    """Append the rows' new k, v this member stores, then each row's ``(out, lse)`` over its keys here."""
    read, lengths, write, write_pos = rows
    kv.k[layer][write, write_pos] = k_new
    kv.v[layer][write, write_pos] = v_new
    return slot_decode(q, kv.k[layer], kv.v[layer], read, lengths, softmax_scale=scale, backend=backend)


def _pack(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """``[B, hq, d]`` out and ``[B, hq]`` lse -> one ``[B, hq, d + 1]`` fp32 message."""
    return torch.cat((out.float(), lse.float()[..., None]), dim=-1)


class PooledSlots:
    """A base rank's end of slot-layout pooled K/V: allocate on the pool, store prefills, exchange decode steps.

    ``client``: the base rank's :class:`~megatron_fapool.attention.pool.endpoints.PoolClient`.
    Every exchange runs over the group of the base and all its pool ranks (fixed shapes and
    one communicator whatever the rows' member counts).
    """

    def __init__(self, client, kv: SlotKV, *, dtype, backend: str = "auto"):
        if backend not in SLOT_BACKENDS:
            raise ValueError(f"the pool's slot decode backend must be one of {SLOT_BACKENDS}, got {backend!r}")
        if not client.pool_ranks:
            raise ValueError(f"base rank {client.rank} has no pool ranks")
        self.client = client
        self.kv = kv
        self.members = client.max_members
        self.dtype = dtype
        self.backend = backend
        self.device = kv.k[0].device
        self.group = client.group(self.members - 1)
        self._step = None  # (batch, heads, scale) of the announced step
        self._call(self._init)

    def _call(self, fn, *args):
        return named_failure(f"pooled slots of base rank {self.client.rank}", self.client.pool_ranks, fn, *args)

    def _init(self):
        kv = self.kv
        self.client.send_header(self.device, op=KV_SLOT_INIT, n=kv.capacity, batch=kv.slots, layer=kv.layers,
                                kv_heads=kv.kv_heads, head_dim=kv.head_dim, dtype=DTYPES.index(self.dtype),
                                members=self.members)

    def prefill_pass(self):
        """A pooled prompt's forward through every layer: one header for all its layers' prefill calls."""
        return self.client.forward_pass(self.kv.layers)

    def prefill(self, layer: int, slot: int, request: int, q, k, v, softmax_scale: float, members: int):
        """One layer of a pooled prompt ``[1, n, h, d]`` (RoPE applied): attention through the pool's first
        ``members - 1`` ranks (zigzag), each keeping its range of the K/V (sent with its attention's, once) in
        ``slot``; the base keeps its range in its own ``slot``. Returns the attention output."""
        if not 2 <= members <= self.members:
            raise ValueError(f"members must be in 2..{self.members}, got {members}")
        return self._call(self._prefill, layer, slot, q, k, v, softmax_scale, members)

    def _prefill(self, layer, slot, q, k, v, scale, members):
        client = self.client
        b, n, hq, d = q.shape
        plan, bounds = zigzag_plan(n, members, causal=True), prefill_shards(n, members)
        client.announce_call(q.device, op=KV_SLOT_PREFILL, call_id=client.open_call(save=False), layer=layer,
                             slot=slot, n=n, batch=b, heads=hq, kv_heads=k.shape[2], head_dim=d, members=members,
                             kv_chunk=client.kv_chunk, save=0,
                             **Header.encode(dtype=q.dtype, softmax_scale=scale, backend=client.backend))
        group = client.group(members - 1)
        out, _ = base_forward(client, plan, client.pool_ranks[: members - 1], q, k, v, group_of=lambda _: group,
                              causal=True, softmax_scale=scale, backend=client.backend, kv_chunk=client.kv_chunk,
                              kv_rows=[store_rows(plan, bounds, j) for j in range(1, members)])
        lo, hi = bounds[0]
        self.kv.write_prefix(layer, slot, k[0, lo:hi], v[0, lo:hi])
        client.stats.pooled_forward += 1
        return out

    def announce(self, table: torch.Tensor, *, heads: int, softmax_scale: float, ranks=None, slots=None) -> None:
        """Tell the pool a decode step of ``table``'s rows (``[B, 4]`` int64) comes, for every layer in order."""
        self._call(self._announce, table, heads, softmax_scale)

    def _announce(self, table, heads, scale):
        b = table.shape[0]
        self.client.send_header(self.device, op=KV_SLOT_DECODE, n=b, layer=self.kv.layers, heads=heads,
                                kv_heads=self.kv.kv_heads, head_dim=self.kv.head_dim, members=self.members,
                                call_id=SLOT_BACKENDS.index(self.backend),
                                **Header.encode(dtype=self.dtype, softmax_scale=scale, backend="auto"))
        dist.broadcast(table, src=self.client.rank, group=self.group)
        self.client.stats.bytes_sent += nbytes(table) * (self.members - 1)
        self._step = (b, heads, scale)

    def merge(self, layer: int, q, k_new, v_new, out, lse) -> torch.Tensor:
        """One layer's exchange: the rows' q ``[B, hq, d]``, new k, v ``[B, hk, d]`` to the pool, the pool's
        partials back, merged with this rank's ``(out, lse)`` -> ``[B, hq, d]`` in q's dtype."""
        return self._call(self._merge, layer, q, k_new, v_new, out, lse)

    def _merge(self, layer, q, k_new, v_new, out, lse):
        b, hq, d = q.shape
        qkv = torch.cat((q, k_new, v_new), dim=1).contiguous()
        dist.broadcast(qkv, src=self.client.rank, group=self.group)
        self.client.stats.bytes_sent += nbytes(qkv) * (self.members - 1)
        part = _pack(out, lse)
        parts = [torch.empty_like(part) for _ in range(self.members)]
        dist.gather(part, parts, dst=self.client.rank, group=self.group)
        self.client.stats.bytes_received += nbytes(part) * (self.members - 1)
        o, l = out[:, None], lse.float()[:, :, None]  # merge_partials' [b, s, h, d] / [b, h, s]
        for p in parts[1:]:  # member order: the same result on every run
            o, l = merge_partials(o, l, p[:, None, :, :d], p[:, :, d, None])
        return o[:, 0].to(q.dtype)


# -- pool side ---------------------------------------------------------------------

def serve_slot_init(server: ServiceMember, h: Header) -> None:
    server.slot_kv = None  # the old cache goes first (two at once may not fit)
    server.slot_kv = SlotKV(layers=h.layer, slots=h.batch, capacity=h.n, kv_heads=h.kv_heads, head_dim=h.head_dim,
                            dtype=h.torch_dtype, device=server.device)


def _slot_kv(server: ServiceMember) -> SlotKV:
    if server.slot_kv is None:
        raise RuntimeError(f"pool rank {server.rank}: a slot operation from rank {server.leader} before its"
                           " slot cache was allocated")
    return server.slot_kv


def store_rows(plan: ZigzagPlan, bounds, member: int) -> int:
    """K/V rows a pooled prefill sends member ``member``: the prefix its zigzag chunks see, extended to the end
    of the range it stores (``bounds[member]``, :func:`~.decode.prefill_shards`), so the K/V it keeps travels
    with the attention's, once."""
    return max(plan.kv_prefix(member), bounds[member][1])


def serve_slot_prefill(server: ServiceMember, h: Header) -> None:
    """Member ``server.member``'s zigzag chunks of one prefill layer, then its range of the K/V into ``h.slot``."""
    kv = _slot_kv(server)
    plan, bounds = zigzag_plan(h.n, h.members, causal=True), prefill_shards(h.n, h.members)
    me = server.member
    lo, hi = bounds[me]
    key, bufs, _, _ = member_forward(server, plan, me, server.leader, server.group_of(h.members), h,
                                     kv_rows=store_rows(plan, bounds, me))
    kv.write_prefix(h.layer, h.slot, bufs.k[lo:hi, 0], bufs.v[lo:hi, 0])  # batch 1: one prompt
    server.buffers.give(key, bufs)


def serve_slot_decode(server: ServiceMember, h: Header) -> None:
    """One decode step: the row table once, then every layer's exchange, queued without a host read."""
    kv = _slot_kv(server)
    group = server.group_of(h.members)
    table = torch.empty((h.n, 4), dtype=torch.int64, device=server.device)
    dist.broadcast(table, src=server.leader, group=group)
    server.stats.bytes_received += nbytes(table)
    rows = decode_rows(server.member, table, kv.scratch)
    hq, hk = h.heads, h.kv_heads
    for layer in range(h.layer):
        qkv = torch.empty((h.n, hq + 2 * hk, h.head_dim), dtype=h.torch_dtype, device=server.device)
        dist.broadcast(qkv, src=server.leader, group=group)
        server.stats.bytes_received += nbytes(qkv)
        out, lse = attend_rows(kv, layer, rows, qkv[:, :hq], qkv[:, hq: hq + hk], qkv[:, hq + hk:],
                               h.softmax_scale, SLOT_BACKENDS[h.call_id])
        part = _pack(out, lse)
        dist.gather(part, None, dst=server.leader, group=group)
        server.stats.bytes_sent += nbytes(part)
        server.stats.served_forward += 1
        server.stats.query_rows += h.n


HANDLERS = {KV_SLOT_INIT: serve_slot_init, KV_SLOT_PREFILL: serve_slot_prefill, KV_SLOT_DECODE: serve_slot_decode}
