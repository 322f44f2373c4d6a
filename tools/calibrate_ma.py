#!/usr/bin/env python
"""Calibrate the MA-separation time predictor (``megatron_fapool.moe.predictor``) on this device.

One process, one device (CUDA when there is one, else CPU)::

    python tools/calibrate_ma.py --config configs/paper_moe_ma.json \\
        --output configs/calibration/h200_paper_moe.json

With the shapes of the model in the config (one attention rank: heads, query groups and
projections divided by ``--tp``; dtype from the config, ``--dtype`` overrides) it measures,
as medians of CUDA-event (GPU) or wall-clock (CPU) timings after warm-up:

* **attention** of one layer on one attention rank: QKV projection, causal core attention
  through :func:`megatron_fapool.attention.kernels.local_attention` (the config's backend),
  output projection; forward (``fwd``, no autograd) and forward + backward (``fwd_bwd``,
  gradients of the input and both weights) over ``--seqlens`` (GPU default 4K..64K) and
  ``--batches``; and **decode** (one new token per sequence against K/V caches of
  ``--decode-contexts`` tokens, batched in one kernel call) over ``--decode-batches``
  (GPU default 1..64);
* **experts** of one layer on one expert rank: Megatron's own ``SequentialMLP`` (built from
  ``models.gpt.expert_transformer_config``) holding ``--local-experts`` experts, forward and
  forward + backward (input, probs and weight gradients) over tokens-per-expert vectors:
  uniform loads (``--expert-tokens``), skewed loads (most tokens to one expert, idle
  experts), and decode-sized loads (a few tokens, some experts idle: phase ``decode``,
  forward only). Each module is warmed up first (its first calls pay for cuBLAS set-up).

Then it fits the predictor (:func:`megatron_fapool.moe.predictor.fit`: non-negative least
squares in relative error, per component and phase) on all points but a held-out third
(every third point of each sweep, never its first or last), prints predicted against
measured with the error of every point and the MAPE of the fit points and, separately, of
the held-out points (the honest number; goal <= 15%),
prints what the calibrated model says about the config's attention : expert ratio, and
writes the calibration JSON (``megatron_fapool.moe.predictor.save``; read back with
``load`` before the tool exits). Communication cannot be measured on one device: the file
keeps the analytic link model and says so.

``--budget-s`` bounds the measuring: points left when it is spent are skipped (and said so);
groups without points keep the analytic coefficients. Exit code 1 if the file does not load
back or a measured time is not positive.

CPU smoke run (tiny model, tiny shapes, seconds)::

    python tools/calibrate_ma.py --device cpu --config configs/tiny_moe_ma.json --output /tmp/ma.json
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

from megatron_fapool.attention import kernels as K
from megatron_fapool.config import ConfigError, load_run_config
from megatron_fapool.models import gpt as gpt_models
from megatron_fapool.moe import predictor as P

from _common import DTYPES, free_memory, megatron_world_of_one, time_fn

GPU_DEFAULTS = dict(seqlens="4096,8192,16384,32768,65536", batches="1,2", batch_max_tokens=32768,
                    decode_contexts="4096,16384", decode_batches="1,2,4,8,16,32,64",
                    expert_tokens="64,128,256,512,1024,2048,4096,8192,16384", local_experts="4,8,16",
                    expert_max_pairs=131072, budget_s=240.0)
CPU_DEFAULTS = dict(seqlens="64,128,256,512", batches="1,2", batch_max_tokens=512, decode_contexts="256",
                    decode_batches="1,2,4,8", expert_tokens="4,16,64,256", local_experts="4,16",
                    expert_max_pairs=2048, budget_s=60.0)
MAPE_GOAL = 15.0


def _ints(text: str) -> list[int]:
    return sorted({int(x) for x in str(text).split(",") if x.strip()})


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", "--deepspeed_config", dest="config", default="configs/paper_moe_ma.json",
                   help="DeepSpeed JSON whose fapool.model_yaml is an MoE model")
    p.add_argument("--output", default="runs/ma_calibration.json")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--tp", type=int, default=None, help="attention TP (heads per rank); default the config's")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="override the config's precision")
    p.add_argument("--backend", default=None, help="override the config's attention backend")
    p.add_argument("--expert-ffn", type=int, default=None, help="override the expert FFN size")
    p.add_argument("--seqlens", default=None, help="training/prefill lengths (GPU 4K..64K, CPU 64..512)")
    p.add_argument("--batches", default=None, help="sequences per call for training/prefill (default 1,2)")
    p.add_argument("--batch-max-tokens", type=int, default=None, help="skip b > 1 above this many tokens in all")
    p.add_argument("--decode-contexts", default=None, help="K/V cache lengths of the decode sweep")
    p.add_argument("--decode-batches", default=None, help="decode batch sizes (GPU 1..64)")
    p.add_argument("--expert-tokens", default=None, help="uniform tokens per local expert")
    p.add_argument("--local-experts", default=None, help="SequentialMLP sizes (experts on one expert rank)")
    p.add_argument("--expert-max-pairs", type=int, default=None, help="skip expert points above this many pairs")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default GPU 7, CPU 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default GPU 2, CPU 1)")
    p.add_argument("--budget-s", type=float, default=None, help="stop measuring after this many seconds")
    p.add_argument("--gpus", type=int, default=16, help="GPUs the configured ratio is checked for (a:e scaled)")
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args(argv)


def load_config(args):
    """The run config of ``--config``; one-line ConfigError unless it is an MoE model (before any group exists)."""
    cfg = load_run_config(args.config)
    if not cfg.model.language_model.num_moe_experts:
        raise ConfigError("language_model.num_moe_experts", "calibrate_ma needs an MoE model YAML",
                          source=cfg.model_yaml_path)
    return cfg


class Calibration:
    def __init__(self, args, device: torch.device, cfg):
        self.args, self.device = args, device
        defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
        for k, v in defaults.items():
            if getattr(args, k) is None:
                setattr(args, k, v)
        self.cfg = cfg
        self.dtype = DTYPES[args.dtype] if args.dtype else self.cfg.params_dtype
        self.elt = torch.tensor([], dtype=self.dtype).element_size()
        self.shape = P.ModelShape.from_run_config(self.cfg, tp=args.tp, expert_ffn=args.expert_ffn,
                                                  dtype_bytes=self.elt)
        self.backend = args.backend or self.cfg.fapool.attention_backend.backend
        self.reps = args.reps if args.reps is not None else (7 if device.type == "cuda" else 3)
        self.warm = args.warmup if args.warmup is not None else (2 if device.type == "cuda" else 1)
        self.samples: list[P.Sample] = []
        self.skipped: list[str] = []
        self.failures: list[str] = []
        self.t0 = time.perf_counter()
        self.gen = torch.Generator(device=device).manual_seed(args.seed)

    def log(self, msg: str) -> None:
        print(msg, flush=True)

    def over_budget(self, what: str) -> bool:
        if time.perf_counter() - self.t0 > self.args.budget_s:
            self.skipped.append(what)
            return True
        return False

    def rnd(self, *shape, scale=1.0, grad=False):
        x = (torch.randn(shape, generator=self.gen, device=self.device, dtype=torch.float32) * scale).to(self.dtype)
        return x.requires_grad_() if grad else x

    def timed(self, fn) -> float:
        """Median seconds of ``fn``."""
        ms = statistics.median(time_fn(fn, reps=self.reps, warmup=self.warm, device=self.device))
        return ms * 1e-3

    def add(self, sample_kwargs: dict, seconds: float, text: str) -> None:
        if not (seconds > 0 and math.isfinite(seconds)):
            self.failures.append(f"{text}: measured {seconds} s")
            return
        self.samples.append(P.Sample(measured_s=seconds, **sample_kwargs))
        self.log(f"  {text}: {seconds * 1e3:.4f} ms")

    # -- attention ---------------------------------------------------------------------
    def attention(self) -> None:
        s, a = self.shape, self.args
        H, g, d, h = s.heads // s.tp, s.query_groups // s.tp, s.head_dim, s.hidden
        qkv_width = (H + 2 * g) * d
        w_qkv = self.rnd(qkv_width, h, scale=h ** -0.5, grad=True)
        w_o = self.rnd(h, H * d, scale=(H * d) ** -0.5, grad=True)
        scale = d ** -0.5

        def block(x, kv=None):
            b, n = x.shape[0], x.shape[1]
            q, k, v = F.linear(x, w_qkv).split([H * d, g * d, g * d], dim=-1)
            q = q.reshape(b, n, H, d)
            if kv is None:
                k, v = k.reshape(b, n, g, d), v.reshape(b, n, g, d)
                o = K.local_attention(q, k, v, causal=True, softmax_scale=scale, backend=self.backend)
            else:  # decode: the new token against the cache
                o = K.local_attention(q, kv[0], kv[1], causal=False, softmax_scale=scale, backend=self.backend)
            return F.linear(o.reshape(b, n, H * d), w_o)

        self.log(f"[attention] {H} heads, {g} query groups, head dim {d}, hidden {h} (TP {s.tp}), backend"
                 f" {self.backend}, {self.reps} reps after {self.warm} warm-up")
        n0 = _ints(a.seqlens)[0]
        x = self.rnd(1, n0, h, grad=True)
        for _ in range(3):  # untimed: the first calls pay for handles, plans and allocations
            block(x).sum().backward()
        x = None
        w_qkv.grad = w_o.grad = None
        for n in _ints(a.seqlens):
            for b in _ints(a.batches):
                if b > 1 and b * n > a.batch_max_tokens:
                    continue
                if self.over_budget(f"attention n={n} b={b}"):
                    continue
                x = self.rnd(b, n, h, grad=True)
                dy = self.rnd(b, n, h)
                with torch.no_grad():
                    t = self.timed(lambda: block(x))
                self.add(dict(component="attention", phase="fwd", seq_len=n, batch=b), t, f"fwd     n={n} b={b}")

                def fwd_bwd():
                    x.grad = w_qkv.grad = w_o.grad = None
                    block(x).backward(dy)

                t = self.timed(fwd_bwd)
                self.add(dict(component="attention", phase="fwd_bwd", seq_len=n, batch=b), t, f"fwd_bwd n={n} b={b}")
                del x, dy
                x = dy = None
                w_qkv.grad = w_o.grad = None
                free_memory(self.device)
        for n in _ints(a.decode_contexts):
            for b in _ints(a.decode_batches):
                if self.over_budget(f"decode context={n} b={b}"):
                    continue
                kv = (self.rnd(b, n, g, d), self.rnd(b, n, g, d))
                x = self.rnd(b, 1, h)
                with torch.no_grad():
                    t = self.timed(lambda: block(x, kv))
                self.add(dict(component="attention", phase="decode", seq_len=n, batch=b), t,
                         f"decode  context={n} b={b}")
                del kv, x
                free_memory(self.device)

    # -- experts -----------------------------------------------------------------------
    def expert_config(self):
        overrides = dict(params_dtype=self.dtype, bf16=self.dtype == torch.bfloat16,
                         fp16=self.dtype == torch.float16, pipeline_dtype=self.dtype,
                         use_cpu_initialization=self.device.type != "cuda")
        if self.args.expert_ffn:
            overrides["moe_ffn_hidden_size"] = self.args.expert_ffn
        return gpt_models.expert_transformer_config(self.cfg, **overrides)

    def expert_loads(self, L: int) -> list[tuple[str, tuple[int, ...]]]:
        """(phases, tokens per expert) of the sweep for ``L`` local experts: ``both`` (fwd and fwd_bwd) or
        ``decode`` (decode-sized loads, forward only)."""
        loads: list[tuple[str, tuple[int, ...]]] = []
        for t in _ints(self.args.expert_tokens):
            loads.append(("both", (t,) * L))
        top = _ints(self.args.expert_tokens)[-2]
        skew = [max(1, top // 4 ** i) for i in range(L)]
        skew[-1] = 0  # an idle expert
        loads.append(("both", tuple(skew)))
        loads.append(("both", (top,) + (0,) * (L - 1)))  # everything to one expert
        rng = torch.Generator().manual_seed(self.args.seed + L)
        for mean in (1, 2, 4, 8, 16):  # decode-sized: a few tokens, some experts idle (forward only)
            t = torch.poisson(torch.full((L,), float(mean)), generator=rng).long().tolist()
            t[0] = max(1, t[0])
            loads.append(("decode", tuple(int(x) for x in t)))
        return loads

    def warm_up_experts(self, mlp, L: int) -> None:
        """A few untimed forward and backward calls first (the first calls of a module pay for
        cuBLAS handles, heuristics and allocations)."""
        tokens = (min(_ints(self.args.expert_tokens)[len(_ints(self.args.expert_tokens)) // 2],
                      self.args.expert_max_pairs // L),) * L
        x = self.rnd(sum(tokens), self.shape.hidden, grad=True)
        probs = torch.rand(sum(tokens), generator=self.gen, device=self.device).requires_grad_()
        tpe = torch.tensor(tokens, dtype=torch.long)
        for _ in range(3):
            out, _ = mlp(x, tpe, probs)
            out.backward(torch.ones_like(out))
        for p_ in mlp.parameters():
            p_.grad = None
        del x, probs, out
        free_memory(self.device)

    def experts(self) -> None:
        from megatron.core import tensor_parallel
        from megatron.core.process_groups_config import ProcessGroupCollection
        from megatron.core.transformer.mlp import MLPSubmodules
        from megatron.core.transformer.moe.experts import SequentialMLP

        s, a = self.shape, self.args
        config = self.expert_config()
        if self.device.type == "cuda":
            tensor_parallel.model_parallel_cuda_manual_seed(a.seed)
        world = dist.group.WORLD
        pgs = ProcessGroupCollection(ep=world, expt_tp=world, expt_dp=world, tp=world)
        spec = MLPSubmodules(linear_fc1=tensor_parallel.ColumnParallelLinear,
                             linear_fc2=tensor_parallel.RowParallelLinear)
        self.log(f"[experts] Megatron SequentialMLP, hidden {s.hidden}, expert FFN {config.moe_ffn_hidden_size},"
                 f" {'gated' if s.gated else 'not gated'}, {self.reps} reps after {self.warm} warm-up")
        for L in _ints(a.local_experts):
            if self.over_budget(f"experts L={L}"):
                continue
            mlp = SequentialMLP(L, config, spec, pg_collection=pgs).to(self.device)
            self.warm_up_experts(mlp, L)
            for phases, tokens in self.expert_loads(L):
                pairs = sum(tokens)
                if pairs > a.expert_max_pairs:
                    continue
                if self.over_budget(f"experts {list(tokens)}"):
                    continue
                x = self.rnd(pairs, s.hidden, grad=True)
                probs = torch.rand(pairs, generator=self.gen, device=self.device).requires_grad_()
                dy = self.rnd(pairs, s.hidden)
                tpe = torch.tensor(tokens, dtype=torch.long)  # on the CPU, as Megatron's dispatcher gives them
                label = f"{L} experts, tokens {list(tokens)}" if len(set(tokens)) > 1 else f"{L} experts x {tokens[0]}"
                with torch.no_grad():
                    t = self.timed(lambda: mlp(x, tpe, probs))
                phase = "decode" if phases == "decode" else "fwd"
                self.add(dict(component="expert", phase=phase, tokens_per_expert=tokens), t, f"{phase:<7} {label}")
                if phases == "both":
                    def fwd_bwd():
                        x.grad = probs.grad = None
                        for p_ in mlp.parameters():
                            p_.grad = None
                        out, _ = mlp(x, tpe, probs)
                        out.backward(dy)

                    t = self.timed(fwd_bwd)
                    self.add(dict(component="expert", phase="fwd_bwd", tokens_per_expert=tokens), t,
                             f"fwd_bwd {label}")
                del x, probs, dy
                free_memory(self.device)
            del mlp
            free_memory(self.device)

    # -- fit and report ----------------------------------------------------------------
    def mark_held_out(self) -> None:
        """Every third point of each sweep (component, phase, batch / local experts), never its ends."""
        def key(smp):
            if smp.component == "attention":
                return (smp.component, smp.phase, smp.batch if smp.phase != "decode" else smp.seq_len)
            return (smp.component, smp.phase, len(smp.tokens_per_expert))

        groups: dict = {}
        for i, smp in enumerate(self.samples):
            groups.setdefault(key(smp), []).append(i)
        held = set()
        for idx in groups.values():
            if len(idx) >= 4:
                held.update(idx[1:-1][::3])
        self.samples = [P.Sample(**{**vars(smp), "held_out": i in held}) for i, smp in enumerate(self.samples)]

    def report_ratio(self, predictor) -> list[str]:
        ma = self.cfg.fapool.ma_separation
        a, e = ma.ratio
        scale = max(1, self.args.gpus // (a + e))
        A, E = a * scale, e * scale
        if self.shape.num_experts % E:
            A, E = a, e
        seq = self.cfg.model.language_model.seq_length or 4096
        lines = []
        for w in (P.Workload("train", seq), P.Workload("prefill", seq), P.Workload("decode", seq, 1),
                  P.Workload("decode", seq, 4), P.Workload("decode", seq, 16), P.Workload("decode", seq, 64)):
            try:
                lines.append(P.check_ratio(predictor, self.shape, (A, E), w).message)
            except ValueError as err:
                lines.append(f"{w.describe()}: {err}")
        return lines

    def run(self) -> int:
        a = self.args
        started = _dt.datetime.now(_dt.timezone.utc)
        if self.device.type == "cuda":
            device_name = f"1 x {torch.cuda.get_device_name(self.device)}"
        else:
            device_name = f"cpu ({torch.get_num_threads()} threads)"
        dtype_name = str(self.dtype).replace("torch.", "")
        self.log(f"calibrate_ma: {device_name}; torch {torch.__version__}; {dtype_name}; {started:%Y-%m-%d %H:%M UTC}")
        self.log(f"model {a.config}: " + ", ".join(f"{k}={v}" for k, v in self.shape.as_dict().items()))
        self.attention()
        self.experts()
        if self.skipped:
            self.log(f"budget of {a.budget_s:.0f} s spent: skipped {len(self.skipped)} point(s),"
                     f" first {self.skipped[0]}")
        self.mark_held_out()
        predictor = P.fit(self.samples, self.shape, about={"device": device_name, "dtype": dtype_name})
        ev = P.evaluate(predictor, self.shape, self.samples)
        all_fit = P.fit(self.samples, self.shape, include_held_out=True)
        ev_all = P.evaluate(all_fit, self.shape, self.samples)
        self.log("\n== predicted vs measured (coefficients fitted on the 'fit' points only) ==")
        self.log(P.format_table(ev))
        self.log("\n== coefficients ==\n" + predictor.describe())
        held = ev["mape"]["all"]["held_out"]
        if held is not None:
            self.log(f"\nheld-out MAPE {held:.1f}% over {sum(s.held_out for s in self.samples)} points"
                     f" ({'within' if held <= MAPE_GOAL else 'NOT within'} the {MAPE_GOAL:.0f}% goal);"
                     f" fit-point MAPE {ev['mape']['all']['fit']:.1f}%; refitted on all points:"
                     f" {ev_all['mape']['all']['fit']:.1f}%")
        ratio_lines = self.report_ratio(predictor)
        self.log("\n== the configured ratio, by the calibrated model ==\n" + "\n".join(ratio_lines))
        notes = [
            "times in seconds: attention = one layer's QKV projection + causal core attention"
            " (megatron_fapool.attention.kernels) + output projection on one attention rank; decode = one new"
            " token per sequence against a K/V cache of seq_len tokens, batched; experts = Megatron's"
            " SequentialMLP of one expert rank (len(tokens_per_expert) local experts)",
            "coefficients: non-negative least squares in relative error on the points not held out"
            " (every third interior point of each sweep is held out)",
            "comm: not measurable on one device: the analytic link model (an NVLink-class link), not measured",
            "not in the attention time: norms, router, permute/unpermute, residuals, TP all-reduces",
        ]
        if self.skipped:
            notes.append(f"the measuring budget ({a.budget_s:.0f} s) was spent: {len(self.skipped)} point(s)"
                         f" skipped ({'; '.join(self.skipped[:5])}{' ...' if len(self.skipped) > 5 else ''})")
        missing = [f"{c}.{p}" for c, ph in predictor.sources.items() for p, src in ph.items() if src != "fitted"]
        if missing:
            notes.append(f"no measurements for {', '.join(missing)}: analytic coefficients")
        P.save(a.output, predictor, self.shape, device=device_name, dtype=dtype_name,
               date=started.strftime("%Y-%m-%dT%H:%M:%SZ"), samples=self.samples, notes=notes,
               host=socket.gethostname(), config=a.config, model_yaml=self.cfg.model_yaml_path,
               backend=self.backend, reps=self.reps, warmup=self.warm, mape_goal_percent=MAPE_GOAL,
               error_refit_all_points=ev_all["mape"], ratio_check=ratio_lines,
               measure_seconds=round(time.perf_counter() - self.t0, 1))
        try:
            P.load(a.output)
        except ConfigError as err:
            self.failures.append(f"the written file does not load: {err}")
        self.log(f"\nwrote {a.output} ({len(self.samples)} points, {time.perf_counter() - self.t0:.1f} s)")
        for msg in self.failures:
            self.log(f"FAILED: {msg}")
        return 1 if self.failures else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args)
        with megatron_world_of_one(args.device) as device:  # Megatron's layers want its groups
            return Calibration(args, device, cfg).run()
    except ConfigError as err:
        print(f"calibrate_ma: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
