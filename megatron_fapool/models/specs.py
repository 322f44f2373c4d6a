"""Layer specs: Megatron's own local GPT layer spec with our core attention swapped in.

Everything else (norms, QKV / output projections, MLP, bias-dropout-add) is Megatron's.
Which attention a run's layers compute comes from the config alone
(:func:`attention_for`):

==============================  ==============  ===================================
``dilated_attention.enabled``   attention pool  attend strategy
==============================  ==============  ===================================
no                              none            ``Dense``
no                              yes             ``Pooled(Dense)`` (zigzag queries, K/V replicated)
yes                             none            ``Dilated``
yes                             yes             ``Pooled(Dilated)`` (the pool splits heads)
==============================  ==============  ===================================

An MoE model (``num_moe_experts`` in the YAML) gets Megatron's own MoE layer in every
layer (``MoELayer``: ``TopKRouter`` routing, allgather dispatcher, ``SequentialMLP``
experts) with two pieces swapped: the router is :class:`~megatron_fapool.moe.FapoolTopKRouter`
(Megatron's routing; its gating runs without Transformer Engine, on any device) and, for
MA separation, ``experts`` is the caller's module (``RemoteExperts`` on attention ranks).

Where the local spec has Megatron's ``WrappedTorchNorm`` (the torch ``LayerNorm``/``RMSNorm``
it builds without Apex or TE) the norm is :class:`FapoolNorm`, the same module, which also
runs sequence parallel (an MoE model at TP > 1).

Usable from Megatron-LM as ``--spec megatron_fapool.models.specs fapool_gpt_layer_spec`` (dense).
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

from ..attention import Dense, Dilated, FapoolCoreAttention, Pooled
from ..config import RunConfig
from ..moe import FapoolTopKRouter

__all__ = ["FapoolNorm", "attention_for", "fapool_gpt_layer_spec", "get_fapool_gpt_layer_spec", "layer_spec_for"]


class FapoolNorm:
    """Megatron's ``WrappedTorchNorm`` (``transformer/torch_norm.py``) that also runs sequence parallel.

    Builds the same module (``torch.nn.LayerNorm`` or ``torch.nn.RMSNorm`` by
    ``config.normalization``, same arguments, same parameter names) and marks its parameters
    ``sequence_parallel`` as Megatron's fused norms do, so the TP sum of their gradients
    (``models.gpt.finalize_tensor_parallel_grads``, Megatron's ``finalize_model_grads``) finds
    them. Megatron's wrapper refuses sequence parallelism because it does not mark them.
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                zero_centered_gamma: bool = False, normalization: str = "LayerNorm"):
        for flag in ("layernorm_zero_centered_gamma", "persist_layer_norm", "memory_efficient_layer_norm"):
            if getattr(config, flag):
                raise ValueError(f"{flag} is not supported by torch's norms (FapoolNorm)")
        norms = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        if config.normalization not in norms:
            raise ValueError(f"normalization {config.normalization!r}: only {sorted(norms)} are supported")
        norm = norms[config.normalization](normalized_shape=hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)
        return norm


def attention_for(run_config: RunConfig, pool=None):
    """The attend strategy of ``run_config``'s layers; ``pool``: this base rank's
    :class:`~megatron_fapool.attention.pool.AttentionPool`, or ``None`` without pool ranks."""
    fap = run_config.fapool
    backend = fap.attention_backend.backend
    dil = fap.dilated_attention
    inner = Dilated(dil.segment_lengths, dil.dilation_rates, backend) if dil.enabled else Dense(backend)
    return Pooled(inner, pool) if pool is not None else inner


def get_fapool_gpt_layer_spec(
    *, normalization: str = "RMSNorm", qk_layernorm: bool = False, attend=None, num_experts: int | None = None,
    experts: ModuleSpec | None = None,
) -> ModuleSpec:
    """A GPT ``TransformerLayer`` spec whose core attention is :class:`FapoolCoreAttention` computing ``attend``.

    With ``num_experts`` the MLP is Megatron's MoE local spec
    (``get_gpt_layer_local_spec(num_experts=...)``) with :class:`FapoolTopKRouter`;
    ``experts`` (a ``ModuleSpec``) replaces its ``experts`` submodule (``SequentialMLP``).
    """
    if experts is not None and not num_experts:
        raise ValueError("experts= replaces the experts of an MoE layer: give num_experts too")
    spec = get_gpt_layer_local_spec(num_experts=num_experts, normalization=normalization, qk_layernorm=qk_layernorm)
    params = {} if attend is None else {"attend": attend}
    attention = spec.submodules.self_attention.submodules
    attention.core_attention = ModuleSpec(module=FapoolCoreAttention, params=params)
    layer: TransformerLayerSubmodules = spec.submodules
    for owner, name in ((layer, "input_layernorm"), (layer, "pre_mlp_layernorm"), (attention, "q_layernorm"),
                        (attention, "k_layernorm")):
        if getattr(owner, name) is WrappedTorchNorm:
            setattr(owner, name, FapoolNorm)
    if num_experts:
        moe = spec.submodules.mlp.submodules
        moe.router = FapoolTopKRouter
        if experts is not None:
            moe.experts = experts
    return spec


def layer_spec_for(run_config: RunConfig, pool=None, *, wrap=None, experts: ModuleSpec | None = None) -> ModuleSpec:
    """The layer spec of ``run_config``; ``wrap(attend)`` may wrap the strategy (e.g. a KV cache);
    ``experts`` replaces the experts of an MoE model's layers (MA separation)."""
    lm = run_config.model.language_model
    attend = attention_for(run_config, pool)
    if wrap is not None:
        attend = wrap(attend)
    return get_fapool_gpt_layer_spec(
        normalization=lm.normalization, qk_layernorm=lm.qk_layernorm, attend=attend,
        num_experts=lm.num_moe_experts, experts=experts,
    )


# For Megatron-LM's --spec flag, which imports an attribute holding a ModuleSpec.
fapool_gpt_layer_spec = get_fapool_gpt_layer_spec()
