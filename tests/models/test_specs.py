"""attention_for / layer_spec_for: dense / dilated x local / pool, and dense / MoE MLPs, from the config alone."""

import dataclasses
import os

import pytest
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_fapool.attention import Dense, Dilated, FapoolCoreAttention, Pooled
from megatron_fapool.config import load_run_config
from megatron_fapool.inference.session import InferenceSession, KVCached
from megatron_fapool.models.specs import attention_for, fapool_gpt_layer_spec, get_fapool_gpt_layer_spec, layer_spec_for

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("name, pool, strategy", [
    ("tiny_dense_pool.json", None, Dense),
    ("tiny_dense_pool.json", "POOL", Pooled),
    ("tiny_dilated.json", None, Dilated),
    ("tiny_dilated.json", "POOL", Pooled),
])
def test_selection(name, pool, strategy):
    cfg = load_run_config(os.path.join(ROOT, "configs", name))
    attend = attention_for(cfg, pool)
    assert type(attend) is strategy
    inner = attend.inner if pool else attend
    assert getattr(attend, "pool", None) == pool
    assert inner.backend == cfg.fapool.attention_backend.backend
    if cfg.fapool.dilated_attention.enabled:
        assert type(inner) is Dilated
        assert inner.segment_lengths == (128, 256, 512) and inner.dilation_rates == (1, 2, 4)
    else:
        assert type(inner) is Dense
    spec = layer_spec_for(cfg, pool).submodules.self_attention.submodules.core_attention
    assert spec.module is FapoolCoreAttention and repr(spec.params["attend"]) == repr(attend)


def test_dilated_switch_is_the_config_section():
    cfg = load_run_config(os.path.join(ROOT, "configs", "tiny_dilated.json"))
    off = dataclasses.replace(cfg, fapool=cfg.fapool.model_copy(
        update={"dilated_attention": cfg.fapool.dilated_attention.model_copy(update={"enabled": False})}))
    assert type(attention_for(off)) is Dense


def test_megatron_lm_spec_attribute_and_kv_cached_wrap():
    assert fapool_gpt_layer_spec.submodules.self_attention.submodules.core_attention.module is FapoolCoreAttention
    cfg = load_run_config(os.path.join(ROOT, "configs", "tiny_dense_pool.json"))
    session = InferenceSession(None)
    spec = layer_spec_for(cfg, wrap=lambda attend: KVCached(attend, session))
    attend = spec.submodules.self_attention.submodules.core_attention.params["attend"]
    assert type(attend) is KVCached and type(attend.inner) is Dense and attend.session is session
    dil = load_run_config(os.path.join(ROOT, "configs", "tiny_dilated.json"))
    with pytest.raises(ValueError, match="dense attention only"):
        layer_spec_for(dil, wrap=lambda attend: KVCached(attend, session))


def test_moe_config_gets_megatrons_moe_layer_with_our_router():
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_fapool.models.specs import FapoolNorm
    from megatron_fapool.moe import FapoolTopKRouter

    moe = load_run_config(os.path.join(ROOT, "configs", "tiny_moe.json"))
    spec = layer_spec_for(moe)
    mlp = spec.submodules.mlp
    assert mlp.module is MoELayer and mlp.submodules.router is FapoolTopKRouter
    assert mlp.submodules.experts.module is SequentialMLP
    assert spec.submodules.self_attention.submodules.core_attention.module is FapoolCoreAttention
    assert spec.submodules.input_layernorm is FapoolNorm and spec.submodules.pre_mlp_layernorm is FapoolNorm
    # MA separation: the experts submodule is the caller's
    remote = ModuleSpec(module=SequentialMLP, params={"marker": 1})
    assert layer_spec_for(moe, experts=remote).submodules.mlp.submodules.experts is remote
    # the same config with MA on builds the same layers
    ma = load_run_config(os.path.join(ROOT, "configs", "tiny_moe_ma.json"))
    assert layer_spec_for(ma).submodules.mlp.module is MoELayer
    dense = layer_spec_for(load_run_config(os.path.join(ROOT, "configs", "tiny_dense_pool.json")))
    assert dense.submodules.mlp.module is MLP
    with pytest.raises(ValueError, match="give num_experts too"):
        get_fapool_gpt_layer_spec(experts=remote)


def test_fapool_norm_is_torchs_norm_marked_for_sequence_parallel():
    import torch
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from megatron_fapool.config import to_transformer_config
    from megatron_fapool.models.specs import FapoolNorm

    lm = load_run_config(os.path.join(ROOT, "configs", "tiny_moe.json")).model.language_model
    for tp, sp in ((1, False), (2, True)):
        config = to_transformer_config(lm, tensor_model_parallel_size=tp, pipeline_model_parallel_size=1)
        norm = FapoolNorm(config, 64, eps=1e-6)
        assert type(norm) is torch.nn.RMSNorm and norm.eps == 1e-6 and norm.weight.sequence_parallel is sp
    torch.manual_seed(0)
    config = to_transformer_config(lm, tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    x = torch.randn(3, 2, 64)
    assert torch.equal(FapoolNorm(config, 64)(x), WrappedTorchNorm(config, 64)(x))
    with pytest.raises(AssertionError, match="sequence parallel not supported"):  # why FapoolNorm exists
        WrappedTorchNorm(to_transformer_config(lm, tensor_model_parallel_size=2, pipeline_model_parallel_size=1), 64)
