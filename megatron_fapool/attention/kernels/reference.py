"""Dense float64 reference attention: the correctness anchor for tests.

Written to be obviously right rather than fast: it materialises the full
``[b, h, sq, sk]`` score matrix in float64, so use it at test sizes only.

Conventions (the same as :mod:`megatron_fapool.attention.kernels`):

* layout ``[batch, seq, heads, head_dim]``; GQA by ``hq % hkv == 0`` (query head
  ``i`` uses key/value head ``i // (hq // hkv)``);
* causal masking is bottom-right aligned: query ``i`` of ``sq`` sees key ``j`` of
  ``sk`` iff ``j <= i + (sk - sq)``;
* a row that sees no key outputs 0 and has ``lse = -inf``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["causal_mask", "reference_attention"]


def causal_mask(sq: int, sk: int, device: torch.device | str | None = None) -> Tensor:
    """Bottom-right aligned causal mask, ``[sq, sk]`` bool, True where key j is visible."""
    i = torch.arange(sq, device=device).unsqueeze(1)
    j = torch.arange(sk, device=device).unsqueeze(0)
    return j <= i + (sk - sq)


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    softmax_scale: float | None = None,
    attn_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Dense attention in float64.

    Args:
        q: ``[b, sq, hq, d]``; k, v: ``[b, sk, hkv, d]``.
        causal: bottom-right aligned causal mask.
        softmax_scale: defaults to ``1/sqrt(d)``.
        attn_bias: optional additive bias on the scaled scores, broadcastable to
            ``[b, hq, sq, sk]``; ``-inf`` entries mask keys out.

    Returns:
        ``(out [b, sq, hq, d] float64, lse [b, hq, sq] float64)``.  ``out`` is
        differentiable with respect to q, k, v (and attn_bias); rows that see no
        key give out 0, lse -inf and zero gradients.
    """
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    if hq % hkv != 0:
        raise ValueError(f"hq={hq} is not a multiple of hkv={hkv}")
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    group = hq // hkv
    q64 = q.to(torch.float64)
    k64 = k.to(torch.float64).repeat_interleave(group, dim=2)
    v64 = v.to(torch.float64).repeat_interleave(group, dim=2)

    scores = torch.einsum("bqhd,bkhd->bhqk", q64, k64) * scale
    if attn_bias is not None:
        scores = scores + attn_bias.to(torch.float64)
    if causal:
        scores = scores.masked_fill(~causal_mask(sq, sk, q.device), float("-inf"))

    # Softmax with a row maximum that is finite even for fully masked rows.  The
    # shift is a constant for the softmax, so it is detached.
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    probs = weights / torch.where(denom > 0, denom, torch.ones_like(denom))
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v64)
    lse = (row_max + torch.log(denom)).squeeze(-1)  # log(0) = -inf for empty rows
    return out, lse
