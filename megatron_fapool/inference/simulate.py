"""Layout simulator: replay a request trace through the real scheduler, with modelled step costs.

Each replica of a layout is served by :func:`~.batching.serve` itself (the same code as the
server), over a :class:`SimulatedEngine` that implements the engine interface ``serve`` uses
(``check_fits``, ``admit``, ``prefill``, ``decode``, ``leave``, ``members``, ``running``,
``rows``, ``steps``, ``max_new_tokens``) and, instead of running a model, advances a virtual
clock by the modelled cost of the step. Replicas run independently, one ``serve`` loop each,
as threads of a discrete-event loop (:class:`VirtualTime`: exactly one loop runs at a time,
the one earliest in virtual time), so a long prefill stalls only its own replica.

Layouts at G GPUs (:class:`Layout`): DP (G replicas of 1 GPU), TP g x G/g replicas, TP x PP,
and "R bases + P pool ranks": prompts above ``threshold`` get pool ranks from one
:class:`~megatron_fapool.attention.pool.shared.SharedPoolManager` shared by the bases
(``admit``/``release``, its per-rank K/V accounting); their K/V is spread evenly over the base
and its ``m`` pool ranks (as the slot engine does), and their prefill attention is divided by
the pool. A request that can never fit is refused (message in its ``Generation``); one that
does not fit now waits, first in line, as in the real server.

Requests are placed on replicas up front, in arrival order, by the real front scheduler
(:func:`~.batching.place_on_replicas`: long ones spread over the replicas, then the fewest tokens
placed), or round robin (length-oblivious). Pooled, as the real engine and pool coordinator do: a
prompt over ``threshold`` (or tokens beyond the replica's room) gets ``max_per_demand`` pool ranks
(no cost model in serving yet).

Step costs (:class:`Calibration`; defaults from docs/benchmarks.md, each field says where):

* decode, one replica of ``g`` TP x ``pp`` PP GPUs:
  ``max(host + (rows - 1) host_per_row, device) + comm + fixed`` with
  ``device = (weights + K/V tokens x kv_bytes) / (g BW)`` (PP stages run one after the other, so
  their reads add up) and ``comm = 2 L t_allreduce [g > 1] + (pp-1) t_hop``; for a pool base,
  ``device = max(own bytes, K/V held by the busiest of its pool ranks) / BW`` and ``comm += L
  t_exchange`` (a pool rank reads all the K/V it holds, from every base, once per base step:
  pool-performance.md §4.2's ``max(W + K_base, K_pool) / BW``);
* prefill of a packed batch: ``max(host, FLOPs / (g F) + TP all-reduces) + PP hops + per-prompt cost``,
  FLOPs = dense part (``2 x weights`` per token) + causal attention (pool-performance.md §4.2:
  attention's share grows with n, 22 % at 16K, 53 % at 64K); a pooled prompt runs alone:
  dense / F + per layer ``attention / (m+1) + transfer + m x call overhead`` (the
  :class:`~megatron_fapool.attention.pool.manager.CostModel` terms, transfers serial as measured).

Not modelled: the slot cache's fixed slot size (admission counts K/V tokens against the
replica's memory and ``max_rows``), PP micro-batching (one batch at a time through the stages,
as ``serve`` runs it), contention of a pool rank between bases beyond its K/V read.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections import deque
from dataclasses import dataclass

import torch

from ..attention.pool.manager import CostModel
from ..attention.pool.shared import PoolCapacityError, PoolDemand, SharedPoolManager
from ..training.flops import dense_attention_forward_flops
from .batching import TimedRequest, place_on_replicas, serve
from .generate import Request
from .slots import SlotError
from .trace import load_trace, poisson_arrivals, summarize

__all__ = ["Calibration", "EAGER_2026_11_29", "Layout", "SimulatedEngine", "VirtualTime", "parse_layout",
           "place", "simulate"]


@dataclass(frozen=True)
class Calibration:
    """Step-cost parameters (seconds, bytes, per second); JSON-loadable (:meth:`from_json`). Defaults: the
    slot engine with CUDA graphs on H200 (docs/benchmarks.md, dates in the comments)."""

    # the paper's dense model (4 layers, hidden 4096, 32 heads x 128, bf16)
    layers: int = 4
    hidden: int = 4096
    heads: int = 32
    head_dim: int = 128
    weight_bytes: float = 1.87e9  # read per decode step (issue 15 table header; pool-performance §3.1)
    kv_bytes_per_token: float = 65536  # 4 layers x K,V x 4096 x 2 B (§3.1)
    kv_bytes_per_gpu: float = 130e9  # K/V room per GPU, weights excluded (§3.1: ~2.0 M tokens)
    # decode
    hbm_bytes_per_s: float = 4.25e12  # copy bandwidth, issue 15 run of 2026-12-02
    decode_fixed_s: float = 0.357e-3  # issue 15, 8K x 1: graph 0.924 ms - HBM bound 0.567 ms (2026-12-02)
    decode_host_s: float = 0.0  # host time of a step overlapping the device (graph replay: none)
    decode_host_per_row_s: float = 0.0  # per running row beyond the first; issue 15: -7.6 us per request (none)
    allreduce_s: float = 15e-6  # per TP all-reduce of one step's rows: ASSUMED (§4.3), not measured
    pool_exchange_s: float = 30e-6  # per layer of a pooled decode step: PROJECTED (§4.2, CE + flags), not measured
    pp_hop_s: float = 20e-6  # per PP stage boundary of a decode step: ASSUMED
    # prefill
    prefill_flops_per_s: float = 550e12  # 1-GPU TTFT at 32K (173.9 ms) and 128K (1481.3 ms), issue 5, 2026-11-29
    prefill_host_s: float = 5.9e-3  # one prompt per forward: 376.8 ms / 64 prompts of 512, issue 15 re-run 2026-12-03
    prefill_per_prompt_s: float = 0.38e-3  # packed 64 x 512 in 137.0 ms vs 112.4 ms of FLOPs, issue 15, 2026-12-02
    link_bytes_per_s: float = 358.9e9  # GPU-GPU broadcast rate, threshold calibration 2026-11-22
    pool_call_s: float = 1.4e-3  # per pool rank per pooled layer call: 4K pooled fwd 1.860 ms vs 1 GPU 0.416 ms
    #                              minus 0.49 ms of compute + transfer (FA Pool attention, 2026-11-22)

    @classmethod
    def from_json(cls, path: str) -> "Calibration":
        """Defaults overridden by a JSON object of field names (an unknown name is an error)."""
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError(f"calibration {path}: expected a JSON object of parameters")
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"calibration {path}: unknown parameter(s) {sorted(unknown)}")
        return dataclasses.replace(cls(), **data)

    def dense_flops(self, n: int) -> float:
        return 2 * self.weight_bytes / 2 * n  # 2 FLOPs per weight (bf16: bytes / 2 weights) per token

    def attention_flops(self, n: int) -> float:
        """Causal attention forward FLOPs of one n-token prompt, one layer."""
        return dense_attention_forward_flops(n, num_heads=self.heads, head_dim=self.head_dim)

    def cost_model(self) -> CostModel:
        """One layer's prefill attention on a base and its pool ranks (what the pool manager sizes by)."""
        per_layer_kv = self.kv_bytes_per_token / self.layers
        return CostModel(attention_s_per_token2=4 * self.heads * self.head_dim / 2 / self.prefill_flops_per_s,
                         link_bytes_per_s=self.link_bytes_per_s, call_overhead_s=self.pool_call_s,
                         kv_bytes_per_token=per_layer_kv, q_bytes_per_token=per_layer_kv / 2)


#: The eager path of ``launch/infer.py`` that docs/benchmarks.md's 2-GPU tables measured (issue 5, 2026-11-29).
EAGER_2026_11_29 = dict(
    decode_fixed_s=0.0,
    decode_host_s=7.0e-3,  # 1 GPU TPOT at batch 1: 6.97 / 7.09 / 7.03 ms at 512 / 2K / 8K
    decode_host_per_row_s=1.0e-3,  # 1 GPU TPOT batch 1 -> 4: +2.9 ms (512), +3.3 ms (2K)
    allreduce_s=0.31e-3,  # TP 2 - 1 GPU TPOT at 8K batch 1: 2.49 ms over 8 all-reduces
    pool_exchange_s=1.02e-3,  # pool - 1 GPU TPOT at 8K batch 1: 4.10 ms over 4 layers
    prefill_host_s=7.0e-3,  # 1 GPU TTFT at 512: 7.1 ms
    prefill_per_prompt_s=0.0,
)


@dataclass(frozen=True)
class Layout:
    """``replicas`` of ``tp`` x ``pp`` GPUs; with ``pool_ranks``, the replicas are pool bases (TP 1, PP 1)."""

    name: str
    replicas: int
    tp: int = 1
    pp: int = 1
    pool_ranks: int = 0
    placement: str = "least-loaded"  # or "round-robin"
    threshold: int = 28325  # pooled above it (configs/calibration/h200x2_paper_dense.json)
    max_rows: int = 256  # running requests per replica (the engine's largest decode bucket)

    @property
    def gpus(self) -> int:
        return self.replicas * self.tp * self.pp + self.pool_ranks


def parse_layout(text: str, gpus: int, **kw) -> Layout:
    """``dp`` / ``dp-rr`` (round robin), ``tpG`` (G/g replicas), ``tpGppP``, ``R+P`` (R bases + P pool ranks;
    ``+P`` alone: gpus - P bases). ``gpus``: the GPU count for ``dp`` and ``tpG``."""
    t = text.strip().lower()
    try:
        if t in ("dp", "dp-rr"):
            return Layout(t, gpus, placement="round-robin" if t == "dp-rr" else "least-loaded", **kw)
        if "+" in t:
            r, p = t.split("+")
            p = int(p)
            r = int(r) if r else gpus - p
            return Layout(f"{r}+{p}", r, pool_ranks=p, **kw)
        if t.startswith("tp"):
            tp, _, pp = t[2:].partition("pp")
            tp, pp = int(tp), int(pp or 1)
            if gpus % (tp * pp):
                raise ValueError(f"{gpus} GPUs are not a multiple of TP {tp} x PP {pp}")
            return Layout(t, gpus // (tp * pp), tp=tp, pp=pp, **kw)
    except ValueError as e:
        raise ValueError(f"layout {text!r}: {e}") from None
    raise ValueError(f"layout {text!r}: expected dp, dp-rr, tpG, tpGppP or R+P")


class VirtualTime:
    """Virtual time shared by several ``serve`` loops in threads; only the loop earliest in time runs.

    :meth:`run` starts one thread per job ``job(clock, sleep)``; a job's ``sleep(dt)`` (and its
    engine's :meth:`advance`) moves its own time on and hands control to the earliest job."""

    def __init__(self):
        self.now = 0.0
        self._lock = threading.Lock()
        self._wake: dict[int, float] = {}
        self._go: dict[int, threading.Event] = {}
        self._me = threading.local()

    def _earliest(self) -> int:
        return min(self._wake, key=lambda j: (self._wake[j], j))

    def advance(self, dt: float) -> None:
        j = self._me.job
        with self._lock:
            self._wake[j] += max(0.0, dt)
            nxt = self._earliest()
            if nxt != j:
                self._go[j].clear()
                self._go[nxt].set()
        self._go[j].wait()
        self.now = self._wake[j]

    def run(self, jobs) -> list:
        results, errors = [None] * len(jobs), []
        self._wake = {j: 0.0 for j in range(len(jobs))}
        self._go = {j: threading.Event() for j in range(len(jobs))}

        def body(j, job):
            self._me.job = j
            self._go[j].wait()
            self.now = self._wake[j]
            try:
                results[j] = job(lambda: self.now, self.advance)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(e)
            finally:
                with self._lock:
                    del self._wake[j]
                    if self._wake:
                        self._go[self._earliest()].set()

        threads = [threading.Thread(target=body, args=(j, job), daemon=True) for j, job in enumerate(jobs)]
        for t in threads:
            t.start()
        if jobs:
            self._go[0].set()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


class SimulatedEngine:
    """One replica: the engine interface :func:`~.batching.serve` calls, costs from ``cal`` on ``time``."""

    def __init__(self, layout: Layout, cal: Calibration, time: VirtualTime, *, replica: int = 0,
                 pool: SharedPoolManager | None = None, max_new_tokens: int = 1 << 16):
        self.layout, self.cal, self.time, self.replica, self.pool = layout, cal, time, replica, pool
        self.max_new_tokens = max_new_tokens
        self.gpus = layout.tp * layout.pp
        self.kv_capacity = int(self.gpus * cal.kv_bytes_per_gpu // cal.kv_bytes_per_token)  # tokens
        self.rows: list[int] = []
        self.steps = 0
        self.prefills = 0
        self._tokens: dict[int, int] = {}  # admitted request -> prompt + new tokens
        self._kv: dict[int, int] = {}  # running request -> K/V tokens on this replica now
        self._base_share: dict[int, float] = {}  # request -> share of its K/V on this replica
        self._ranks: dict[int, tuple[int, ...]] = {}  # pooled request -> its pool ranks
        self._joined_at: dict[int, int] = {}
        self._reserved = 0  # K/V tokens of admitted requests at their full length

    # -- interface of serve --------------------------------------------------------------------
    @property
    def running(self) -> int:
        return len(self.rows)

    def members(self, request: int) -> int:
        return 1 + len(self._ranks.get(request, ()))

    def _pool_size(self, tokens: int, prompt_len: int) -> int:
        """Pool ranks of a request, as the real engine decides: all its share of the pool when the prompt is over
        the threshold or its tokens exceed what the replica holds, else none."""
        if self.pool is None or (prompt_len <= self.layout.threshold and tokens <= self.kv_capacity):
            return 0
        return self.pool.max_per_demand

    def check_fits(self, request: int, tokens: int) -> None:
        m = self._pool_size(tokens, 0)
        base = -(-tokens // (m + 1))
        why = None
        if base > self.kv_capacity:
            why = f"{base} K/V tokens on its replica, which holds {self.kv_capacity}"
        elif m and -(-(tokens - base) // m) > self.pool.kv_capacity_tokens:
            why = (f"{-(-(tokens - base) // m)} K/V tokens on each of {m} pool ranks, which hold"
                   f" {self.pool.kv_capacity_tokens} each")
        if why:
            raise SlotError(f"request {request}: {tokens} tokens (prompt + new) can never fit: {why}")

    def admit(self, request: int, tokens: int, prompt_len: int = 0) -> bool:
        """Room for ``tokens`` of K/V (the base's share when pooled) and a row; a long request also needs the
        pool manager's ranks (``None`` from it: wait)."""
        if len(self._tokens) >= self.layout.max_rows:
            return False
        m = self._pool_size(tokens, prompt_len)
        base = -(-tokens // (m + 1))
        if self._reserved + base > self.kv_capacity:
            return False
        if m:
            ranks = self.pool.admit(PoolDemand(self.replica, request, prompt_len, tokens - base))
            if ranks is None:  # wait (serve asks again later: virtual time passes meanwhile)
                return False
            self._ranks[request] = ranks
        self._tokens[request] = base
        self._base_share[request] = base / tokens
        self._reserved += base
        return True

    def prefill(self, batch: list[tuple[int, list[int]]]) -> list[int]:
        packed = [len(p) for r, p in batch if r not in self._ranks]
        cost = self.packed_prefill_s(packed) if packed else 0.0
        cost += sum(self.pooled_prefill_s(len(p), len(self._ranks[r])) for r, p in batch if r in self._ranks)
        self.prefills += len(batch)
        for r, p in batch:
            self.rows.append(r)
            self._joined_at[r] = self.steps
            self._kv[r] = len(p)
        self.time.advance(cost)
        return [1] * len(batch)

    def decode(self) -> torch.Tensor:
        self.time.advance(self.decode_s())
        self.steps += 1
        for r in self.rows:
            self._kv[r] += 1
        return torch.ones(len(self.rows), dtype=torch.long)

    def leave(self, requests: list[int]) -> dict[int, list[int]]:
        out = {}
        for r in requests:
            out[r] = [1] * (1 + self.steps - self._joined_at.pop(r))
            self.rows.remove(r)
            del self._kv[r], self._base_share[r]
            self._reserved -= self._tokens.pop(r)
            if self._ranks.pop(r, None) is not None:
                self.pool.release(self.replica, r)
        return out

    # -- costs ----------------------------------------------------------------------------------
    def packed_prefill_s(self, lengths: list[int]) -> float:
        c, g, pp = self.cal, self.layout.tp, self.layout.pp
        flops = sum(c.dense_flops(n) + c.layers * c.attention_flops(n) for n in lengths)
        act_bytes = sum(lengths) * c.hidden * 2
        comm = 2 * c.layers * (c.allreduce_s + 2 * (g - 1) / g * act_bytes / c.link_bytes_per_s) if g > 1 else 0.0
        hops = (pp - 1) * (c.pp_hop_s + act_bytes / g / c.link_bytes_per_s)
        return max(c.prefill_host_s, flops / (g * c.prefill_flops_per_s) + comm) + hops + \
            c.prefill_per_prompt_s * len(lengths)

    def pooled_prefill_s(self, n: int, m: int) -> float:
        c, cm = self.cal, self.cal.cost_model()
        attention = cm.attention_time(n, m) + cm.transfer_time(n, m) + cm.call_overhead_s * m
        return max(c.prefill_host_s, c.dense_flops(n) / c.prefill_flops_per_s + c.layers * attention) + \
            c.prefill_per_prompt_s

    def decode_s(self) -> float:
        c, g, pp = self.cal, self.layout.tp, self.layout.pp
        own = c.weight_bytes + c.kv_bytes_per_token * sum(self._kv[r] * self._base_share[r] for r in self.rows)
        device = own / (g * c.hbm_bytes_per_s)  # PP stages one after the other: their reads add up
        comm = (pp - 1) * c.pp_hop_s + (2 * c.layers * c.allreduce_s if g > 1 else 0.0)
        pooled = [r for r in self.rows if r in self._ranks]
        if pooled:
            held = self.pool.counters()["pool_ranks"]
            ranks = {k for r in pooled for k in self._ranks[r]}
            busiest = max(held[str(k)]["kv_tokens_held"] for k in ranks) * c.kv_bytes_per_token / c.hbm_bytes_per_s
            device = max(device, busiest)
            comm += c.layers * c.pool_exchange_s
        host = c.decode_host_s + c.decode_host_per_row_s * (self.running - 1)
        return max(host, device) + comm + c.decode_fixed_s


# -- workloads -------------------------------------------------------------------------------------
#: Prompt lengths of the benchmarks' sweeps (docs/benchmarks.md, issue 5: 512 ... 128K).
PAPER_BUCKETS = (512, 2048, 8192, 16384, 32768, 65536, 131072)


def mixed_requests(n: int, rate: float, *, seed: int = 0, long_share: float = 0.1, short=(512, 2048),
                   long=(32768, 131072), new=(32, 256)) -> list[tuple[float, int, int]]:
    """``[(arrival_s, prompt_len, max_new_tokens)]``: Poisson arrivals at ``rate``; each prompt long with
    probability ``long_share`` (uniform in ``long``), else uniform in ``short``; output uniform in ``new``."""
    g = torch.Generator().manual_seed(seed + 1)
    u = torch.rand(n, generator=g, dtype=torch.float64).tolist()
    out = []
    for a, x in zip(poisson_arrivals(n, rate, seed), u):
        lo, hi = long if x < long_share else short
        out.append((a, _uniform(g, lo, hi), _uniform(g, *new)))
    return out


def bucket_requests(n: int, rate: float, *, seed: int = 0, buckets=PAPER_BUCKETS,
                    new=(32, 256)) -> list[tuple[float, int, int]]:
    """As :func:`mixed_requests`, prompt lengths drawn uniformly from ``buckets``."""
    g = torch.Generator().manual_seed(seed + 1)
    return [(a, buckets[_uniform(g, 0, len(buckets) - 1)], _uniform(g, *new))
            for a in poisson_arrivals(n, rate, seed)]


def trace_requests(path: str, default_new_tokens: int = 128) -> list[tuple[float, int, int]]:
    """A :func:`~.trace.load_trace` file's requests (text prompts counted in bytes)."""
    return [(a, len(p), new) for a, p, new in load_trace(path, tokenize=lambda s: list(s.encode()),
                                                        vocab_size=1 << 30, default_new_tokens=default_new_tokens,
                                                        random_below=2)]


def _uniform(g, lo: int, hi: int) -> int:
    return int(torch.randint(lo, hi + 1, (1,), generator=g))


# -- placement and the run ------------------------------------------------------------------------
def place(requests, layout: Layout) -> list[int]:
    """The replica of each request: the real front scheduler (:func:`~.batching.place_on_replicas`, in arrival
    order: long ones spread, then fewest tokens placed) or, with ``placement="round-robin"``, in turn."""
    if layout.placement != "round-robin":
        return place_on_replicas([Request(i, range(n), new) for i, (_, n, new) in enumerate(requests)],
                                 [a for a, _, _ in requests], replicas=layout.replicas, threshold=layout.threshold)
    order = sorted(range(len(requests)), key=lambda i: (requests[i][0], i))
    out = [0] * len(requests)
    for k, i in enumerate(order):  # in turn, in arrival order
        out[i] = k % layout.replicas
    return out


def simulate(layout: Layout, requests, cal: Calibration = Calibration(), *, slo_ttft_s: float | None = None,
             slo_tpot_s: float | None = None, max_prefill_tokens: int = 32768, pool_ranks_per_request=None) -> dict:
    """Serve ``requests`` ``[(arrival_s, prompt_len, max_new_tokens)]`` on ``layout``: :func:`~.trace.summarize`'s
    metrics plus ``layout``, ``gpus``, ``pooled`` (requests given pool ranks), ``refusals`` (their messages)
    and ``generations``."""
    time = VirtualTime()
    pool = None
    if layout.pool_ranks:
        # as the real coordinator: the engine asks for long requests only, every one gets max_per_demand ranks
        pool = SharedPoolManager(layout.pool_ranks, threshold=0, max_per_demand=pool_ranks_per_request,
                                 kv_capacity_tokens=int(cal.kv_bytes_per_gpu // cal.kv_bytes_per_token))
    engines = [SimulatedEngine(layout, cal, time, replica=k, pool=pool) for k in range(layout.replicas)]
    where = place(requests, layout)
    mine = [[] for _ in engines]
    for i, ((a, n, new), k) in enumerate(zip(requests, where)):
        mine[k].append(TimedRequest(Request(i, range(n), new), a))

    def job(k):
        return lambda clock, sleep: serve(engines[k], mine[k], max_prefill_tokens=max_prefill_tokens,
                                          clock=clock, sleep=sleep)

    gens = {g.id: g for part in time.run([job(k) for k in range(layout.replicas)]) for g in part}
    gens = [gens[i] for i in range(len(requests))]
    served = [g for g in gens if g.refused is None]
    wall = max((g.done_s for g in served), default=0.0)
    out = summarize(gens, wall, slo_ttft_s=slo_ttft_s, slo_tpot_s=slo_tpot_s)
    out.update(layout=layout.name, gpus=layout.gpus, pooled=sum(g.pooled for g in served),
               refusals=[g.refused for g in gens if g.refused is not None], generations=gens)
    return out
