#!/usr/bin/env python
"""Calibrate the attention pool's threshold and cost model on the actual hardware.

Run on 2 ranks (a base rank and one pool rank)::

    torchrun --nproc_per_node 2 tools/calibrate_pool.py \\
        --deepspeed_config configs/paper_dense_pool.json --output runs/pool_calibration.json

For each sequence length t of the sweep (``--seqlens``, default 512 .. 65536, powers
of two), with the dimensions of ONE base rank of the model in the config (heads,
query groups and FFN width divided by TP; head dim, hidden, activation, dtype and
attention backend from the config; ``--tp``, ``--dtype``, ``--backend`` override):

* ``Attention_Time(t)``: local causal attention, forward + backward, of the rank's
  heads on one GPU (``local_attention``, the config's kernel backend);
* ``FFN_Time(t)``: the layer's MLP forward + backward on one GPU: hidden -> ffn ->
  hidden with the model's activation (gated for swiglu), plain torch matmuls,
  gradients for the input and both weights;
* ``Pooled_Time(t)``: the real pooled attention (``PooledAttention``, base + 1 pool
  rank, forward + backward), checked once against the local result;
* ``Overhead(t) = max(0, Pooled_Time(t) - Attention_Time(t) / 2)``: what a pooled
  call costs beyond half of the attention;
* once: the raw link bandwidth, from broadcasts of a big buffer (``--bw-mib``) from
  the base rank to the pool rank over their attention group.

Threshold (DESIGN.md section 2): ``min t with Attention_Time(t) > FFN_Time(t) +
Overhead(t)``. Between the last sweep point where the condition fails and the first
where it holds, ``g(t) = A - F - O`` is interpolated linearly in ``log2 t`` and the
threshold is the (floored) zero crossing. If the condition already holds at the
smallest t, the threshold is that t; if it never holds, the largest t (with a warning:
extrapolate with the fitted models (``A = a t^2``, ``F = f t``
fitted like ``a``, ``O`` from the cost model) and say so.

Cost model (``megatron_fapool.attention.pool.manager.CostModel``):

* ``attention_s_per_token2``: least squares of ``A(t) = a t^2`` in relative terms
  (minimises ``sum((a t^2 - A)/A)^2``, so short and long t count alike);
* ``link_bytes_per_s``: the broadcast bandwidth;
* ``call_overhead_s``: the mean of ``Overhead(t)`` over the small t: the sweep points
  up to the measured break-even (or the three smallest, if the pool never wins);
* ``kv_bytes_per_token = 2 * kv_heads * head_dim * elt``,
  ``q_bytes_per_token = heads * head_dim * elt`` (per base rank).

Break-even: measured = the smallest sweep t where the pooled call is faster than the
local one (also interpolated in log2 t); predicted = ``CostModel.break_even()``. Both
are printed with the difference in percent.

The JSON written to ``--output`` loads with ``manager.load_calibration`` and
``CostModel(**data["cost_model"])``; use it from a config with
``"threshold": "auto", "calibration_file": "<path>"`` in ``fapool.attention_pool``.
Exit code 1 if the pooled result differs from the local one.

CPU smoke run (gloo, tiny model)::

    torchrun --nproc_per_node 2 tools/calibrate_pool.py --device cpu \\
        --deepspeed_config configs/tiny_dense_pool.json --seqlens 64,128,256 --reps 2
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import socket
import statistics
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F

_TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_TOOLS))
sys.path.insert(0, _TOOLS)

from bench_pool_attention import DTYPES, free_memory, init_process, rel_err, time_fn  # noqa: E402
from megatron_fapool.attention import kernels as L  # noqa: E402
from megatron_fapool.attention.pool import CostModel, PooledAttention, PoolClient, PoolServer, PoolStats  # noqa: E402
from megatron_fapool.attention.pool.manager import load_calibration  # noqa: E402
from megatron_fapool.config import ConfigError, load_run_config  # noqa: E402
from megatron_fapool.parallel import LayoutError, compute_layout, initialize_parallel_groups  # noqa: E402

DEFAULT_SEQLENS = ",".join(str(1 << i) for i in range(9, 17))  # 512 .. 65536

_ACTIVATIONS = {
    "gelu": (F.gelu, False),
    "swiglu": (F.silu, True),
    "silu": (F.silu, False),
    "relu": (F.relu, False),
    "squared_relu": (lambda x: F.relu(x).pow(2), False),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                   default="configs/paper_dense_pool.json", help="DeepSpeed JSON with the fapool section")
    p.add_argument("--seqlens", default=DEFAULT_SEQLENS, help="comma-separated sweep of sequence lengths")
    p.add_argument("--output", default="runs/pool_calibration.json")
    p.add_argument("--tp", type=int, default=None, help="override the config's tensor parallel size (heads per rank)")
    p.add_argument("--pool-size", type=int, default=None, help="pool ranks of this run (must be world size - 1)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="override the config's precision")
    p.add_argument("--backend", default=None, help="override the config's attention backend")
    p.add_argument("--kv-chunk", type=int, default=None, help="override the config's kv_chunk_tokens")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 10 up to 8K, 5 up to 32K, else 3)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 3 up to 8K, else 1)")
    p.add_argument("--bw-mib", type=float, default=None, help="broadcast buffer for the link bandwidth (default 512 GPU, 16 CPU)")
    p.add_argument("--tol", type=float, default=None, help="pooled vs local max relative error (default 2.5e-2 16-bit, 1e-4 fp32)")
    p.add_argument("--seed", type=int, default=4321)
    p.add_argument("--pg-timeout", type=float, default=300.0)
    args = p.parse_args(argv)
    args.seqlens = sorted({int(x) for x in str(args.seqlens).split(",") if x.strip()})
    if not args.seqlens or args.seqlens[0] < 8:
        p.error("--seqlens: give lengths >= 8")
    return args


class Calibration:
    def __init__(self, args, device, rank, world):
        self.args, self.device, self.rank, self.world = args, device, rank, world
        cfg = load_run_config(args.deepspeed_config)
        lm = cfg.model.language_model
        tp = args.tp or cfg.tensor_model_parallel_size
        for what, count in (("num_attention_heads", lm.num_attention_heads), ("num_query_groups", lm.query_groups)):
            if count % tp:
                raise SystemExit(f"{what}={count} is not divisible by TP={tp}")
        ffn = lm.ffn_hidden_size or 4 * lm.hidden_size
        if ffn % tp:
            raise SystemExit(f"ffn_hidden_size={ffn} is not divisible by TP={tp}")
        pool_size = world - 1
        if args.pool_size is not None and args.pool_size != pool_size:
            raise SystemExit(
                f"--pool-size {args.pool_size} but {world} ranks were launched:"
                f" launch --nproc_per_node {args.pool_size + 1} (one base rank + the pool)"
            )
        self.tp = tp
        self.heads = lm.num_attention_heads // tp
        self.kv_heads = lm.query_groups // tp
        self.head_dim = lm.head_dim
        self.hidden = lm.hidden_size
        self.ffn = ffn // tp
        self.activation = lm.activation_func
        self.dtype = DTYPES[args.dtype] if args.dtype else cfg.params_dtype
        self.backend = args.backend or cfg.fapool.attention_backend.backend
        self.kv_chunk = args.kv_chunk or cfg.fapool.attention_pool.kv_chunk_tokens
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.tol = args.tol if args.tol is not None else (2.5e-2 if self.dtype in (torch.float16, torch.bfloat16) else 1e-4)
        self.elt = torch.tensor([], dtype=self.dtype).element_size()
        self.model = dict(
            config=args.deepspeed_config, model_yaml=cfg.model_yaml_path, tp=tp, heads_per_rank=self.heads,
            kv_heads_per_rank=self.kv_heads, head_dim=self.head_dim, hidden=self.hidden, ffn_per_rank=self.ffn,
            activation=self.activation, dtype=str(self.dtype).replace("torch.", ""), backend=self.backend,
            kv_chunk_tokens=self.kv_chunk, pool_ranks=pool_size,
        )
        layout = compute_layout(world, tp=1, pool_size=pool_size, num_attention_heads=self.heads,
                                num_query_groups=self.kv_heads)
        self.groups = initialize_parallel_groups(layout, timeout_s=args.pg_timeout)
        self.pool_group = self.groups.attention_group(0, pool_size)
        self.failures: list[str] = []

    def log(self, *a) -> None:
        if self.rank == 0:
            print(*a, flush=True)

    def reps_for(self, t: int) -> tuple[int, int]:
        reps = self.args.reps if self.args.reps is not None else (10 if t <= 8192 else 5 if t <= 32768 else 3)
        warm = self.args.warmup if self.args.warmup is not None else (3 if t <= 8192 else 1)
        return max(1, reps), max(0, warm)

    # -- measurements -------------------------------------------------------------------
    def link_bandwidth(self) -> float:
        mib = self.args.bw_mib or (512.0 if self.device.type == "cuda" else 16.0)
        nbytes = int(mib * 2**20) // 4 * 4
        buf = torch.zeros(nbytes // 4, dtype=torch.float32, device=self.device)

        def bcast():
            dist.broadcast(buf, src=0, group=self.pool_group)

        times = time_fn(bcast, reps=10, warmup=3, device=self.device, group=self.pool_group)
        del buf
        free_memory(self.device)
        return nbytes / (statistics.median(times) * 1e-3)

    def inputs(self, t: int):
        g = torch.Generator(device=self.device).manual_seed(self.args.seed + t)

        def rnd(*shape, scale=1.0):
            return (torch.randn(shape, generator=g, device=self.device, dtype=torch.float32) * scale).to(self.dtype)

        q = rnd(1, t, self.heads, self.head_dim)
        k = rnd(1, t, self.kv_heads, self.head_dim)
        v = rnd(1, t, self.kv_heads, self.head_dim)
        dout = rnd(1, t, self.heads, self.head_dim)
        return q, k, v, dout

    def local_phase(self, t: int):
        """Rank 0 alone: attention and FFN forward+backward times (s) and the local reference."""
        reps, warm = self.reps_for(t)
        q, k, v, dout = self.inputs(t)
        qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))

        def attn():
            out = L.local_attention(qg, kg, vg, causal=True, softmax_scale=self.scale, backend=self.backend)
            return (out.detach(),) + torch.autograd.grad(out, (qg, kg, vg), dout)

        ref = attn()
        a = statistics.median(time_fn(attn, reps=reps, warmup=warm, device=self.device)) * 1e-3

        act, gated = _ACTIVATIONS[self.activation]
        g = torch.Generator(device=self.device).manual_seed(self.args.seed)
        width = 2 * self.ffn if gated else self.ffn
        w1 = (torch.randn(width, self.hidden, generator=g, device=self.device) * 0.02).to(self.dtype).requires_grad_()
        w2 = (torch.randn(self.hidden, self.ffn, generator=g, device=self.device) * 0.02).to(self.dtype).requires_grad_()
        x = torch.randn(t, self.hidden, generator=g, device=self.device).to(self.dtype).requires_grad_()
        dy = torch.randn(t, self.hidden, generator=g, device=self.device).to(self.dtype)

        def mlp():
            h = F.linear(x, w1)
            if gated:
                h1, h2 = h.chunk(2, dim=-1)
                h = act(h1) * h2
            else:
                h = act(h)
            y = F.linear(h, w2)
            return torch.autograd.grad(y, (x, w1, w2), dy)

        f = statistics.median(time_fn(mlp, reps=reps, warmup=warm, device=self.device)) * 1e-3
        del x, w1, w2, dy, qg, kg, vg
        return a, f, ref, (q, k, v, dout)

    def pool_phase(self, t: int, data, ref):
        """Base rank: pooled attention forward+backward time (s), check; pool rank: serve."""
        if self.groups.is_pool:
            served = PoolServer(self.groups, device=self.device, stats=PoolStats()).serve().as_dict()
            stats = [None] * self.world
            dist.all_gather_object(stats, served)
            return None, None, None
        reps, warm = self.reps_for(t)
        client = PoolClient(self.groups, kv_chunk_tokens=self.kv_chunk, backend=self.backend, stats=PoolStats())
        active = self.world - 1
        try:
            q, k, v, dout = (x.transpose(0, 1).contiguous() for x in data)  # [s, b, h, d]
            qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))

            def pooled():
                out = PooledAttention.apply(qg, kg, vg, client, active, True, self.scale)
                return (out.detach(),) + torch.autograd.grad(out, (qg, kg, vg), dout)

            got = pooled()
            nbytes = client.stats.bytes_sent + client.stats.bytes_received
            err = max(rel_err(x.transpose(0, 1), r) for x, r in zip(got, ref))
            del got
            p = statistics.median(time_fn(pooled, reps=reps, warmup=warm, device=self.device)) * 1e-3
        finally:
            client.shutdown(self.device)
        stats = [None] * self.world
        dist.all_gather_object(stats, None)
        for r in range(1, self.world):
            if not stats[r] or stats[r]["served_forward"] < 1 or stats[r]["query_rows"] <= 0:
                self.failures.append(f"t={t}: pool rank {r} did not compute (its counters: {stats[r]})")
        return p, err, nbytes

    # -- driver -------------------------------------------------------------------------
    def run(self) -> int:
        a = self.args
        started = _dt.datetime.now(_dt.timezone.utc)
        if self.device.type == "cuda":
            device_name = f"{torch.cuda.get_device_name(self.device)} x {self.world}"
        else:
            device_name = f"cpu (gloo, {self.world} processes)"
        self.log(f"calibrate_pool: {device_name}; torch {torch.__version__}; {started:%Y-%m-%d %H:%M UTC}")
        self.log("model per base rank: " + ", ".join(f"{k}={v}" for k, v in self.model.items()))
        link = self.link_bandwidth()
        self.log(f"link bandwidth (broadcast base -> pool): {link / 1e9:.2f} GB/s")
        header = (f"{'t':>7} | {'attention ms':>12} | {'ffn ms':>9} | {'pooled ms':>10} | {'overhead ms':>11}"
                  f" | {'A > F+O':>7} | {'pool wins':>9} | {'pool bytes':>11} | check")
        self.log(header)
        self.log("-" * len(header))
        seqlens, A, Fs, P, O, nbytes = [], [], [], [], [], []
        for t in a.seqlens:
            if self.rank == 0:
                at, ft, ref, data = self.local_phase(t)
            else:
                data = ref = None
            dist.barrier()
            pt, err, nb = self.pool_phase(t, data, ref)
            del data, ref
            free_memory(self.device)
            dist.barrier()
            if self.rank != 0:
                continue
            ot = max(0.0, pt - at / 2)
            ok = err <= self.tol
            if not ok:
                self.failures.append(f"t={t}: pooled attention differs from local ({err:.2e} > {self.tol:g})")
            seqlens.append(t)
            A.append(at)
            Fs.append(ft)
            P.append(pt)
            O.append(ot)
            nbytes.append(nb)
            self.log(f"{t:>7} | {at * 1e3:>12.3f} | {ft * 1e3:>9.3f} | {pt * 1e3:>10.3f} | {ot * 1e3:>11.3f}"
                     f" | {'yes' if at > ft + ot else 'no':>7} | {'yes' if pt < at else 'no':>9}"
                     f" | {nb / 2**20:>7.1f} MiB | {'ok' if ok else 'WRONG'} ({err:.1e})")
        code = 0
        if self.rank == 0:
            result = self.fit(seqlens, A, Fs, P, O, nbytes, link, device_name, started)
            out = a.output
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            with open(out + ".tmp", "w") as f:
                json.dump(result, f, indent=2)
            os.replace(out + ".tmp", out)
            data = load_calibration(out)  # what the resource manager will do
            CostModel(**data["cost_model"])
            self.log(f"wrote {out} (loads with load_calibration; use \"threshold\": \"auto\","
                     f" \"calibration_file\": \"{out}\" in fapool.attention_pool)")
            for msg in self.failures:
                self.log(f"FAILED: {msg}")
            code = 1 if self.failures else 0
        flag = torch.tensor([code], device=self.device)
        dist.broadcast(flag, src=0)
        return int(flag.item())

    def fit(self, seqlens, A, Fs, P, O, nbytes, link, device_name, started) -> dict:
        notes = []
        ts = [float(t) for t in seqlens]
        # threshold: min t with A > F + O, zero crossing of g interpolated in log2 t
        g = [a - f - o for a, f, o in zip(A, Fs, O)]
        idx = next((i for i, x in enumerate(g) if x > 0), None)
        if idx is None:
            threshold = None  # extrapolated below, once the cost model is fitted
        elif idx == 0:
            threshold = seqlens[0]
            notes.append(f"the condition already holds at the smallest t={seqlens[0]}: threshold = that t")
        else:
            x0, x1 = math.log2(ts[idx - 1]), math.log2(ts[idx])
            frac = g[idx - 1] / (g[idx - 1] - g[idx])  # g[idx-1] <= 0 < g[idx]
            threshold = int(math.floor(2 ** (x0 + frac * (x1 - x0))))
            notes.append(f"threshold interpolated in log2 t between t={seqlens[idx - 1]} and t={seqlens[idx]}")
        # measured break-even
        be_idx = next((i for i in range(len(seqlens)) if P[i] < A[i]), None)
        measured = seqlens[be_idx] if be_idx is not None else None
        measured_interp = None
        if be_idx is not None:
            if be_idx == 0:
                measured_interp = float(seqlens[0])
            else:
                h0, h1 = A[be_idx - 1] - P[be_idx - 1], A[be_idx] - P[be_idx]
                x0, x1 = math.log2(ts[be_idx - 1]), math.log2(ts[be_idx])
                measured_interp = 2 ** (x0 + h0 / (h0 - h1) * (x1 - x0))
        # cost model
        a_fit = sum(t * t / x for t, x in zip(ts, A)) / sum((t * t / x) ** 2 for t, x in zip(ts, A))
        small = [i for i in range(len(seqlens)) if measured is not None and seqlens[i] <= measured]
        if not small:
            small = list(range(min(3, len(seqlens))))
        call_overhead = max(0.0, sum(O[i] for i in small) / len(small))
        cost = dict(
            attention_s_per_token2=a_fit,
            link_bytes_per_s=link,
            call_overhead_s=call_overhead,
            kv_bytes_per_token=float(2 * self.kv_heads * self.head_dim * self.elt),
            q_bytes_per_token=float(self.heads * self.head_dim * self.elt),
        )
        model = CostModel(**cost)
        predicted = model.break_even()
        if threshold is None:
            # A > F + O never held in the sweep: extrapolate with A = a t^2, F = f t (relative least
            # squares, like a) and O = the cost model's pooled time - a t^2 / 2
            f_fit = sum(t / x for t, x in zip(ts, Fs)) / sum((t / x) ** 2 for t, x in zip(ts, Fs))

            def holds(t):
                return a_fit * t * t > f_fit * t + max(0.0, model.time(t, 1) - a_fit * t * t / 2)

            lo, hi, cap = seqlens[-1], seqlens[-1] * 2, 1 << 22
            while hi < cap and not holds(hi):
                lo, hi = hi, hi * 2
            while lo + 1 < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if holds(mid) else (mid, hi)
            threshold = hi
            notes.append(f"Attention_Time > FFN_Time + Overhead never held up to t={seqlens[-1]}: threshold"
                         f" extrapolated with the fitted models (A = a t^2, F = {f_fit:.3g} s * t, O from the"
                         " cost model); extend --seqlens to measure it")
        self.log(f"\nthreshold = {threshold} ({notes[-1] if notes else ''})")
        self.log("cost model: " + ", ".join(f"{k}={v:.4g}" for k, v in cost.items())
                 + f" (call overhead = mean Overhead(t) over t in {[seqlens[i] for i in small]})")
        if measured is None:
            self.log(f"measured break-even: none (the pooled call never beat the local one up to t={seqlens[-1]});"
                     f" predicted break-even {predicted}")
            diff = diff_interp = None
        else:
            diff = 100.0 * (predicted - measured) / measured
            diff_interp = 100.0 * (predicted - measured_interp) / measured_interp
            self.log(f"break-even: measured {measured} (smallest sweep t where pooled < local;"
                     f" interpolated {measured_interp:.0f}), predicted {predicted} by the cost model:"
                     f" {diff:+.1f}% vs the sweep point, {diff_interp:+.1f}% vs the interpolated crossing"
                     f" ({'within' if abs(diff_interp) <= 25 else 'NOT within'} 25%)")
        for i, t in enumerate(seqlens):
            pred_p, pred_l = model.time(t, 1), model.time(t, 0)
            model_bytes = t * (model.kv_bytes_per_token + model.q_bytes_per_token)  # p=1: share 1/2, 2 directions
            self.log(f"  t={t:>7}: model local {pred_l * 1e3:9.3f} ms (measured {A[i] * 1e3:9.3f}),"
                     f" pooled {pred_p * 1e3:9.3f} ms (measured {P[i] * 1e3:9.3f});"
                     f" bytes the model counts {model_bytes / 2**20:.1f} MiB, a pooled fwd+bwd call moved"
                     f" {nbytes[i] / 2**20:.1f} MiB")
        return {
            "device": device_name,
            "date": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "torch": torch.__version__,
            "host": socket.gethostname(),
            "model": self.model,
            "seqlens": seqlens,
            "attention_time": A,
            "ffn_time": Fs,
            "overhead": O,
            "pooled_time": P,
            "pool_bytes_per_call": nbytes,
            "link_bytes_per_s": link,
            "threshold": int(threshold),
            "measured_break_even": measured,
            "measured_break_even_interpolated": measured_interp,
            "predicted_break_even": predicted,
            "break_even_difference_percent": diff,
            "break_even_difference_percent_interpolated": diff_interp,
            "cost_model": cost,
            "notes": notes + [
                "times in seconds, forward+backward of one layer of one base rank (heads/query groups/ffn divided by TP)",
                "overhead = max(0, pooled_time - attention_time/2)",
                "attention_s_per_token2: least squares of attention_time = a t^2 in relative error",
                "call_overhead_s: mean overhead over the sweep points up to the measured break-even"
                " (the three smallest if none)",
            ],
        }


def main(argv=None) -> int:
    args = parse_args(argv)
    device, rank, world = init_process(args.device, args.pg_timeout)
    if world < 2:
        if rank == 0:
            print("calibrate_pool: run with torchrun --nproc_per_node 2 (a base rank and a pool rank)", file=sys.stderr)
        dist.destroy_process_group()
        return 2
    t0 = time.perf_counter()
    try:
        code = Calibration(args, device, rank, world).run()
    except (SystemExit, ConfigError, LayoutError) as e:
        if rank == 0:
            print(f"calibrate_pool: error: {e}", file=sys.stderr, flush=True)
        os._exit(2)
    except Exception:  # noqa: BLE001 - print, then let torchrun stop the other ranks
        print(f"[rank {rank}] calibrate_pool failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
    if rank == 0:
        print(f"calibration took {time.perf_counter() - t0:.1f} s", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
