"""Where each canonical tensor lives on a TP rank, from Megatron's own parameter attributes.

Megatron marks every tensor-parallel parameter with ``partition_dim`` and
``partition_stride`` (``tensor_parallel.layers.set_tensor_model_parallel_attributes``)
and builds a rank's shard by splitting the global tensor into ``stride x TP`` chunks
along that dimension and taking chunks ``r, r + TP, ...`` (``_initialize_affine_weight_cpu``):
a GLU's ``linear_fc1`` has stride 2, so each rank holds ``[gate_r; up_r]``. The table here is
read from the card's model built at TP 1 on the meta device (no memory, no init), so a
new module brings its placement with it. Whether a tensor is split on a given checkpoint
is read from the shard's shape (whole experts on every TP rank are marked
tensor-parallel but not split: expert tensor parallelism is 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..models.gpt import build_gpt_model
from ..runtime.local import world_of_one
from .canonical import ModelCard, run_config_for, strip_extra_state

__all__ = ["Placement", "merge_shards", "placements", "split_for_rank"]


@dataclass(frozen=True)
class Placement:
    shape: tuple[int, ...]  # global (TP 1) shape
    dtype: torch.dtype
    dim: int | None  # partition dimension, None: replicated on every TP rank
    stride: int = 1


def placements(card: ModelCard) -> dict[str, Placement]:
    """Canonical name -> placement, from the card's model at TP 1 on the meta device (in a world of one,
    :func:`megatron_fapool.runtime.local.world_of_one`, entered here when no default group exists)."""
    if not dist.is_initialized():
        with world_of_one("cpu"):
            return placements(card)
    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_world_size() != 1:
        raise RuntimeError("placements() builds the TP 1 model: call it in a world of one, not in a TP world")
    with torch.device("meta"):
        model = build_gpt_model(run_config_for(card))
    params = dict(model.named_parameters())
    out = {}
    for name, t in strip_extra_state(model.state_dict()).items():
        p = params.get(name)
        tp = p is not None and getattr(p, "tensor_model_parallel", False)
        out[name] = Placement(tuple(t.shape), t.dtype, p.partition_dim if tp else None,
                              getattr(p, "partition_stride", 1) if tp else 1)
    return out


def merge_shards(name: str, shards: list[torch.Tensor], place: Placement) -> torch.Tensor:
    """The global tensor of TP ``shards`` (rank order); replicated ones must be equal on every rank."""
    if tuple(shards[0].shape) == place.shape or place.dim is None:
        for r, s in enumerate(shards[1:], 1):
            if not torch.equal(s, shards[0]):
                raise ValueError(f"{name} is replicated over TP but TP rank {r}'s copy differs from rank 0's")
        return shards[0]
    chunks = [torch.chunk(s, place.stride, dim=place.dim) for s in shards]
    return torch.cat([c[j] for j in range(place.stride) for c in chunks], dim=place.dim)


def split_for_rank(t: torch.Tensor, place: Placement, rank: int, world: int) -> torch.Tensor:
    """TP rank ``rank``'s shard of global ``t`` (the inverse of :func:`merge_shards`)."""
    if place.dim is None or world == 1:
        return t
    pieces = torch.chunk(t, place.stride * world, dim=place.dim)
    return torch.cat([pieces[j * world + rank] for j in range(place.stride)], dim=place.dim)
