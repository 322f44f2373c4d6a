"""launch/train.py checkpoints (DeepSpeed's files of Megatron's model) to and from the distributed form.

Both directions run in a world of their own (:func:`~megatron_fapool.runtime.spawn.spawn_world`,
gloo on CPU, no GPU needed): the *source* world has the checkpoint's TP x DP base ranks,
the *target* world those of the new DeepSpeed JSON. Pool ranks are not needed (core
attention has no weights). DeepSpeed's state is read and written through DeepSpeed:

* **read** (:func:`ours_to_dist`): each rank builds the model at the source TP and the
  engine from the checkpoint's own DeepSpeed config, ``engine.load_checkpoint`` (through
  :func:`~megatron_fapool.training.checkpoint.load_checkpoint`), then per parameter
  ``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state`` (TP-local, gathered
  over DP by DeepSpeed; at ZeRO 0 in fp32 the parameter is its own master and the torch
  optimizer's state is read directly). Megatron's ``sharded_state_dict`` places every
  rank's TP shard in the global tensors of the distributed checkpoint; the optimizer
  tensors get the same sharding (:func:`.dist.sharded_state`). Adam's step, the LR
  scheduler, DeepSpeed's counters and our client state go to the card.
  Weights alone need no engine: TP ranks read ``mp_rank_XX_model_states.pt['module']``
  as launch/infer.py does (MA-separation checkpoints too: their experts join the
  colocated model under their global ids).
* **write** (:func:`dist_to_ours`): each rank builds the model and the engine of the new
  JSON at its TP and DP, loads its part of every tensor from the distributed checkpoint
  (Megatron reshards), sets the module's weights, ``safe_set_full_fp32_param`` and
  ``safe_set_full_optimizer_state``, Adam's step, the optimizer's hyperparameters (the LR
  of the next step), the scheduler and the counters, and saves with
  :func:`~megatron_fapool.training.checkpoint.save_checkpoint` (the marker rewritten for
  the new TP / DP / JSON), so ``launch/train.py --load`` resumes it and
  ``launch/infer.py --load`` serves it unchanged.

A fresh engine has no Adam moments until its first step; the write gives the torch
optimizer its state tensors (zeros, then the checkpoint's values through
``safe_set_full_optimizer_state``) and links DeepSpeed's fragments to them as its first
step would. Optimizers other than torch's Adam / AdamW are refused.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..config import ConfigError, RunConfig, load_run_config
from ..inference.weights import load_attention_weights
from ..models.gpt import build_gpt_model
from ..runtime.spawn import spawn_world
from ..training import checkpoint as ckpt
from ..training.arguments import check_batch_sizes
from ..training.deepspeed_world import MegatronMPU, base_ranks_as_world
from . import dist as dio
from .canonical import ModelCard, TrainingState, card_of_run_config, resolved_model, run_config_for
from .ours import OurCheckpoint

__all__ = ["check_target", "dist_to_ours", "ours_to_dist", "reshard"]

_MONITORS = ("tensorboard", "csv_monitor", "wandb", "comet", "flops_profiler")
_ADAM_STATE = ("exp_avg", "exp_avg_sq")
DEFAULT_TIMEOUT_S = 900.0
#: The conversion worlds run on CPU processes (gloo) on any machine: they need the model, its masters and
#: moments in memory once, not GPUs; DeepSpeed then picks its CPU accelerator.
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}


# ---- what the source is --------------------------------------------------------------------------

def _source_ds_config(tag_dir: str) -> dict:
    """The DeepSpeed config the checkpoint was trained with (DeepSpeed records it in every model file)."""
    path = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: name it
        raise ConfigError("--load", f"{path} ({os.path.getsize(path) if os.path.exists(path) else 0} bytes)"
                                    f" cannot be read: {type(e).__name__}: {e}") from None
    ds = state.get("ds_config")
    if not isinstance(ds, dict):
        raise ConfigError("--load", f"{path} records no DeepSpeed config (ds_config): not written by launch/train.py")
    return dict(ds)


def _for_conversion(ds: dict) -> dict:
    """A DeepSpeed config for the converter's engine: the same optimisation, no monitors writing files."""
    return {k: v for k, v in ds.items() if k not in _MONITORS and k != "fapool"}


def _zero_stage(ds: dict) -> int:
    return int((ds.get("zero_optimization") or {}).get("stage", 0))


def _pool_per_base(run_config: RunConfig, num_base: int) -> int:
    pool = run_config.fapool.attention_pool
    return pool.pool_size // num_base if pool.enabled and num_base else 0


def _source_pool_per_base(meta: dict, num_base: int) -> int | None:
    path = meta.get("config")
    if not path or not os.path.isfile(path):
        return None
    try:
        return _pool_per_base(load_run_config(path), num_base)
    except ConfigError:
        return None


# ---- a rank of either world ----------------------------------------------------------------------

def _init_megatron(tp: int) -> None:
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tp, 1, create_gloo_process_groups=False)


def _check_optimizer(ds: dict, where: str) -> None:
    """The state the converter carries is that of torch's Adam / AdamW (``"torch_adam": true``)."""
    opt = ds.get("optimizer") or {}
    kind = str(opt.get("type", "")).lower()
    if kind not in ("adam", "adamw") or not (opt.get("params") or {}).get("torch_adam", False):
        raise ConfigError("optimizer", f"{where}: {opt.get('type')!r} without \"torch_adam\": true; the converter"
                                       " carries the state of torch's Adam / AdamW only (set optimizer.type Adam or"
                                       " AdamW with params.torch_adam true)")


def _engine(model, ds: dict, *, adam_state: bool):
    """DeepSpeed's engine over ``model`` (inside :func:`base_ranks_as_world`); ``adam_state``: its Adam
    state will be read or written (:func:`_check_optimizer` said so in the parent already)."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                           config=ds, mpu=MegatronMPU())
    if adam_state and type(engine.basic_optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        raise RuntimeError(f"DeepSpeed built {type(engine.basic_optimizer).__name__}, not torch's Adam / AdamW")
    return engine


def _adam_step(engine) -> int | None:
    steps = {float(s["step"]) for s in engine.basic_optimizer.state.values() if "step" in s}
    if len(steps) > 1:
        raise RuntimeError(f"the optimizer's parameters are at different steps {sorted(steps)}")
    return int(steps.pop()) if steps else None


def _param_groups(engine) -> list[dict]:
    """The optimizer's hyperparameters per group (JSON: lists for tuples)."""
    out = []
    for g in engine.basic_optimizer.param_groups:
        out.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()
                    if k != "params" and isinstance(v, (int, float, bool, str, tuple, list, type(None)))})
    return out


def _full_state(engine, p, kind: str) -> torch.Tensor:
    """This TP rank's full fp32 master (``fp32_param``) or Adam moment of parameter ``p``."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    value = safe_get_full_fp32_param(p) if kind == "fp32_param" else safe_get_full_optimizer_state(p, kind)
    if value is None:  # no ZeRO / bf16 wrapper: the parameter is its own master, torch holds its state
        value = p.detach() if kind == "fp32_param" else engine.basic_optimizer.state[p][kind]
    return value.detach().to(torch.float32).clone()


def _init_adam_state(engine, step: int) -> None:
    """Give the torch optimizer the state its first step would create (the checkpoint's values follow
    through ``safe_set_full_optimizer_state``) and link DeepSpeed's fragments to it, as that step would."""
    base = engine.basic_optimizer
    for group in base.param_groups:
        for p in group["params"]:
            base.state[p] = {"step": torch.tensor(float(step), dtype=torch.float32),
                             "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                             "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
    _link_optimizer_state(engine)


def _link_optimizer_state(engine) -> None:
    """Point DeepSpeed's per-parameter fragments at the torch optimizer's state, as its next step would
    (ZeRO 1/2 and the bf16 optimizer link them lazily; ``safe_*_optimizer_state`` needs them). Without
    a ZeRO / bf16 wrapper there is nothing to link."""
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()
    elif any(hasattr(p, "_hp_mapping") for g in engine.basic_optimizer.param_groups for p in g["params"]):
        raise RuntimeError(f"{type(engine.optimizer).__name__} has no _lazy_init_hp_params_optimizer_state:"
                           " this DeepSpeed is not the 0.19 the converter was written for")


def _set_full_state(engine, p, kind: str, value: torch.Tensor) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if hasattr(p, "_hp_mapping"):
        if kind == "fp32_param":
            safe_set_full_fp32_param(p, value)
        else:
            safe_set_full_optimizer_state(p, value, kind)
    elif kind == "fp32_param":
        with torch.no_grad():
            p.copy_(value.to(p.dtype))
    else:
        engine.basic_optimizer.state[p][kind].copy_(value)


def _source_rank(rank: int, world: int, job: dict) -> dict:
    """A rank of the source world: read the checkpoint at its TP, write its part of the dist checkpoint."""
    _init_megatron(job["tp"])
    device = torch.device("cpu")
    card = ModelCard.from_dict(job["card"])
    run_config = run_config_for(card, tensor_model_parallel_size=job["tp"], deepspeed=job["ds"])
    model = build_gpt_model(run_config, perform_initialization=False)  # the checkpoint fills every weight
    from megatron.core import parallel_state as ps

    training, param_groups, rng, optim = None, None, None, None
    meta = job["meta"]
    if job["optimizer"]:
        with base_ranks_as_world(dist.group.WORLD, world):
            engine = _engine(model, job["ds"], adam_state=True)
            state = ckpt.load_checkpoint(engine, job["src_dir"], job["tag"])
            _link_optimizer_state(engine)
            optim = {name: {kind: _full_state(engine, p, kind) for kind in dio.OPTIMIZER_KEYS}
                     for name, p in model.named_parameters()}
            sched = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None
            training = TrainingState(
                iteration=int(state.get("iteration", meta["iteration"])),
                consumed_samples=int(meta.get("consumed_samples", 0)),
                global_steps=int(engine.global_steps), global_samples=int(engine.global_samples),
                skipped_steps=int(engine.skipped_steps), adam_step=_adam_step(engine), lr_scheduler=sched,
                pool_manager=state.get("pool_manager"), data_parallel_size=ps.get_data_parallel_world_size(),
            )
            param_groups = _param_groups(engine)
            rng = [(state.get("rng") or {}).get("torch")]
            dist.broadcast_object_list(rng, src=0)  # the common state is rank 0's, and must agree on all ranks
            rng = rng[0]
    else:
        load_attention_weights(model, job["src_dir"], job["tag"], meta, device,
                               tp_rank=ps.get_tensor_model_parallel_rank(), experts_remote=False)
        training = TrainingState(iteration=int(meta["iteration"]), consumed_samples=int(meta.get("consumed_samples", 0)),
                                 global_steps=int(meta["iteration"]), global_samples=int(meta.get("consumed_samples", 0)),
                                 data_parallel_size=int(meta.get("data_parallel_size", 1)))
    sd = dio.sharded_state(model, optim)
    path = dio.save_sharded(sd, job["out_dir"], training.iteration, card, training, optimizer=job["optimizer"],
                            param_groups=param_groups, source=job["source"], rng=rng)
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values() if torch.is_tensor(t))
    nbytes += sum(t.numel() * t.element_size() for ts in (optim or {}).values() for t in ts.values())
    return {"path": path, "bytes": nbytes, "tensors": len(sd)}


def ours_to_dist(source: OurCheckpoint, out_dir: str, *, optimizer: bool, progress,
                 timeout: float = DEFAULT_TIMEOUT_S) -> str:
    """The launch/train.py checkpoint ``source`` (:func:`.ours.open_ours`) as the distributed checkpoint
    ``out_dir`` (absent or empty); with ``optimizer`` also the fp32 masters, Adam's moments and step, the
    optimizer's hyperparameters, the LR schedule, the counters and the client state. Returns the
    iteration directory."""
    src_dir, tag, meta, card = source.root, source.tag, source.meta, source.card
    tag_dir = source.path
    tp, dp = source.tp, source.dp
    if source.pp != 1:
        raise ConfigError("--load", f"{tag_dir} has pipeline_model_parallel_size {source.pp}: only PP 1 converts")
    if optimizer and source.ma_separation:
        raise ConfigError("--optimizer", f"{tag_dir} was trained with MA separation: its experts' optimizer"
                                         " state lives in the expert ranks' own engines, which the converter does"
                                         " not carry; convert the weights alone (without --optimizer)")
    ds = _for_conversion(_source_ds_config(tag_dir))
    if optimizer:
        _check_optimizer(ds, f"{tag_dir} (its ds_config)")
        if _zero_stage(ds) > 0 and not source.optimizer_files():
            raise ConfigError("--load", f"{tag_dir} has no *_optim_states.pt files: convert the weights alone")
    world = tp * dp if optimizer else tp
    info = {"kind": "deepspeed", "path": os.path.abspath(src_dir), "tag": tag, "tp": tp, "dp": dp,
            "zero_stage": _zero_stage(ds), "pool_per_base": _source_pool_per_base(meta, tp * dp),
            "ma_separation": source.ma_separation}
    job = {"tp": tp, "card": card.to_dict(), "ds": ds, "meta": meta, "optimizer": bool(optimizer),
           "src_dir": src_dir, "tag": tag, "out_dir": out_dir, "source": info}
    what = "weights, fp32 masters, Adam state" if optimizer else "weights"
    with progress.phase(f"reading {tag_dir} ({what}) on {world} rank(s) and writing {out_dir}"):
        results = spawn_world(_source_rank, world, job, timeout=timeout, daemon=False, env=CPU_ONLY)
        for r in results[:tp]:  # the TP ranks of the first replica: every byte once
            progress.add(r["bytes"], tensors=r["tensors"])
    return results[0]["path"]


# ---- dist -> ours --------------------------------------------------------------------------------

def check_target(card: ModelCard, run_config: RunConfig, *, data_parallel_size: int | None = None,
                 default_dp: int = 1) -> int:
    """Everything :func:`dist_to_ours` checks before it starts a process: ``run_config`` trains ``card``'s
    model (shape, PP 1, colocated, ZeRO 0-2, its dtype) at a TP that divides it, with batch sizes that fit
    the data-parallel size; returns that size (``data_parallel_size`` if given, else the JSON's
    ``train_batch_size`` / (micro x accumulation), else ``default_dp``). ConfigError otherwise."""
    _check_model(card, run_config)
    tp = run_config.tensor_model_parallel_size
    dp = _data_parallel_size(run_config, default_dp, data_parallel_size)
    check_batch_sizes(run_config.deepspeed, dp, run_config.json_path)
    lm = run_config.model.language_model
    if lm.vocab_size % tp or lm.query_groups % tp:
        raise ConfigError("tensor_model_parallel_size", f"{tp} does not divide vocab_size {lm.vocab_size} and"
                                                        f" num_query_groups {lm.query_groups}", source=run_config.json_path)
    return dp


def _check_model(card: ModelCard, run_config: RunConfig) -> None:
    have, want = resolved_model(card.lm()), resolved_model(run_config.model.language_model)
    diffs = [f"{k}={have.get(k)!r} (target: {want.get(k)!r})" for k in sorted(set(have) | set(want))
             if have.get(k) != want.get(k)]
    if diffs:
        raise ConfigError("--deepspeed_config", f"{run_config.json_path}'s model is not the checkpoint's:"
                                                f" {', '.join(diffs[:4])}; use the model YAML it was trained with")
    if run_config.pipeline_model_parallel_size != 1:
        raise ConfigError("pipeline_model_parallel_size", "launch/train.py checkpoints are PP 1",
                          source=run_config.json_path)
    if run_config.fapool.ma_separation.enabled:
        raise ConfigError("fapool.ma_separation.enabled", "the converter writes colocated checkpoints only;"
                                                          " use a JSON without MA separation", source=run_config.json_path)
    stage = _zero_stage(run_config.deepspeed)
    if stage not in (0, 1, 2):
        raise ConfigError("zero_optimization.stage", f"{stage}: launch/train.py trains ZeRO 0-2",
                          source=run_config.json_path)
    if card.dtype != card_of_run_config(run_config).dtype:
        raise ConfigError("bf16.enabled", f"the checkpoint's weights are {card.dtype}, {run_config.json_path}"
                                          f" trains in {run_config.precision}: use the precision it was trained with",
                          source=run_config.json_path)


def _data_parallel_size(run_config: RunConfig, default: int, given: int | None) -> int:
    if given is not None:
        if given < 1:
            raise ConfigError("--data-parallel-size", f"must be >= 1, got {given}")
        return given
    total = run_config.deepspeed.get("train_batch_size")
    micro = run_config.deepspeed.get("train_micro_batch_size_per_gpu")
    gas = run_config.deepspeed.get("gradient_accumulation_steps")
    if total and micro and gas:
        return max(1, total // (micro * gas))
    return default


def _target_rank(rank: int, world: int, job: dict) -> str:
    """A rank of the target world: build model + engine at the new layout, fill them from the dist
    checkpoint, save them as launch/train.py does."""
    run_config: RunConfig = job["run_config"]
    _init_megatron(run_config.tensor_model_parallel_size)
    info, training = job["info"], (TrainingState.from_dict(job["training"]) if job["training"] else None)
    model = build_gpt_model(run_config, perform_initialization=False)  # the dist checkpoint fills every weight
    carry = job["carry"]
    masters = job["masters"]
    kinds = (("fp32_param",) if masters else ()) + (_ADAM_STATE if carry else ())
    buffers = {name: {k: torch.empty(p.shape, dtype=torch.float32) for k in kinds}
               for name, p in model.named_parameters()}
    sd = dio.sharded_state(model, buffers)
    loaded = dio.load_sharded(sd, job["iter_dir"])
    model_keys = [k for k in sd if not k.startswith(dio.OPTIMIZER_PREFIX + ".")]
    model.load_state_dict({k: loaded[k] for k in model_keys}, strict=True)
    with base_ranks_as_world(dist.group.WORLD, world):
        engine = _engine(model, _for_conversion(run_config.deepspeed), adam_state=carry)
        params = dict(model.named_parameters())
        if masters:
            for name, p in params.items():
                _set_full_state(engine, p, "fp32_param", loaded[dio.optimizer_key("fp32_param", name)])
        if carry:
            _init_adam_state(engine, training.adam_step or 0)
            for name, p in params.items():
                for kind in _ADAM_STATE:
                    _set_full_state(engine, p, kind, loaded[dio.optimizer_key(kind, name)])
            for group, saved in zip(engine.basic_optimizer.param_groups, info.get("optimizer_param_groups") or []):
                for k, v in saved.items():
                    if k in group and k != "params":
                        group[k] = tuple(v) if isinstance(group[k], tuple) else v
        iteration = 0
        if training is not None:
            iteration = training.iteration
            if engine.lr_scheduler is not None and training.lr_scheduler is not None:
                engine.lr_scheduler.load_state_dict(training.lr_scheduler)
                if not carry:  # a fresh optimizer: the scheduler's LR for the next step, as after its last step
                    for group, lr in zip(engine.basic_optimizer.param_groups, engine.lr_scheduler.get_lr()):
                        group["lr"] = lr
            engine.global_steps = training.global_steps
            engine.global_samples = training.global_samples
            engine.skipped_steps = training.skipped_steps
        rng = dio.load_rng(job["iter_dir"])
        client_state = {"iteration": iteration, "pool_manager": job["pool_manager"],
                        "rng": {"torch": rng if rng is not None else torch.get_rng_state()}}
        metadata = ckpt.checkpoint_metadata(
            run_config, iteration=iteration,
            consumed_samples=training.consumed_samples if training is not None else 0, data_parallel_size=job["dp"])
        return ckpt.save_checkpoint(engine, job["out_dir"], iteration, metadata=metadata,
                                    client_state=client_state, group=dist.group.WORLD)


def dist_to_ours(dist_dir: str, run_config: RunConfig, out_dir: str, *, optimizer: str = "carry", progress,
                 data_parallel_size: int | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> str:
    """The distributed checkpoint ``dist_dir`` as a launch/train.py checkpoint in ``out_dir`` for
    ``run_config`` (its TP, ZeRO stage, precision; ``data_parallel_size`` base replicas, by default
    the JSON's train_batch_size / (micro batch x accumulation), else the checkpoint's). Returns the tag dir.

    ``optimizer="carry"`` restores the fp32 masters, Adam's moments and step, the optimizer's
    hyperparameters, the LR schedule and the counters (all that the checkpoint has);
    ``"reset"`` keeps the weights (masters included), the iteration and the LR schedule but starts
    Adam afresh (no moments, step 0). A checkpoint without training state (weights alone) starts at
    iteration 0.
    """
    if optimizer not in ("carry", "reset"):
        raise ConfigError("--optimizer", f"{optimizer!r}: use 'carry' or 'reset'")
    iter_dir = dio.resolve_dist_dir(dist_dir)
    card, training, info = dio.read_card(iter_dir)
    dp = check_target(card, run_config, data_parallel_size=data_parallel_size,
                      default_dp=training.data_parallel_size if training is not None else 1)
    tp = run_config.tensor_model_parallel_size
    has_optim = bool(info.get("optimizer")) and training is not None
    if training is not None and not has_optim:
        progress.say(f"{iter_dir} holds weights alone: the checkpoint starts at iteration 0 with a fresh optimizer"
                     f" (it was at iteration {training.iteration})")
        training = None
    carry = optimizer == "carry" and has_optim
    if carry:
        _check_optimizer(run_config.deepspeed, run_config.json_path)
    pool_manager = None
    if training is not None and training.pool_manager is not None:
        before = (info.get("source") or {}).get("pool_per_base")
        if before is not None and before == _pool_per_base(run_config, tp * dp):
            pool_manager = training.pool_manager
        else:
            progress.say(f"pool manager state reset: the checkpoint's pool had {before} rank(s) per base rank,"
                         f" {run_config.json_path} gives {_pool_per_base(run_config, tp * dp)}")
    job = {"run_config": run_config, "info": info, "training": training.to_dict() if training else None,
           "carry": carry, "masters": has_optim, "iter_dir": iter_dir, "out_dir": out_dir, "dp": dp,
           "pool_manager": pool_manager}
    with progress.phase(f"writing {out_dir} at TP {tp} x DP {dp} (ZeRO {_zero_stage(run_config.deepspeed)})"
                        f" from {iter_dir}"):
        paths = spawn_world(_target_rank, tp * dp, job, timeout=timeout, daemon=False, env=CPU_ONLY)
    return paths[0]


def reshard(source: OurCheckpoint, run_config: RunConfig, out_dir: str, *, progress, staging: str,
            optimizer: str = "carry", data_parallel_size: int | None = None,
            timeout: float = DEFAULT_TIMEOUT_S) -> str:
    """:func:`ours_to_dist` into ``staging`` (absent or empty; the caller removes it), then
    :func:`dist_to_ours` into ``out_dir``. Returns the new tag directory."""
    # the optimizer state goes through the staging copy for "reset" too: iteration, LR schedule and
    # counters come with it, only Adam starts afresh
    ours_to_dist(source, staging, optimizer=not source.ma_separation, progress=progress, timeout=timeout)
    return dist_to_ours(staging, run_config, out_dir, optimizer=optimizer, progress=progress,
                        data_parallel_size=data_parallel_size, timeout=timeout)
