"""Config loading: the shipped configs load; every kind of bad input is a one-line error naming the key."""

import glob
import json
import os

import pytest

from megatron_fapool.config import ConfigError, load_run_config, to_transformer_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.json")))


def _write(tmp_path, data, name="cfg.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(path)


def _tiny(tmp_path, **fapool):
    base = json.load(open(os.path.join(ROOT, "configs", "tiny_dense_pool.json")))
    base["fapool"]["model_yaml"] = os.path.join(ROOT, "configs", "models", "tiny_dense.yaml")
    base["fapool"].update(fapool)
    return base


def _one_line(err: Exception) -> str:
    text = str(err)
    assert "\n" not in text
    return text


def test_shipped_configs_load_and_map_to_megatron():
    assert len(CONFIGS) >= 6
    names = {os.path.basename(c) for c in CONFIGS}
    assert {"paper_dense_pool.json", "paper_moe_ma.json", "paper_dilated.json"} <= names
    for path in CONFIGS:
        cfg = load_run_config(path)
        assert "fapool" not in cfg.deepspeed
        tc = to_transformer_config(
            cfg.model.language_model,
            tensor_model_parallel_size=cfg.tensor_model_parallel_size,
            pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        )
        assert tc.num_layers == cfg.model.language_model.num_layers
        assert "attention pool" in cfg.describe()


def test_paper_dense_model_shape():
    cfg = load_run_config(os.path.join(ROOT, "configs", "paper_dense_pool.json"))
    lm = cfg.model.language_model
    assert (lm.num_layers, lm.hidden_size, lm.num_attention_heads, lm.ffn_hidden_size) == (4, 4096, 32, 16384)
    assert (lm.activation_func, lm.normalization, lm.head_dim) == ("gelu", "RMSNorm", 128)
    assert cfg.precision == "bf16"
    moe = load_run_config(os.path.join(ROOT, "configs", "paper_moe_ma.json"))
    assert moe.model.language_model.num_moe_experts == 16 and moe.fapool.ma_separation.top_k == 2
    assert moe.fapool.ma_separation.ratio == (3, 1)


def test_misspelt_key_inside_fapool(tmp_path):
    data = _tiny(tmp_path)
    data["fapool"]["attention_pool"]["pool_sise"] = 2
    with pytest.raises(ConfigError) as e:
        load_run_config(_write(tmp_path, data))
    msg = _one_line(e.value)
    assert "fapool.attention_pool.pool_sise: unknown key" in msg and "pool_size" in msg


def test_misspelt_top_level_key_inside_fapool(tmp_path):
    data = _tiny(tmp_path)
    data["fapool"]["atention_pool"] = data["fapool"].pop("attention_pool")
    with pytest.raises(ConfigError, match=r"fapool\.atention_pool: unknown key.*attention_pool"):
        load_run_config(_write(tmp_path, data))


def test_duplicate_json_key(tmp_path):
    text = json.dumps(_tiny(tmp_path)).replace('"pool_size": 2', '"pool_size": 2, "pool_size": 3')
    with pytest.raises(ConfigError, match="pool_size: key appears more than once"):
        load_run_config(_write(tmp_path, text))


@pytest.mark.parametrize(
    "section, value, key",
    [
        ("attention_pool", {"enabled": True, "pool_size": 2, "threshold": -1}, "fapool.attention_pool.threshold"),
        ("attention_pool", {"enabled": True, "pool_size": "2"}, "fapool.attention_pool.pool_size"),
        ("attention_pool", {"enabled": True, "pool_size": 2, "threshold": "auto"}, "fapool.attention_pool"),
        ("attention_backend", {"backend": "fast"}, "fapool.attention_backend.backend"),
        ("dilated_attention", {"enabled": True, "segment_lengths": [1, 2], "dilation_rates": [1]}, "fapool.dilated_attention"),
        ("ma_separation", {"enabled": True, "attention_expert_ratio": "3/1"}, "fapool.ma_separation.attention_expert_ratio"),
    ],
)
def test_bad_values_name_the_key(tmp_path, section, value, key):
    data = _tiny(tmp_path)
    data["fapool"][section] = value
    with pytest.raises(ConfigError) as e:
        load_run_config(_write(tmp_path, data))
    assert key in _one_line(e.value)


def test_yaml_wrong_type_names_key(tmp_path):
    yaml_path = tmp_path / "m.yaml"
    yaml_path.write_text(
        open(os.path.join(ROOT, "configs", "models", "tiny_dense.yaml")).read().replace("hidden_size: 64", "hidden_size: big")
    )
    data = _tiny(tmp_path, model_yaml=str(yaml_path))
    with pytest.raises(ConfigError) as e:
        load_run_config(_write(tmp_path, data))
    msg = _one_line(e.value)
    assert "language_model.hidden_size" in msg and "'big'" in msg


def test_yaml_unknown_and_duplicate_keys(tmp_path):
    src = open(os.path.join(ROOT, "configs", "models", "tiny_dense.yaml")).read()
    (tmp_path / "a.yaml").write_text(src.replace("num_layers: 2", "num_layer: 2"))
    with pytest.raises(ConfigError, match=r"language_model\.num_layer: unknown key.*num_layers"):
        load_run_config(_write(tmp_path, _tiny(tmp_path, model_yaml=str(tmp_path / "a.yaml"))))
    (tmp_path / "b.yaml").write_text(src.replace("num_layers: 2", "num_layers: 2\n  num_layers: 3"))
    with pytest.raises(ConfigError, match="duplicate key 'num_layers'"):
        load_run_config(_write(tmp_path, _tiny(tmp_path, model_yaml=str(tmp_path / "b.yaml"))))


def test_conflicting_parallel_sizes(tmp_path):
    src = open(os.path.join(ROOT, "configs", "models", "tiny_dense.yaml")).read()
    (tmp_path / "m.yaml").write_text(src + "model_parallel:\n  tensor_model_parallel_size: 1\n")
    with pytest.raises(ConfigError, match="tensor_model_parallel_size: 2 conflicts"):
        load_run_config(_write(tmp_path, _tiny(tmp_path, model_yaml=str(tmp_path / "m.yaml"))))


def test_missing_files_and_section(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_run_config(str(tmp_path / "nope.json"))
    data = _tiny(tmp_path, model_yaml="missing.yaml")
    with pytest.raises(ConfigError, match="fapool.model_yaml: file not found"):
        load_run_config(_write(tmp_path, data))
    data.pop("fapool")
    with pytest.raises(ConfigError, match="fapool: section missing"):
        load_run_config(_write(tmp_path, data))


def test_auto_threshold_reads_the_shipped_calibration():
    from megatron_fapool.attention.pool.manager import PoolResourceManager

    cfg = load_run_config(os.path.join(ROOT, "configs", "paper_dense_pool_auto.json"))
    assert os.path.isfile(cfg.fapool.attention_pool.calibration_file)
    mgr = PoolResourceManager.from_config(cfg.fapool.attention_pool, pool_share=1)
    assert 4096 < mgr.threshold < 131072 and mgr.cost_model is not None


def test_missing_calibration_file_fails_at_load(tmp_path):
    data = _tiny(tmp_path)
    data["fapool"]["attention_pool"].update(threshold="auto", calibration_file="nope.json")
    with pytest.raises(ConfigError, match="calibration_file: file not found"):
        load_run_config(_write(tmp_path, data))
