"""The HF architecture rule table, the config mapping's refusals, the per-tensor layouts, and the
package importing without transformers (megatron_fapool.convert.hf)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml

from megatron_fapool.config import ConfigError
from megatron_fapool.config.model_yaml import LanguageModel, UniqueKeyLoader
from megatron_fapool.convert.canonical import ModelCard, language_model_dict, run_config_for, strip_extra_state
from megatron_fapool.convert.hf import (
    canonical_shapes, card_of_hf_config, check_exportable, hf_config_dict, hf_shapes, rules_for,
)
from megatron_fapool.models.gpt import build_gpt_model
from megatron_fapool.runtime.local import world_of_one

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def yaml_card(name: str, **changes) -> ModelCard:
    with open(os.path.join(ROOT, "configs", "models", f"{name}.yaml")) as f:
        lm = yaml.load(f, Loader=UniqueKeyLoader)["language_model"]
    lm.update(changes)
    return ModelCard(language_model=language_model_dict(LanguageModel(**lm).model_dump()))


@pytest.mark.parametrize("name, changes, arch", [
    ("tiny_dense_rope", {}, "arcee"),
    ("paper_dense", {}, "arcee"),
    ("tiny_dense", {}, "fapool_gpt"),  # learned positions
    ("tiny_moe", {}, "fapool_gpt"),  # GELU experts
    ("paper_moe", {}, "fapool_gpt"),
    ("tiny_dense_rope", {"activation_func": "swiglu"}, "llama"),
    ("tiny_dense_rope", {"activation_func": "swiglu", "num_moe_experts": 4}, "mixtral"),
    ("tiny_dense_rope", {"add_bias_linear": True}, "arcee"),  # biases on every linear layer: attention_bias + mlp_bias
    ("tiny_dense_rope", {"add_qkv_bias": True}, "fapool_gpt"),  # q/k/v only: no flag of Arcee's
    ("tiny_dense_rope", {"normalization": "LayerNorm"}, "fapool_gpt"),
    ("tiny_dense_rope", {"qk_layernorm": True}, "fapool_gpt"),
    ("tiny_dense_rope", {"activation_func": "swiglu", "num_moe_experts": 4, "add_bias_linear": True}, "fapool_gpt"),
])
def test_auto_picks_the_exact_architecture(name, changes, arch):
    assert check_exportable(yaml_card(name, **changes)) == arch


def test_refusals_name_the_feature_and_the_alternative():
    with pytest.raises(ConfigError, match="position_embedding_type: learned_absolute.*--hf-arch fapool_gpt"):
        check_exportable(yaml_card("tiny_dense"), "arcee")
    with pytest.raises(ConfigError, match="activation_func: gelu.*Mixtral"):
        check_exportable(yaml_card("tiny_moe", position_embedding_type="rope"), "mixtral")
    with pytest.raises(ConfigError, match="swiglu.*use llama"):
        check_exportable(yaml_card("tiny_dense_rope", activation_func="swiglu"), "arcee")
    dilated = yaml_card("tiny_dense_rope")
    dilated.attention = {"kind": "dilated", "segment_lengths": [64], "dilation_rates": [1]}
    for arch in ("auto", "fapool_gpt"):
        with pytest.raises(ConfigError, match="^attention: 'dilated'"):
            check_exportable(dilated, arch)
    with pytest.raises(ConfigError, match="moe_expert_capacity_factor"):
        check_exportable(yaml_card("tiny_moe", moe_expert_capacity_factor=1.0))
    with pytest.raises(ConfigError, match="--hf-arch: 'gpt2'"):
        check_exportable(yaml_card("tiny_dense"), "gpt2")


@pytest.mark.parametrize("changes", [
    {},  # tiny_dense_rope
    {"position_embedding_type": "learned_absolute", "normalization": "LayerNorm", "add_bias_linear": True,
     "qk_layernorm": True, "untie_embeddings_and_output_weights": True},
    {"activation_func": "swiglu", "num_moe_experts": 4, "moe_ffn_hidden_size": 32, "add_bias_linear": True},
    {"add_qkv_bias": True, "kv_channels": 24, "position_embedding_type": "none"},
])
def test_canonical_shapes_are_the_built_models(changes):
    card = yaml_card("tiny_dense_rope", **changes)
    with world_of_one("cpu"):
        model = build_gpt_model(run_config_for(card))
        built = {k: tuple(v.shape) for k, v in strip_extra_state(model.state_dict()).items()}
    assert built == canonical_shapes(card)
    for arch in ("fapool_gpt", check_exportable(card)):  # every canonical tensor is in exactly one rule
        names = [n for r in rules_for(card, arch) for n in r.canonical]
        assert sorted(names) == sorted(built)


def test_qkv_split_is_per_query_group():
    """Megatron's rows [q_g0 .. q_g(r-1), k_g, v_g] per group g go to q/k/v in head order; a naive split does not."""
    card = yaml_card("tiny_dense_rope")  # 4 heads, 2 groups, head dim 16
    lm = card.lm()
    hn, ng, r = lm.head_dim, lm.query_groups, lm.num_attention_heads // lm.query_groups
    # label each row block: (group, slot) with slot 0..r-1 = q heads, r = k, r + 1 = v
    labels = torch.tensor([[g * 10 + s] * hn for g in range(ng) for s in range(r + 2)]).reshape(-1, 1).float()
    qkv = labels.expand(-1, lm.hidden_size).contiguous()
    rule = next(x for x in rules_for(card, "arcee") if x.kind == "qkv")
    q, k, v = rule.to_hf([qkv])
    assert q[::hn, 0].tolist() == [g * 10 + s for g in range(ng) for s in range(r)]  # head i = group i // r
    assert k[::hn, 0].tolist() == [g * 10 + r for g in range(ng)]
    assert v[::hn, 0].tolist() == [g * 10 + r + 1 for g in range(ng)]
    naive_q = qkv[: lm.num_attention_heads * hn]
    assert not torch.equal(naive_q, q)
    (back,) = rule.to_canonical([q, k, v])
    assert torch.equal(back, qkv)
    assert hf_shapes(card, "arcee")["model.layers.0.self_attn.k_proj.weight"] == (ng * hn, lm.hidden_size)


def _hf_cfg(card, arch, **changes):
    cfg = hf_config_dict(card, arch, "float32")
    cfg["model_type"] = {"arcee": "arcee", "llama": "llama", "mixtral": "mixtral", "fapool_gpt": "fapool_gpt"}[arch]
    cfg.update(changes)
    return cfg


@pytest.mark.parametrize("name, changes", [
    ("tiny_dense_rope", {}), ("tiny_dense", {}), ("tiny_moe", {}),
    ("tiny_dense_rope", {"activation_func": "swiglu"}),
    ("tiny_dense_rope", {"activation_func": "swiglu", "num_moe_experts": 4, "moe_router_topk": 2}),
    ("tiny_dense_rope", {"add_bias_linear": True, "untie_embeddings_and_output_weights": True}),
])
def test_config_round_trip(name, changes):
    card = yaml_card(name, **changes)
    arch = check_exportable(card)
    back, back_arch = card_of_hf_config(_hf_cfg(card, arch))
    assert back_arch == arch
    assert back.lm().model_copy(update={"seq_length": None, "moe_aux_loss_coeff": None}) == \
        card.lm().model_copy(update={"seq_length": None, "moe_aux_loss_coeff": None})


@pytest.mark.parametrize("arch, changes, match", [
    ("arcee", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
    ("arcee", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}}, "rope_type"),
    ("arcee", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.5}}, "rope_theta"),
    ("arcee", {"hidden_act": "gelu_pytorch_tanh"}, "hidden_act: 'gelu_pytorch_tanh'.*tanh"),
    ("arcee", {"attention_bias": True}, "attention_bias: True.*mlp_bias=False"),
    ("arcee", {"attention_dropout": 0.1}, "attention_dropout"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act: 'gelu'"),
    ("llama", {"pretraining_tp": 2}, "pretraining_tp"),
    ("mixtral", {"sliding_window": 4096}, "sliding_window"),
    ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise"),
    ("arcee", {"model_type": "gpt2"}, "model_type: 'gpt2'"),
])
def test_import_refusals_name_the_field(arch, changes, match):
    card = yaml_card("tiny_dense_rope", **({"activation_func": "swiglu"} if arch != "arcee" else {}),
                     **({"num_moe_experts": 4} if arch == "mixtral" else {}))
    with pytest.raises(ConfigError, match=match):
        card_of_hf_config(_hf_cfg(card, arch, **changes))


def test_imports_without_transformers_and_says_how_to_install():
    code = (
        "import sys\n"
        "for m in ('transformers', 'safetensors', 'tokenizers'): sys.modules[m] = None\n"
        "import megatron_fapool.convert.hf as hf\n"
        "from megatron_fapool.config import ConfigError\n"
        "for call in (lambda: hf.export_hf(None, {}, '/nonexistent'), lambda: hf.read_hf('/nonexistent')):\n"
        "    try:\n"
        "        call()\n"
        "    except ConfigError as e:\n"
        "        print(e)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 2 and all("pip install -e .[hf]" in line for line in lines), res.stdout
