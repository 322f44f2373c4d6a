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

Usable from Megatron-LM as ``--spec megatron_fapool.models.specs fapool_gpt_layer_spec``.
"""

from __future__ import annotations

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec

from ..attention import Dense, Dilated, FapoolCoreAttention, Pooled
from ..config import RunConfig

__all__ = ["attention_for", "fapool_gpt_layer_spec", "get_fapool_gpt_layer_spec", "layer_spec_for"]


def attention_for(run_config: RunConfig, pool=None):
    """The attend strategy of ``run_config``'s layers; ``pool``: this base rank's
    :class:`~megatron_fapool.attention.pool.AttentionPool`, or ``None`` without pool ranks."""
    fap = run_config.fapool
    backend = fap.attention_backend.backend
    dil = fap.dilated_attention
    inner = Dilated(dil.segment_lengths, dil.dilation_rates, backend) if dil.enabled else Dense(backend)
    return Pooled(inner, pool) if pool is not None else inner


def get_fapool_gpt_layer_spec(*, normalization: str = "RMSNorm", qk_layernorm: bool = False, attend=None) -> ModuleSpec:
    """A GPT ``TransformerLayer`` spec whose core attention is :class:`FapoolCoreAttention` computing ``attend``."""
    spec = get_gpt_layer_local_spec(normalization=normalization, qk_layernorm=qk_layernorm)
    params = {} if attend is None else {"attend": attend}
    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(module=FapoolCoreAttention, params=params)
    return spec


def layer_spec_for(run_config: RunConfig, pool=None, *, wrap=None) -> ModuleSpec:
    """The layer spec of ``run_config``; ``wrap(attend)`` may wrap the strategy (e.g. a KV cache)."""
    lm = run_config.model.language_model
    attend = attention_for(run_config, pool)
    if wrap is not None:
        attend = wrap(attend)
    return get_fapool_gpt_layer_spec(normalization=lm.normalization, qk_layernorm=lm.qk_layernorm, attend=attend)


# For Megatron-LM's --spec flag, which imports an attribute holding a ModuleSpec.
fapool_gpt_layer_spec = get_fapool_gpt_layer_spec()
