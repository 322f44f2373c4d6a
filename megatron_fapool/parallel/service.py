"""The serving transport: a leader rank sends work to serving ranks that hold no model.

Pool ranks (the attention pool) and, later, expert ranks (MA separation) run the same
loop: wait for a :class:`Header` from their leader (a base rank), look its ``op`` up in
a handler table, let the handler run the collectives of that operation, repeat until
``SHUTDOWN``. This module knows no algorithm: each algorithm module defines its op codes
and member-side handlers, and whoever builds a :class:`ServiceMember` passes the table
in. It also holds what both sides share: the header, the per-call state life cycle
(call ids, ``drop_before``), byte counters, and errors that name the lost peer.

A leader may announce a *pass* instead (:meth:`ServiceClient.plan_pass`): one header for a
run of calls of one op with the same shapes over consecutive layers (a micro-batch's forward
through its pooled layers, then their backward in reverse); the serving ranks then run the
pass's calls without reading another header, and the leader checks that each call it makes is
the one it announced (:class:`PassBroken` otherwise, before anything of that call is sent).
Data moves through :mod:`.transport`.

All process groups exist already (made at start-up by :mod:`.groups`); a call only
picks one of them.
"""

from __future__ import annotations

import struct
import weakref
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import astuple, dataclass, replace

import torch
import torch.distributed as dist

from ..config.schema import ATTENTION_BACKENDS
from .transport import BufferPool, P2PTransport

__all__ = [
    "DTYPES",
    "Header",
    "PassBroken",
    "PeerLost",
    "SHUTDOWN",
    "ServiceClient",
    "ServiceMember",
    "TransferStats",
    "int64_tensor",
    "merge_handlers",
    "named_failure",
    "nbytes",
]

#: The op that ends a serving loop; algorithms number theirs from 1 and must not reuse 3.
SHUTDOWN = 3

#: Wire encoding of dtypes (index into this tuple).
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class PeerLost(RuntimeError):
    """A collective with a serving peer failed: the peer process died or the link broke."""


def named_failure(what: str, peers, fn, *args, **kwargs):
    """Run ``fn``; turn a communication failure into a :class:`PeerLost` naming the peer ranks."""
    try:
        return fn(*args, **kwargs)
    except PeerLost:
        raise
    except (RuntimeError, ConnectionError) as e:  # torch's DistBackendError is a RuntimeError
        raise PeerLost(f"{what}: lost contact with rank(s) {list(peers)}: {str(e).splitlines()[0]}") from e


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def int64_tensor(values, device) -> torch.Tensor:
    """Host integers as an int64 tensor on ``device``, without blocking the host.

    On CUDA the copy is pinned and non-blocking: a pageable copy would wait until the
    GPU has finished all queued work, serialising every call.
    """
    t = torch.tensor(list(values), dtype=torch.int64)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


@dataclass
class TransferStats:
    """Bytes this rank moved for the service (both sides)."""

    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass(frozen=True)
class Header:
    """The control message a leader broadcasts before each operation: one small int64 tensor.

    Every serving rank learns from it whether it takes part (``members``: leader + active
    serving ranks) and with which shapes, before any data moves. ``extra`` counts the int64
    entries of an operation's parameter tensor that follows, if any.
    """

    op: int
    call_id: int = 0
    drop_before: int = 0  # serving ranks may free the saved state of calls with smaller ids
    n: int = 0
    batch: int = 0
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    dtype: int = 0
    causal: int = 1
    members: int = 0
    kv_chunk: int = 0
    save: int = 1  # keep state for a backward
    scale_bits: int = 0
    backend: int = 0
    extra: int = 0
    layer: int = 0
    member: int = 0  # the receiving rank's member index, where a header goes to one rank (the shared serving pool)
    slot: int = 0  # a K/V slot on the receiving ranks (serving)
    calls: int = 0  # > 1: a pass of this many calls of the same op follows this one header
    call_step: int = 1  # call ids and layers in a pass: call_id, call_id + call_step, ... (layer likewise)

    @property
    def softmax_scale(self) -> float:
        return struct.unpack("<d", struct.pack("<q", self.scale_bits))[0]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def backend_name(self) -> str:
        return ATTENTION_BACKENDS[self.backend]

    @staticmethod
    def scale_to_bits(scale: float) -> int:
        return struct.unpack("<q", struct.pack("<d", float(scale)))[0]

    @staticmethod
    def encode(*, dtype: torch.dtype, softmax_scale: float, backend: str) -> dict:
        """The header fields of a dtype, a softmax scale and a kernel backend name."""
        return dict(dtype=DTYPES.index(dtype), scale_bits=Header.scale_to_bits(softmax_scale),
                    backend=ATTENTION_BACKENDS.index(backend))

    def to_tensor(self, device) -> torch.Tensor:
        return int64_tensor(astuple(self), device)

    @classmethod
    def empty(cls, device) -> torch.Tensor:
        return torch.zeros(len(astuple(cls(op=0))), dtype=torch.int64, device=device)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "Header":
        return cls(*[int(x) for x in t.tolist()])


class _CallToken:
    """Lives exactly as long as the autograd context of one call."""


class PassBroken(RuntimeError):
    """The calls a base rank made differ from the pass it announced (its pool ranks wait for the announced ones)."""


@dataclass
class _Pass:
    """An announced run of calls of one op with the same fields: the pool serves them without headers."""

    op: int
    fields: dict
    ids: list[int]  # call ids, in the order they are served
    forward: bool
    layer: int | None = None  # the first call's layer, if the op names one: call i is layer + i * step
    done: int = 0

    @property
    def step(self) -> int:
        return 1 if self.forward else -1

    def expected_layer(self) -> int | None:
        return None if self.layer is None else self.layer + self.done * self.step


class ServiceClient:
    """The leader's end: headers to its serving ranks, and the ids of calls whose state they keep."""

    def __init__(self, *, rank: int, peers, control_group, stats: TransferStats):
        self.rank = rank
        self.peers = tuple(peers)
        self.control_group = control_group
        self.stats = stats
        self._next_id = 1
        self._live: set[int] = set()
        self.transport = P2PTransport(stats)
        self.buffers = BufferPool()
        self._planned = 0  # calls of the next forward pass (0 or 1: a header per call)
        self._pass: _Pass | None = None  # the pass in progress
        self._backward_due: list[int] = []  # call ids of the last forward pass that saved state
        self.headers = 0  # headers sent (one per call outside passes, one per pass inside)

    def send_header(self, device, **fields) -> None:
        """Broadcast a header to every serving rank; it always carries ``drop_before``."""
        if self._pass is not None:
            raise PassBroken(f"rank {self.rank}: a header (op {fields.get('op')}) inside {self._describe(self._pass)}")
        t = Header(drop_before=self._drop_before(), **fields).to_tensor(device)
        dist.broadcast(t, src=self.rank, group=self.control_group)
        self.stats.bytes_sent += nbytes(t)
        self.headers += 1

    # -- passes: one header for a micro-batch's forward calls, one for their backward ------------
    def plan_pass(self, calls: int) -> None:
        """The next forward call opens a pass of ``calls`` calls (a micro-batch's pooled layers): one header
        for all of them, and one for their backward calls (in reverse order) if they save state."""
        if self._pass is not None:
            raise PassBroken(f"rank {self.rank}: a new pass was planned while {self._describe(self._pass)} is open")
        self._planned = calls

    @contextmanager
    def forward_pass(self, calls: int):
        """:meth:`plan_pass` of ``calls`` calls around a forward, :meth:`end_forward_pass` after it."""
        self.plan_pass(calls)
        yield
        self.end_forward_pass()

    def end_forward_pass(self) -> None:
        """The micro-batch's forward is done: an open forward pass must have had all its calls."""
        self._planned = 0
        if self._pass is not None and self._pass.forward:
            raise PassBroken(f"rank {self.rank}: {self._describe(self._pass)} ended after {self._pass.done} calls;"
                             " every pooled layer of a micro-batch must take the same path")

    def announce_call(self, device, *, op: int, call_id: int, backward: bool = False, **fields) -> None:
        """Tell the serving ranks about call ``call_id``: a header of its own, the header of a pass it opens,
        or nothing if it is the next call of the pass in progress (checked against what was announced)."""
        layer = fields.pop("layer", None)  # a pass's calls are consecutive layers
        p = self._pass
        if p is not None:
            if p.op != op or p.fields != fields or p.ids[p.done] != call_id or layer != p.expected_layer():
                raise PassBroken(f"rank {self.rank}: call {call_id} (op {op}, layer {layer}, {fields}) breaks"
                                 f" {self._describe(p)} at call {p.done + 1}, which expects call {p.ids[p.done]}")
            p.done += 1
            if p.done == len(p.ids):
                self._pass = None
            return
        if not backward and self._planned > 1:
            ids = list(range(call_id, call_id + self._planned))
            self._open(device, _Pass(op, fields, ids, forward=True, layer=layer))
            self._backward_due = ids if fields.get("save") else []
            self._planned = 0
            return
        if backward and self._backward_due and call_id == self._backward_due[-1]:
            self._open(device, _Pass(op, fields, self._backward_due[::-1], forward=False, layer=layer))
            self._backward_due = []
            return
        self.send_header(device, op=op, call_id=call_id, **fields, **({} if layer is None else {"layer": layer}))

    def _open(self, device, p: _Pass) -> None:
        self.send_header(device, op=p.op, call_id=p.ids[0], calls=len(p.ids), call_step=p.step, layer=p.layer or 0,
                         **p.fields)
        p.done = 1
        self._pass = p

    @staticmethod
    def _describe(p: _Pass) -> str:
        return f"the pass of {len(p.ids)} calls of op {p.op} (calls {p.ids[0]}..{p.ids[-1]})"

    def _drop_before(self) -> int:
        return min(self._live) if self._live else self._next_id

    def open_call(self, save: bool) -> int:
        """A new call id; with ``save``, the serving ranks keep the call's state until it is closed."""
        call_id = self._next_id
        self._next_id += 1
        if save:
            self._live.add(call_id)
        return call_id

    def close_call(self, call_id: int) -> None:
        """The call's state may be freed (told with the next header)."""
        self._live.discard(call_id)

    def close_when_dropped(self, ctx, call_id: int) -> None:
        """Close ``call_id`` when ``ctx`` (an autograd context) is dropped, even without a backward."""
        ctx.call_token = _CallToken()
        weakref.finalize(ctx.call_token, self.close_call, call_id)

    def shutdown(self, device) -> None:
        """End every serving rank's loop."""
        if self.control_group is not None:
            self.send_header(device, op=SHUTDOWN)


#: A member-side handler: runs one operation's collectives on a serving rank.
Handler = Callable[["ServiceMember", Header], None]


def merge_handlers(*tables: dict[int, Handler]) -> dict[int, Handler]:
    """One handler table from several algorithms' tables; op codes must be distinct."""
    merged: dict[int, Handler] = {}
    for table in tables:
        clash = (set(table) & set(merged)) | ({SHUTDOWN} & set(table))
        if clash:
            raise ValueError(f"op code(s) {sorted(clash)} are used twice")
        merged.update(table)
    return merged


class ServiceMember:
    """A serving rank's end: the loop that runs its leader's operations.

    ``member`` is this rank's index inside any group it is active in (the leader is 0);
    ``group_of(members)`` gives the group of the leader and its first ``members - 1``
    serving ranks. Handlers keep per-call state in :attr:`saved` (freed by
    ``drop_before``). The header arrives by a broadcast from the one leader; a service
    with several leaders (MA separation's expert ranks) overrides :meth:`recv_header`.
    """

    def __init__(self, *, rank: int, leader: int, member: int, control_group, group_of, device,
                 stats: TransferStats, handlers: dict[int, Handler]):
        self.rank = rank
        self.leader = leader
        self.leaders = (leader,)  # the ranks a lost contact is blamed on
        self.member = member
        self.control_group = control_group
        self.group_of = group_of
        self.device = device
        self.stats = stats
        self.handlers = dict(handlers)
        self.saved: dict[int, object] = {}
        self.transport = P2PTransport(stats)
        self.buffers = BufferPool()  # the handlers' persistent receive buffers
        self.headers = 0  # headers received

    def recv_header(self) -> Header:
        """The next operation's header (blocks until the leader sends one)."""
        t = Header.empty(self.device)
        dist.broadcast(t, src=self.leader, group=self.control_group)
        self.stats.bytes_received += nbytes(t)
        self.headers += 1
        return Header.from_tensor(t)

    def serve(self):
        """Serve until the leader sends ``SHUTDOWN``; returns this rank's stats."""
        return named_failure(f"serving rank {self.rank}", self.leaders, self._serve)

    def _serve(self):
        while True:
            h = self.recv_header()
            if h.op == SHUTDOWN:
                self.saved.clear()
                return self.stats
            for cid in [c for c in self.saved if c < h.drop_before]:
                del self.saved[cid]
            if self.member >= h.members:
                continue  # not active for this call
            handler = self.handlers.get(h.op)
            if handler is None:
                raise RuntimeError(f"serving rank {self.rank}: unknown op {h.op} from rank {self.leader}")
            if h.calls <= 1:
                handler(self, h)
                continue
            for i in range(h.calls):  # an announced pass: its calls (consecutive layers) follow without headers
                step = i * h.call_step
                handler(self, replace(h, call_id=h.call_id + step, layer=h.layer + step, calls=0))

    def take_saved(self, call_id: int, kind: type, what: str):
        """The saved state of ``call_id`` (removed), which must be a ``kind``; a clear error otherwise."""
        s = self.saved.pop(call_id, None)
        if not isinstance(s, kind):
            raise RuntimeError(f"serving rank {self.rank}: {what} for call {call_id} from rank {self.leader}"
                               " without its forward state")
        return s
