"""Gather dilated blocks into dense tensors, run the kernel on them, scatter back.

The index path (:mod:`.plan`), for the branches the strided views cannot express.
Tensors are contiguous ``[b, n, H, *tail]`` (tail = ``(d,)`` for Q/K/V/O, empty for the
lse kept sequence-major as ``[b, n, H]``); gathers are ``index_select`` on the
``[b, n*H, *tail]`` view (head_dim contiguous elements per index), scatters
``index_copy_`` / ``index_add_``. A :class:`~.plan.BlockGroup` of ``J`` blocks of ``L``
rows and ``hc`` heads gathers into ``[b*J, L, hc, *tail]``: the segments fold into the
batch dimension, so one kernel call covers all of them. No buffer grows with ``n*w`` or
``n^2``; temporaries are bounded by ``max_rows_x_heads`` per call.

Forward merges each block result into the running (out, lse) accumulators with
``merge_partials``; backward calls ``attention_backward`` per block with the *merged*
out and lse (the ring-flash-attention rule), so the branch gradients simply add up.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..kernels import attention_backward, attention_forward, merge_partials
from .plan import BlockGroup

__all__ = [
    "DEFAULT_MAX_ROWS_X_HEADS",
    "blocks_backward_",
    "blocks_forward_",
    "gather_blocks",
    "scatter_blocks_",
]

DEFAULT_MAX_ROWS_X_HEADS = 1 << 22


def gather_blocks(x: torch.Tensor, index: torch.Tensor, rows_slice: tuple[int, int] | None) -> torch.Tensor:
    """Blocks of ``x`` [b, n, H, *tail] as ``[b*J, L, hc, *tail]`` (index: [J, L, hc] into
    ``x`` viewed as [b, n*H, *tail]); a view when the group is a row slice."""
    b, tail = x.shape[0], x.shape[3:]
    num_blocks, length, heads = index.shape
    if rows_slice is not None:
        return x[:, rows_slice[0] : rows_slice[1]].reshape(b * num_blocks, length, x.shape[2], *tail)
    flat = x.reshape(b, -1, *tail)  # a view for the contiguous tensors we pass
    return flat.index_select(1, index.reshape(-1)).reshape(b * num_blocks, length, heads, *tail)


def scatter_blocks_(
    dst: torch.Tensor,
    index: torch.Tensor,
    rows_slice: tuple[int, int] | None,
    values: torch.Tensor,
    mode: str,
) -> None:
    """Write ``values`` ([b*J, L, hc, *tail]) back into contiguous ``dst`` [b, n, H, *tail].

    mode ``"copy"``: overwrite; ``"add"``: add (repeated indices are summed).
    """
    b, tail = dst.shape[0], dst.shape[3:]
    if mode not in ("copy", "add"):
        raise ValueError(f"mode must be 'copy' or 'add', got {mode!r}")
    if rows_slice is not None:
        num_blocks, length = index.shape[:2]
        view = dst[:, rows_slice[0] : rows_slice[1]].view(b, num_blocks, length, dst.shape[2], *tail)
        vals = values.reshape(b, num_blocks, length, dst.shape[2], *tail)
        (view.copy_ if mode == "copy" else view.add_)(vals)
        return
    flat = dst.view(b, -1, *tail)
    vals = values.reshape(b, -1, *tail).to(dst.dtype)
    if mode == "copy":
        flat.index_copy_(1, index.reshape(-1), vals)
    else:
        flat.index_add_(1, index.reshape(-1), vals)


def _lse_blocks(lse_seq: torch.Tensor, group: BlockGroup) -> torch.Tensor:
    """Sequence-major lse [b, n, H] gathered to the kernel's layout [b*J, hc, L]."""
    return gather_blocks(lse_seq, group.q_index, group.q_slice).transpose(1, 2)


def _chunks(groups: Iterable[BlockGroup], max_rows_x_heads: int | None):
    for group in groups:
        yield from group.chunks(max_rows_x_heads)


def blocks_forward_(
    acc_out: torch.Tensor,
    acc_lse: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    groups: Iterable[BlockGroup],
    *,
    softmax_scale: float,
    backend: str,
    max_rows_x_heads: int | None = DEFAULT_MAX_ROWS_X_HEADS,
) -> None:
    """Attend every block of ``groups`` and LSE-merge it into ``acc_out`` [b, n, H, d]
    and ``acc_lse`` [b, n, H] (updated in place)."""
    for c in _chunks(groups, max_rows_x_heads):
        qb = gather_blocks(q, c.q_index, c.q_slice)
        kb = gather_blocks(k, c.k_index, c.k_slice)
        vb = gather_blocks(v, c.k_index, c.k_slice)
        new_out, new_lse = attention_forward(qb, kb, vb, causal=c.causal, softmax_scale=softmax_scale, backend=backend)
        prev_out = gather_blocks(acc_out, c.q_index, c.q_slice)
        new_out, new_lse = merge_partials(prev_out, _lse_blocks(acc_lse, c), new_out, new_lse)
        scatter_blocks_(acc_out, c.q_index, c.q_slice, new_out, "copy")
        scatter_blocks_(acc_lse, c.q_index, c.q_slice, new_lse.transpose(1, 2), "copy")


def blocks_backward_(
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse_seq: torch.Tensor,
    groups: Iterable[BlockGroup],
    *,
    softmax_scale: float,
    backend: str,
    max_rows_x_heads: int | None = DEFAULT_MAX_ROWS_X_HEADS,
) -> None:
    """Add every block's gradient contribution to ``dq``, ``dk``, ``dv``.

    ``out`` / ``lse_seq`` are the *merged* output and lse ([b, n, H]), so each block's
    contribution is its exact share of the gradient of the union softmax.
    """
    for c in _chunks(groups, max_rows_x_heads):
        qb = gather_blocks(q, c.q_index, c.q_slice)
        kb = gather_blocks(k, c.k_index, c.k_slice)
        vb = gather_blocks(v, c.k_index, c.k_slice)
        dout_b = gather_blocks(dout, c.q_index, c.q_slice)
        out_b = gather_blocks(out, c.q_index, c.q_slice)
        dq_b, dk_b, dv_b = attention_backward(
            dout_b, qb, kb, vb, out_b, _lse_blocks(lse_seq, c),
            causal=c.causal, softmax_scale=softmax_scale, backend=backend,
        )
        scatter_blocks_(dq, c.q_index, c.q_slice, dq_b, "add")
        scatter_blocks_(dk, c.k_index, c.k_slice, dk_b, "add")
        scatter_blocks_(dv, c.k_index, c.k_slice, dv_b, "add")
