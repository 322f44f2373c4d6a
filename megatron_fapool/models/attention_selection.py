"""Which core attention a run's layers use, from the resolved config (one place).

=================  =====================  ==============================
``dilated_attention.enabled``  attention pool  core attention
=================  =====================  ==============================
no                 none                   :class:`LocalCoreAttention`
no                 yes                    :class:`PoolCoreAttention` (zigzag queries, K/V replicated)
yes                none                   :class:`DilatedCoreAttention`
yes                yes                    :class:`PoolDilatedCoreAttention` (pool splits heads)
=================  =====================  ==============================
"""

from __future__ import annotations

from ..config import RunConfig

__all__ = ["core_attention_for", "layer_spec_for"]


def core_attention_for(run_config: RunConfig, pool=None) -> tuple[type, dict]:
    """``(module class, params)`` of the core attention for ``run_config``.

    ``pool``: this base rank's :class:`~megatron_fapool.attention.pool.AttentionPool`,
    or ``None`` when the rank has no pool ranks.
    """
    fap = run_config.fapool
    params: dict = {"backend": fap.attention_backend.backend}
    dil = fap.dilated_attention
    if dil.enabled:
        params.update(segment_lengths=tuple(dil.segment_lengths), dilation_rates=tuple(dil.dilation_rates))
        if pool is not None:
            from ..attention.dilated_core_attention import PoolDilatedCoreAttention

            return PoolDilatedCoreAttention, {**params, "pool": pool}
        from ..attention.dilated_core_attention import DilatedCoreAttention

        return DilatedCoreAttention, params
    if pool is not None:
        from ..attention.pool import PoolCoreAttention

        return PoolCoreAttention, {**params, "pool": pool}
    from ..attention.core_attention import LocalCoreAttention

    return LocalCoreAttention, params


def layer_spec_for(run_config: RunConfig, pool=None):
    """The fapool GPT layer spec of ``run_config`` with :func:`core_attention_for`'s module."""
    from .gpt_layer_specs import get_fapool_gpt_layer_spec

    lm = run_config.model.language_model
    module, params = core_attention_for(run_config, pool)
    return get_fapool_gpt_layer_spec(
        normalization=lm.normalization, qk_layernorm=lm.qk_layernorm,
        core_attention=module, core_attention_params=params,
    )
