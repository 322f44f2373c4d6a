"""Demo: config -> roles and groups -> Megatron GPTModel with the pool -> forward/backward.

    torchrun --nproc_per_node 4 launch/demo.py --deepspeed_config configs/tiny_dense_pool.json

Loads the DeepSpeed JSON and its model YAML, computes and prints the rank layout,
creates every process group, builds Megatron's ``GPTModel`` with the fapool layer
spec on the base ranks and runs a forward and backward on random tokens for a length
below and one above the pool threshold, printing the loss and what the pool did.
Pool ranks hold no weights: they serve attention blocks for their base rank.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_fapool.config import ConfigError, load_run_config  # noqa: E402
from megatron_fapool.parallel import initialize_parallel_groups, layout_from_config  # noqa: E402
from megatron_fapool.parallel.liveness import LivenessMonitor  # noqa: E402
from megatron_fapool.runtime import exit_on_user_error, init_distributed, log0, world_from_env  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deepspeed_config", "--deepspeed-config", required=True, help="DeepSpeed JSON with a fapool section")
    p.add_argument(
        "--seq-lengths", type=int, nargs="+", default=None,
        help="one forward/backward per length (default: half and twice-plus-one the pool threshold)",
    )
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the launcher")
    return p.parse_args(argv)


def _seq_lengths(args, cfg) -> list[int]:
    lm = cfg.model.language_model
    pool = cfg.fapool.attention_pool
    if args.seq_lengths:
        lengths = args.seq_lengths
    elif pool.enabled and isinstance(pool.threshold, int):
        lengths = [max(pool.threshold // 2, 8), 2 * pool.threshold + 45]  # below and above the threshold
    else:
        lengths = [lm.seq_length or 512]
    for n in lengths:
        if not 1 <= n <= lm.max_position_embeddings:
            raise ConfigError("--seq-lengths", f"{n} is outside 1..max_position_embeddings={lm.max_position_embeddings}")
    if cfg.pipeline_model_parallel_size != 1:
        raise ConfigError("pipeline_model_parallel_size", "the demo runs one stage; use launch/train.py for PP > 1")
    return lengths


def _base_rank(cfg, groups, device, args, lengths) -> None:
    from megatron.core import parallel_state

    from megatron_fapool.attention.pool import AttentionPool
    from megatron_fapool.models.attention_selection import layer_spec_for
    from megatron_fapool.models.gpt import build_gpt_model
    from megatron_fapool.training.flops import step_flops

    lm = cfg.model.language_model
    backend = cfg.fapool.attention_backend.backend
    pool = None
    if groups.layout.pool_per_base:
        pool = AttentionPool.for_base_rank(groups, cfg.fapool.attention_pool, backend=backend)
    # dense or dilated core attention, through the pool when this rank has one
    spec = layer_spec_for(cfg, pool)
    torch.manual_seed(args.seed)
    model = build_gpt_model(cfg, layer_spec=spec).to(device)
    reporter = parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0
    gen = torch.Generator().manual_seed(args.seed + parallel_state.get_data_parallel_rank())
    for n in lengths:
        if pool is not None:
            pool.manager.new_step()
            before = pool.stats.as_dict()
        tokens = torch.randint(0, lm.vocab_size, (args.micro_batch_size, n + 1), generator=gen).to(device)
        ids, labels = tokens[:, :-1], tokens[:, 1:]
        pos = torch.arange(n, device=device).unsqueeze(0).expand_as(ids)
        t0 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        loss = model(ids, pos, None, labels=labels).float().mean()
        loss.backward()
        elapsed = time.perf_counter() - t0
        grad_sq = sum(float(p.grad.float().pow(2).sum()) for p in model.parameters() if p.grad is not None)
        if reporter:
            flops = step_flops(cfg, args.micro_batch_size, n)  # whole model, this micro-batch
            line = (
                f"[rank {dist.get_rank()}] seq {n:>5}  loss {loss.item():.6f}  local grad norm {grad_sq ** 0.5:.4f}"
                f"  {elapsed:.2f}s  {flops / 1e9:.2f} GFLOP ({flops / elapsed / 1e12:.4f} TFLOP/s)"
            )
            if pool is not None:
                d = {k: v - before[k] for k, v in pool.stats.as_dict().items()}
                line += (
                    f"  pool: {pool.manager.current} active, {d['pooled_forward']} pooled fwd /"
                    f" {d['pooled_backward']} bwd, {d['local_calls']} local, {d['bytes_sent'] / 1e6:.2f} MB out"
                )
            print(line, flush=True)
    if pool is not None:
        if reporter:
            print(f"[rank {dist.get_rank()}] pool totals: {pool.stats.as_dict()}", flush=True)
        pool.shutdown(device)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_run_config(args.deepspeed_config)
    _, world, _ = world_from_env()
    layout = layout_from_config(cfg, world)  # fails here, before any group exists
    lengths = _seq_lengths(args, cfg)

    device = init_distributed()
    monitor = LivenessMonitor(
        rank=dist.get_rank(), world_size=world,
        describe_rank=lambda r: f"rank {r} ({layout.role_of(r).role})",
    ).start()
    log0("== resolved config ==\n" + cfg.describe())
    log0("== layout ==\n" + layout.describe())
    t0 = time.perf_counter()
    groups = initialize_parallel_groups(layout)
    log0(f"== groups created in {time.perf_counter() - t0:.2f}s ==")

    if groups.is_base:
        _base_rank(cfg, groups, device, args, lengths)
    elif groups.is_pool:
        from megatron_fapool.attention.pool import PoolServer

        stats = PoolServer(groups, device=device).serve()
        print(
            f"[rank {dist.get_rank()}] pool rank for base rank {groups.role.serves}: served"
            f" {stats.served_forward} forward / {stats.served_backward} backward blocks,"
            f" {stats.query_rows} query rows, {stats.bytes_received / 1e6:.2f} MB in",
            flush=True,
        )
    else:
        print(f"[rank {dist.get_rank()}] expert rank: idle in this demo", flush=True)
    dist.barrier()
    monitor.stop()
    log0("demo done")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
