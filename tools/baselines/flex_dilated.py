"""Dilated attention through torch's FlexAttention: the baselines of ``tools/bench_dilated.py``.

A second implementation of DESIGN.md §4, written against torch only (nothing of the
package), so a match with ours means two independent readings of the definition agree:

* :class:`FlexUnion` — ONE FlexAttention call, block mask of the union of the branches
  and ``score_mod = score + log C`` (C = multiplicity of the key over the branches): the
  definition itself in one kernel. Its block mask covers every segment, so it computes
  far more than the dilated FLOPs.
* :class:`FlexBranches` — LongNet's form: one call per branch with that branch's dilated
  block mask, the outputs merged by their lse (autograd through the merge and the lse).

Both take ``[b, n, heads, d]`` (our layout) and are compiled on CUDA; on CPU flex runs
eagerly and has no backward (``backward_ok`` is False).
"""

from __future__ import annotations

import warnings

import torch
import torch._dynamo
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

try:
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # older torch: flex_attention(..., return_lse=True)
    AuxRequest = None

__all__ = ["FlexBranches", "FlexUnion", "reset_compiled"]

_EAGER_WARNING = ".*flex_attention called without torch.compile.*"  # eager flex on CPU: known, unfused


def _allow_recompiles() -> None:
    """Every n (and head subset) compiles anew: allow more than dynamo's default 8."""
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))


def reset_compiled() -> None:
    """Drop compiled flex graphs (each n compiles anew anyway) and what they hold."""
    try:
        torch._dynamo.reset()
    except Exception:  # noqa: BLE001
        pass


def _heads_per_offset(total_heads: int, rate: int) -> int:
    return -(-total_heads // rate)  # ceil(H / r): head h has offset h // ceil(H / r)


class FlexUnion:
    """FlexAttention with one block mask for the union of branches and score_mod + log C.

    Local heads are global heads ``first_head ..`` of ``total_heads``. The block mask is
    computed for head 0 and broadcast over heads when that is exact (some branch has
    r = 1, so every block's emptiness is head-independent, and no r exceeds the 128-row
    block); otherwise per head.
    """

    def __init__(self, n, segs, rates, total_heads, first_head, num_heads, causal, device, scale):
        ws = [min(w, n) for w in segs]
        per = [_heads_per_offset(total_heads, r) for r in rates]

        def count(h, q_idx, kv_idx):
            gh = h + first_head
            c = None
            for w, r, hp in zip(ws, rates, per):
                s = gh // hp
                hit = (q_idx // w == kv_idx // w) & ((q_idx % w) % r == s) & ((kv_idx % w) % r == s)
                c = hit.to(torch.int32) if c is None else c + hit.to(torch.int32)
            if causal:
                c = c * (kv_idx <= q_idx).to(torch.int32)
            return c

        def mask_mod(b, h, q_idx, kv_idx):
            return count(h, q_idx, kv_idx) > 0

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + torch.log(count(h, q_idx, kv_idx).to(score.dtype))

        broadcast = 1 in rates and max(rates) <= 128
        cuda = device.type == "cuda"
        _allow_recompiles()
        self.block_mask = create_block_mask(
            mask_mod, None, None if broadcast else num_heads, n, n, device=device, _compile=cuda
        )
        self.score_mod, self.scale = score_mod, scale
        self.fn = torch.compile(flex_attention, dynamic=False) if cuda else flex_attention
        self.backward_ok = cuda  # torch: "FlexAttention does not support backward on CPU"

    def __call__(self, q, k, v):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_EAGER_WARNING)
            out = self.fn(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                score_mod=self.score_mod, block_mask=self.block_mask, scale=self.scale,
            )
        return out.transpose(1, 2)


class FlexBranches:
    """LongNet's form: one FlexAttention call per branch with that branch's dilated block
    mask, the branch outputs merged by their lse (autograd through the merge and lse)."""

    def __init__(self, n, segs, rates, total_heads, first_head, num_heads, causal, device, scale):
        cuda = device.type == "cuda"
        _allow_recompiles()
        self.masks = []
        for w, r in zip(segs, rates):
            w, hp = min(w, n), _heads_per_offset(total_heads, r)

            def mask_mod(b, h, q_idx, kv_idx, w=w, r=r, hp=hp):
                s = (h + first_head) // hp
                hit = (q_idx // w == kv_idx // w) & ((q_idx % w) % r == s) & ((kv_idx % w) % r == s)
                return hit & (kv_idx <= q_idx) if causal else hit

            # Head 0's block structure is every head's when r <= 128 (see FlexUnion).
            heads = None if r <= 128 else num_heads
            self.masks.append(create_block_mask(mask_mod, None, heads, n, n, device=device, _compile=cuda))
        self.scale = scale
        self.fn = torch.compile(flex_attention, dynamic=False) if cuda else flex_attention
        self.backward_ok = cuda

    def __call__(self, q, k, v):
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        outs, lses = [], []
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_EAGER_WARNING)
            for mask in self.masks:
                if AuxRequest is None:
                    o, lse = self.fn(qt, kt, vt, block_mask=mask, scale=self.scale, return_lse=True)
                else:
                    o, aux = self.fn(qt, kt, vt, block_mask=mask, scale=self.scale, return_aux=AuxRequest(lse=True))
                    lse = aux.lse
                outs.append(o)
                lses.append(lse.float())
        lse_all = torch.logsumexp(torch.stack(lses), dim=0)  # every row has a key when r=1 is a branch
        out = sum(torch.exp(l - lse_all).unsqueeze(-1) * o.float() for o, l in zip(outs, lses))
        return out.to(q.dtype).transpose(1, 2)
