"""What a path holds — a checkpoint of ``launch/train.py``, a Megatron distributed checkpoint, or a
Hugging Face model folder — opened as one :class:`Source` with a card and canonical weights."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..config import ConfigError
from .canonical import ModelCard
from .dist import load_weights_dist, read_card, resolve_dist_dir
from .hf import read_hf, read_hf_card
from .ours import OurCheckpoint, is_ours, open_ours, read_weights

__all__ = ["KINDS", "Source", "detect", "open_source"]

KINDS = ("ours", "dist", "hf")


def detect(path: str) -> str:
    """``ours`` / ``dist`` / ``hf`` by the files ``path`` holds; a ConfigError naming what is there otherwise."""
    if not os.path.isdir(path):
        raise ConfigError("checkpoint", f"{path} is not a directory")
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf"
    if os.path.isfile(os.path.join(path, "latest_checkpointed_iteration.txt")) or \
            os.path.isfile(os.path.join(path, "metadata.json")):
        return "dist"
    if is_ours(path):
        return "ours"
    names = sorted(os.listdir(path))[:6]
    raise ConfigError("checkpoint", f"{path} is not a checkpoint: no 'latest' (launch/train.py), no"
                                    " latest_checkpointed_iteration.txt / metadata.json (Megatron dist), no config.json"
                                    f" (Hugging Face); it holds {names or 'nothing'}")


@dataclass
class Source:
    kind: str
    path: str  # what was given
    card: ModelCard
    detail: dict = field(default_factory=dict)  # kind-specific: tag, TP, DP, ZeRO stage, files ...
    ours: OurCheckpoint | None = None  # the launch/train.py checkpoint (kind "ours")

    def weights(self, progress=None) -> dict[str, torch.Tensor]:
        """Canonical TP 1 weights."""
        if self.kind == "ours":
            return read_weights(self.ours, progress=progress)
        if self.kind == "dist":
            return load_weights_dist(self.path)[1]
        return read_hf(self.path)[1]


def open_source(path: str, *, tag: str | None = None, key: str = "checkpoint") -> Source:
    """Open ``path`` (any kind); completeness is checked here, before any conversion starts."""
    kind = detect(path)
    if kind == "ours":
        c = open_ours(path, tag)
        return Source("ours", path, c.card, {"tag": c.tag, "root": c.root, "tp": c.tp, "pp": c.pp, "dp": c.dp,
                                             "zero_stage": c.zero_stage, "ma_separation": c.ma_separation,
                                             "iteration": c.meta.get("iteration")}, c)
    if tag is not None:
        raise ConfigError("--tag", f"{path} is a {kind} checkpoint: --tag applies to checkpoints of launch/train.py")
    if kind == "dist":
        d = resolve_dist_dir(path)
        card, training, info = read_card(d)
        return Source("dist", d, card, {**info, "training": training})
    card, info = read_hf_card(path)
    return Source("hf", path, card, info)
