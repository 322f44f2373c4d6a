"""Ranks, roles and process groups."""

from .groups import ParallelGroups, initialize_parallel_groups
from .roles import Layout, LayoutError, RankRole, compute_layout, layout_from_config

__all__ = [
    "Layout",
    "LayoutError",
    "ParallelGroups",
    "RankRole",
    "compute_layout",
    "initialize_parallel_groups",
    "layout_from_config",
]
