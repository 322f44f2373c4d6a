"""Layer specs: Megatron's own local GPT layer spec with our core attention swapped in.

Everything else (norms, QKV / output projections, MLP, bias-dropout-add) is
Megatron's. Usable from Megatron-LM as
``--spec megatron_fapool.models.gpt_layer_specs fapool_gpt_layer_spec``.
"""

from __future__ import annotations

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec

from ..attention.core_attention import LocalCoreAttention

__all__ = ["fapool_gpt_layer_spec", "get_fapool_gpt_layer_spec"]


def get_fapool_gpt_layer_spec(
    *,
    normalization: str = "RMSNorm",
    qk_layernorm: bool = False,
    core_attention: type = LocalCoreAttention,
    core_attention_params: dict | None = None,
) -> ModuleSpec:
    """A GPT ``TransformerLayer`` spec whose core attention is ``core_attention``."""
    spec = get_gpt_layer_local_spec(normalization=normalization, qk_layernorm=qk_layernorm)
    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(
        module=core_attention, params=dict(core_attention_params or {})
    )
    return spec


# For Megatron-LM's --spec flag, which imports an attribute holding a ModuleSpec.
fapool_gpt_layer_spec = get_fapool_gpt_layer_spec()
