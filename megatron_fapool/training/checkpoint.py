"""Checkpoints: DeepSpeed's save/load of Megatron's sharded model, committed atomically.

Layout of ``--save DIR`` (DeepSpeed's, plus two files of ours)::

    DIR/latest                         tag of the last *complete* checkpoint
    DIR/iter_0000020/                  one tag per save
        mp_rank_00_model_states.pt     DeepSpeed: this TP rank's Megatron shards + client state
        ..._optim_states.pt            DeepSpeed: optimizer / ZeRO partitions
        fapool_checkpoint.json         ours, written last: model shape, layout, iteration

A save goes into its tag directory; only when every base rank has finished does rank
0 write ``fapool_checkpoint.json`` into it and then replace ``latest`` atomically
(temporary file + ``os.replace``). A save interrupted at any point leaves ``latest``
on the previous complete checkpoint, and a tag directory without the marker is never
loaded (and is cleared before a later save reuses its name).
"""

from __future__ import annotations

import json
import os
import shutil

import torch
import torch.distributed as dist

from ..config import ConfigError

__all__ = [
    "MARKER",
    "check_compatible",
    "check_save_dir",
    "checkpoint_metadata",
    "find_checkpoint",
    "load_checkpoint",
    "model_shape",
    "save_checkpoint",
    "tag_for",
]

MARKER = "fapool_checkpoint.json"
LATEST = "latest"
FORMAT_VERSION = 1
# language-model keys that do not change any parameter's shape or meaning
_SHAPE_FREE_KEYS = {"seq_length", "hidden_dropout", "attention_dropout"}


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def model_shape(run_config) -> dict:
    """What a checkpoint's weights depend on: the model's structure and its sharding."""
    lm = run_config.model.language_model.model_dump()
    shape = {k: v for k, v in sorted(lm.items()) if k not in _SHAPE_FREE_KEYS}
    shape["tensor_model_parallel_size"] = run_config.tensor_model_parallel_size
    shape["pipeline_model_parallel_size"] = run_config.pipeline_model_parallel_size
    return shape


def checkpoint_metadata(run_config, *, iteration: int, consumed_samples: int, data_parallel_size: int) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "iteration": iteration,
        "consumed_samples": consumed_samples,
        "data_parallel_size": data_parallel_size,
        "model": model_shape(run_config),
        "config": os.path.abspath(run_config.json_path),
    }


def _write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def find_checkpoint(load_dir: str) -> tuple[str, dict] | None:
    """``(tag, metadata)`` of the complete checkpoint ``latest`` names, or ``None`` if there is none yet
    (no directory, or no ``latest`` in it: the first run of a job that saves where it loads).

    A ``latest`` that names a tag without our marker (half written, or not ours) is an error.
    """
    if not os.path.isdir(load_dir):
        return None
    latest = os.path.join(load_dir, LATEST)
    if not os.path.exists(latest):
        return None
    tag = open(latest).read().strip()
    marker = os.path.join(load_dir, tag, MARKER)
    if not os.path.isfile(marker):
        raise ConfigError(
            "--load",
            f"{load_dir}/{LATEST} names '{tag}' but {marker} is missing: not a complete checkpoint"
            " written by launch/train.py",
        )
    with open(marker) as f:
        meta = json.load(f)
    return tag, meta


def check_compatible(meta: dict, run_config, where: str) -> None:
    """A checkpoint of another model shape or TP/PP sharding fails here, before any loading."""
    want = model_shape(run_config)
    have = meta.get("model", {})
    diffs = [f"{k}={have.get(k)!r} (this run: {want.get(k)!r})" for k in sorted(set(want) | set(have)) if have.get(k) != want.get(k)]
    if diffs:
        raise ConfigError(
            "--load",
            f"{where} is a checkpoint of another model: {', '.join(diffs[:4])}"
            + (f" and {len(diffs) - 4} more" if len(diffs) > 4 else "")
            + "; use the model YAML and parallel sizes it was trained with, or another --load directory",
        )


def check_save_dir(save_dir: str, *, loaded_from: str | None) -> None:
    """A fresh run must not save over another run's checkpoints (it would replace them one by one)."""
    if os.path.exists(save_dir) and not os.path.isdir(save_dir):
        raise ConfigError("--save", f"{save_dir} exists and is not a directory")
    latest = os.path.join(save_dir, LATEST)
    if not os.path.exists(latest):
        return
    if loaded_from is not None and os.path.realpath(loaded_from) == os.path.realpath(save_dir):
        return
    tag = open(latest).read().strip()
    raise ConfigError(
        "--save",
        f"{save_dir} already holds checkpoint '{tag}' of another run: pass --load {save_dir} to resume it,"
        " or save into an empty directory",
    )


def save_checkpoint(engine, save_dir: str, iteration: int, *, metadata: dict, client_state: dict, group) -> str:
    """Save every base rank's state under ``tag_for(iteration)`` and commit it (collective over ``group``)."""
    tag = tag_for(iteration)
    path = os.path.join(save_dir, tag)
    latest = os.path.join(save_dir, LATEST)
    if os.path.exists(latest) and open(latest).read().strip() == tag:
        raise RuntimeError(f"{path} is the last complete checkpoint; refusing to overwrite it")
    if dist.get_rank() == 0:
        os.makedirs(save_dir, exist_ok=True)
        if os.path.isdir(path):  # left by an interrupted save, or an older run at this iteration
            shutil.rmtree(path)
    dist.barrier(group=group)
    engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False)
    dist.barrier(group=group)  # every rank's files are on disk
    if dist.get_rank() == 0:
        _write_atomically(os.path.join(path, MARKER), json.dumps(metadata, indent=1, sort_keys=True))
        _write_atomically(os.path.join(save_dir, LATEST), tag)
    dist.barrier(group=group)
    return path


def load_checkpoint(engine, load_dir: str, tag: str) -> dict:
    """Load ``tag`` into ``engine`` (model, optimizer, LR schedule); returns our client state."""
    path, client_state = engine.load_checkpoint(load_dir, tag=tag)
    if path is None:
        raise ConfigError("--load", f"DeepSpeed could not load {os.path.join(load_dir, tag)}")
    return client_state or {}


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
