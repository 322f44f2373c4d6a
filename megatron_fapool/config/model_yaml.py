"""Megatron-style model YAML: ``language_model:`` and ``model_parallel:`` sections.

Keys are named like Megatron's CLI flags (``--num-layers`` is ``num_layers``) and
like Megatron-LM's own ``--yaml-cfg`` files. Unknown keys and wrong types are
errors; duplicate keys in the YAML are errors (PyYAML silently keeps the last).
:func:`to_transformer_config` maps the model onto Megatron's ``TransformerConfig``.
"""

from __future__ import annotations

from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator

__all__ = ["LanguageModel", "ModelParallel", "ModelYaml", "UniqueKeyLoader", "activation", "to_transformer_config"]


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a mapping key given twice."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class LanguageModel(_Section):
    num_layers: PositiveInt
    hidden_size: PositiveInt
    num_attention_heads: PositiveInt
    ffn_hidden_size: Optional[PositiveInt] = None  # default 4 * hidden_size, as Megatron
    num_query_groups: Optional[PositiveInt] = None  # GQA; default = num_attention_heads
    kv_channels: Optional[PositiveInt] = None  # head dim; default hidden / heads
    vocab_size: PositiveInt = Field(description="padded vocabulary size of the embedding")
    max_position_embeddings: PositiveInt
    seq_length: Optional[PositiveInt] = None  # default training length; default max_position_embeddings
    position_embedding_type: Literal["learned_absolute", "rope", "none"] = "learned_absolute"
    rotary_base: PositiveInt = 10000
    normalization: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    layernorm_epsilon: PositiveFloat = 1e-5
    activation_func: Literal["gelu", "swiglu", "squared_relu", "silu", "relu"] = "gelu"
    add_bias_linear: bool = True
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    hidden_dropout: float = Field(0.1, ge=0, lt=1)
    attention_dropout: float = Field(0.1, ge=0, lt=1)
    init_method_std: PositiveFloat = 0.02
    untie_embeddings_and_output_weights: bool = False
    # MoE (used by MA separation)
    num_moe_experts: Optional[PositiveInt] = None
    moe_router_topk: PositiveInt = 2

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @model_validator(mode="after")
    def _check(self):
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}: change one, or set kv_channels"
            )
        if self.num_attention_heads % self.query_groups:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_query_groups {self.query_groups}"
            )
        if self.seq_length and self.seq_length > self.max_position_embeddings:
            raise ValueError(
                f"seq_length {self.seq_length} exceeds max_position_embeddings "
                f"{self.max_position_embeddings}"
            )
        return self


class ModelParallel(_Section):
    tensor_model_parallel_size: PositiveInt = 1
    pipeline_model_parallel_size: PositiveInt = 1
    sequence_parallel: Literal[False] = False  # the pool needs whole sequences on base ranks


class ModelYaml(_Section):
    language_model: LanguageModel
    model_parallel: ModelParallel = ModelParallel()


def activation(name: str):
    """``(function, gated)`` of an ``activation_func`` name (gated: a GLU, like Megatron's ``gated_linear_unit``)."""
    import torch.nn.functional as F

    return {
        "gelu": (F.gelu, False),
        "swiglu": (F.silu, True),
        "silu": (F.silu, False),
        "relu": (F.relu, False),
        "squared_relu": (lambda x: F.relu(x).pow(2), False),
    }[name]


def to_transformer_config(
    model: LanguageModel,
    *,
    tensor_model_parallel_size: int,
    pipeline_model_parallel_size: int,
    params_dtype=None,
    use_cpu_initialization: bool = True,
    **overrides,
):
    """Megatron ``TransformerConfig`` for ``model`` on the given base grid."""
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = params_dtype or torch.float32
    func, gated = activation(model.activation_func)
    kwargs = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        ffn_hidden_size=model.ffn_hidden_size or 4 * model.hidden_size,
        num_query_groups=model.query_groups,
        kv_channels=model.head_dim,
        normalization=model.normalization,
        layernorm_epsilon=model.layernorm_epsilon,
        activation_func=func,
        gated_linear_unit=gated,
        bias_activation_fusion=False,
        add_bias_linear=model.add_bias_linear,
        add_qkv_bias=model.add_qkv_bias,
        qk_layernorm=model.qk_layernorm,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std,
        num_moe_experts=model.num_moe_experts,
        moe_router_topk=model.moe_router_topk if model.num_moe_experts else 2,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=use_cpu_initialization,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)
