"""The training loop of a base rank: Megatron's model inside a DeepSpeed engine; and, with
MA separation, that of an expert rank.

Megatron owns the model (``GPTModel`` with the fapool layer spec, TP-sharded); DeepSpeed
owns everything in the JSON: optimizer, LR schedule, ZeRO 0-2, fp32/bf16, gradient
clipping, monitors, checkpoint files. Long micro-batches go through the attention pool
(the layer's core attention asks the resource manager), and the pool ranks serve them
through forward and backward; short ones stay on the base rank.

An MoE model (Megatron's ``MoELayer`` in every layer) trains colocated — every base rank
holds all experts — or with MA separation: the base ranks are the attention ranks (the
model's ``experts`` are :class:`~megatron_fapool.moe.remote.RemoteExperts`, no expert
weights), the expert ranks hold the experts in their own DeepSpeed engine
(:mod:`.experts`) and step with the attention ranks in every iteration, clipping by one
global gradient norm (:mod:`.global_norm`). Either way the router's aux and z losses
are scaled by ``1/gas`` like DeepSpeed's main loss and logged every iteration
(:mod:`.moe_losses`).

**Initial weights with MA separation.** They are those of the colocated model of the
same seed: every attention rank builds the colocated model first (Megatron's init, RNG
order included), keeps its non-expert weights for the MA model, and the first attention
rank broadcasts the expert weights over the dispatch group to the expert ranks, which
keep their own (:func:`.experts.send_expert_weights`); the RNG state after the colocated
build is restored, so dropout and data order continue as in the colocated run. (This
costs the colocated model's memory once at start-up on each attention rank; a resumed
run skips the broadcast, its weights come from the checkpoint.)
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..attention.pool import AttentionPool
from ..data import open_training_data
from ..models.gpt import (
    build_gpt_model, expert_transformer_config, moe_layers, pooled_attention_layers, tensor_parallel_partial_params,
)
from ..moe.pingpong import forward_in_parts
from ..moe.remote import ExpertClient, RemoteExperts
from ..moe.serve import ExpertServer, ExpertStack
from ..moe.wire import DispatchGeometry
from . import checkpoint as ckpt
from .arguments import check_batch_sizes
from .deepspeed_world import MegatronMPU, base_ranks_as_world
from .experts import SAVE, STEP, ExpertTrainer, receive_expert_weights, send_expert_weights
from .flops import step_flops
from .global_norm import install_global_grad_norm
from .iteration_log import IterationLog, IterationStats
from .ma_timing import StepTimePrediction
from .moe_losses import collect_aux_losses, set_aux_loss_scale

__all__ = ["TrainResult", "train_base_rank", "train_expert_rank"]


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


def _seed(args, device) -> None:
    from megatron.core import tensor_parallel

    torch.manual_seed(args.seed)
    if device.type == "cuda":
        tensor_parallel.model_parallel_cuda_manual_seed(args.seed)


def _rng_snapshot(device):
    from megatron.core import tensor_parallel

    snap = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        snap["cuda"] = torch.cuda.get_rng_state(device)
        snap["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return snap


def _rng_restore(snap, device) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(snap["cpu"])
    if "cuda" in snap:
        torch.cuda.set_rng_state(snap["cuda"], device)
        tensor_parallel.get_cuda_rng_tracker().set_states(snap["tracker"])


def _build_model(run_config, groups, args, device, *, send_experts: bool):
    """``(model, pool, client)``: the base rank's model; with MA separation its experts are remote
    (``client`` reaches them) and the expert ranks get the colocated model's experts (module doc)."""
    _seed(args, device)
    pool = None
    if groups.layout.has_pool:
        pool = AttentionPool.for_base_rank(
            groups, run_config.fapool.attention_pool, backend=run_config.fapool.attention_backend.backend,
            device=device
        )
    if not groups.layout.num_expert:
        return build_gpt_model(run_config, pool=pool).to(device), pool, None
    from megatron.core.transformer.spec_utils import ModuleSpec

    colocated = build_gpt_model(run_config, pool=pool)
    rng = _rng_snapshot(device)
    client = ExpertClient(groups, num_experts=run_config.model.language_model.num_moe_experts)
    model = build_gpt_model(run_config, pool=pool, experts=ModuleSpec(RemoteExperts, params={"client": client}))
    _rng_restore(rng, device)
    full = colocated.state_dict()
    mine = model.state_dict()
    expert_keys = {k for k in full if ".mlp.experts." in k}
    odd = (set(mine) - set(full)) | (set(full) - expert_keys - set(mine))
    if odd or any(".mlp.experts." in k for k in mine):
        raise RuntimeError(f"the MA model and the colocated model differ beyond their experts: {sorted(odd)[:4]}")
    model.load_state_dict({k: full[k] for k in mine}, strict=True)
    if send_experts:
        send_expert_weights(colocated, groups, client.geometry, device)
    del colocated, full
    return model.to(device), pool, client


def _sum_partial_grads_over_tp(model) -> None:
    """Sequence-parallel (MoE at TP > 1) and q/k-layernorm parameters: each TP rank's gradient is its
    share; a hook sums every incoming gradient over TP (Megatron's ``finalize_model_grads`` does it
    once per step; per backward is the same sum, and it suits ZeRO 2, which takes the gradients away
    during the backward)."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return

    def summed(g):
        g = g.clone()
        dist.all_reduce(g, group=group)
        return g

    for _, p in tensor_parallel_partial_params(model):
        p.register_hook(summed)


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

    model, pool, client = _build_model(run_config, groups, args, device, send_experts=resume is None)
    _sum_partial_grads_over_tp(model)
    num_moe_layers = len(moe_layers(model))
    # a micro-batch's pooled calls are announced once; not with MA's ping-pong, whose parts' backward calls come
    # in the autograd engine's order
    ping_pong = client is not None and run_config.fapool.ma_separation.micro_batches > 1
    pool_calls = 0 if ping_pong else pooled_attention_layers(model)
    if client is not None:
        n_expert_params = sum(p.numel() for layer in moe_layers(model) for p in layer.experts.parameters())
        log(f"== MA separation: attention ranks hold {n_expert_params} expert parameters; experts"
            f" {lm.num_moe_experts} on expert ranks {list(client.geometry.expert_ranks)} ==")
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
        if client is not None:  # one gradient norm over attention and expert parameters
            install_global_grad_norm(engine, group=groups.dispatch,
                                     contributes=dist.get_rank() == client.geometry.attention_ranks[0])
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
        timing = StepTimePrediction(run_config, layout, micro=micro, gas=gas) if client is not None else None
        if timing is not None:
            log(timing.startup(seq_length))
        for iteration in range(start + 1, args.train_iters + 1):
            stats = _train_step(engine, data, pool, client, run_config, device, iteration, gas,
                                moe=num_moe_layers > 0, pool_calls=pool_calls)
            _reduce_over_replicas(stats, dp_group, device)
            if timing is not None:
                timing.record(stats.max_len, stats.elapsed_s)
            if num_moe_layers:
                losses = collect_aux_losses(num_moe_layers=num_moe_layers, gas=gas, dp_group=dp_group)
                stats.load_balancing_loss = losses.get("load_balancing_loss")
                stats.z_loss = losses.get("z_loss")
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
                    group=groups.base if client is None else groups.dispatch,
                    announce=None if client is None else (
                        lambda it=iteration: client.send_header(device, op=SAVE, call_id=it)),
                    manifest=None if client is None else ckpt.expert_manifest(layout, lm.num_moe_experts),
                )
                result.checkpoints.append(path)
                log(f" saved checkpoint {path} ({time.perf_counter() - t0:.1f}s)")
        log(logger.summary(start_iteration=start, checkpoints=result.checkpoints))
        if timing is not None:
            log(timing.summary())
        if pool is not None and pool.shared:  # every rank holds the same counters: the manager's
            log(f"shared pool counters: {json.dumps(pool.manager.shared.counters(), sort_keys=True)}")
    if pool is not None:
        pool.shutdown(device)
    if client is not None:
        client.shutdown(device)
    return result


def train_expert_rank(args, run_config, groups, device, *, resume: tuple[str, dict] | None) -> None:
    """An expert rank's part of training (MA separation): its experts in their own DeepSpeed engine,
    served to the attention ranks until they shut it down; prints what it did."""
    layout = groups.layout
    lm = run_config.model.language_model
    micro, gas = check_batch_sizes(run_config.deepspeed, layout.dp, run_config.json_path)
    torch.manual_seed(args.seed)
    stack = ExpertStack.for_rank(groups, expert_transformer_config(run_config), num_layers=lm.num_layers,
                                 num_experts=lm.num_moe_experts).to(device)
    with ExpertTrainer.world(groups):
        geometry = DispatchGeometry.of_stage(layout, groups.role.pp, lm.num_moe_experts)
        if resume is None:
            receive_expert_weights(stack, groups, geometry, device)
        trainer = ExpertTrainer(stack, run_config.deepspeed, groups, device, micro=micro, gas=gas,
                                attention_dp=layout.dp, save_dir=args.save)
        if resume is not None:
            trainer.load(args.load, resume[0])
        server = ExpertServer(groups, stack, device=device, num_experts=lm.num_moe_experts,
                              handlers=(trainer.handlers(),), backward=trainer.backward)
        stats = server.serve()
    ids = stack.global_ids
    print(
        f"[rank {dist.get_rank()}] expert rank {groups.role.expert_index} (experts {ids.start}-{ids.stop - 1}):"
        f" served {stats.forward_calls} forward / {stats.backward_calls} backward calls,"
        f" {int(stats.tokens_forward.sum())} token rows, {trainer.stats.steps} steps to iteration {trainer.iteration}"
        f" (lr {trainer.learning_rate():.6E}), {trainer.stats.checkpoints} checkpoints saved",
        flush=True,
    )


def _train_step(engine, data, pool, client, run_config, device, iteration: int, gas: int, *,
                moe: bool, pool_calls: int = 0) -> IterationStats:
    stats = IterationStats(iteration=iteration)
    # MA separation's ping-pong: the micro-batch's parts take turns, attention of one overlapping experts of another
    parts = run_config.fapool.ma_separation.micro_batches if client is not None else 1
    before = pool.stats.as_dict() if pool is not None else None
    lengths = []
    t0 = time.perf_counter()
    batches = [data.batch((iteration - 1) * gas + m) for m in range(gas)]
    if pool is not None:  # a shared pool: every rank agrees on the step's blocks from its longest micro-batch
        pool.begin_step(max(batch.tokens.shape[1] for batch in batches))
    for m, batch in enumerate(batches):
        tokens = batch.tokens.to(device, non_blocking=True)
        labels = batch.labels.to(device, non_blocking=True)
        b, n = tokens.shape
        position_ids = torch.arange(n, device=device).unsqueeze(0).expand(b, n)
        if pool is not None:
            pool.manager.new_step()
        with pool.forward_pass(pool_calls) if pool is not None else nullcontext():
            per_token = forward_in_parts(lambda t, p, y: engine(t, p, None, labels=y), tokens, position_ids, labels,
                                         parts=parts, device=device)
        loss = _masked_mean(per_token, batch.loss_mask)
        if moe:  # the router's aux / z losses weigh as the main loss, which DeepSpeed divides by gas
            set_aux_loss_scale(1.0 / gas, device)
        engine.backward(loss)
        if client is not None and m == gas - 1:  # the expert ranks step with this boundary step
            client.send_header(device, op=STEP, call_id=iteration)
        engine.step()
        stats.loss_sum += _reported_loss(per_token, batch.loss_mask)
        stats.loss_count += 1
        stats.tokens += float(batch.loss_mask.sum())
        stats.flops += step_flops(run_config, b, n)
        stats.micro_batches += 1
        if pool is not None and pool.manager.current > 0:
            stats.pooled_micro_batches += 1
        lengths.append(n)
    if pool is not None:
        pool.end_step()
        if pool.shared:
            stats.pool_demands, stats.pool_blocks = pool.manager.demands, pool.manager.assignment
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
    if stats.load_balancing_loss is not None:
        events.append(("Train/load_balancing_loss", stats.load_balancing_loss, step))
    if stats.z_loss is not None:
        events.append(("Train/z_loss", stats.z_loss, step))
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
