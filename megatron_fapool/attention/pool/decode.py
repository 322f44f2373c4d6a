"""Decode with a pool-resident KV cache: a long sequence's K/V lives sharded on its attention group.

After the prefill of a pooled request, each layer's K/V is
split along the sequence over the ``members`` of the base rank's attention group (the
base rank is member 0 and keeps its own shard; member ``j`` keeps the ``j``-th
contiguous range): no holder has it whole. A decode step of a batch of pooled requests
of this base rank then moves

* once per step: the batch's ``(request, owner)`` pairs and the layers that follow
  (the owner of a request's new token is the member holding the fewest of its tokens;
  every layer has the same), so the pool queues all layers' work at once;
* per layer: the batch's new queries and new k, v rows, in one broadcast to every
  member (a few KiB per request; each new k, v row is stored only by its owner), and
  each member's partial results ``(out, lse)`` over its shards, gathered to the base,

and the base merges the partials with the log-sum-exp rule. Nothing is replicated at
rest and no K/V moves after the prefill. :func:`prefill_shards` and
:func:`next_owner` are the pure placement rules; :class:`PoolKVCache` is the base side,
:class:`KVShardStore` plus the ``serve_kv_*`` handlers the pool side (run by
:class:`~megatron_fapool.attention.pool.endpoints.PoolServer`).

Bad input (unknown request, wrong shapes, a request stored twice) raises on the base
before any header is sent, so the pool's state for other requests is never touched.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ...parallel.service import DTYPES, Header, ServiceMember, int64_tensor, named_failure, nbytes
from ..kernels import kernel_forward, merge_partials, select_backend

__all__ = [
    "HANDLERS",
    "KVShard",
    "KVShardStore",
    "PoolKVCache",
    "decode_partial",
    "decode_splits",
    "next_owner",
    "prefill_shards",
    "scatter_prefill",
]


KV_STORE = 6  # keep a shard of a layer's prefill K/V
KV_DECODE = 7  # one decode step (all layers) of a batch over their sharded caches
KV_FREE = 8  # drop a request's shards


def prefill_shards(n: int, members: int) -> list[tuple[int, int]]:
    """Contiguous, balanced ``[lo, hi)`` ranges of ``n`` tokens; member ``j`` holds the ``j``-th."""
    if members < 1:
        raise ValueError(f"members must be >= 1, got {members}")
    base, extra = divmod(n, members)
    bounds, lo = [], 0
    for j in range(members):
        hi = lo + base + (1 if j < extra else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def next_owner(sizes: list[int]) -> int:
    """The member that stores the next token: the one holding the fewest (lowest index on ties)."""
    return min(range(len(sizes)), key=lambda j: (sizes[j], j))


#: A decode split holds at least this many keys (fewer: the fixed cost of a split outweighs it).
MIN_SPLIT_KEYS = 2048
#: Target (split, kv head) work items per decode kernel on CUDA: a few per SM of a large GPU.
CUDA_DECODE_ITEMS = 512
#: Kernels that spread one query row's long key range over the GPU themselves: splitting
#: their keys measured slower (docs/benchmarks.md, "Decode attention: K/V read bandwidth").
SELF_SPLITTING = ("sdpa_cudnn", "sdpa_flash", "flash_attn")


def decode_splits(n: int, kv_heads: int, device: torch.device, backend: str) -> int:
    """How many sequence pieces one decode query's attention over ``n`` keys runs as.

    One query row gives a kernel that does not split keys itself only ``kv_heads`` work
    items: far too few to stream a long cache at the GPU's bandwidth. Splitting the keys
    into pieces run as a batch (merged by log-sum-exp) multiplies them ("flash
    decoding"). 1 on CPU and for :data:`SELF_SPLITTING` kernels.
    """
    if device.type != "cuda" or backend in SELF_SPLITTING:
        return 1
    return max(1, min(CUDA_DECODE_ITEMS // max(kv_heads, 1), n // MIN_SPLIT_KEYS))


@functools.lru_cache(maxsize=None)
def _auto_decode_backend(device: torch.device, dtype: torch.dtype, hq: int, hk: int, d: int) -> str:
    """What ``auto`` resolves to for a decode call of this kind (resolved once, not per call)."""
    q = torch.empty((1, 1, hq, d), dtype=dtype, device=device)
    kv = torch.empty((1, 1, hk, d), dtype=dtype, device=device)
    return select_backend(q, kv, kv, causal=False, requires_backward=False)


def decode_partial(q, k, v, *, softmax_scale: float, backend: str = "auto", splits: int | None = None):
    """One query against one shard: q ``[hq, d]``, k/v ``[s, hk, d]`` -> (out ``[hq, d]`` fp32, lse ``[hq]`` fp32).

    ``splits``: the keys run as that many equal pieces in one batched kernel call (a
    view of the cache, nothing copied) plus the remainder, merged by log-sum-exp;
    ``None`` picks :func:`decode_splits`. An empty shard gives out 0 and lse ``-inf``
    (it then drops out of the merge).
    """
    hq, d = q.shape
    n, hk = k.shape[0], k.shape[1]
    if k.shape != v.shape or k.shape[-1] != d or hq % hk or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"decode takes q [hq, d] and k/v [n, hk, d] of one dtype with hk dividing hq, got"
                         f" {tuple(q.shape)} {q.dtype}, {tuple(k.shape)} {k.dtype}, {tuple(v.shape)} {v.dtype}")
    if n == 0:
        return q.new_zeros((hq, d), dtype=torch.float32), torch.full((hq,), float("-inf"), device=q.device)
    if backend == "auto":
        backend = _auto_decode_backend(q.device, q.dtype, hq, hk, d)
    splits = decode_splits(n, hk, q.device, backend) if splits is None else max(1, min(splits, n))
    k, v = k.contiguous(), v.contiguous()  # no-op for a KVShard's views
    piece = n // splits
    main = piece * splits

    def attend(qq, kk, vv):  # [b, 1, hq, d], [b, m, hk, d] -> [b, hq, d], [b, hq] fp32
        out, lse = kernel_forward(qq, kk, vv, causal=False, softmax_scale=softmax_scale, backend=backend)
        return out[:, 0].float(), lse[:, :, 0].float()

    if splits == 1:
        outs, lses = attend(q[None, None], k[None], v[None])
        return outs[0], lses[0]
    outs, lses = attend(q[None, None].expand(splits, 1, hq, d).contiguous(),
                        k[:main].unflatten(0, (splits, piece)), v[:main].unflatten(0, (splits, piece)))
    if main < n:
        o, l = attend(q[None, None], k[None, main:], v[None, main:])
        outs, lses = torch.cat((outs, o)), torch.cat((lses, l))
    m = torch.logsumexp(lses, dim=0)  # [hq]
    return (torch.exp(lses - m)[..., None] * outs).sum(0), m


class KVShard:
    """One layer's K/V shard of one request: K and V each in its own buffer, with room to append.

    ``k`` and ``v`` are contiguous ``[length, hk, d]`` views, so attention kernels read
    them in place (an interleaved ``[length, 2, hk, d]`` layout made every decode step
    copy the whole cache first). The buffers double when full.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.length = k.shape[0]
        cap = self.length + max(64, self.length // 16)  # room for a generation; a long one doubles it
        self._k = k.new_empty((cap,) + tuple(k.shape[1:]))
        self._v = v.new_empty((cap,) + tuple(v.shape[1:]))
        self._k[: self.length], self._v[: self.length] = k, v

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.length == self._k.shape[0]:
            self._k = torch.cat((self._k[: self.length], torch.empty_like(self._k)))
            self._v = torch.cat((self._v[: self.length], torch.empty_like(self._v)))
        self._k[self.length], self._v[self.length] = k, v
        self.length += 1

    @property
    def k(self):
        return self._k[: self.length]

    @property
    def v(self):
        return self._v[: self.length]

    def nbytes(self) -> int:
        return self.length * (self._k[0].numel() + self._v[0].numel()) * self._k.element_size()


@dataclass
class KVShardStore:
    """The K/V shards one rank holds: ``(request, layer) -> shard``."""

    shards: dict[tuple[int, int], KVShard] = field(default_factory=dict)

    def tokens(self, request: int, layer: int) -> int:
        s = self.shards.get((request, layer))
        return 0 if s is None else s.length

    def tokens_of(self, request: int) -> int:
        """Tokens of ``request`` held here, summed over layers."""
        return sum(s.length for (r, _), s in self.shards.items() if r == request)

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.shards.values())

    def put(self, request: int, layer: int, k, v) -> None:
        self.shards[(request, layer)] = KVShard(k, v)

    def free(self, request: int) -> None:
        for key in [key for key in self.shards if key[0] == request]:
            del self.shards[key]


@dataclass
class _Request:
    members: int
    sizes: dict[int, list[int]] = field(default_factory=dict)  # layer -> tokens per member


@dataclass
class _DecodeStep:
    """A decode step announced to the pool: its requests, their owners and the layers that follow, in order."""

    requests: tuple[int, ...]
    owners: list[int]
    layers: list[int]
    members: int
    shape: tuple  # (q shape, k shape, dtype, softmax scale), the same for every layer
    done: int = 0  # layers exchanged so far


class PoolKVCache:
    """Base-rank side: prefill-store, decode and free pooled requests' K/V (one per base rank)."""

    def __init__(self, client, *, backend: str = "auto"):
        self.client = client
        self.backend = backend
        self.own = KVShardStore()  # this base rank's own shards (member 0)
        self.requests: dict[int, _Request] = {}
        self._step: _DecodeStep | None = None  # the decode step whose layers are being exchanged
        self._device = None

    # -- helpers -------------------------------------------------------------------
    def _group(self, members: int):
        return self.client.group(members - 1)

    def _member_rank(self, j: int) -> int:
        return self.client.pool_ranks[j - 1] if j else self.client.rank

    def tokens_held(self, request: int) -> int:
        """Tokens of ``request`` this base rank holds (all layers)."""
        return self.own.tokens_of(request)

    # -- API -----------------------------------------------------------------------
    def store(self, request: int, layer: int, k: torch.Tensor, v: torch.Tensor, *, members: int) -> None:
        """Shard one layer's prefill K/V ``[n, hk, d]`` of ``request`` over ``members`` (base + pool)."""
        if not 2 <= members <= self.client.max_members:
            raise ValueError(f"members must be in 2..{self.client.max_members}, got {members}")
        if k.shape != v.shape or k.dim() != 3:
            raise ValueError(f"k and v must both be [n, kv_heads, head_dim], got {tuple(k.shape)} and {tuple(v.shape)}")
        req = self.requests.get(request)
        if req is not None and req.members != members:
            raise ValueError(f"request {request} is stored over {req.members} members, not {members}")
        if req is not None and layer in req.sizes:
            raise ValueError(f"request {request} layer {layer} is already stored")
        req = self.requests.setdefault(request, _Request(members=members))
        self._device = k.device
        named_failure(f"KV store of base rank {self.client.rank}", self.client.pool_ranks[: members - 1],
                       self._store, request, layer, k, v, members)
        req.sizes[layer] = [hi - lo for lo, hi in prefill_shards(k.shape[0], members)]

    def _store(self, request, layer, k, v, members):
        lo, hi = scatter_prefill(self.client, KV_STORE, request, layer, k, v, members)
        self.own.put(request, layer, k[lo:hi], v[lo:hi])

    def decode(self, requests: list[int], layer: int, q, k_new, v_new, *, softmax_scale: float) -> torch.Tensor:
        """Attention of ``layer`` in a decode step of a batch of pooled requests.

        q ``[n, hq, d]``, k/v_new ``[n, hk, d]`` (row ``i`` belongs to ``requests[i]``) ->
        ``[n, hq, d]``. The new k, v join each cache first (causal: a token attends to
        itself). A step's first call (its first stored layer) tells the pool once which
        requests, owners and layers follow, so the pool queues every layer's work at
        once and no layer waits for a host round trip there; the step's later calls
        must then come for the same requests, layer after layer in order. Requests may be
        spread over different numbers of members; the exchange runs over the largest
        group and a member holding nothing of a request returns an empty partial for it.
        """
        requests = tuple(requests)
        n = len(requests)
        shape_ok = (q.dim() == 3 and q.shape[0] == n and k_new.dim() == 3 and k_new.shape == v_new.shape
                    and k_new.shape[0] == n and k_new.shape[-1] == q.shape[-1])
        step = self._step
        if step is None:
            step = self._begin(requests, layer, shape_ok, q, k_new, v_new, softmax_scale)
        elif step.requests != requests or step.layers[step.done] != layer or not shape_ok \
                or step.shape != (tuple(q.shape), tuple(k_new.shape), q.dtype, softmax_scale):
            raise RuntimeError(
                f"the decode step of requests {list(step.requests)} expects layer {step.layers[step.done]} next"
                f" with q {step.shape[0]}, got requests {list(requests)} layer {layer} q {tuple(q.shape)}"
            )
        out = named_failure(f"KV decode of base rank {self.client.rank}", self.client.pool_ranks[: step.members - 1],
                             self._exchange, step, layer, q, k_new, v_new)
        step.done += 1
        if step.done == len(step.layers):  # every layer appended each request's token on its owner
            for rid, owner in zip(step.requests, step.owners):
                for sizes in self.requests[rid].sizes.values():
                    sizes[owner] += 1
            self._step = None
        return out

    def _begin(self, requests, layer, shape_ok, q, k_new, v_new, scale) -> "_DecodeStep":
        """Check a new step's input, then announce it to the pool (nothing is sent on bad input)."""
        if len(set(requests)) != len(requests):
            raise ValueError(f"a decode batch names a request twice: {list(requests)}")
        for rid in requests:
            req = self.requests.get(rid)
            if req is None or layer not in req.sizes:
                raise KeyError(f"request {rid} layer {layer} has no pooled KV cache (store it at prefill)")
        if not shape_ok:
            raise ValueError(f"decode of {len(requests)} requests takes q [n, hq, d] and k/v [n, hk, d], got"
                             f" {tuple(q.shape)}, {tuple(k_new.shape)}, {tuple(v_new.shape)}")
        reqs = [self.requests[rid] for rid in requests]
        layers = sorted(reqs[0].sizes)
        if any(sorted(r.sizes) != layers for r in reqs) or layer != layers[0]:
            raise ValueError(f"a decode step runs over the stored layers {layers} from the first; requests"
                             f" {list(requests)} hold different layers or the step started at layer {layer}")
        step = _DecodeStep(requests=requests, owners=[next_owner(r.sizes[layer]) for r in reqs], layers=layers,
                           members=max(r.members for r in reqs),
                           shape=(tuple(q.shape), tuple(k_new.shape), q.dtype, scale))
        params = int64_tensor(layers + [x for pair in zip(requests, step.owners) for x in pair], q.device)
        n, hq, d = q.shape

        def announce():
            self.client.send_header(
                q.device, op=KV_DECODE, n=n, layer=len(layers), heads=hq, kv_heads=k_new.shape[1], head_dim=d,
                members=step.members, extra=params.numel(),
                **Header.encode(dtype=q.dtype, softmax_scale=scale, backend=self.backend),
            )
            dist.broadcast(params, src=self.client.rank, group=self._group(step.members))
            self.client.stats.bytes_sent += nbytes(params) * (step.members - 1)
        named_failure(f"KV decode of base rank {self.client.rank}", self.client.pool_ranks[: step.members - 1],
                       announce)
        self._step = step
        return step

    def _exchange(self, step, layer, q, k_new, v_new):
        n, hq, d = q.shape
        hk = k_new.shape[1]
        group = self._group(step.members)
        qkv = torch.cat((q, k_new, v_new), dim=1).contiguous()  # [n, hq + 2 hk, d]: one message for the batch
        dist.broadcast(qkv, src=self.client.rank, group=group)
        self.client.stats.bytes_sent += nbytes(qkv) * (step.members - 1)
        part = _partials(self.own, step.requests, step.owners, 0, layer, qkv, hq, hk, step.shape[3], self.backend)
        parts = [torch.empty_like(part) for _ in range(step.members)]
        dist.gather(part, parts, dst=self.client.rank, group=group)
        self.client.stats.bytes_received += nbytes(part) * (step.members - 1)
        out, lse = part[:, None, :, :d], part[:, :, d, None]  # merge_partials' [b, s, h, d] / [b, h, s]
        for p in parts[1:]:  # fixed order: the same result on every run
            out, lse = merge_partials(out, lse, p[:, None, :, :d], p[:, :, d, None])
        return out[:, 0].to(q.dtype)

    def free(self, request: int) -> None:
        """Drop ``request``'s K/V everywhere (no-op for an unknown request)."""
        if self._step is not None and request in self._step.requests:
            raise RuntimeError(f"request {request} is in the middle of a decode step (layer"
                               f" {self._step.layers[self._step.done]} of {self._step.layers} is next)")
        req = self.requests.pop(request, None)
        if req is None:
            return
        self.own.free(request)
        self.client.send_header(self._device, op=KV_FREE, call_id=request, members=req.members)


# -- pool side ---------------------------------------------------------------------

def scatter_prefill(client, op: int, call_id: int, layer: int, k, v, members: int) -> tuple[int, int]:
    """Send each of ``members - 1`` pool ranks its :func:`prefill_shards` range of one layer's prefill K/V
    ``[n, hk, d]`` (a header ``op`` with ``call_id``, then one scatter); the base's own range ``(lo, hi)``."""
    n, hk, d = k.shape
    bounds = prefill_shards(n, members)
    pad = max(hi - lo for lo, hi in bounds)
    client.send_header(k.device, op=op, call_id=call_id, n=n, layer=layer, kv_heads=hk, head_dim=d,
                       dtype=DTYPES.index(k.dtype), members=members)
    buf = k.new_zeros((members, pad, 2, hk, d))
    for j, (lo, hi) in enumerate(bounds):
        buf[j, : hi - lo, 0], buf[j, : hi - lo, 1] = k[lo:hi], v[lo:hi]
    mine = torch.empty_like(buf[0])
    dist.scatter(mine, list(buf.unbind(0)), src=client.rank, group=client.group(members - 1))
    client.stats.bytes_sent += nbytes(buf) - nbytes(buf[0])
    return bounds[0]


def serve_kv_store(server: ServiceMember, h: Header) -> None:
    """A pool rank's side of :func:`scatter_prefill`: keep its range's k, v ``[len, hk, d]``."""
    bounds = prefill_shards(h.n, h.members)
    lo, hi = bounds[server.member]
    pad = max(b - a for a, b in bounds)
    buf = torch.empty((pad, 2, h.kv_heads, h.head_dim), dtype=h.torch_dtype, device=server.device)
    dist.scatter(buf, None, src=server.leader, group=server.group_of(h.members))
    server.stats.bytes_received += nbytes(buf)
    server.kv.put(h.call_id, h.layer, buf[: hi - lo, 0], buf[: hi - lo, 1])


def _partials(store: KVShardStore, requests, owners, member: int, layer: int, qkv, hq: int, hk: int, scale, backend):
    """This member's ``[n, hq, d + 1]`` fp32 partials (out, lse) of a decode batch.

    Appends the new k, v of the requests this member owns first; a request of which it
    holds nothing gives an empty partial (out 0, lse ``-inf``).
    """
    q, k_new, v_new = qkv[:, :hq], qkv[:, hq: hq + hk], qkv[:, hq + hk:]
    rows = []
    for i, (rid, owner) in enumerate(zip(requests, owners)):
        shard = store.shards.get((rid, layer))
        if owner == member:
            shard.append(k_new[i], v_new[i])
        if shard is None:
            k = v = qkv.new_empty((0, hk, qkv.shape[-1]))
        else:
            k, v = shard.k, shard.v
        out, lse = decode_partial(q[i], k, v, softmax_scale=scale, backend=backend)
        rows.append(torch.cat((out, lse[:, None]), dim=1))
    return torch.stack(rows)


def serve_kv_decode(server: ServiceMember, h: Header) -> None:
    """One decode step: its requests, owners and layers once, then every layer's exchange, queued without waiting."""
    group = server.group_of(h.members)
    params = torch.empty((h.extra,), dtype=torch.int64, device=server.device)
    dist.broadcast(params, src=server.leader, group=group)
    server.stats.bytes_received += nbytes(params)
    vals = params.tolist()
    layers, pairs = vals[: h.layer], vals[h.layer:]
    requests, owners = pairs[0::2], pairs[1::2]
    for layer in layers:
        qkv = torch.empty((h.n, h.heads + 2 * h.kv_heads, h.head_dim), dtype=h.torch_dtype, device=server.device)
        dist.broadcast(qkv, src=server.leader, group=group)
        server.stats.bytes_received += nbytes(qkv)
        part = _partials(server.kv, requests, owners, server.member, layer, qkv, h.heads, h.kv_heads,
                         h.softmax_scale, h.backend_name)
        dist.gather(part, None, dst=server.leader, group=group)
        server.stats.bytes_sent += nbytes(part)
        server.stats.served_forward += 1


def serve_kv_free(server: ServiceMember, h: Header) -> None:
    server.kv.free(h.call_id)


HANDLERS = {KV_STORE: serve_kv_store, KV_DECODE: serve_kv_decode, KV_FREE: serve_kv_free}
