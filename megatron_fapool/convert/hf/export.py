"""Canonical weights -> a Hugging Face model folder.

``export_hf`` writes into a folder the caller provides (the converter's staging folder,
committed by the caller): safetensors shards ``model-0000i-of-0000n.safetensors`` written
one at a time (each shard's tensors are made, written, dropped), ``model.safetensors.index.json``,
``config.json`` (the real dtype of the tensors written), ``generation_config.json``, the byte
tokenizer and, for ``fapool_gpt``, the two portable modeling files that ``auto_map`` names.
Everything is checked before the first byte is written (architecture, tensor names, shapes,
dtypes, the target config itself); after writing, every shard is reopened and its keys
compared with the index.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from ...config import ConfigError
from ...data.tokenizer import BYTE_VOCAB_SIZE
from ..canonical import DTYPES, ModelCard, write_json
from ..progress import Progress
from .arch import check_exportable
from .hfconfig import ARCH_CLASSES, hf_config_dict
from .mapping import canonical_shapes, hf_shapes, rules_for
from .portable_files import PORTABLE_FILES, portable_auto_map, portable_config_class, portable_path
from .requirements import require_hf
from .tokenizer import write_byte_tokenizer

__all__ = ["DEFAULT_MAX_SHARD_BYTES", "check_weights", "export_hf"]

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
INDEX = "model.safetensors.index.json"


def check_weights(card: ModelCard, weights) -> None:
    """``weights`` are exactly ``card``'s canonical tensors (names, shapes, the card's dtype), else :class:`ConfigError`."""
    want = canonical_shapes(card)
    have = set(weights.keys())
    missing, unexpected = sorted(set(want) - have), sorted(have - set(want))
    if missing or unexpected:
        parts = ([f"missing {missing[:4]}"] if missing else []) + ([f"unexpected {unexpected[:4]}"] if unexpected else [])
        raise ConfigError("weights", f"do not match the model card ({'; '.join(parts)}): the checkpoint and its"
                          " model YAML disagree")
    bad = [f"{k}: have {tuple(weights[k].shape)} want {want[k]}" for k in want if tuple(weights[k].shape) != want[k]]
    if bad:
        raise ConfigError("weights", f"shapes disagree with the model card: {'; '.join(bad[:4])}")
    dt = [f"{k}: {weights[k].dtype}" for k in want if weights[k].dtype != card.torch_dtype]
    if dt:
        raise ConfigError("weights", f"dtype differs from the card's {card.dtype}: {'; '.join(dt[:4])}")


def _config(card: ModelCard, arch: str, dtype: str):
    from transformers import AutoConfig

    kwargs = hf_config_dict(card, arch, dtype)
    model_type, cls_name = ARCH_CLASSES[arch]
    try:
        if arch == "fapool_gpt":
            config = portable_config_class()(**kwargs)
            config.auto_map = portable_auto_map()
        else:
            config = AutoConfig.for_model(model_type, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError("--hf-arch", f"{arch}'s config refuses this model: {e}".replace("\n", " ")) from None
    config.architectures = [cls_name]
    return config


def _plan_shards(names_bytes: list[tuple[int, int]], max_shard_bytes: int) -> list[list[int]]:
    """Rule indices grouped into shards of at most ``max_shard_bytes`` (a rule larger than that is a shard alone)."""
    shards, cur, size = [], [], 0
    for i, nbytes in names_bytes:
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += nbytes
    if cur:
        shards.append(cur)
    return shards


def export_hf(card: ModelCard, weights, out_dir: str, *, arch: str = "auto", dtype: str | None = None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: Progress | None = None,
              tokenizer: bool = True) -> dict:
    """Write ``card``'s ``weights`` (canonical, a mapping that may load lazily) as an HF model into ``out_dir``
    (absent or empty). ``dtype``: cast to it (``float32`` / ``bfloat16`` / ``float16``); ``None`` keeps the
    weights' own. ``progress`` gets a line and the bytes of each shard (the caller owns the phase).
    Returns ``{"arch", "dtype", "tensors", "bytes", "shards", "files"}``."""
    require_hf("export-hf")
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    progress = progress or Progress(quiet=True)
    arch = check_exportable(card, arch)
    out_dtype = dtype or card.dtype
    if out_dtype not in DTYPES:
        raise ConfigError("--dtype", f"{out_dtype!r}: expected one of {sorted(DTYPES)}")
    check_weights(card, weights)
    if tokenizer and card.lm().vocab_size < BYTE_VOCAB_SIZE:
        raise ConfigError("language_model.vocab_size", f"{card.lm().vocab_size} is smaller than the byte tokenizer's"
                          f" {BYTE_VOCAB_SIZE} ids: export without the tokenizer (tokenizer=False)")
    config = _config(card, arch, out_dtype)
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise ConfigError("--save", f"{out_dir} is not empty: give a new folder")
    rules = rules_for(card, arch)
    shapes = hf_shapes(card, arch)
    itemsize = torch.empty((), dtype=DTYPES[out_dtype]).element_size()
    sizes = [(i, sum(itemsize * _numel(shapes[n]) for n in r.hf)) for i, r in enumerate(rules)]
    shards = _plan_shards(sizes, max_shard_bytes)

    os.makedirs(out_dir, exist_ok=True)
    files = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    weight_map, total = {}, 0
    for fname, members in zip(files, shards):  # one shard's tensors in memory at a time
        tensors = {}
        for i in members:
            rule = rules[i]
            made = rule.to_hf([weights[n] for n in rule.canonical])
            for name, t in zip(rule.hf, made):
                tensors[name] = t.to(DTYPES[out_dtype]).contiguous()
        save_file(tensors, os.path.join(out_dir, fname), metadata={"format": "pt"})
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        total += nbytes
        progress.add(nbytes, tensors=len(tensors))
        progress.say(f"  {fname}: {len(tensors)} tensors, {nbytes / 1e6:.1f} MB ({arch}, {out_dtype})")
        weight_map.update({name: fname for name in tensors})
        del tensors

    write_json(os.path.join(out_dir, INDEX), {"metadata": {"total_size": total}, "weight_map": weight_map})
    config.save_pretrained(out_dir)
    GenerationConfig(eos_token_id=config.eos_token_id, bos_token_id=None, pad_token_id=config.eos_token_id,
                     do_sample=False).save_pretrained(out_dir)
    written = [INDEX, "config.json", "generation_config.json"]
    if tokenizer:
        written += [os.path.basename(f) for f in
                    write_byte_tokenizer(out_dir, model_max_length=card.lm().max_position_embeddings)]
    if arch == "fapool_gpt":
        for name in PORTABLE_FILES:
            shutil.copyfile(portable_path(name), os.path.join(out_dir, name))
        written += list(PORTABLE_FILES)
    _check_written(out_dir, files, shapes, safe_open)
    return {"arch": arch, "dtype": out_dtype, "tensors": len(weight_map), "bytes": total, "shards": len(files),
            "files": files + written}


def _check_written(out_dir: str, files: list[str], shapes: dict, safe_open) -> None:
    """Every shard reopened: its keys are the index's entries for it, with the shapes the model has."""
    with open(os.path.join(out_dir, INDEX)) as f:
        index = json.load(f)["weight_map"]
    if set(index) != set(shapes):
        raise RuntimeError(f"{INDEX}: keys differ from the model's ({sorted(set(index) ^ set(shapes))[:4]})")
    for fname in files:
        with safe_open(os.path.join(out_dir, fname), framework="pt") as f:
            keys = set(f.keys())
            for k in keys:
                if k not in shapes or tuple(f.get_slice(k).get_shape()) != shapes[k]:
                    raise RuntimeError(f"{fname}: {k} has shape {f.get_slice(k).get_shape()}, want {shapes.get(k)}")
        if keys != {k for k, v in index.items() if v == fname}:
            raise RuntimeError(f"{fname}: its tensors differ from {INDEX}'s entries for it")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
