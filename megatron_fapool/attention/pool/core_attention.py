"""The attention pool as a Megatron core-attention module.

:class:`AttentionPool` bundles one base rank's client, resource manager and counters
(built once at start-up, shared by all its layers). :class:`PoolCoreAttention` is the
local core attention with one change: above the threshold the call goes through the
pool.
"""

from __future__ import annotations

from dataclasses import dataclass


from ..core_attention import LocalCoreAttention
from .client import PoolClient, PooledAttention
from .manager import PoolResourceManager
from .stats import PoolStats

__all__ = ["AttentionPool", "PoolCoreAttention"]


@dataclass
class AttentionPool:
    client: PoolClient
    manager: PoolResourceManager
    stats: PoolStats

    @classmethod
    def for_base_rank(cls, groups, pool_cfg, *, backend: str = "auto") -> "AttentionPool":
        stats = PoolStats()
        client = PoolClient(groups, kv_chunk_tokens=pool_cfg.kv_chunk_tokens, backend=backend, stats=stats)
        manager = PoolResourceManager.from_config(pool_cfg, pool_share=groups.layout.pool_per_base, stats=stats)
        return cls(client=client, manager=manager, stats=stats)

    def shutdown(self, device) -> None:
        self.client.shutdown(device)


class PoolCoreAttention(LocalCoreAttention):
    def __init__(self, *args, pool: AttentionPool | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.pool = pool

    def attend(self, q, k, v, *, causal: bool):
        n = q.shape[1]
        active = self.pool.manager.decide(n) if self.pool is not None else 0
        if active == 0:
            if self.pool is not None:
                self.pool.stats.local_calls += 1
            return super().attend(q, k, v, causal=causal)
        # [b, s, h, d] views of Megatron's [s, b, h, d] tensors -> back to [s, b, h, d]
        out = PooledAttention.apply(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), self.pool.client, active, causal,
            self.softmax_scale,
        )
        return out.transpose(0, 1)
