"""Static K/V slots: one cache per served model, allocated once, requests placed in slots.

:class:`SlotCache` holds, for each layer of this rank, K and V as ``[slots + 1, capacity,
kv_heads, head_dim]`` tensors (contiguous; the last slot is a *scratch* slot that the
padded rows of a CUDA-graph bucket write into and read from, so real slots are never
touched by padding). A request is placed in a free slot at its prefill and keeps it until
it leaves; its keys sit at positions ``0..len-1`` of the slot. Appending a decode token
writes one row in place (no ``torch.cat``, no reallocation), and lengths live on the
device, so a decode step has the same shapes every time and can be replayed as a graph.

What a forward does with the cache is its *step* (:attr:`SlotAttention.step`, set by the
engine around the forward): :class:`DecodeStep` (one token per row: row ``i`` writes at
``(slots[i], positions[i])`` and attends keys ``0..positions[i]`` of its slot) or
:class:`PrefillStep` (several prompts packed along the sequence: each token's K/V goes to
its request's slot, attention is causal within each prompt). :class:`SlotAttention` is the
core-attention strategy of a served model that asks the step (outside a step it is the
plain strategy it wraps, e.g. for a full forward).

Host-side bookkeeping (which slot a request has, the free list) is plain Python, touched
only when requests join or leave, never per decode step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import Dense, Pooled
from ..attention.kernels import packed_causal, slot_decode
from ..attention.pool.slot_kv import SlotKV, attend_rows
from ..models.specs import layer_spec_for
from .rope_append import cos_sin, rotate, rotate_and_append

__all__ = ["DecodeStep", "PooledDecodeStep", "PooledPrefillStep", "PrefillStep", "SlotAttention", "SlotCache",
           "SlotError", "slot_layer_spec"]


class SlotError(ValueError):
    """A request that can never fit its slots (prompt + new tokens above what its members' slots hold)."""


class SlotCache(SlotKV):
    """This rank's :class:`~megatron_fapool.attention.pool.slot_kv.SlotKV` and which request holds which slot."""

    def __init__(self, *, layers: int, slots: int, capacity: int, kv_heads: int, head_dim: int, dtype, device):
        super().__init__(layers=layers, slots=slots, capacity=capacity, kv_heads=kv_heads, head_dim=head_dim,
                         dtype=dtype, device=device)
        self.free_slots = list(range(slots - 1, -1, -1))  # pop() gives the lowest free slot
        self.slot_of: dict[int, int] = {}  # request -> slot

    def check_fits(self, request: int, tokens: int, members: int = 1) -> None:
        """Raise :class:`SlotError` if ``tokens`` (prompt + new tokens) can never fit ``members`` ranks' slots
        (a pooled request's tokens are spread evenly over its members)."""
        if -(-tokens // members) > self.capacity:
            where = f" x {members} ranks (the base and its pool ranks)" if members > 1 else ""
            raise SlotError(f"request {request}: prompt + new tokens = {tokens} exceeds the slot capacity"
                            f" {self.capacity}{where} (serve with a larger --slot-capacity)")

    def admit(self, request: int, tokens: int, members: int = 1) -> int | None:
        """A slot for ``request`` (``None`` while every slot is taken: the request waits)."""
        self.check_fits(request, tokens, members)
        if request in self.slot_of:
            raise ValueError(f"request {request} already holds slot {self.slot_of[request]}")
        if not self.free_slots:
            return None
        slot = self.free_slots.pop()
        self.slot_of[request] = slot
        return slot

    def release(self, request: int) -> None:
        """Free ``request``'s slot (its K/V is simply overwritten by the next holder)."""
        slot = self.slot_of.pop(request)
        at = next((i for i, s in enumerate(self.free_slots) if s < slot), len(self.free_slots))
        self.free_slots.insert(at, slot)  # kept in descending order

    @property
    def busy(self) -> int:
        return len(self.slot_of)


def _rotated(rope, q, k):
    """q, k ``[b, s, h, d]`` with a step's deferred RoPE (``((cos, sin), interleaved)``) applied; as is without."""
    if rope is None:
        return q, k
    (cos, sin), interleaved = rope
    return rotate(q, cos, sin, interleaved), rotate(k, cos, sin, interleaved)


@dataclass
class DecodeStep:
    """One token per row: row ``i`` appends at ``(slots[i], positions[i])`` and attends keys ``0..positions[i]``.

    The tensors are the engine's persistent buffers (views of the bucket's rows), so a graph
    captured with this step reads whatever the host staged there before the replay.
    """

    slots: torch.Tensor  # [B] int64
    positions: torch.Tensor  # [B] int64: the position of the row's new token
    lengths: torch.Tensor  # [B] int32: positions + 1, computed once per forward (set by the engine)
    backend: str = "auto"
    rope: tuple | None = None  # deferred RoPE: (cos, sin) [B, 1, 1, d] of this forward, and interleaved

    def attend(self, cache: SlotCache, layer: int, q, k, v, scale: float) -> torch.Tensor:
        if q.shape[1] != 1:
            raise ValueError(f"a decode step takes one token per row, got {q.shape[1]}")
        kc, vc = cache.k[layer], cache.v[layer]
        if self.rope is not None:
            (cos, sin), interleaved = self.rope
            q = rotate_and_append(q[:, 0], k[:, 0], v[:, 0], cos[:, 0, 0], sin[:, 0, 0], kc, vc, self.slots,
                                  self.positions, interleaved=interleaved)
        else:
            kc[self.slots, self.positions] = k[:, 0]
            vc[self.slots, self.positions] = v[:, 0]
            q = q[:, 0]
        out, _ = slot_decode(q, kc, vc, self.slots, self.lengths, softmax_scale=scale, backend=self.backend)
        return out[:, None]


@dataclass
class PrefillStep:
    """Prompts packed along one sequence: ``[1, T]`` tokens, each one's K/V at ``destinations`` (flat slot rows)."""

    destinations: torch.Tensor  # [T] int64: slot * capacity + position of each packed token
    cu_seqlens: torch.Tensor  # [n + 1] int32
    lengths: list[int]  # the prompts' lengths (host)
    backend: str = "auto"
    rope: tuple | None = None  # deferred RoPE: (cos, sin) [1, T, 1, d], and interleaved

    def attend(self, cache: SlotCache, layer: int, q, k, v, scale: float) -> torch.Tensor:
        if q.shape[0] != 1 or q.shape[1] != sum(self.lengths):
            raise ValueError(f"a packed prefill takes [1, {sum(self.lengths)}] tokens, got {tuple(q.shape[:2])}")
        q, k = _rotated(self.rope, q, k)
        flat = (-1, cache.kv_heads, cache.head_dim)
        cache.k[layer].view(flat).index_copy_(0, self.destinations, k[0])
        cache.v[layer].view(flat).index_copy_(0, self.destinations, v[0])
        out = packed_causal(q[0], k[0], v[0], self.cu_seqlens, max_len=max(self.lengths), lengths=self.lengths,
                            softmax_scale=scale, backend=self.backend)
        return out[None]


@dataclass
class PooledPrefillStep:
    """One pooled prompt ``[1, n]``: attention through the pool, its K/V spread over ``members`` ranks' slot ``slot``."""

    pool: object  # the pool's end: PooledSlots (dedicated pool) or MailboxClient (shared pool)
    request: int
    slot: int
    members: int  # the base + members - 1 pool ranks
    rope: tuple | None = None  # deferred RoPE: (cos, sin) [1, n, 1, d], and interleaved

    def attend(self, cache: SlotCache, layer: int, q, k, v, scale: float) -> torch.Tensor:
        if q.shape[0] != 1:
            raise ValueError(f"a pooled prefill runs one prompt per forward, got {q.shape[0]}")
        q, k = _rotated(self.rope, q, k)
        return self.pool.prefill(layer, self.slot, self.request, q, k, v, scale, self.members)


@dataclass
class PooledDecodeStep:
    """A decode step of a bucket in which some rows are pooled: row ``i`` is described by the row table
    (position, prompt length, members, slot: :mod:`~megatron_fapool.attention.pool.slot_kv`); this rank is
    member 0, appends the new tokens it stores, attends its part of each row, and merges the pool's
    partials layer by layer. Unpooled rows (members 1) come out as in :class:`DecodeStep`."""

    table: torch.Tensor  # [B, 4] int64: the engine's persistent row table (a view of the bucket's rows)
    pool: object  # PooledSlots or MailboxClient
    backend: str = "auto"
    rope: tuple | None = None
    rows: tuple | None = None  # decode_rows(0, table): computed once per forward (set by the engine)

    def attend(self, cache: SlotCache, layer: int, q, k, v, scale: float) -> torch.Tensor:
        if q.shape[1] != 1:
            raise ValueError(f"a decode step takes one token per row, got {q.shape[1]}")
        q, k = _rotated(self.rope, q, k)
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
        out, lse = attend_rows(cache, layer, self.rows, q, k, v, scale, self.backend)
        return self.pool.merge(layer, q, k, v, out, lse)[:, None]


class SlotAttention:
    """Attend strategy of a model served from a :class:`SlotCache`: inside a step the step attends;
    outside one, ``inner`` does (a plain forward over the given tokens).

    One instance is shared by every layer of the model (built into its spec); the engine
    gives it the cache it serves from (:attr:`cache`, replaceable between workloads) and
    sets :attr:`step` around each forward. ``inner`` is ``Dense``: slot serving computes
    dense causal attention on this rank.
    """

    def __init__(self, inner):
        if isinstance(inner, Pooled) or not isinstance(inner, Dense):
            raise ValueError(f"slot serving runs dense attention on this rank only, got {inner!r}")
        self.inner = inner
        self.cache: SlotCache | None = None
        self.step = None  # DecodeStep, PrefillStep or their pooled kinds  # what the forward in progress does with the cache
        self.rope = None  # the model's deferred RoPE module (take_rope), applied here

    def take_rope(self, rope) -> None:
        """Apply ``rope`` (the model's :class:`~megatron_fapool.models.rope.PositionalRotaryEmbedding`) here from
        now on: cos/sin once per forward, the rotation fused with the K/V append (:mod:`.rope_append`)."""
        rope.defer()
        self.rope = rope

    def rope_for(self, positions: torch.Tensor, dtype) -> tuple | None:
        """What a step carries for deferred RoPE at ``positions`` ``[b, s]`` (``None`` without it)."""
        if self.rope is None:
            return None
        return cos_sin(self.rope, positions, dtype), self.rope.rotary_interleaved

    def __call__(self, layer, q, k, v, *, causal: bool) -> torch.Tensor:
        if self.step is None:
            if self.rope is not None:  # a plain forward: RoPE at the forward's positions, as Megatron's would
                positions = self.rope.positions
                if positions is None:
                    positions = torch.arange(q.shape[1], device=q.device)[None]
                q, k = _rotated(self.rope_for(positions, q.dtype), q, k)
            return self.inner(layer, q, k, v, causal=causal)
        return self.step.attend(self.cache, layer.layer_number - 1, q, k, v, layer.softmax_scale)

    def __repr__(self) -> str:
        return f"SlotAttention({self.inner!r})"


def slot_layer_spec(run_config):
    """The layer spec of a slot-served model of ``run_config`` (no pool) and the one :class:`SlotAttention`
    every layer's core attention shares."""
    made = []

    def wrap(attend):
        made.append(SlotAttention(attend))
        return made[-1]
    spec = layer_spec_for(run_config, None, wrap=wrap)
    return spec, made[0]
