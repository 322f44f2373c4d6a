"""A Hugging Face model folder (arcee, llama, mixtral, fapool_gpt; safetensors) -> card + canonical weights.

``config.json`` becomes a model card (:func:`.hfconfig.card_of_hf_config` refuses, naming
the field, what our model cannot compute exactly); the tensors are read one at a time from
the safetensors files the index names (or ``model.safetensors``), checked against the
names and shapes the card implies, and mapped back by :mod:`.mapping`'s inverse rules.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch

from ...config import ConfigError
from ..canonical import ModelCard, dtype_name
from .hfconfig import card_of_hf_config
from .mapping import canonical_shapes, hf_shapes, hf_to_canonical
from .requirements import require_hf

__all__ = ["HFTensors", "open_hf_tensors", "read_hf", "read_hf_card"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class HFTensors(Mapping):
    """The tensors of an HF folder's safetensors files, read on access (``with`` closes the files)."""

    def __init__(self, hf_dir: str):
        from safetensors import safe_open

        index = os.path.join(hf_dir, INDEX)
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise ConfigError(index, f"not a safetensors index ({e}): re-save the model") from None
        elif os.path.exists(os.path.join(hf_dir, SINGLE)):
            weight_map = None
        else:
            others = sorted(f for f in os.listdir(hf_dir) if f.endswith((".bin", ".pt", ".pth")))
            hint = f" (found {others[:3]}: re-save with save_pretrained(..., safe_serialization=True))" if others else ""
            raise ConfigError(hf_dir, f"no {INDEX} or {SINGLE}{hint}")
        files = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE]
        self._handles, self._where = {}, {}
        for fname in files:
            path = os.path.join(hf_dir, fname)
            if not os.path.exists(path):
                raise ConfigError(path, f"missing: {INDEX} names it")
            try:
                handle = safe_open(path, framework="pt")
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a bad header
                raise ConfigError(path, f"not a readable safetensors file ({os.path.getsize(path)} bytes: {e})") from None
            self._handles[fname] = handle
            for k in handle.keys():
                self._where[k] = fname
        if weight_map is not None:
            absent = sorted(k for k, v in weight_map.items() if self._where.get(k) != v)
            if absent:
                raise ConfigError(os.path.join(hf_dir, weight_map[absent[0]]),
                                  f"does not hold {absent[:4]} that {INDEX} puts there (a truncated or mixed download?)")
        self.hf_dir = hf_dir

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise KeyError(name)
        try:
            return self._handles[self._where[name]].get_tensor(name)
        except Exception as e:  # noqa: BLE001
            path = os.path.join(self.hf_dir, self._where[name])
            raise ConfigError(path, f"cannot read {name} ({os.path.getsize(path)} bytes: {e})") from None

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def dtype_str(self, name: str) -> str:
        return self._handles[self._where[name]].get_slice(name).get_dtype()

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def open_hf_tensors(hf_dir: str) -> HFTensors:
    require_hf("reading a Hugging Face model")
    return HFTensors(hf_dir)


def read_hf_card(hf_dir: str) -> tuple[ModelCard, dict]:
    """``(card, info)`` of an HF folder's ``config.json`` (refusing what we cannot represent); ``info``:
    ``{"arch", "model_type", "architectures", "dtype", "config"}`` (``arch`` as :data:`.arch.ARCHES` names it)."""
    path = os.path.join(hf_dir, "config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise ConfigError(path, "missing: not a Hugging Face model folder") from None
    except ValueError as e:
        raise ConfigError(path, f"not JSON ({e})") from None
    card, arch = card_of_hf_config(cfg, where=path)
    return card, {"arch": arch, "model_type": cfg.get("model_type"), "architectures": cfg.get("architectures"),
                  "dtype": card.dtype, "config": path}


_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def _check_tensors(card: ModelCard, arch: str, tensors: HFTensors) -> None:
    want = hf_shapes(card, arch)
    have = set(tensors)
    lm = card.lm()
    if not lm.untie_embeddings_and_output_weights and "lm_head.weight" in have:
        if not torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"]):
            raise ConfigError(f"{tensors.hf_dir}/config.json: tie_word_embeddings",
                              "true, but lm_head.weight differs from model.embed_tokens.weight: set it to false")
        have.discard("lm_head.weight")
    if lm.num_moe_experts and any(k.endswith("mlp.experts.gate_up_proj") for k in have) and arch == "mixtral":
        raise ConfigError(tensors.hf_dir, "Mixtral experts in transformers' fused in-memory layout (gate_up_proj):"
                          " re-save with save_pretrained(..., save_original_format=True)")
    missing, unexpected = sorted(set(want) - have), sorted(have - set(want))
    if missing or unexpected:
        parts = ([f"missing {missing[:4]}"] if missing else []) + ([f"unexpected {unexpected[:4]}"] if unexpected else [])
        raise ConfigError(tensors.hf_dir, f"tensors do not match config.json ({'; '.join(parts)})"
                          + ("; lm_head.weight absent: set tie_word_embeddings: true" if missing == ["lm_head.weight"] else ""))
    bad = [f"{k}: have {tensors.shape(k)} want {want[k]}" for k in want if tensors.shape(k) != want[k]]
    if bad:
        raise ConfigError(tensors.hf_dir, f"shapes disagree with config.json: {'; '.join(bad[:4])}")
    dtypes = {_SAFETENSORS_DTYPES.get(tensors.dtype_str(k), tensors.dtype_str(k)) for k in want}
    if len(dtypes) != 1 or card.dtype not in dtypes:
        raise ConfigError(f"{tensors.hf_dir}/config.json: dtype",
                          f"{card.dtype!r} but the tensors are {sorted(dtypes)}: one dtype, recorded in config.json")


def read_hf(hf_dir: str) -> tuple[ModelCard, dict[str, torch.Tensor]]:
    """``(card, canonical weights)`` of an HF model folder; :class:`ConfigError` naming the file/field for what
    we cannot represent or what is incomplete."""
    require_hf("import-hf")
    card, info = read_hf_card(hf_dir)
    arch = info["arch"]
    with open_hf_tensors(hf_dir) as tensors:
        _check_tensors(card, arch, tensors)
        weights = {}
        for _, made in hf_to_canonical(card, arch, tensors):
            weights.update(made)
    want = canonical_shapes(card)
    assert set(weights) == set(want) and all(tuple(weights[k].shape) == want[k] for k in want)
    assert all(dtype_name(t.dtype) == card.dtype for t in weights.values())
    return card, weights
