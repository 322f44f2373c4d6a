"""MoE pieces around Megatron's own ``MoELayer``: the router (and, for MA separation, the
remote experts of the attention ranks and the expert ranks' serving loop)."""

from .router import FapoolTopKRouter, router_dtype_of

__all__ = ["FapoolTopKRouter", "router_dtype_of"]
