"""Pure parts of MA-separation training: the expert manifest and its check, the expert engine's JSON."""

import json
import os

import pytest

from megatron_fapool.config import ConfigError
from megatron_fapool.parallel.roles import compute_layout
from megatron_fapool.training import checkpoint as ckpt
from megatron_fapool.training.experts import expert_engine_config


def _layout(world, ratio):
    return compute_layout(world, tp=1, pp=1, num_attention_heads=4, num_query_groups=2, num_layers=2,
                          attention_expert_ratio=ratio, num_experts=16)


def test_manifest_names_each_expert_rank_and_its_experts():
    m = ckpt.expert_manifest(_layout(4, (1, 1)), 16)  # 2 attention + 2 expert ranks
    assert m["experts_per_rank"] == 8 and m["layout"]["num_expert"] == 2 and m["layout"]["dp"] == 2
    assert m["expert_ranks"] == [
        {"rank": 2, "stage": 0, "index": 0, "experts": list(range(8)), "file": "mp_rank_00_model_states.pt"},
        {"rank": 3, "stage": 0, "index": 1, "experts": list(range(8, 16)), "file": "mp_rank_01_model_states.pt"},
    ]


def test_manifest_check(tmp_path):
    saved = ckpt.expert_manifest(_layout(4, (3, 1)), 16)
    (tmp_path / ckpt.EXPERTS_DIR).mkdir()
    (tmp_path / ckpt.EXPERTS_DIR / ckpt.MANIFEST).write_text(json.dumps(saved))
    ckpt._check_manifest(str(tmp_path), ckpt.expert_manifest(_layout(4, (3, 1)), 16))  # the same placement
    ckpt._check_manifest(str(tmp_path), ckpt.expert_manifest(_layout(8, (7, 1)), 16))  # more attention: fine
    with pytest.raises(ConfigError, match=r"holds the experts of 1 expert rank\(s\), 16 experts each \(world 4\);"
                                          r" this run places 16 experts on 2 expert rank\(s\), 8 each"):
        ckpt._check_manifest(str(tmp_path), ckpt.expert_manifest(_layout(8, (3, 1)), 16))
    os.remove(tmp_path / ckpt.EXPERTS_DIR / ckpt.MANIFEST)
    with pytest.raises(ConfigError, match="holds no expert-rank state"):
        ckpt._check_manifest(str(tmp_path), saved)


def test_expert_engine_config():
    ds = {"train_batch_size": 12, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
          "zero_optimization": {"stage": 1, "overlap_comm": True}, "csv_monitor": {"enabled": True},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    cfg = expert_engine_config(ds, micro=2, gas=2)
    assert "train_batch_size" not in cfg and "csv_monitor" not in cfg
    assert cfg["train_micro_batch_size_per_gpu"] == 2 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["managed_gradient_accumulation"] is False
    assert cfg["zero_optimization"] == {"stage": 1, "overlap_comm": False}
    assert cfg["optimizer"] == ds["optimizer"] and cfg["gradient_clipping"] == 1.0
    assert ds["zero_optimization"]["overlap_comm"] is True  # the attention ranks' JSON is not changed
    two = expert_engine_config(dict(ds, zero_optimization={"stage": 2, "overlap_comm": True}), micro=2, gas=2)
    assert two["zero_optimization"]["overlap_comm"] is True
