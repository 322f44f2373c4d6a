"""Deferred RoPE of slot serving: Megatron's formula bitwise (torch ops), and the CUDA kernel within one
rounding of them (Triton contracts multiply-adds, so the last bit may differ)."""

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

from megatron_fapool.inference.rope_append import rotate, rotate_and_append


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotate_is_megatrons_rope(interleaved, dtype):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(3, 5, 4, 16, generator=g).to(dtype)  # [b, s, h, d]
    freqs = torch.rand(3, 5, 1, 16, generator=g) * 40
    ours = rotate(t, torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype), interleaved)
    assert torch.equal(ours, _apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=interleaved))


def _append_case(device, dtype):
    g = torch.Generator().manual_seed(1)
    b, hq, hk, d, slots, cap = 5, 8, 2, 64, 6, 40
    q, k, v = (torch.randn(b, 1, h, d, generator=g).to(device=device, dtype=dtype)[:, 0] for h in (hq, hk, hk))
    freqs = (torch.rand(b, d, generator=g) * 30).to(device)
    cos, sin = torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype)
    kc = torch.zeros(slots, cap, hk, d, dtype=dtype, device=device)
    vc = torch.zeros_like(kc)
    sl = torch.tensor([4, 0, 2, 5, 1], device=device)
    pos = torch.tensor([0, 39, 7, 3, 12], device=device)
    return q, k, v, cos, sin, kc, vc, sl, pos


def test_rotate_and_append_on_cpu():
    q, k, v, cos, sin, kc, vc, sl, pos = _append_case("cpu", torch.float32)
    out = rotate_and_append(q, k, v, cos, sin, kc, vc, sl, pos)
    assert torch.equal(out, rotate(q, cos[:, None], sin[:, None]))
    assert torch.equal(kc[sl, pos], rotate(k, cos[:, None], sin[:, None])) and torch.equal(vc[sl, pos], v)
    assert int((kc != 0).any(-1).any(-1).sum()) == 5  # nothing else written


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_equals_torch_ops(dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    q, k, v, cos, sin, kc, vc, sl, pos = _append_case("cuda", dtype)
    kc2, vc2 = kc.clone(), vc.clone()
    out = rotate_and_append(q, k, v, cos, sin, kc, vc, sl, pos)  # the Triton kernel
    c, s = cos[:, None], sin[:, None]
    kc2[sl, pos], vc2[sl, pos] = rotate(k, c, s), v
    tol = dict(rtol=2 ** -7, atol=2 ** -6) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, rotate(q, c, s), **tol)
    torch.testing.assert_close(kc, kc2, **tol)
    assert torch.equal(vc, vc2)
