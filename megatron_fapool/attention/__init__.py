"""Attention: single-device kernels, dilated attention, the attention pool, and the one
Megatron core-attention module that composes them.

Layers, bottom up (imports only point down): :mod:`.kernels` (one device, returns the
LSE), :mod:`.dilated` (LongNet over the kernels), :mod:`.pool` (pooled algorithms over
the serving transport), :mod:`.core_attention` (Megatron's boundary).
"""

from .core_attention import Dense, Dilated, FapoolCoreAttention, Pooled

__all__ = ["Dense", "Dilated", "FapoolCoreAttention", "Pooled"]
