"""Checkpoints of ``launch/train.py``: find one, check it is whole, read its model weights.

A checkpoint directory holds ``latest`` and tag directories (:mod:`..training.checkpoint`).
Everything here reads; nothing writes. The weights read are the ``module`` of each TP
rank's ``mp_rank_XX_model_states.pt`` (what ``launch/infer.py`` serves), merged over TP
by Megatron's placement (:mod:`.placement`), with an MA-separation checkpoint's experts
taken from its expert ranks' files (:func:`..inference.weights.expert_state`). Optimizer
state is read through DeepSpeed itself (:mod:`.deepspeed_io`), never from these files.
"""

from __future__ import annotations

import glob
import json
import os
import re
import zipfile
from dataclasses import dataclass

import torch

from ..config import ConfigError, load_run_config
from ..config.model_yaml import LanguageModel
from ..inference.weights import EXPERT_KEY, expert_state, read_manifest
from ..training import checkpoint as ckpt
from .canonical import ModelCard, language_model_dict
from .placement import merge_shards, placements

__all__ = ["OurCheckpoint", "complete_tags", "open_ours", "read_weights"]

_SHARD = "mp_rank_{:02d}_model_states.pt"
_OPTIM = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


@dataclass
class OurCheckpoint:
    root: str  # the --save directory
    tag: str
    meta: dict  # fapool_checkpoint.json
    card: ModelCard

    @property
    def path(self) -> str:
        return os.path.join(self.root, self.tag)

    @property
    def tp(self) -> int:
        return int(self.meta["model"].get("tensor_model_parallel_size", 1))

    @property
    def pp(self) -> int:
        return int(self.meta["model"].get("pipeline_model_parallel_size", 1))

    @property
    def dp(self) -> int:
        return int(self.meta.get("data_parallel_size", 1))

    @property
    def ma_separation(self) -> bool:
        return bool(self.meta["model"].get("ma_separation", False))

    @property
    def zero_stage(self) -> int | None:
        return self.meta.get("zero_stage")

    def model_files(self) -> list[str]:
        return [os.path.join(self.path, _SHARD.format(r)) for r in range(self.tp)]

    def optimizer_files(self) -> list[str]:
        return sorted(os.path.join(self.path, f) for f in os.listdir(self.path) if _OPTIM.match(f))


def complete_tags(root: str) -> list[str]:
    return sorted(os.path.basename(os.path.dirname(m)) for m in glob.glob(os.path.join(root, "*", ckpt.MARKER)))


def is_ours(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "latest")) or os.path.isfile(os.path.join(path, ckpt.MARKER)) \
        or bool(complete_tags(path))


def _card_from_marker(meta: dict, where: str) -> ModelCard:
    shape = dict(meta.get("model", {}))
    attention, dtype = meta.get("attention"), meta.get("dtype")
    if attention is None or dtype is None:  # a marker of format 1 before these keys: its run's JSON says
        attention, dtype = _from_run_json(meta, where)
    lm = language_model_dict(shape)
    lm.setdefault("hidden_dropout", 0.0)
    lm.setdefault("attention_dropout", 0.0)
    try:
        LanguageModel(**lm)
    except ValueError as e:
        raise ConfigError("--load", f"{where}/{ckpt.MARKER}: its model does not validate: {e}") from None
    return ModelCard(language_model=lm, attention=attention, dtype=dtype)


def _from_run_json(meta: dict, where: str) -> tuple[dict, str]:
    path = meta.get("config")
    if not path or not os.path.isfile(path):
        raise ConfigError("--load", f"{where}/{ckpt.MARKER} predates the attention/dtype keys and its run's JSON"
                                    f" {path!r} is gone: retrain, or restore the JSON at that path")
    cfg = load_run_config(path)
    dil = cfg.fapool.dilated_attention
    attention = ({"kind": "dilated", "segment_lengths": list(dil.segment_lengths),
                  "dilation_rates": list(dil.dilation_rates)} if dil.enabled else {"kind": "dense"})
    return attention, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[cfg.precision]


def _check_readable(path: str) -> None:
    """A torch file is a zip archive whose directory is at its end: a truncated one fails here, cheaply."""
    if not os.path.isfile(path):
        raise ConfigError("--load", f"{path} is missing")
    try:
        with zipfile.ZipFile(path):
            pass
    except zipfile.BadZipFile:
        raise ConfigError("--load", f"{path} ({os.path.getsize(path)} bytes) is truncated or corrupt:"
                                    " not a whole torch file; use another tag (--tag)") from None


def open_ours(path: str, tag: str | None = None) -> OurCheckpoint:
    """A complete checkpoint of launch/train.py at ``path`` (its --save directory, or one tag directory),
    ``latest``'s tag unless ``tag``; every file it needs is there and whole. A ConfigError otherwise."""
    if os.path.isfile(os.path.join(path, ckpt.MARKER)) and tag is None:  # a tag directory
        path, tag = os.path.dirname(os.path.abspath(path)), os.path.basename(os.path.abspath(path))
    done = complete_tags(path)
    if tag is None:
        latest = os.path.join(path, "latest")
        if not os.path.isfile(latest):
            raise ConfigError("--load", f"no complete checkpoint in {path} (no 'latest' file)"
                              + (f"; complete tags: {', '.join(done)} (pass --tag)" if done else ""))
        tag = open(latest).read().strip()
    where = os.path.join(path, tag)
    if not os.path.isfile(os.path.join(where, ckpt.MARKER)):
        raise ConfigError("--load", f"{where} is not a complete checkpoint (no {ckpt.MARKER}: half written?)"
                          + (f"; complete tags: {', '.join(done)} (pass --tag)" if done else "; there is no complete tag"))
    with open(os.path.join(where, ckpt.MARKER)) as f:
        meta = json.load(f)
    c = OurCheckpoint(root=path, tag=tag, meta=meta, card=_card_from_marker(meta, where))
    if c.pp != 1:
        raise ConfigError("--load", f"{where} was trained with {c.pp} pipeline stages: converting PP > 1 is not built")
    for f in c.model_files():
        _check_readable(f)
    opt = c.optimizer_files()
    if opt:
        want = c.tp * c.dp
        have = {(int(m.group(3)), int(m.group(2))) for m in (_OPTIM.match(os.path.basename(f)) for f in opt)}
        missing = [(t, d) for t in range(c.tp) for d in range(c.dp) if (t, d) not in have]
        if missing:
            raise ConfigError("--load", f"{where} lacks the optimizer files of (TP rank, DP rank) {missing[:4]}"
                                        f" ({len(opt)} of {want} present)")
        for f in opt:
            _check_readable(f)
    if c.ma_separation:
        for entry in read_manifest(where)["expert_ranks"]:
            _check_readable(os.path.join(where, ckpt.EXPERTS_DIR, entry["file"]))
    _check_names(c, _shards(c), placements(c.card))  # memory-mapped: shapes only, nothing read yet
    return c


def _shards(c: OurCheckpoint, *, progress=None) -> dict[str, list[torch.Tensor]]:
    """Every weight of the checkpoint: name -> its TP shards (memory-mapped, rank order)."""
    shards: dict[str, list[torch.Tensor]] = {}
    for f in c.model_files():
        state = torch.load(f, map_location="cpu", weights_only=False, mmap=True)["module"]
        for k, v in state.items():
            if v is None or k.endswith("._extra_state"):
                continue
            if c.ma_separation and EXPERT_KEY.match(k):
                continue
            shards.setdefault(k, []).append(v)
        if progress is not None:
            progress.add(os.path.getsize(f), 0)
    if c.ma_separation:
        for k, v in expert_state(c.root, c.tag, c.meta, "cpu").items():
            if v is not None and not k.endswith("._extra_state"):
                shards[k] = [v]
    return shards


def read_weights(c: OurCheckpoint, *, progress=None) -> dict[str, torch.Tensor]:
    """The checkpoint's model weights as canonical TP 1 tensors (module dtypes kept)."""
    places = placements(c.card)
    shards = _shards(c, progress=progress)
    _check_names(c, shards, places)
    out = {}
    for k, place in places.items():
        parts = shards[k]
        if len(parts) not in (1, c.tp):
            raise ConfigError("--load", f"{c.path}: {k} is in {len(parts)} of {c.tp} TP files")
        try:
            t = merge_shards(k, parts, place)
        except ValueError as e:
            raise ConfigError("--load", f"{c.path}: {e}") from None
        if tuple(t.shape) != place.shape:
            raise ConfigError("--load", f"{c.path}: {k}: have {tuple(t.shape)} want {place.shape} (from the model in"
                                        f" {ckpt.MARKER}): not this model's checkpoint")
        out[k] = t
        if progress is not None:
            progress.add(0, 1)
    return out


def _check_names(c: OurCheckpoint, shards: dict, places: dict) -> None:
    missing = sorted(set(places) - set(shards))
    unexpected = sorted(set(shards) - set(places))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {missing[:4]}" + (f" and {len(missing) - 4} more" if len(missing) > 4 else ""))
        if unexpected:
            parts.append(f"unexpected {unexpected[:4]}" + (f" and {len(unexpected) - 4} more" if len(unexpected) > 4 else ""))
        raise ConfigError("--load", f"{c.path}: the weights disagree with the model in {ckpt.MARKER}: "
                                    + "; ".join(parts))
    bad = []
    for k, place in places.items():
        s = tuple(shards[k][0].shape)
        if s != place.shape and (place.dim is None or c.tp == 1):
            bad.append(f"{k}: have {s} want {place.shape}")
        elif s != place.shape:
            want = list(place.shape)
            want[place.dim] //= c.tp
            if s != tuple(want):
                bad.append(f"{k}: have {s} want {tuple(want)} on each of {c.tp} TP ranks")
    if bad:
        raise ConfigError("--load", f"{c.path}: shapes disagree with the model in {ckpt.MARKER}: {'; '.join(bad[:4])}")
