#!/usr/bin/env python
"""Benchmark dilated attention (issue 6): ours vs FlexAttention on one device.

What one run measures, for every ``--seqlens`` n (batch 1):

* **ours** — ``dilated_attention`` forward, and forward + backward.
* **dense blocks** — the same kernel calls as ours (same block shapes, same chunking,
  :func:`~megatron_fapool.attention.dilated.function.kernel_calls`) on pre-made
  contiguous tensors with ``attention_forward`` / ``attention_backward``: the kernel's
  own rate on the equivalent dense problem. ``share of dense`` is (dense time) / (our
  time) for the same FLOPs: what gather, merge and scatter cost.
* **flex** — a FlexAttention baseline (``tools/baselines/flex_dilated.py``, compiled on
  CUDA). ``--flex-mode union`` (default): ONE block mask for the union of the branches
  and ``score_mod = score + log C`` (C = multiplicity of the key over the branches,
  DESIGN.md §4): the definition itself in one kernel, the faithful baseline. Its block
  mask is the union of the segments, so it computes far more than the dilated FLOPs; its
  TFLOP/s column still counts only the dilated FLOPs (useful work), like ours.
  ``--flex-mode branches``: one call per branch mask, merged by lse (LongNet's form).

The multi-GPU rows (``dilated_attention_parallel``, head-parallel and sequence-parallel)
went with that code in the house refactor (issue 12); the numbers measured with them
stay in docs/benchmarks.md.

Failures: every row runs guarded; an OOM or exception becomes that row's note, so later
rows still run and the table stays complete.

Timing: warm-up (includes compilation and plan building), then the median of
``--iters`` steps timed with CUDA events (``time.perf_counter`` on CPU). Memory: peak
``max_memory_allocated`` during the timed forward + backward steps, inputs and gradients
included; ``KiB/token`` = that peak divided by n. FLOPs: ``dilated_attention_flops``
(4 d per attended pair, causal triangle counted exactly), backward = 2.5x forward, so
forward + backward = 3.5x.

Self-checks (a failed one makes the exit code 1, after the table is written): ours vs
the float64 definition at ``--check-seqlen`` (bar 2.5e-2 for 16-bit inputs, 1e-5 for
float32); at every n, ours vs flex on sampled rows of the output and dq. The goal
(issue 6) is stated for the largest n.

Examples::

    python tools/bench_dilated.py --markdown runs/dilated_1gpu.md
    python tools/bench_dilated.py --seqlens 1048576 --check-seqlen 0 --skip-flex
    python tools/bench_dilated.py --device cpu --seqlens 4096 --heads 4 --head-dim 16 \\
        --segments 256,512 --rates 1,2
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
from typing import Callable

import torch

from megatron_fapool.attention import kernels
from megatron_fapool.attention.dilated import (
    DilatedArgs,
    dilated_attention,
    dilated_attention_flops,
    dilated_attention_reference_vjp,
)
from megatron_fapool.attention.dilated.blocks import DEFAULT_MAX_ROWS_X_HEADS
from megatron_fapool.attention.dilated.function import kernel_calls
from megatron_fapool.attention.dilated.strided import DEFAULT_MAX_VIEW_ELEMENTS

from _common import DTYPES, FWD_BWD_FLOPS, elapsed_ms, free_memory, rel_err, sync
from baselines.flex_dilated import FlexBranches, FlexUnion, reset_compiled

GOAL_SHARE = 0.60
FLEX = {"union": FlexUnion, "branches": FlexBranches}
FLEX_LABEL = {"union": "flex (union mask, score_mod log C)", "branches": "flex (mask per branch, LSE merge)"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--seqlens", type=ints, default=[131072, 524288, 1048576])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--segments", type=ints, default=[2048, 4096, 8192, 16384, 32768])
    p.add_argument("--rates", type=ints, default=[1, 2, 4, 8, 16])
    p.add_argument("--no-causal", dest="causal", action="store_false")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--flex-iters", type=int, default=3, help="timed steps for flex (it is much slower)")
    p.add_argument("--backend", default="auto", help="kernel backend for ours and the dense blocks")
    p.add_argument("--max-rows-x-heads", type=int, default=DEFAULT_MAX_ROWS_X_HEADS,
                   help="rows x heads of one kernel call on copied blocks (bounds temporaries)")
    p.add_argument("--max-view-elements", type=int, default=DEFAULT_MAX_VIEW_ELEMENTS,
                   help="q elements of one kernel call made on an uncopied (rate-1) view")
    p.add_argument("--check-seqlen", type=int, default=None, help="n for the float64 check (0: skip)")
    p.add_argument("--skip-flex", action="store_true")
    p.add_argument(
        "--flex-mode", default="union", choices=["union", "branches"],
        help="union: one flex call, block mask of the union, score_mod + log C (the definition);"
        " branches: one flex call per branch mask, outputs merged by lse (LongNet's form)",
    )
    p.add_argument("--skip-dense", action="store_true")
    p.add_argument("--markdown", default=None, help="write the report here, rewritten after every n")
    # Tests: make the row of this impl (e.g. "ours") raise an OOM after it ran.
    p.add_argument("--debug-fail", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if len(args.segments) != len(args.rates):
        p.error("--segments and --rates need the same number of entries")
    if args.check_seqlen is None:
        args.check_seqlen = 6221 if args.device == "cuda" else 1000
    return args


# ------------------------------------------------------------------------------------
# Device, timing, failures
# ------------------------------------------------------------------------------------


def setup(args) -> torch.device:
    if args.device == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def timed_median_ms(device: torch.device, step: Callable[[], None], warmup: int, iters: int) -> tuple[float, float]:
    """(median ms, peak bytes allocated on ``device`` during the timed steps)."""
    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = [elapsed_ms(step, device) for _ in range(iters)]
    peak = float(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


def failure_note(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text.lower():
        return "OOM"
    return f"error: {type(exc).__name__}: {text.splitlines()[0][:120] if text else ''}"


def phase(device: torch.device, what: str, fn: Callable[[], None]) -> str | None:
    """Run ``fn``; None when it worked, else the note of its failure (OOM or error)."""
    note = None
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - OOM and any error become the row's note
        note = failure_note(e)
        print(f"  {what}: {note}", flush=True)
    free_memory(device)
    return note


def bar_for(dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 2.5e-2


def make_inputs(n: int, heads: int, d: int, dtype, device, seed: int = 1234):
    """q, k, v, dout [1, n, heads, d] (seeded on the device)."""
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(1, n, heads, d, generator=g, device=device, dtype=dtype) for _ in range(4)]


# ------------------------------------------------------------------------------------
# Dense blocks: ours' kernel calls on ready tensors
# ------------------------------------------------------------------------------------


def dense_block_shapes(n, args) -> Counter:
    """Kernel calls ours makes: (batch, q rows, k rows, q heads, kv heads, causal) -> count."""
    dargs = DilatedArgs(
        segment_lengths=tuple(args.segments), dilation_rates=tuple(args.rates), causal=args.causal,
        softmax_scale=1.0 / math.sqrt(args.head_dim), head_offset=0, total_heads=args.heads, kv_group=1,
    )
    return Counter(kernel_calls(n, dargs, args.heads, args.head_dim, args.max_rows_x_heads, args.max_view_elements))


def time_dense_blocks(device: torch.device, args, n, dtype) -> tuple[float, float]:
    """(forward ms, forward+backward ms) of ours' kernel calls on ready dense blocks."""
    fwd_total = fb_total = 0.0
    for (batch, lq, lk, heads, kv_heads, causal), count in dense_block_shapes(n, args).items():
        g = torch.Generator(device=device).manual_seed(7)
        mk = lambda rows, h: torch.randn(batch, rows, h, args.head_dim, generator=g, device=device, dtype=dtype)  # noqa: E731
        q, k, v, dout = mk(lq, heads), mk(lk, kv_heads), mk(lk, kv_heads), mk(lq, heads)
        kw = dict(causal=causal, backend=args.backend)
        fwd, _ = timed_median_ms(device, lambda: kernels.attention_forward(q, k, v, **kw), args.warmup, args.iters)

        def fwd_bwd():
            o, l = kernels.attention_forward(q, k, v, **kw)
            kernels.attention_backward(dout, q, k, v, o, l, **kw)

        fb, _ = timed_median_ms(device, fwd_bwd, args.warmup, args.iters)
        fwd_total += count * fwd
        fb_total += count * fb
        del q, k, v, dout
        free_memory(device)
    return fwd_total, fb_total


# ------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------


@dataclass
class Row:
    n: int
    impl: str
    fwd_ms: float = float("nan")
    fb_ms: float = float("nan")
    peak: float = float("nan")
    tflops: float = float("nan")
    dense_tflops: float = float("nan")
    share: float = float("nan")
    note: str = ""

    def cells(self) -> list[str]:
        f = lambda x, spec: "–" if x != x else format(x, spec)  # noqa: E731
        tok = self.n / (self.fb_ms / 1e3) if self.fb_ms == self.fb_ms else float("nan")
        return [
            f"{self.n // 1024}K" if self.n % 1024 == 0 else str(self.n),
            self.impl,
            f(self.fwd_ms, ".1f"),
            f(self.fb_ms, ".1f"),
            f(tok / 1e6, ".2f"),
            f(self.tflops, ".3g"),
            f(self.dense_tflops, ".3g"),
            f(self.share * 100, ".0f") + ("%" if self.share == self.share else ""),
            f(self.peak / 2**30, ".1f"),
            f(self.peak / self.n / 1024, ".1f"),
            self.note,
        ]


HEADER = [
    "n", "impl", "fwd ms", "fwd+bwd ms", "M tokens/s (fwd+bwd)", "TFLOP/s (fwd+bwd)",
    "dense-kernel TFLOP/s", "share of dense", "peak GiB", "KiB/token", "note",
]


def add_note(row: Row, text: str) -> None:
    row.note = f"{row.note}; {text}" if row.note else text


@dataclass
class Report:
    args: argparse.Namespace
    device: torch.device
    rows: list[Row] = field(default_factory=list)
    checks: list[tuple[str, float, float]] = field(default_factory=list)  # (what, error, bar)
    started: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))

    def check(self, what: str, err: float, bar: float) -> None:
        self.checks.append((what, err, bar))
        ok = err <= bar
        print(f"  check {'ok  ' if ok else 'FAIL'} {what}: rel err {err:.2e} (bar {bar:.1e})", flush=True)

    @property
    def failed(self) -> list[str]:
        return [w for w, e, b in self.checks if not e <= b]

    def device_line(self) -> str:
        if self.device.type == "cuda":
            name = torch.cuda.get_device_name(self.device)
            return f"{name}, CUDA {torch.version.cuda}, torch {torch.__version__}"
        return f"CPU ({os.cpu_count()} cores), torch {torch.__version__}"

    def markdown(self) -> str:
        a = self.args
        lines = [
            "### Dilated attention: ours vs FlexAttention",
            "",
            f"- Device: {self.device_line()}; date: {self.started}",
            f"- Shape: batch 1, heads {a.heads}, head dim {a.head_dim}, {a.dtype}, "
            f"{'causal' if a.causal else 'non-causal'}; branches (w, r) = "
            + ", ".join(f"({w}, {r})" for w, r in zip(a.segments, a.rates)),
            f"- Kernel backend: {a.backend} -> {self.backend_choice()}; "
            f"warm-up {a.warmup}, median of {a.iters} (flex: {a.flex_iters}) steps",
            "- Command: `" + " ".join(["python"] + sys.argv) + "`",
            "",
            "| " + " | ".join(HEADER) + " |",
            "|" + "---|" * len(HEADER),
        ]
        lines += ["| " + " | ".join(r.cells()) + " |" for r in self.rows]
        lines += ["", "Checks (relative error max|a-b|/max|ref|):", ""]
        lines += [f"- {'ok' if e <= b else '**FAIL**'}: {w}: {e:.2e} (bar {b:.1e})" for w, e, b in self.checks]
        lines += ["", "Goals (issue 6):", ""] + self.goals()
        return "\n".join(lines) + "\n"

    def backend_choice(self) -> str:
        try:
            x = torch.zeros(1, 128, 1, self.args.head_dim, dtype=DTYPES[self.args.dtype], device=self.device)
            return kernels.select_backend(x, x, x, causal=True, requires_backward=True)
        except Exception as e:  # noqa: BLE001
            return f"? ({type(e).__name__})"

    def goals(self) -> list[str]:
        n = max(self.args.seqlens)
        ours = next((r for r in self.rows if r.n == n and r.impl == "ours"), None)
        if ours is None:
            return ["- no result at the largest n"]
        ok = ours.share == ours.share and ours.share >= GOAL_SHARE
        return [
            f"- tokens/s fwd+bwd at n={n}: {n / (ours.fb_ms / 1e3):.3g}",
            f"- {'met' if ok else 'NOT met'}: share of the dense kernel's rate at n={n}: "
            f"{ours.share:.2f} (goal >= {GOAL_SHARE:.2f})",
        ]

    def write(self) -> None:
        if self.args.markdown:
            os.makedirs(os.path.dirname(os.path.abspath(self.args.markdown)), exist_ok=True)
            with open(self.args.markdown, "w") as f:
                f.write(self.markdown())


# ------------------------------------------------------------------------------------
# The runs
# ------------------------------------------------------------------------------------


def run_row(device: torch.device, args, row: Row, flops: float, fn: Callable[[], None]) -> bool:
    """Measure one row; on failure the row keeps only the note."""
    if args.debug_fail == row.impl:
        real = fn

        def fn():  # noqa: F811 - a test hook: the row runs, then "runs out of memory"
            real()
            raise torch.OutOfMemoryError("injected by --debug-fail")

    failed = phase(device, row.impl, fn)
    if failed is not None:
        row.fwd_ms = row.fb_ms = row.peak = row.tflops = float("nan")
        add_note(row, failed)
        return False
    if row.fb_ms == row.fb_ms:
        row.tflops = flops * FWD_BWD_FLOPS / (row.fb_ms / 1e3) / 1e12
    return True


def correctness_check(device: torch.device, args, report: Report, dtype) -> None:
    n = args.check_seqlen
    print(f"check: ours vs float64 definition at n={n}", flush=True)
    errs: dict[str, float] = {}
    segs, rates = args.segments, args.rates

    def run():
        q, k, v, dout = make_inputs(n, args.heads, args.head_dim, dtype, device, seed=99)
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        out = dilated_attention(qq, kk, vv, segs, rates, args.causal, backend=args.backend)
        out.backward(dout)
        ref = dilated_attention_reference_vjp(dout, q, k, v, segs, rates, args.causal)
        for name, a, r in zip(("out", "dq", "dk", "dv"), (out, qq.grad, kk.grad, vv.grad), ref):
            errs[f"n={n} {name} vs float64 definition"] = rel_err(a, r)

    failed = phase(device, "float64 check", run)
    if failed is not None:
        report.check(f"n={n} check ran ({failed})", float("inf"), 0.0)
        return
    for what in sorted(errs):
        report.check(what, errs[what], bar_for(dtype))


def sample_rows(n: int) -> torch.Tensor:
    return torch.arange(0, n, max(1, n // 2048))


def run_seqlen(device: torch.device, args, report: Report, n: int, dtype) -> None:
    segs, rates, H, d = args.segments, args.rates, args.heads, args.head_dim
    flops = dilated_attention_flops(n, segs, rates, num_heads=H, head_dim=d, causal=args.causal)
    rows = sample_rows(n).to(device)
    samples: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    inputs: dict[str, torch.Tensor] = {}

    def fill_inputs():
        if not inputs:
            inputs.update(zip(("q", "k", "v", "dout"), make_inputs(n, H, d, dtype, device)))

    def measure(row: Row, fn, iters, backward=True):
        q, k, v, dout = (inputs[x] for x in ("q", "k", "v", "dout"))
        warm = 1 if iters < args.iters else args.warmup
        for x in (q, k, v):
            x.requires_grad_(False)
        row.fwd_ms, _ = timed_median_ms(device, lambda: _no_grad(fn, q, k, v), warm, iters)
        if backward:
            for x in (q, k, v):
                x.requires_grad_()

            def step():
                for x in (q, k, v):
                    x.grad = None
                fn(q, k, v).backward(dout)

            row.fb_ms, row.peak = timed_median_ms(device, step, warm, iters)

    def keep_samples(name, fn):
        q, k, v, dout = (inputs[x] for x in ("q", "k", "v", "dout"))
        for x in (q, k, v):
            x.grad = None
        out = fn(q, k, v)
        if q.requires_grad:
            out.backward(dout)
        samples[name] = (out[:, rows].detach().float(), q.grad[:, rows].float() if q.grad is not None else None)
        del out
        for x in (q, k, v):
            x.grad = None

    def compare(name_a, name_b, label):
        """Sampled-row checks, only when both samples exist (both rows succeeded)."""
        if name_a not in samples or name_b not in samples:
            return
        (o1, g1), (o2, g2) = samples[name_a], samples[name_b]
        report.check(f"n={n} {label}, sampled out rows", rel_err(o1, o2), bar_for(dtype))
        if g1 is not None and g2 is not None:
            report.check(f"n={n} {label}, sampled dq rows", rel_err(g1, g2), bar_for(dtype))

    ours_fn = lambda a, b, c: dilated_attention(a, b, c, segs, rates, args.causal, backend=args.backend, max_rows_x_heads=args.max_rows_x_heads, max_view_elements=args.max_view_elements)  # noqa: E731
    row = Row(n, "ours")
    print(f"n={n}: ours", flush=True)

    def ours():
        fill_inputs()
        measure(row, ours_fn, args.iters)
        keep_samples("ours", ours_fn)

    if not run_row(device, args, row, flops, ours):
        samples.pop("ours", None)
    elif not args.skip_dense:
        print(f"n={n}: dense blocks", flush=True)
        dense_fb: list[float] = []
        failed = phase(device, "dense blocks", lambda: dense_fb.append(time_dense_blocks(device, args, n, dtype)[1]))
        if failed is None:
            row.dense_tflops = flops * FWD_BWD_FLOPS / (dense_fb[0] / 1e3) / 1e12
            row.share = dense_fb[0] / row.fb_ms
        else:
            add_note(row, f"dense blocks: {failed}")
    report.rows.append(row)
    report.write()
    if not args.skip_flex:
        frow = Row(n, FLEX_LABEL[args.flex_mode])
        print(f"n={n}: flex", flush=True)

        def flex():
            fill_inputs()
            fn = FLEX[args.flex_mode](n, segs, rates, H, 0, H, args.causal, device, 1.0 / math.sqrt(d))
            if not fn.backward_ok:
                frow.note = "forward only (no flex backward on CPU)"
            measure(frow, fn, args.flex_iters, backward=fn.backward_ok)  # leaves q.requires_grad
            keep_samples("flex", fn)  # with dq when flex has a backward

        if not run_row(device, args, frow, flops, flex):
            samples.pop("flex", None)
        reset_compiled()
        report.rows.append(frow)
        compare("ours", "flex", "ours vs flex")
        report.write()
    inputs.clear()
    free_memory(device)


def _no_grad(fn, q, k, v):
    with torch.no_grad():
        fn(q, k, v)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = setup(args)
    dtype = DTYPES[args.dtype]
    report = Report(args, device)
    print(f"bench_dilated: {report.device_line()}", flush=True)
    t0 = time.time()
    if args.check_seqlen:
        correctness_check(device, args, report, dtype)
    for n in args.seqlens:
        run_seqlen(device, args, report, n, dtype)
        print(f"  (elapsed {time.time() - t0:.0f} s)", flush=True)
    report.write()
    print("\n" + report.markdown(), flush=True)
    if report.failed:
        print("FAILED checks: " + "; ".join(report.failed), flush=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
