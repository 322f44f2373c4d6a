"""KV-cached inference through Megatron's GPTModel: prefill and decode, local or on the pool.

An :class:`InferenceSession` is shared by the layers of one base rank (like the
attention pool): the generation loop says which request a forward is for and whether
it is its prefill or one decode step (:meth:`InferenceSession.step`); each layer's
core attention, built with the :class:`KVCached` strategy, then asks the session
instead of attending over its inputs alone.

* Prefill of ``n`` tokens: the resource manager decides as in training. Above the
  threshold the attention runs through the pool (forward only) and the layer's K/V is
  stored sharded over the base rank and its active pool ranks
  (:class:`~megatron_fapool.attention.pool.decode.PoolKVCache`); below it, attention
  is local and the K/V stays on the base rank.
* Decode: one forward carries one new token of each request of a batch (row ``i``
  belongs to the ``i``-th request; short and pooled requests may share a batch). Each
  new k, v joins its request's cache (on the shard that owns the next position) and
  the query attends over all of it; the pooled rows of the batch go to the pool in one
  exchange per layer and their partials are merged by log-sum-exp on the base rank.

Megatron's own inference context is not used: it would keep every request's whole
K/V on the base rank. RoPE positions of a decode step are the forward's
``position_ids`` (each row at its request's position): :mod:`megatron_fapool.models.rope`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..attention import Dense, Pooled
from ..attention.kernels import BackendSelector, local_attention
from ..attention.pool import PooledAttention
from ..attention.pool.decode import KVShardStore, PoolKVCache, decode_partial
from ..moe.pingpong import current_part

__all__ = ["InferenceSession", "KVCached"]


@dataclass
class _Step:
    requests: tuple[int, ...]  # row i of the forward's batch belongs to requests[i]
    mode: str  # "prefill" | "decode"


class InferenceSession:
    """This base rank's KV caches (local and pooled) and the requests the current forward serves."""

    def __init__(self, pool=None, *, backend: str = "auto"):
        self.pool = pool
        self.backend = backend
        self.selector = BackendSelector()  # "auto" and its run-time fallbacks, for prefills
        self.pooled = PoolKVCache(pool.client, backend=backend) if pool is not None else None
        self.unpooled = KVShardStore()  # whole K/V of the requests that stayed on this rank
        self.members: dict[int, int] = {}  # request -> 1 (local) or base + active pool ranks
        self._current: dict = {}  # ping-pong part (None outside ping-pong) -> the step it runs
        self.forwards = {"prefill": 0, "decode": 0}  # forwards served, by mode
        self.decode_rows = 0  # request-tokens decoded (a batch of b counts b)

    @contextlib.contextmanager
    def step(self, requests, mode: str):
        """Run one forward inside this block: the prefill of one request, or one decode step of a batch.

        ``requests``: a request id, or (decode) the ids of the forward's batch rows in order.
        """
        if mode not in ("prefill", "decode"):
            raise ValueError(f"mode must be 'prefill' or 'decode', got {mode!r}")
        requests = (requests,) if isinstance(requests, int) else tuple(requests)
        if not requests or len(set(requests)) != len(requests):
            raise ValueError(f"a step needs distinct request ids, got {list(requests)}")
        if mode == "prefill":
            if len(requests) != 1:
                raise ValueError(f"a prefill runs one request per forward, got {len(requests)}")
            if requests[0] in self.members:
                raise ValueError(f"request {requests[0]} was already prefilled: free it first")
        for r in requests:
            if mode == "decode" and r not in self.members:
                raise KeyError(f"request {r} has no KV cache: prefill it first")
        if mode == "prefill" and self.pool is not None:
            self.pool.manager.new_step()
        part = current_part()
        key = None if part is None else part.index
        self._current[key] = _Step(requests, mode)
        self.forwards[mode] += 1
        if mode == "decode":
            self.decode_rows += len(requests)
        try:
            yield
        finally:
            self._current.pop(key, None)

    @property
    def current(self) -> _Step | None:
        """The step the calling forward runs (each ping-pong part of a decode step runs its own rows)."""
        part = current_part()
        return self._current.get(None if part is None else part.index)

    def mark(self, requests) -> tuple:
        """What a forward of ``requests`` may change in this session, so that :meth:`restore` can undo a
        forward that failed part way (some layers' K/V written, others not): MA separation's
        degraded inference redoes such a step. Local (unpooled) caches only."""
        requests = (requests,) if isinstance(requests, int) else tuple(requests)
        pooled = [r for r in requests if self.is_pooled(r)]
        if pooled:
            raise RuntimeError(f"requests {pooled} are pooled: a step over the pool cannot be undone")
        lengths = {key: shard.length for key, shard in self.unpooled.shards.items() if key[0] in requests}
        return requests, {r: self.members[r] for r in requests if r in self.members}, lengths, dict(self.forwards), \
            self.decode_rows

    def restore(self, mark: tuple) -> None:
        """Undo what happened since :meth:`mark`: a request prefilled since is freed, the others' caches
        are cut back to their lengths then."""
        requests, members, lengths, forwards, decode_rows = mark
        for r in requests:
            if r not in members:  # prefilled (part way) since the mark
                self.members.pop(r, None)
                self.unpooled.free(r)
        for key in [key for key in self.unpooled.shards if key[0] in members and key not in lengths]:
            del self.unpooled.shards[key]
        for key, n in lengths.items():
            self.unpooled.shards[key].length = n
        self.forwards = dict(forwards)
        self.decode_rows = decode_rows

    def is_pooled(self, request: int) -> bool:
        return self.members.get(request, 1) > 1

    def tokens_held(self, request: int) -> int:
        """K/V tokens of ``request`` on this base rank, summed over layers."""
        pooled = self.pooled.tokens_held(request) if self.pooled is not None else 0
        return self.unpooled.tokens_of(request) + pooled

    def free(self, request: int) -> None:
        """Drop the request's K/V here and on the pool."""
        if self.members.pop(request, None) is None:
            return
        self.unpooled.free(request)
        if self.pooled is not None:
            self.pooled.free(request)

    def attend(self, layer: int, q, k, v, *, softmax_scale: float) -> torch.Tensor:
        """``[b, s, h, d]`` q/k/v of the current step -> ``[b, s, h, d]`` (row i: the step's i-th request)."""
        step = self.current
        if q.shape[0] != len(step.requests):
            raise ValueError(f"the forward's batch has {q.shape[0]} rows for {len(step.requests)} requests")
        if step.mode == "prefill":
            return self._prefill(step.requests[0], layer, q, k, v, softmax_scale)
        if q.shape[1] != 1:
            raise ValueError(f"a decode step takes one token per request, got {q.shape[1]}")
        return self._decode(step.requests, layer, q[:, 0], k[:, 0], v[:, 0], softmax_scale)[:, None]

    def _prefill(self, request, layer, q, k, v, scale):
        n = q.shape[1]
        active = self.pool.manager.decide(n) if self.pool is not None else 0
        members = self.members.setdefault(request, active + 1)
        if members != active + 1:
            raise RuntimeError(f"request {request}: layers disagree on the pool size ({members - 1} vs {active})")
        if active:
            with torch.no_grad():
                out = PooledAttention.apply(q, k, v, self.pool.client, active, True, scale)
            self.pooled.store(request, layer, k[0], v[0], members=members)
            return out
        if self.pool is not None:
            self.pool.stats.local_calls += 1
        self.unpooled.put(request, layer, k[0], v[0])
        return local_attention(q, k, v, causal=True, softmax_scale=scale, backend=self.backend, selector=self.selector)

    def _decode(self, requests, layer, q, k, v, scale):
        """q ``[n, hq, d]``, k/v ``[n, hk, d]`` -> ``[n, hq, d]``: pooled rows in one exchange, local rows here."""
        pooled = [i for i, r in enumerate(requests) if self.is_pooled(r)]
        if len(pooled) == len(requests):
            return self.pooled.decode(list(requests), layer, q, k, v, softmax_scale=scale)
        rows = [None] * len(requests)
        if pooled:
            idx = torch.tensor(pooled, device=q.device)
            outs = self.pooled.decode([requests[i] for i in pooled], layer, q[idx], k[idx], v[idx],
                                      softmax_scale=scale)
            for i, o in zip(pooled, outs.unbind(0)):
                rows[i] = o
        for i, r in enumerate(requests):
            if rows[i] is None:
                shard = self.unpooled.shards[(r, layer)]
                shard.append(k[i], v[i])
                out, _ = decode_partial(q[i], shard.k, shard.v, softmax_scale=scale, backend=self.backend)
                rows[i] = out.to(q.dtype)
        return torch.stack(rows)


class KVCached:
    """Attend strategy of a served model: inside an :meth:`InferenceSession.step` the session
    attends (KV caches, pooled prefill and decode); outside one, ``inner`` does (a plain forward).

    ``inner`` is ``Dense`` or ``Pooled(Dense)``: the session computes dense causal attention.
    """

    def __init__(self, inner, session: InferenceSession):
        if not isinstance(inner.inner if isinstance(inner, Pooled) else inner, Dense):
            raise ValueError(f"KV-cached inference serves dense attention only, got {inner!r}")
        self.inner = inner
        self.session = session

    def __call__(self, layer, q, k, v, *, causal: bool) -> torch.Tensor:
        if self.session.current is None:
            return self.inner(layer, q, k, v, causal=causal)
        return self.session.attend(layer.layer_number, q, k, v, softmax_scale=layer.softmax_scale)

    def __repr__(self) -> str:
        return f"KVCached({self.inner!r})"

