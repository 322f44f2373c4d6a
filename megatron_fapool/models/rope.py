"""RoPE at the positions a forward is given, installed once when the model is built.

Megatron 0.16.1's ``GPTModel`` computes RoPE for positions ``0..s-1`` of its input,
the same for every row, and ignores ``position_ids`` (only learned absolute
embeddings read them); its ``RotaryEmbedding`` moves its frequencies to
``torch.cuda.current_device()`` on the first forward. Here, as in gpt-fast
(``Transformer.forward(idx, input_pos)``), positions are data:

* :class:`PositionalRotaryEmbedding` is Megatron's ``RotaryEmbedding`` (its constructor
  arguments, frequencies, interleaving and interpolation) whose forward takes
  its positions from :attr:`~PositionalRotaryEmbedding.positions`, ``[b, s]``, row
  ``i`` at its own positions: ``[s, b, 1, d]`` frequencies, which Megatron's unfused
  RoPE broadcasts over heads. The frequencies stay float32 and follow the module's
  device (``.to(device)``), so it runs on CPU.
* :func:`install_rope` replaces a built model's ``rotary_pos_emb`` by one and
  registers a forward pre-hook on the model that hands each forward's
  ``position_ids`` to it. ``model(ids, position_ids, mask)`` then means the same for
  RoPE as for learned absolute positions: a decode step passes each row's position,
  training passes ``0..s-1``, which is Megatron's own RoPE.

Fused RoPE (``apply_rope_fusion``) takes one position per token for the whole batch,
so a model with it is refused at install.
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rope_utils import get_pos_emb_on_this_cp_rank
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

__all__ = ["PositionalRotaryEmbedding", "install_rope"]


class PositionalRotaryEmbedding(RotaryEmbedding):
    """Megatron's RoPE at the positions of :attr:`positions` (``None``: ``0..s-1``, as Megatron's).

    Takes ``RotaryEmbedding``'s arguments except ``use_cpu_initialization``: the
    frequencies are built on the CPU and move with the module.
    """

    def __init__(self, *args, **kwargs):
        kwargs["use_cpu_initialization"] = True
        super().__init__(*args, **kwargs)
        self.positions: torch.Tensor | None = None  # [b, s] of the forward in progress (set by install_rope's hook)
        self.deferred = False  # True: the model's core attention applies RoPE itself (see defer)

    def defer(self) -> None:
        """From now on return no frequencies: Megatron's attention then skips RoPE, and the model's core
        attention applies it from :attr:`positions` (a slot-served model: cos/sin once per forward instead of
        per layer, ``megatron_fapool.inference.rope_append``). Only for a model whose every layer's core
        attention does so."""
        self.deferred = True

    def _apply(self, fn, recurse=True):
        # inv_freq is a plain attribute, as in Megatron: dtype casts (.bfloat16()) leave it
        # float32, and here it follows the module's device instead of the current CUDA device
        self.inv_freq = self.inv_freq.to(fn(self.inv_freq[:0]).device)
        return super()._apply(fn, recurse)

    def emb_at(self, positions: torch.Tensor) -> torch.Tensor:
        """Positions ``[b, s]`` (integers) -> RoPE frequencies ``[s, b, 1, d]`` (Megatron's ``get_emb`` per row)."""
        seq = positions.t().to(device=self.inv_freq.device, dtype=self.inv_freq.dtype)  # [s, b]
        if self.seq_len_interpolation_factor is not None:
            seq = seq * (1 / self.seq_len_interpolation_factor)
        freqs = seq[..., None] * self.inv_freq  # [s, b, d / 2], torch.outer per row
        if not self.rotary_interleaved:
            emb = torch.cat((freqs, freqs), dim=-1)
        else:
            emb = torch.stack((freqs, freqs), dim=-1).flatten(-2)
        return emb[:, :, None, :]

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None):
        """Megatron's signature; ``[s, b, 1, d]`` at :attr:`positions` ``+ offset`` (``[s, 1, 1, d]`` without them),
        ``None`` when :meth:`deferred <defer>`.

        Packed (THD) sequences index the frequencies by position within each sequence,
        so they get Megatron's ``0..max_seq_len-1``.
        """
        if self.deferred:
            return None
        positions = self.positions
        if positions is None or packed_seq:
            positions = torch.arange(max_seq_len, device=self.inv_freq.device)[None]
        elif positions.dim() != 2 or positions.shape[1] != max_seq_len:
            raise ValueError(
                f"RoPE positions must be [b, s] with s = {max_seq_len} (the forward's sequence length),"
                f" got {tuple(positions.shape)}"
            )
        emb = self.emb_at(positions + offset)
        cp_group = self.cp_group if cp_group is None else cp_group
        if cp_group is not None and cp_group.size() > 1 and not packed_seq:
            emb = get_pos_emb_on_this_cp_rank(emb, 0, cp_group)
        return emb

    def read_positions(self, model, args, kwargs) -> None:
        """Forward pre-hook of the model: its ``position_ids`` (second argument) become :attr:`positions`."""
        self.positions = args[1] if len(args) > 1 else kwargs.get("position_ids")


def install_rope(model) -> PositionalRotaryEmbedding | None:
    """Give a built ``GPTModel`` RoPE that follows its forward's ``position_ids`` (call once, at build).

    The new module is built with the arguments the model gave Megatron's (so the same
    frequencies, checked). Returns it, or ``None`` for a model without RoPE.
    """
    megatron_rope = getattr(model, "rotary_pos_emb", None)
    if megatron_rope is None or model.position_embedding_type != "rope":
        return None
    if isinstance(megatron_rope, PositionalRotaryEmbedding):
        raise ValueError("install_rope was already called on this model")
    if model.config.apply_rope_fusion:
        raise ValueError("RoPE at per-row positions needs apply_rope_fusion=False (the fused kernels take one"
                         " position per token for the whole batch)")
    rope = PositionalRotaryEmbedding(
        kv_channels=model.config.kv_channels,
        rotary_percent=model.rotary_percent,
        rotary_interleaved=megatron_rope.rotary_interleaved,
        seq_len_interpolation_factor=megatron_rope.seq_len_interpolation_factor,
        rotary_base=model.rotary_base,
        rope_scaling=model.rotary_scaling,
        cp_group=megatron_rope.cp_group,
    )
    if not torch.allclose(rope.inv_freq, megatron_rope.inv_freq.cpu(), rtol=1e-6, atol=0.0):
        raise ValueError("RoPE frequencies differ from the model's Megatron RotaryEmbedding (rope_scaling_factor?)")
    model.rotary_pos_emb = rope
    model.register_forward_pre_hook(rope.read_positions, with_kwargs=True)
    return rope
