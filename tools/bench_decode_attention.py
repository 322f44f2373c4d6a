#!/usr/bin/env python
"""How fast one decode step's attention reads the KV cache, against the GPU's copy bandwidth.

    python tools/bench_decode_attention.py --markdown runs/decode_attention.md     # GPU defaults
    python tools/bench_decode_attention.py --device cpu --lengths 4096 --heads 4  # smoke

A decode step's attention is one query row per head against the whole cached K/V, so
it is bound by reading the cache: bytes = 2 (K and V) x n x kv_heads x head_dim x
element size. For every cache length and backend this times
:func:`~megatron_fapool.attention.pool.decode.decode_partial` on a cache laid out as
the inference path stores it (layout ``stored``: a
:class:`~megatron_fapool.attention.pool.decode.KVShard`, K and V each contiguous) or,
for comparison, with K and V interleaved per token (``interleaved``:
``[n, 2, kv_heads, head_dim]``, which the kernels must copy first), with the keys run whole (``splits 1``) or split into pieces
batched in one kernel call (flash decoding; ``auto`` = the rule the inference path
uses), and reports the achieved read bandwidth as a share of the copy bandwidth
measured in the same run (``dst.copy_(src)`` of a large buffer: bytes read + written
per second). Timing: median of ``--reps`` calls with CUDA events after warm-up.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys

import torch

from megatron_fapool.attention import kernels as L
from megatron_fapool.attention.pool.decode import KVShard, decode_partial, decode_splits

from _common import DTYPES, copy_bandwidth, median_ms, rel_err


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--heads", type=int, default=32, help="query heads (paper model: 32)")
    p.add_argument("--kv-heads", type=int, default=None, help="default = --heads")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--splits", nargs="+", default=["1", "auto", "4", "8", "16", "32"], help="'auto' or integers")
    p.add_argument("--backends", nargs="+", default=None, help="default: every backend available on the device")
    p.add_argument("--layouts", nargs="+", default=["stored", "interleaved"], choices=["stored", "interleaved"])
    p.add_argument("--copy-gib", type=float, default=4.0, help="size of the copy-bandwidth buffer")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--markdown", default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dt = torch.device(args.device), DTYPES[args.dtype]
    hk = args.kv_heads or args.heads
    d = args.head_dim
    backends = args.backends or [b for b in L.available_backends(device) if b != "math"] + ["math"]
    copy_bw = copy_bandwidth(device, args.copy_gib, args.reps)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}; copy bandwidth {copy_bw / 1e12:.2f} TB/s (read + write)", flush=True)
    lines = [f"# Decode attention read bandwidth ({_dt.date.today()}, {name}, torch {torch.__version__})", "",
             f"{args.dtype}, {args.heads} query heads, {hk} KV heads, head dim {d}, one query row; copy bandwidth"
             f" {copy_bw / 1e12:.2f} TB/s measured in the same run.", "",
             "| cache tokens | layout | backend | splits | time (us) | K/V read (TB/s) | % of copy bandwidth |",
             "|---:|---|---|---:|---:|---:|---:|"]
    g = torch.Generator(device=device).manual_seed(0)
    best = {}
    for n in args.lengths:
        for layout in args.layouts:
            if layout == "stored":
                shard = KVShard(*(torch.randn((n, hk, d), generator=g, device=device).to(dt) for _ in range(2)))
                k, v = shard.k, shard.v
            else:
                cache = torch.randn((n, 2, hk, d), generator=g, device=device).to(dt)
                k, v = cache[:, 0], cache[:, 1]
            q = torch.randn((args.heads, d), generator=g, device=device).to(dt)
            nbytes = 2 * n * hk * d * k.element_size()
            ref = None
            for backend in backends:
                for sp in args.splits:
                    splits = decode_splits(n, hk, device, backend) if sp == "auto" else int(sp)
                    label = f"auto ({splits})" if sp == "auto" else str(splits)
                    row = f"| {n} | {layout} | {backend} | {label} |"

                    def call():
                        return decode_partial(q, k, v, softmax_scale=d ** -0.5, backend=backend, splits=splits)
                    try:
                        out, _ = call()
                        ref = out if ref is None else ref
                        err = rel_err(out, ref)
                        ms = median_ms(call, device, reps=args.reps)
                    except (ValueError, RuntimeError, torch.OutOfMemoryError) as e:
                        lines.append(f"{row} failed: {str(e).splitlines()[0][:60]} | | |")
                        continue
                    bw = nbytes / (ms * 1e-3)
                    flag = " (differs!)" if err > 2e-2 else ""
                    lines.append(f"{row} {ms * 1e3:.0f} | {bw / 1e12:.2f} | {100 * bw / copy_bw:.0f}%{flag} |")
                    print(lines[-1], flush=True)
                    if bw > best.get(n, (0, ""))[0]:
                        best[n] = (bw, f"{layout}, {backend}, splits {label}")
    lines.append("")
    for n, (bw, what) in best.items():
        lines.append(f"- {n} tokens: best {bw / 1e12:.2f} TB/s = {100 * bw / copy_bw:.0f}% of copy bandwidth ({what})")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
