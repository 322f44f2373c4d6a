#!/usr/bin/env python
"""Benchmark the local attention backends (megatron_fapool.attention.kernels).

For every backend available on the device it times the functional API
(``attention_forward`` and ``attention_forward`` + ``attention_backward``) and,
for ``auto``, also the autograd wrapper ``local_attention`` (forward, and forward
+ ``.backward()``).  Timing: warm-up (which includes any compilation), then the
median of several repetitions measured with CUDA events (``time.perf_counter``
on CPU).  A backend that fails at one size (out of memory, unsupported, error) is
reported in the table and the run goes on.

Each measured backend is also checked against the ``math`` backend (for
``n <= --check-max-n``): the ``err`` columns give the largest relative error
(max|a-b| / max|ref|) over out and lse (forward) and dq, dk, dv (backward), and a
``!`` marks values above the tolerance (2.5e-2 for 16-bit, 1e-4 for float32).

FLOPs: causal forward = 4*b*h*d*n*(n+1)/2 (non-causal 4*b*h*d*n*n); backward =
2.5x forward; so forward+backward = 3.5x forward.

The ``auto`` row and the picks share one ``BackendSelector``, so a backend that fails under
``auto`` is dropped for the rest of the run and listed at the end.

Finally it states which backend ``auto`` picks for each n (forward only, and
forward+backward) and whether that was the fastest measured backend
(``auto picks fastest: yes/no``).

Examples::

    python tools/bench_local_attention.py                          # GPU defaults
    python tools/bench_local_attention.py --markdown runs/local_attn.md
    python tools/bench_local_attention.py --device cpu --seqlens 256 --heads 2 --dtype float32
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_fapool import _optional  # noqa: E402
from megatron_fapool.attention.kernels import (  # noqa: E402
    BACKENDS,
    BackendSelector,
    attention_backward,
    attention_forward,
    available_backends,
    local_attention,
    select_backend,
)

from _common import DTYPES, FWD_BWD_FLOPS, attention_flops, default_tol, elapsed_ms, free_memory, rel_err, sync  # noqa: E402

AUTO_ROW = "auto (local_attention)"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time the local attention backends (forward, forward+backward) and check 'auto'.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--seqlens", type=int, nargs="+", default=[4096, 16384, 65536], help="sequence lengths n (sq = sk = n)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32, help="query heads")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (GQA); default = --heads")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--causal", dest="causal", action="store_true", default=True)
    p.add_argument("--no-causal", dest="causal", action="store_false")
    p.add_argument("--backends", nargs="+", default=None, help="subset of backends (default: all available on the device)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up calls per case (the first includes compilation)")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions per case (median reported)")
    p.add_argument("--max-seconds", type=float, default=20.0,
                   help="time budget per case: fewer repetitions for slow cases (at least 1)")
    p.add_argument("--check-max-n", type=int, default=16384, help="check results against 'math' up to this n (0: never)")
    p.add_argument("--no-backward", action="store_true", help="time the forward only")
    p.add_argument("--markdown", default=None, help="also write the results as markdown to this path")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


@dataclass
class Cell:
    ms: float | None = None
    note: str = ""
    err: float | None = None
    reps: int = 0


@dataclass
class Row:
    backend: str
    n: int
    fwd: Cell = field(default_factory=Cell)
    fwdbwd: Cell = field(default_factory=Cell)


def time_fn(fn, device: torch.device, warmup: int, reps: int, budget_s: float) -> tuple[float, int]:
    """Median milliseconds of ``fn()`` and the number of timed repetitions."""
    sync(device)
    t0 = time.perf_counter()
    fn()  # first call: compilation / allocator warm-up
    sync(device)
    first = time.perf_counter() - t0
    if first > budget_s:
        return first * 1e3, 1  # too slow to repeat; the single (warm-ish) call is the measurement
    for _ in range(max(0, warmup - 1)):
        fn()
    sync(device)
    n = max(1, min(reps, int(budget_s / max(first, 1e-6))))
    times = []
    for _ in range(n):
        times.append(elapsed_ms(fn, device))
    return statistics.median(times), n


def _fail_note(exc: BaseException) -> str:
    if isinstance(exc, torch.OutOfMemoryError):
        return "OOM"
    if isinstance(exc, ValueError):
        return "unsupported: " + str(exc).split(": ")[-1][:60]
    return f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:60] if str(exc) else ''}"


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA requested but not available", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    hkv = args.kv_heads or args.heads
    tol = default_tol(dtype)
    avail = available_backends(device)
    # fused kernels first, the slow / compiling ones last (partial results survive a timeout)
    order = ("sdpa_cudnn", "flash_attn", "sdpa_flash", "sdpa_efficient", "flex", "math", "sdpa_math")
    backends = args.backends or sorted(avail, key=order.index)
    for name in backends:
        if name not in BACKENDS:
            print(f"unknown backend {name!r}; choose from {BACKENDS}", file=sys.stderr)
            return 2

    if device.type == "cuda":
        dev_name = torch.cuda.get_device_name(device)
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        dev_desc = f"{dev_name} (cuDNN {cudnn})"
    else:
        dev_desc = f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    date = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    header = [
        f"device: {dev_desc}",
        f"date: {date}; torch {torch.__version__}; {_optional.summary()}",
        f"shape: batch={args.batch} heads={args.heads} kv_heads={hkv} head_dim={args.head_dim} "
        f"dtype={dtype} causal={args.causal}",
        f"available backends: {', '.join(avail)}; measured: {', '.join(backends)}",
    ]
    print("\n".join(header), flush=True)

    rows: list[Row] = []
    selector = BackendSelector()  # the auto row's: what it drops after a failure stays dropped
    picks: dict[int, tuple[str, str]] = {}
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    for n in args.seqlens:
        b, h, d = args.batch, args.heads, args.head_dim

        def mk(heads: int) -> torch.Tensor:
            return torch.randn(b, n, heads, d, generator=gen).to(device=device, dtype=dtype)

        try:
            q, k, v, dout = mk(h), mk(hkv), mk(hkv), mk(h)
        except torch.OutOfMemoryError:
            print(f"n={n}: inputs do not fit in memory; skipped", flush=True)
            free_memory(device)
            continue
        kw = dict(causal=args.causal)
        picks[n] = (
            select_backend(q, k, v, causal=args.causal, requires_backward=False, selector=selector),
            select_backend(q, k, v, causal=args.causal, requires_backward=True, selector=selector),
        )
        ref = None
        if args.check_max_n and n <= args.check_max_n:
            try:
                ro, rl = attention_forward(q, k, v, backend="math", **kw)
                rg = None if args.no_backward else attention_backward(dout, q, k, v, ro, rl, backend="math", **kw)
                ref = (ro, rl, rg)
            except Exception as exc:  # noqa: BLE001
                print(f"n={n}: reference (math) failed: {_fail_note(exc)}; no checks at this n", flush=True)
                free_memory(device)

        for name in [*backends, AUTO_ROW]:
            row = Row(name, n)
            rows.append(row)
            is_auto = name == AUTO_ROW
            # ---- forward
            try:
                if is_auto:
                    def fwd():
                        with torch.no_grad():
                            return local_attention(q, k, v, **kw, return_lse=True, selector=selector)
                else:
                    def fwd(name=name):
                        return attention_forward(q, k, v, backend=name, **kw)
                row.fwd.ms, row.fwd.reps = time_fn(fwd, device, args.warmup, args.reps, args.max_seconds)
                out, lse = fwd()
                if ref is not None:
                    row.fwd.err = max(rel_err(out, ref[0]), rel_err(lse, ref[1]))
            except Exception as exc:  # noqa: BLE001
                row.fwd.note = _fail_note(exc)
                out = lse = None
                free_memory(device)
            # ---- forward + backward
            if not args.no_backward:
                try:
                    if is_auto:
                        qg, kg, vg = (x.detach().clone().requires_grad_(True) for x in (q, k, v))

                        def fb():
                            for x in (qg, kg, vg):
                                x.grad = None
                            local_attention(qg, kg, vg, **kw, selector=selector).backward(dout)
                            return qg.grad, kg.grad, vg.grad
                    else:
                        def fb(name=name):
                            o, s = attention_forward(q, k, v, backend=name, **kw)
                            return attention_backward(dout, q, k, v, o, s, backend=name, **kw)
                    row.fwdbwd.ms, row.fwdbwd.reps = time_fn(fb, device, args.warmup, args.reps, args.max_seconds)
                    grads = fb()
                    if ref is not None and ref[2] is not None:
                        row.fwdbwd.err = max(rel_err(gx, rx) for gx, rx in zip(grads, ref[2]))
                    del grads
                    if is_auto:
                        del qg, kg, vg
                except Exception as exc:  # noqa: BLE001
                    row.fwdbwd.note = _fail_note(exc)
                    free_memory(device)
            del out, lse
            _print_row(row, args, flush=True)
            if args.markdown:  # rewrite after every row so that a killed run still leaves a table
                write_markdown(args.markdown, header, format_table(rows, args, tol), "(run in progress)")
        del q, k, v, dout, ref
        free_memory(device)

    table = format_table(rows, args, tol)
    verdict = format_verdict(rows, picks, args)
    failures = selector.failures()
    print()
    print("\n".join(header))
    print(table)
    print(verdict)
    if failures:
        print("auto fallbacks recorded:")
        for key, why in failures.items():
            print(f"  {key}: {why}")
    bad = [r for r in rows for c in (r.fwd, r.fwdbwd) if c.err is not None and c.err > tol]
    if bad:
        print(f"CHECK FAILED: {len(bad)} result(s) differ from 'math' by more than {tol:g} (marked '!')")
    if args.markdown:
        write_markdown(args.markdown, header, table, verdict)
        print(f"markdown written to {args.markdown}")
    return 1 if bad else 0


def write_markdown(path: str, header: list[str], table: str, verdict: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("# Local attention benchmark\n\n")
        f.write("\n".join(f"- {line}" for line in header) + "\n\n")
        f.write(table + "\n\n")
        f.write("```\n" + verdict + "\n```\n")


def _tflops(ms: float | None, flops: float) -> str:
    return "" if ms is None else f"{flops / (ms * 1e-3) / 1e12:.3g}"


def _ms(c: Cell) -> str:
    if c.ms is None:
        return c.note or "-"
    return f"{c.ms:.3f}" + ("" if c.reps != 1 else " (1 rep)")


def _err(c: Cell, tol: float) -> str:
    if c.err is None:
        return ""
    return f"{c.err:.1e}" + ("!" if c.err > tol else "")


def _print_row(row: Row, args, flush=False) -> None:
    print(f"  {row.backend:24s} n={row.n:<7d} fwd {_ms(row.fwd):>14s} ms   fwd+bwd {_ms(row.fwdbwd):>14s} ms", flush=flush)


def format_table(rows: list[Row], args, tol: float) -> str:
    hkv = args.kv_heads or args.heads
    del hkv
    lines = [
        "| backend | n | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | fwd err | bwd err |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        f = attention_flops(args.batch, args.heads, r.n, args.head_dim, causal=args.causal)
        lines.append(
            f"| {r.backend} | {r.n} | {_ms(r.fwd)} | {_tflops(r.fwd.ms, f)} | {_ms(r.fwdbwd)} | "
            f"{_tflops(r.fwdbwd.ms, FWD_BWD_FLOPS * f)} | {_err(r.fwd, tol)} | {_err(r.fwdbwd, tol)} |"
        )
    return "\n".join(lines)


def _verdict_phase(rows: list[Row], n: int, pick: str, attr: str) -> str:
    timed = {r.backend: getattr(r, attr).ms for r in rows if r.n == n and r.backend != AUTO_ROW and getattr(r, attr).ms is not None}
    if not timed:
        return f"auto picks {pick}; nothing measured"
    best = min(timed, key=timed.get)
    if pick not in timed:
        return f"auto picks {pick} (not measured); fastest measured {best} -> auto picks fastest: no"
    slower = timed[pick] / timed[best] - 1.0
    if pick == best:
        return f"auto picks {pick} -> auto picks fastest: yes"
    if slower <= 0.03:
        return f"auto picks {pick}, {slower:.1%} behind {best} (within 3% noise) -> auto picks fastest: yes"
    return f"auto picks {pick}, {slower:.1%} slower than {best} -> auto picks fastest: no"


def format_verdict(rows: list[Row], picks: dict[int, tuple[str, str]], args) -> str:
    out = []
    all_yes = True
    for n, (pf, pb) in picks.items():
        s = _verdict_phase(rows, n, pf, "fwd")
        out.append(f"n={n} forward:         {s}")
        all_yes &= s.endswith("yes")
        if not args.no_backward:
            s = _verdict_phase(rows, n, pb, "fwdbwd")
            out.append(f"n={n} forward+backward: {s}")
            all_yes &= s.endswith("yes")
    out.append(f"overall: auto picks fastest: {'yes' if all_yes else 'no'}")
    return "\n".join(out)


def main(argv=None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
