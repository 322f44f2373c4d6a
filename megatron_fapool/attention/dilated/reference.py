"""Dense float64 reference for dilated attention, built directly from DESIGN.md §4.

O_h = softmax(tau * Q_h K_h^T + log C_h) V_h, with C_h the multiplicity of key j in the
union over branches of S_k(i, h); log 0 = -inf; a row with no keys outputs 0 and has
lse = -inf. One head at a time, O(n^2) memory per head: for tests, not for training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .args import DilatedArgs, check_dilated_args
from .plan import effective_segment, head_offset

__all__ = [
    "dilated_attention_reference",
    "dilated_attention_reference_vjp",
    "dilated_multiplicity",
]


def dilated_multiplicity(
    seq_len: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    global_head: int,
    total_heads: int,
    causal: bool,
    device: torch.device | None = None,
) -> torch.Tensor:
    """C_h[i, j] = sum_k 1[j in S_k(i, h)] as an [n, n] int32 tensor."""
    idx = torch.arange(seq_len, device=device)
    count = torch.zeros(seq_len, seq_len, dtype=torch.int32, device=device)
    for w, r in zip(segment_lengths, dilation_rates):
        seg = effective_segment(w, seq_len)
        g = idx // seg
        sel = ((idx - g * seg) % r) == head_offset(global_head, total_heads, r)
        mask = (g[:, None] == g[None, :]) & sel[:, None] & sel[None, :]
        if causal:
            mask &= idx[None, :] <= idx[:, None]
        count += mask.to(torch.int32)
    return count


def _head_terms(q, k, v, log_c, scale):
    """(probabilities P, output O, lse) for one head: q [b, n, d], k/v [b, n, d].

    Autograd through this is NaN-free when every row has a key (vjp below is exact always)."""
    logits = torch.einsum("bid,bjd->bij", q, k) * scale + log_c  # -inf where C = 0
    lse = torch.logsumexp(logits, dim=-1)  # -inf on rows with no key
    shift = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.exp(logits - shift[..., None])  # empty rows: exp(-inf) = 0
    return probs, torch.einsum("bij,bjd->bid", probs, v), lse


def _log_multiplicity(q: torch.Tensor, h: int, args: DilatedArgs) -> torch.Tensor:
    """log C for local head ``h`` as float64 [n, n] (-inf where C = 0)."""
    c = dilated_multiplicity(
        q.shape[1], args.segment_lengths, args.dilation_rates, global_head=args.head_offset + h,
        total_heads=args.total_heads, causal=args.causal, device=q.device,
    )
    return c.double().log()


def dilated_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *call, **heads
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [b, n, h, d] float64, lse [b, h, n] float64) from the definition.

    ``*call, **heads``: the rest of a :func:`~.check_dilated_args` call (segment lengths,
    rates, causal, softmax scale, ``head_offset=``, ``total_heads=``), as
    :func:`~megatron_fapool.attention.dilated.dilated_attention` takes them."""
    args = check_dilated_args(q, k, v, *call, **heads)
    q, k, v = q.double(), k.double(), v.double()
    outs, lses = [], []
    for h in range(q.shape[2]):
        kv = h // args.kv_group
        _, o, lse = _head_terms(q[:, :, h], k[:, :, kv], v[:, :, kv], _log_multiplicity(q, h, args), args.softmax_scale)
        outs.append(o)
        lses.append(lse)
    return torch.stack(outs, dim=2), torch.stack(lses, dim=1)


def dilated_attention_reference_vjp(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *call, **heads
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, dq, dk, dv) in float64, the gradients by the softmax backward formulas, one
    head at a time: dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = tau dS K,
    dK = tau dS^T Q (summed over the query heads of a kv head under GQA).

    ``*call, **heads`` as for :func:`dilated_attention_reference`."""
    args = check_dilated_args(q, k, v, *call, **heads)
    scale = args.softmax_scale
    q, k, v, dout = q.double(), k.double(), v.double(), dout.double()
    out = torch.zeros_like(q)
    dq = torch.zeros_like(q)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    for h in range(q.shape[2]):
        kv = h // args.kv_group
        qh, kh, vh, doh = q[:, :, h], k[:, :, kv], v[:, :, kv], dout[:, :, h]
        probs, o, _ = _head_terms(qh, kh, vh, _log_multiplicity(q, h, args), scale)
        out[:, :, h] = o
        dv[:, :, kv] += torch.einsum("bij,bid->bjd", probs, doh)
        ds = probs * (torch.einsum("bid,bjd->bij", doh, vh) - (doh * o).sum(-1, keepdim=True))
        dq[:, :, h] = torch.einsum("bij,bjd->bid", ds, kh) * scale
        dk[:, :, kv] += torch.einsum("bij,bid->bjd", ds, qh) * scale
    return out, dq, dk, dv
