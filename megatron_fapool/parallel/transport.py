"""How the pool's algorithms move tensors between a base rank and its pool ranks: one interface.

An algorithm describes a transfer as *posts*: a list of ``(peer, tensor)`` sends and a list of
``(peer, tensor)`` receives on one process group, where every receive lands in the tensor the
algorithm names (a row range of the base's output, a pool rank's persistent buffer), so no
packing or unpacking pass runs around a transfer. :meth:`Transport.post` starts the transfers
and returns a :class:`Posted` to wait on; nothing in it reads a device value on the host.

:class:`P2PTransport` is torch.distributed's point-to-point: NCCL runs one post as one grouped
launch on the group's own communicator (batched point-to-point uses the collective communicator,
so no communicator is created at run time), gloo sends each message. A copy-engine backend (CUDA
symmetric memory: peers' buffers mapped once, copies on a copy engine; the 2-GPU run issue) is
another class with the same :meth:`~Transport.post`; the algorithms do not change. How it maps
onto a post: every ordered pair of a group gets a staging region in the *receiver's* symmetric
allocation (sized for the largest post) and two epoch words (data ready, in the receiver's signal
pad; consumed, in the sender's). A send waits (``cuStreamWaitValue32``, GEQ) until the previous
epoch was consumed, ``copy_``s its messages back to back into the peer's region (contiguous:
``cudaMemcpyAsync``, a copy engine) and bumps the ready epoch (``stream_write_value32``); a receive
waits for that epoch, copies the region out into the tensors it names and bumps the consumed
epoch. Sizes and order are known to both sides, so no offsets travel. What the lent H200 VM
offers for this is measured in docs/benchmarks.md ("Copy-engine transport probe").

Messages between one pair of ranks in one direction are matched in the order they are posted,
so both sides list a call's tensors in the same order.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist

__all__ = ["BufferPool", "P2PTransport", "Posted", "Transport", "TransportCounters"]

Message = tuple[int, torch.Tensor]  # (global rank of the peer, tensor sent from / received into)


@dataclass
class Posted:
    """Transfers in flight; :meth:`wait` returns when they are done (on CUDA: ordered before later work)."""

    works: list = field(default_factory=list)

    def wait(self) -> None:
        for w in self.works:
            w.wait()
        self.works = []


@dataclass
class TransportCounters:
    """What a rank's transport did: posts (one launch each on NCCL) and messages (bytes go to ``stats``)."""

    posts: int = 0
    messages: int = 0


class Transport(Protocol):
    counters: TransportCounters

    def post(self, sends: Sequence[Message], recvs: Sequence[Message], group) -> Posted:
        """Start ``sends`` and ``recvs`` (every tensor contiguous) over ``group``; nothing blocks."""


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class P2PTransport:
    """torch.distributed point-to-point, batched per post (NCCL: one grouped launch; gloo: a message each).

    ``stats`` (anything with ``bytes_sent`` / ``bytes_received``, such as the pool's counters) is
    advanced with the bytes moved; :attr:`counters` counts posts and messages.
    """

    def __init__(self, stats=None):
        self.counters = TransportCounters()
        self.stats = stats

    def post(self, sends: Sequence[Message], recvs: Sequence[Message], group) -> Posted:
        ops = [dist.P2POp(dist.isend, _contiguous(t), peer, group) for peer, t in sends]
        ops += [dist.P2POp(dist.irecv, _contiguous(t), peer, group) for peer, t in recvs]
        if not ops:
            return Posted()
        self.counters.posts += 1
        self.counters.messages += len(ops)
        if self.stats is not None:
            self.stats.bytes_sent += sum(_nbytes(t) for _, t in sends)
            self.stats.bytes_received += sum(_nbytes(t) for _, t in recvs)
        return Posted(list(dist.batch_isend_irecv(ops)))


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    if not t.is_contiguous():  # a receive into a copy would be lost: the algorithms name contiguous rows
        raise ValueError(f"a transport message must be contiguous, got shape {tuple(t.shape)} strides {t.stride()}")
    return t


class BufferPool:
    """Persistent buffers that posts read from and receive into, reused call after call.

    :meth:`take` hands out a released set of the same ``key`` (the call's shapes) or allocates one;
    :meth:`give` returns it. Sets of only the ``keep`` most recent keys are kept, so a run whose
    sequence length changes every step holds no more than that.
    """

    def __init__(self, keep: int = 2):
        self.keep = keep
        self.allocated = 0  # sets allocated so far (a steady run stops allocating)
        self._free: OrderedDict = OrderedDict()

    def take(self, key, allocate: Callable[[], object]):
        free = self._free.get(key)
        if free:
            self._free.move_to_end(key)
            return free.pop()
        self.allocated += 1
        return allocate()

    def give(self, key, buffers) -> None:
        self._free.setdefault(key, []).append(buffers)
        self._free.move_to_end(key)
        while len(self._free) > self.keep:
            self._free.popitem(last=False)
