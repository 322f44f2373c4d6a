#!/usr/bin/env python
"""Benchmark FA Pool attention against 1 GPU, DeepSpeed-Ulysses and all-gather-K/V CP.

Issue 3's GPU acceptance: the core attention of ONE layer (batch 1, causal, paper
shapes h=32, d=128, bf16) for n = 4K, 16K, 64K, 128K, forward and forward+backward,
all strategies in the same run on the same 2 GPUs with the same local kernel
(``megatron_fapool.attention.kernels``, ``--backend``, default ``auto``):

``1 GPU``
    rank 0 alone: ``local_attention`` (rank 1 waits at a barrier).
``pool``
    the real FA Pool path: rank 0 is a base rank with ``PoolClient`` /
    ``PooledAttention`` (``[b, s, h, d]``), rank 1 a pool rank in
    ``PoolServer.serve()``. ``--kv-chunk`` sets ``kv_chunk_tokens`` (``auto``: per n,
    the fastest of a few values by forward time, measured before the timed reps).
``ulysses``
    ``deepspeed.sequence.layer.DistributedAttention(local_fn, group, scatter_idx=2,
    gather_idx=1)`` with ``batch_dim_idx=0`` (our ``[b, s, h, d]`` layout: sequence is
    dim 1), the sequence split contiguously over the 2 ranks, the same local kernel on
    each rank's n x h/2 slice.
``cp``
    all-gather-K/V context parallelism (``tools/baselines/allgather_kv_cp.py``, which
    says why it is not torch's): rank r holds the zigzag chunks r and 3-r (of 4),
    all-gathers K and V, runs the local kernel (bottom-right causal) for its two query
    chunks against the K/V prefix they see; backward reduce-scatters dK/dV.

Checks (once per n and strategy; a failed check makes the exit code 1 after
everything is printed): out, dq, dk, dv of the checked forward+backward call, and the
output of a forward-only call, are gathered to rank 0 and compared with the 1-GPU
result: max|x - ref| / max|ref| <= 2.5e-2 for 16-bit (1e-4 float32), over the whole
tensors (compared in sequence chunks, so memory stays small). The pool must also
prove it ran: the pool rank's served-call and query-row counters must be non-zero.

Timing: warm-up, then the median of ``--reps`` repetitions; each repetition starts
after ``torch.cuda.synchronize`` and a barrier of the ranks involved and is timed with
CUDA events (``time.perf_counter`` on CPU); on 2 GPUs the slower rank counts. The pool
rank is inside its serving loop during the pool phase, so the base rank's time counts
there (it waits for the pool's results). FLOPs: causal forward = 4*b*h*d*n(n+1)/2
(``training.flops.dense_attention_forward_flops``), backward = 2.5x forward; TFLOP/s
per GPU divides by the GPUs the strategy uses.

Memory: before each strategy every rank checks that its free GPU memory covers an
estimate of the strategy's needs; if not, the row says OOM and the run goes on; an
out-of-memory error in the 1-GPU phase is caught the same way.

The markdown table (``--markdown``) is rewritten after each n, so partial results
survive a timeout. At the end: issue 3's goal lines (met / not met) and the pool's
transfer bytes per call (``PoolStats``).

Examples::

    torchrun --nproc_per_node 2 tools/bench_pool_attention.py --markdown runs/pool_bench.md
    torchrun --nproc_per_node 2 tools/bench_pool_attention.py --kv-chunk auto
    torchrun --nproc_per_node 2 tools/bench_pool_attention.py --device cpu --dtype float32 \\
        --seqlens 256,512 --heads 2 --head-dim 16 --reps 2 --warmup 1
"""

from __future__ import annotations

import argparse
import datetime as _dt
import inspect
import math
import os
import platform
import socket
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron_fapool.attention import kernels as L
from megatron_fapool.attention.pool import PooledAttention, PoolClient, PoolServer, PoolStats
from megatron_fapool.parallel import compute_layout, initialize_parallel_groups
from megatron_fapool.runtime import log0

from _common import (
    DTYPES, FWD_BWD_FLOPS, attention_flops, default_tol, fmt_bytes, free_memory, rel_err, run_distributed, time_fn,
)
from baselines.allgather_kv_cp import allgather_kv_attention, head_tail_shard, head_tail_unshard

warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed.*")

STRATEGIES = ("1gpu", "pool", "ulysses", "cp")
LABELS = {
    "1gpu": "1 GPU",
    "pool": "pool (base + 1 pool rank)",
    "ulysses": "DeepSpeed-Ulysses",
    "cp": "all-gather-KV CP",
}
GPUS = {"1gpu": 1, "pool": 2, "ulysses": 2, "cp": 2}
# Free memory each strategy may need on a rank, in units of one q tensor (b*n*h*d elements),
# on top of what the benchmark already holds (inputs, the 1-GPU reference). Generous.
MEM_UNITS = {"1gpu": 10, "pool": 16, "ulysses": 12, "cp": 14}
GOALS_SPEEDUP = ((16384, 1.8), (65536, 1.9))
GOAL_BASELINE_MIN_N = 16384
KV_CHUNK_CANDIDATES = (2048, 4096, 8192, 16384, 32768, 65536)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", default="4096,16384,65536,131072", help="comma-separated sequence lengths (multiples of 4)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--backend", default="auto", help="local kernel backend (megatron_fapool.attention.kernels), default auto")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default: 20 up to 8K, 10 up to 32K, else 5)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls (default: 5 up to 8K, 3 up to 32K, else 2)")
    p.add_argument("--kv-chunk", default=str(1 << 20), help="pool kv_chunk_tokens: an integer, or 'auto' (fastest forward per n)")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help=f"subset of {','.join(STRATEGIES)}")
    p.add_argument("--markdown", default=None, help="write the results table here (rewritten after each n)")
    p.add_argument("--tol", type=float, default=None, help="max relative error vs 1 GPU (default 2.5e-2 16-bit, 1e-4 fp32)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--pg-timeout", type=float, default=300.0, help="seconds before a stuck collective aborts the run")
    p.add_argument("--cp-reduce-dtype", default="input", choices=("input", "fp32"),
                   help="dtype of the CP baseline's dK/dV reduce-scatter (input: like TransformerEngine's CP)")
    p.add_argument("--corrupt", default=None, choices=("pool", "ulysses", "cp"),
                   help="testing aid: perturb this strategy's result before the check (the run must then fail)")
    args = p.parse_args(argv)
    args.seqlens = [int(x) for x in str(args.seqlens).split(",") if x.strip()]
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    for s in args.strategies:
        if s not in STRATEGIES:
            p.error(f"unknown strategy {s!r}; choose from {STRATEGIES}")
    if "1gpu" not in args.strategies:
        args.strategies.insert(0, "1gpu")  # the reference for checks and speedups
    for n in args.seqlens:
        if n < 8 or n % 4:
            p.error(f"sequence length {n}: must be a multiple of 4 and >= 8 (zigzag halves of 2 ranks)")
    if args.kv_chunk != "auto":
        try:
            args.kv_chunk = int(args.kv_chunk)
        except ValueError:
            p.error(f"--kv-chunk must be an integer or 'auto', got {args.kv_chunk!r}")
        if args.kv_chunk <= 0:
            p.error("--kv-chunk must be positive")
    return args


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


@dataclass
class Row:
    n: int
    strategy: str
    fwd_ms: Optional[float] = None
    fwdbwd_ms: Optional[float] = None
    status: str = "ok"  # ok | OOM | WRONG | error | unavailable | unchecked
    note: str = ""
    errors: dict = field(default_factory=dict)
    reps: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def measured(self) -> bool:
        return self.status in ("ok", "unchecked") and self.fwd_ms is not None and self.fwdbwd_ms is not None


class Bench:
    def __init__(self, args, device, rank, world):
        self.args = args
        self.device = device
        self.rank = rank
        self.world = world
        self.dtype = DTYPES[args.dtype]
        self.scale = 1.0 / math.sqrt(args.head_dim)
        self.tol = args.tol if args.tol is not None else default_tol(self.dtype)
        layout = compute_layout(world, tp=1, pool_size=world - 1, num_attention_heads=args.heads)
        self.groups = initialize_parallel_groups(layout, timeout_s=args.pg_timeout)
        self.sp_group = dist.new_group(list(range(world)), timeout=timedelta(seconds=args.pg_timeout))
        self.rows: list[Row] = []
        self.failures: list[str] = []
        self.pool_bytes: dict[int, dict] = {}
        self.kv_tuning: dict[int, dict] = {}
        self.ds_attention = None
        self.ds_note = ""
        self.ds_batch_first = True
        self.started = _dt.datetime.now(_dt.timezone.utc)
        self.env_lines = []
        if "ulysses" in args.strategies:
            self._init_deepspeed()

    # -- environment --------------------------------------------------------------------
    def _init_deepspeed(self) -> None:
        ok, note = 1, ""
        try:
            import deepspeed
            import deepspeed.comm as dscomm
            from deepspeed.sequence.layer import DistributedAttention

            dscomm.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False)
            self.ds_attention = DistributedAttention
            # DeepSpeed >= 0.14 takes batch_dim_idx (layout [b, s, h, d] with 0); older ones assume [s, b, h, d]
            self.ds_batch_first = "batch_dim_idx" in inspect.signature(DistributedAttention.forward).parameters
            note = f"deepspeed {deepspeed.__version__}"
            self._preflight_ulysses()
        except Exception as e:  # noqa: BLE001 - reported, the run goes on without Ulysses
            ok, note = 0, f"DeepSpeed-Ulysses unavailable: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        flag = torch.tensor([ok], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if not int(flag.item()):
            self.ds_attention = None
            note = note if not ok else "DeepSpeed-Ulysses unavailable on another rank"
        self.ds_note = note

    def _preflight_ulysses(self) -> None:
        """A tiny Ulysses forward+backward, so that an API mismatch shows up here, not mid-run."""
        P, a = self.world, self.args
        n = 8 * P
        g = torch.Generator(device=self.device).manual_seed(7)
        full = [torch.randn(1, n, a.heads, a.head_dim, generator=g, device=self.device, dtype=self.dtype) for _ in range(4)]
        call, to_local = self._ulysses_call()
        s = n // P
        q, k, v, dout = (to_local(x[:, self.rank * s:(self.rank + 1) * s]).contiguous().requires_grad_() for x in full)
        out = call(q, k, v)
        torch.autograd.grad(out, (q, k, v), dout)
        ref = L.local_attention(*full[:3], causal=True, softmax_scale=self.scale, backend=a.backend)
        e = rel_err(to_local(out.detach()), ref[:, self.rank * s:(self.rank + 1) * s])
        if not e <= self.tol:
            raise RuntimeError(f"DistributedAttention preflight: output differs from local attention ({e:.2e})")

    def _ulysses_call(self):
        """(call(q, k, v) -> out, to_local layout view) around DeepSpeed's DistributedAttention."""
        kw = dict(causal=True, softmax_scale=self.scale, backend=self.args.backend)
        if self.ds_batch_first:
            def local_fn(q, k, v, *args, **kwargs):
                return L.local_attention(q, k, v, **kw)

            attn = self.ds_attention(local_fn, self.sp_group, scatter_idx=2, gather_idx=1)
            return (lambda q, k, v: attn(q, k, v, 0)), (lambda x: x)  # batch_dim_idx=0: [b, s, h, d]

        def local_fn_sbhd(q, k, v, *args, **kwargs):  # old DeepSpeed: sequence-first [s, b, h, d]
            return L.local_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), **kw).transpose(0, 1)

        attn = self.ds_attention(local_fn_sbhd, self.sp_group, scatter_idx=2, gather_idx=0)
        return (lambda q, k, v: attn(q, k, v)), (lambda x: x.transpose(0, 1))

    def describe(self) -> list[str]:
        a = self.args
        dev = self.device
        if dev.type == "cuda":
            gpu = torch.cuda.get_device_name(dev)
            names = [None] * self.world
            dist.all_gather_object(names, gpu)
            gpu = " + ".join(f"rank{r}: {g}" for r, g in enumerate(names)) if len(set(names)) > 1 else f"{self.world} x {gpu}"
            cuda = f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
        else:
            gpu, cuda = f"CPU ({platform.processor() or platform.machine()}), {self.world} processes, gloo", "no CUDA"
        probe = torch.zeros(a.batch, 64, a.heads, a.head_dim, dtype=self.dtype, device=dev)
        if a.backend == "auto":
            be_f = L.select_backend(probe, probe, probe, causal=True, requires_backward=False)
            be_b = L.select_backend(probe, probe, probe, causal=True, requires_backward=True)
            backend = f"auto -> {be_f} (forward), {be_b} (forward+backward)"
        else:
            backend = a.backend
        lines = [
            f"date: {self.started.strftime('%Y-%m-%d %H:%M UTC')}, host {socket.gethostname()}",
            f"device: {gpu}; torch {torch.__version__}, {cuda}; {self.ds_note or 'Ulysses not requested'}",
            f"shape: batch {a.batch}, heads {a.heads}, head_dim {a.head_dim}, {a.dtype}, causal;"
            f" local kernel backend {backend}",
            f"pool kv_chunk_tokens: {a.kv_chunk}; CP dK/dV reduce-scatter in {a.cp_reduce_dtype} dtype;"
            f" check tolerance {self.tol:g} (max rel err vs 1 GPU)",
        ]
        self.env_lines = lines
        return lines

    def reps_for(self, n: int) -> tuple[int, int]:
        reps = self.args.reps if self.args.reps is not None else (20 if n <= 8192 else 10 if n <= 32768 else 5)
        warm = self.args.warmup if self.args.warmup is not None else (5 if n <= 8192 else 3 if n <= 32768 else 2)
        return max(1, reps), max(0, warm)

    # -- helpers ------------------------------------------------------------------------
    def make_data(self, n: int):
        a = self.args
        shape = (a.batch, n, a.heads, a.head_dim)
        if self.rank == 0:
            g = torch.Generator(device=self.device).manual_seed(a.seed + n)
            data = [torch.randn(shape, generator=g, device=self.device, dtype=self.dtype) for _ in range(4)]
        else:
            data = [torch.empty(shape, device=self.device, dtype=self.dtype) for _ in range(4)]
        for t in data:
            dist.broadcast(t, src=0)
        return data  # q, k, v, dout in [b, n, h, d]

    def memory_ok(self, strategy: str, n: int) -> tuple[bool, str]:
        """All ranks agree whether each has the free memory the strategy may need."""
        if self.device.type != "cuda":
            return True, ""
        free_memory(self.device)
        a = self.args
        unit = a.batch * n * a.heads * a.head_dim * torch.tensor([], dtype=self.dtype).element_size()
        need = MEM_UNITS[strategy] * unit
        free, _ = torch.cuda.mem_get_info(self.device)
        flag = torch.tensor([1 if free >= need else 0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if int(flag.item()):
            return True, ""
        return False, f"OOM (needs ~{need / 2**30:.1f} GiB free per GPU, rank {self.rank} has {free / 2**30:.1f} GiB)"

    def gather_seq(self, x: torch.Tensor) -> Optional[list[torch.Tensor]]:
        """Gather equal-shaped tensors of all ranks to rank 0 (list in rank order)."""
        x = x.contiguous()
        bufs = [torch.empty_like(x) for _ in range(self.world)] if self.rank == 0 else None
        dist.gather(x, bufs, dst=0, group=self.sp_group)
        return bufs

    def check(self, row: Row, ref, got: dict) -> None:
        """Rank 0: compare tensors of ``got`` with the 1-GPU reference (out, dq, dk, dv, fwd_out)."""
        if ref is None:
            row.status = "unchecked"
            row.note = (row.note + "; " if row.note else "") + "no 1-GPU reference (it failed), not checked"
            return
        names = {"out": 0, "dq": 1, "dk": 2, "dv": 3, "fwd_out": 0}
        bad = []
        if self.args.corrupt == row.strategy:  # testing aid: prove that a wrong result fails the run
            got = dict(got)
            got["out"] = got["out"].clone()
            got["out"].narrow(1, got["out"].shape[1] // 2, 1).add_(1.0)
        for name, t in got.items():
            e = rel_err(t, ref[names[name]])
            row.errors[name] = e
            if not e <= self.tol:
                bad.append(f"{name} {e:.2e}")
        if bad:
            row.status = "WRONG"
            msg = f"n={row.n} {LABELS[row.strategy]}: result differs from 1 GPU ({', '.join(bad)} > tol {self.tol:g})"
            row.note = (row.note + "; " if row.note else "") + "WRONG: " + ", ".join(bad)
            self.failures.append(msg)

    # -- strategies ---------------------------------------------------------------------
    def run_1gpu(self, n: int, data):
        row = Row(n, "1gpu")
        ref = None
        reps, warm = self.reps_for(n)
        ok, why = self.memory_ok("1gpu", n)
        if not ok:
            row.status, row.note = "OOM", why
        elif self.rank == 0:
            q, k, v, dout = data
            kw = dict(causal=True, softmax_scale=self.scale, backend=self.args.backend)
            qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))

            def fwd():
                with torch.no_grad():
                    return L.local_attention(q, k, v, **kw)

            def fwdbwd():
                out = L.local_attention(qg, kg, vg, **kw)
                dq, dk, dv = torch.autograd.grad(out, (qg, kg, vg), dout)
                return out.detach(), dq, dk, dv

            try:
                ref = fwdbwd()
                fwd_out = fwd()
                e = rel_err(fwd_out, ref[0])
                row.errors["fwd_out"] = e
                del fwd_out
                if not e <= self.tol:  # forward-only and forward+backward kernels disagree
                    row.status, row.note = "WRONG", f"WRONG: fwd-only out vs fwd+bwd out {e:.2e}"
                    self.failures.append(f"n={n} 1 GPU: forward-only output differs from forward+backward ({e:.2e})")
                row.fwd_ms = statistics.median(time_fn(fwd, reps=reps, warmup=warm, device=self.device))
                row.fwdbwd_ms = statistics.median(time_fn(fwdbwd, reps=reps, warmup=warm, device=self.device))
                row.reps = reps
            except torch.OutOfMemoryError:
                ref = None
                row.status, row.note = "OOM", "OOM (out of memory on rank 0)"
            del qg, kg, vg
        free_memory(self.device)
        dist.barrier()
        return row, ref

    def run_pool(self, n: int, data, ref):
        row = Row(n, "pool")
        ok, why = self.memory_ok("pool", n)
        if not ok:
            row.status, row.note = "OOM", why
            dist.barrier()
            return row
        reps, warm = self.reps_for(n)
        if self.groups.is_pool:
            server_stats = PoolServer(self.groups, device=self.device, stats=PoolStats()).serve().as_dict()
            infos = [None] * self.world
            dist.all_gather_object(infos, server_stats)
            dist.barrier()
            return row
        client = PoolClient(self.groups, kv_chunk_tokens=8192, backend=self.args.backend, stats=PoolStats())
        active = self.world - 1
        try:
            q, k, v, dout = data
            qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))

            def fwd():
                with torch.no_grad():
                    return PooledAttention.apply(q, k, v, client, active, True, self.scale)

            def fwdbwd():
                out = PooledAttention.apply(qg, kg, vg, client, active, True, self.scale)
                dq, dk, dv = torch.autograd.grad(out, (qg, kg, vg), dout)
                return out.detach(), dq, dk, dv

            # kv chunk size
            if self.args.kv_chunk == "auto":
                cands = sorted({c for c in KV_CHUNK_CANDIDATES if c < n} | {n})
                tun = {}
                for c in cands:
                    client.kv_chunk = c
                    tun[c] = statistics.median(time_fn(fwd, reps=3, warmup=1, device=self.device))
                best = min(tun, key=tun.get)
                self.kv_tuning[n] = tun
                client.kv_chunk = best
            else:
                client.kv_chunk = self.args.kv_chunk
            row.extra["kv_chunk"] = client.kv_chunk

            # checked call, with the bytes it moves
            client.stats.reset()
            with torch.no_grad():
                fwd_out = fwd()
            fwd_only = dict(sent=client.stats.bytes_sent, received=client.stats.bytes_received)
            client.stats.reset()
            out, dq, dk, dv = fwdbwd()
            st = client.stats
            self.pool_bytes[n] = dict(
                fwd_only=fwd_only, fwdbwd=dict(sent=st.bytes_sent, received=st.bytes_received),
                pooled_forward=st.pooled_forward, pooled_backward=st.pooled_backward, kv_chunk=client.kv_chunk,
            )
            if st.pooled_forward != 1 or st.pooled_backward != 1:
                self.failures.append(f"n={n} pool: the client did not run a pooled call ({st.as_dict()})")
                row.status = "WRONG"
            self.check(row, ref, {"out": out, "dq": dq, "dk": dk, "dv": dv, "fwd_out": fwd_out})
            del out, dq, dk, dv, fwd_out
            row.fwd_ms = statistics.median(time_fn(fwd, reps=reps, warmup=warm, device=self.device))
            row.fwdbwd_ms = statistics.median(time_fn(fwdbwd, reps=reps, warmup=warm, device=self.device))
            row.reps = reps
            row.note = f"kv_chunk {client.kv_chunk}" + (f"; {row.note}" if row.note else "")
        finally:
            client.shutdown(self.device)
        infos = [None] * self.world
        dist.all_gather_object(infos, None)
        served = infos[1]
        self.pool_bytes[n]["pool_rank"] = served
        if not served or served["served_forward"] < 1 or served["served_backward"] < 1 or served["query_rows"] <= 0:
            row.status = "WRONG"
            self.failures.append(f"n={n} pool: the pool rank did not compute (its counters: {served})")
        free_memory(self.device)
        dist.barrier()
        return row

    def run_ulysses(self, n: int, data, ref):
        row = Row(n, "ulysses")
        if self.ds_attention is None:
            row.status, row.note = "unavailable", self.ds_note
            return row
        call, to_local = self._ulysses_call()
        s, r = n // self.world, self.rank
        return self.run_sharded(
            row, data, ref, call=call,
            shard=lambda x: to_local(x[:, r * s:(r + 1) * s]).contiguous(),  # contiguous split of the sequence
            unshard=lambda parts: torch.cat([to_local(p) for p in parts], dim=1),
        )

    def run_cp(self, n: int, data, ref):
        reduce_dtype = torch.float32 if self.args.cp_reduce_dtype == "fp32" else self.dtype

        def call(q, k, v):
            return allgather_kv_attention(q, k, v, group=self.sp_group, softmax_scale=self.scale,
                                          backend=self.args.backend, reduce_dtype=reduce_dtype)

        return self.run_sharded(
            Row(n, "cp"), data, ref, call=call,
            shard=lambda x: head_tail_shard(x, self.rank, self.world), unshard=head_tail_unshard,
        )

    def run_sharded(self, row: Row, data, ref, *, call: Callable, shard: Callable, unshard: Callable) -> Row:
        """A strategy every rank computes: ``call`` on this rank's ``shard`` of q, k, v (and dout);
        out, dq, dk, dv gathered to rank 0, put back in sequence order by ``unshard`` and checked;
        then forward and forward+backward timed over the ranks."""
        ok, why = self.memory_ok(row.strategy, row.n)
        if not ok:
            row.status, row.note = "OOM", why
            return row
        reps, warm = self.reps_for(row.n)
        q, k, v, dout = (shard(x) for x in data)
        qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))

        def fwd():
            with torch.no_grad():
                return call(q, k, v)

        def fwdbwd():
            out = call(qg, kg, vg)
            dq, dk, dv = torch.autograd.grad(out, (qg, kg, vg), dout)
            return out.detach(), dq, dk, dv

        fwd_out = fwd()
        res = dict(zip(("out", "dq", "dk", "dv"), fwdbwd()))
        res["fwd_out"] = fwd_out
        got = {}
        for name, t in res.items():
            parts = self.gather_seq(t)
            if self.rank == 0:
                got[name] = unshard(parts)
        del res, fwd_out, parts
        if self.rank == 0:
            self.check(row, ref, got)
        del got
        row.fwd_ms = statistics.median(time_fn(fwd, reps=reps, warmup=warm, device=self.device, group=self.sp_group))
        row.fwdbwd_ms = statistics.median(time_fn(fwdbwd, reps=reps, warmup=warm, device=self.device, group=self.sp_group))
        row.reps = reps
        free_memory(self.device)
        return row

    # -- driver -------------------------------------------------------------------------
    def run(self) -> int:
        for line in self.describe():
            log0(line)
        for n in self.args.seqlens:
            t0 = time.perf_counter()
            reps, warm = self.reps_for(n)
            log0(f"\n== n = {n} (reps {reps}, warm-up {warm}) ==")
            data = self.make_data(n)
            row, ref = self.run_1gpu(n, data)
            self._add(row)
            for s in self.args.strategies:
                if s == "1gpu":
                    continue
                runner = {"pool": self.run_pool, "ulysses": self.run_ulysses, "cp": self.run_cp}[s]
                row = runner(n, data, ref)
                self._add(row)
            del data, ref
            free_memory(self.device)
            dist.barrier()
            if self.rank == 0:
                self.print_pool_bytes(n)
                self.write_markdown(final=False)
            log0(f"   (n = {n} took {time.perf_counter() - t0:.1f} s)")
        if self.rank == 0:
            self.print_summary()
            self.write_markdown(final=True)
        flag = torch.tensor([len(self.failures)], device=self.device)
        dist.broadcast(flag, src=0)
        return 1 if int(flag.item()) else 0

    def _add(self, row: Row) -> None:
        self.rows.append(row)
        if self.rank == 0:
            log0("   " + self.format_row(row, plain=True))

    # -- reporting ----------------------------------------------------------------------
    def row_of(self, n: int, strategy: str) -> Optional[Row]:
        for r in self.rows:
            if r.n == n and r.strategy == strategy:
                return r
        return None

    def derived(self, row: Row) -> dict:
        a = self.args
        base = self.row_of(row.n, "1gpu")
        f = attention_flops(a.batch, a.heads, row.n, a.head_dim)
        out = {}
        if row.measured:
            g = GPUS[row.strategy]
            out["tf_fwd"] = f / (row.fwd_ms * 1e-3) / g / 1e12
            out["tf_fb"] = FWD_BWD_FLOPS * f / (row.fwdbwd_ms * 1e-3) / g / 1e12
            if base is not None and base.measured:
                out["sp_fwd"] = base.fwd_ms / row.fwd_ms
                out["sp_fb"] = base.fwdbwd_ms / row.fwdbwd_ms
        return out

    def format_row(self, row: Row, plain: bool = False) -> str:
        d = self.derived(row)
        err = max(row.errors.values()) if row.errors else None

        def ms(x):
            return f"{x:.3f}" if x is not None else "-"

        def sp(key):
            return f"{d[key]:.2f}x" if key in d else "-"

        def tf(key):
            if key not in d:
                return "-"
            return f"{d[key]:.1f}" if d[key] >= 10 else f"{d[key]:.3g}"

        status = row.status if row.status != "ok" else "ok"
        check = f"{status} ({err:.1e})" if err is not None else status
        cells = [
            str(row.n), LABELS[row.strategy],
            ms(row.fwd_ms) if row.status != "OOM" else "OOM",
            ms(row.fwdbwd_ms) if row.status != "OOM" else "OOM",
            sp("sp_fwd"), sp("sp_fb"), tf("tf_fwd"), tf("tf_fb"), check, row.note,
        ]
        if plain:
            return (f"{LABELS[row.strategy]:<26} fwd {cells[2]:>9} ms  fwd+bwd {cells[3]:>9} ms  "
                    f"speedup {cells[4]:>6} / {cells[5]:>6}  TFLOP/s/GPU {cells[6]:>6} / {cells[7]:>6}  "
                    f"check {check}" + (f"  [{row.note}]" if row.note else ""))
        return "| " + " | ".join(cells) + " |"

    def goal_lines(self) -> list[str]:
        lines = []
        for n, target in GOALS_SPEEDUP:
            pool = self.row_of(n, "pool")
            for key, what in (("sp_fwd", "fwd"), ("sp_fb", "fwd+bwd")):
                label = f"pool speedup over 1 GPU >= {target}x at n={n} ({what})"
                if pool is not None and pool.status == "WRONG":
                    lines.append(f"{label}: NOT MET (the pool's result is wrong)")
                    continue
                if pool is None or key not in self.derived(pool):
                    lines.append(f"{label}: NOT MEASURED")
                    continue
                val = self.derived(pool)[key]
                ok = val >= target and pool.status == "ok"
                lines.append(f"{label}: {'met' if ok else 'NOT MET'} ({val:.2f}x)")
        for n in sorted({r.n for r in self.rows if r.n >= GOAL_BASELINE_MIN_N}):
            pool = self.row_of(n, "pool")
            for base in ("ulysses", "cp"):
                for attr, what in (("fwd_ms", "fwd"), ("fwdbwd_ms", "fwd+bwd")):
                    b = self.row_of(n, base)
                    label = f"pool not slower than {LABELS[base]} at n={n} ({what})"
                    if pool is not None and pool.status == "WRONG":
                        lines.append(f"{label}: NOT MET (the pool's result is wrong)")
                        continue
                    if pool is None or b is None or not pool.measured or not b.measured:
                        lines.append(f"{label}: NOT MEASURED")
                        continue
                    pv, bv = getattr(pool, attr), getattr(b, attr)
                    ok = pv <= bv and pool.status == "ok"
                    lines.append(f"{label}: {'met' if ok else 'NOT MET'} (pool {pv:.2f} ms vs {bv:.2f} ms, {bv / pv:.2f}x)")
        if not any(r.n >= GOAL_BASELINE_MIN_N for r in self.rows):
            lines.append(f"pool not slower than either baseline at n >= {GOAL_BASELINE_MIN_N}: NOT MEASURED (no such n)")
        return lines

    def pool_bytes_lines(self) -> list[str]:
        lines = []
        for n, pb in sorted(self.pool_bytes.items()):
            f, fb = pb["fwd_only"], pb["fwdbwd"]
            lines.append(
                f"n={n} (kv_chunk {pb['kv_chunk']}): forward-only call: base sent {fmt_bytes(f['sent'])},"
                f" received {fmt_bytes(f['received'])}; forward+backward: base sent {fmt_bytes(fb['sent'])},"
                f" received {fmt_bytes(fb['received'])}"
            )
        for n, tun in sorted(self.kv_tuning.items()):
            best = min(tun, key=tun.get)
            lines.append(f"n={n} kv_chunk tuning (pool fwd ms): "
                         + ", ".join(f"{c}: {t:.3f}" for c, t in sorted(tun.items())) + f" -> fastest {best}")
        return lines

    def print_pool_bytes(self, n: int) -> None:
        for line in self.pool_bytes_lines():
            if line.startswith(f"n={n} "):
                log0("   " + line)

    def print_summary(self) -> None:
        log0("\n== results ==")
        log0(self.table())
        log0("\n== pool transfer bytes per call (PoolStats of the base rank) ==")
        for line in self.pool_bytes_lines():
            log0(line)
        log0("\n== issue 3 goals ==")
        for line in self.goal_lines():
            log0(line)
        log0("\n== checks ==")
        if self.failures:
            for f in self.failures:
                log0(f"FAILED: {f}")
        else:
            log0("all checks passed (every strategy matches 1 GPU within tolerance; the pool rank computed)")

    def table(self) -> str:
        head = ("| n | strategy | fwd ms | fwd+bwd ms | fwd speedup | fwd+bwd speedup | fwd TFLOP/s/GPU"
                " | fwd+bwd TFLOP/s/GPU | check (max rel err) | note |")
        sep = "|" + "---|" * 10
        return "\n".join([head, sep] + [self.format_row(r) for r in self.rows])

    def write_markdown(self, final: bool) -> None:
        path = self.args.markdown
        if not path:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        parts = ["# FA Pool attention benchmark (tools/bench_pool_attention.py)", ""]
        parts += [f"- {line}" for line in self.env_lines]
        parts += [f"- command: `{' '.join(sys.argv)}`", ""]
        if not final:
            parts += ["**Partial results** (run still in progress or interrupted).", ""]
        parts += [self.table(), ""]
        parts += ["Speedup = 1-GPU time / strategy time. TFLOP/s per GPU: causal forward 4*b*h*d*n(n+1)/2,"
                  " backward 2.5x, divided by the GPUs the strategy uses. Median of the reps; 2-rank"
                  " strategies count the slower rank.", ""]
        pb = self.pool_bytes_lines()
        if pb:
            parts += ["## Pool transfer bytes per call", ""] + [f"- {x}" for x in pb] + [""]
        parts += ["## Issue 3 goals", ""] + [f"- {x}" for x in self.goal_lines()] + [""]
        parts += ["## Checks", ""]
        parts += [f"- FAILED: {f}" for f in self.failures] or ["- all checks passed so far"]
        with open(path + ".tmp", "w") as f:
            f.write("\n".join(parts) + "\n")
        os.replace(path + ".tmp", path)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_distributed(
        "bench_pool_attention", lambda device, rank, world: Bench(args, device, rank, world).run(),
        device=args.device, timeout_s=args.pg_timeout, usage="base rank + 1 pool rank",
    )


if __name__ == "__main__":
    sys.exit(main())
