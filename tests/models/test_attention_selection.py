"""core_attention_for: dense / dilated x local / pool, from the config alone."""

import dataclasses
import os

import pytest

from megatron_fapool.attention.core_attention import LocalCoreAttention
from megatron_fapool.attention.dilated_core_attention import DilatedCoreAttention, PoolDilatedCoreAttention
from megatron_fapool.attention.pool import PoolCoreAttention
from megatron_fapool.config import load_run_config
from megatron_fapool.models.attention_selection import core_attention_for, layer_spec_for

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("name, pool, module", [
    ("tiny_dense_pool.json", None, LocalCoreAttention),
    ("tiny_dense_pool.json", "POOL", PoolCoreAttention),
    ("tiny_dilated.json", None, DilatedCoreAttention),
    ("tiny_dilated.json", "POOL", PoolDilatedCoreAttention),
])
def test_selection(name, pool, module):
    cfg = load_run_config(os.path.join(ROOT, "configs", name))
    cls, params = core_attention_for(cfg, pool)
    assert cls is module
    assert params["backend"] == cfg.fapool.attention_backend.backend
    assert params.get("pool") == pool
    if cfg.fapool.dilated_attention.enabled:
        assert params["segment_lengths"] == (128, 256, 512) and params["dilation_rates"] == (1, 2, 4)
    else:
        assert "segment_lengths" not in params
    spec = layer_spec_for(cfg, pool).submodules.self_attention.submodules.core_attention
    assert spec.module is module and spec.params == params


def test_dilated_switch_is_the_config_section():
    cfg = load_run_config(os.path.join(ROOT, "configs", "tiny_dilated.json"))
    off = dataclasses.replace(cfg, fapool=cfg.fapool.model_copy(
        update={"dilated_attention": cfg.fapool.dilated_attention.model_copy(update={"enabled": False})}))
    assert core_attention_for(off)[0] is LocalCoreAttention
