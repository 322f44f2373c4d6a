"""Train a Megatron GPT model with DeepSpeed and the attention pool.

    deepspeed --num_gpus 4 launch/train.py --deepspeed_config configs/tiny_dense_pool.json \\
        --data-path runs/data/pystdlib --train-iters 100 --save runs/ckpt --save-interval 20
    torchrun --nproc_per_node 4 launch/train.py ...   (the same flags)

The DeepSpeed JSON holds optimizer, LR schedule, ZeRO stage (0-2), precision, gradient
clipping, batch sizes and monitors, plus the ``fapool`` section (model YAML, TP/PP,
attention pool, attention backend). The world is ``base ranks + pool ranks``: base
ranks run Megatron's GPTModel inside a DeepSpeed engine (data parallel over base ranks
only); pool ranks hold no weights and serve the attention of sequences longer than the
pool threshold, forward and backward. Checkpoints are DeepSpeed's files of each TP
shard, committed atomically (``latest`` moves only after every rank has written);
``--load`` resumes from the last complete one. A lost rank ends every rank within
about 20 s, naming it. Bad input exits with code 2 and one line before any work.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.distributed as dist  # noqa: E402

from megatron_fapool.config import load_run_config  # noqa: E402
from megatron_fapool.parallel import initialize_parallel_groups, layout_from_config  # noqa: E402
from megatron_fapool.parallel.liveness import LivenessMonitor  # noqa: E402
from megatron_fapool.runtime import exit_on_user_error, init_distributed, log0, world_from_env  # noqa: E402
from megatron_fapool.training import checkpoint as ckpt  # noqa: E402
from megatron_fapool.training.arguments import check_batch_sizes, check_run, parse_args  # noqa: E402


def _preflight(args):
    """All checks that need no process group: config, layout, batch sizes, checkpoint shape."""
    cfg = load_run_config(args.deepspeed_config, model_yaml=args.yaml_cfg)
    check_run(args, cfg)
    from megatron_fapool.models.gpt import check_runnable_here

    check_runnable_here(cfg)
    _, world, _ = world_from_env()
    layout = layout_from_config(cfg, world)
    dp = layout.num_base // (layout.tp * layout.pp)
    check_batch_sizes(cfg.deepspeed, dp, cfg.json_path)
    resume = ckpt.find_checkpoint(args.load) if args.load else None
    if resume is not None:
        tag, meta = resume
        ckpt.check_compatible(meta, cfg, os.path.join(args.load, tag))
    if args.save:
        ckpt.check_save_dir(args.save, loaded_from=args.load if resume is not None else None)
    return cfg, layout, resume


def _serve_pool(groups, device) -> None:
    from megatron_fapool.attention.pool import PoolServer

    stats = PoolServer(groups, device=device).serve()
    print(
        f"[rank {dist.get_rank()}] pool rank for base rank {groups.role.serves}: served"
        f" {stats.served_forward} forward / {stats.served_backward} backward calls,"
        f" {stats.query_rows} query rows, {stats.bytes_received / 1e6:.1f} MB in, {stats.bytes_sent / 1e6:.1f} MB out",
        flush=True,
    )


def main(argv=None) -> int:
    args = parse_args(argv, __doc__)
    cfg, layout, resume = _preflight(args)
    if resume is not None and int(resume[1]["iteration"]) >= args.train_iters:
        log0(f"fapool: {args.load}/{resume[0]} is already at iteration {resume[1]['iteration']}"
             f" >= --train-iters {args.train_iters}: nothing to do")
        return 0
    timeout_s = 60.0 * args.distributed_timeout_minutes
    device = init_distributed(timeout_s=timeout_s)
    rank = dist.get_rank()
    monitor = LivenessMonitor(
        rank=rank, world_size=layout.world_size, describe_rank=lambda r: f"rank {r} ({layout.role_of(r).role})",
    ).start()
    print(f"fapool: rank {rank} pid {os.getpid()} role {layout.role_of(rank).role} device {device}", flush=True)
    log0("== resolved config ==\n" + cfg.describe())
    log0("== layout ==\n" + layout.describe())
    if args.load and resume is None:
        log0(f"== no checkpoint in {args.load}: starting from iteration 0 ==")
    t0 = time.perf_counter()
    groups = initialize_parallel_groups(layout, timeout_s=timeout_s)
    log0(f"== groups created in {time.perf_counter() - t0:.2f}s ==")

    if groups.is_base:
        from megatron_fapool.training.loop import train_base_rank

        train_base_rank(args, cfg, groups, device, resume=resume, log=log0)
    elif groups.is_pool:
        _serve_pool(groups, device)
    dist.barrier()
    monitor.stop()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
