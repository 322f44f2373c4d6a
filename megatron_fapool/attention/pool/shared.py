"""One attention pool shared by many base replicas: which pool ranks serve which work.

Pure decision logic (DESIGN.md §1, "where the pool is going"): every rank runs it on the
same inputs and gets the same answer. No communication, no randomness, no clock, and no
dependence on hash or dict order or on the order the demands are given in (they are
sorted by ``(replica, key)`` first). Pool ranks are pool-local indices
``0..num_pool_ranks-1`` (global rank ``num_base + i`` in :mod:`megatron_fapool.parallel.roles`).

**Training**, :meth:`SharedPoolManager.assign_step`, once per step with every replica's
demands (``key`` = micro-batch index; ``(replica, key)`` is a *stream* from step to step):

1. ``tokens <= threshold``: nothing. Otherwise the wanted size is
   ``cost_model.best_active(tokens, cap)``, or ``cap`` without a cost model
   (``cap = max_per_demand``, default all pool ranks).
2. Hysteresis, per stream, as in :mod:`.manager`: a change between two non-zero wanted
   sizes applies after it was asked ``hysteresis`` steps in a row; starting and stopping
   are immediate (a stream absent or short in a step starts afresh next time).
3. No pool rank serves two demands in one step. Long demands are ordered by
   ``(round, -waited, -tokens, last_served, replica, key)``: ``round`` is the demand's
   place among its replica's long demands (longest first), so each replica's first
   demand comes before any replica's second; ``waited`` counts the replica's consecutive
   steps with a long demand and no pool rank; ``last_served`` is the last step the
   replica got a pool rank (-1: never), so equal lengths rotate through the replicas,
   least recently served first (a rotation by step number could alias with a periodic
   pattern of long steps and starve one).
   In that order every demand gets one rank while ranks remain; the ranks left then go
   one at a time to the demand, below its wanted size, with the longest predicted
   attention time (``cost_model.time(tokens, p)``, else ``tokens**2 / (p + 1)``), ties
   to the earlier one in the order. Hence no replica that stays long waits more than
   ``ceil(L / N) - 1`` steps in a row (``L`` replicas with long demands, ``N`` ranks).
4. Placement: a stream served in the previous step keeps the lowest of its previous
   ranks, as many as it gets now; the other ranks are the lowest free ones, handed out
   in the order of 3. Hysteresis filters only a stream's own wanted size: a newcomer
   that must share can shrink the others' counts at once (they keep their lowest ranks).

**Serving**, :meth:`SharedPoolManager.admit` / :meth:`SharedPoolManager.release`: a long
request holds its ranks for its whole life (its K/V shards live there): the wanted size
of 1., no hysteresis, the ranks holding the fewest K/V tokens (then lowest index). Its
``kv_tokens`` are charged ``ceil(kv_tokens / size)`` on each of its ranks; ``None`` means
wait (not enough room now); :class:`PoolCapacityError` means it can never fit.

Counters per replica and per pool rank (:meth:`SharedPoolManager.counters`): activations
and releases (a rank or request-stream starting / stopping to serve a demand), busy
steps, tokens served, long demands left unserved (training) or told to wait (serving),
K/V tokens held now and at peak. One manager serves one mode, training or serving.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from fractions import Fraction

from .manager import CostModel

__all__ = ["PoolCapacityError", "PoolDemand", "SharedPoolManager"]

Stream = tuple[int, int]  # (replica, key)


class PoolCapacityError(ValueError):
    """A request's K/V can never fit on the pool ranks it would get."""


@dataclass(frozen=True)
class PoolDemand:
    """Work of one replica that may want pool ranks: a micro-batch (training) or a request (serving)."""

    replica: int
    key: int  # request id (serving) or micro-batch index (training)
    tokens: int  # sequence length of this work
    kv_tokens: int = 0  # serving: K/V tokens the request keeps on the pool over its life

    def __post_init__(self):
        for name in ("replica", "key", "tokens", "kv_tokens"):
            if not isinstance(getattr(self, name), int):
                raise ValueError(f"PoolDemand.{name} must be an int, got {getattr(self, name)!r}")
        for name in ("replica", "tokens", "kv_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"PoolDemand.{name} must be >= 0, got {getattr(self, name)}")

    @property
    def stream(self) -> Stream:
        return (self.replica, self.key)


@dataclass
class _Counters:
    activations: int = 0
    releases: int = 0
    busy_steps: int = 0
    tokens_served: int = 0
    unserved: int = 0
    kv_tokens_held: int = 0
    kv_tokens_peak: int = 0

    def hold(self, kv: int) -> None:
        self.kv_tokens_held += kv
        self.kv_tokens_peak = max(self.kv_tokens_peak, self.kv_tokens_held)


class SharedPoolManager:
    def __init__(
        self,
        num_pool_ranks: int,
        *,
        threshold: int,
        max_per_demand: int | None = None,
        hysteresis: int = 2,
        cost_model: CostModel | None = None,
        kv_capacity_tokens: int | None = None,
        aligned: bool = False,
    ):
        if num_pool_ranks < 1:
            raise ValueError(f"num_pool_ranks must be >= 1, got {num_pool_ranks}")
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        if max_per_demand is not None and max_per_demand < 1:
            raise ValueError(f"max_per_demand must be >= 1 or None (all pool ranks), got {max_per_demand}")
        if hysteresis < 1:
            raise ValueError(f"hysteresis must be >= 1 (steps in a row), got {hysteresis}")
        if kv_capacity_tokens is not None and kv_capacity_tokens < 1:
            raise ValueError(f"kv_capacity_tokens must be >= 1 or None (unlimited), got {kv_capacity_tokens}")
        self.num_pool_ranks = num_pool_ranks
        self.threshold = threshold
        self.max_per_demand = min(max_per_demand or num_pool_ranks, num_pool_ranks)
        self.hysteresis = hysteresis
        self.cost_model = cost_model
        self.kv_capacity_tokens = kv_capacity_tokens
        self.aligned = aligned  # training: aligned power-of-two blocks only (see _share_aligned)
        self._largest_block = 1 << (num_pool_ranks.bit_length() - 1)
        self._mode: str | None = None
        self._step = 0
        # training state
        self._wanted: dict[Stream, int] = {}  # hysteresis-filtered wanted size of long streams
        self._pending: dict[Stream, tuple[int, int]] = {}  # (candidate size, steps in a row)
        self._assigned: dict[Stream, tuple[int, ...]] = {}  # last step's assignment
        self._waited: dict[int, int] = {}  # replica -> consecutive steps long and unserved
        self._last_served: dict[int, int] = {}  # replica -> last step it got a pool rank
        # serving state
        self._requests: dict[Stream, tuple[tuple[int, ...], int]] = {}  # (ranks, K/V charge per rank)
        # counters
        self._replica_counters: dict[int, _Counters] = {}
        self._rank_counters = [_Counters() for _ in range(num_pool_ranks)]

    # --- shared helpers -------------------------------------------------------------
    def _use(self, mode: str) -> None:
        if self._mode not in (None, mode):
            raise ValueError(
                f"this SharedPoolManager is used for {self._mode}; one manager serves one mode, not {mode}"
            )
        self._mode = mode

    def _target(self, tokens: int) -> int:
        if tokens <= self.threshold:
            return 0
        if self.cost_model is None:
            return self.max_per_demand
        return self.cost_model.best_active(tokens, self.max_per_demand)

    def _time(self, tokens: int, p: int):
        if self.cost_model is None:
            return Fraction(tokens * tokens, p + 1)  # exact: no float ties to break differently
        return self.cost_model.time(tokens, p)

    def _replica(self, replica: int) -> _Counters:
        return self._replica_counters.setdefault(replica, _Counters())

    # --- training ---------------------------------------------------------------------
    def assign_step(self, demands) -> dict[Stream, tuple[int, ...]]:
        """Pool ranks of each long demand of this step, ``{(replica, key): ranks ascending}``.

        Every demand given appears in the result (``()`` when short or left unserved).
        """
        self._use("training")
        demands = sorted(demands, key=_stream_of)
        for a, b in zip(demands, demands[1:]):
            if a.stream == b.stream:
                raise ValueError(
                    f"duplicate demand (replica {a.replica}, key {a.key}) in one step:"
                    " each (replica, key) may appear once"
                )
        long = [d for d in demands if d.tokens > self.threshold]
        wanted = {d.stream: self._hysteresis(d.stream, self._target(d.tokens)) for d in long}
        order = self._priority(long)
        counts = self._share(order, wanted)
        result = {d.stream: () for d in demands}
        result.update(self._place(order, counts))
        self._count_step(demands, result)
        self._wanted = wanted
        self._pending = {s: c for s, c in self._pending.items() if s in wanted}
        self._assigned = {s: r for s, r in result.items() if r}
        self._step += 1
        return result

    def _hysteresis(self, stream: Stream, target: int) -> int:
        current = self._wanted.get(stream, 0)
        if not current or target == current:
            self._pending.pop(stream, None)
            return target
        cand, count = self._pending.get(stream, (target, 0))
        count = count + 1 if cand == target else 1
        if count < self.hysteresis:
            self._pending[stream] = (target, count)
            return current
        self._pending.pop(stream, None)
        return target

    def _priority(self, long: list[PoolDemand]) -> list[PoolDemand]:
        rounds: dict[int, int] = {}
        keyed = []
        for d in sorted(long, key=lambda d: (d.replica, -d.tokens, d.key)):
            rnd = rounds[d.replica] = rounds.get(d.replica, -1) + 1
            waited, last = self._waited.get(d.replica, 0), self._last_served.get(d.replica, -1)
            keyed.append(((rnd, -waited, -d.tokens, last, d.replica, d.key), d))
        return [d for _, d in sorted(keyed, key=lambda kd: kd[0])]

    def _share(self, order: list[PoolDemand], wanted: dict[Stream, int]) -> list[int]:
        """Every demand one rank in ``order`` while ranks remain; then the demand with the longest predicted
        time grows (by one rank, or doubles when ``aligned``: powers of two up to the largest block) while
        the ranks left allow and it wants more."""
        counts = [1 if i < self.num_pool_ranks else 0 for i in range(len(order))]
        free = self.num_pool_ranks - sum(counts)
        cap = self._largest_block if self.aligned else self.num_pool_ranks
        while free:
            step = (lambda c: c) if self.aligned else (lambda c: 1)  # noqa: E731
            grow = [i for i, d in enumerate(order)
                    if counts[i] + step(counts[i]) <= min(wanted[d.stream], cap) and step(counts[i]) <= free]
            if not grow:
                break
            i = max(grow, key=lambda i: (self._time(order[i].tokens, counts[i]), -i))
            free -= step(counts[i])
            counts[i] += step(counts[i])
        return counts

    def _place_aligned(self, order: list[PoolDemand], counts: list[int]) -> dict[Stream, tuple[int, ...]]:
        """Aligned blocks (``2^k`` ranks from a multiple of ``2^k``): largest first, each its previous block if
        that is still free, else the lowest free aligned block; if keeping old blocks fragments the pool,
        every block is placed afresh (largest first from rank 0 always fits when the counts fit)."""
        by_size = sorted(range(len(order)), key=lambda i: (-counts[i], i))

        def place(keep: bool):
            taken, out = [False] * self.num_pool_ranks, {}
            for i in by_size:
                c, d = counts[i], order[i]
                if not c:
                    continue
                old = self._assigned.get(d.stream, ())
                starts = ([old[0]] if keep and len(old) == c and old[0] % c == 0 else []) + list(
                    range(0, self.num_pool_ranks - c + 1, c))
                lo = next((lo for lo in starts if not any(taken[lo:lo + c])), None)
                if lo is None:
                    return None
                taken[lo:lo + c] = [True] * c
                out[d.stream] = tuple(range(lo, lo + c))
            return out
        return place(keep=True) or place(keep=False)

    def _place(self, order: list[PoolDemand], counts: list[int]) -> dict[Stream, tuple[int, ...]]:
        if self.aligned:
            return self._place_aligned(order, counts)
        taken: set[int] = set()
        kept: dict[Stream, list[int]] = {}
        for d, c in zip(order, counts):
            keep = [r for r in self._assigned.get(d.stream, ()) if r not in taken][:c]
            kept[d.stream] = keep
            taken.update(keep)
        free = iter(r for r in range(self.num_pool_ranks) if r not in taken)
        out = {}
        for d, c in zip(order, counts):
            ranks = kept[d.stream] + [next(free) for _ in range(c - len(kept[d.stream]))]
            out[d.stream] = tuple(sorted(ranks))
        return out

    def _count_step(self, demands: list[PoolDemand], result: dict[Stream, tuple[int, ...]]) -> None:
        for s in sorted(set(result) | set(self._assigned)):
            before, now = set(self._assigned.get(s, ())), set(result.get(s, ()))
            rep = self._replica(s[0])
            rep.activations += bool(now and not before)
            rep.releases += bool(before and not now)
            for r in now - before:
                self._rank_counters[r].activations += 1
            for r in before - now:
                self._rank_counters[r].releases += 1
        long_replicas, served_replicas = set(), set()
        for d in demands:
            rep, ranks = self._replica(d.replica), result[d.stream]
            if d.tokens > self.threshold:
                long_replicas.add(d.replica)
                rep.unserved += not ranks
            if ranks:
                served_replicas.add(d.replica)
                rep.tokens_served += d.tokens
                for r in ranks:
                    self._rank_counters[r].busy_steps += 1
                    self._rank_counters[r].tokens_served += d.tokens
        for r in served_replicas:
            self._replica(r).busy_steps += 1
            self._last_served[r] = self._step
        self._waited = {r: 0 if r in served_replicas else self._waited.get(r, 0) + 1 for r in sorted(long_replicas)}

    # --- serving ----------------------------------------------------------------------
    def admit(self, demand: PoolDemand) -> tuple[int, ...] | None:
        """Pool ranks a request holds for its life; ``()`` when short, ``None`` to wait."""
        self._use("serving")
        s = demand.stream
        if s in self._requests:
            raise ValueError(
                f"request (replica {s[0]}, key {s[1]}) is already admitted: release it before admitting the key again"
            )
        rep = self._replica(demand.replica)
        size = self._target(demand.tokens)
        if not size:
            self._requests[s] = ((), 0)
            return ()
        charge = -(-demand.kv_tokens // size)
        cap = self.kv_capacity_tokens
        if cap is not None and charge > cap:
            raise PoolCapacityError(
                f"request (replica {s[0]}, key {s[1]}) keeps {demand.kv_tokens} K/V tokens, {charge} on each of its"
                f" {size} pool ranks, but a pool rank holds at most {cap} (kv_capacity_tokens):"
                " it can never be admitted"
            )
        held = [c.kv_tokens_held for c in self._rank_counters]
        ranks = sorted(range(self.num_pool_ranks), key=lambda r: (held[r], r))[:size]
        if cap is not None and any(held[r] + charge > cap for r in ranks):
            rep.unserved += 1
            return None
        ranks = tuple(sorted(ranks))
        self._requests[s] = (ranks, charge)
        rep.activations += 1
        rep.tokens_served += demand.tokens
        rep.hold(charge * size)
        for r in ranks:
            c = self._rank_counters[r]
            c.activations += 1
            c.tokens_served += demand.tokens
            c.hold(charge)
        return ranks

    def release(self, replica: int, key: int) -> None:
        """Free the pool ranks and K/V room of an admitted request."""
        self._use("serving")
        if (replica, key) not in self._requests:
            raise ValueError(
                f"release of unknown request (replica {replica}, key {key}): not admitted, or already released"
            )
        ranks, charge = self._requests.pop((replica, key))
        if not ranks:
            return
        rep = self._replica(replica)
        rep.releases += 1
        rep.kv_tokens_held -= charge * len(ranks)
        for r in ranks:
            self._rank_counters[r].releases += 1
            self._rank_counters[r].kv_tokens_held -= charge

    # --- counters ---------------------------------------------------------------------
    def counters(self) -> dict:
        """``{"replicas": {"<replica>": {...}}, "pool_ranks": {"<index>": {...}}}``, JSON-ready. ``busy_steps`` is a
        training count (steps served); a serving ledger sees no steps, so its counters leave it out (each serving
        pool rank reports its own busy seconds)."""
        def row(c):
            d = asdict(c)
            if self._mode == "serving":
                del d["busy_steps"]
            return d
        return {
            "replicas": {str(r): row(self._replica_counters[r]) for r in sorted(self._replica_counters)},
            "pool_ranks": {str(i): row(c) for i, c in enumerate(self._rank_counters)},
        }


def _stream_of(d) -> Stream:
    if not isinstance(d, PoolDemand):
        raise TypeError(f"assign_step expects PoolDemand items, got {type(d).__name__}")
    return d.stream
