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

From these, :func:`megatron_fapool.attention.pool.calibrate.fit` derives the threshold
(DESIGN.md section 2: ``min t with Attention_Time(t) > FFN_Time(t) + Overhead(t)``,
interpolated in ``log2 t``), the cost model
(:class:`~megatron_fapool.attention.pool.manager.CostModel`) and the break-even, measured
(the smallest sweep t where the pooled call is faster than the local one) and predicted
(``CostModel.break_even()``); its module docstring has the details. Both break-evens are
printed with the difference in percent.

The JSON written to ``--output`` is the format of :mod:`megatron_fapool.config.calibration`
(read back with ``load_calibration`` before the tool exits); use it from a config with
``"threshold": "auto", "calibration_file": "<path>"`` in ``fapool.attention_pool``.
Exit code 1 if the pooled result differs from the local one.

CPU smoke run (gloo, tiny model)::

    torchrun --nproc_per_node 2 tools/calibrate_pool.py --device cpu \\
        --deepspeed_config configs/tiny_dense_pool.json --seqlens 64,128,256 --reps 2
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_fapool.attention import kernels as L
from megatron_fapool.attention.pool import CostModel, PooledAttention, PoolClient, PoolServer, PoolStats
from megatron_fapool.attention.pool.calibrate import Fit, Measurements, calibration_file, fit, overheads
from megatron_fapool.config import ConfigError, load_run_config
from megatron_fapool.config.calibration import load_calibration, write_calibration
from megatron_fapool.config.model_yaml import activation
from megatron_fapool.parallel import LayoutError, compute_layout, initialize_parallel_groups

from _common import DTYPES, default_tol, free_memory, rel_err, run_distributed, time_fn

DEFAULT_SEQLENS = ",".join(str(1 << i) for i in range(9, 17))  # 512 .. 65536


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
        self.tol = args.tol if args.tol is not None else default_tol(self.dtype)
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

        act, gated = activation(self.activation)
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
            q, k, v, dout = data  # [b, s, h, d], as the local phase's
            qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))

            def pooled():
                out = PooledAttention.apply(qg, kg, vg, client, active, True, self.scale)
                return (out.detach(),) + torch.autograd.grad(out, (qg, kg, vg), dout)

            got = pooled()
            nbytes = client.stats.bytes_sent + client.stats.bytes_received
            err = max(rel_err(x, r) for x, r in zip(got, ref))
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
        seqlens, A, Fs, P, nbytes = [], [], [], [], []
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
            (ot,) = overheads([at], [pt])
            ok = err <= self.tol
            if not ok:
                self.failures.append(f"t={t}: pooled attention differs from local ({err:.2e} > {self.tol:g})")
            seqlens.append(t)
            A.append(at)
            Fs.append(ft)
            P.append(pt)
            nbytes.append(nb)
            self.log(f"{t:>7} | {at * 1e3:>12.3f} | {ft * 1e3:>9.3f} | {pt * 1e3:>10.3f} | {ot * 1e3:>11.3f}"
                     f" | {'yes' if at > ft + ot else 'no':>7} | {'yes' if pt < at else 'no':>9}"
                     f" | {nb / 2**20:>7.1f} MiB | {'ok' if ok else 'WRONG'} ({err:.1e})")
        code = 0
        if self.rank == 0:
            m = Measurements(seqlens=seqlens, attention_time=A, ffn_time=Fs, pooled_time=P, link_bytes_per_s=link,
                             kv_bytes_per_token=2 * self.kv_heads * self.head_dim * self.elt,
                             q_bytes_per_token=self.heads * self.head_dim * self.elt)
            result = fit(m)
            self.report(m, result, nbytes)
            out = a.output
            write_calibration(out, calibration_file(
                m, result, pool_bytes_per_call=nbytes, device=device_name,
                date=started.strftime("%Y-%m-%dT%H:%M:%SZ"), torch=torch.__version__, host=socket.gethostname(),
                model=self.model,
            ))
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

    def report(self, m: Measurements, result: Fit, nbytes: list[int]) -> None:
        """The fit beside the sweep: threshold, cost model, break-even, model against measured times."""
        model, notes = result.cost_model, result.notes
        self.log(f"\nthreshold = {result.threshold} ({notes[-1] if notes else ''})")
        self.log("cost model: " + ", ".join(f"{k}={v:.4g}" for k, v in vars(model).items())
                 + f" (call overhead = mean Overhead(t) over t in {result.call_overhead_points})")
        measured, predicted = result.measured_break_even, result.predicted_break_even
        if measured is None:
            self.log(f"measured break-even: none (the pooled call never beat the local one up to t={m.seqlens[-1]});"
                     f" predicted break-even {predicted}")
        else:
            diff, diff_interp = result.break_even_difference_percent(), result.break_even_difference_percent(True)
            self.log(f"break-even: measured {measured} (smallest sweep t where pooled < local;"
                     f" interpolated {result.measured_break_even_interpolated:.0f}), predicted {predicted} by the"
                     f" cost model: {diff:+.1f}% vs the sweep point, {diff_interp:+.1f}% vs the interpolated crossing"
                     f" ({'within' if abs(diff_interp) <= 25 else 'NOT within'} 25%)")
        for t, at, pt, nb in zip(m.seqlens, m.attention_time, m.pooled_time, nbytes):
            pred_p, pred_l = model.time(t, 1), model.time(t, 0)
            model_bytes = t * (model.kv_bytes_per_token + model.q_bytes_per_token)  # p=1: share 1/2, 2 directions
            self.log(f"  t={t:>7}: model local {pred_l * 1e3:9.3f} ms (measured {at * 1e3:9.3f}),"
                     f" pooled {pred_p * 1e3:9.3f} ms (measured {pt * 1e3:9.3f});"
                     f" bytes the model counts {model_bytes / 2**20:.1f} MiB, a pooled fwd+bwd call moved"
                     f" {nb / 2**20:.1f} MiB")


def main(argv=None) -> int:
    args = parse_args(argv)

    def calibrate(device, rank, world) -> int:
        t0 = time.perf_counter()
        code = Calibration(args, device, rank, world).run()
        if rank == 0:
            print(f"calibration took {time.perf_counter() - t0:.1f} s", flush=True)
        return code

    return run_distributed("calibrate_pool", calibrate, device=args.device, timeout_s=args.pg_timeout,
                           usage="a base rank and a pool rank", user_errors=(SystemExit, ConfigError, LayoutError))


if __name__ == "__main__":
    sys.exit(main())
