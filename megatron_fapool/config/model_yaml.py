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

__all__ = [
    "DEFAULT_MOE_AUX_LOSS_COEFF", "LanguageModel", "ModelParallel", "ModelYaml", "UniqueKeyLoader", "activation",
    "to_transformer_config",
]

# The load-balancing loss coefficient of an MoE model whose YAML (and fapool.ma_separation) give none.
# Megatron's CLI default is 0.0 (no load balancing); fapool's is 0.01 whether or not MA separation
# is on, so that switching MA separation on or off never changes the model's loss.
DEFAULT_MOE_AUX_LOSS_COEFF = 0.01


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
    # MoE: Megatron's MoELayer (TopKRouter, allgather dispatcher, SequentialMLP experts) in every
    # layer when num_moe_experts is set; the other moe_* keys need it.
    num_moe_experts: Optional[PositiveInt] = None
    moe_router_topk: PositiveInt = 2
    moe_ffn_hidden_size: Optional[PositiveInt] = None  # FFN size of one expert; default ffn_hidden_size
    moe_aux_loss_coeff: Optional[float] = Field(
        None, ge=0, description=f"load-balancing loss coefficient; default {DEFAULT_MOE_AUX_LOSS_COEFF}"
        " (fapool's, with or without MA separation; Megatron's CLI default is 0.0)",
    )
    moe_z_loss_coeff: Optional[float] = Field(None, ge=0, description="router z-loss coefficient; none by default")
    moe_expert_capacity_factor: Optional[float] = Field(
        None, gt=0, description="capacity per expert (tokens dropped beyond it); default none: no token is dropped"
    )
    moe_router_dtype: Literal["fp32", "fp64"] = "fp32"  # router logits, probabilities and aux losses

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
        if self.num_moe_experts is None:
            given = sorted(k for k in self.model_fields_set if k.startswith("moe_"))
            if given:
                raise ValueError(f"{', '.join(given)} given without num_moe_experts: set num_moe_experts or remove them")
        elif self.moe_router_topk > self.num_moe_experts:
            raise ValueError(
                f"moe_router_topk {self.moe_router_topk} exceeds num_moe_experts {self.num_moe_experts}"
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
    # Megatron expert parallelism over the base ranks: only 1 (every base rank holds all experts;
    # the loader says why), experts on other ranks are fapool.ma_separation.
    expert_model_parallel_size: PositiveInt = 1
    # Not a choice: off for dense models (the pool needs whole sequences on base ranks; attention
    # sees them anyway), on for MoE models at TP > 1 (Megatron's MoELayer trains only so).
    sequence_parallel: Literal[False] = False


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
    """Megatron ``TransformerConfig`` for ``model`` on the given base grid.

    An MoE model (``num_moe_experts``) gets every MoE key of the YAML, Megatron's
    ``aux_loss`` load balancing, the ``allgather`` dispatcher, ``SequentialMLP`` experts
    (no grouped GEMM), expert parallel and expert tensor parallel sizes 1 (every rank
    holding experts holds whole experts), and ``sequence_parallel`` at TP > 1: Megatron's
    ``MoELayer`` trains with TP only so. The sequence length must then divide by TP, and
    a forward of a length that does not (a decode step) needs ``sequence_parallel=False``
    in ``overrides`` (allowed in eval: every TP rank then routes the whole sequence).
    """
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = params_dtype or torch.float32
    func, gated = activation(model.activation_func)
    moe = {}
    if model.num_moe_experts:
        moe = dict(
            num_moe_experts=model.num_moe_experts,
            moe_router_topk=model.moe_router_topk,
            moe_ffn_hidden_size=model.moe_ffn_hidden_size or model.ffn_hidden_size or 4 * model.hidden_size,
            moe_aux_loss_coeff=(
                DEFAULT_MOE_AUX_LOSS_COEFF if model.moe_aux_loss_coeff is None else model.moe_aux_loss_coeff
            ),
            moe_z_loss_coeff=model.moe_z_loss_coeff,
            moe_expert_capacity_factor=model.moe_expert_capacity_factor,
            moe_router_dtype=model.moe_router_dtype,
            moe_router_load_balancing_type="aux_loss",
            moe_token_dispatcher_type="allgather",
            moe_grouped_gemm=False,
            expert_model_parallel_size=1,
            expert_tensor_parallel_size=1,
            sequence_parallel=tensor_model_parallel_size > 1,
        )
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
        **moe,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)
