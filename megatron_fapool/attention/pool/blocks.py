"""A member's share of a pooled attention: pure functions over its query chunks.

Inputs are in Megatron's native ``[s, b, h, d]`` layout; the kernels see ``[b, s, h, d]``
views. Chunk ``(lo, hi)`` attends (causal: bottom-right aligned) to the key prefix
``[0, hi)``, so its output rows are complete: nothing needs merging across members.
"""

from __future__ import annotations

import torch

from ..kernels import attention_backward, attention_forward

__all__ = ["chunks_backward", "chunks_forward"]


def _bshd(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, 1)


def chunks_forward(qs, spans, k, v, *, causal, softmax_scale, backend):
    """``qs[i]``: ``[hi-lo, b, h, d]`` queries of chunk ``spans[i]``; ``k``, ``v``: ``[>=hi, b, hk, d]``.

    Returns lists of outputs ``[hi-lo, b, h, d]`` and lse ``[b, h, hi-lo]`` (fp32).
    """
    outs, lses = [], []
    for q, (lo, hi) in zip(qs, spans):
        kk, vv = (k[:hi], v[:hi]) if causal else (k, v)
        out, lse = attention_forward(
            _bshd(q), _bshd(kk), _bshd(vv), causal=causal, softmax_scale=softmax_scale, backend=backend
        )
        outs.append(_bshd(out))
        lses.append(lse)
    return outs, lses


def chunks_backward(douts, qs, spans, k, v, outs, lses, *, causal, softmax_scale, backend, kv_len):
    """Gradients of the chunks: ``dq`` per chunk and ``dk``, ``dv`` summed over ``[0, kv_len)``."""
    # accumulate in the input dtype: one addition per chunk (two chunks per member), and
    # half the memory traffic of an fp32 buffer in bf16
    dk = torch.zeros((kv_len,) + tuple(k.shape[1:]), dtype=k.dtype, device=k.device)
    dv = torch.zeros_like(dk)
    dqs = []
    for dout, q, (lo, hi), out, lse in zip(douts, qs, spans, outs, lses):
        kk, vv = (k[:hi], v[:hi]) if causal else (k[:kv_len], v[:kv_len])
        dq, dkc, dvc = attention_backward(
            _bshd(dout), _bshd(q), _bshd(kk), _bshd(vv), _bshd(out), lse,
            causal=causal, softmax_scale=softmax_scale, backend=backend,
        )
        dqs.append(_bshd(dq))
        dk[: kk.shape[0]] += _bshd(dkc)
        dv[: vv.shape[0]] += _bshd(dvc)
    return dqs, dk, dv
