"""Weights for serving from a launch/train.py checkpoint, wherever its experts were trained.

A checkpoint of an MoE model holds its experts in one of two places:

* **colocated** (MA separation off): in each TP rank's ``mp_rank_XX_model_states.pt``,
  under Megatron's names ``decoder.layers.L.mlp.experts.local_experts.E.*`` with global
  expert ids ``E`` (whole experts on every TP rank, expert parallelism 1);
* **MA separation**: the attention ranks' files hold no expert, the expert ranks' engines
  wrote ``<tag>/experts/mp_rank_<j>_model_states.pt`` (their ``ExpertStack``: layer ``L``,
  local expert ``e``) and ``<tag>/experts/manifest.json`` says which global experts each
  file holds.

Megatron's expert numbering is the same in both, so either serves either way: colocated,
or with MA separation at any ratio (each expert rank takes its block of global experts
from whichever file holds them). Only the placement differs; the model must be the same
(:func:`check_checkpoint`).
"""

from __future__ import annotations

import json
import os
import re

import torch

from ..config import ConfigError
from ..moe.serve import megatron_expert_name
from ..training import checkpoint as ckpt

__all__ = ["EXPERT_KEY", "check_checkpoint", "expert_state", "load_attention_weights", "load_expert_weights",
           "read_manifest"]

#: A colocated Megatron GPT model's expert parameter: (layer, global expert, rest of the name).
EXPERT_KEY = re.compile(r"^decoder\.layers\.(\d+)\.mlp\.experts\.local_experts\.(\d+)\.(.+)$")


def _saved_with_ma(meta: dict) -> bool:
    return bool(meta.get("model", {}).get("ma_separation", False))


def read_manifest(tag_dir: str) -> dict:
    """An MA-separation checkpoint's expert manifest (which expert rank file holds which global experts)."""
    path = os.path.join(tag_dir, ckpt.EXPERTS_DIR, ckpt.MANIFEST)
    if not os.path.isfile(path):
        raise ConfigError("--load", f"{path} is missing: an MA-separation checkpoint without its expert manifest")
    with open(path) as f:
        return json.load(f)


def check_checkpoint(meta: dict, run_config, tag_dir: str) -> None:
    """The checkpoint is of this model (shape, TP, PP) wherever its experts live; an MA checkpoint's
    manifest names every expert once. Before any process group exists."""
    have = {k: v for k, v in meta.get("model", {}).items() if k != "ma_separation"}
    if run_config.fapool.ma_separation.enabled:  # model_shape marks MA runs: the placement, not the model
        have["ma_separation"] = True
    ckpt.check_compatible({**meta, "model": have}, run_config, tag_dir)
    if not _saved_with_ma(meta):
        return
    manifest = read_manifest(tag_dir)
    if manifest.get("layout", {}).get("pp", 1) != 1:
        raise ConfigError("--load", f"{tag_dir}: the experts were trained over pipeline stages; serving such a"
                                    " checkpoint is not built yet")
    ids = sorted(e for r in manifest.get("expert_ranks", []) for e in r["experts"])
    n = run_config.model.language_model.num_moe_experts
    if ids != list(range(n)):
        raise ConfigError("--load", f"{tag_dir}/{ckpt.EXPERTS_DIR}/{ckpt.MANIFEST} does not hold experts 0-{n - 1}"
                                    f" once each (it lists {len(ids)})")


def expert_state(load_dir: str, tag: str, meta: dict, device, expert_ids=None) -> dict:
    """The checkpoint's expert weights under the colocated Megatron names (global ids); only
    ``expert_ids`` if given."""
    tag_dir = os.path.join(load_dir, tag)
    wanted = None if expert_ids is None else set(expert_ids)
    out = {}
    if not _saved_with_ma(meta):
        state = torch.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), map_location=device,
                           weights_only=False)["module"]
        for name, t in state.items():
            m = EXPERT_KEY.match(name)
            if m and (wanted is None or int(m.group(2)) in wanted):
                out[name] = t
        return out
    for entry in read_manifest(tag_dir)["expert_ranks"]:
        ids = list(entry["experts"])
        if wanted is not None and not wanted & set(ids):
            continue
        path = os.path.join(tag_dir, ckpt.EXPERTS_DIR, entry["file"])
        state = torch.load(path, map_location=device, weights_only=False)["module"]
        for name, t in state.items():  # ExpertStack names: layers.L.local_experts.e.<rest>
            _, layer, _, local, rest = name.split(".", 4)
            e = ids[int(local)]
            if wanted is None or e in wanted:
                out[megatron_expert_name(int(layer), e, rest)] = t
    return out


def load_attention_weights(model, load_dir: str, tag: str, meta: dict, device, *, tp_rank: int,
                           experts_remote: bool) -> None:
    """A base rank's model from checkpoint ``tag``: all of it, or (``experts_remote``: MA separation)
    all but the experts, which the expert ranks load (:func:`load_expert_weights`)."""
    path = os.path.join(load_dir, tag, f"mp_rank_{tp_rank:02d}_model_states.pt")
    state = torch.load(path, map_location=device, weights_only=False)["module"]
    if experts_remote:
        state = {k: v for k, v in state.items() if not EXPERT_KEY.match(k)}
    elif _saved_with_ma(meta):
        state.update(expert_state(load_dir, tag, meta, device))
    model.load_state_dict(state, strict=True)


def load_expert_weights(stack, load_dir: str, tag: str, meta: dict, device) -> None:
    """An expert rank's ``ExpertStack`` from checkpoint ``tag`` (its global experts, from wherever they are)."""
    state = expert_state(load_dir, tag, meta, device, expert_ids=stack.global_ids)
    missing = [n for n in stack.megatron_names().values() if n not in state]
    if missing:
        raise RuntimeError(f"{os.path.join(load_dir, tag)} lacks {len(missing)} weights of experts"
                           f" {stack.global_ids.start}-{stack.global_ids.stop - 1}, e.g. {missing[0]}")
    stack.load_from_megatron(state)
