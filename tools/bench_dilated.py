#!/usr/bin/env python
"""Benchmark dilated attention (issue 6): ours vs FlexAttention, 1 GPU and head-parallel.

What one run measures, for every ``--seqlens`` n (batch 1):

* **ours, 1 GPU** — ``dilated_attention`` forward, and forward + backward.
* **dense blocks** — the same kernel calls as ours (same block shapes, same chunking)
  on pre-made contiguous tensors with ``attention_forward`` / ``attention_backward``:
  the local kernel's own rate on the equivalent dense problem. ``share of dense`` is
  (dense time) / (our time) for the same FLOPs: what gather, merge and scatter cost.
* **flex, 1 GPU** — FlexAttention (compiled on CUDA) with ONE block mask for the union
  of the branches and ``score_mod = score + log C`` (C = multiplicity of the key over
  the branches, DESIGN.md §4). That is the definition itself in one kernel, so it is
  the faithful baseline (per-branch masks merged by LSE compute the same thing but
  need gradients through flex's lse). Its block mask is the union of the segments, so
  it computes far more than the dilated FLOPs; its TFLOP/s column still counts only
  the dilated FLOPs (useful work), like ours.
* With ``torchrun --nproc_per_node P`` (P > 1): the 1-GPU rows are measured on every
  rank at once (identical, independent work, no communication), then **ours, P GPUs**
  (``dilated_attention_parallel``, all-to-all head-parallel) and **flex, P GPUs** (the
  same all-to-alls around flex on each rank's heads), and the speedup over 1 GPU.

Timing: warm-up (includes compilation and plan building), then the median of
``--iters`` steps timed with CUDA events (``time.perf_counter`` on CPU); on P GPUs the
slowest rank counts. Memory: peak ``max_memory_allocated`` per GPU during the timed
forward + backward steps, inputs and gradients included; ``KiB/token`` = that peak
divided by n. FLOPs: ``dilated_attention_flops`` (4 d per attended pair, causal
triangle counted exactly), backward = 2.5x forward, so forward + backward = 3.5x.

Self-checks (a failed one makes the exit code 1, after the table is written):
ours vs the float64 definition at ``--check-seqlen`` (bar 2.5e-2 for 16-bit inputs,
1e-5 for float32); at every n, ours vs flex on sampled rows of the output and dq, and
P GPUs vs 1 GPU likewise. Goals (issue 6) are stated for the largest n.

Examples::

    python tools/bench_dilated.py --markdown runs/dilated_1gpu.md
    torchrun --nproc_per_node 2 tools/bench_dilated.py --markdown runs/dilated_2gpu.md
    python tools/bench_dilated.py --device cpu --seqlens 4096 --heads 4 --head-dim 16 \\
        --segments 256,512 --rates 1,2
    torchrun --nproc_per_node 2 tools/bench_dilated.py --device cpu --seqlens 4096 \\
        --heads 4 --head-dim 16 --segments 256,512 --rates 1,2
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch._dynamo
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_fapool.attention import local as L  # noqa: E402
from megatron_fapool.attention.dilated import (  # noqa: E402
    dilated_attention,
    dilated_attention_flops,
    dilated_attention_parallel,
    dilated_attention_reference_vjp,
)
from megatron_fapool.attention.dilated_blocks import DEFAULT_MAX_ROWS_X_HEADS  # noqa: E402
from megatron_fapool.attention.dilated_comm import heads_to_seq, seq_to_heads  # noqa: E402
from megatron_fapool.attention.dilated_plan import ceil_div, head_offset, plan_branch  # noqa: E402

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GOAL_TOKENS_PER_S = 4e6
GOAL_SHARE = 0.60
GOAL_SPEEDUP = 1.8


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--seqlens", type=ints, default=[131072, 524288, 1048576])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bf16", choices=sorted(_DTYPES))
    p.add_argument("--segments", type=ints, default=[2048, 4096, 8192, 16384, 32768])
    p.add_argument("--rates", type=ints, default=[1, 2, 4, 8, 16])
    p.add_argument("--no-causal", dest="causal", action="store_false")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--flex-iters", type=int, default=3, help="timed steps for flex (it is much slower)")
    p.add_argument("--backend", default="auto", help="local kernel backend for ours and the dense blocks")
    p.add_argument("--max-rows-x-heads", type=int, default=DEFAULT_MAX_ROWS_X_HEADS)
    p.add_argument("--check-seqlen", type=int, default=None, help="n for the float64 check (0: skip)")
    p.add_argument("--skip-flex", action="store_true")
    p.add_argument(
        "--flex-mode", default="union", choices=["union", "branches"],
        help="union: one flex call, block mask of the union, score_mod + log C (the definition);"
        " branches: one flex call per branch mask, outputs merged by lse (LongNet's form)",
    )
    p.add_argument("--skip-dense", action="store_true")
    p.add_argument("--skip-single", action="store_true", help="with P > 1: skip the 1-GPU rows")
    p.add_argument("--markdown", default=None, help="write the report here (rank 0), rewritten after every n")
    args = p.parse_args(argv)
    if len(args.segments) != len(args.rates):
        p.error("--segments and --rates need the same number of entries")
    if args.check_seqlen is None:
        args.check_seqlen = 6221 if args.device == "cuda" else 1000
    return args


# ------------------------------------------------------------------------------------
# Process group, timing, memory
# ------------------------------------------------------------------------------------


@dataclass
class Env:
    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)

    def max(self, x: float) -> float:
        """Max over ranks (the slowest rank / the fullest GPU counts)."""
        if self.world == 1:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


def setup(args) -> Env:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group(
            "nccl" if args.device == "cuda" else "gloo", timeout=_dt.timedelta(minutes=10)
        )
        return Env(device, dist.get_rank(), dist.get_world_size())
    return Env(device)


def timed_median_ms(env: Env, step: Callable[[], None], warmup: int, iters: int) -> tuple[float, float]:
    """(median ms over the slowest rank, peak bytes allocated on this device during the steps)."""
    for _ in range(warmup):
        step()
    env.sync()
    if env.cuda:
        torch.cuda.reset_peak_memory_stats(env.device)
    times = []
    for _ in range(iters):
        if env.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    peak = float(torch.cuda.max_memory_allocated(env.device)) if env.cuda else float("nan")
    return env.max(statistics.median(times)), env.max(peak)


def free(env: Env) -> None:
    if env.cuda:
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------
# The implementations under test
# ------------------------------------------------------------------------------------


def make_inputs(n: int, heads: int, d: int, dtype, device, seed: int = 1234):
    """q, k, v, dout [1, n, heads, d], identical on every rank (seeded on the device)."""
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(1, n, heads, d, generator=g, device=device, dtype=dtype) for _ in range(4)]


class FlexUnion:
    """FlexAttention with one block mask for the union of branches and score_mod + log C.

    Local heads are global heads ``first_head ..`` of ``total_heads``. The block mask is
    computed for head 0 and broadcast over heads when that is exact (some branch has
    r = 1, so every block's emptiness is head-independent, and no r exceeds the 128-row
    block); otherwise per head.
    """

    def __init__(self, n, segs, rates, total_heads, first_head, num_heads, causal, device, scale):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        ws = [min(w, n) for w in segs]
        per = [ceil_div(total_heads, r) for r in rates]

        def count(h, q_idx, kv_idx):
            gh = h + first_head
            c = None
            for w, r, hp in zip(ws, rates, per):
                s = gh // hp
                hit = (q_idx // w == kv_idx // w) & ((q_idx % w) % r == s) & ((kv_idx % w) % r == s)
                c = hit.to(torch.int32) if c is None else c + hit.to(torch.int32)
            if causal:
                c = c * (kv_idx <= q_idx).to(torch.int32)
            return c

        def mask_mod(b, h, q_idx, kv_idx):
            return count(h, q_idx, kv_idx) > 0

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + torch.log(count(h, q_idx, kv_idx).to(score.dtype))

        broadcast = 1 in rates and max(rates) <= 128
        cuda = device.type == "cuda"
        # Every n (and head subset) compiles anew: allow more than dynamo's default 8.
        for name in ("cache_size_limit", "recompile_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
        self.block_mask = create_block_mask(
            mask_mod, None, None if broadcast else num_heads, n, n, device=device, _compile=cuda
        )
        self.score_mod, self.scale = score_mod, scale
        self.fn = torch.compile(flex_attention, dynamic=False) if cuda else flex_attention
        self.backward_ok = cuda  # torch: "FlexAttention does not support backward on CPU"

    def __call__(self, q, k, v):
        import warnings

        with warnings.catch_warnings():  # eager flex on CPU warns that it is unfused: known
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            out = self._call(q, k, v)
        return out

    def _call(self, q, k, v):
        out = self.fn(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            score_mod=self.score_mod, block_mask=self.block_mask, scale=self.scale,
        )
        return out.transpose(1, 2)


class FlexBranches:
    """LongNet's form: one FlexAttention call per branch with that branch's dilated block
    mask, the branch outputs merged by their lse (autograd through the merge and lse)."""

    def __init__(self, n, segs, rates, total_heads, first_head, num_heads, causal, device, scale):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        cuda = device.type == "cuda"
        for name in ("cache_size_limit", "recompile_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
        self.masks = []
        for w, r in zip(segs, rates):
            w, hp = min(w, n), ceil_div(total_heads, r)

            def mask_mod(b, h, q_idx, kv_idx, w=w, r=r, hp=hp):
                s = (h + first_head) // hp
                hit = (q_idx // w == kv_idx // w) & ((q_idx % w) % r == s) & ((kv_idx % w) % r == s)
                return hit & (kv_idx <= q_idx) if causal else hit

            # Head 0's block structure is every head's when r <= 128 (see FlexUnion).
            heads = None if r <= 128 else num_heads
            self.masks.append(create_block_mask(mask_mod, None, heads, n, n, device=device, _compile=cuda))
        self.scale = scale
        self.fn = torch.compile(flex_attention, dynamic=False) if cuda else flex_attention
        self.backward_ok = cuda

    def __call__(self, q, k, v):
        import warnings

        try:
            from torch.nn.attention.flex_attention import AuxRequest
        except ImportError:  # older torch
            AuxRequest = None
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        outs, lses = [], []
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            for mask in self.masks:
                if AuxRequest is None:
                    o, lse = self.fn(qt, kt, vt, block_mask=mask, scale=self.scale, return_lse=True)
                else:
                    o, aux = self.fn(qt, kt, vt, block_mask=mask, scale=self.scale, return_aux=AuxRequest(lse=True))
                    lse = aux.lse
                outs.append(o)
                lses.append(lse.float())
        lse_all = torch.logsumexp(torch.stack(lses), dim=0)  # every row has a key when r=1 is a branch
        out = sum(torch.exp(l - lse_all).unsqueeze(-1) * o.float() for o, l in zip(outs, lses))
        return out.to(q.dtype).transpose(1, 2)


FLEX = {"union": FlexUnion, "branches": FlexBranches}
FLEX_LABEL = {"union": "flex (union mask, score_mod log C)", "branches": "flex (mask per branch, LSE merge)"}


def dense_block_shapes(n, args, first_head, num_heads) -> Counter:
    """Kernel calls ours makes: (batch, q rows, k rows, heads, causal) -> count."""
    shapes: Counter = Counter()
    for w, r in zip(args.segments, args.rates):
        for group in plan_branch(n, w, r, total_heads=args.heads, first_head=first_head, num_heads=num_heads, causal=args.causal):
            for c in group.chunks(args.max_rows_x_heads):
                shapes[(c.num_blocks, c.q_len, c.k_len, c.num_heads, c.causal)] += 1
    return shapes


def time_dense_blocks(env: Env, args, n, first_head, num_heads, dtype) -> tuple[float, float]:
    """(forward ms, forward+backward ms) of ours' kernel calls on ready dense blocks."""
    fwd_total = fb_total = 0.0
    for (batch, lq, lk, heads, causal), count in dense_block_shapes(n, args, first_head, num_heads).items():
        g = torch.Generator(device=env.device).manual_seed(7)
        mk = lambda rows: torch.randn(batch, rows, heads, args.head_dim, generator=g, device=env.device, dtype=dtype)  # noqa: E731
        q, k, v, dout = mk(lq), mk(lk), mk(lk), mk(lq)
        kw = dict(causal=causal, backend=args.backend)
        out, lse = L.attention_forward(q, k, v, **kw)
        fwd, _ = timed_median_ms(env, lambda: L.attention_forward(q, k, v, **kw), args.warmup, args.iters)

        def fwd_bwd():
            o, l = L.attention_forward(q, k, v, **kw)
            L.attention_backward(dout, q, k, v, o, l, **kw)

        fb, _ = timed_median_ms(env, fwd_bwd, args.warmup, args.iters)
        fwd_total += count * fwd
        fb_total += count * fb
        del q, k, v, dout, out, lse
        free(env)
    return fwd_total, fb_total


# ------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------


@dataclass
class Row:
    n: int
    gpus: int
    impl: str
    fwd_ms: float = float("nan")
    fb_ms: float = float("nan")
    peak: float = float("nan")
    tflops: float = float("nan")
    dense_tflops: float = float("nan")
    share: float = float("nan")
    speedup: float = float("nan")
    note: str = ""

    def cells(self, device_word: str) -> list[str]:
        f = lambda x, spec: "–" if x != x else format(x, spec)  # noqa: E731
        tok = self.n / (self.fb_ms / 1e3) if self.fb_ms == self.fb_ms else float("nan")
        return [
            f"{self.n // 1024}K" if self.n % 1024 == 0 else str(self.n),
            f"{self.gpus} {device_word}",
            self.impl,
            f(self.fwd_ms, ".1f"),
            f(self.fb_ms, ".1f"),
            f(tok / 1e6, ".2f"),
            f(self.tflops, ".3g"),
            f(self.dense_tflops, ".3g"),
            f(self.share * 100, ".0f") + ("%" if self.share == self.share else ""),
            f(self.peak / 2**30, ".1f"),
            f(self.peak / self.n / 1024, ".1f"),
            f(self.speedup, ".2f") + ("x" if self.speedup == self.speedup else ""),
            self.note,
        ]


HEADER = [
    "n", "GPUs", "impl", "fwd ms", "fwd+bwd ms", "M tokens/s (fwd+bwd)", "TFLOP/s per GPU (fwd+bwd)",
    "dense-kernel TFLOP/s", "share of dense", "peak GiB/GPU", "KiB/token", "speedup vs 1 GPU", "note",
]


@dataclass
class Report:
    args: argparse.Namespace
    env: Env
    rows: list[Row] = field(default_factory=list)
    checks: list[tuple[str, float, float]] = field(default_factory=list)  # (what, error, bar)
    started: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))

    def check(self, what: str, err: float, bar: float) -> None:
        self.checks.append((what, err, bar))
        ok = err <= bar
        self.env.log(f"  check {'ok  ' if ok else 'FAIL'} {what}: rel err {err:.2e} (bar {bar:.1e})")

    @property
    def failed(self) -> list[str]:
        return [w for w, e, b in self.checks if not e <= b]

    def device_line(self) -> str:
        if self.env.cuda:
            name = torch.cuda.get_device_name(self.env.device)
            return f"{self.env.world} x {name}, CUDA {torch.version.cuda}, torch {torch.__version__}"
        return f"CPU ({os.cpu_count()} cores, {self.env.world} process(es)), torch {torch.__version__}"

    def markdown(self) -> str:
        a = self.args
        word = "GPU" if self.env.cuda else "proc"
        lines = [
            "### Dilated attention: ours vs FlexAttention",
            "",
            f"- Device: {self.device_line()}; date: {self.started}",
            f"- Shape: batch 1, heads {a.heads}, head dim {a.head_dim}, {a.dtype}, "
            f"{'causal' if a.causal else 'non-causal'}; branches (w, r) = "
            + ", ".join(f"({w}, {r})" for w, r in zip(a.segments, a.rates)),
            f"- Local kernel backend: {a.backend} -> {self.backend_choice()}; "
            f"warm-up {a.warmup}, median of {a.iters} (flex: {a.flex_iters}) steps",
            "- Command: `" + " ".join(["torchrun --nproc_per_node %d" % self.env.world if self.env.world > 1 else "python"] + sys.argv) + "`",
            "",
            "| " + " | ".join(HEADER) + " |",
            "|" + "---|" * len(HEADER),
        ]
        lines += ["| " + " | ".join(r.cells(word)) + " |" for r in self.rows]
        lines += ["", "Checks (relative error max|a-b|/max|ref|):", ""]
        lines += [f"- {'ok' if e <= b else '**FAIL**'}: {w}: {e:.2e} (bar {b:.1e})" for w, e, b in self.checks]
        lines += ["", "Goals (issue 6):", ""] + self.goals()
        return "\n".join(lines) + "\n"

    def backend_choice(self) -> str:
        try:
            x = torch.zeros(1, 128, 1, self.args.head_dim, dtype=_DTYPES[self.args.dtype], device=self.env.device)
            return L.select_backend(x, x, x, causal=True, requires_backward=True)
        except Exception as e:  # noqa: BLE001
            return f"? ({type(e).__name__})"

    def goals(self) -> list[str]:
        n = max(self.args.seqlens)
        world = self.env.world
        par = next((r for r in self.rows if r.n == n and r.impl == "ours" and r.gpus == world), None)
        one = next((r for r in self.rows if r.n == n and r.impl == "ours" and r.gpus == 1), None)
        out = []

        def line(text, value, goal, fmt):
            ok = value == value and value >= goal
            out.append(f"- {'met' if ok else 'NOT met'}: {text}: {format(value, fmt)} (goal >= {format(goal, fmt)})")

        if par is not None and world > 1:
            line(f"tokens/s fwd+bwd at n={n} on {world} GPUs", n / (par.fb_ms / 1e3), GOAL_TOKENS_PER_S, ".3g")
            line(f"speedup {world} GPUs vs 1 at n={n}", par.speedup, GOAL_SPEEDUP, ".2f")
        elif one is not None:
            out.append(f"- tokens/s at n={n} on 1 GPU: {n / (one.fb_ms / 1e3):.3g} (the 4M goal is for 2 GPUs)")
        best = par if par is not None else one
        if best is not None:
            line(f"share of the dense kernel's rate at n={n}", best.share, GOAL_SHARE, ".2f")
        return out or ["- no result at the largest n"]

    def write(self) -> None:
        if self.env.rank == 0 and self.args.markdown:
            os.makedirs(os.path.dirname(os.path.abspath(self.args.markdown)), exist_ok=True)
            with open(self.args.markdown, "w") as f:
                f.write(self.markdown())


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def guarded(env: Env, row: Row, fn: Callable[[], None]) -> None:
    """Run one measurement; OOM or an error becomes a note in the row, not a crash."""
    try:
        fn()
    except torch.OutOfMemoryError:
        row.note = "OOM"
        env.log(f"  {row.impl} on {row.gpus}: out of memory")
    except Exception as e:  # noqa: BLE001
        row.note = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        env.log(f"  {row.impl} on {row.gpus}: {row.note}")
    free(env)


# ------------------------------------------------------------------------------------
# Phases
# ------------------------------------------------------------------------------------


def bar_for(dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 2.5e-2


def correctness_check(env: Env, args, report: Report, dtype) -> None:
    n = args.check_seqlen
    env.log(f"check: ours vs float64 definition at n={n}")
    q, k, v, dout = make_inputs(n, args.heads, args.head_dim, dtype, env.device, seed=99)
    segs, rates = args.segments, args.rates
    qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
    out = dilated_attention(qq, kk, vv, segs, rates, args.causal, backend=args.backend)
    out.backward(dout)
    ref = dilated_attention_reference_vjp(dout, q, k, v, segs, rates, args.causal)
    for name, a, r in zip(("out", "dq", "dk", "dv"), (out, qq.grad, kk.grad, vv.grad), ref):
        report.check(f"n={n} {name} vs float64 definition", env.max(rel_err(a, r)), bar_for(dtype))
    if env.world > 1 and args.heads >= env.world:
        shard = ceil_div(n, env.world)
        sl = slice(env.rank * shard, min(n, (env.rank + 1) * shard))
        pad = lambda x: torch.nn.functional.pad(x, (0, 0, 0, 0, 0, shard * env.world - n))  # noqa: E731
        qs, ks, vs = (pad(x)[:, env.rank * shard : (env.rank + 1) * shard].clone().requires_grad_() for x in (q, k, v))
        outp = dilated_attention_parallel(qs, ks, vs, segs, rates, args.causal, seq_len=n, backend=args.backend)
        outp.backward(pad(dout)[:, env.rank * shard : (env.rank + 1) * shard])
        m = sl.stop - sl.start
        for name, a, r in zip(("out", "dq"), (outp, qs.grad), ref):
            report.check(f"n={n} {name} on {env.world} ranks vs float64 definition", env.max(rel_err(a[:, :m], r[:, sl])), bar_for(dtype))
    del q, k, v, dout, out, ref
    free(env)


def sample_rows(n: int) -> torch.Tensor:
    return torch.arange(0, n, max(1, n // 2048))


def run_seqlen(env: Env, args, report: Report, n: int, dtype) -> None:
    segs, rates, H, d = args.segments, args.rates, args.heads, args.head_dim
    flops = dilated_attention_flops(n, segs, rates, num_heads=H, head_dim=d, causal=args.causal)
    rows = sample_rows(n).to(env.device)
    single: dict[str, Row] = {}
    samples: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    scale = 1.0 / math.sqrt(d)

    def measure(row: Row, fn, q, k, v, dout, iters, backward=True, flops_per_gpu=None):
        fwd_ms, _ = timed_median_ms(env, lambda: _no_grad(fn, q, k, v), 1 if iters < args.iters else args.warmup, iters)
        row.fwd_ms = fwd_ms
        if backward:
            for x in (q, k, v):
                x.requires_grad_()

            def step():
                for x in (q, k, v):
                    x.grad = None
                fn(q, k, v).backward(dout)

            row.fb_ms, row.peak = timed_median_ms(env, step, 1 if iters < args.iters else args.warmup, iters)
            row.tflops = (flops_per_gpu or flops / row.gpus) * 3.5 / (row.fb_ms / 1e3) / 1e12
        return row

    def keep_samples(name, q, fn, dout, k, v, local_rows=None, offset=0):
        for x in (q, k, v):
            x.grad = None
        out = fn(q, k, v)
        if q.requires_grad:
            out.backward(dout)
        r = rows if local_rows is None else local_rows
        samples[name] = (out[:, r - offset].detach().float(), q.grad[:, r - offset].float() if q.grad is not None else None)
        del out
        for x in (q, k, v):
            x.grad = None

    # ---- 1 GPU (on every rank at once when P > 1) ----
    if env.world == 1 or not args.skip_single:
        q, k, v, dout = make_inputs(n, H, d, dtype, env.device)
        ours_fn = lambda a, b, c: dilated_attention(a, b, c, segs, rates, args.causal, backend=args.backend, max_rows_x_heads=args.max_rows_x_heads)  # noqa: E731
        row = Row(n, 1, "ours")
        env.log(f"n={n}: ours on 1")
        guarded(env, row, lambda: (measure(row, ours_fn, q, k, v, dout, args.iters), keep_samples("ours1", q, ours_fn, dout, k, v)))
        if not args.skip_dense and row.fb_ms == row.fb_ms:
            env.log(f"n={n}: dense blocks on 1")

            def dense():
                _, fb = time_dense_blocks(env, args, n, 0, H, dtype)
                row.dense_tflops = flops * 3.5 / (fb / 1e3) / 1e12
                row.share = fb / row.fb_ms

            guarded(env, row, dense)
        report.rows.append(row)
        single["ours"] = row
        report.write()
        if not args.skip_flex:
            frow = Row(n, 1, FLEX_LABEL[args.flex_mode])
            env.log(f"n={n}: flex on 1")

            def flex_single():
                flex = FLEX[args.flex_mode](n, segs, rates, H, 0, H, args.causal, env.device, scale)
                if not flex.backward_ok:
                    frow.note = "forward only (no flex backward on CPU)"
                    for x in (q, k, v):
                        x.requires_grad_(False)
                measure(frow, flex, q, k, v, dout, args.flex_iters, backward=flex.backward_ok)
                keep_samples("flex1", q, flex, dout, k, v)

            guarded(env, frow, flex_single)
            report.rows.append(frow)
            single["flex"] = frow
            if "ours1" in samples and "flex1" in samples:
                (o1, g1), (o2, g2) = samples["ours1"], samples["flex1"]
                report.check(f"n={n} ours vs flex, sampled out rows", env.max(rel_err(o1, o2)), bar_for(dtype))
                if g1 is not None and g2 is not None:
                    report.check(f"n={n} ours vs flex, sampled dq rows", env.max(rel_err(g1, g2)), bar_for(dtype))
            report.write()
        del q, k, v, dout
        free(env)

    # ---- P GPUs, head-parallel ----
    if env.world > 1:
        shard = ceil_div(n, env.world)
        lo, hi = env.rank * shard, min(n, (env.rank + 1) * shard)
        full = make_inputs(n, H, d, dtype, env.device)
        pad = shard * env.world - n
        q, k, v, dout = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad))[:, env.rank * shard : (env.rank + 1) * shard].clone() for x in full)
        del full
        free(env)
        my_rows = rows[(rows >= lo) & (rows < hi)]
        par_fn = lambda a, b, c: dilated_attention_parallel(a, b, c, segs, rates, args.causal, seq_len=n, backend=args.backend, max_rows_x_heads=args.max_rows_x_heads)  # noqa: E731
        row = Row(n, env.world, "ours")
        env.log(f"n={n}: ours on {env.world}")
        guarded(env, row, lambda: (measure(row, par_fn, q, k, v, dout, args.iters), keep_samples("oursP", q, par_fn, dout, k, v, my_rows, lo)))
        per_rank_heads = H // env.world if H % env.world == 0 else None
        if not args.skip_dense and row.fb_ms == row.fb_ms and per_rank_heads:
            env.log(f"n={n}: dense blocks on {env.world}")

            def dense_par():
                _, fb = time_dense_blocks(env, args, n, env.rank * per_rank_heads, per_rank_heads, dtype)
                fb = env.max(fb)
                row.dense_tflops = flops / env.world * 3.5 / (fb / 1e3) / 1e12
                row.share = fb / row.fb_ms

            guarded(env, row, dense_par)
        if "ours" in single and single["ours"].fb_ms == single["ours"].fb_ms:
            row.speedup = single["ours"].fb_ms / row.fb_ms
        report.rows.append(row)
        if "ours1" in samples and "oursP" in samples:
            o1, g1 = samples["ours1"]
            sel = (rows >= lo) & (rows < hi)
            report.check(f"n={n} {env.world} GPUs vs 1 GPU, sampled out rows", env.max(rel_err(samples["oursP"][0], o1[:, sel])), bar_for(dtype))
            report.check(f"n={n} {env.world} GPUs vs 1 GPU, sampled dq rows", env.max(rel_err(samples["oursP"][1], g1[:, sel])), bar_for(dtype))
        report.write()
        if not args.skip_flex and per_rank_heads and n % env.world == 0:
            frow = Row(n, env.world, FLEX_LABEL[args.flex_mode])
            env.log(f"n={n}: flex on {env.world}")

            def flex_par():
                flex = FLEX[args.flex_mode](
                    n, segs, rates, H, env.rank * per_rank_heads, per_rank_heads, args.causal, env.device, scale
                )
                if not flex.backward_ok:
                    frow.note = "forward only (no flex backward on CPU)"
                    for x in (q, k, v):
                        x.requires_grad_(False)

                def fn(a, b, c):
                    return heads_to_seq(flex(seq_to_heads(a), seq_to_heads(b), seq_to_heads(c)), None)

                measure(frow, fn, q, k, v, dout, args.flex_iters, backward=flex.backward_ok)

            guarded(env, frow, flex_par)
            if "flex" in single and single["flex"].fb_ms == single["flex"].fb_ms:
                frow.speedup = single["flex"].fb_ms / frow.fb_ms
            report.rows.append(frow)
            report.write()
        del q, k, v, dout
        free(env)


def _no_grad(fn, q, k, v):
    with torch.no_grad():
        fn(q, k, v)


def main(argv=None) -> int:
    args = parse_args(argv)
    env = setup(args)
    dtype = _DTYPES[args.dtype]
    report = Report(args, env)
    env.log(f"bench_dilated: {report.device_line()}")
    t0 = time.time()
    if args.check_seqlen:
        correctness_check(env, args, report, dtype)
    for n in args.seqlens:
        run_seqlen(env, args, report, n, dtype)
        env.log(f"  (elapsed {time.time() - t0:.0f} s)")
    report.write()
    env.log("\n" + report.markdown())
    if report.failed:
        env.log("FAILED checks: " + "; ".join(report.failed))
    if env.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
