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


# --- MoE keys and MA separation ------------------------------------------------------------

MOE_YAML = os.path.join(ROOT, "configs", "models", "tiny_moe.yaml")


def _moe(tmp_path, *, yaml_extra: str = "", yaml_drop: tuple = (), ma: dict | None = None, **top):
    """tiny_moe.json (colocated) with a copy of its model YAML (``yaml_extra`` appended to
    ``language_model``, ``yaml_drop`` keys removed) and an optional ma_separation section."""
    lines = [ln for ln in open(MOE_YAML).read().splitlines() if not any(ln.strip().startswith(k + ":") for k in yaml_drop)]
    text = "\n".join(lines) + "\n" + "".join(f"  {ln}\n" for ln in yaml_extra.splitlines() if ln)
    (tmp_path / "moe.yaml").write_text(text)
    data = json.load(open(os.path.join(ROOT, "configs", "tiny_moe.json")))
    data["fapool"]["model_yaml"] = str(tmp_path / "moe.yaml")
    if ma is not None:
        data["fapool"]["ma_separation"] = ma
    data.update(top)
    return _write(tmp_path, data)


def _tc(cfg):
    return to_transformer_config(cfg.model.language_model, tensor_model_parallel_size=cfg.tensor_model_parallel_size,
                                 pipeline_model_parallel_size=cfg.pipeline_model_parallel_size)


def test_every_moe_key_reaches_transformer_config(tmp_path):
    cfg = load_run_config(_moe(tmp_path, yaml_extra="moe_ffn_hidden_size: 96\nmoe_aux_loss_coeff: 0.02\n"
                               "moe_z_loss_coeff: 0.001\nmoe_expert_capacity_factor: 1.5\nmoe_router_dtype: fp64"))
    tc = _tc(cfg)
    assert (tc.num_moe_experts, tc.moe_router_topk, tc.moe_ffn_hidden_size, tc.ffn_hidden_size) == (16, 2, 96, 256)
    assert (tc.moe_aux_loss_coeff, tc.moe_z_loss_coeff, tc.moe_expert_capacity_factor) == (0.02, 0.001, 1.5)
    assert tc.moe_router_dtype == "fp64" and tc.moe_router_load_balancing_type == "aux_loss"
    assert tc.moe_token_dispatcher_type == "allgather" and tc.moe_grouped_gemm is False
    assert (tc.expert_model_parallel_size, tc.expert_tensor_parallel_size, tc.sequence_parallel) == (1, 1, False)
    assert "experts=16 top2 expert_ffn=96 aux=0.02 z=0.001 capacity=1.5 router=fp64" in cfg.describe()
    # at TP 2 an MoE model runs sequence parallel (Megatron's MoELayer trains with TP only so)
    tc2 = to_transformer_config(cfg.model.language_model, tensor_model_parallel_size=2, pipeline_model_parallel_size=1)
    assert tc2.sequence_parallel and tc2.expert_tensor_parallel_size == 1


def test_moe_defaults_and_a_dense_model_keeps_none(tmp_path):
    tc = _tc(load_run_config(os.path.join(ROOT, "configs", "tiny_moe.json")))
    assert (tc.moe_aux_loss_coeff, tc.moe_z_loss_coeff, tc.moe_expert_capacity_factor) == (0.01, None, None)
    assert tc.moe_router_dtype == "fp32" and tc.moe_ffn_hidden_size == 256
    # MA on with no coefficient anywhere: the same 0.01 (switching MA never changes the loss)
    ma = load_run_config(os.path.join(ROOT, "configs", "tiny_moe_ma.json"))
    assert _tc(ma).moe_aux_loss_coeff == 0.01
    dense = _tc(load_run_config(os.path.join(ROOT, "configs", "tiny_dense_pool.json")))
    assert dense.num_moe_experts is None and dense.moe_aux_loss_coeff == 0.0 and not dense.sequence_parallel


def test_ma_model_keys_fill_the_yaml_and_must_agree(tmp_path):
    ma = {"enabled": True, "aux_loss_coeff": 0.03, "z_loss_coeff": 0.002, "capacity_factor": 2.0, "top_k": 2}
    cfg = load_run_config(_moe(tmp_path, ma=ma))
    lm = cfg.model.language_model
    assert (lm.moe_aux_loss_coeff, lm.moe_z_loss_coeff, lm.moe_expert_capacity_factor) == (0.03, 0.002, 2.0)
    tc = _tc(cfg)
    assert (tc.moe_aux_loss_coeff, tc.moe_z_loss_coeff, tc.moe_expert_capacity_factor) == (0.03, 0.002, 2.0)
    # the same keys with MA off describe the same model
    off = load_run_config(_moe(tmp_path, ma={**ma, "enabled": False}))
    assert off.model.language_model == lm
    # agreeing values in both places are fine; different ones name both keys and the file
    load_run_config(_moe(tmp_path, yaml_extra="moe_aux_loss_coeff: 0.03", ma=ma))
    for key, yaml_key, yaml_value, value in [
        ("top_k", "moe_router_topk", 2, 4), ("num_experts", "num_moe_experts", 16, 8),
        ("aux_loss_coeff", "moe_aux_loss_coeff", 0.05, 0.03), ("z_loss_coeff", "moe_z_loss_coeff", 0.1, 0.002),
        ("capacity_factor", "moe_expert_capacity_factor", 1.0, 2.0),
    ]:
        extra = "" if yaml_key in ("moe_router_topk", "num_moe_experts") else f"{yaml_key}: {yaml_value}"
        with pytest.raises(ConfigError) as e:
            load_run_config(_moe(tmp_path, yaml_extra=extra, ma={**ma, key: value}))
        msg = _one_line(e.value)
        assert f"fapool.ma_separation.{key}: {value} differs from language_model.{yaml_key}={yaml_value}" in msg, msg
        assert "moe.yaml" in msg
    with pytest.raises(ConfigError, match=r"ma_separation.top_k: top-4 routing over 3 experts"):
        load_run_config(_moe(tmp_path, yaml_drop=("num_moe_experts", "moe_router_topk"),
                             yaml_extra="num_moe_experts: 3", ma={"enabled": False, "top_k": 4}))


@pytest.mark.parametrize("kwargs, key, text", [
    # MA separation with a dense model YAML
    (dict(yaml_drop=("num_moe_experts", "moe_router_topk"), ma={"enabled": True}),
     "fapool.ma_separation.enabled", "is a dense model (no num_moe_experts)"),
    # an MoE key in ma_separation of a dense model
    (dict(yaml_drop=("num_moe_experts", "moe_router_topk"), ma={"top_k": 2}),
     "fapool.ma_separation.top_k", "is a dense model"),
    # fp16, with MA and colocated
    (dict(ma={"enabled": True}, fp16={"enabled": True}), "fp16.enabled", "fp16 with MA separation"),
    (dict(fp16={"enabled": True}), "fp16.enabled", "fp16 with an MoE model"),
    # capacity with the ping-pong split, from either place
    (dict(ma={"enabled": True, "micro_batches": 2, "capacity_factor": 1.0}), "fapool.ma_separation.micro_batches",
     "capacity drops depend on all tokens of the call; use micro_batches 1 or no capacity"),
    (dict(yaml_extra="moe_expert_capacity_factor: 1.25", ma={"enabled": True, "micro_batches": 2}),
     "fapool.ma_separation.micro_batches", "capacity factor 1.25"),
    # Megatron expert parallelism over the base ranks
    (dict(yaml_extra="", ma=None, model_parallel="  expert_model_parallel_size: 2"),
     "model_parallel.expert_model_parallel_size", "2: Megatron expert parallelism over the base ranks is not"),
    # moe_* keys of a dense model; top-k above the experts
    (dict(yaml_drop=("num_moe_experts",), yaml_extra="moe_z_loss_coeff: 0.1"), "language_model",
     "moe_router_topk, moe_z_loss_coeff given without num_moe_experts"),
    (dict(yaml_extra="moe_router_dtype: bf16"), "language_model.moe_router_dtype", "'bf16'"),
    # sequence parallel at TP 2 splits the YAML's training length
    (dict(yaml_drop=("seq_length",), yaml_extra="seq_length: 511", parallel={"tensor_model_parallel_size": 2}),
     "language_model.seq_length", "511 is not divisible by tensor_model_parallel_size=2"),
    (dict(ma={"enabled": True, "calibration_file": "nope.json"}), "fapool.ma_separation.calibration_file",
     "file not found"),
    (dict(ma={"enabled": True, "on_expert_loss": "ignore"}), "fapool.ma_separation.on_expert_loss", "'ignore'"),
    (dict(ma={"enabled": True, "micro_batches": 0}), "fapool.ma_separation.micro_batches", "0"),
])
def test_moe_refusals_are_one_line(tmp_path, kwargs, key, text):
    kwargs = dict(kwargs)
    model_parallel = kwargs.pop("model_parallel", None)
    parallel = kwargs.pop("parallel", None)
    path = _moe(tmp_path, **kwargs)
    if model_parallel:
        with open(tmp_path / "moe.yaml", "a") as f:
            f.write("model_parallel:\n" + model_parallel + "\n")
    if parallel:
        data = json.load(open(path))
        data["fapool"]["parallel"] = parallel
        path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as e:
        load_run_config(path)
    msg = _one_line(e.value)
    assert f"{key}:" in msg and text in msg, msg


def test_ma_with_the_attention_pool_is_refused_and_with_dilated_attention_loads(tmp_path):
    data = json.load(open(_moe(tmp_path, ma={"enabled": True})))
    data["fapool"]["attention_pool"] = {"enabled": True, "pool_size": 2}
    with pytest.raises(ConfigError, match="ma_separation.enabled: MA separation together with the attention pool"):
        load_run_config(_write(tmp_path, data))
    data["fapool"].pop("attention_pool")
    data["fapool"]["dilated_attention"] = {"enabled": True, "segment_lengths": [64], "dilation_rates": [1]}
    cfg = load_run_config(_write(tmp_path, data))
    assert cfg.fapool.ma_separation.enabled and cfg.fapool.dilated_attention.enabled


def test_ma_calibration_file_is_resolved_next_to_the_json(tmp_path):
    (tmp_path / "cal.json").write_text("{}")
    cfg = load_run_config(_moe(tmp_path, ma={"enabled": True, "calibration_file": "cal.json"}))
    assert cfg.fapool.ma_separation.calibration_file == str(tmp_path / "cal.json")
    assert cfg.fapool.ma_separation.micro_batches == 1 and cfg.fapool.ma_separation.on_expert_loss == "fail"


def test_layout_checks_see_the_yaml_experts(tmp_path):
    """ma_separation.num_experts left out: the layout checks divide the YAML's 16 experts."""
    from megatron_fapool.parallel import LayoutError, layout_from_config

    cfg = load_run_config(_moe(tmp_path, ma={"enabled": True}))
    assert cfg.fapool.ma_separation.num_experts is None
    assert layout_from_config(cfg, 4).num_expert == 1
    with pytest.raises(LayoutError, match="num_experts=16 is not divisible by the 3 expert ranks"):
        layout_from_config(cfg, 12)
    with pytest.raises(LayoutError, match="ratio 3:1 does not split 5 non-pool ranks"):
        layout_from_config(cfg, 5)
