"""Dilated (LongNet) attention as a Megatron core-attention module (DESIGN.md §4, §5).

:class:`DilatedCoreAttention` is the local core attention with :meth:`attend` replaced
by :func:`dilated_attention` over this tensor-parallel rank's heads. Head offsets of
the branches use the *global* head index (``tp_rank * heads_per_partition + local``
of ``num_attention_heads``), so the model computes the same function at any TP size.

:class:`PoolDilatedCoreAttention` adds the attention pool: above the threshold the
call goes to :class:`~.pool.heads.PooledHeadsAttention`, which gives each active pool
rank a subset of this rank's heads (no K/V replication, see :mod:`.pool.heads`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .core_attention import LocalCoreAttention
from .dilated import dilated_attention

__all__ = ["DilatedCoreAttention", "PoolDilatedCoreAttention"]


def _tp_group(pg_collection):
    if pg_collection is None:
        from megatron.core.process_groups_config import ProcessGroupCollection

        pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
    return pg_collection


class DilatedCoreAttention(LocalCoreAttention):
    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        backend: str = "auto",
        *,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
    ):
        if attention_type != "self":
            raise ValueError(f"dilated attention is self-attention only, got attention_type={attention_type!r}")
        pg_collection = _tp_group(pg_collection)
        super().__init__(
            config, layer_number, attn_mask_type, attention_type, attention_dropout, softmax_scale,
            cp_comm_type, pg_collection, backend,
        )
        if len(segment_lengths) != len(dilation_rates) or not segment_lengths:
            raise ValueError(
                f"segment_lengths {list(segment_lengths)} and dilation_rates {list(dilation_rates)} must be"
                " non-empty and of equal length (one (w, r) pair per branch)"
            )
        self.segment_lengths = tuple(int(w) for w in segment_lengths)
        self.dilation_rates = tuple(int(r) for r in dilation_rates)
        self.total_heads = config.num_attention_heads
        self.head_offset = pg_collection.tp.rank() * self.num_heads  # global index of local head 0

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool) -> torch.Tensor:
        return dilated_attention(
            q, k, v, self.segment_lengths, self.dilation_rates, causal, self.softmax_scale,
            head_offset=self.head_offset, total_heads=self.total_heads, backend=self.backend,
        )


class PoolDilatedCoreAttention(DilatedCoreAttention):
    """Dilated attention whose heads are shared with the attention pool above the threshold."""

    def __init__(self, *args, pool=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.pool = pool

    def attend(self, q, k, v, *, causal: bool):
        n = q.shape[1]
        active = self.pool.manager.decide(n) if self.pool is not None else 0
        # a member needs at least one query head
        active = min(active, self.num_heads - 1)
        if active <= 0:
            if self.pool is not None:
                self.pool.stats.local_calls += 1
            return super().attend(q, k, v, causal=causal)
        from .pool.heads import PooledHeadsAttention

        return PooledHeadsAttention.apply(
            q, k, v, self.pool.client, active, self.segment_lengths, self.dilation_rates, causal,
            self.softmax_scale, self.head_offset, self.total_heads,
        )
