"""The training loop of a base rank: Megatron's model inside a DeepSpeed engine.

Megatron owns the model (``GPTModel`` with the fapool layer spec, TP-sharded); DeepSpeed
owns everything in the JSON: optimizer, LR schedule, ZeRO 0-2, fp32/bf16, gradient
clipping, monitors, checkpoint files. Long micro-batches go through the attention pool
(the layer's core attention asks the resource manager), and the pool ranks serve them
through forward and backward; short ones stay on the base rank.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..attention.pool import AttentionPool
from ..data import open_training_data
from ..models.gpt import build_gpt_model
from . import checkpoint as ckpt
from .arguments import check_batch_sizes
from .deepspeed_world import MegatronMPU, base_ranks_as_world
from .flops import step_flops
from .iteration_log import IterationLog, IterationStats

__all__ = ["TrainResult", "train_base_rank"]


@dataclass
class TrainResult:
    start_iteration: int
    last_iteration: int
    losses: list[float] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)


def _masked_mean(per_token_loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(per_token_loss.device, torch.float32)
    return (per_token_loss.float() * mask).sum() / mask.sum().clamp(min=1.0)


def _reported_loss(per_token_loss: torch.Tensor, mask: torch.Tensor) -> float:
    """The logged loss: summed in float64, rounded to float32.

    A float32 sum's last bit depends on how the vectorised reduction meets the
    buffer's memory alignment, which differs between processes; this value does not,
    so a resumed run logs exactly the losses of an uninterrupted one.
    """
    mask = mask.to(per_token_loss.device, torch.float64)
    mean = (per_token_loss.detach().double() * mask).sum() / mask.sum().clamp(min=1.0)
    return float(mean.float())


def _build_model(run_config, groups, args, device):
    from megatron.core import tensor_parallel

    torch.manual_seed(args.seed)
    if device.type == "cuda":
        tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    pool = None
    if groups.layout.pool_per_base:
        pool = AttentionPool.for_base_rank(
            groups, run_config.fapool.attention_pool, backend=run_config.fapool.attention_backend.backend
        )
    model = build_gpt_model(run_config, pool=pool).to(device)
    return model, pool


def train_base_rank(args, run_config, groups, device, *, resume: tuple[str, dict] | None, log) -> TrainResult:
    """Train on this base rank until ``args.train_iters``; ``log`` prints on the reporting rank."""
    import deepspeed
    from megatron.core import parallel_state as ps

    layout = groups.layout
    lm = run_config.model.language_model
    mpu = MegatronMPU()
    dp_size, dp_rank = mpu.get_data_parallel_world_size(), mpu.get_data_parallel_rank()
    micro, gas = check_batch_sizes(run_config.deepspeed, dp_size, run_config.json_path)
    seq_length = args.seq_length or lm.seq_length
    reporter = dist.get_rank() == 0

    model, pool = _build_model(run_config, groups, args, device)
    data = open_training_data(
        args.data_path, mode=args.data_mode, seq_length=seq_length, seed=args.seed,
        micro_batch_size=micro, dp_rank=dp_rank, dp_size=dp_size, vocab_size=lm.vocab_size,
        num_micro_batches=args.train_iters * gas,
    )
    log("== data ==\n" + data.describe())

    with base_ranks_as_world(groups.base, layout.num_base):
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=run_config.deepspeed, mpu=mpu,
        )
        start = 0
        if resume is not None:
            tag, meta = resume
            state = ckpt.load_checkpoint(engine, args.load, tag)
            start = int(state["iteration"])
            if pool is not None and "pool_manager" in state:
                pool.manager.load_state_dict(state["pool_manager"])
            ckpt.set_rng_state(state.get("rng", {}))
            log(f"== resumed from {args.load}/{tag} at iteration {start} ==")

        result = TrainResult(start_iteration=start, last_iteration=start)
        logger = IterationLog(
            train_iters=args.train_iters, global_batch_size=micro * gas * dp_size, num_gpus=layout.world_size,
            log_interval=args.log_interval, pool_enabled=pool is not None,
            metrics_path=args.metrics_file if reporter else None,
        )
        dp_group = ps.get_data_parallel_group()
        for iteration in range(start + 1, args.train_iters + 1):
            stats = _train_step(engine, data, pool, run_config, device, iteration, gas)
            _reduce_over_replicas(stats, dp_group, device)
            result.losses.append(stats.loss)
            result.last_iteration = iteration
            _write_monitor_events(engine, stats, layout.world_size)
            line = logger.record(stats)
            if line is not None:
                log(line)
            last = iteration == args.train_iters
            if args.save and ((args.save_interval and iteration % args.save_interval == 0) or last):
                t0 = time.perf_counter()
                path = ckpt.save_checkpoint(
                    engine, args.save, iteration,
                    metadata=ckpt.checkpoint_metadata(
                        run_config, iteration=iteration, consumed_samples=iteration * micro * gas * dp_size,
                        data_parallel_size=dp_size,
                    ),
                    client_state={
                        "iteration": iteration,
                        "pool_manager": pool.manager.state_dict() if pool is not None else None,
                        "rng": ckpt.rng_state(),
                    },
                    group=groups.base,
                )
                result.checkpoints.append(path)
                log(f" saved checkpoint {path} ({time.perf_counter() - t0:.1f}s)")
        log(logger.summary(start_iteration=start, checkpoints=result.checkpoints))
    if pool is not None:
        pool.shutdown(device)
    return result


def _train_step(engine, data, pool, run_config, device, iteration: int, gas: int) -> IterationStats:
    stats = IterationStats(iteration=iteration)
    before = pool.stats.as_dict() if pool is not None else None
    lengths = []
    t0 = time.perf_counter()
    for m in range(gas):
        batch = data.batch((iteration - 1) * gas + m)
        tokens = batch.tokens.to(device, non_blocking=True)
        labels = batch.labels.to(device, non_blocking=True)
        b, n = tokens.shape
        position_ids = torch.arange(n, device=device).unsqueeze(0).expand(b, n)
        if pool is not None:
            pool.manager.new_step()
        per_token = engine(tokens, position_ids, None, labels=labels)
        loss = _masked_mean(per_token, batch.loss_mask)
        engine.backward(loss)
        engine.step()
        stats.loss_sum += _reported_loss(per_token, batch.loss_mask)
        stats.loss_count += 1
        stats.tokens += float(batch.loss_mask.sum())
        stats.flops += step_flops(run_config, b, n)
        stats.micro_batches += 1
        if pool is not None and pool.manager.current > 0:
            stats.pooled_micro_batches += 1
        lengths.append(n)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stats.elapsed_s = time.perf_counter() - t0
    stats.learning_rate = float(engine.get_lr()[0])
    norm = engine.get_global_grad_norm()
    stats.grad_norm = float(norm) if norm is not None else None
    stats.min_len, stats.max_len = min(lengths), max(lengths)
    if pool is not None:
        after = pool.stats.as_dict()
        for k in ("activations", "releases", "resizes", "pooled_forward", "local_calls"):
            setattr(stats, k, float(after[k] - before[k]))
    return stats


def _write_monitor_events(engine, stats: IterationStats, num_gpus: int) -> None:
    """The iteration's numbers to the monitors of the JSON (tensorboard, csv_monitor, wandb, ...)."""
    monitor = getattr(engine, "monitor", None)
    if monitor is None or not monitor.enabled or dist.get_rank() != 0:
        return
    step = stats.iteration
    events = [
        ("Train/lm_loss", stats.loss, step),
        ("Train/tokens_per_s", stats.tokens / stats.elapsed_s, step),
        ("Train/tflops_per_gpu", stats.flops / stats.elapsed_s / num_gpus / 1e12, step),
        ("Train/pooled_micro_batches", stats.pooled_micro_batches, step),
        ("Train/pool_activations", stats.activations, step),
    ]
    monitor.write_events(events)


def _reduce_over_replicas(stats: IterationStats, dp_group, device) -> None:
    """Sum the per-replica numbers over the data-parallel group (loss, tokens, FLOPs, pool calls)."""
    if dist.get_world_size(dp_group) == 1:
        return
    vec = torch.tensor(stats.reduced_vector(), dtype=torch.float64, device=device)
    dist.all_reduce(vec, group=dp_group)
    stats.set_reduced(vec.tolist())
    ext = torch.tensor([-stats.min_len, stats.max_len, stats.elapsed_s], dtype=torch.float64, device=device)
    dist.all_reduce(ext, op=dist.ReduceOp.MAX, group=dp_group)
    stats.min_len, stats.max_len, stats.elapsed_s = int(-ext[0]), int(ext[1]), float(ext[2])
