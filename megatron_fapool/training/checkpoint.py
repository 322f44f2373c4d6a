"""Checkpoints: DeepSpeed's save/load of Megatron's sharded model, committed atomically.

Layout of ``--save DIR`` (DeepSpeed's, plus files of ours)::

    DIR/latest                         tag of the last *complete* checkpoint
    DIR/iter_0000020/                  one tag per save
        mp_rank_00_model_states.pt     DeepSpeed: this TP rank's Megatron shards + client state
        ..._optim_states.pt            DeepSpeed: optimizer / ZeRO partitions
        experts/                       MA separation only: the expert ranks' engines
            mp_rank_<j>_model_states.pt    DeepSpeed: expert rank j's experts (+ optimizer at ZeRO 0)
            ..._mp_rank_<j>_optim_states.pt  DeepSpeed: its optimizer at ZeRO 1/2
            manifest.json              ours: which rank owns which global experts, the layout
        fapool_checkpoint.json         ours, written last: model shape, layout, iteration

A save goes into its tag directory; only when every rank that writes (the base ranks,
and with MA separation the expert ranks) has finished does rank 0 write the expert
manifest and ``fapool_checkpoint.json`` into it and then replace ``latest`` atomically
(temporary file + ``os.replace``). A save interrupted at any point leaves ``latest``
on the previous complete checkpoint, and a tag directory without the marker is never
loaded (and is cleared before a later save reuses its name).

Expert ranks own a contiguous block of global experts each (``[j*k, (j+1)*k)`` for
expert rank ``j`` of a stage, Megatron's expert-parallel numbering): the manifest
records it with the layout, and a resume checks it against the current layout before
any process group exists (:func:`check_compatible`), and each expert rank checks that
the state it loads is that of its experts (:func:`load_expert_checkpoint`).
"""

from __future__ import annotations

import json
import os
import shutil

import torch
import torch.distributed as dist

from ..config import ConfigError

__all__ = [
    "EXPERTS_DIR",
    "MANIFEST",
    "MARKER",
    "check_compatible",
    "check_save_dir",
    "checkpoint_metadata",
    "expert_manifest",
    "find_checkpoint",
    "load_checkpoint",
    "load_expert_checkpoint",
    "model_shape",
    "save_checkpoint",
    "save_expert_checkpoint",
    "tag_for",
]

MARKER = "fapool_checkpoint.json"
LATEST = "latest"
EXPERTS_DIR = "experts"  # the expert engines' DeepSpeed "tag" inside a checkpoint's tag directory
MANIFEST = "manifest.json"
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
    if run_config.fapool.ma_separation.enabled:  # the experts are elsewhere: another set of files
        shape["ma_separation"] = True
    return shape


def expert_manifest(layout, num_experts: int) -> dict:
    """Which expert rank owns which global experts (MA separation), and the layout they came from."""
    k = num_experts // layout.experts_per_stage
    ranks = []
    for stage in range(layout.pp):
        for j, rank in enumerate(layout.expert_group(stage)):
            ranks.append({"rank": rank, "stage": stage, "index": j, "experts": list(range(j * k, (j + 1) * k)),
                          "file": f"mp_rank_{j:02d}_model_states.pt"})
    return {
        "format_version": FORMAT_VERSION,
        "num_experts": num_experts,
        "experts_per_rank": k,
        "layout": {"world_size": layout.world_size, "tp": layout.tp, "pp": layout.pp, "dp": layout.dp,
                   "num_base": layout.num_base, "num_expert": layout.num_expert},
        "expert_ranks": ranks,
    }


def checkpoint_metadata(run_config, *, iteration: int, consumed_samples: int, data_parallel_size: int) -> dict:
    """The marker: what the weights are (model shape, sharding, attention, dtype) and where training stood.

    ``attention`` and ``dtype`` say what the checkpoint converter needs beyond the shape: a
    dilated model has a dense model's weights but computes another function.
    """
    dil = run_config.fapool.dilated_attention
    return {
        "format_version": FORMAT_VERSION,
        "iteration": iteration,
        "consumed_samples": consumed_samples,
        "data_parallel_size": data_parallel_size,
        "model": model_shape(run_config),
        "attention": ({"kind": "dilated", "segment_lengths": list(dil.segment_lengths),
                       "dilation_rates": list(dil.dilation_rates)} if dil.enabled else {"kind": "dense"}),
        "dtype": {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[run_config.precision],
        "zero_stage": int(run_config.deepspeed.get("zero_optimization", {}).get("stage", 0)),
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


def check_compatible(meta: dict, run_config, where: str, *, layout=None) -> None:
    """A checkpoint of another model shape or TP/PP sharding fails here, before any loading; with MA
    separation (``layout`` given) also one whose experts were placed on other expert ranks."""
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
    if layout is not None and layout.num_expert:
        _check_manifest(where, expert_manifest(layout, run_config.model.language_model.num_moe_experts))


def _check_manifest(where: str, want: dict) -> None:
    path = os.path.join(where, EXPERTS_DIR, MANIFEST)
    if not os.path.isfile(path):
        raise ConfigError("--load", f"{path} is missing: {where} holds no expert-rank state (MA separation)")
    with open(path) as f:
        have = json.load(f)

    def placement(m):
        return [(r["stage"], r["index"], r["experts"]) for r in m.get("expert_ranks", [])]

    if placement(have) != placement(want) or have.get("num_experts") != want["num_experts"]:
        h, w = have.get("layout", {}), want["layout"]
        raise ConfigError(
            "--load",
            f"{where} holds the experts of {h.get('num_expert')} expert rank(s), {have.get('experts_per_rank')} experts"
            f" each (world {h.get('world_size')}); this run places {want['num_experts']} experts on"
            f" {w['num_expert']} expert rank(s), {want['experts_per_rank']} each (world {w['world_size']}):"
            " resume with the world size and attention_expert_ratio it was trained with",
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


def save_checkpoint(engine, save_dir: str, iteration: int, *, metadata: dict, client_state: dict, group,
                    announce=None, manifest: dict | None = None) -> str:
    """Save every base rank's state under ``tag_for(iteration)`` and commit it (collective over ``group``).

    With MA separation ``group`` holds the expert ranks too, ``announce()`` (called on every
    base rank once the tag directory is clear) sends them the ``SAVE`` operation, which runs
    :func:`save_expert_checkpoint` there, and rank 0 writes ``manifest`` into the expert
    directory before the marker.
    """
    tag = tag_for(iteration)
    path = os.path.join(save_dir, tag)
    latest = os.path.join(save_dir, LATEST)
    if os.path.exists(latest) and open(latest).read().strip() == tag:
        raise RuntimeError(f"{path} is the last complete checkpoint; refusing to overwrite it")
    if dist.get_rank() == 0:
        os.makedirs(save_dir, exist_ok=True)
        if os.path.isdir(path):  # left by an interrupted save, or an older run at this iteration
            shutil.rmtree(path)
    if announce is not None:
        announce()
    dist.barrier(group=group)
    engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False)
    dist.barrier(group=group)  # every rank's files are on disk
    if dist.get_rank() == 0:
        if manifest is not None:
            if not os.path.isdir(os.path.join(path, EXPERTS_DIR)):
                raise RuntimeError(f"{path}/{EXPERTS_DIR} was not written by the expert ranks")
            _write_atomically(os.path.join(path, EXPERTS_DIR, MANIFEST), json.dumps(manifest, indent=1))
        _write_atomically(os.path.join(path, MARKER), json.dumps(metadata, indent=1, sort_keys=True))
        _write_atomically(os.path.join(save_dir, LATEST), tag)
    dist.barrier(group=group)
    return path


def save_expert_checkpoint(engine, save_dir: str, iteration: int, *, client_state: dict, group) -> str:
    """An expert rank's part of :func:`save_checkpoint` (same ``group``, same barriers): its engine's
    files in ``<save_dir>/<tag>/experts/`` (DeepSpeed names them by the rank's index in the expert group)."""
    path = os.path.join(save_dir, tag_for(iteration))
    dist.barrier(group=group)  # rank 0 has cleared the tag directory
    engine.save_checkpoint(path, tag=EXPERTS_DIR, client_state=client_state, save_latest=False)
    dist.barrier(group=group)
    dist.barrier(group=group)  # committed
    return os.path.join(path, EXPERTS_DIR)


def load_checkpoint(engine, load_dir: str, tag: str) -> dict:
    """Load ``tag`` into ``engine`` (model, optimizer, LR schedule); returns our client state."""
    path, client_state = engine.load_checkpoint(load_dir, tag=tag)
    if path is None:
        raise ConfigError("--load", f"DeepSpeed could not load {os.path.join(load_dir, tag)}")
    return client_state or {}


def load_expert_checkpoint(engine, load_dir: str, tag: str, *, expert_ids: list[int], rank: int) -> dict:
    """Load an expert rank's engine from checkpoint ``tag``; its experts must be the ones saved there."""
    where = os.path.join(load_dir, tag)
    path, client_state = engine.load_checkpoint(where, tag=EXPERTS_DIR)
    if path is None:
        raise ConfigError("--load", f"DeepSpeed could not load the expert state in {os.path.join(where, EXPERTS_DIR)}")
    state = client_state or {}
    if list(state.get("expert_ids", [])) != list(expert_ids):
        raise ConfigError(
            "--load",
            f"expert rank {rank}: {path} holds experts {state.get('expert_ids')}, this rank owns {list(expert_ids)}",
        )
    return state


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
