"""All-gather-K/V context parallelism: the CP baseline of ``tools/bench_pool_attention.py``.

The sequence of ``n`` tokens is cut into ``2P`` chunks of ``c = n / 2P``; rank ``r`` of
the ``P`` ranks holds chunks ``r`` and ``2P - 1 - r`` of q, k, v (head-tail load
balance, the layout of torch's ``_HeadTailLoadBalancer``). Forward: one all-gather of K
and V, then the local kernel (``megatron_fapool.attention.kernels``, bottom-right
causal) for each own query chunk against the key prefix it sees. Backward: per chunk
``attention_backward`` with the chunk's out/lse; dK/dV accumulated in fp32 over the
whole sequence and reduce-scattered back to the owners of the chunks, in the input
dtype as TransformerEngine's all-gather CP does (or ``reduce_dtype``).

Why not torch's own (``torch.distributed.tensor.experimental._context_parallel``,
``ALL_GATHER`` rotation + ``_HeadTailLoadBalancer``, as torchtitan applies it): on
torch 2.13 it dispatches only the CUDA SDPA ops (flash, efficient, cuDNN), so it does
not run on CPU/gloo, where the benchmark's smoke test runs (``_scaled_dot_product_flash_attention_for_cpu``
has no sharding strategy; the math backend mixes DTensor and Tensor), and it would time
torch's SDPA kernels, not the local kernel (``--backend``) that every other strategy of
the benchmark uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_fapool.attention import kernels as L

__all__ = ["allgather_kv_attention", "head_tail_shard", "head_tail_unshard"]


def head_tail_shard(x: torch.Tensor, rank: int, world: int, dim: int = 1) -> torch.Tensor:
    """Rank ``rank``'s chunks ``rank`` and ``2 world - 1 - rank`` of ``x`` (of ``2 world`` along ``dim``)."""
    chunks = x.chunk(2 * world, dim=dim)
    return torch.cat((chunks[rank], chunks[2 * world - 1 - rank]), dim=dim)


def head_tail_unshard(parts: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """The whole tensor, in sequence order, from every rank's :func:`head_tail_shard` (in rank order)."""
    world = len(parts)
    chunks = [None] * (2 * world)
    for r, part in enumerate(parts):
        chunks[r], chunks[2 * world - 1 - r] = part.chunk(2, dim=dim)
    return torch.cat(chunks, dim=dim)


@dataclass(frozen=True)
class _Opts:
    group: dist.ProcessGroup
    rank: int
    world: int
    chunk: int  # c: tokens per chunk
    scale: float
    backend: str
    reduce_dtype: torch.dtype | None


def allgather_kv_attention(q, k, v, *, group, softmax_scale: float, backend: str = "auto",
                           reduce_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Causal attention of this rank's :func:`head_tail_shard` of q, k, v (``[b, 2c, h, d]``) over ``group``."""
    if q.shape[1] % 2:
        raise ValueError(f"a rank holds two chunks of equal length, got {q.shape[1]} tokens")
    opts = _Opts(group=group, rank=dist.get_rank(group), world=dist.get_world_size(group), chunk=q.shape[1] // 2,
                 scale=softmax_scale, backend=backend, reduce_dtype=reduce_dtype)
    return _AllGatherKVAttention.apply(q, k, v, opts)


class _AllGatherKVAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, opts: _Opts):
        group, r, P, c = opts.group, opts.rank, opts.world, opts.chunk
        kv = torch.stack((k, v), dim=0).contiguous()  # [2, b, 2c, hk, d]
        gathered = torch.empty((P,) + tuple(kv.shape), dtype=kv.dtype, device=kv.device)
        dist.all_gather_into_tensor(gathered.view((P * 2,) + tuple(kv.shape[1:])), kv, group=group)
        kv_full = head_tail_unshard(list(gathered.unbind(0)), dim=2)  # [2, b, n, hk, d] in sequence order
        del gathered
        outs, lses, his = [], [], []
        for slot, chunk in enumerate((r, 2 * P - 1 - r)):
            hi = (chunk + 1) * c
            o, lse = L.attention_forward(
                q[:, slot * c:(slot + 1) * c], kv_full[0, :, :hi], kv_full[1, :, :hi],
                causal=True, softmax_scale=opts.scale, backend=opts.backend,
            )
            outs.append(o)
            lses.append(lse)
            his.append(hi)
        out = torch.cat(outs, dim=1)
        ctx.save_for_backward(q, kv_full, out, *lses)
        ctx.opts, ctx.his = opts, his
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, kv_full, out, *lses = ctx.saved_tensors
        opts = ctx.opts
        P, c = opts.world, opts.chunk
        b, n, hk, d = kv_full.shape[1:]
        dkv = torch.zeros((2, b, n, hk, d), dtype=torch.float32, device=q.device)
        dqs = []
        for slot, hi in enumerate(ctx.his):
            sl = slice(slot * c, (slot + 1) * c)
            dq, dk, dv = L.attention_backward(
                dout[:, sl].contiguous(), q[:, sl], kv_full[0, :, :hi], kv_full[1, :, :hi], out[:, sl], lses[slot],
                causal=True, softmax_scale=opts.scale, backend=opts.backend,
            )
            dqs.append(dq)
            dkv[0, :, :hi] += dk
            dkv[1, :, :hi] += dv
        # rank-major order for the reduce-scatter: rank s gets its chunks s and 2P-1-s
        rdt = opts.reduce_dtype or q.dtype
        send = torch.empty((P, 2, b, 2 * c, hk, d), dtype=rdt, device=q.device)
        for s in range(P):
            send[s] = head_tail_shard(dkv, s, P, dim=2)
        del dkv
        mine = torch.empty((2, b, 2 * c, hk, d), dtype=rdt, device=q.device)
        dist.reduce_scatter_tensor(mine, send.view(P * 2, b, 2 * c, hk, d), group=opts.group)
        return torch.cat(dqs, dim=1), mine[0].to(q.dtype), mine[1].to(q.dtype), None
