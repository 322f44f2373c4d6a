"""attention_for / layer_spec_for: dense / dilated x local / pool, from the config alone."""

import dataclasses
import os

import pytest

from megatron_fapool.attention import Dense, Dilated, FapoolCoreAttention, Pooled
from megatron_fapool.config import load_run_config
from megatron_fapool.inference.session import InferenceSession, KVCached
from megatron_fapool.models.specs import attention_for, fapool_gpt_layer_spec, layer_spec_for

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
