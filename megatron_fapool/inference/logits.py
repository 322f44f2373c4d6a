"""Logits of a tensor-parallel model: each TP rank holds a slice of the vocabulary; token choices need all of it."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["gather_vocab"]


def gather_vocab(last: torch.Tensor, tp_group) -> torch.Tensor:
    """``[b, vocab / tp]`` logits of this TP rank -> ``[b, vocab]`` on every TP rank (as is without TP)."""
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        parts = [torch.empty_like(last) for _ in range(dist.get_world_size(tp_group))]
        dist.all_gather(parts, last, group=tp_group)
        last = torch.cat(parts, dim=-1)
    return last
