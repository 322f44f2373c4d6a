"""Next-token choice on the device: greedy, or sampled with noise that depends only on (seed, request, position).

Sampling uses the Gumbel-max rule: ``argmax(logits / T + g)`` with ``g = -log(-log(u))``
draws from ``softmax(logits / T)``. The uniform ``u`` of vocabulary entry ``j`` is a
counter-based hash of ``(seed, request key, position, j)`` computed with integer tensor
ops, so there is no generator state to carry: the draw is the same whichever batch a
request is in, whichever row it has, eager or replayed from a CUDA graph, and the same on
every tensor-parallel rank (which all see the same gathered logits). Top-k keeps the ``k``
largest logits (ties at the k-th value kept). No host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Sampling", "next_tokens"]

_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class Sampling:
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    seed: int = 0
    limit: int | None = None  # only ids below it are chosen (a tokenizer smaller than the padded vocabulary)

    def __post_init__(self):
        if not self.greedy and not self.temperature > 0:
            raise ValueError(f"sampling needs temperature > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser on int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32  # the product may wrap in int64; its low 32 bits are still right
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def uniform_noise(keys: torch.Tensor, positions: torch.Tensor, vocab: int, seed: int) -> torch.Tensor:
    """``[b, vocab]`` float32 uniforms in (0, 1), a pure function of (seed, key, position, column)."""
    row = _mix32((keys.long() * 0x9E3779B1 + (seed & _M32)) & _M32)
    row = _mix32(row ^ ((positions.long() * 0x85EBCA77) & _M32))[:, None]
    col = (torch.arange(vocab, device=keys.device, dtype=torch.int64) * 0xC2B2AE3D) & _M32
    h = _mix32(row ^ col[None]) >> 8  # 24 bits: exact in float32, so u stays inside (0, 1)
    return (h.float() + 0.5) * (1.0 / 16777216.0)


def next_tokens(logits: torch.Tensor, sampling: Sampling, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``[b, vocab]`` logits (float32, whole vocabulary) -> ``[b]`` int64 tokens.

    ``keys``: each row's request key; ``positions``: the position of the token being chosen.
    """
    if sampling.limit is not None:
        logits = logits[:, : sampling.limit]
    if sampling.greedy:
        return logits.argmax(dim=-1)
    scaled = logits / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(scaled, min(sampling.top_k, scaled.shape[-1]), dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    u = uniform_noise(keys, positions, scaled.shape[-1], sampling.seed)
    return (scaled - torch.log(-torch.log(u))).argmax(dim=-1)
