"""KV-cached inference through Megatron's GPTModel: prefill and decode, local or on the pool.

An :class:`InferenceSession` is shared by the layers of one base rank (like the
attention pool): the generation loop says which request a forward is for and whether
it is its prefill or one decode step (:meth:`InferenceSession.step`); each layer's
:class:`InferenceCoreAttention` then asks the session instead of attending over its
inputs alone.

* Prefill of ``n`` tokens: the resource manager decides as in training. Above the
  threshold the attention runs through the pool (forward only) and the layer's K/V is
  stored sharded over the base rank and its active pool ranks
  (:class:`~megatron_fapool.attention.pool.kv_cache.PoolKVCache`); below it, attention
  is local and the K/V stays on the base rank.
* Decode of one token: the new k, v join the request's cache (on the shard that owns
  the next position) and the query attends over all of it; a pooled request's partial
  results are merged by log-sum-exp on the base rank.

Megatron's own inference context is not used: it would keep every request's whole
K/V on the base rank. RoPE positions of a decode step come from
:func:`rope_position`, which offsets Megatron's rotary embedding for the step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..attention.local import local_attention
from ..attention.pool import PooledAttention, PoolCoreAttention
from ..attention.pool.kv_cache import KVShardStore, PoolKVCache, decode_partial

__all__ = ["InferenceCoreAttention", "InferenceSession", "rope_position"]


@dataclass
class _Step:
    request: int
    mode: str  # "prefill" | "decode"


class InferenceSession:
    """This base rank's KV caches (local and pooled) and the request the current forward serves."""

    def __init__(self, pool=None, *, backend: str = "auto"):
        self.pool = pool
        self.backend = backend
        self.pooled = PoolKVCache(pool.client, backend=backend) if pool is not None else None
        self.local = KVShardStore()
        self.members: dict[int, int] = {}  # request -> 1 (local) or base + active pool ranks
        self.current: _Step | None = None

    @contextlib.contextmanager
    def step(self, request: int, mode: str):
        """Run one forward of ``request`` (``mode`` "prefill" or "decode") inside this block."""
        if mode not in ("prefill", "decode"):
            raise ValueError(f"mode must be 'prefill' or 'decode', got {mode!r}")
        if mode == "prefill" and request in self.members:
            raise ValueError(f"request {request} was already prefilled: free it first")
        if mode == "decode" and request not in self.members:
            raise KeyError(f"request {request} has no KV cache: prefill it first")
        if mode == "prefill" and self.pool is not None:
            self.pool.manager.new_step()
        self.current = _Step(request, mode)
        try:
            yield
        finally:
            self.current = None

    def is_pooled(self, request: int) -> bool:
        return self.members.get(request, 1) > 1

    def tokens_held(self, request: int) -> int:
        """K/V tokens of ``request`` on this base rank, summed over layers."""
        pooled = self.pooled.tokens_held(request) if self.pooled is not None else 0
        return self.local.tokens_of(request) + pooled

    def free(self, request: int) -> None:
        """Drop the request's K/V here and on the pool."""
        if self.members.pop(request, None) is None:
            return
        self.local.free(request)
        if self.pooled is not None:
            self.pooled.free(request)

    def attend(self, layer: int, q, k, v, *, softmax_scale: float) -> torch.Tensor:
        """``[1, s, h, d]`` q/k/v of the current step -> ``[1, s, h, d]``."""
        step = self.current
        if q.shape[0] != 1:
            raise ValueError(f"inference runs one request per forward, got batch {q.shape[0]}")
        if step.mode == "prefill":
            return self._prefill(step.request, layer, q, k, v, softmax_scale)
        if q.shape[1] != 1:
            raise ValueError(f"a decode step takes one token, got {q.shape[1]}")
        return self._decode(step.request, layer, q, k, v, softmax_scale)

    def _prefill(self, request, layer, q, k, v, scale):
        n = q.shape[1]
        active = self.pool.manager.decide(n) if self.pool is not None else 0
        members = self.members.setdefault(request, active + 1)
        if members != active + 1:
            raise RuntimeError(f"request {request}: layers disagree on the pool size ({members - 1} vs {active})")
        if active:
            with torch.no_grad():  # PooledAttention takes Megatron's [s, b, h, d]
                out = PooledAttention.apply(
                    q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), self.pool.client, active, True, scale
                ).transpose(0, 1)
            self.pooled.store(request, layer, k[0], v[0], members=members)
            return out
        if self.pool is not None:
            self.pool.stats.local_calls += 1
        self.local.put(request, layer, k[0].clone(), v[0].clone())
        return local_attention(q, k, v, causal=True, softmax_scale=scale, backend=self.backend)

    def _decode(self, request, layer, q, k, v, scale):
        if self.is_pooled(request):
            out = self.pooled.decode(request, layer, q[0, 0], k[0, 0], v[0, 0], softmax_scale=scale)
            return out[None, None]
        shard = self.local.shards[(request, layer)]
        shard.append(k[0, 0], v[0, 0])
        out, _ = decode_partial(q[0, 0], shard.k, shard.v, softmax_scale=scale, backend=self.backend)
        return out.to(q.dtype)[None, None]


class InferenceCoreAttention(PoolCoreAttention):
    """The pool's core attention; inside an :meth:`InferenceSession.step` it serves KV-cached inference."""

    def __init__(self, *args, session: InferenceSession | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.session = session

    def attend(self, q, k, v, *, causal: bool):
        if self.session is None or self.session.current is None:
            return super().attend(q, k, v, causal=causal)
        return self.session.attend(self.layer_number, q, k, v, softmax_scale=self.softmax_scale)


@contextlib.contextmanager
def rope_position(model, position: int):
    """Megatron's rotary embedding for a forward whose first token sits at ``position``.

    GPTModel computes RoPE for positions ``0..s-1`` of its input; a decode step's one
    token sits at ``position``. No-op for models without RoPE.
    """
    rope = getattr(model, "rotary_pos_emb", None)
    if rope is None or position == 0:
        yield
        return
    original = rope.forward

    def shifted(max_seq_len, offset=0, *args, **kwargs):
        return original(max_seq_len, offset + position, *args, **kwargs)

    rope.forward = shifted
    try:
        yield
    finally:
        del rope.forward
