"""Generate text with a Megatron GPT model, the attention pool and a pool-resident KV cache.

    deepspeed --num_gpus 4 launch/infer.py --deepspeed_config configs/tiny_dense_pool.json \\
        --load runs/demo/checkpoints --prompt "def main(" --prompt "import os" --max-new-tokens 32
    torchrun --nproc_per_node 2 launch/infer.py --deepspeed_config configs/paper_dense_pool.json \\
        --random-weights --prompt-lengths 512 2048 131072 --max-new-tokens 16 --metrics-json m.json

Weights come from a checkpoint of launch/train.py (``--load DIR``: its latest complete
one, same model shape and TP) or are random (``--random-weights``, for benchmarking).
Prompts are text (byte tokenizer), files, or random token ids of given lengths; a batch
may mix short and long ones. Every prompt is prefilled (through the pool above the
threshold, whose ranks then keep that request's K/V sharded along the sequence), then
decoded in batches (``--decode-batch`` requests per forward, default all), greedy or
sampled. Printed per request and per length bucket (512-2K, 2K-8K, 8K-32K, 32K+):
TTFT, TPOT and TPS (input + output tokens per second). ``--sweep 8192x1 8192x4 ...``
serves one batch per item (random prompts) with the same model, for benchmarks.

Serving engine (``--engine``). Without MA separation or pipeline stages (dense models, with
or without the pool), requests are served from static K/V slots (``megatron_fapool.inference.engine``):
prompts prefilled together in one packed forward, one decode forward per step over all
running requests with no per-request host work, replayed from CUDA graphs on a GPU, and
continuous batching: with arrival times (``--trace FILE`` of JSON lines, or
``--arrival-rate R`` requests per second over the given prompts) requests join the running
batch at the next step and leave when done; ``--slots`` bounds how many run at once
(others wait). Reported: TTFT / TPOT / TPS with p50 and p99, and goodput under
``--slo-ttft-ms`` / ``--slo-tpot-ms``. With the pool, a prompt over its threshold is
prefilled through it, one per forward, and its K/V is spread over the slot of the base and
its pool ranks (so a request may be up to pool ranks + 1 times a slot long); decode steps
with such rows exchange with the pool in every layer (eager unless ``--pool-cuda-graphs``).
MA separation and PP run the session path (``--engine session``: every prompt prefilled,
then decoded in batches; it also serves the pool, with K/V shards that grow per token).

    python launch/infer.py --deepspeed_config configs/tiny_dense.json --random-weights \
        --trace configs/traces/mixed_small.jsonl --slots 4 --slo-ttft-ms 2000 --slo-tpot-ms 200

Data-parallel replicas (more base ranks than TP x PP): request ``i`` is served by
replica ``i % DP``; rank 0 reports them all.

MA separation (``fapool.ma_separation.enabled``, an MoE model): the base ranks are the
attention ranks, the last ranks of the world serve every MoE layer's experts (forward
only, nothing saved) until the attention ranks shut them down. All attention replicas
step in lockstep (:mod:`megatron_fapool.inference.lockstep`); rank 0 adds the MA
counters (rows sent, tokens per expert rank, rerouted tokens). ``--load`` takes a
colocated or an MA checkpoint, whatever the ratio (Megatron's expert numbering).

An expert rank lost mid-run fails the job within seconds naming it ("expert rank 3
(experts 8-15)"), or with ``fapool.ma_separation.on_expert_loss: "degrade"`` its
experts are masked from routing (top-k over the survivors) and the batch goes on; the
log and the metrics say how many tokens were rerouted (gloo only: on NCCL a collective
with a dead peer hangs rather than fails, so "degrade" is refused there). It needs ranks
whose launcher lets the others live on: torchrun and the deepspeed launcher stop every
worker of a node when one dies, so start one process per rank yourself (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT set), or run the expert ranks under
launchers of their own nodes.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_fapool.attention.pool import AttentionPool, PoolStats
from megatron_fapool.attention.pool.mailbox import MailboxClient, MailboxServer
from megatron_fapool.attention.pool.sharing import shared_manager
from megatron_fapool.config import ConfigError, load_run_config
from megatron_fapool.data import ByteTokenizer
from megatron_fapool.inference import weights
from megatron_fapool.inference.batching import TimedRequest, place_on_replicas, serve
from megatron_fapool.inference.engine import ServingEngine
from megatron_fapool.inference.generate import Request, RequestError, generate, validate_requests
from megatron_fapool.inference.lockstep import Lockstep
from megatron_fapool.inference.sampling import Sampling
from megatron_fapool.inference.session import InferenceSession, KVCached
from megatron_fapool.inference.slots import SlotCache, slot_layer_spec
from megatron_fapool.inference.trace import TraceError, load_trace, poisson_arrivals, summarize
from megatron_fapool.models.gpt import build_gpt_model, check_runnable_here, expert_transformer_config, moe_layers
from megatron_fapool.models.specs import layer_spec_for
from megatron_fapool.moe.fault import LossAgreement, serve_degradable
from megatron_fapool.moe.remote import ExpertClient, RemoteExperts
from megatron_fapool.moe.serve import ExpertServer, ExpertStack
from megatron_fapool.moe.wire import DispatchGeometry
from megatron_fapool.parallel.groups import create_survivor_groups
from megatron_fapool.runtime import exit_on_user_error, job, log0
from megatron_fapool.training import checkpoint as ckpt

BUCKETS = ((512, 2048, "512-2K"), (2048, 8192, "2K-8K"), (8192, 32768, "8K-32K"), (32768, 1 << 62, "32K+"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deepspeed_config", "--deepspeed-config", required=True, help="DeepSpeed JSON with a fapool section")
    p.add_argument("--yaml-cfg", default=None, help="model YAML replacing the JSON's fapool.model_yaml")
    w = p.add_mutually_exclusive_group(required=True)
    w.add_argument("--load", metavar="DIR", help="checkpoint directory of launch/train.py (its latest complete one)")
    w.add_argument("--random-weights", action="store_true", help="random weights (seeded), for benchmarks")
    p.add_argument("--prompt", action="append", default=[], help="a text prompt (repeatable)")
    p.add_argument("--prompt-file", action="append", default=[], help="a file whose text is one prompt (repeatable)")
    p.add_argument("--prompt-lengths", type=int, nargs="+", default=[], help="random-token prompts of these lengths")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--sampling", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--stop-at-eod", action="store_true", help="end a request at the end-of-document token")
    p.add_argument("--decode-batch", type=int, default=0,
                   help="requests per decode forward (default 0: every request still generating)")
    p.add_argument("--sweep", nargs="+", default=[], metavar="LENxBATCH",
                   help="benchmark: serve BATCH random prompts of LEN tokens, for each item in turn, with one"
                        " model (e.g. 8192x1 8192x4 131072x1); instead of prompts")
    p.add_argument("--warmup", action="store_true", help="serve each batch once untimed first (kernels, allocator)")
    p.add_argument("--engine", choices=("auto", "slots", "session"), default="auto",
                   help="slots: static K/V slots, CUDA-graph decode, continuous batching; session: the pool / MA /"
                        " PP path; auto (default): slots where it applies")
    p.add_argument("--trace", default=None, metavar="FILE",
                   help="requests with arrival times, JSON lines: {\"arrival_s\": 0.1, \"prompt_len\": 512,"
                        " \"max_new_tokens\": 32} (or \"prompt\": text, \"prompt_tokens\": ids); instead of prompts")
    p.add_argument("--arrival-rate", type=float, default=None, metavar="RPS",
                   help="the given prompts arrive as a Poisson process of this many requests per second")
    p.add_argument("--slots", type=int, default=0,
                   help="slots engine: requests that run at once (default 0: --decode-batch, else every request)")
    p.add_argument("--slot-capacity", type=int, default=0,
                   help="slots engine: tokens per slot (default 0: the longest prompt + --max-new-tokens)")
    p.add_argument("--max-prefill-tokens", type=int, default=32768,
                   help="slots engine: prompt tokens prefilled together in one forward (a longer prompt runs alone)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="slots engine: decode eagerly on a GPU too")
    p.add_argument("--pool-slots", type=int, default=0,
                   help="shared pool: slots per pool rank for pooled requests of every replica (default: --slots)")
    p.add_argument("--pool-cuda-graphs", action="store_true",
                   help="slots engine with the pool: capture the decode steps with pooled rows too (the exchange with"
                        " the pool inside the graph; NCCL; not measured yet), else they run eagerly")
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput: a request meets the SLO within this TTFT")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput: ... and within this mean TPOT")
    p.add_argument("--metrics-json", default=None, help="write per-request metrics here (rank 0)")
    p.add_argument("--log-interval", type=int, default=0, metavar="STEPS",
                   help="rank 0 prints a line every STEPS decode steps of its replica (default 0: none)")
    p.add_argument("--profile-out", default=None, metavar="FILE",
                   help="write a cProfile of the timed passes on rank 0 here (read it with pstats)")
    p.add_argument("--distributed-timeout-minutes", type=int, default=10)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the launcher")
    return p.parse_args(argv)


def _random_prompts(lengths, vocab_size: int, tok, g) -> tuple[list, list]:
    prompts, texts = [], []
    for n in lengths:
        prompts.append(torch.randint(0, min(vocab_size, tok.vocab_size - 1), (n,), generator=g).tolist())
        texts.append(f"<{n} random tokens>")
    return prompts, texts


def _parse_sweep(items) -> list[tuple[int, int]]:
    out = []
    for item in items:
        parts = item.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ConfigError("--sweep", f"{item!r}: expected LENxBATCH with positive integers, e.g. 8192x4")
        out.append((int(parts[0]), int(parts[1])))
    return out


def _workloads(args, vocab_size: int):
    """``[(name, prompts, texts, arrivals, new_tokens)]``: the one batch of the given prompts (or trace), or one per
    ``--sweep`` item; ``arrivals``/``new_tokens`` per request (``None``: all at 0 / ``--max-new-tokens``)."""
    tok = ByteTokenizer()
    g = torch.Generator().manual_seed(args.seed)
    given = args.prompt or args.prompt_file or args.prompt_lengths
    if args.trace:
        if given or args.sweep or args.arrival_rate is not None:
            raise ConfigError("--trace", "replaces the prompts and arrivals: drop --prompt, --prompt-file,"
                              " --prompt-lengths, --sweep and --arrival-rate")
        try:
            items = load_trace(args.trace, tokenize=tok.tokenize, vocab_size=vocab_size,
                               default_new_tokens=args.max_new_tokens, seed=args.seed,
                               random_below=min(vocab_size, tok.vocab_size - 1))
        except TraceError as e:
            raise ConfigError("--trace", str(e)) from None
        texts = [f"<trace request {i}, {len(p)} tokens>" for i, (_, p, _) in enumerate(items)]
        return [("trace", [p for _, p, _ in items], texts, [a for a, _, _ in items], [n for _, _, n in items])], tok
    if args.sweep:
        if given:
            raise ConfigError("--sweep", "replaces the prompts: drop --prompt, --prompt-file and --prompt-lengths")
        return [(f"{n}x{b}", *_random_prompts([n] * b, vocab_size, tok, g), None, None)
                for n, b in _parse_sweep(args.sweep)], tok
    prompts, texts = [], []
    for text in args.prompt:
        prompts.append(tok.tokenize(text))
        texts.append(text)
    for path in args.prompt_file:
        if not os.path.isfile(path):
            raise ConfigError("--prompt-file", f"{path} not found")
        text = open(path, encoding="utf-8", errors="replace").read()
        prompts.append(tok.tokenize(text))
        texts.append(f"<{path}>")
    for n in args.prompt_lengths:
        if n < 1:
            raise ConfigError("--prompt-lengths", f"{n}: a prompt needs at least one token")
    more, more_texts = _random_prompts(args.prompt_lengths, vocab_size, tok, g)
    prompts, texts = prompts + more, texts + more_texts
    if not prompts:
        raise ConfigError("--prompt", "no prompt given: use --prompt, --prompt-file, --prompt-lengths, --sweep or"
                          " --trace")
    arrivals = None
    if args.arrival_rate is not None:
        if not args.arrival_rate > 0:
            raise ConfigError("--arrival-rate", f"must be > 0 requests per second, got {args.arrival_rate}")
        arrivals = poisson_arrivals(len(prompts), args.arrival_rate, seed=args.seed)
    return [("batch", prompts, texts, arrivals, None)], tok


def _preflight(args):
    cfg = load_run_config(args.deepspeed_config, model_yaml=args.yaml_cfg)
    lm = cfg.model.language_model
    if args.max_new_tokens < 1:
        raise ConfigError("--max-new-tokens", f"must be >= 1, got {args.max_new_tokens}")
    if args.decode_batch < 0:
        raise ConfigError("--decode-batch", f"must be >= 0 (0: all live requests), got {args.decode_batch}")
    if cfg.fapool.dilated_attention.enabled:
        raise ConfigError(
            "fapool.dilated_attention.enabled",
            "KV-cached inference serves dense attention only (the cache holds every key; dilated decode is not"
            " built): serve this model with dilated_attention.enabled false only if it was trained dense",
        )
    if cfg.pipeline_model_parallel_size != 1 and cfg.fapool.attention_pool.enabled:
        raise ConfigError(
            "pipeline_model_parallel_size",
            "the attention pool is not served with pipeline stages yet: PP > 1 runs as the static baseline"
            " (set fapool.attention_pool.enabled false) or use PP = 1 with the pool",
        )
    workloads, tok = _workloads(args, lm.vocab_size)
    batches = []
    for name, prompts, texts, arrivals, new_tokens in workloads:
        new_tokens = new_tokens or [args.max_new_tokens] * len(prompts)
        requests = [Request(i, p, n) for i, (p, n) in enumerate(zip(prompts, new_tokens))]
        try:
            validate_requests(requests, vocab_size=lm.vocab_size, max_positions=lm.max_position_embeddings)
        except RequestError as e:
            key = "--sweep" if args.sweep else "--trace" if args.trace else "--prompt"
            raise ConfigError(key, f"{name}: {e}" if args.sweep else str(e)) from None
        batches.append((name, requests, texts, arrivals or [0.0] * len(requests)))
    if args.log_interval < 0:
        raise ConfigError("--log-interval", f"must be >= 0 (0: no progress lines), got {args.log_interval}")
    resume = None
    if args.load:
        resume = ckpt.find_checkpoint(args.load)
        if resume is None:
            raise ConfigError("--load", f"no complete checkpoint in {args.load} (no 'latest' file)")
        weights.check_checkpoint(resume[1], cfg, os.path.join(args.load, resume[0]))
    check_runnable_here(cfg)
    layout = job.layout_of(cfg)
    args.engine = _engine_for(args, cfg, layout)
    for key, value in (("--slots", args.slots), ("--slot-capacity", args.slot_capacity)):
        if value < 0:
            raise ConfigError(key, f"must be >= 0 (0: sized from the requests), got {value}")
    if args.max_prefill_tokens < 1:
        raise ConfigError("--max-prefill-tokens", f"must be >= 1, got {args.max_prefill_tokens}")
    if layout.num_expert and (layout.tp > 1 or layout.pp > 1):
        raise ConfigError(
            "fapool.ma_separation.enabled",
            f"serving with MA separation at TP {layout.tp} x PP {layout.pp} is not built yet (TP ranks would send the"
            " experts the same rows; stages would need per-stage expert weights): serve it at TP 1 and PP 1, or"
            " colocated (enabled false)",
        )
    if layout.num_expert and cfg.fapool.ma_separation.on_expert_loss == "degrade" and torch.cuda.is_available():
        raise ConfigError(
            "fapool.ma_separation.on_expert_loss",
            "'degrade' is served over gloo (CPU) only: on NCCL a collective with a dead peer waits (up to the"
            " process-group timeout) instead of failing, so the loss is not noticed in time to go on without it;"
            " use 'fail' (the liveness monitor then names the lost rank within its timeout)",
        )
    return cfg, layout, batches, tok, resume


def _engine_for(args, cfg, layout) -> str:
    """The engine this run serves with (``--engine``), or a ConfigError when the choice cannot serve it."""
    why = None
    if layout.num_expert:
        why = "MA separation (fapool.ma_separation.enabled)"
    elif layout.pp > 1:
        why = f"pipeline stages (pipeline_model_parallel_size {layout.pp})"
    elif cfg.model.language_model.num_moe_experts:
        why = "an MoE model (num_moe_experts)"
    if layout.pool_shared and (why or args.engine == "session"):
        raise ConfigError("fapool.attention_pool.sharing", "a shared pool is served by the slots engine only"
                          f"{f', which does not serve {why} yet' if why else ': drop --engine session'}")
    if args.engine == "slots" and why:
        raise ConfigError("--engine", f"the slots engine does not serve {why} yet: use --engine session (or auto)")
    engine = "session" if why or args.engine == "session" else "slots"
    if engine == "session" and (args.trace or args.arrival_rate is not None):
        raise ConfigError("--trace" if args.trace else "--arrival-rate",
                          f"continuous batching runs on the slots engine, which does not serve"
                          f" {why or 'this run (--engine session)'}")
    return engine


def _summary_text(m: dict) -> str:
    ms = lambda s: f"{s * 1e3:.1f}"  # noqa: E731
    lines = ["== serving ==",
             f"{m['requests']} requests served, {m['refused']} refused, in {m['wall_s']:.2f}s: {m['tps']:.0f} TPS"
             f" ({m['output_tps']:.0f} output tokens/s)",
             f"TTFT ms: mean {ms(m['ttft_mean_s'])}, p50 {ms(m['ttft_p50_s'])}, p99 {ms(m['ttft_p99_s'])}",
             f"TPOT ms: mean {ms(m['tpot_mean_s'])}, p50 {ms(m['tpot_p50_s'])}, p99 {ms(m['tpot_p99_s'])}"]
    if "slo_met" in m:
        slo = " and ".join(f"{k} <= {v * 1e3:g} ms" for k, v in (("TTFT", m["slo_ttft_s"]), ("TPOT", m["slo_tpot_s"]))
                           if v is not None)
        lines.append(f"SLO ({slo}): {m['slo_met']}/{m['requests']} requests met it; goodput {m['goodput_rps']:.2f}"
                     f" requests/s, {m['goodput_tps']:.0f} tokens/s")
    return "\n".join(lines)


def _bucket(n: int) -> str:
    for lo, hi, name in BUCKETS:
        if lo <= n < hi:
            return name
    return "<512"


def _report(gens, texts, tok, wall_s: float) -> str:
    lines = ["== requests ==",
             f"{'id':>3} {'prompt':>8} {'new':>4} {'pooled':>6} {'TTFT ms':>9} {'TPOT ms':>8}  text"]
    for g, text in zip(gens, texts):
        if g.refused is not None:
            lines.append(f"{g.id:>3} {g.prompt_len:>8} refused: {g.refused}")
            continue
        out = tok.detokenize(g.tokens).replace("\n", "\\n")[:60]
        lines.append(f"{g.id:>3} {g.prompt_len:>8} {len(g.tokens):>4} {'yes' if g.pooled else 'no':>6}"
                     f" {g.ttft_s * 1e3:>9.1f} {g.tpot_s * 1e3:>8.2f}  {text[:30]!s} -> {out!r}")
    total = sum(g.prompt_len + len(g.tokens) for g in gens)
    lines.append(f"batch: {len(gens)} requests, {total} tokens (input + output) in {wall_s:.2f}s = {total / wall_s:.0f} TPS")
    lines.append("== per length bucket ==")
    for _, _, name in ((0, 0, "<512"),) + BUCKETS:
        sel = [g for g in gens if _bucket(g.prompt_len) == name and g.refused is None]
        if not sel:
            continue
        ttft = sum(g.ttft_s for g in sel) / len(sel)
        tpot = sum(g.tpot_s for g in sel) / len(sel)
        lines.append(f"{name:>7}: {len(sel)} requests, mean TTFT {ttft * 1e3:.1f} ms, mean TPOT {tpot * 1e3:.2f} ms")
    return "\n".join(lines)


class _MA:
    """What both roles of an MA-separation job share: the loss policy, its agreement, the survivor groups."""

    def __init__(self, cfg, groups, timeout_s: float):
        ma = cfg.fapool.ma_separation
        self.mode = ma.on_expert_loss
        self.num_experts = cfg.model.language_model.num_moe_experts
        self.describe = lambda r: job.describe_rank(cfg, groups.layout, r)
        self.geometry = DispatchGeometry.of_stage(groups.layout, groups.role.pp, self.num_experts)
        monitor = groups.liveness
        if self.mode == "degrade":
            create_survivor_groups(groups, timeout_s=timeout_s)  # collective over the world: every rank, here
            if monitor is not None:
                monitor.tolerate(self.geometry.expert_ranks, "degraded inference masks its experts from routing")
        self.agreement = None
        if monitor is not None:
            self.agreement = LossAgreement(
                rank=groups.rank, members=self.geometry.members, leader=self.geometry.attention_ranks[0],
                store=dist.distributed_c10d._get_default_store(), silent_s=monitor.silent_s, timeout_s=timeout_s,
            )
        self.groups = groups
        self.lost: list[int] = []

    @property
    def live_world(self):
        """The world, or the world without the lost expert rank."""
        return self.groups.survivor_world[self.lost[0]] if self.lost else dist.group.WORLD

    def gather(self, item) -> list | None:
        """Every live rank's ``item`` on rank 0 (collective over the live world)."""
        out = [None] * dist.get_world_size(self.live_world) if dist.get_rank() == 0 else None
        dist.gather_object(item, out, dst=0, group=self.live_world)
        return out

    def finish(self) -> None:
        """After a survived loss the world's teardown barrier cannot complete (a member is gone): the live
        ranks meet on their own group, mark themselves finished and leave with exit code 0 here."""
        if not self.lost:
            return
        dist.barrier(group=self.live_world)
        if self.groups.liveness is not None:
            self.groups.liveness.stop()
        dist.destroy_process_group()
        raise SystemExit(0)


def _ma_report(items, ma: _MA) -> tuple[str, dict]:
    attention = sorted((i for i in items if i["role"] == "attention"), key=lambda i: i["rank"])
    experts = sorted((i for i in items if i["role"] == "expert"), key=lambda i: i["rank"])
    rerouted = sum(i["rerouted_tokens"] for i in attention)
    lost = sorted({r for i in attention for r in i["lost"]})
    lines = ["== MA separation ==",
             f"attention ranks {[i['rank'] for i in attention]}: {sum(i['rows_sent'] for i in attention)} token rows"
             f" sent in {sum(i['forward_calls'] for i in attention)} MoE calls"
             f" ({sum(i['idle_calls'] for i in attention)} of them idle), {max(i['steps'] for i in attention)} steps"]
    for e in experts:
        per_layer = [sum(row) for row in e["tokens_forward"]]
        lines.append(f"{ma.describe(e['rank'])}: {sum(per_layer)} tokens in {e['forward_calls']} calls"
                     f" (per layer {per_layer})")
    for r in lost:
        lines.append(f"lost {ma.describe(r)}: its experts were masked; {rerouted} tokens rerouted (token x MoE layer)")
    if not lost:
        lines.append(f"no expert rank lost (on_expert_loss: {ma.mode}); {rerouted} tokens rerouted")
    return "\n".join(lines), {"on_expert_loss": ma.mode, "lost_ranks": lost, "rerouted_tokens": rerouted,
                              "attention": attention, "experts": experts}


def _served_model(args, cfg, spec, device, resume, *, experts_remote: bool = False):
    """The model of this base rank, its weights seeded or loaded from ``--load``."""
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    # an MoE model at TP > 1 trains sequence parallel; decode steps (one token) cannot be split over TP
    overrides = {"sequence_parallel": False} if cfg.model.language_model.num_moe_experts else {}
    model = build_gpt_model(cfg, layer_spec=spec, **overrides).to(device)
    if resume is not None:
        weights.load_attention_weights(model, args.load, resume[0], resume[1], device,
                                       tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                                       experts_remote=experts_remote)
        log0(f"== weights from {args.load}/{resume[0]} ==")
    return model


def _gather_report(groups, name, requests, texts, gens, wall, tok, summary=None) -> dict | None:
    """Every base rank's generations on rank 0 (collective over the base ranks); rank 0 prints the report
    and returns the workload's metrics (``None`` elsewhere)."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    gathered = [None] * dist.get_world_size(groups.base) if dist.get_rank() == 0 else None
    dist.gather_object((tp_rank, pp_rank, wall, gens), gathered, dst=0, group=groups.base)
    if dist.get_rank() != 0:
        return None
    gens = sorted((g for t, p, _, gs in gathered if t == 0 and p == 0 for g in gs), key=lambda g: g.id)
    wall = max(w for _, _, w, _ in gathered)
    print(_report(gens, [texts[g.id] for g in gens], tok, wall), flush=True)
    out = {"name": name, "wall_s": wall}
    if summary is not None:
        out["summary"] = summary(gens, wall)
        print(_summary_text(out["summary"]), flush=True)
    prompts = {r.id: list(r.prompt) for r in requests}
    out["requests"] = [dict(id=g.id, prompt_len=g.prompt_len, prompt_tokens=prompts[g.id], new_tokens=len(g.tokens),
                            pooled=g.pooled, arrival_s=g.arrival_s, refused=g.refused,
                            ttft_s=g.ttft_s, tpot_s=g.tpot_s, done_s=g.done_s, decode_s=g.decode_s,
                            kv_tokens_on_base=g.kv_tokens_on_base, tokens=g.tokens, degraded_from=g.degraded_from)
                       for g in gens]
    return out


def _write_metrics(args, groups, results, **extra) -> None:
    if dist.get_rank() == 0 and args.metrics_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.metrics_json)), exist_ok=True)
        with open(args.metrics_json, "w") as f:
            json.dump({"world_size": groups.layout.world_size, "data_parallel_size": groups.layout.dp,
                       "decode_batch": args.decode_batch, "engine": args.engine, "workloads": results, **extra}, f,
                      indent=1)


def _serve_base(args, cfg, groups, device, batches, tok, resume):
    lm = cfg.model.language_model
    backend = cfg.fapool.attention_backend.backend
    timeout_s = 60.0 * args.distributed_timeout_minutes
    pool = None
    if groups.layout.pool_per_base:
        pool = AttentionPool.for_base_rank(groups, cfg.fapool.attention_pool, backend=backend)
    ma = _MA(cfg, groups, timeout_s) if groups.layout.num_expert else None
    client = ExpertClient(groups, num_experts=ma.num_experts) if ma else None
    session = InferenceSession(pool, backend=backend)
    experts = ModuleSpec(RemoteExperts, params={"client": client}) if client is not None else None
    spec = layer_spec_for(cfg, pool, wrap=lambda attend: KVCached(attend, session), experts=experts)
    model = _served_model(args, cfg, spec, device, resume, experts_remote=client is not None)
    lockstep = None
    if client is not None:
        lockstep = Lockstep(client, group=groups.base, device=device, dtype=model.config.params_dtype,
                            hidden=lm.hidden_size, routers=[m.router for m in moe_layers(model)],
                            agreement=ma.agreement, survivors=groups.survivors, mode=ma.mode, describe=ma.describe,
                            log=lambda m: print(f"fapool: [rank {dist.get_rank()}] {m}", flush=True))
    dp, dp_rank = groups.layout.dp, parallel_state.get_data_parallel_rank()
    decode_steps = [0]

    def on_step(kind, size):
        if kind == "decode":
            decode_steps[0] += 1
            if args.log_interval and decode_steps[0] % args.log_interval == 0 and dist.get_rank() == 0:
                print(f"decode step {decode_steps[0]}: {size} requests", flush=True)

    kwargs = dict(vocab_size=lm.vocab_size, max_positions=lm.max_position_embeddings, device=device,
                  tp_group=parallel_state.get_tensor_model_parallel_group(),
                  pp_group=parallel_state.get_pipeline_model_parallel_group(), greedy=not args.sampling,
                  temperature=args.temperature, top_k=args.top_k, seed=args.seed, decode_batch=args.decode_batch,
                  token_limit=tok.vocab_size, stop_token=tok.eod if args.stop_at_eod else None, lockstep=lockstep,
                  on_step=on_step,
                  parts=cfg.fapool.ma_separation.micro_batches if cfg.fapool.ma_separation.enabled else 1)
    results = []
    profiler = cProfile.Profile() if args.profile_out and dist.get_rank() == 0 else None
    for i, (name, requests, texts, _) in enumerate(batches):
        if len(batches) > 1:
            log0(f"== workload {i + 1}/{len(batches)}: {name} ==")
        mine = [r for r in requests if r.id % dp == dp_rank]  # this replica's requests
        if args.warmup:
            generate(model, session, mine, **kwargs)
        if profiler is not None:
            profiler.enable()
        t0 = time.perf_counter()
        gens = generate(model, session, mine, **kwargs)
        wall = time.perf_counter() - t0
        if profiler is not None:
            profiler.disable()
        results.append(_gather_report(groups, name, requests, texts, gens, wall, tok))
    if pool is not None:
        pool.shutdown(device)
    ma_metrics = None
    if lockstep is not None:
        lockstep.shutdown()
        ma.lost = list(lockstep.lost)
        s = client.stats
        items = ma.gather(dict(
            role="attention", rank=dist.get_rank(), dp=dp_rank, rows_sent=s.rows_sent, forward_calls=s.forward_calls,
            idle_calls=s.idle_calls, bytes_sent=s.bytes_sent, bytes_received=s.bytes_received, steps=lockstep.steps,
            idle_steps=lockstep.idle_steps, redone_steps=lockstep.redone_steps, lost=list(lockstep.lost),
            rerouted_tokens=lockstep.rerouted_tokens,
            rerouted_per_layer=[int(r.rerouted_tokens) for r in lockstep.routers],
        ))
        if dist.get_rank() == 0:
            text, ma_metrics = _ma_report(items, ma)
            print(text, flush=True)
    if profiler is not None:
        profiler.dump_stats(args.profile_out)
    _write_metrics(args, groups, results, ma_separation=ma_metrics)
    if ma is not None:
        ma.finish()


def _slot_cache(args, cfg, model, requests, device) -> SlotCache:
    """This workload's slots: ``--slots`` (or ``--decode-batch``, or one per request) of ``--slot-capacity``
    tokens (or the longest request's), refused before allocation if they do not fit the device."""
    c = model.config
    slots = min(args.slots or args.decode_batch or len(requests), len(requests))
    capacity = args.slot_capacity or max(len(r.prompt) + r.max_new_tokens for r in requests)
    kv_heads = c.num_query_groups // parallel_state.get_tensor_model_parallel_world_size()
    shape = dict(layers=c.num_layers, capacity=capacity, kv_heads=kv_heads, head_dim=c.kv_channels,
                 dtype=c.params_dtype)
    need = (slots + 1) * SlotCache.bytes_per_slot(**shape)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        if need > 0.9 * free:
            raise ConfigError("--slots", f"{slots} slots of {capacity} tokens need {need / 2**30:.1f} GiB of K/V but"
                              f" {free / 2**30:.1f} GiB of {device} is free: lower --slots or --slot-capacity")
    return SlotCache(slots=slots, device=device, **shape)


def _serve_slots(args, cfg, groups, device, batches, tok, resume):
    """Every workload through the slots engine: continuous batching from static K/V slots."""
    spec, attention = slot_layer_spec(cfg)
    model = _served_model(args, cfg, spec, device, resume)
    pool, threshold = None, None
    if groups.layout.pool_per_base:
        pool = AttentionPool.for_base_rank(groups, cfg.fapool.attention_pool,
                                           backend=cfg.fapool.attention_backend.backend)
    elif groups.layout.pool_shared:  # one pool for every replica: placements, prefills, decode layers per request
        c = model.config
        threshold = shared_manager(cfg.fapool.attention_pool, groups.layout).threshold
        tp_group = parallel_state.get_tensor_model_parallel_group()
        pool = MailboxClient(groups, device=device, stats=PoolStats(), threshold=threshold,
                             kv_heads=c.num_query_groups // dist.get_world_size(tp_group), head_dim=c.kv_channels,
                             dtype=c.params_dtype, max_active=cfg.fapool.attention_pool.max_active,
                             backend=cfg.fapool.attention_backend.backend, tp_group=tp_group)
    sampling = Sampling(greedy=not args.sampling, temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                        limit=tok.vocab_size)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    agree = None
    if dist.get_world_size(tp_group) > 1:  # the TP ranks compare arrivals with TP rank 0's clock
        src = dist.get_process_group_ranks(tp_group)[0]

        def agree(now: float) -> float:
            t = torch.tensor([now], dtype=torch.float64, device=device)
            dist.broadcast(t, src=src, group=tp_group)
            return float(t[0])
    dp, dp_rank = groups.layout.dp, parallel_state.get_data_parallel_rank()
    steps = [0]

    def on_step(kind, rows, waiting):
        if kind == "decode":
            steps[0] += 1
            if args.log_interval and steps[0] % args.log_interval == 0 and dist.get_rank() == 0:
                print(f"decode step {steps[0]}: {rows} running, {waiting} waiting", flush=True)

    def summary(gens, wall):
        ms = lambda v: None if v is None else v / 1e3  # noqa: E731
        return summarize(gens, wall, slo_ttft_s=ms(args.slo_ttft_ms), slo_tpot_s=ms(args.slo_tpot_ms))

    results = []
    for i, (name, requests, texts, arrivals) in enumerate(batches):
        if len(batches) > 1:
            log0(f"== workload {i + 1}/{len(batches)}: {name} ==")
        if threshold is None:
            replica = [r.id % dp for r in requests]
        else:  # the front scheduler places requests by load, long ones spread (the same on every rank)
            replica = place_on_replicas(requests, arrivals, replicas=dp, threshold=threshold)
        mine = [TimedRequest(r, a) for r, a, rep in zip(requests, arrivals, replica) if rep == dp_rank]
        gens, wall = [], 0.0
        if mine:
            cache = _slot_cache(args, cfg, model, [t.request for t in mine], device)
            engine = ServingEngine(model, attention, cache, device=device, sampling=sampling,
                                   max_new_tokens=max(t.request.max_new_tokens for t in mine), tp_group=tp_group,
                                   cuda_graphs=device.type == "cuda" and not args.no_cuda_graphs,
                                   backend=cfg.fapool.attention_backend.backend, pool=pool,
                                   pool_graphs=args.pool_cuda_graphs, pool_slots=args.pool_slots)
            kw = dict(stop_token=tok.eod if args.stop_at_eod else None, max_prefill_tokens=args.max_prefill_tokens,
                      agree=agree)
            if args.warmup:
                serve(engine, [TimedRequest(t.request) for t in mine], **kw)
            t0 = time.perf_counter()
            gens = serve(engine, mine, on_step=on_step, **kw)
            wall = time.perf_counter() - t0
            del engine, cache
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results.append(_gather_report(groups, name, requests, texts, gens, wall, tok, summary))
    if pool is not None:
        pool.shutdown(device)
    _write_metrics(args, groups, results)


def _serve_experts(args, cfg, groups, device, resume):
    """An expert rank: every MoE layer's experts of its block, served until the attention ranks shut it down."""
    ma = _MA(cfg, groups, 60.0 * args.distributed_timeout_minutes)
    lm = cfg.model.language_model
    torch.manual_seed(args.seed + 1 + groups.rank)  # --random-weights: this rank's experts
    stack = ExpertStack.for_rank(groups, expert_transformer_config(cfg), num_layers=lm.num_layers,
                                 num_experts=ma.num_experts).to(device)
    if resume is not None:
        weights.load_expert_weights(stack, args.load, resume[0], resume[1], device)
    server = ExpertServer(groups, stack, device=device, num_experts=ma.num_experts)
    with torch.no_grad():
        stats = serve_degradable(server, ma.agreement, groups.survivors, mode=ma.mode, describe=ma.describe,
                                 on_switch=ma.lost.append)
    ids = stack.global_ids
    print(f"[rank {groups.rank}] expert rank for experts {ids.start}-{ids.stop - 1}: served {stats.forward_calls}"
          f" forward calls, {int(stats.tokens_forward.sum())} tokens, {stats.bytes_received / 1e6:.1f} MB in,"
          f" {stats.bytes_sent / 1e6:.1f} MB out" + (f"; went on without rank {ma.lost[0]}" if ma.lost else ""),
          flush=True)
    ma.gather(dict(role="expert", rank=groups.rank, experts=[ids.start, ids.stop - 1],
                   forward_calls=stats.forward_calls, tokens_forward=stats.tokens_forward.tolist(),
                   bytes_sent=stats.bytes_sent, bytes_received=stats.bytes_received, lost=list(ma.lost)))
    ma.finish()


def _serve_shared_pool(cfg, groups, device) -> None:
    """A rank of a shared pool: every replica's pooled requests, until every base rank is done."""
    server = MailboxServer(groups, device=device, stats=PoolStats(), pool_cfg=cfg.fapool.attention_pool)
    s = server.serve()
    print(f"[rank {groups.rank}] shared pool rank: served {s.served_forward} calls, {s.query_rows} query rows,"
          f" {s.bytes_received / 1e6:.1f} MB in, {s.bytes_sent / 1e6:.1f} MB out, busy {s.busy_s:.2f} s", flush=True)
    if server.manager is not None:
        print(f"[rank {groups.rank}] shared pool counters: {json.dumps(server.manager.counters(), sort_keys=True)}",
              flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg, layout, batches, tok, resume = _preflight(args)
    base = _serve_slots if args.engine == "slots" else _serve_base
    return job.run(cfg, layout,
                   lambda groups, device: base(args, cfg, groups, device, batches, tok, resume),
                   pool_work=(lambda groups, device: _serve_shared_pool(cfg, groups, device))
                   if layout.pool_shared else None,
                   expert_work=lambda groups, device: _serve_experts(args, cfg, groups, device, resume),
                   timeout_s=60.0 * args.distributed_timeout_minutes, exit_on_peer_lost=True)


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
