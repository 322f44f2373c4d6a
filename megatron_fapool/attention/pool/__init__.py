"""FA Pool: pool ranks that join a layer's attention for long sequences (DESIGN.md §2).

One file per pooled algorithm, each with its plan, base side, member side and autograd
Function, over the serving transport of :mod:`megatron_fapool.parallel.service`:

* :mod:`.zigzag`: dense attention, zigzag query chunks, K/V prefix replicated;
* :mod:`.heads`: dilated attention, heads split over the members;
* :mod:`.decode`: inference decode over a K/V cache sharded along the sequence.

:mod:`.endpoints` holds the two ends (:class:`PoolClient` on a base rank,
:class:`PoolServer` on a pool rank) and :class:`AttentionPool`, a base rank's bundle;
:mod:`.manager` decides per step how many pool ranks join.
"""

from .endpoints import AttentionPool, PoolClient, PoolServer
from .heads import PooledHeadsAttention
from .manager import CostModel, PoolResourceManager
from .stats import PoolStats
from .zigzag import PooledAttention, ZigzagPlan, zigzag_plan

__all__ = [
    "AttentionPool",
    "CostModel",
    "PoolClient",
    "PoolResourceManager",
    "PoolServer",
    "PoolStats",
    "PooledAttention",
    "PooledHeadsAttention",
    "ZigzagPlan",
    "zigzag_plan",
]
