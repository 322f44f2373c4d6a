"""The ``math`` backend: pure torch, any device and dtype, chunked over query rows.

Computes in float32 (float64 stays float64); processes query rows in chunks of at most
:data:`MATH_CHUNK_ROWS`, capped so one score chunk has at most
:data:`MATH_CHUNK_ELEMENTS` elements, and skips the fully masked key columns of a chunk.
The correctness anchor among the fast backends and the CPU fallback.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .layout import accumulator_dtype, bhsd, grouped

__all__ = ["MATH_CHUNK_ELEMENTS", "MATH_CHUNK_ROWS", "chunk_mask", "math_backward", "math_forward"]

#: Query rows per chunk of the ``math`` backend (at most).
MATH_CHUNK_ROWS: int = 1024
#: Upper bound on the elements of one ``math`` score chunk (b * hq * rows * keys).
MATH_CHUNK_ELEMENTS: int = 1 << 27


def _math_rows_per_chunk(batch_heads: int, keys: int) -> int:
    return max(1, min(MATH_CHUNK_ROWS, MATH_CHUNK_ELEMENTS // max(1, batch_heads * keys)))


def _chunk_keys(i0: int, i1: int, sq: int, sk: int, causal: bool) -> int:
    """Keys [0, kv) that rows [i0, i1) can see at all."""
    return min(sk, i1 + sk - sq) if causal else sk


def chunk_mask(i0: int, i1: int, kv: int, sq: int, sk: int, device: torch.device) -> Tensor:
    """[rows, kv] bool, True where the key is masked out (bottom-right causal)."""
    i = torch.arange(i0, i1, device=device).unsqueeze(1)
    j = torch.arange(kv, device=device).unsqueeze(0)
    return j > i + (sk - sq)


def math_forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    cdt = accumulator_dtype(q.dtype)
    kh = bhsd(k).to(cdt)  # [b, hkv, sk, d]
    vh = bhsd(v).to(cdt)
    qg = grouped(q, hkv)
    out = torch.zeros(b, sq, hq, d, dtype=q.dtype, device=q.device)
    lse = torch.full((b, hq, sq), float("-inf"), dtype=accumulator_dtype(q.dtype), device=q.device)
    out_g = out.view(b, sq, hkv, g, d)
    lse_g = lse.view(b, hkv, g, sq)
    rows = _math_rows_per_chunk(b * hq, sk)
    for i0 in range(0, sq, rows):
        i1 = min(sq, i0 + rows)
        cs = i1 - i0
        kv = _chunk_keys(i0, i1, sq, sk, causal)
        if kv <= 0:
            continue  # every row of the chunk is empty: out 0, lse -inf
        qc = qg[:, :, :, i0:i1].to(cdt).reshape(b, hkv, g * cs, d)
        s = torch.matmul(qc, kh[:, :, :kv].transpose(-1, -2)).mul_(scale)
        if causal:
            s.view(b, hkv, g, cs, kv).masked_fill_(chunk_mask(i0, i1, kv, sq, sk, q.device), float("-inf"))
        m = s.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        p = s.sub_(m).exp_()
        denom = p.sum(dim=-1, keepdim=True)
        o = torch.matmul(p, vh[:, :, :kv]).div_(torch.where(denom > 0, denom, torch.ones_like(denom)))
        lse_c = (m + torch.log(denom)).view(b, hkv, g, cs)
        out_g[:, i0:i1] = o.view(b, hkv, g, cs, d).permute(0, 3, 1, 2, 4).to(q.dtype)
        lse_g[..., i0:i1] = lse_c.to(lse.dtype)
    return out, lse


def math_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, causal: bool, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    cdt = accumulator_dtype(q.dtype)
    kh = bhsd(k).to(cdt)
    vh = bhsd(v).to(cdt)
    qg, dog, og = grouped(q, hkv), grouped(dout, hkv), grouped(out, hkv)
    lse_g = lse.reshape(b, hkv, g, sq)
    dq = torch.zeros(b, sq, hq, d, dtype=q.dtype, device=q.device)
    dq_g = dq.view(b, sq, hkv, g, d)
    dk_acc = torch.zeros(b, hkv, sk, d, dtype=cdt, device=q.device)
    dv_acc = torch.zeros(b, hkv, sk, d, dtype=cdt, device=q.device)
    rows = _math_rows_per_chunk(b * hq, sk)
    for i0 in range(0, sq, rows):
        i1 = min(sq, i0 + rows)
        cs = i1 - i0
        kv = _chunk_keys(i0, i1, sq, sk, causal)
        if kv <= 0:
            continue
        qc = qg[:, :, :, i0:i1].to(cdt).reshape(b, hkv, g * cs, d)
        doc = dog[:, :, :, i0:i1].to(cdt).reshape(b, hkv, g * cs, d)
        oc = og[:, :, :, i0:i1].to(cdt).reshape(b, hkv, g * cs, d)
        delta = (doc * oc).sum(dim=-1, keepdim=True)
        lse_c = lse_g[..., i0:i1].to(cdt).reshape(b, hkv, g * cs, 1)
        # A row with lse = -inf has no probability mass anywhere: make p = 0 there.
        lse_c = torch.where(torch.isneginf(lse_c), torch.full_like(lse_c, float("inf")), lse_c)
        k_c, v_c = kh[:, :, :kv], vh[:, :, :kv]
        s = torch.matmul(qc, k_c.transpose(-1, -2)).mul_(scale)
        if causal:
            s.view(b, hkv, g, cs, kv).masked_fill_(chunk_mask(i0, i1, kv, sq, sk, q.device), float("-inf"))
        p = s.sub_(lse_c).exp_()
        dv_acc[:, :, :kv] += torch.matmul(p.transpose(-1, -2), doc)
        ds = torch.matmul(doc, v_c.transpose(-1, -2)).sub_(delta).mul_(p)
        dq_c = torch.matmul(ds, k_c).mul_(scale)
        dk_acc[:, :, :kv] += torch.matmul(ds.transpose(-1, -2), qc).mul_(scale)
        dq_g[:, i0:i1] = dq_c.view(b, hkv, g, cs, d).permute(0, 3, 1, 2, 4).to(q.dtype)
    dk = bhsd(dk_acc).to(k.dtype).contiguous()
    dv = bhsd(dv_acc).to(v.dtype).contiguous()
    return dq, dk, dv

