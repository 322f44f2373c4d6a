"""Foundation demo: config -> roles and groups -> Megatron GPTModel -> forward/backward.

    torchrun --nproc_per_node 4 launch/demo.py --deepspeed_config configs/tiny_dense_pool.json

Loads the DeepSpeed JSON and its model YAML, computes and prints the rank layout,
creates every process group, builds Megatron's ``GPTModel`` with the fapool layer
spec on the base ranks, runs one forward and backward on random tokens and prints
the loss. Pool and expert ranks hold no weights here.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_fapool.config import load_run_config  # noqa: E402
from megatron_fapool.parallel import initialize_parallel_groups, layout_from_config  # noqa: E402
from megatron_fapool.runtime import exit_on_user_error, init_distributed, log0, world_from_env  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deepspeed_config", "--deepspeed-config", required=True, help="DeepSpeed JSON with a fapool section")
    p.add_argument("--seq-length", type=int, default=None, help="tokens per sample (default: the YAML's seq_length)")
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the launcher")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_run_config(args.deepspeed_config)
    _, world, _ = world_from_env()
    layout = layout_from_config(cfg, world)  # fails here, before any group exists
    lm = cfg.model.language_model
    seq = args.seq_length or lm.seq_length or lm.max_position_embeddings
    if seq > lm.max_position_embeddings:
        from megatron_fapool.config import ConfigError

        raise ConfigError("--seq-length", f"{seq} exceeds max_position_embeddings={lm.max_position_embeddings}")

    device = init_distributed()
    log0("== resolved config ==\n" + cfg.describe())
    log0("== layout ==\n" + layout.describe())
    t0 = time.perf_counter()
    groups = initialize_parallel_groups(layout)
    log0(f"== groups created in {time.perf_counter() - t0:.2f}s ==")

    if groups.is_base:
        from megatron.core import parallel_state

        from megatron_fapool.models.gpt import build_gpt_model

        torch.manual_seed(args.seed)
        model = build_gpt_model(cfg).to(device)
        gen = torch.Generator().manual_seed(args.seed + parallel_state.get_data_parallel_rank())
        tokens = torch.randint(0, lm.vocab_size, (args.micro_batch_size, seq + 1), generator=gen).to(device)
        ids, labels = tokens[:, :-1], tokens[:, 1:]
        pos = torch.arange(seq, device=device).unsqueeze(0).expand_as(ids)
        t0 = time.perf_counter()
        losses = model(ids, pos, None, labels=labels)  # [b, s] per-token loss (last stage)
        if parallel_state.is_pipeline_last_stage():
            loss = losses.float().mean()
            loss.backward()
            grad_sq = sum(float(p.grad.float().pow(2).sum()) for p in model.parameters() if p.grad is not None)
            n_params = sum(p.numel() for p in model.parameters())
            if parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0:
                print(
                    f"[rank {dist.get_rank()}] forward+backward  seq={seq} batch={args.micro_batch_size}"
                    f"  loss {loss.item():.6f}  local grad norm {grad_sq ** 0.5:.4f}"
                    f"  params on this rank {n_params:,}  {time.perf_counter() - t0:.2f}s",
                    flush=True,
                )
    else:
        role = groups.role
        print(f"[rank {dist.get_rank()}] {role.role} rank: holds no model weights", flush=True)
    dist.barrier()
    log0("demo done")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
