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

from megatron_fapool.config import load_run_config
from megatron_fapool.models.gpt import check_runnable_here
from megatron_fapool.runtime import exit_on_user_error, job, log0
from megatron_fapool.training import checkpoint as ckpt
from megatron_fapool.training.arguments import check_batch_sizes, check_ping_pong, check_run, parse_args
from megatron_fapool.training.loop import train_base_rank, train_expert_rank


def _preflight(args):
    """All checks that need no process group: config, layout, batch sizes, checkpoint shape."""
    cfg = load_run_config(args.deepspeed_config, model_yaml=args.yaml_cfg)
    check_run(args, cfg)
    check_runnable_here(cfg, seq_length=args.seq_length or cfg.model.language_model.seq_length)
    layout = job.layout_of(cfg)
    micro, _ = check_batch_sizes(cfg.deepspeed, layout.dp, cfg.json_path)
    check_ping_pong(cfg, micro)
    resume = ckpt.find_checkpoint(args.load) if args.load else None
    if resume is not None:
        tag, meta = resume
        ckpt.check_compatible(meta, cfg, os.path.join(args.load, tag), layout=layout)
    if args.save:
        ckpt.check_save_dir(args.save, loaded_from=args.load if resume is not None else None)
    return cfg, layout, resume


def main(argv=None) -> int:
    args = parse_args(argv, __doc__)
    cfg, layout, resume = _preflight(args)
    if resume is not None and int(resume[1]["iteration"]) >= args.train_iters:
        log0(f"fapool: {args.load}/{resume[0]} is already at iteration {resume[1]['iteration']}"
             f" >= --train-iters {args.train_iters}: nothing to do")
        return 0

    def train(groups, device) -> None:
        if args.load and resume is None:
            log0(f"== no checkpoint in {args.load}: starting from iteration 0 ==")
        train_base_rank(args, cfg, groups, device, resume=resume, log=log0)

    def serve_experts(groups, device) -> None:
        train_expert_rank(args, cfg, groups, device, resume=resume)

    return job.run(cfg, layout, train, expert_work=serve_experts if layout.num_expert else None,
                   timeout_s=60.0 * args.distributed_timeout_minutes)


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
