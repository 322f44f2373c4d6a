"""Model FLOPs of a training step, dense or dilated attention (for the training log).

Megatron's formula (``num_floating_point_operations`` in Megatron-LM's training loop,
after Narayanan et al. 2021, appendix) counts every GEMM three times (forward, weight
gradient, data gradient) at 2 FLOPs per multiply-add, and the core attention as dense
causal (half of the ``n x n`` score matrix). With dilated attention that last term is
wrong by orders of magnitude at long contexts, so here the core attention is counted
from the pairs actually attended:

* dense: ``4 * head_dim * heads * pairs`` forward per layer and sequence, with
  ``pairs = n (n + 1) / 2`` causal (the lower triangle with its diagonal; Megatron
  writes ``n^2 / 2``) or ``n^2`` without a mask;
* dilated: :func:`~megatron_fapool.attention.dilated.dilated_attention_flops`, the same
  count over the attended (query, key) pairs of every branch (a pair two branches
  share is computed twice, so counted twice).

Per token and layer, forward (``h`` hidden, ``H`` heads, ``g`` query groups, ``d``
head dim, ``f`` FFN size, ``V`` vocabulary):

* QKV projection ``2 h (H d + 2 g d)``, output projection ``2 H d h``;
* MLP ``2 h f (2 if gated else 1) + 2 f h`` (MoE: times the routed top-k);
* logits (once, not per layer) ``2 h V``.

Training = 3 x forward for every term (Megatron's convention: a fused attention
kernel's recomputation in backward is not counted). The numbers are for the whole
model and micro-batch, however it is split over TP ranks and the pool.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..attention.dilated import dilated_attention_flops

__all__ = [
    "FlopCount",
    "attention_forward_flops",
    "dense_attention_forward_flops",
    "flop_count",
    "model_flops_per_token",
    "step_flops",
]

TRAINING_FACTOR = 3  # forward + 2 x backward


def dense_attention_forward_flops(seq_length: int, *, num_heads: int, head_dim: int, causal: bool = True) -> int:
    """Forward FLOPs of dense attention for one sequence and one layer (QK^T and PV)."""
    n = seq_length
    pairs = n * (n + 1) // 2 if causal else n * n
    return 4 * head_dim * num_heads * pairs


def attention_forward_flops(run_config, seq_length: int, *, causal: bool = True) -> int:
    """Core-attention forward FLOPs of one sequence through one layer (dense or dilated per config)."""
    lm = run_config.model.language_model
    dil = run_config.fapool.dilated_attention
    if dil.enabled:
        return dilated_attention_flops(
            seq_length, dil.segment_lengths, dil.dilation_rates,
            num_heads=lm.num_attention_heads, head_dim=lm.head_dim, causal=causal,
        )
    return dense_attention_forward_flops(seq_length, num_heads=lm.num_attention_heads, head_dim=lm.head_dim, causal=causal)


@dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs of one sequence of ``seq_length`` tokens through the whole model."""

    seq_length: int
    projections: int  # QKV + output projection, all layers
    mlp: int  # all layers
    logits: int
    attention: int  # core attention, all layers

    @property
    def dense_parts(self) -> int:
        return self.projections + self.mlp + self.logits

    @property
    def forward(self) -> int:
        return self.dense_parts + self.attention

    @property
    def training(self) -> int:
        """Forward + backward."""
        return TRAINING_FACTOR * self.forward


def flop_count(run_config, seq_length: int, *, causal: bool = True) -> FlopCount:
    lm = run_config.model.language_model
    h, heads, groups, d = lm.hidden_size, lm.num_attention_heads, lm.query_groups, lm.head_dim
    ffn = lm.ffn_hidden_size or 4 * h
    if lm.num_moe_experts:  # each token runs top-k experts of the expert FFN size, plus its router
        ffn = lm.moe_ffn_hidden_size or ffn
    gated = lm.activation_func == "swiglu"
    routed = lm.moe_router_topk if lm.num_moe_experts else 1
    n, layers = seq_length, lm.num_layers
    proj_per_token = 2 * h * (heads * d + 2 * groups * d) + 2 * heads * d * h
    mlp_per_token = (2 * h * ffn * (2 if gated else 1) + 2 * ffn * h) * routed
    return FlopCount(
        seq_length=n,
        projections=layers * n * proj_per_token,
        mlp=layers * n * mlp_per_token,
        logits=n * 2 * h * lm.vocab_size,
        attention=layers * attention_forward_flops(run_config, n, causal=causal),
    )


def step_flops(run_config, batch: int, seq_length: int, *, causal: bool = True) -> int:
    """Model FLOPs (forward + backward) of a micro-batch of ``batch`` sequences of ``seq_length``."""
    return batch * flop_count(run_config, seq_length, causal=causal).training


def model_flops_per_token(run_config, seq_length: int, *, causal: bool = True) -> float:
    """Training FLOPs per token at ``seq_length`` (forward + backward; attention averaged over the sequence)."""
    return flop_count(run_config, seq_length, causal=causal).training / seq_length
