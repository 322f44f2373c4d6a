"""Megatron-Core's distributed checkpoint (``torch_dist``) as the converter writes and reads it.

Layout of a checkpoint ``OUT`` (Megatron-LM's)::

    OUT/latest_checkpointed_iteration.txt    the iteration of the complete checkpoint (written last)
    OUT/iter_0000010/                        megatron.core.dist_checkpointing, torch_dist backend:
        .metadata  __0_0.distcp ...          PyTorch DCP shards (one global tensor per key)
        common.pt                            the non-sharded objects (the RNG state of our runs)
        metadata.json                        backend and version; written last by dist_checkpointing
        fapool_dist.json                     ours, written after metadata.json: the completeness marker

``fapool_dist.json`` holds the model card (:class:`~.canonical.ModelCard`), where training
stood (:class:`~.canonical.TrainingState`, or ``null`` for weights alone), whether the
optimizer tensors are there, the optimizer's hyperparameters per group (the LR the next
step uses lives there, as in DeepSpeed's own files) and where the weights came from.

**Keys.** The model's are Megatron's own (``GPTModel.sharded_state_dict()``: layers
stacked on a leading axis, TE-compatible names), so Megatron-LM reads the checkpoint at
any TP/PP (``--ckpt-format torch_dist --dist-ckpt-strictness log_all``), and so does
:func:`load_weights_dist` at TP 1. The optimizer's are ours, with each parameter's
sharding: ``optimizer.state.{fp32_param,exp_avg,exp_avg_sq}.<model key>``
(:func:`sharded_state`).

**CPU.** megatron-core 0.16.1's save calls ``torch.cuda.synchronize()`` and
``torch.cuda.current_device()`` unconditionally; :func:`cpu_shim` answers both on a
machine without CUDA, only around our save and load calls.
"""

from __future__ import annotations

import contextlib
import json
import os
from unittest import mock

import torch
import torch.distributed as dist

from ..config import ConfigError
from ..models.gpt import build_gpt_model
from ..runtime.local import world_of_one
from .canonical import ModelCard, TrainingState, run_config_for, strip_extra_state, write_json

__all__ = [
    "CARD",
    "LATEST",
    "OPTIMIZER_KEYS",
    "OPTIMIZER_PREFIX",
    "cpu_shim",
    "iter_dir_name",
    "load_rng",
    "load_sharded",
    "load_weights_dist",
    "optimizer_key",
    "read_card",
    "resolve_dist_dir",
    "save_sharded",
    "save_weights_dist",
    "sharded_state",
]

CARD = "fapool_dist.json"
LATEST = "latest_checkpointed_iteration.txt"
METADATA = "metadata.json"  # dist_checkpointing's own, written last by its save
FORMAT_VERSION = 1
OPTIMIZER_PREFIX = "optimizer.state"
#: the per-parameter optimizer tensors of a checkpoint with optimizer state (Adam's)
OPTIMIZER_KEYS = ("fp32_param", "exp_avg", "exp_avg_sq")
_RNG = "fapool_rng"  # common (non-sharded) entry: the RNG state of the run that saved


def iter_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def optimizer_key(kind: str, name: str) -> str:
    """The entry of parameter ``name``'s optimizer tensor ``kind`` in :func:`sharded_state`'s dict."""
    return f"{OPTIMIZER_PREFIX}.{kind}.{name}"


@contextlib.contextmanager
def cpu_shim():
    """On a machine without CUDA, ``torch.cuda.synchronize`` is a no-op and ``current_device`` is
    ``"cpu"`` inside this block (what dist_checkpointing's save needs there); with CUDA nothing changes."""
    if torch.cuda.is_available():
        yield
        return
    with mock.patch.object(torch.cuda, "synchronize", lambda *a, **k: None), \
            mock.patch.object(torch.cuda, "current_device", lambda: "cpu"):
        yield


# ---- the card ------------------------------------------------------------------------------------

def resolve_dist_dir(path: str) -> str:
    """``OUT`` (through its ``latest_checkpointed_iteration.txt``) or ``OUT/iter_X`` -> the iteration
    directory of a complete checkpoint; :class:`ConfigError` for anything else."""
    latest = os.path.join(path, LATEST)
    if os.path.isfile(latest):
        text = open(latest).read().strip()
        name = iter_dir_name(int(text)) if text.isdigit() else text
        path = os.path.join(path, name)
    if not os.path.isdir(path):
        raise ConfigError("--load", f"{path}: no such directory (a Megatron distributed checkpoint is a directory"
                                    f" with {LATEST}, or one of its iter_* directories)")
    for name, what in ((METADATA, "dist_checkpointing's metadata"), (CARD, "the converter's card")):
        if not os.path.isfile(os.path.join(path, name)):
            raise ConfigError("--load", f"{path} has no {name} ({what}): not a complete distributed checkpoint"
                                        " written by tools/convert_checkpoint.py")
    return path


def read_card(iter_dir: str) -> tuple[ModelCard, TrainingState | None, dict]:
    """``(card, training state or None, the whole fapool_dist.json)`` of a checkpoint's iteration directory."""
    path = os.path.join(iter_dir, CARD)
    try:
        with open(path) as f:
            info = json.load(f)
        card = ModelCard.from_dict(info["card"], where=path)
        training = TrainingState.from_dict(info["training"]) if info.get("training") else None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError("--load", f"{path}: not a card of this tool ({e})") from None
    return card, training, info


def _write_card(iter_dir: str, card: ModelCard, training: TrainingState | None, *, optimizer: bool,
                param_groups: list | None, source: dict | None) -> None:
    write_json(os.path.join(iter_dir, CARD), {
        "format_version": FORMAT_VERSION,
        "card": card.to_dict(),
        "training": training.to_dict() if training is not None else None,
        "optimizer": bool(optimizer),
        "optimizer_param_groups": param_groups,
        "source": source or {},
    })


# ---- sharded state: model + optimizer tensors ------------------------------------------------------

def sharded_state(model, optimizer_tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> dict:
    """``model.sharded_state_dict()`` plus, for every parameter ``name`` in ``optimizer_tensors``
    (``{name: {"fp32_param"|"exp_avg"|"exp_avg_sq": this rank's tensor}}``), its optimizer tensors
    with the parameter's sharding under :func:`optimizer_key` (Megatron's
    ``make_sharded_optimizer_tensor``: key ``optimizer.state.<kind>.<model key>``)."""
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

    sd = model.sharded_state_dict()
    for name, tensors in (optimizer_tensors or {}).items():
        if name not in sd:
            raise RuntimeError(f"parameter {name} has no entry in the model's sharded state dict")
        for kind, t in tensors.items():
            sd[optimizer_key(kind, name)] = make_sharded_optimizer_tensor(sd[name], t, f"{OPTIMIZER_PREFIX}.{kind}")
    return sd


def save_sharded(sd: dict, out_dir: str, iteration: int, card: ModelCard, training: TrainingState | None, *,
                 optimizer: bool, param_groups: list | None = None, source: dict | None = None,
                 rng: torch.Tensor | None = None) -> str:
    """Save ``sd`` (:func:`sharded_state`) as ``out_dir/iter_<iteration>`` and commit it; collective over
    the default group (every rank passes its shards). The card, then ``latest_checkpointed_iteration.txt``,
    are written last, by rank 0. Returns the iteration directory."""
    from megatron.core import dist_checkpointing

    path = os.path.join(out_dir, iter_dir_name(iteration))
    if dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
        if os.listdir(path):
            raise RuntimeError(f"{path} is not empty")
    dist.barrier()
    if rng is not None:
        sd = {**sd, _RNG: rng}
    with cpu_shim():
        dist_checkpointing.save(sd, path)
    dist.barrier()
    if dist.get_rank() == 0:
        _write_card(path, card, training, optimizer=optimizer, param_groups=param_groups, source=source)
        latest = os.path.join(out_dir, LATEST)
        with open(f"{latest}.tmp.{os.getpid()}", "w") as f:
            f.write(str(iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(f"{latest}.tmp.{os.getpid()}", latest)
    dist.barrier()
    return path


def load_sharded(sd: dict, iter_dir: str) -> dict:
    """Fill ``sd`` (the *target* model's :func:`sharded_state`) from the checkpoint: Megatron takes each
    rank's part of every global tensor, whatever TP it was saved at. Collective over the default group."""
    from megatron.core import dist_checkpointing

    with cpu_shim():
        return dist_checkpointing.load(sd, iter_dir)


def load_rng(iter_dir: str) -> torch.Tensor | None:
    """The RNG state of the run that saved (our checkpoints' ``rng.torch``), if it was kept."""
    from megatron.core import dist_checkpointing

    with cpu_shim():
        common = dist_checkpointing.load_common_state_dict(iter_dir)
    return common.get(_RNG) if isinstance(common, dict) else None


# ---- weights alone, in this process at TP 1 --------------------------------------------------------

@contextlib.contextmanager
def _tp1_world():
    """This process's default group if it has one (TP = PP = 1 expected), else a world of one."""
    if dist.is_initialized():
        from megatron.core import parallel_state

        if (dist.get_world_size() != 1 or not parallel_state.model_parallel_is_initialized()
                or parallel_state.get_tensor_model_parallel_world_size() != 1):
            raise RuntimeError("the weights-only dist I/O runs in a world of one process with Megatron's parallel"
                               " state at TP 1 (runtime.local.world_of_one), or without any process group")
        yield torch.device("cpu")
        return
    with world_of_one("cpu") as device:
        yield device


def _tp1_model(card: ModelCard):
    return build_gpt_model(run_config_for(card), perform_initialization=False)  # every weight is given


def save_weights_dist(card: ModelCard, weights: dict, out_dir: str, *, training: TrainingState | None = None,
                      source: dict | None = None) -> str:
    """Canonical ``weights`` (:mod:`.canonical`) as the distributed checkpoint ``out_dir`` (weights only),
    in this process at TP 1. Every parameter of the card's model must be given, with its shape; the
    tensors are stored in the card's dtype. Returns the iteration directory."""
    with _tp1_world():
        model = _tp1_model(card)
        want = strip_extra_state(model.state_dict())
        missing = sorted(set(want) - set(weights))
        extra = sorted(set(weights) - set(want))
        if missing or extra:
            raise ConfigError("weights", f"do not match the card's model: missing {missing[:4]}, unexpected {extra[:4]}"
                                         f" ({len(missing)} missing, {len(extra)} unexpected)")
        bad = [f"{k}: have {tuple(weights[k].shape)} want {tuple(v.shape)}" for k, v in want.items()
               if tuple(weights[k].shape) != tuple(v.shape)]
        if bad:
            raise ConfigError("weights", "shape differs from the card's model: " + "; ".join(bad[:4]))
        with torch.no_grad():
            for name, t in want.items():
                t.copy_(weights[name].to(t.dtype))
        iteration = training.iteration if training is not None else 0
        return save_sharded(sharded_state(model), out_dir, iteration, card, training, optimizer=False, source=source)


def load_weights_dist(path: str) -> tuple[ModelCard, dict]:
    """``(card, canonical weights)`` of the distributed checkpoint at ``path`` (``OUT`` or its iteration
    directory), read in this process through the TP 1 model's sharded state dict (any TP it was saved at)."""
    iter_dir = resolve_dist_dir(path)
    card, _, _ = read_card(iter_dir)
    with _tp1_world():
        model = _tp1_model(card)
        sd = model.sharded_state_dict()
        loaded = load_sharded(sd, iter_dir)
        model.load_state_dict({k: loaded[k] for k in sd}, strict=True)  # (load returns the common objects too)
        weights = {k: v.detach().clone() for k, v in strip_extra_state(model.state_dict()).items()}
    return card, weights
