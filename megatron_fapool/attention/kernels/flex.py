"""The ``flex`` backend (``torch.nn.attention.flex_attention``) and the recompute backward.

``flex`` uses a bottom-right ``mask_mod`` and ``return_aux=AuxRequest(lse=True)``; it is
``torch.compile``-d on CUDA (one compiled function per process, compiled per shape).  On
CPU it runs eagerly (torch's CPU compile path cannot return the LSE) and has no backward.

*Recompute backward* (``flex``, ``sdpa_math``: kernels that cannot take a given out/lse):
the block is recomputed with autograd, giving its local ``out_l`` and ``lse_l``.  With
``c = exp(lse_l - lse)`` per row, the exact block gradient for the global ``(out, lse)``
is the autograd gradient with upstream gradients ``g_out = c * dout`` and
``g_lse = rowsum(g_out * out_l) - c * rowsum(dout * out)`` (the second term turns the
kernel's local ``D`` into the global one).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from .layout import bhsd

__all__ = ["flex_backward", "flex_forward", "recompute_backward"]


def recompute_backward(
    fwd_diff: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]],
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact block gradients for a given global (out, lse) from a kernel that can
    only differentiate its own forward (the algebra is in the module docstring)."""
    with torch.enable_grad():
        qd, kd, vd = (x.detach().requires_grad_(True) for x in (q, k, v))
        out_l, lse_l = fwd_diff(qd, kd, vd)
    lse_g = lse.float()
    lse_l32 = lse_l.detach().float()
    # c = exp(lse_l - lse) <= 1; rows with no mass globally (lse = -inf) get c = 0.
    c = torch.where(torch.isneginf(lse_g), torch.zeros_like(lse_g), torch.exp(lse_l32 - lse_g))
    c_rows = bhsd(c).unsqueeze(-1)  # [b, s, h, 1]
    g_out = (dout.float() * c_rows).to(out_l.dtype)
    d_kernel = (g_out.float() * out_l.detach().float()).sum(-1)  # what the kernel will use as D
    d_global = (dout.float() * out.float()).sum(-1) * c_rows.squeeze(-1)
    g_lse = bhsd(d_kernel - d_global).to(lse_l.dtype)
    if not lse_l.requires_grad:
        raise RuntimeError(
            "this torch cannot differentiate the kernel's LSE, which the backward from a given "
            "(global) out/lse needs; use another backend"
        )
    dq, dk, dv = torch.autograd.grad((out_l, lse_l), (qd, kd, vd), (g_out, g_lse.contiguous()))
    return dq, dk, dv


@functools.cache
def _flex_compiled() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex_fn(device: torch.device) -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention  # eager: torch's CPU compile path cannot return the LSE
    return _flex_compiled()


@functools.lru_cache(maxsize=64)
def _flex_block_mask(sq: int, sk: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    offset = sk - sq

    def bottom_right_causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + offset

    dev = torch.device(device)
    return create_block_mask(bottom_right_causal, None, None, sq, sk, device=dev, _compile=dev.type == "cuda")


def _flex_diff(q, k, v, causal, scale):
    block_mask = _flex_block_mask(q.shape[1], k.shape[1], str(q.device)) if causal else None
    fn = _flex_fn(q.device)
    kwargs = dict(block_mask=block_mask, scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # older torch
        out, lse = fn(bhsd(q), bhsd(k), bhsd(v), return_lse=True, **kwargs)
    else:
        out, aux = fn(bhsd(q), bhsd(k), bhsd(v), return_aux=AuxRequest(lse=True), **kwargs)
        lse = aux.lse
    return bhsd(out), lse


def flex_forward(q, k, v, causal, scale):
    with warnings.catch_warnings():
        # eager flex on CPU warns that it is unfused; that is known and documented
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return _flex_diff(q, k, v, causal, scale)


def flex_backward(dout, q, k, v, out, lse, causal, scale):
    return recompute_backward(lambda a, b_, c: _flex_diff(a, b_, c, causal, scale), dout, q, k, v, out, lse)

