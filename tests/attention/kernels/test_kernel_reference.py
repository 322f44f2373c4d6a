"""The dense float64 reference itself, against a naive loop (so the anchor is not trusted blindly)."""

from __future__ import annotations

import torch

from megatron_fapool.attention.kernels.reference import reference_attention


def test_reference_matches_naive_loop():
    g = torch.Generator().manual_seed(1)
    b, sq, sk, hq, hkv, d = 1, 5, 7, 4, 2, 3
    q = torch.randn(b, sq, hq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, sk, hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, sk, hkv, d, generator=g, dtype=torch.float64)
    out, lse = reference_attention(q, k, v, causal=True, softmax_scale=0.7)
    for h in range(hq):
        kh = h // (hq // hkv)
        for i in range(sq):
            keys = [j for j in range(sk) if j <= i + (sk - sq)]
            s = torch.stack([(q[0, i, h] * k[0, j, kh]).sum() * 0.7 for j in keys])
            p = torch.softmax(s, 0)
            o = sum(p[t] * v[0, j, kh] for t, j in enumerate(keys))
            torch.testing.assert_close(out[0, i, h], o)
            torch.testing.assert_close(lse[0, h, i], torch.logsumexp(s, 0))
    # sq > sk: leading rows see nothing
    q2 = torch.randn(1, 7, 2, 3, generator=g, dtype=torch.float64)
    k2 = torch.randn(1, 5, 2, 3, generator=g, dtype=torch.float64)
    out, lse = reference_attention(q2, k2, k2, causal=True)  # sq=7 > sk=5
    assert torch.all(out[:, :2] == 0) and torch.all(torch.isneginf(lse[..., :2]))
    assert torch.isfinite(lse[..., 2:]).all()
