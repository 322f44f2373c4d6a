"""The ``flash_attn`` backend: the ``flash_attn`` package (FA2), when it imports.

See :mod:`megatron_fapool._optional` for the detection.  Bottom-right causal and native
GQA.  The package is imported inside the calls, so this module imports without it.
"""

from __future__ import annotations

import functools
import inspect

import torch

__all__ = ["flash_attn_backward", "flash_attn_forward"]


def flash_attn_forward(q, k, v, causal, scale):
    from flash_attn import flash_attn_func

    out, lse, _ = flash_attn_func(
        q, k, v, dropout_p=0.0, softmax_scale=scale, causal=causal, return_attn_probs=True
    )
    return out, lse[..., : q.shape[1]]


@functools.lru_cache(maxsize=None)
def _flash_attn_backward_params() -> frozenset[str]:
    from flash_attn.flash_attn_interface import _flash_attn_backward

    try:
        return frozenset(inspect.signature(_flash_attn_backward).parameters)
    except (TypeError, ValueError):  # custom-op wrappers without a Python signature
        schema = getattr(getattr(_flash_attn_backward, "_opoverload", None), "_schema", None)
        if schema is None:
            raise RuntimeError("cannot read the signature of flash_attn's _flash_attn_backward") from None
        return frozenset(a.name for a in schema.arguments)


def flash_attn_backward(dout, q, k, v, out, lse, causal, scale):
    from flash_attn.flash_attn_interface import _flash_attn_backward

    params = _flash_attn_backward_params()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    kw = dict(
        dout=dout, q=q, k=k, v=v, out=out, softmax_lse=lse.float().contiguous(),
        dq=dq, dk=dk, dv=dv, dropout_p=0.0, softmax_scale=scale, causal=causal,
    )
    optional = {
        "window_size": (-1, -1), "window_size_left": -1, "window_size_right": -1,
        "softcap": 0.0, "alibi_slopes": None, "deterministic": False, "rng_state": None,
    }
    kw.update({key: val for key, val in optional.items() if key in params})
    _flash_attn_backward(**kw)
    return dq, dk, dv

