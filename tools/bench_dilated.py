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
  (``dilated_attention_parallel`` in ``--parallel-modes``: ``auto`` runs every shard on
  its own with no communication when no segment crosses a shard boundary, else
  head-parallel; ``heads`` forces the all-to-all head-parallel path; the note says which
  ran and what it sent) and **flex, P GPUs** (all-to-alls around flex on each rank's
  heads), and the speedup over 1 GPU.

Failures: every row runs guarded; an OOM or exception on any rank becomes that row's
note on every rank (the ranks agree through one all_gather after each phase, and no
phase issues collectives of its own other than the attention's), so later rows still
run and the table stays complete.

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
    torchrun --nproc_per_node 2 tools/bench_dilated.py --seqlens 1048576 --parallel-modes auto,heads
    python tools/bench_dilated.py --device cpu --seqlens 4096 --heads 4 --head-dim 16 \\
        --segments 256,512 --rates 1,2
    torchrun --nproc_per_node 2 tools/bench_dilated.py --device cpu --seqlens 4096 \\
        --heads 4 --head-dim 16 --segments 256,512 --rates 1,2
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
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

from megatron_fapool.attention import kernels as L  # noqa: E402
from megatron_fapool.attention.dilated import (  # noqa: E402
    dilated_attention,
    dilated_attention_flops,
    dilated_attention_parallel,
    dilated_attention_reference_vjp,
)
from megatron_fapool.attention.dilated.args import DilatedArgs  # noqa: E402
from megatron_fapool.attention.dilated.blocks import DEFAULT_MAX_ROWS_X_HEADS  # noqa: E402
from megatron_fapool.attention.dilated.comm import (  # noqa: E402
    comm_counters,
    heads_to_seq,
    reset_comm_counters,
    seq_to_heads,
)
from megatron_fapool.attention.dilated.heads import head_chunks  # noqa: E402
from megatron_fapool.attention.dilated.local import kernel_calls  # noqa: E402
from megatron_fapool.attention.dilated.parallel import parallel_mode  # noqa: E402
from megatron_fapool.attention.dilated.plan import ceil_div, effective_segment  # noqa: E402
from megatron_fapool.attention.dilated.strided import DEFAULT_MAX_VIEW_ELEMENTS  # noqa: E402

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
    p.add_argument("--max-rows-x-heads", type=int, default=DEFAULT_MAX_ROWS_X_HEADS,
                   help="rows x heads of one kernel call on copied blocks (bounds temporaries)")
    p.add_argument("--max-view-elements", type=int, default=DEFAULT_MAX_VIEW_ELEMENTS,
                   help="q elements of one kernel call made on an uncopied (rate-1) view")
    p.add_argument("--head-chunks", type=int, default=None,
                   help="head-parallel: head chunks per rank pipelined against the all-to-alls (default: auto)")
    p.add_argument("--parallel-modes", type=lambda s: [m for m in s.split(",") if m], default=["auto"],
                   help="with P > 1: comma list of dilated_attention_parallel modes, one row each"
                   " (auto, heads, sequence)")
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
    # Tests: make the row "IMPL,GPUS,RANK" raise an OOM on that rank (e.g. "ours,1,1").
    p.add_argument("--debug-fail", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if len(args.segments) != len(args.rates):
        p.error("--segments and --rates need the same number of entries")
    bad = [m for m in args.parallel_modes if m not in ("auto", "heads", "sequence")]
    if bad or not args.parallel_modes:
        p.error(f"--parallel-modes: choose from auto, heads, sequence (got {args.parallel_modes})")
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
    debug_fail: Optional[tuple[str, int, int]] = None

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
    """(median ms, peak bytes allocated on this device during the steps), this rank only:
    no collective here (a phase may fail on one rank only); phases combine ranks after."""
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
    return statistics.median(times), peak


def free(env: Env) -> None:
    gc.collect()
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


def dense_block_shapes(n, args, segments, first_head, num_heads, total_heads) -> Counter:
    """Kernel calls ours makes on one rank: (batch, q rows, k rows, q heads, kv heads, causal) -> count."""
    dargs = DilatedArgs(tuple(segments), tuple(args.rates), 1.0 / math.sqrt(args.head_dim), first_head, total_heads, 1)
    return Counter(
        kernel_calls(n, dargs, num_heads, args.head_dim, args.causal, args.max_rows_x_heads, args.max_view_elements)
    )


def time_dense_blocks(env: Env, args, n, dtype, segments=None, first_head=0, num_heads=None) -> tuple[float, float]:
    """(forward ms, forward+backward ms) of ours' kernel calls on ready dense blocks (this rank)."""
    fwd_total = fb_total = 0.0
    segments = args.segments if segments is None else segments
    num_heads = args.heads if num_heads is None else num_heads
    shapes = dense_block_shapes(n, args, segments, first_head, num_heads, args.heads)
    for (batch, lq, lk, heads, kv_heads, causal), count in shapes.items():
        g = torch.Generator(device=env.device).manual_seed(7)
        mk = lambda rows, h: torch.randn(batch, rows, h, args.head_dim, generator=g, device=env.device, dtype=dtype)  # noqa: E731
        q, k, v, dout = mk(lq, heads), mk(lk, kv_heads), mk(lk, kv_heads), mk(lq, heads)
        kw = dict(causal=causal, backend=args.backend)
        fwd, _ = timed_median_ms(env, lambda: L.attention_forward(q, k, v, **kw), args.warmup, args.iters)

        def fwd_bwd():
            o, l = L.attention_forward(q, k, v, **kw)
            L.attention_backward(dout, q, k, v, o, l, **kw)

        fb, _ = timed_median_ms(env, fwd_bwd, args.warmup, args.iters)
        fwd_total += count * fwd
        fb_total += count * fb
        del q, k, v, dout
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


def failure_note(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text.lower():
        return "OOM"
    return f"error: {type(exc).__name__}: {text.splitlines()[0][:120] if text else ''}"


def phase(env: Env, what: str, fn: Callable[[], None]) -> Optional[str]:
    """Run ``fn`` on every rank; None when it worked on all of them, else one note that
    every rank gets (the ranks agree through an all_gather, so none runs ahead into a
    collective the others skip). ``fn`` must not issue collectives of its own besides the
    attention under test (which the ranks enter together)."""
    note = ""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - OOM and any error become the row's note
        note = failure_note(e)
        print(f"[rank {env.rank}] {what}: {note}", flush=True)
    free(env)
    notes = [note]
    if env.world > 1:
        notes = [None] * env.world
        dist.all_gather_object(notes, note)
    bad = [(p, x) for p, x in enumerate(notes) if x]
    if not bad:
        return None
    if len(bad) == env.world and len({x for _, x in bad}) == 1:
        text = bad[0][1]
    else:
        text = "; ".join(f"rank {p}: {x}" for p, x in bad)
    env.log(f"  {what}: {text}")
    return text


def combine(env: Env, values: list[float]) -> list[float]:
    """Max over ranks of each value (the slowest rank, the fullest GPU); nan if any rank has nan."""
    if env.world == 1:
        return values
    t = torch.tensor(
        [[0.0 if v != v else v for v in values], [1.0 if v != v else 0.0 for v in values]],
        dtype=torch.float64, device=env.device,
    )
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [float("nan") if nan else v for v, nan in zip(t[0].tolist(), t[1].tolist())]


def add_note(row: "Row", text: str) -> None:
    row.note = f"{row.note}; {text}" if row.note else text


def run_row(env: Env, row: "Row", flops_per_gpu: float, fn: Callable[[], None]) -> bool:
    """Measure one row on every rank; on success the slowest rank's times and the fullest
    GPU count, on failure (any rank) the row keeps only the note."""
    fail = env.debug_fail
    if fail is not None and (fail[0], fail[1], fail[2]) == (row.impl, row.gpus, env.rank):
        real = fn

        def fn():  # noqa: F811 - a test hook: the row runs, then this rank "runs out of memory"
            real()
            raise torch.OutOfMemoryError(f"injected by --debug-fail on rank {env.rank}")

    failed = phase(env, f"{row.impl} on {row.gpus}", fn)
    if failed is not None:
        row.fwd_ms = row.fb_ms = row.peak = row.tflops = float("nan")
        add_note(row, failed)
        return False
    row.fwd_ms, row.fb_ms, row.peak = combine(env, [row.fwd_ms, row.fb_ms, row.peak])
    if row.fb_ms == row.fb_ms:
        row.tflops = flops_per_gpu * 3.5 / (row.fb_ms / 1e3) / 1e12
    return True


def bar_for(dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 2.5e-2


def correctness_check(env: Env, args, report: Report, dtype) -> None:
    n = args.check_seqlen
    env.log(f"check: ours vs float64 definition at n={n}")
    errs: dict[str, float] = {}
    segs, rates = args.segments, args.rates

    def run():
        q, k, v, dout = make_inputs(n, args.heads, args.head_dim, dtype, env.device, seed=99)
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        out = dilated_attention(qq, kk, vv, segs, rates, args.causal, backend=args.backend)
        out.backward(dout)
        ref = dilated_attention_reference_vjp(dout, q, k, v, segs, rates, args.causal)
        for name, a, r in zip(("out", "dq", "dk", "dv"), (out, qq.grad, kk.grad, vv.grad), ref):
            errs[f"n={n} {name} vs float64 definition"] = rel_err(a, r)
        if env.world > 1 and args.heads >= env.world:
            shard = ceil_div(n, env.world)
            sl = slice(env.rank * shard, min(n, (env.rank + 1) * shard))
            pad = lambda x: torch.nn.functional.pad(x, (0, 0, 0, 0, 0, shard * env.world - n))  # noqa: E731
            for mode in args.parallel_modes:
                qs, ks, vs = (pad(x)[:, env.rank * shard : (env.rank + 1) * shard].clone().requires_grad_() for x in (q, k, v))
                outp = dilated_attention_parallel(qs, ks, vs, segs, rates, args.causal, seq_len=n, backend=args.backend, mode=mode)
                outp.backward(pad(dout)[:, env.rank * shard : (env.rank + 1) * shard])
                m = sl.stop - sl.start
                ran = parallel_mode(args.heads, args.heads, n, segs, shard, env.world, mode)
                how = ran if mode in ("auto", ran) else f"{mode}: {ran}"
                for name, a, r in zip(("out", "dq"), (outp, qs.grad), ref):
                    errs[f"n={n} {name} on {env.world} ranks ({how}) vs float64 definition"] = rel_err(a[:, :m], r[:, sl])

    failed = phase(env, "float64 check", run)
    if failed is not None:
        report.check(f"n={n} check ran ({failed})", float("inf"), 0.0)
        return
    for what in sorted(errs):  # same keys on every rank
        report.check(what, env.max(errs[what]), bar_for(dtype))


def sample_rows(n: int) -> torch.Tensor:
    return torch.arange(0, n, max(1, n // 2048))


MODE_NOTE = {
    "local": "shards independent: no communication",
    "heads": "head-parallel all-to-all",
    "sequence": "sequence-parallel, sparse K/V all-gather",
}


def run_seqlen(env: Env, args, report: Report, n: int, dtype) -> None:
    segs, rates, H, d = args.segments, args.rates, args.heads, args.head_dim
    flops = dilated_attention_flops(n, segs, rates, num_heads=H, head_dim=d, causal=args.causal)
    rows = sample_rows(n).to(env.device)
    single: dict[str, Row] = {}
    samples: dict[str, tuple[torch.Tensor, Optional[torch.Tensor]]] = {}
    scale = 1.0 / math.sqrt(d)
    inputs: dict[str, torch.Tensor] = {}

    def measure(row: Row, fn, iters, backward=True):
        q, k, v, dout = (inputs[x] for x in ("q", "k", "v", "dout"))
        warm = 1 if iters < args.iters else args.warmup
        for x in (q, k, v):
            x.requires_grad_(False)
        row.fwd_ms, _ = timed_median_ms(env, lambda: _no_grad(fn, q, k, v), warm, iters)
        if backward:
            for x in (q, k, v):
                x.requires_grad_()

            def step():
                for x in (q, k, v):
                    x.grad = None
                fn(q, k, v).backward(dout)

            row.fb_ms, row.peak = timed_median_ms(env, step, warm, iters)

    def keep_samples(name, fn, local_rows=None, offset=0):
        q, k, v, dout = (inputs[x] for x in ("q", "k", "v", "dout"))
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

    def compare(name_a, name_b, label, sel=None):
        """Sampled-row checks, only when both samples exist on every rank (rows succeeded)."""
        if name_a not in samples or name_b not in samples:
            return
        (o1, g1), (o2, g2) = samples[name_a], samples[name_b]
        if sel is not None:
            o2 = o2[:, sel]
            g2 = g2[:, sel] if g2 is not None else None
        report.check(f"n={n} {label}, sampled out rows", env.max(rel_err(o1, o2)), bar_for(dtype))
        if g1 is not None and g2 is not None:
            report.check(f"n={n} {label}, sampled dq rows", env.max(rel_err(g1, g2)), bar_for(dtype))

    def drop_inputs():
        inputs.clear()
        free(env)

    # ---- 1 GPU (on every rank at once when P > 1) ----
    if env.world == 1 or not args.skip_single:
        ours_fn = lambda a, b, c: dilated_attention(a, b, c, segs, rates, args.causal, backend=args.backend, max_rows_x_heads=args.max_rows_x_heads, max_view_elements=args.max_view_elements)  # noqa: E731
        row = Row(n, 1, "ours")
        env.log(f"n={n}: ours on 1")

        def ours_single():
            inputs.update(zip(("q", "k", "v", "dout"), make_inputs(n, H, d, dtype, env.device)))
            measure(row, ours_fn, args.iters)
            keep_samples("ours1", ours_fn)

        if not run_row(env, row, flops, ours_single):
            samples.pop("ours1", None)
        elif not args.skip_dense:
            env.log(f"n={n}: dense blocks on 1")
            dense_fb: list[float] = []
            failed = phase(env, "dense blocks on 1", lambda: dense_fb.append(time_dense_blocks(env, args, n, dtype)[1]))
            if failed is None:
                (fb,) = combine(env, dense_fb)
                row.dense_tflops = flops * 3.5 / (fb / 1e3) / 1e12
                row.share = fb / row.fb_ms
            else:
                add_note(row, f"dense blocks: {failed}")
        report.rows.append(row)
        single["ours"] = row
        report.write()
        if not args.skip_flex:
            frow = Row(n, 1, FLEX_LABEL[args.flex_mode])
            env.log(f"n={n}: flex on 1")

            def flex_single():
                if not inputs:
                    inputs.update(zip(("q", "k", "v", "dout"), make_inputs(n, H, d, dtype, env.device)))
                flex = FLEX[args.flex_mode](n, segs, rates, H, 0, H, args.causal, env.device, scale)
                if not flex.backward_ok:
                    frow.note = "forward only (no flex backward on CPU)"
                measure(frow, flex, args.flex_iters, backward=flex.backward_ok)  # leaves q.requires_grad
                keep_samples("flex1", flex)  # with dq when flex has a backward

            if not run_row(env, frow, flops, flex_single):
                samples.pop("flex1", None)
            _reset_compiled()
            report.rows.append(frow)
            single["flex"] = frow
            compare("ours1", "flex1", "ours vs flex")
            samples.pop("flex1", None)
            report.write()
        drop_inputs()

    # ---- P GPUs ----
    if env.world > 1:
        shard = ceil_div(n, env.world)
        lo, hi = env.rank * shard, min(n, (env.rank + 1) * shard)
        my_rows = rows[(rows >= lo) & (rows < hi)]
        sel = ((rows >= lo) & (rows < hi))

        def make_shards():
            g = torch.Generator(device=env.device).manual_seed(1234)  # the 1-GPU inputs, sharded
            pad = shard * env.world - n
            for name in ("q", "k", "v", "dout"):
                full = torch.randn(1, n, H, d, generator=g, device=env.device, dtype=dtype)
                inputs[name] = torch.nn.functional.pad(full, (0, 0, 0, 0, 0, pad))[:, lo : lo + shard].clone()
                del full

        failed = phase(env, f"shard inputs on {env.world}", make_shards)
        for mode in args.parallel_modes:
            label = "ours" if mode == "auto" else f"ours ({mode})"
            ran = parallel_mode(H, H, n, segs, shard, env.world, mode)
            row = Row(n, env.world, label, note=MODE_NOTE[ran])
            if ran == "heads":
                add_note(row, f"{head_chunks(H, H, env.world, 1, n, d, args.head_chunks)} head chunk(s) per rank")
            if failed is not None:
                add_note(row, f"inputs: {failed}")
                report.rows.append(row)
                continue
            par_fn = lambda a, b, c, mode=mode: dilated_attention_parallel(a, b, c, segs, rates, args.causal, seq_len=n, backend=args.backend, mode=mode, max_rows_x_heads=args.max_rows_x_heads, max_view_elements=args.max_view_elements, head_chunks=args.head_chunks)  # noqa: E731
            env.log(f"n={n}: {label} on {env.world} ({ran})")
            sent: dict[str, int] = {}

            def ours_par():
                measure(row, par_fn, args.iters)
                reset_comm_counters()
                keep_samples("oursP", par_fn, my_rows, lo)
                sent.update(comm_counters())

            if run_row(env, row, flops / env.world, ours_par):
                calls = sum(v for key, v in sent.items() if key.endswith("_calls"))
                gib = sum(v for key, v in sent.items() if key.endswith("_bytes")) / 2**30
                add_note(row, f"{calls} collectives, {gib:.2f} GiB sent/rank per fwd+bwd")
                dense_fb: list[float] = []
                if not args.skip_dense and ran in ("local", "heads"):
                    env.log(f"n={n}: dense blocks on {env.world} ({ran})")

                    def dense_par():
                        if ran == "local":
                            local_segs = [effective_segment(w, n) for w in segs]
                            dense_fb.append(time_dense_blocks(env, args, hi - lo, dtype, local_segs)[1])
                        else:  # the calls of each head chunk of this rank's run of heads
                            counts = [H // env.world + (p < H % env.world) for p in range(env.world)]
                            first, mine = sum(counts[: env.rank]), counts[env.rank]
                            chunks = head_chunks(H, H, env.world, 1, n, d, args.head_chunks)
                            per = ceil_div(H, env.world) // chunks
                            dense_fb.append(sum(
                                time_dense_blocks(env, args, n, dtype, segs, first + c * per, min(per, mine - c * per))[1]
                                for c in range(chunks)
                            ))

                    dfail = phase(env, f"dense blocks on {env.world}", dense_par)
                    if dfail is None:
                        (fb,) = combine(env, dense_fb)
                        row.dense_tflops = flops / env.world * 3.5 / (fb / 1e3) / 1e12
                        row.share = fb / row.fb_ms
                    else:
                        add_note(row, f"dense blocks: {dfail}")
                if "ours" in single and single["ours"].fb_ms == single["ours"].fb_ms:
                    row.speedup = single["ours"].fb_ms / row.fb_ms
            else:
                samples.pop("oursP", None)
            report.rows.append(row)
            compare("oursP", "ours1", f"{env.world} GPUs ({ran}) vs 1 GPU", sel)
            samples.pop("oursP", None)
            report.write()
        if failed is None and not args.skip_flex and H % env.world == 0 and n % env.world == 0:
            per_rank_heads = H // env.world
            frow = Row(n, env.world, FLEX_LABEL[args.flex_mode], note="head-parallel all-to-all")
            env.log(f"n={n}: flex on {env.world}")

            def flex_par():
                flex = FLEX[args.flex_mode](
                    n, segs, rates, H, env.rank * per_rank_heads, per_rank_heads, args.causal, env.device, scale
                )
                if not flex.backward_ok:
                    add_note(frow, "forward only (no flex backward on CPU)")

                def fn(a, b, c):
                    return heads_to_seq(flex(seq_to_heads(a), seq_to_heads(b), seq_to_heads(c)), None)

                measure(frow, fn, args.flex_iters, backward=flex.backward_ok)

            if run_row(env, frow, flops / env.world, flex_par):
                if "flex" in single and single["flex"].fb_ms == single["flex"].fb_ms:
                    frow.speedup = single["flex"].fb_ms / frow.fb_ms
            _reset_compiled()
            report.rows.append(frow)
            report.write()
        drop_inputs()


def _reset_compiled() -> None:
    """Drop compiled flex graphs (each n compiles anew anyway) and what they hold."""
    try:
        torch._dynamo.reset()
    except Exception:  # noqa: BLE001
        pass


def _no_grad(fn, q, k, v):
    with torch.no_grad():
        fn(q, k, v)


def main(argv=None) -> int:
    args = parse_args(argv)
    env = setup(args)
    if args.debug_fail:
        impl, gpus, rank = args.debug_fail.rsplit(",", 2)
        env.debug_fail = (impl, int(gpus), int(rank))
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
