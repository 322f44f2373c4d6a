#!/usr/bin/env python
"""The MoE model on one device: expert MLP implementations, a colocated training step, greedy decode.

    python tools/bench_moe.py --config configs/paper_moe_ma.json --dense-config configs/paper_dense_pool.json \\
        --calibration configs/calibration/h200_paper_moe.json --output runs/bench_moe.json

Parts (``--parts``, each under its own time limit ``--part-timeout-s``; a part that fails or
runs out of time is recorded as such and the others still run; the JSON is rewritten after
every part):

* ``experts`` - the expert MLP implementation, chosen by measurement. Megatron's
  ``SequentialMLP`` (one ``MLP`` per expert, a loop) against a grouped one built on
  ``torch._grouped_mm`` (all experts' ``fc1`` in one grouped GEMM, the activation, ``* probs``,
  all ``fc2`` in another; the same math). Both hold the same weights (copied from the
  ``SequentialMLP``) and are checked against each other first (output, input, probs and every
  weight gradient, within 2.5e-2 relative in bf16 / 1e-4 in fp32). Tokens are routed top-k at
  random over the experts and permuted by expert, as Megatron's dispatcher hands them over.
  Reported: forward and forward+backward ms and TFLOP/s (forward ``2 * pairs * (gm + 1) * h * f``,
  forward+backward 3x), and the predictor's error on these (unseen) token vectors.
* ``train`` - the config's MoE model colocated on this device (all experts local), built by
  ``megatron_fapool.models.gpt.build_gpt_model``; a training step = forward + backward +
  gradient clipping + AdamW on fp32 master weights and moments (bf16 weights and gradients,
  as DeepSpeed's bf16 mode keeps them). The expert FFN is reduced (halved until the estimate
  fits, ``--expert-ffn auto``) if the weights, gradients, master weights, moments and
  activations would not fit in the device's memory; the JSON and the output say so.
  Reported: step ms (median after warm-up), tokens/s, model TFLOP/s (``training/flops.py``:
  3 x forward, MoE MLP x top-k), peak memory; the same for the dense model of
  ``--dense-config`` (same attention; its FFN of ``top_k * expert FFN`` has the MoE's active
  FLOPs) as the baseline in the same run.
* ``decode`` - greedy generation through ``megatron_fapool.inference`` (``InferenceSession``,
  ``KVCached``, ``generate``) with the config's expert FFN (no optimizer), at
  ``--decode-batches`` requests of ``--prompt-len`` tokens, ``--new-tokens`` each: TTFT, TPOT,
  decode tokens/s; the dense model alongside.

With ``--calibration`` (a ``tools/calibrate_ma.py`` file; the analytic model without it) the
predictor's times are printed next to the measured ones.

CPU smoke run (tiny model)::

    python tools/bench_moe.py --device cpu --config configs/tiny_moe.json --dense-config configs/tiny_dense_pool.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import json
import os
import signal
import statistics
import sys
import time
import traceback

import torch
import torch.distributed as dist

from megatron_fapool.config import ConfigError, load_run_config
from megatron_fapool.config.model_yaml import activation
from megatron_fapool.inference import generate as gen_mod
from megatron_fapool.inference.session import InferenceSession, KVCached
from megatron_fapool.models import gpt as gpt_models
from megatron_fapool.models.specs import layer_spec_for
from megatron_fapool.moe import predictor as P
from megatron_fapool.training.flops import step_flops

from _common import DTYPES, default_tol, free_memory, megatron_world_of_one, rel_err, sync, time_fn

PARTS = ("experts", "train", "decode")
GPU = dict(expert_tokens="4096,8192,16384,32768", seq_length=None, decode_batches="1,4,16", prompt_len=2048,
           new_tokens=32, decode_rounds=2, steps=5, warmup_steps=2, reps=5, warmup=2, part_timeout_s=240)
CPU = dict(expert_tokens="64,128", seq_length=64, decode_batches="1,2", prompt_len=16, new_tokens=4, decode_rounds=1,
           steps=3,
           warmup_steps=1, reps=2, warmup=1, part_timeout_s=120)


def _ints(text) -> list[int]:
    return sorted({int(x) for x in str(text).split(",") if x.strip()})


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/paper_moe_ma.json", help="DeepSpeed JSON of an MoE model")
    p.add_argument("--dense-config", default=None, help="a dense model's JSON: the baseline of train and decode")
    p.add_argument("--calibration", default=None, help="tools/calibrate_ma.py output (default: analytic model)")
    p.add_argument("--output", default="runs/bench_moe.json")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="override the config's precision")
    # experts
    p.add_argument("--expert-tokens", default=None, help="tokens routed per experts call (GPU 4K..32K)")
    p.add_argument("--stacked-max-tokens", type=int, default=16384,
                   help="time the stacked-weight loop up to this many tokens (it is slow)")
    p.add_argument("--bench-expert-ffn", type=int, default=None,
                   help="expert FFN of the experts part (default the config's)")
    # train
    p.add_argument("--seq-length", type=int, default=None, help="training length (default the YAML's)")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--expert-ffn", default="auto", help="training expert FFN: 'auto' (reduce until it fits) or a size")
    p.add_argument("--memory-gib", type=float, default=None,
                   help="device memory for the fit estimate (default: the device's)")
    # decode
    p.add_argument("--decode-batches", default=None)
    p.add_argument("--prompt-len", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--decode-rounds", type=int, default=None, help="sweeps of the decode batches (GPU 2)")
    # timing
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--part-timeout-s", type=float, default=None)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    bad = [x for x in args.parts.split(",") if x.strip() and x.strip() not in PARTS]
    if bad:
        p.error(f"--parts: unknown {', '.join(bad)} (choose from {', '.join(PARTS)})")
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    return args


class PartTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise :class:`PartTimeout` in this (main) thread after ``seconds`` (checked between Python ops)."""
    def handler(signum, frame):
        raise PartTimeout(f"over its {seconds:.0f} s limit")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------
# Part (a): expert MLP implementations
# --------------------------------------------------------------------------------------


class GroupedExperts(torch.nn.Module):
    """All local experts in two ``torch._grouped_mm`` calls: ``fc1 -> act -> * probs -> fc2`` (no biases).

    Weights stacked as ``fc1 [E, gm * f, h]`` and ``fc2 [E, h, f]`` (each expert's Megatron
    ``linear_fc1`` / ``linear_fc2`` weight); the input is permuted by expert as Megatron's
    dispatcher gives it, ``tokens_per_expert`` rows each.
    """

    def __init__(self, fc1: torch.Tensor, fc2: torch.Tensor, act, gated: bool):
        super().__init__()
        self.fc1 = torch.nn.Parameter(fc1.detach().clone())
        self.fc2 = torch.nn.Parameter(fc2.detach().clone())
        self.act, self.gated = act, gated

    def stacked_grads(self):
        return self.fc1.grad, self.fc2.grad

    @classmethod
    def from_sequential(cls, mlp, act, gated: bool) -> "GroupedExperts":
        fc1 = torch.stack([e.linear_fc1.weight for e in mlp.local_experts])
        fc2 = torch.stack([e.linear_fc2.weight for e in mlp.local_experts])
        return cls(fc1, fc2, act, gated)

    def forward(self, x, tokens_per_expert, probs):
        offs = torch.cumsum(tokens_per_expert.to(x.device), 0).to(torch.int32)
        h = torch._grouped_mm(x, self.fc1.transpose(1, 2), offs=offs)
        if self.gated:
            a, b = h.chunk(2, dim=-1)
            h = self.act(a) * b
        else:
            h = self.act(h)
        h = (h * probs.unsqueeze(-1)).to(x.dtype)  # as Megatron's MLP applies per_token_scale
        return torch._grouped_mm(h, self.fc2.transpose(1, 2), offs=offs), None


class StackedLoopExperts(GroupedExperts):
    """A per-expert loop of matmuls on slices of one stacked weight (the layout the issue measured):
    each slice's backward produces a gradient of the whole stacked tensor."""

    def forward(self, x, tokens_per_expert, probs):
        outs = []
        for i, (xi, pi) in enumerate(zip(x.split(tokens_per_expert.tolist()), probs.split(tokens_per_expert.tolist()))):
            hi = xi @ self.fc1[i].t()
            if self.gated:
                a, b = hi.chunk(2, dim=-1)
                hi = self.act(a) * b
            else:
                hi = self.act(hi)
            hi = (hi * pi.unsqueeze(-1)).to(x.dtype)
            outs.append(hi @ self.fc2[i].t())
        return torch.cat(outs), None


SEQ, GROUPED, STACKED = "SequentialMLP (Megatron)", "grouped (torch._grouped_mm)", "loop on a stacked weight"


def route(tokens: int, num_experts: int, top_k: int, gen: torch.Generator) -> torch.Tensor:
    """tokens_per_expert (CPU int64) of ``tokens`` tokens each sent to ``top_k`` distinct random experts."""
    scores = torch.rand(tokens, num_experts, generator=gen)
    chosen = scores.topk(top_k, dim=-1).indices.flatten()
    return torch.bincount(chosen, minlength=num_experts)


def bench_experts(ctx) -> dict:
    from megatron.core import tensor_parallel
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP

    args, dev, dtype, shape = ctx.args, ctx.device, ctx.dtype, ctx.shape
    overrides = dict(params_dtype=dtype, bf16=dtype == torch.bfloat16, pipeline_dtype=dtype,
                     use_cpu_initialization=dev.type != "cuda")
    if args.bench_expert_ffn:
        overrides["moe_ffn_hidden_size"] = args.bench_expert_ffn
    config = gpt_models.expert_transformer_config(ctx.cfg, **overrides)
    if dev.type == "cuda":
        tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    world = dist.group.WORLD
    pgs = ProcessGroupCollection(ep=world, expt_tp=world, expt_dp=world, tp=world)
    spec = MLPSubmodules(linear_fc1=tensor_parallel.ColumnParallelLinear, linear_fc2=tensor_parallel.RowParallelLinear)
    E, k, h, f = shape.num_experts, shape.top_k, shape.hidden, config.moe_ffn_hidden_size
    act, gated = activation(ctx.cfg.model.language_model.activation_func)
    gm = 2 if gated else 1
    seq = SequentialMLP(E, config, spec, pg_collection=pgs).to(dev)
    impls = {SEQ: seq, GROUPED: GroupedExperts.from_sequential(seq, act, gated).to(dev),
             STACKED: StackedLoopExperts.from_sequential(seq, act, gated).to(dev)}
    log(f"[experts] {E} experts, hidden {h}, expert FFN {f}, {'gated' if gated else 'not gated'}, top-{k},"
        f" {str(dtype).replace('torch.', '')}")
    gen = torch.Generator().manual_seed(args.seed)
    dgen = torch.Generator(device=dev).manual_seed(args.seed)
    pshape = dataclasses.replace(shape, expert_ffn=f)

    def inputs(tokens):
        tpe = route(tokens, E, k, gen)
        pairs = int(tpe.sum())
        x = torch.randn(pairs, h, generator=dgen, device=dev).to(dtype).requires_grad_()
        probs = torch.rand(pairs, generator=dgen, device=dev).requires_grad_()
        dy = torch.randn(pairs, h, generator=dgen, device=dev).to(dtype)
        return tpe, x, probs, dy

    # check: the same outputs and gradients as SequentialMLP (an implementation that fails or differs is dropped)
    tpe, x, probs, dy = inputs(_ints(args.expert_tokens)[0])
    got, checks = {}, {}
    tol = default_tol(dtype)
    for name, m in list(impls.items()):
        try:
            m.zero_grad(set_to_none=True)
            x.grad = probs.grad = None
            out, _ = m(x, tpe, probs)
            out.backward(dy)
            w1, w2 = m.stacked_grads() if hasattr(m, "stacked_grads") else (
                torch.stack([e.linear_fc1.weight.grad for e in m.local_experts]),
                torch.stack([e.linear_fc2.weight.grad for e in m.local_experts]))
            got[name] = dict(out=out.detach(), dx=x.grad.detach().clone(), dprobs=probs.grad.detach().clone(),
                             dfc1=w1.detach().clone(), dfc2=w2.detach().clone())
        except (RuntimeError, TypeError, NotImplementedError) as err:
            checks[name] = {"error": f"{type(err).__name__}: {err}".splitlines()[0][:300], "ok": False}
            log(f"  {name}: FAILED to run ({checks[name]['error']}); dropped")
            del impls[name]
            continue
        if name != SEQ:
            errs = {key: rel_err(got[name][key], got[SEQ][key]) for key in got[SEQ]}
            checks[name] = {"max_rel_err": errs, "tol": tol, "ok": all(e <= tol for e in errs.values())}
            log(f"  check {name} vs {SEQ}: " + ", ".join(f"{k_} {v:.1e}" for k_, v in errs.items())
                + f" -> {'ok' if checks[name]['ok'] else 'DIFFERENT: dropped'} (tol {tol:g})")
            if not checks[name]["ok"]:
                del impls[name]
        m.zero_grad(set_to_none=True)
    check = {"tokens": _ints(args.expert_tokens)[0], "impls": checks,
             "ok": all(c.get("ok") for n, c in checks.items() if n == GROUPED)}
    del got, x, probs, dy
    free_memory(dev)

    rows = []
    for tokens in _ints(args.expert_tokens):
        tpe, x, probs, dy = inputs(tokens)
        pairs = int(tpe.sum())
        fwd_flops = pairs * (2 * h * f * gm + 2 * f * h)
        pred_f = ctx.predictor.expert_time(pshape, "fwd", tpe.tolist())
        pred_fb = ctx.predictor.expert_time(pshape, "fwd_bwd", tpe.tolist())
        for name, m in impls.items():
            if name == STACKED and tokens > args.stacked_max_tokens:
                continue
            row = {"impl": name, "tokens": tokens, "pairs": pairs, "tokens_per_expert_min": int(tpe.min()),
                   "tokens_per_expert_max": int(tpe.max())}
            try:
                with torch.no_grad():
                    t = statistics.median(time_fn(lambda: m(x, tpe, probs), device=dev, reps=ctx.reps,
                                                  warmup=ctx.warm)) * 1e-3

                def fb():
                    m.zero_grad(set_to_none=True)
                    x.grad = probs.grad = None
                    m(x, tpe, probs)[0].backward(dy)

                tb = statistics.median(time_fn(fb, device=dev, reps=ctx.reps, warmup=ctx.warm)) * 1e-3
                row.update(fwd_ms=t * 1e3, fwd_tflops=fwd_flops / t / 1e12, fwd_bwd_ms=tb * 1e3,
                           fwd_bwd_tflops=3 * fwd_flops / tb / 1e12)
                if name == SEQ:
                    row.update(predicted_fwd_ms=pred_f * 1e3, predicted_fwd_bwd_ms=pred_fb * 1e3,
                               predicted_fwd_err_pct=100 * (pred_f - t) / t,
                               predicted_fwd_bwd_err_pct=100 * (pred_fb - tb) / tb)
                log(f"  {name:<28} {tokens:>6} tokens ({pairs} pairs, {row['tokens_per_expert_min']}-"
                    f"{row['tokens_per_expert_max']}/expert): fwd {t * 1e3:8.3f} ms {row['fwd_tflops']:7.1f} TFLOP/s,"
                    f" fwd+bwd {tb * 1e3:8.3f} ms {row['fwd_bwd_tflops']:7.1f} TFLOP/s")
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
                log(f"  {name} {tokens}: out of memory")
            m.zero_grad(set_to_none=True)
            rows.append(row)
        del x, probs, dy
        free_memory(dev)
    by = {}
    for r in rows:
        if "error" not in r and r["impl"] != STACKED:
            by.setdefault(r["tokens"], {})[r["impl"]] = r
    wins = {name: 0 for name in impls if name != STACKED}
    for per in by.values():
        if len(per) == len(wins):
            wins[min(per, key=lambda n: per[n]["fwd_bwd_ms"])] += 1
    choice = max(wins, key=wins.get)
    pf = [r["predicted_fwd_err_pct"] for r in rows if "predicted_fwd_err_pct" in r]
    pfb = [r["predicted_fwd_bwd_err_pct"] for r in rows if "predicted_fwd_bwd_err_pct" in r]
    pred = {"source": ctx.predictor_source,
            "fwd_mape_pct": sum(map(abs, pf)) / len(pf) if pf else None,
            "fwd_bwd_mape_pct": sum(map(abs, pfb)) / len(pfb) if pfb else None}
    log(f"  faster forward+backward: {choice} ({wins[choice]} of {len(by)} sizes); predictor ({ctx.predictor_source})"
        f" on SequentialMLP: fwd MAPE {pred['fwd_mape_pct'] or float('nan'):.1f}%,"
        f" fwd+bwd MAPE {pred['fwd_bwd_mape_pct'] or float('nan'):.1f}%")
    del seq, impls
    free_memory(dev)
    return {"experts": E, "hidden": h, "expert_ffn": f, "top_k": k, "gated": gated, "check": check, "rows": rows,
            "faster_fwd_bwd": choice, "wins": wins, "predictor": pred}


# --------------------------------------------------------------------------------------
# Parts (b) and (c): the model
# --------------------------------------------------------------------------------------


def param_count(cfg, expert_ffn: int | None) -> int:
    """Parameters of ``cfg``'s model (MoE experts at ``expert_ffn``), counted from the shapes."""
    lm = cfg.model.language_model
    h, H, g, d, V = lm.hidden_size, lm.num_attention_heads, lm.query_groups, lm.head_dim, lm.vocab_size
    _, gated = activation(lm.activation_func)
    gm = 2 if gated else 1
    attn = h * (H + 2 * g) * d + H * d * h + 2 * h
    if lm.num_moe_experts:
        f = expert_ffn or lm.moe_ffn_hidden_size or lm.ffn_hidden_size or 4 * h
        mlp = lm.num_moe_experts * (gm * f * h + f * h) + lm.num_moe_experts * h
    else:
        f = lm.ffn_hidden_size or 4 * h
        mlp = gm * f * h + f * h
    emb = V * h * (1 if not lm.untie_embeddings_and_output_weights else 2)
    pos = lm.max_position_embeddings * h if lm.position_embedding_type == "learned_absolute" else 0
    return lm.num_layers * (attn + mlp) + emb + pos + h


def activation_bytes(cfg, expert_ffn: int | None, seq: int, batch: int, elt: int) -> int:
    """Rough saved activations of a training step (34 s b h per layer, the MoE MLP's, the logits)."""
    lm = cfg.model.language_model
    h, V, T = lm.hidden_size, lm.vocab_size, seq * batch
    _, gated = activation(lm.activation_func)
    if lm.num_moe_experts:
        f = expert_ffn or lm.moe_ffn_hidden_size or lm.ffn_hidden_size or 4 * h
        mlp = T * lm.moe_router_topk * ((2 if gated else 1) + 3) * f * elt
    else:
        f = lm.ffn_hidden_size or 4 * h
        mlp = T * ((2 if gated else 1) + 2) * f * elt
    return lm.num_layers * (34 * T * h * elt // 2 + mlp) + T * V * (elt + 8)


def training_bytes(cfg, expert_ffn, seq, batch, elt) -> int:
    """Weights + gradients (``elt``) + fp32 master weights, gradients and two moments + activations."""
    n = param_count(cfg, expert_ffn)
    per_param = 2 * elt + 16 if elt != 4 else 16  # fp32: the weights are the master weights
    return n * per_param + activation_bytes(cfg, expert_ffn, seq, batch, elt)


def with_ffn(cfg, expert_ffn: int):
    """``cfg`` with the experts' FFN set (for the FLOP count)."""
    lm = cfg.model.language_model
    lm2 = lm.model_copy(update={"ffn_hidden_size": expert_ffn, "moe_ffn_hidden_size": expert_ffn})
    return dataclasses.replace(cfg, model=cfg.model.model_copy(update={"language_model": lm2}))


class MasterAdamW:
    """AdamW on fp32 master copies of 16-bit weights, with global-norm gradient clipping (DeepSpeed's bf16 recipe)."""

    def __init__(self, params, *, lr, betas, eps, weight_decay, clip: float | None, fused: bool):
        self.params = [p for p in params if p.requires_grad]
        self.master = [p if p.dtype == torch.float32 else p.detach().float().clone() for p in self.params]
        self.opt = torch.optim.AdamW(self.master, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                     **({"fused": True} if fused else {}))
        self.clip = clip

    def step(self) -> float:
        for p, m in zip(self.params, self.master):
            if m is not p:
                m.grad = p.grad.float() if p.grad is not None else torch.zeros_like(m)
                p.grad = None
            elif m.grad is None:
                m.grad = torch.zeros_like(m)
        norm = torch.nn.utils.clip_grad_norm_(self.master, self.clip or float("inf"), foreach=True)
        self.opt.step()
        with torch.no_grad():
            for p, m in zip(self.params, self.master):
                if m is not p:
                    p.copy_(m)
        for m in self.master:
            m.grad = None
        return float(norm)


def build(ctx, cfg, *, layer_spec=None, expert_ffn: int | None = None):
    from megatron.core import tensor_parallel

    torch.manual_seed(ctx.args.seed)
    overrides = dict(use_cpu_initialization=ctx.device.type != "cuda")
    if ctx.args.dtype:
        overrides.update(params_dtype=ctx.dtype, pipeline_dtype=ctx.dtype, bf16=ctx.dtype == torch.bfloat16)
    if expert_ffn and cfg.model.language_model.num_moe_experts:
        overrides["moe_ffn_hidden_size"] = expert_ffn
    if ctx.device.type == "cuda":
        tensor_parallel.model_parallel_cuda_manual_seed(ctx.args.seed)
    model = gpt_models.build_gpt_model(cfg, layer_spec=layer_spec, **overrides).to(ctx.device)
    dtype = ctx.dtype if ctx.args.dtype else cfg.params_dtype
    if dtype != torch.float32:  # what Megatron's Float16Module and DeepSpeed's bf16 engine do (norms, positions)
        model = model.to(dtype)
    return model


def train_one(ctx, cfg, name: str, expert_ffn: int | None, note: str) -> dict:
    args, dev = ctx.args, ctx.device
    lm = cfg.model.language_model
    seq = args.seq_length or lm.seq_length or 1024
    b = args.micro_batch
    t0 = time.perf_counter()
    model = build(ctx, cfg, expert_ffn=expert_ffn)
    build_s = time.perf_counter() - t0
    opt_cfg = (cfg.deepspeed.get("optimizer") or {}).get("params", {})
    opt = MasterAdamW(model.parameters(), lr=opt_cfg.get("lr", 3e-4), betas=tuple(opt_cfg.get("betas", (0.9, 0.95))),
                      eps=opt_cfg.get("eps", 1e-8), weight_decay=opt_cfg.get("weight_decay", 0.1),
                      clip=cfg.deepspeed.get("gradient_clipping"), fused=dev.type == "cuda")
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    ids = torch.randint(0, lm.vocab_size, (b, seq + 1), generator=gen, device=dev)
    tokens, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    pos = torch.arange(seq, device=dev)[None].expand(b, seq)
    model.train()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times, losses, norms = [], [], []
    for step in range(args.warmup_steps + args.steps):
        sync(dev)
        t = time.perf_counter()
        loss = model(tokens, pos, None, labels=labels).float().mean()
        loss.backward()
        norms.append(opt.step())
        sync(dev)
        dt = time.perf_counter() - t
        losses.append(loss.item())
        if step >= args.warmup_steps:
            times.append(dt)
        log(f"  {name} step {step + 1}: {dt * 1e3:.1f} ms, loss {losses[-1]:.4f}, grad norm {norms[-1]:.3g}")
    step_s = statistics.median(times)
    ffn = expert_ffn or lm.moe_ffn_hidden_size or lm.ffn_hidden_size
    flops = step_flops(with_ffn(cfg, ffn) if lm.num_moe_experts else cfg, b, seq)
    row = {"model": name, "params": sum(p.numel() for p in model.parameters()), "seq_length": seq, "micro_batch": b,
           "expert_ffn": ffn if lm.num_moe_experts else None, "ffn": lm.ffn_hidden_size,
           "step_ms": step_s * 1e3, "tokens_per_s": b * seq / step_s, "tflops": flops / step_s / 1e12,
           "model_flops_per_step": flops, "losses": losses, "build_s": build_s, "note": note}
    if dev.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    if lm.num_moe_experts:
        s = dataclasses.replace(ctx.shape, expert_ffn=ffn)
        w = P.Workload("train", seq, b)
        per_layer_a = ctx.predictor.attention_time(s, "fwd_bwd", seq, b)
        per_layer_e = ctx.predictor.expert_time_uniform(s, "fwd_bwd", b * seq, s.num_experts)
        pred = lm.num_layers * (per_layer_a + per_layer_e)
        row.update(predicted_attention_plus_experts_ms=pred * 1e3, predicted_share_of_step=pred / step_s,
                   predictor=ctx.predictor_source, workload=w.describe())
    log(f"  {name}: {row['step_ms']:.1f} ms/step, {row['tokens_per_s']:,.0f} tokens/s, {row['tflops']:.1f} TFLOP/s"
        + (f", peak {row['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in row else "")
        + (f"; predicted attention + experts {row['predicted_attention_plus_experts_ms']:.1f} ms"
           f" ({100 * row['predicted_share_of_step']:.0f}% of the step)" if "predicted_share_of_step" in row else ""))
    del model, opt, loss
    free_memory(dev)
    return row


def choose_ffn(ctx) -> tuple[int, str]:
    args, cfg, dev = ctx.args, ctx.cfg, ctx.device
    lm = cfg.model.language_model
    ffn = lm.moe_ffn_hidden_size or lm.ffn_hidden_size or 4 * lm.hidden_size
    if args.expert_ffn != "auto":
        return int(args.expert_ffn), f"expert FFN {args.expert_ffn} (given)"
    seq = args.seq_length or lm.seq_length or 1024
    elt = ctx.elt
    if args.memory_gib:
        cap = args.memory_gib * 2**30
    elif dev.type == "cuda":
        cap = torch.cuda.get_device_properties(dev).total_memory
    else:
        return ffn, f"expert FFN {ffn} (the config's; no memory check on CPU)"
    budget = 0.92 * cap
    f = ffn
    while f >= 256:
        need = training_bytes(cfg, f, seq, args.micro_batch, elt)
        if need <= budget:
            break
        f //= 2
    need_full = training_bytes(cfg, ffn, seq, args.micro_batch, elt)
    if f == ffn:
        return f, f"expert FFN {f} (the config's: estimated {need_full / 2**30:.0f} GiB fits in {cap / 2**30:.0f} GiB)"
    return f, (f"expert FFN reduced from {ffn} to {f}: with the optimizer (bf16 weights and gradients, fp32 master"
               f" weights, gradients and AdamW moments: {2 * elt + 16} B per parameter) the config's"
               f" {param_count(cfg, ffn) / 1e9:.2f}B parameters and the activations need an estimated"
               f" {need_full / 2**30:.0f} GiB > {budget / 2**30:.0f} GiB (92% of {cap / 2**30:.0f} GiB);"
               f" at {f}: {param_count(cfg, f) / 1e9:.2f}B parameters,"
               f" {training_bytes(cfg, f, seq, args.micro_batch, elt) / 2**30:.0f} GiB")


def bench_train(ctx) -> dict:
    ffn, note = choose_ffn(ctx)
    log(f"[train] {ctx.args.config}, colocated (all experts on this device): {note}")
    out = {"note": note, "rows": []}
    while True:
        try:
            out["rows"].append(train_one(ctx, ctx.cfg, "MoE", ffn, note))
            break
        except torch.OutOfMemoryError:
            free_memory(ctx.device)
            if ffn <= 256:
                raise
            out.setdefault("oom_at", []).append(ffn)
            log(f"  out of memory at expert FFN {ffn}: halving")
            ffn //= 2
            note += f"; out of memory at {ffn * 2}, ran at {ffn}"
            out["note"] = note
    if ctx.dense_cfg is not None:
        try:
            out["rows"].append(train_one(ctx, ctx.dense_cfg, "dense", None, f"baseline {ctx.args.dense_config}"))
        except torch.OutOfMemoryError:
            free_memory(ctx.device)
            out["rows"].append({"model": "dense", "error": "out of memory"})
    return out


def decode_one(ctx, cfg, name: str) -> list[dict]:
    args, dev = ctx.args, ctx.device
    lm = cfg.model.language_model
    backend = cfg.fapool.attention_backend.backend
    session = InferenceSession(None, backend=backend)
    spec = layer_spec_for(cfg, None, wrap=lambda attend: KVCached(attend, session))
    t0 = time.perf_counter()
    model = build(ctx, cfg, layer_spec=spec)
    log(f"  {name}: built in {time.perf_counter() - t0:.1f} s, {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B"
        " parameters")
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    kw = dict(vocab_size=lm.vocab_size, max_positions=lm.max_position_embeddings, device=dev, greedy=True)
    batches = [b for _ in range(args.decode_rounds) for b in _ints(args.decode_batches)]
    for i_round, b in enumerate(batches):
        reqs = [gen_mod.Request(id=i, max_new_tokens=args.new_tokens,
                                prompt=torch.randint(0, lm.vocab_size, (args.prompt_len,), generator=gen).tolist())
                for i in range(b)]
        warm = [gen_mod.Request(id=r.id, prompt=r.prompt, max_new_tokens=min(3, args.new_tokens)) for r in reqs]
        gen_mod.generate(model, session, warm, **kw)
        t = time.perf_counter()
        outs = gen_mod.generate(model, session, reqs, **kw)
        wall = time.perf_counter() - t
        tpot = statistics.mean(o.tpot_s for o in outs)
        steps = sorted(outs[0].decode_s)
        row = {"model": name, "batch": b, "round": i_round // len(_ints(args.decode_batches)) + 1,
               "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
               "tpot_p50_ms": steps[len(steps) // 2] * 1e3 if steps else None,
               "tpot_min_ms": steps[0] * 1e3 if steps else None,
               "ttft_ms": outs[0].ttft_s * 1e3, "tpot_ms": tpot * 1e3,
               "decode_tokens_per_s": b / tpot if tpot > 0 else None, "wall_s": wall,
               "tokens_first": outs[0].tokens[:8]}
        if lm.num_moe_experts:
            s = ctx.shape
            ctx_len = args.prompt_len + args.new_tokens // 2
            pa = ctx.predictor.attention_time(s, "decode", ctx_len, b)
            pe = ctx.predictor.expert_time_uniform(s, "decode", b, s.num_experts)
            row.update(predicted_attention_plus_experts_ms=lm.num_layers * (pa + pe) * 1e3)
        rows.append(row)
        log(f"  {name} batch {b} (round {row['round']}): TTFT {row['ttft_ms']:.1f} ms, TPOT {row['tpot_ms']:.2f} ms"
            f" (p50 {row['tpot_p50_ms']:.2f}, min {row['tpot_min_ms']:.2f}),"
            f" {row['decode_tokens_per_s']:.0f} decode tokens/s"
            + (f" (predicted attention + experts {row['predicted_attention_plus_experts_ms']:.2f} ms/step)"
               if "predicted_attention_plus_experts_ms" in row else ""))
    del model, session
    free_memory(dev)
    return rows


def bench_decode(ctx) -> dict:
    log(f"[decode] greedy, {ctx.args.prompt_len}-token prompts, {ctx.args.new_tokens} new tokens, batches"
        f" {ctx.args.decode_batches} (prefill one request per forward, decode the batch per forward)")
    out = {"rows": decode_one(ctx, ctx.cfg, "MoE")}
    if ctx.dense_cfg is not None:
        out["rows"] += decode_one(ctx, ctx.dense_cfg, "dense")
    return out


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Context:
    args: argparse.Namespace
    device: torch.device
    cfg: object
    dense_cfg: object
    dtype: torch.dtype
    elt: int
    shape: P.ModelShape
    predictor: P.TimePredictor
    predictor_source: str
    reps: int
    warm: int


def markdown(result: dict) -> str:
    lines = []
    ex = result.get("experts")
    if isinstance(ex, dict) and ex.get("rows"):
        lines += ["| impl | tokens | pairs/expert | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in ex["rows"]:
            if "error" in r:
                lines.append(f"| {r['impl']} | {r['tokens']} | | {r['error']} | | | |")
                continue
            lines.append(f"| {r['impl']} | {r['tokens']} | {r['tokens_per_expert_min']}-{r['tokens_per_expert_max']} |"
                         f" {r['fwd_ms']:.3f} | {r['fwd_tflops']:.1f} | {r['fwd_bwd_ms']:.3f} |"
                         f" {r['fwd_bwd_tflops']:.1f} |")
    tr = result.get("train")
    if isinstance(tr, dict) and tr.get("rows"):
        lines += ["", "| model | params | expert FFN | seq | step ms | tokens/s | TFLOP/s | peak GiB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in tr["rows"]:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['error']} | | | | | | |")
                continue
            lines.append(f"| {r['model']} | {r['params'] / 1e9:.2f}B | {r['expert_ffn'] or '-'} | {r['seq_length']} |"
                         f" {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {r['tflops']:.1f} |"
                         f" {r.get('peak_memory_gib', float('nan')):.1f} |")
    de = result.get("decode")
    if isinstance(de, dict) and de.get("rows"):
        lines += ["", "| model | batch | round | prompt | TTFT ms | TPOT ms | TPOT p50 ms | decode tokens/s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in de["rows"]:
            lines.append(f"| {r['model']} | {r['batch']} | {r['round']} | {r['prompt_len']} | {r['ttft_ms']:.1f} |"
                         f" {r['tpot_ms']:.2f} | {r['tpot_p50_ms']:.2f} | {r['decode_tokens_per_s']:.0f} |")
    return "\n".join(lines)


def load_configs(args):
    """(MoE config, dense config or None), checked before any process group exists."""
    cfg = load_run_config(args.config)
    if not cfg.model.language_model.num_moe_experts:
        raise ConfigError("language_model.num_moe_experts", "bench_moe needs an MoE model YAML",
                          source=cfg.model_yaml_path)
    dense = load_run_config(args.dense_config) if args.dense_config else None
    if dense is not None and dense.model.language_model.num_moe_experts:
        raise ConfigError("--dense-config", f"{args.dense_config} is an MoE model, not a dense baseline")
    if args.calibration:
        P.load(args.calibration)
    return cfg, dense


def run(args, device, cfg, dense) -> int:
    d = GPU if device.type == "cuda" else CPU
    for k, v in d.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    dtype = DTYPES[args.dtype] if args.dtype else cfg.params_dtype
    elt = torch.tensor([], dtype=dtype).element_size()
    shape = P.ModelShape.from_run_config(cfg, tp=1, dtype_bytes=elt)
    if args.calibration:
        predictor, _, _ = P.load(args.calibration)
        source = f"calibrated ({args.calibration})"
    else:
        predictor, source = P.TimePredictor.analytic(), "analytic (H200 bf16 peak rates)"
    ctx = Context(args, device, cfg, dense, dtype, elt, shape, predictor, source, args.reps, args.warmup)
    started = _dt.datetime.now(_dt.timezone.utc)
    if device.type == "cuda":
        name = f"1 x {torch.cuda.get_device_name(device)}"
    else:
        name = f"cpu ({torch.get_num_threads()} threads)"
    result = {"device": name, "date": started.strftime("%Y-%m-%dT%H:%M:%SZ"), "torch": torch.__version__,
              "command": "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
              "config": args.config, "dense_config": args.dense_config, "dtype": str(dtype).replace("torch.", ""),
              "predictor": source}
    log(f"bench_moe: {name}; torch {torch.__version__}; {result['dtype']}; {started:%Y-%m-%d %H:%M UTC}")
    failed = []
    for part in args.parts:
        t0 = time.perf_counter()
        try:
            with time_limit(args.part_timeout_s):
                result[part] = {"experts": bench_experts, "train": bench_train, "decode": bench_decode}[part](ctx)
        except (PartTimeout, torch.OutOfMemoryError, RuntimeError, ValueError) as err:
            free_memory(device)
            result[part] = {"error": f"{type(err).__name__}: {err}".splitlines()[0][:500],
                            "traceback": traceback.format_exc()[-3000:]}
            failed.append(part)
            log(f"[{part}] FAILED: {result[part]['error']}")
        result[part]["seconds"] = round(time.perf_counter() - t0, 1)
        write(args.output, result)
    if isinstance(result.get("experts"), dict) and result["experts"].get("check", {}).get("ok") is False:
        failed.append("experts check")
    log("\n" + markdown(result))
    log(f"\nwrote {args.output}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def write(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg, dense = load_configs(args)
        with megatron_world_of_one(args.device) as device:
            return run(args, device, cfg, dense)
    except ConfigError as err:
        print(f"bench_moe: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
