"""Split-K ("flash decoding") Triton kernel for :func:`~.slots.slot_decode`.

The point: read a static slot cache ``[S, cap, hk, d]`` with device-side lengths at HBM
bandwidth.  FA2's varlen kernel with ``seqused_k`` tops out near 2.6 TB/s on an H200 and is
latency bound for one long row; cuDNN's dense SDPA reaches 4.3-4.6 TB/s but needs a fixed
length.  Triton is imported here under a guard (:data:`TRITON_IMPORT_ERROR` says why it is
missing), so installs without it import this module and :mod:`.slots`; the backend then
reports itself unavailable.

Stage 1, grid ``(splits, hk, B)``
    Program ``(sp, kh, b)`` reads ``slot = slots[b]`` and ``n = clamp(lengths[b], 0, cap)``,
    cuts ``[0, n)`` into ``splits`` pieces of ``ceil(ceil(n / splits) / BLOCK_N) * BLOCK_N``
    keys (on the device, so the grid depends on shapes only and short rows still use every
    piece), and runs an online softmax over its piece in ``BLOCK_N``-key tiles: unmasked full
    tiles, then one masked tail.  It computes the ``GROUP = hq // hk`` query heads of kv head
    ``kh`` together, so each K/V tile is read once per group: with ``tl.dot`` on the group
    padded to 16 rows (``GROUP >= DOT_MIN_GROUP``), else with a broadcast multiply and a sum.
    It writes a partial out ``[B, hq, splits, d]`` (float32) and a partial lse
    ``[B, hq, splits]`` (natural log, ``-inf`` for an empty piece, whose out is not written).
    With ``splits == 1`` it writes the final out and lse directly and stage 2 is skipped.
Stage 2, grid ``(hq, B)``
    Combines the pieces with the log-sum-exp rule; pieces with lse ``-inf`` are not read.
    A row with no key gives out 0 and lse ``-inf``.

Everything is launched from shapes alone (no host read of a device value), so the two
launches can be captured in a CUDA graph.  The tile configuration is in
:data:`TILE_CONFIGS` / :data:`DOT_MIN_GROUP` / :data:`COMBINE_*` (tuned on the GPU);
:func:`tile_config` reads them.
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import torch
from torch import Tensor

from ... import _optional

triton, tl = (_optional.triton, _optional.triton_language) if _optional.HAS_TRITON else (None, None)
#: Why Triton is unusable here (``None`` when it imported).
TRITON_IMPORT_ERROR: str | None = None if _optional.HAS_TRITON else (
    _optional.IMPORT_ERRORS.get("triton.language") or _optional.IMPORT_ERRORS.get("triton", "not importable"))[:300]

__all__ = [
    "COMBINE_BLOCK_SPLITS",
    "COMBINE_NUM_WARPS",
    "DOT_MIN_GROUP",
    "TILE_CONFIGS",
    "TRITON_IMPORT_ERROR",
    "TileConfig",
    "tile_config",
    "triton_slot_decode",
]

#: Query groups (``hq // hk``) of at least this size use ``tl.dot`` (the group padded to
#: 16 rows); smaller groups use a broadcast multiply and a sum over head_dim.  1: every group,
#: MHA too: on an H200 (bf16, d=128, 32 heads) the padded ``tl.dot`` read 4.0-4.7 TB/s where
#: the multiply-and-sum read 2.2-2.6.
DOT_MIN_GROUP: int = 1

#: ``(path, head_dim) -> (BLOCK_N, num_warps, num_stages)`` of stage 1, ``path`` being
#: ``"dot"`` or ``"sum"`` (see :data:`DOT_MIN_GROUP`).  BLOCK_N keys per tile.  Groups padded
#: beyond 64 rows get at least 8 warps (:func:`tile_config`).  H200, bf16, CUDA-graph replay:
#: d=128 (128, 4, 3) beat (64, 4, 3) by 2-8% from 8K x 16 up (32 heads MHA / 8 kv heads) and
#: lost 3 us at 8K x 1 GQA; (64, 8, 2) was 10-25% slower; d=64 (128, 4, 3) and d=256
#: (32, 4, 3) were as good as or better than the other sizes tried.  The "sum" rows are untuned.
TILE_CONFIGS: dict[str, dict[int, tuple[int, int, int]]] = {
    "dot": {16: (128, 4, 3), 32: (128, 4, 3), 64: (128, 4, 3), 128: (128, 4, 3), 256: (32, 4, 3)},
    "sum": {16: (128, 4, 2), 32: (128, 4, 2), 64: (64, 4, 2), 128: (32, 4, 2), 256: (16, 4, 2)},
}
#: Stage 2: splits combined per loop iteration, and its warps.
COMBINE_BLOCK_SPLITS: int = 16
COMBINE_NUM_WARPS: int = 4

_LOG2E = 1.0 / math.log(2.0)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _jit(fn):
    """``triton.jit`` when Triton imported; else the plain function (never launched)."""
    return triton.jit(fn) if triton is not None else fn


class TileConfig(NamedTuple):
    """Stage 1's compile-time configuration for one (dtype, head_dim, group)."""

    block_n: int
    num_warps: int
    num_stages: int
    use_dot: bool
    group_pad: int  # query rows per program: the group padded to a power of two (16 at least for tl.dot)


@functools.lru_cache(maxsize=None)
def tile_config(dtype: torch.dtype, head_dim: int, group: int) -> TileConfig:
    """The stage-1 tiles for this call, from :data:`TILE_CONFIGS` and :data:`DOT_MIN_GROUP`.

    The table is for 2-byte dtypes; float32 gets tiles of the same bytes (half the keys), so
    its pipelined K/V buffers fit in shared memory (d=128 with 128 fp32 keys and 3 stages did not).
    """
    use_dot = group >= DOT_MIN_GROUP
    pad = _next_power_of_2(group)
    if use_dot:
        pad = max(16, pad)
    block_n, num_warps, num_stages = TILE_CONFIGS["dot" if use_dot else "sum"][head_dim]
    itemsize = torch.empty((), dtype=dtype).element_size()
    if itemsize > 2:
        block_n = max(16, block_n * 2 // itemsize)
    if pad > 64:
        num_warps = max(num_warps, 8)
    return TileConfig(block_n, num_warps, num_stages, use_dot, pad)


@_jit
def _tile_update(q, k, v, m_i, l_i, acc, qk_scale, valid,
                 USE_DOT: tl.constexpr, GP: tl.constexpr, MASKED: tl.constexpr):
    """One K/V tile of the online softmax (log2 domain).  q [GP, D]; k, v [BLOCK_N, D]; m_i, l_i [GP]."""
    if GP == 1:  # MHA without tl.dot: 2-D products only
        s1 = tl.sum(q * k.to(tl.float32), axis=1) * qk_scale  # [BLOCK_N]
        if MASKED:
            s1 = tl.where(valid, s1, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s1, 0))  # [1]
        alpha = tl.exp2(m_i - m_new)
        p1 = tl.exp2(s1 - m_new)
        l_i = l_i * alpha + tl.sum(p1, 0)
        pv = tl.sum(p1[:, None] * v.to(tl.float32), axis=0)[None, :]
    else:
        if USE_DOT:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # [GP, BLOCK_N] fp32
        else:
            s = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2) * qk_scale
        if MASKED:
            s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if USE_DOT:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
    acc = acc * alpha[:, None] + pv
    return m_new, l_i, acc


@_jit
def _decode_stage1(
    Q, K, V, SLOTS, LENGTHS, PO, PL,
    qk_scale, cap, splits,
    stride_qb, stride_qh,
    stride_ks, stride_kn, stride_kh,
    stride_vs, stride_vn, stride_vh,
    stride_pob, stride_poh, stride_pos,
    stride_plb, stride_plh, stride_pls,
    GROUP: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_DOT: tl.constexpr, DIRECT: tl.constexpr, FOR_LOOP: tl.constexpr,
):
    sp = tl.program_id(0)
    kh = tl.program_id(1)
    b = tl.program_id(2)
    slot = tl.load(SLOTS + b).to(tl.int64)
    n = tl.load(LENGTHS + b).to(tl.int32)
    n = tl.minimum(tl.maximum(n, 0), cap)
    chunk = tl.cdiv(tl.cdiv(n, splits), BLOCK_N) * BLOCK_N
    lo = sp * chunk
    hi = tl.maximum(tl.minimum(lo + chunk, n), lo)
    live = hi > lo
    full_end = lo + ((hi - lo) // BLOCK_N) * BLOCK_N

    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    gmask = offs_g < GROUP
    heads = kh * GROUP + offs_g

    b64 = b.to(tl.int64)
    q_ptrs = Q + b64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=gmask[:, None] & live, other=0.0)
    if not USE_DOT:
        q = q.to(tl.float32)

    kv_off = offs_n[:, None] * stride_kn + offs_d[None, :]
    k_ptrs = K + slot * stride_ks + kh.to(tl.int64) * stride_kh + lo.to(tl.int64) * stride_kn + kv_off
    v_ptrs = V + slot * stride_vs + kh.to(tl.int64) * stride_vh + lo.to(tl.int64) * stride_vn + \
        offs_n[:, None] * stride_vn + offs_d[None, :]

    m_i = tl.full([GP], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GP], dtype=tl.float32)
    acc = tl.zeros([GP, D], dtype=tl.float32)
    all_valid = offs_n < BLOCK_N
    if FOR_LOOP:
        for _ in range(lo, full_end, BLOCK_N):
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
            m_i, l_i, acc = _tile_update(q, k, v, m_i, l_i, acc, qk_scale, all_valid, USE_DOT, GP, False)
            k_ptrs += BLOCK_N * stride_kn
            v_ptrs += BLOCK_N * stride_vn
    else:  # Triton's interpreter (numpy >= 2 cannot take its 1-element scalars as range bounds)
        start = lo
        while start < full_end:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
            m_i, l_i, acc = _tile_update(q, k, v, m_i, l_i, acc, qk_scale, all_valid, USE_DOT, GP, False)
            k_ptrs += BLOCK_N * stride_kn
            v_ptrs += BLOCK_N * stride_vn
            start += BLOCK_N
    if full_end < hi:
        valid = (full_end + offs_n) < hi
        k = tl.load(k_ptrs, mask=valid[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=valid[:, None], other=0.0)
        m_i, l_i, acc = _tile_update(q, k, v, m_i, l_i, acc, qk_scale, valid, USE_DOT, GP, True)

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i > 0, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    po_ptrs = PO + b64 * stride_pob + heads[:, None] * stride_poh + sp * stride_pos + offs_d[None, :]
    if DIRECT:
        tl.store(po_ptrs, out.to(PO.dtype.element_ty), mask=gmask[:, None])
    else:
        tl.store(po_ptrs, out, mask=gmask[:, None] & live)
    tl.store(PL + b64 * stride_plb + heads * stride_plh + sp * stride_pls, lse, mask=gmask)


@_jit
def _decode_stage2(
    PO, PL, OUT, LSE, splits,
    stride_pob, stride_poh, stride_pos,
    stride_plb, stride_plh, stride_pls,
    stride_ob, stride_oh, stride_lb, stride_lh,
    D: tl.constexpr, SPLITS_P2: tl.constexpr, BLOCK_S: tl.constexpr,
):
    h = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pl = PL + b * stride_plb + h * stride_plh
    po = PO + b * stride_pob + h * stride_poh
    offs_all = tl.arange(0, SPLITS_P2)
    lse_all = tl.load(pl + offs_all * stride_pls, mask=offs_all < splits, other=float("-inf"))
    m = tl.max(lse_all, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    denom = tl.sum(tl.exp(lse_all - m_safe), 0)

    offs_d = tl.arange(0, D)
    offs_s = tl.arange(0, BLOCK_S)
    acc = tl.zeros([D], dtype=tl.float32)
    for s0 in range(0, SPLITS_P2, BLOCK_S):  # constexpr bounds: the tail is masked
        idx = s0 + offs_s
        lse_s = tl.load(pl + idx * stride_pls, mask=idx < splits, other=float("-inf"))
        w = tl.exp(lse_s - m_safe)
        o = tl.load(po + idx[:, None] * stride_pos + offs_d[None, :],
                    mask=(lse_s > float("-inf"))[:, None], other=0.0)
        acc += tl.sum(w[:, None] * o, 0)
    out = acc / tl.where(denom > 0, denom, 1.0)
    lse = m_safe + tl.log(denom)  # -inf when no piece had a key
    tl.store(OUT + b * stride_ob + h * stride_oh + offs_d, out.to(OUT.dtype.element_ty))
    tl.store(LSE + b * stride_lb + h * stride_lh, lse)


def triton_slot_decode(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, lengths: Tensor, scale: float, splits: int
) -> tuple[Tensor, Tensor]:
    """The two launches; inputs checked by :func:`~.slots.slot_decode`.  Returns (out, lse float32)."""
    b, hq, d = q.shape
    cap, hk = k_cache.shape[1], k_cache.shape[2]
    group = hq // hk
    out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, hq, dtype=torch.float32, device=q.device)
    if b == 0 or hq == 0:
        return out, lse
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache/v_cache must have a contiguous last dimension for the triton backend")
    if q.stride(-1) != 1:
        q = q.contiguous()
    slots, lengths = slots.contiguous(), lengths.contiguous()
    cfg = tile_config(q.dtype, d, group)
    direct = splits == 1
    if direct:
        po, pl = out, lse
        po_strides = (out.stride(0), out.stride(1), 0)
        pl_strides = (lse.stride(0), lse.stride(1), 0)
    else:
        po = torch.empty(b, hq, splits, d, dtype=torch.float32, device=q.device)
        pl = torch.empty(b, hq, splits, dtype=torch.float32, device=q.device)
        po_strides = po.stride()[:3]
        pl_strides = pl.stride()
    _decode_stage1[(splits, hk, b)](
        q, k_cache, v_cache, slots, lengths, po, pl,
        float(scale) * _LOG2E, cap, splits,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        *po_strides, *pl_strides,
        GROUP=group, GP=cfg.group_pad, D=d, BLOCK_N=cfg.block_n, USE_DOT=cfg.use_dot, DIRECT=direct, FOR_LOOP=not _interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if not direct:
        splits_p2 = _next_power_of_2(splits)
        _decode_stage2[(hq, b)](
            po, pl, out, lse, splits,
            *po_strides, *pl_strides,
            out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
            D=d, SPLITS_P2=splits_p2, BLOCK_S=min(COMBINE_BLOCK_SPLITS, splits_p2),
            num_warps=COMBINE_NUM_WARPS,
        )
    return out, lse
