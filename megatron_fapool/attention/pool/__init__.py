"""FA Pool: pool ranks that join a layer's attention for long sequences (DESIGN.md §2)."""

from .client import PoolClient, PooledAttention
from .core_attention import AttentionPool, PoolCoreAttention
from .manager import CostModel, PoolResourceManager
from .partition import ZigzagPlan, zigzag_plan
from .server import PoolServer
from .stats import PoolStats

__all__ = [
    "AttentionPool",
    "CostModel",
    "PoolClient",
    "PoolCoreAttention",
    "PoolResourceManager",
    "PoolServer",
    "PoolStats",
    "PooledAttention",
    "ZigzagPlan",
    "zigzag_plan",
]
