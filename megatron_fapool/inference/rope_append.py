"""RoPE applied by the slot attention: once-per-forward cos/sin, and a decode step's rotate-and-append in one kernel.

Megatron applies RoPE to q and k in every layer from the frequencies, computing
``cos(freqs)`` and ``sin(freqs)`` and the rotation anew each time: about 24 small kernels
per layer of a decode step, more than half of a captured step's kernels for the paper
model. A served model whose RoPE is *deferred* to its :class:`~.slots.SlotAttention`
(:meth:`~megatron_fapool.models.rope.PositionalRotaryEmbedding.defer`) computes cos/sin
once per forward (:func:`cos_sin`) and rotates in the core attention:

* :func:`rotate` is Megatron's formula (``t * cos + rotate_half(t) * sin``, cos/sin cast to
  the input dtype first), so the result is bitwise Megatron's;
* :func:`rotate_and_append` does a decode step's whole RoPE + K/V append: rotated q out,
  rotated k and v written at ``(slots[i], positions[i])`` of the layer's cache. On CUDA one
  Triton kernel (the torch formula with every product and the sum rounded to the input
  dtype; Triton's contraction of multiply-adds may still move the last bit, measured within
  one rounding); elsewhere, or for interleaved / partial rotary, the torch ops.
"""

from __future__ import annotations

import torch

from .. import _optional

triton, tl = (_optional.triton, _optional.triton_language) if _optional.HAS_TRITON else (None, None)

__all__ = ["cos_sin", "rotate", "rotate_and_append"]


def cos_sin(rope, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``[b, s]`` positions -> cos, sin ``[b, s, 1, d]`` in ``dtype``, as Megatron casts them before rotating."""
    freqs = rope.emb_at(positions).transpose(0, 1)  # [b, s, 1, d] float32
    return torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype)


def _rotate_half(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if not interleaved:
        x1, x2 = torch.chunk(x, 2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Megatron's ``_apply_rotary_pos_emb_bshd`` given cos/sin: ``t`` ``[..., d]``, rotary dim ``cos.shape[-1]``."""
    rot = cos.shape[-1]
    t, t_pass = t[..., :rot], t[..., rot:]
    t = (t * cos) + (_rotate_half(t, interleaved) * sin)
    return torch.cat((t, t_pass), dim=-1) if t_pass.shape[-1] else t


if triton is not None:
    @triton.jit
    def _rope_append_kernel(Q, K, V, COS, SIN, QO, KC, VC, SLOTS, POS,
                            sqb, sqh, skb, skh, svb, svh, scb, sks, skn, skh2, svs, svn, svh2, sqob, sqoh,
                            HQ: tl.constexpr, HK: tl.constexpr, HALF: tl.constexpr):
        b = tl.program_id(0)
        j = tl.program_id(1)  # q heads, then k heads, then v heads
        offs = tl.arange(0, HALF)
        if j < HQ + HK:
            if j < HQ:
                src = Q + b * sqb + j * sqh
            else:
                src = K + b * skb + (j - HQ) * skh
            x1 = tl.load(src + offs)
            x2 = tl.load(src + HALF + offs)
            dt = x1.dtype
            c1 = tl.load(COS + b * scb + offs).to(tl.float32)
            c2 = tl.load(COS + b * scb + HALF + offs).to(tl.float32)
            s1 = tl.load(SIN + b * scb + offs).to(tl.float32)
            s2 = tl.load(SIN + b * scb + HALF + offs).to(tl.float32)
            # t * cos + rotate_half(t) * sin with each product and the sum rounded to t's dtype, as torch does
            a1 = (x1.to(tl.float32) * c1).to(dt).to(tl.float32)
            a2 = (x2.to(tl.float32) * c2).to(dt).to(tl.float32)
            r1 = (-x2.to(tl.float32) * s1).to(dt).to(tl.float32)
            r2 = (x1.to(tl.float32) * s2).to(dt).to(tl.float32)
            o1 = (a1 + r1).to(dt)
            o2 = (a2 + r2).to(dt)
            if j < HQ:
                dst = QO + b * sqob + j * sqoh
            else:
                slot = tl.load(SLOTS + b)
                pos = tl.load(POS + b)
                dst = KC + slot * sks + pos * skn + (j - HQ) * skh2
            tl.store(dst + offs, o1)
            tl.store(dst + HALF + offs, o2)
        else:
            h = j - HQ - HK
            slot = tl.load(SLOTS + b)
            pos = tl.load(POS + b)
            src = V + b * svb + h * svh
            dst = VC + slot * svs + pos * svn + h * svh2
            tl.store(dst + offs, tl.load(src + offs))
            tl.store(dst + HALF + offs, tl.load(src + HALF + offs))


def _kernel_applies(q, k_cache, cos, interleaved: bool) -> bool:
    d = q.shape[-1]
    return (triton is not None and q.is_cuda and not interleaved and cos.shape[-1] == d and d % 2 == 0
            and (d // 2) & (d // 2 - 1) == 0 and q.stride(-1) == 1 and k_cache.is_contiguous())


def rotate_and_append(q, k, v, cos, sin, k_cache, v_cache, slots, positions, *, interleaved: bool = False):
    """A decode step's RoPE and K/V append: q/k/v ``[B, h, d]``, cos/sin ``[B, d]`` (input dtype), caches
    ``[S, cap, hk, d]``; rotated k and v written at ``(slots[i], positions[i])``; returns rotated q ``[B, hq, d]``."""
    if not _kernel_applies(q, k_cache, cos, interleaved) or k.stride(-1) != 1 or v.stride(-1) != 1:
        c, s = cos[:, None], sin[:, None]
        k_cache[slots, positions] = rotate(k, c, s, interleaved)
        v_cache[slots, positions] = v
        return rotate(q, c, s, interleaved)
    b, hq, d = q.shape
    hk = k.shape[1]
    q_out = torch.empty((b, hq, d), dtype=q.dtype, device=q.device)
    cos, sin = cos.contiguous(), sin.contiguous()
    _rope_append_kernel[(b, hq + 2 * hk)](
        q, k, v, cos, sin, q_out, k_cache, v_cache, slots, positions,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), q_out.stride(0), q_out.stride(1), HQ=hq, HK=hk, HALF=d // 2,
    )
    return q_out
