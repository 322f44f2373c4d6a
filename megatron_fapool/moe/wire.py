"""MA separation's wire: who talks to whom in a dispatch group, and the counts-first exchange.

The dispatch group of a pipeline stage is its ``A`` attention ranks (group ranks
``0..A-1``, Megatron's order) followed by its ``E`` expert ranks (group ranks
``A..A+E-1``). Expert rank ``j`` owns the ``k = N / E`` global experts
``[j*k, (j+1)*k)``: Megatron's expert-parallel numbering, so expert weights map 1:1 to a
Megatron checkpoint with expert parallelism ``E``.

Every operation starts with one ``all_to_all_single`` of int64 over the group: each
attention rank sends each expert rank a :class:`~megatron_fapool.parallel.service.Header`
followed by the rows it will send for each of that rank's ``k`` experts. The expert rank
checks that all attention ranks asked for the same operation (a desynchronised schedule
fails naming the ranks, it never computes garbage), then the payloads move with exact
unequal splits: nothing is padded, nothing dropped.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass, replace

import torch
import torch.distributed as dist

from ..parallel.service import Header, named_failure, nbytes

__all__ = ["MOE_BACKWARD", "MOE_FORWARD", "DispatchGeometry", "agreed_header", "all_to_all", "exchange_headers"]

MOE_FORWARD = 9
MOE_BACKWARD = 10

_HEADER_LEN = len(astuple(Header(op=0)))
# fields every attention rank of a call must agree on
_AGREED = ("op", "call_id", "layer", "batch", "dtype", "save", "extra", "members")


@dataclass(frozen=True)
class DispatchGeometry:
    """The shape of one stage's dispatch group (pure)."""

    members: tuple[int, ...]  # global ranks: attention ranks, then expert ranks
    num_attention: int  # A
    experts_per_rank: int  # k
    # the stage's expert-rank index ("slot", which block of experts) of each member expert rank;
    # None: every slot, in order. A survivor geometry (:meth:`without`) lacks a lost rank's slot.
    slots: tuple[int, ...] | None = None

    @property
    def num_expert_ranks(self) -> int:
        return len(self.members) - self.num_attention

    @property
    def num_experts(self) -> int:
        return self.num_expert_ranks * self.experts_per_rank

    @property
    def attention_ranks(self) -> tuple[int, ...]:
        return self.members[: self.num_attention]

    @property
    def expert_ranks(self) -> tuple[int, ...]:
        return self.members[self.num_attention:]

    def others(self, rank: int) -> tuple[int, ...]:
        """The members a failed all-to-all of ``rank`` may have lost (any of them: every pair exchanges)."""
        return tuple(m for m in self.members if m != rank)

    def expert_ids(self, j: int) -> range:
        """Global expert ids owned by the stage's expert rank ``j`` (its slot's block)."""
        k = self.experts_per_rank
        slot = self.slots[j] if self.slots is not None else j
        return range(slot * k, (slot + 1) * k)

    def expert_counts(self, tokens_per_expert) -> torch.Tensor:
        """Rows per global expert (length: every expert of the stage) -> ``[expert ranks, k]`` of the members.

        In a survivor geometry the lost slots' experts must have no rows (their routers mask them).
        """
        t = torch.as_tensor(tokens_per_expert, dtype=torch.int64).view(-1, self.experts_per_rank)
        if self.slots is None:
            return t
        lost = [s for s in range(t.shape[0]) if s not in self.slots]
        if lost and int(t[lost].sum()):
            k = self.experts_per_rank
            raise RuntimeError(
                f"{int(t[lost].sum())} rows routed to lost experts"
                f" {', '.join(f'{s * k}-{(s + 1) * k - 1}' for s in lost)}: their routers must mask them"
            )
        return t[list(self.slots)]

    def without(self, rank: int) -> "DispatchGeometry":
        """The survivor geometry when expert rank ``rank`` (a global rank) is lost: same experts per rank."""
        experts = self.expert_ranks
        if rank not in experts:
            raise ValueError(f"rank {rank} is not an expert rank of this dispatch group {list(self.members)}")
        slots = self.slots if self.slots is not None else tuple(range(len(experts)))
        j = experts.index(rank)
        return DispatchGeometry(members=tuple(r for r in self.members if r != rank), num_attention=self.num_attention,
                                experts_per_rank=self.experts_per_rank, slots=slots[:j] + slots[j + 1:])

    def to_experts(self, rows) -> list[int]:
        """All-to-all splits of an attention rank: nothing to attention ranks, ``rows[j]`` to expert rank ``j``."""
        return [0] * self.num_attention + [int(r) for r in rows]

    def from_attention(self, rows) -> list[int]:
        """All-to-all splits of an expert rank: ``rows[a]`` from/to attention rank ``a``, nothing else."""
        return [int(r) for r in rows] + [0] * self.num_expert_ranks

    @classmethod
    def of_stage(cls, layout, stage: int, num_experts: int) -> "DispatchGeometry":
        members = layout.dispatch_group(stage)
        e = layout.experts_per_stage
        if num_experts % e:
            raise ValueError(f"{num_experts} experts cannot be split over {e} expert ranks")
        return cls(members=tuple(members), num_attention=len(members) - e, experts_per_rank=num_experts // e)


def all_to_all(out: torch.Tensor, inp: torch.Tensor, out_splits, in_splits, group, *, what: str, peers, stats,
               async_op: bool = False):
    """``all_to_all_single`` with exact splits along dim 0; a failure names ``peers``.

    Every member of a dispatch group exchanges with every other one (even a zero-row split
    is a message), so a lost member fails every member's all-to-all: name all the others.

    Returns ``out``, or with ``async_op`` the work handle (``out`` is valid after its ``wait()``).
    """
    work = named_failure(what, peers, dist.all_to_all_single, out, inp.contiguous(), list(out_splits),
                         list(in_splits), group=group, async_op=async_op)
    stats.bytes_sent += nbytes(inp)
    stats.bytes_received += nbytes(out)
    return work if async_op else out


def exchange_headers(geom: DispatchGeometry, group, device, *, header: Header | None, counts=None, stats,
                     what: str, async_op: bool = False):
    """The header all-to-all; returns what this rank received, ``[A + E, header + k]`` int64
    (with ``async_op``: ``(received, work, sent)``; keep ``sent`` alive until the work is done).

    An attention rank passes its ``header`` and ``counts`` (rows per global expert, length
    ``N``); expert rank ``j`` is sent the header with ``n`` = its rows and ``extra`` = ``k``,
    then the counts of its experts. An expert rank passes ``header=None`` and sends nothing.
    """
    k = geom.experts_per_rank
    width = _HEADER_LEN + k
    send = torch.zeros(len(geom.members), width, dtype=torch.int64)
    if header is not None:
        counts = torch.as_tensor(counts, dtype=torch.int64).view(geom.num_expert_ranks, k)
        for j in range(geom.num_expert_ranks):
            h = replace(header, n=int(counts[j].sum()), extra=k, members=len(geom.members))
            send[geom.num_attention + j, :_HEADER_LEN] = torch.tensor(astuple(h), dtype=torch.int64)
            send[geom.num_attention + j, _HEADER_LEN:] = counts[j]
    if device.type == "cuda":  # pinned and non-blocking, as the pool's headers (service.int64_tensor)
        send = send.pin_memory().to(device, non_blocking=True)
    recv = torch.empty_like(send)
    peers = geom.others(dist.get_rank())
    work = all_to_all(recv, send, [1] * len(geom.members), [1] * len(geom.members), group, what=what, peers=peers,
                      stats=stats, async_op=async_op)
    return (recv, work, send) if async_op else recv


def agreed_header(geom: DispatchGeometry, received: torch.Tensor, *, rank: int) -> tuple[Header, torch.Tensor]:
    """On an expert rank: the one header every attention rank sent, and the counts ``[A, k]``.

    Raises when the attention ranks disagree (names them); ``drop_before`` is the smallest sent.
    """
    rows = received[: geom.num_attention].cpu()
    headers = [Header.from_tensor(r[:_HEADER_LEN]) for r in rows]
    first = headers[0]
    for a, h in enumerate(headers[1:], start=1):
        diff = [f for f in _AGREED if getattr(h, f) != getattr(first, f)]
        if diff:
            raise RuntimeError(
                f"expert rank {rank}: attention ranks {geom.attention_ranks[0]} and {geom.attention_ranks[a]} sent"
                f" different operations ({', '.join(f'{f} {getattr(first, f)} vs {getattr(h, f)}' for f in diff)}):"
                " every attention rank of a stage must run the same MoE layers in the same order"
            )
    header = replace(first, n=sum(h.n for h in headers), drop_before=min(h.drop_before for h in headers))
    return header, rows[:, _HEADER_LEN:_HEADER_LEN + geom.experts_per_rank].clone()
