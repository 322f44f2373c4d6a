"""``inspect SRC`` (this module is not named ``inspect``: that would shadow the standard library's
for scripts run from this folder): what a checkpoint is — kind, layout, dtypes, tensors, bytes, completeness. Reads only."""

from __future__ import annotations

import json
import os
from collections import Counter

import torch

from .hf import require_hf
from .progress import fmt_bytes
from .sources import Source

__all__ = ["describe", "tensor_listing"]


def tensor_listing(src: Source) -> list[tuple[str, tuple, str, int]]:
    """``(name, shape, dtype, bytes)`` of every stored tensor, without loading any data (memory-mapped or headers)."""
    rows = []
    if src.kind == "ours":
        c = src.ours
        for f in c.model_files():
            state = torch.load(f, map_location="cpu", weights_only=False, mmap=True)["module"]
            tp = os.path.basename(f)[8:10]
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    rows.append((f"[tp {tp}] {k}", tuple(v.shape), str(v.dtype)[6:], v.numel() * v.element_size()))
    elif src.kind == "dist":
        from megatron.core import dist_checkpointing

        for k, st in sorted(dist_checkpointing.load_tensors_metadata(src.path).items()):
            dtype = getattr(st, "dtype", None)
            shape = tuple(getattr(st, "global_shape", getattr(st, "shape", ())))
            size = torch.empty((), dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else 0
            n = 1
            for s in shape:
                n *= s
            rows.append((k, shape, str(dtype).replace("torch.", ""), n * size))
    else:
        require_hf("inspect of a Hugging Face folder")
        from safetensors import safe_open

        files = sorted(f for f in os.listdir(src.path) if f.endswith(".safetensors"))
        for f in files:
            with safe_open(os.path.join(src.path, f), "pt") as h:
                for k in h.keys():
                    sl = h.get_slice(k)
                    shape = tuple(sl.get_shape())
                    dtype = sl.get_dtype()
                    n = 1
                    for s in shape:
                        n *= s
                    size = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8, "I64": 8}.get(dtype, 0)
                    rows.append((k, shape, dtype, n * size))
    return rows


def describe(src: Source, *, tensors: bool = True) -> str:
    lm = src.card.lm()
    d = src.detail
    lines = [f"kind          {src.kind}  ({src.path})"]
    if src.kind == "ours":
        c = src.ours
        files = c.model_files() + c.optimizer_files()
        lines += [
            f"tag           {c.tag} (iteration {c.meta.get('iteration')}, consumed samples {c.meta.get('consumed_samples')})",
            f"layout        TP {c.tp}  PP {c.pp}  DP {c.dp}  ZeRO stage {c.zero_stage if c.zero_stage is not None else '?'}"
            + ("  MA separation (experts on expert ranks)" if c.ma_separation else ""),
            f"files         {len(files)} ({fmt_bytes(sum(os.path.getsize(f) for f in files))}):"
            f" {len(c.model_files())} model, {len(c.optimizer_files())} optimizer",
        ]
    elif src.kind == "dist":
        tr = d.get("training")
        lines.append(f"training      {'iteration ' + str(tr.iteration) if tr else 'none (weights only)'};"
                     f" optimizer state {'yes' if d.get('optimizer') else 'no'}")
        if d.get("source"):
            lines.append(f"came from     {json.dumps(d['source'], sort_keys=True)}")
    else:
        for k in ("architecture", "arch"):
            if k in d:
                lines.append(f"architecture  {d[k]}")
    lines += [
        f"model         layers {lm.num_layers}, hidden {lm.hidden_size}, heads {lm.num_attention_heads}"
        f" (query groups {lm.query_groups}), ffn {lm.ffn_hidden_size or 4 * lm.hidden_size} {lm.activation_func},"
        f" {lm.normalization}, vocab {lm.vocab_size}, positions {lm.position_embedding_type},"
        f" {'untied' if lm.untie_embeddings_and_output_weights else 'tied'} embeddings"
        + (f", {lm.num_moe_experts} experts top-{lm.moe_router_topk}" if lm.num_moe_experts else ""),
        f"attention     {src.card.attention.get('kind')}",
        f"dtype         {src.card.dtype}",
    ]
    rows = tensor_listing(src)
    by_dtype = Counter()
    for _, _, dt, n in rows:
        by_dtype[dt] += n
    lines.append(f"tensors       {len(rows)}, {fmt_bytes(sum(by_dtype.values()))} ("
                 + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in sorted(by_dtype.items())) + ")")
    lines.append("complete      yes (every file present and readable; markers written last are there)")
    if tensors:
        w = max((len(r[0]) for r in rows), default=10)
        lines += [f"  {n:<{w}}  {str(s):<18} {dt}" for n, s, dt, _ in rows]
    return "\n".join(lines)
