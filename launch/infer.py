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

from megatron_fapool.attention.pool import AttentionPool
from megatron_fapool.config import ConfigError, load_run_config
from megatron_fapool.data import ByteTokenizer
from megatron_fapool.inference.generate import Request, RequestError, generate, validate_requests
from megatron_fapool.inference.session import InferenceSession, KVCached
from megatron_fapool.models.gpt import build_gpt_model, check_runnable_here
from megatron_fapool.models.specs import layer_spec_for
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
    p.add_argument("--metrics-json", default=None, help="write per-request metrics here (rank 0)")
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
    """``[(name, prompts, texts)]``: the one batch of the given prompts, or one per ``--sweep`` item."""
    tok = ByteTokenizer()
    g = torch.Generator().manual_seed(args.seed)
    if args.sweep:
        if args.prompt or args.prompt_file or args.prompt_lengths:
            raise ConfigError("--sweep", "replaces the prompts: drop --prompt, --prompt-file and --prompt-lengths")
        return [(f"{n}x{b}", *_random_prompts([n] * b, vocab_size, tok, g)) for n, b in _parse_sweep(args.sweep)], tok
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
        raise ConfigError("--prompt", "no prompt given: use --prompt, --prompt-file, --prompt-lengths or --sweep")
    return [("batch", prompts, texts)], tok


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
    for name, prompts, texts in workloads:
        requests = [Request(i, p, args.max_new_tokens) for i, p in enumerate(prompts)]
        try:
            validate_requests(requests, vocab_size=lm.vocab_size, max_positions=lm.max_position_embeddings)
        except RequestError as e:
            raise ConfigError("--sweep" if args.sweep else "--prompt", f"{name}: {e}" if args.sweep else str(e)) from None
        batches.append((name, requests, texts))
    resume = None
    if args.load:
        resume = ckpt.find_checkpoint(args.load)
        if resume is None:
            raise ConfigError("--load", f"no complete checkpoint in {args.load} (no 'latest' file)")
        ckpt.check_compatible(resume[1], cfg, os.path.join(args.load, resume[0]))
    check_runnable_here(cfg)
    layout = job.layout_of(cfg)
    if layout.dp != 1:
        raise ConfigError(
            "world size",
            f"{layout.world_size} ranks make {layout.dp} data-parallel replicas of the model; launch/infer.py serves one:"
            f" launch TP x PP = {layout.tp * layout.pp} base ranks plus the pool ranks"
            f" ({layout.tp * layout.pp + layout.pool_size} in all)",
        )
    return cfg, layout, batches, tok, resume


def _load_weights(model, load_dir: str, tag: str, device) -> None:
    path = os.path.join(load_dir, tag, f"mp_rank_{parallel_state.get_tensor_model_parallel_rank():02d}_model_states.pt")
    state = torch.load(path, map_location=device, weights_only=False)
    model.load_state_dict(state["module"], strict=True)


def _bucket(n: int) -> str:
    for lo, hi, name in BUCKETS:
        if lo <= n < hi:
            return name
    return "<512"


def _report(gens, texts, tok, wall_s: float) -> str:
    lines = ["== requests ==",
             f"{'id':>3} {'prompt':>8} {'new':>4} {'pooled':>6} {'TTFT ms':>9} {'TPOT ms':>8}  text"]
    for g, text in zip(gens, texts):
        out = tok.detokenize(g.tokens).replace("\n", "\\n")[:60]
        lines.append(f"{g.id:>3} {g.prompt_len:>8} {len(g.tokens):>4} {'yes' if g.pooled else 'no':>6}"
                     f" {g.ttft_s * 1e3:>9.1f} {g.tpot_s * 1e3:>8.2f}  {text[:30]!s} -> {out!r}")
    total = sum(g.prompt_len + len(g.tokens) for g in gens)
    lines.append(f"batch: {len(gens)} requests, {total} tokens (input + output) in {wall_s:.2f}s = {total / wall_s:.0f} TPS")
    lines.append("== per length bucket ==")
    for _, _, name in ((0, 0, "<512"),) + BUCKETS:
        sel = [g for g in gens if _bucket(g.prompt_len) == name]
        if not sel:
            continue
        ttft = sum(g.ttft_s for g in sel) / len(sel)
        tpot = sum(g.tpot_s for g in sel) / len(sel)
        lines.append(f"{name:>7}: {len(sel)} requests, mean TTFT {ttft * 1e3:.1f} ms, mean TPOT {tpot * 1e3:.2f} ms")
    return "\n".join(lines)


def _serve_base(args, cfg, groups, device, batches, tok, resume):
    lm = cfg.model.language_model
    backend = cfg.fapool.attention_backend.backend
    pool = None
    if groups.layout.pool_per_base:
        pool = AttentionPool.for_base_rank(groups, cfg.fapool.attention_pool, backend=backend)
    session = InferenceSession(pool, backend=backend)
    spec = layer_spec_for(cfg, pool, wrap=lambda attend: KVCached(attend, session))
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    model = build_gpt_model(cfg, layer_spec=spec).to(device)
    if resume is not None:
        _load_weights(model, args.load, resume[0], device)
        log0(f"== weights from {args.load}/{resume[0]} ==")
    kwargs = dict(vocab_size=lm.vocab_size, max_positions=lm.max_position_embeddings, device=device,
                  tp_group=parallel_state.get_tensor_model_parallel_group(),
                  pp_group=parallel_state.get_pipeline_model_parallel_group(), greedy=not args.sampling,
                  temperature=args.temperature, top_k=args.top_k, seed=args.seed, decode_batch=args.decode_batch,
                  token_limit=tok.vocab_size, stop_token=tok.eod if args.stop_at_eod else None)
    results = []
    profiler = cProfile.Profile() if args.profile_out and dist.get_rank() == 0 else None
    for i, (name, requests, texts) in enumerate(batches):
        if len(batches) > 1:
            log0(f"== workload {i + 1}/{len(batches)}: {name} ==")
        if args.warmup:
            generate(model, session, requests, **kwargs)
        if profiler is not None:
            profiler.enable()
        t0 = time.perf_counter()
        gens = generate(model, session, requests, **kwargs)
        wall = time.perf_counter() - t0
        if profiler is not None:
            profiler.disable()
        if dist.get_rank() == 0:
            print(_report(gens, texts, tok, wall), flush=True)
        rows = [dict(id=g.id, prompt_len=g.prompt_len, new_tokens=len(g.tokens), pooled=g.pooled, ttft_s=g.ttft_s,
                     tpot_s=g.tpot_s, done_s=g.done_s, decode_s=g.decode_s,
                     kv_tokens_on_base=g.kv_tokens_on_base) for g in gens]
        results.append({"name": name, "wall_s": wall, "requests": rows})
    if pool is not None:
        pool.shutdown(device)
    if profiler is not None:
        profiler.dump_stats(args.profile_out)
    if dist.get_rank() == 0 and args.metrics_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.metrics_json)), exist_ok=True)
        with open(args.metrics_json, "w") as f:
            json.dump({"world_size": groups.layout.world_size, "decode_batch": args.decode_batch,
                       "workloads": results}, f, indent=1)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg, layout, batches, tok, resume = _preflight(args)
    return job.run(cfg, layout, lambda groups, device: _serve_base(args, cfg, groups, device, batches, tok, resume),
                   timeout_s=60.0 * args.distributed_timeout_minutes)


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
