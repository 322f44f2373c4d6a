"""A shared pool in serving: any base rank's requests on any pool ranks, replicas stepping independently.

Serving replicas do not step together (no replica may wait for another's long prefill), so the
per-step agreement of training (:mod:`.sharing`) does not fit. Instead every exchange between a
base rank and a pool rank is *pairwise* and *one-shot*: the base puts a header into the pool
rank's *mailbox* and posts its data, then waits for the reply; a pool rank takes headers from its
mailbox in arrival order, receives that op's data from that base rank alone over their pair group,
computes, replies, and takes the next header. No op of a pool rank waits for anything but data its
base rank has already posted, and no pool rank waits for another, so replicas sharing pool ranks
cannot deadlock however their steps interleave; a decode step is one op per layer (a step-long op
would wait for its base's next layer while that base waits for another pool rank).

A mailbox (:class:`Mailboxes`) lives in the job's rendezvous store: a base rank takes the next
index of a pool rank's queue (one atomic ``add``) and writes its header there; the pool rank reads
index after index. That needs nothing of the communication backend (NCCL has no receive from any
source), and the header is host bytes on both sides (no device read). Data moves through
:mod:`~...parallel.transport` over the pair groups ``(base, pool rank)`` created at start-up (the
shared layout's blocks of one rank).

Ops (:data:`INIT` ... ): allocate the pool rank's :class:`~.slot_kv.SlotKV` (``pool_slots`` slots
of the engines' capacity, shared by every base rank); admit / release a long request on the
*coordinator* (the first pool rank: a :class:`~.shared.SharedPoolManager` in serving mode holds
every pool rank's K/V accounting, one slot per request and TP rank of its replica on each of its pool
ranks); one member's zigzag chunks of a pooled prefill layer's attention, with the K/V rows the
member stores sent along (once: the prefix its chunks see, extended to the end of its store range); one layer
of a decode step over the rows this pool rank holds. A prefill's chunks go straight between the base's rows
and the pool rank's buffers (the zigzag module's two sides). A request's placement is ``[(pool rank, slot)]``;
member ``j >= 1`` of it is its ``j``-th pool rank (the base is member 0), so the slot layout's
closed-form placement (:func:`~.slot_kv.decode_rows`) applies with a per-row member index.
"""

from __future__ import annotations

import struct
import time
from contextlib import nullcontext
from dataclasses import astuple

import torch
import torch.distributed as dist

from ...parallel.service import DTYPES, SHUTDOWN, Header, named_failure
from ...parallel.transport import BufferPool, P2PTransport
from ..kernels import BackendSelector, merge_partials
from .decode import prefill_shards
from .shared import PoolDemand, SharedPoolManager
from .slot_kv import SLOT_BACKENDS, SlotKV, _pack, attend_rows, decode_rows, store_rows
from .zigzag import base_forward, member_forward, zigzag_plan

__all__ = ["MailboxClient", "MailboxServer", "PoolFull"]

INIT, ADMIT, RELEASE, PREFILL, DECODE = 21, 22, 23, 25, 26
_HEADER_LEN = len(astuple(Header(op=0)))
#: Row table columns of a decode op: position, prompt length, members, slot on this rank, member index.
TABLE_COLUMNS = 5


class PoolFull(RuntimeError):
    """A long request that can never get pool ranks (the coordinator's message)."""


def _pair(groups, base: int, pool_rank: int):
    return groups.group_of_members((base, pool_rank))


def _own_connection(store):
    """A connection of this rank's own to the job's TCP store: a pool rank's blocking read must not hold the
    connection that other threads of the rank (the liveness monitor's heartbeats) write through."""
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    if not isinstance(store, dist.TCPStore):
        raise RuntimeError(f"a shared serving pool needs a TCP rendezvous store (env:// or tcp://), got {type(store).__name__}")
    return dist.TCPStore(store.host, store.port, is_master=False, timeout=store.timeout,
                         use_libuv=store.libuvBackend)


class Mailboxes:
    """Every pool rank's queue of headers in the job's store (key prefix :attr:`PREFIX`).

    :meth:`post` appends (any base rank, any time); :meth:`take` reads a pool rank's ``i``-th header,
    waiting for it as long as the store's timeout (the job's ``--distributed-timeout-minutes``, as a
    collective would), and deletes it once read.
    """

    PREFIX = "fapool/mailbox"

    def __init__(self, store=None):
        self.store = store if store is not None else _own_connection(dist.distributed_c10d._get_default_store())

    def _key(self, pool_rank: int, what) -> str:
        return f"{self.PREFIX}/{pool_rank}/{what}"

    def post(self, pool_rank: int, sender: int, header: Header) -> None:
        i = self.store.add(self._key(pool_rank, "count"), 1) - 1
        self.store.set(self._key(pool_rank, i), struct.pack(f"<{1 + _HEADER_LEN}q", sender, *astuple(header)))

    def take(self, pool_rank: int, i: int) -> tuple[int, Header]:
        key = self._key(pool_rank, i)
        sender, *fields = struct.unpack(f"<{1 + _HEADER_LEN}q", self.store.get(key))  # blocks until posted
        self.store.delete_key(key)
        return sender, Header(*fields)


class MailboxClient:
    """A base rank's end of the shared serving pool: requests' placements, prefills, decode layers.

    A replica of TP ranks places a request once: its first TP rank asks the coordinator for one slot per TP
    rank on each pool rank and tells the others (``tp_group``); TP rank ``t`` then uses the ``t``-th slot
    everywhere, with its own heads' K/V (``kv_heads`` is this rank's share)."""

    def __init__(self, groups, *, device, stats, threshold: int, kv_heads: int, head_dim: int, dtype,
                 max_active: int | None = None, backend: str = "auto", tp_group=None):
        layout = groups.layout
        self.groups, self.rank, self.device, self.stats = groups, groups.rank, torch.device(device), stats
        self.tp_group = tp_group
        self.tp = 1 if tp_group is None else dist.get_world_size(tp_group)
        self.tp_rank = 0 if tp_group is None else dist.get_rank(tp_group)
        self.tp_first = self.rank if tp_group is None else dist.get_process_group_ranks(tp_group)[0]
        self.pool = tuple(range(layout.num_base, layout.num_base + layout.pool_size))
        self.coordinator = self.pool[0]
        self.members = min(max_active or len(self.pool), len(self.pool)) + 1  # the most ranks a request spans
        self.threshold, self.kv_heads, self.head_dim, self.dtype = threshold, kv_heads, head_dim, dtype
        self.backend = SLOT_BACKENDS.index(backend if backend in SLOT_BACKENDS else "auto")
        self.capacity, self.cache = 0, None
        self.placement: dict[int, list[tuple[int, int]]] = {}  # request -> [(pool rank, slot there)]
        self._step: dict[int, torch.Tensor] = {}  # pool rank -> its row table of the announced decode step
        self._scale = None
        self.transport = P2PTransport(stats)
        self.selector = BackendSelector()  # "auto" and its run-time fallbacks, for this rank's own chunks
        self.mailboxes = Mailboxes()

    # -- transport -----------------------------------------------------------------------
    def _pair(self, pool_rank: int):
        return _pair(self.groups, self.rank, pool_rank)

    def _post_headers(self, headers: dict[int, Header]) -> None:
        """Each pool rank's header into its mailbox."""
        for p, h in headers.items():
            self.mailboxes.post(p, self.rank, h)

    def _exchange(self, what: str, sends: dict[int, tuple[Header, list]], replies: dict[int, torch.Tensor]):
        """Post every header and data tensor to each pool rank at once, then receive each reply into
        ``replies[p]``; blame the pool ranks involved if a link breaks."""
        def run():
            self._post_headers({p: header for p, (header, _) in sends.items()})
            posted = [self.transport.post([(p, x.contiguous()) for x in tensors], [], self._pair(p))
                      for p, (_, tensors) in sends.items()]
            posted += [self.transport.post([], [(p, buf)], self._pair(p)) for p, buf in replies.items()]
            for w in posted:
                w.wait()
        named_failure(f"{what} of base rank {self.rank}", sorted(sends), run)

    # -- lifecycle -----------------------------------------------------------------------
    def init(self, cache: SlotKV, *, pool_slots: int) -> None:
        """Serve from ``cache`` (this base rank's slots); every pool rank allocates its shared slot cache of
        ``pool_slots`` slots of the same capacity (kept if another base rank asked for the same one)."""
        self.cache, self.capacity = cache, cache.capacity
        h = Header(op=INIT, n=cache.capacity, batch=pool_slots, layer=cache.layers, kv_heads=self.kv_heads,
                   head_dim=self.head_dim, dtype=DTYPES.index(self.dtype))
        self._exchange("pool init", {p: (h, []) for p in self.pool}, {})

    def shutdown(self, device=None) -> None:
        self._exchange("pool shutdown", {p: (Header(op=SHUTDOWN), []) for p in self.pool}, {})

    def admit(self, request: int, tokens: int, prompt_len: int) -> list[tuple[int, int]] | None:
        """Pool ranks and this TP rank's slots for a long request (``None``: wait, none free now); :class:`PoolFull`
        if never. Every TP rank of the replica calls it in the same order and gets the same answer."""
        need = -(-tokens // self.capacity)  # ranks its tokens need, the base included
        reply = torch.zeros(1 + (1 + self.tp) * len(self.pool), dtype=torch.int64, device=self.device)
        if self.rank == self.tp_first:
            h = Header(op=ADMIT, call_id=request, n=tokens, batch=max(prompt_len, self.threshold + 1), members=need,
                       slot=self.tp)
            self._exchange("pool admission", {self.coordinator: (h, [])}, {self.coordinator: reply})
        if self.tp > 1:
            dist.broadcast(reply, src=self.tp_first, group=self.tp_group)
        values = reply.tolist()
        if values[0] < 0:
            raise PoolFull(f"request {request}: {tokens} tokens need {need} ranks of {self.capacity}-token slots but"
                           f" the shared pool gives a request at most {-values[0]} ranks")
        if values[0] == 0:
            return None
        row = 1 + self.tp  # (pool rank, its slot for TP rank 0, 1, ...)
        placement = [(values[1 + row * j], values[2 + row * j + self.tp_rank]) for j in range(values[0])]
        self.placement[request] = placement
        return placement

    def release(self, request: int) -> None:
        if self.placement.pop(request, None) is not None and self.rank == self.tp_first:
            h = Header(op=RELEASE, call_id=request)
            self._exchange("pool release", {self.coordinator: (h, [])}, {})

    # -- prefill -------------------------------------------------------------------------
    def prefill_pass(self):
        """No pass here: a pool rank may serve another base rank between two layers of a prompt, so every layer's
        prefill op carries its header (pairwise, one integer tensor per pool rank)."""
        return nullcontext()

    def prefill(self, layer: int, slot: int, request: int, q, k, v, softmax_scale: float, members: int):
        """One layer of a pooled prompt ``[1, n, h, d]`` (RoPE applied): zigzag attention over the base and the
        request's pool ranks (every member at once), each member storing its range of the K/V sent with it (the
        base's into ``slot`` of its own cache). Returns the attention output."""
        placement = self.placement[request]
        peers = [p for p, _ in placement]
        b, n, hq, d = q.shape
        plan, bounds = zigzag_plan(n, len(peers) + 1, causal=True), prefill_shards(n, len(peers) + 1)
        fields = dict(op=PREFILL, n=n, members=plan.members, batch=b, heads=hq, kv_heads=k.shape[2], head_dim=d,
                      layer=layer, kv_chunk=n, save=0,
                      **Header.encode(dtype=q.dtype, softmax_scale=softmax_scale, backend="auto"))

        def run():
            self._post_headers({p: Header(slot=pool_slot, member=j, **fields)
                                for j, (p, pool_slot) in enumerate(placement, start=1)})
            out, _ = base_forward(  # the base's own chunks while the pool ranks compute theirs
                self, plan, peers, q, k, v, group_of=self._pair, causal=True, softmax_scale=softmax_scale,
                backend="auto", kv_chunk=n, kv_rows=[store_rows(plan, bounds, j) for j in range(1, plan.members)])
            return out

        out = named_failure(f"pooled prefill of base rank {self.rank}", peers, run)
        lo, hi = bounds[0]
        self.cache.write_prefix(layer, slot, k[0, lo:hi], v[0, lo:hi])
        self.stats.pooled_forward += 1
        return out

    # -- decode --------------------------------------------------------------------------
    def announce(self, table: torch.Tensor, *, heads: int, softmax_scale: float, ranks=None, slots=None) -> None:
        """A decode step of ``table``'s rows (``[B, 4]``, :mod:`.slot_kv`'s columns): each pool rank holding
        some row gets its own table (its slot and member index per row) for every layer of the step."""
        self._scale = softmax_scale
        self._step = {}
        scratch = -1  # a row this pool rank holds nothing of: it reads its own scratch slot
        for p in sorted({p for placement in self.placement.values() for p, _ in placement}):
            mask = ranks == p  # [B, pool ranks per row]
            has = mask.any(1)
            member = torch.where(has, mask.int().argmax(1) + 1, torch.full_like(has, self.members, dtype=torch.int))
            slot = torch.where(has, (slots * mask.long()).sum(1), torch.full_like(table[:, 0], scratch))
            self._step[p] = torch.stack((table[:, 0], table[:, 1], table[:, 2], slot, member.long()), dim=1)

    def merge(self, layer: int, q, k_new, v_new, out, lse) -> torch.Tensor:
        """One layer: the rows' q and new k, v to each pool rank of the step, their partials merged with this
        rank's ``(out, lse)`` in pool-rank order."""
        b, hq, d = q.shape
        qkv = torch.cat((q, k_new, v_new), dim=1)
        h = Header(op=DECODE, n=b, layer=layer, heads=hq, kv_heads=k_new.shape[1], head_dim=d, call_id=self.backend,
                   **Header.encode(dtype=q.dtype, softmax_scale=self._scale, backend="auto"))
        parts = {p: torch.empty((b, hq, d + 1), dtype=torch.float32, device=q.device) for p in self._step}
        self._exchange("pooled decode", {p: (h, [t, qkv]) for p, t in self._step.items()}, parts)
        o, l = out[:, None], lse.float()[:, :, None]
        for p in sorted(parts):
            part = parts[p]
            o, l = merge_partials(o, l, part[:, None, :, :d], part[:, :, d, None])
        return o[:, 0].to(q.dtype)


# -- pool side -----------------------------------------------------------------------------

class MailboxServer:
    """A shared pool rank in serving: takes any base rank's ops in arrival order until every base rank is done."""

    def __init__(self, groups, *, device, stats, pool_cfg=None):
        layout = groups.layout
        self.groups, self.rank, self.device, self.stats = groups, groups.rank, torch.device(device), stats
        self.bases = tuple(range(layout.num_base))
        self.is_coordinator = groups.rank == layout.num_base
        self.pool_cfg = pool_cfg
        self.kv: SlotKV | None = None
        self._kv_shape = None  # what the last INIT asked for
        self.manager: SharedPoolManager | None = None  # the coordinator's ledger
        self.free: dict[int, list[int]] = {}  # coordinator: pool rank -> free slots (lowest last)
        self.slots_of: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (base, request) -> placement
        self.transport = P2PTransport(stats)
        self.buffers = BufferPool()  # persistent prefill receive buffers
        self.selector = BackendSelector()
        self.mailboxes = Mailboxes()

    def serve(self):
        return named_failure(f"shared pool rank {self.rank}", self.bases, self._serve)

    def _serve(self):
        live = set(self.bases)
        taken = 0
        while live:
            base, h = self.mailboxes.take(self.rank, taken)
            taken += 1
            if h.op == SHUTDOWN:
                live.discard(base)
                continue
            handler = {INIT: self._init, ADMIT: self._admit, RELEASE: self._release, PREFILL: self._prefill,
                       DECODE: self._decode}.get(h.op)
            if handler is None:
                raise RuntimeError(f"shared pool rank {self.rank}: unknown op {h.op} from rank {base}")
            t0 = time.perf_counter()
            handler(base, h, _pair(self.groups, base, self.rank))
            self.stats.busy_s += time.perf_counter() - t0
        return self.stats

    def _recv(self, shape, dtype, src, group) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=self.device)
        self.transport.post([], [(src, t)], group).wait()
        return t

    def _reply(self, t, dst, group) -> None:
        self.transport.post([(dst, t.contiguous())], [], group).wait()

    def _init(self, base, h, group):
        shape = (h.layer, h.batch, h.n, h.kv_heads, h.head_dim, h.dtype)
        if self._kv_shape != shape:
            self.kv = None  # the old cache goes first
            self.kv = SlotKV(layers=h.layer, slots=h.batch, capacity=h.n, kv_heads=h.kv_heads, head_dim=h.head_dim,
                             dtype=h.torch_dtype, device=self.device)
            self._kv_shape = shape
        if self.is_coordinator and self.manager is None:
            layout = self.groups.layout
            self.manager = SharedPoolManager(layout.pool_size, threshold=0, max_per_demand=self.pool_cfg.max_active,
                                             kv_capacity_tokens=h.batch * h.n)  # the base asks for long ones only
            self.capacity = h.n
            self.free = {layout.num_base + i: list(range(h.batch - 1, -1, -1)) for i in range(layout.pool_size)}

    def _admit(self, base, h, group):
        """``h.slot`` slots (one per TP rank of the replica) on each of the request's pool ranks, charged as
        ``capacity`` K/V tokens each there."""
        tp = h.slot
        reply = torch.zeros(1 + (1 + tp) * len(self.free), dtype=torch.int64, device=self.device)
        size = self.manager.max_per_demand  # pool ranks per long request (no cost model in serving yet)
        if h.members - 1 > size:
            reply[0] = -size  # it can never fit
        else:
            demand = PoolDemand(replica=base, key=h.call_id, tokens=h.batch, kv_tokens=self.capacity * size * tp)
            ranks = self.manager.admit(demand)  # None: wait (the ledger's K/V room covers the slots)
            if ranks:
                first = self.groups.layout.num_base  # the manager counts pool ranks from 0
                placement = [(first + r, [self.free[first + r].pop() for _ in range(tp)]) for r in ranks]
                self.slots_of[(base, h.call_id)] = placement
                reply[0] = len(placement)
                for j, (p, slots) in enumerate(placement):
                    reply[1 + (1 + tp) * j] = p
                    reply[2 + (1 + tp) * j: 2 + (1 + tp) * j + tp] = torch.tensor(slots)
        self._reply(reply, base, group)

    def _release(self, base, h, group):
        for p, slots in self.slots_of.pop((base, h.call_id)):
            self.free[p] += slots
            self.free[p].sort(reverse=True)
        self.manager.release(base, h.call_id)

    def _prefill(self, base, h, group):
        """Member ``h.member``'s zigzag chunks of one prefill layer, then its range of the K/V it was sent into
        slot ``h.slot``."""
        plan = zigzag_plan(h.n, h.members, causal=True)
        lo, hi = prefill_shards(h.n, h.members)[h.member]
        key, bufs, _, _ = member_forward(self, plan, h.member, base, group, h,
                                         kv_rows=store_rows(plan, prefill_shards(h.n, h.members), h.member))
        self.kv.write_prefix(h.layer, h.slot, bufs.k[lo:hi, 0], bufs.v[lo:hi, 0])  # batch 1: one prompt
        self.buffers.give(key, bufs)

    def _decode(self, base, h, group):
        table = self._recv((h.n, TABLE_COLUMNS), torch.int64, base, group)
        qkv = self._recv((h.n, h.heads + 2 * h.kv_heads, h.head_dim), h.torch_dtype, base, group)
        table[:, 3] = torch.where(table[:, 3] < 0, self.kv.scratch, table[:, 3])
        rows = decode_rows(table[:, 4], table[:, :4], self.kv.scratch)
        hq, hk = h.heads, h.kv_heads
        layer = h.layer
        out, lse = attend_rows(self.kv, layer, rows, qkv[:, :hq], qkv[:, hq: hq + hk], qkv[:, hq + hk:],
                               h.softmax_scale, SLOT_BACKENDS[h.call_id])
        self._reply(_pack(out, lse), base, group)
        self.stats.served_forward += 1
        self.stats.query_rows += h.n
