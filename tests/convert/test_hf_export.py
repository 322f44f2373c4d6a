"""export_hf: our GPTModel's function in a Hugging Face folder, checked in a fresh process.

Three tiny models built with build_gpt_model (random init, fp32, TP 1): tiny_dense_rope -> Arcee,
tiny_dense (learned positions) -> fapool_gpt, tiny_moe (GELU experts) -> fapool_gpt (several
shards). One fresh interpreter, outside the repo and never importing megatron_fapool, loads each
export with AutoModelForCausalLM.from_pretrained(trust_remote_code=True) and AutoTokenizer:
logits within 1e-5 of ours, the same 8 greedy tokens (HF generate with its KV cache vs our
full-recompute argmax), the byte tokenizer's ids.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from megatron_fapool.config import ConfigError
from megatron_fapool.config.model_yaml import LanguageModel, UniqueKeyLoader
from megatron_fapool.convert.canonical import ModelCard, language_model_dict, run_config_for, strip_extra_state
from megatron_fapool.convert.hf import canonical_shapes, export_hf
from megatron_fapool.data.tokenizer import ByteTokenizer
from megatron_fapool.models.gpt import build_gpt_model
from megatron_fapool.runtime.local import world_of_one

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NEW_TOKENS = 8
TEXT = "héllo, wörld ✓ <eod> 日本"
MODELS = {"tiny_dense_rope": "ArceeForCausalLM", "tiny_dense": "FapoolGPTForCausalLM", "tiny_moe": "FapoolGPTForCausalLM"}

PROBE = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
jobs = json.load(open(sys.argv[1]))
for job in jobs:
    ids = torch.load(job["ids"])
    model = AutoModelForCausalLM.from_pretrained(job["dir"], dtype=torch.float32, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(ids).logits
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=job["new"],
                             min_new_tokens=job["new"], do_sample=False)
    tok = AutoTokenizer.from_pretrained(job["dir"])
    enc = tok(job["text"], add_special_tokens=False)["input_ids"]
    torch.save({"logits": logits, "gen": gen[:, ids.shape[1]:], "cls": type(model).__name__, "enc": enc,
                "dec": tok.decode(enc), "eos": tok.eos_token_id}, job["out"])
json.dump(sorted(m for m in sys.modules if m.startswith("megatron")), open(sys.argv[2], "w"))
"""


def yaml_card(name: str) -> ModelCard:
    with open(os.path.join(ROOT, "configs", "models", f"{name}.yaml")) as f:
        lm = yaml.load(f, Loader=UniqueKeyLoader)["language_model"]
    return ModelCard(language_model=language_model_dict(LanguageModel(**lm).model_dump()))


def ours(card: ModelCard, ids: torch.Tensor, seed: int = 0):
    """(canonical weights, logits, greedy tokens) of our model (random init) at TP 1."""
    with world_of_one("cpu"):
        torch.manual_seed(seed)
        model = build_gpt_model(run_config_for(card)).eval()
        weights = {k: v.detach().clone() for k, v in strip_extra_state(model.state_dict()).items()}

        def logits_of(x):
            pos = torch.arange(x.shape[1])[None].expand(x.shape[0], -1)
            return model(x, pos, None)

        with torch.no_grad():
            logits = logits_of(ids)
            seq = ids
            for _ in range(NEW_TOKENS):
                seq = torch.cat([seq, logits_of(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert logits.shape == (*ids.shape, card.lm().vocab_size)
    return weights, logits, seq[:, ids.shape[1]:]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{name: (dir, info, weights, logits, greedy, probe result)}: the three exports, probed in one fresh process."""
    tmp = tmp_path_factory.mktemp("hf_export")
    ids = torch.randint(0, 257, (2, 37), generator=torch.Generator().manual_seed(1))
    torch.save(ids, tmp / "ids.pt")
    out, jobs = {}, []
    for name in MODELS:
        card = yaml_card(name)
        weights, logits, greedy = ours(card, ids)
        shard = 1_500_000 if name == "tiny_moe" else None  # the MoE model in several shards
        info = export_hf(card, weights, str(tmp / name), **({"max_shard_bytes": shard} if shard else {}))
        out[name] = [str(tmp / name), info, weights, logits, greedy]
        jobs.append({"dir": str(tmp / name), "ids": str(tmp / "ids.pt"), "out": str(tmp / f"{name}.pt"),
                     "new": NEW_TOKENS, "text": TEXT})
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    (tmp / "probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, str(tmp / "probe.py"), str(tmp / "jobs.json"), str(tmp / "modules.json")],
                         cwd=str(tmp), env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    leaked = json.loads((tmp / "modules.json").read_text())
    assert leaked == [], f"the fresh process imported {leaked}"
    for name in MODELS:
        out[name].append(torch.load(tmp / f"{name}.pt"))
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_fresh_process_logits_and_greedy_match_ours(exported, name):
    _, info, _, logits, greedy, probe = exported[name]
    assert probe["cls"] == MODELS[name]
    assert info["arch"] == ("arcee" if name == "tiny_dense_rope" else "fapool_gpt")
    diff = (probe["logits"] - logits).abs().max().item()
    assert diff <= 1e-5 * max(1.0, logits.abs().max().item()), diff
    assert torch.equal(probe["gen"], greedy)


def test_tokenizer_is_the_byte_tokenizer(exported):
    probe = exported["tiny_dense_rope"][-1]
    bt = ByteTokenizer()
    assert probe["enc"] == bt.tokenize(TEXT)
    assert probe["dec"] == TEXT
    assert probe["eos"] == bt.eod


def test_files_index_and_config(exported):
    for name, (path, info, weights, *_rest) in exported.items():
        with open(os.path.join(path, "model.safetensors.index.json")) as f:
            index = json.load(f)
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) == info["shards"] and all(os.path.exists(os.path.join(path, s)) for s in shards)
        assert index["metadata"]["total_size"] == info["bytes"] == sum(t.numel() * 4 for t in weights.values())
        assert config["dtype"] == "float32" and config["eos_token_id"] == 256
        portable = {"configuration_fapool_gpt.py", "modeling_fapool_gpt.py"}
        if info["arch"] == "fapool_gpt":
            assert portable <= set(os.listdir(path)) and set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
        else:
            assert "auto_map" not in config and not portable & set(os.listdir(path))
    assert exported["tiny_moe"][1]["shards"] > 1


def test_naive_qkv_split_fails_the_logits_bar(exported):
    """Negative control: the same Arcee export with q/k/v taken as a naive split of linear_qkv."""
    from transformers import AutoModelForCausalLM

    path, _, weights, logits, *_ = exported["tiny_dense_rope"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    lm = yaml_card("tiny_dense_rope").lm()
    nq, nkv = lm.num_attention_heads * lm.head_dim, lm.query_groups * lm.head_dim
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            qkv = weights[f"decoder.layers.{i}.self_attention.linear_qkv.weight"]
            q, k, v = qkv.split([nq, nkv, nkv])
            layer.self_attn.q_proj.weight.copy_(q)
            layer.self_attn.k_proj.weight.copy_(k)
            layer.self_attn.v_proj.weight.copy_(v)
        ids = torch.randint(0, 257, (2, 37), generator=torch.Generator().manual_seed(1))
        diff = (model(ids).logits - logits).abs().max().item()
    assert diff > 1e-3, diff


def test_dtype_is_kept_unless_asked(tmp_path):
    card = yaml_card("tiny_dense_rope")
    card.dtype = "bfloat16"
    weights = {k: torch.randn(v).to(torch.bfloat16) for k, v in canonical_shapes(card).items()}
    export_hf(card, weights, str(tmp_path / "bf16"))
    fp32 = export_hf(card, weights, str(tmp_path / "fp32"), dtype="float32")
    from safetensors import safe_open

    for sub, dtype, want in (("bf16", torch.bfloat16, "bfloat16"), ("fp32", torch.float32, "float32")):
        with open(tmp_path / sub / "config.json") as f:
            assert json.load(f)["dtype"] == want
        with safe_open(str(tmp_path / sub / "model-00001-of-00001.safetensors"), framework="pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {dtype}
    assert fp32["dtype"] == "float32"


def test_bad_input_is_refused_before_writing(tmp_path):
    card = yaml_card("tiny_dense")
    weights = {k: torch.zeros(v) for k, v in canonical_shapes(card).items()}
    dilated = ModelCard(language_model=card.language_model,
                        attention={"kind": "dilated", "segment_lengths": [64], "dilation_rates": [1]})
    cases = [
        (dilated, weights, {}, "attention"),
        (card, {**weights, "decoder.layers.0.mlp.linear_fc1.weight": torch.zeros(8, 64)}, {},
         r"decoder.layers.0.mlp.linear_fc1.weight: have \(8, 64\) want \(256, 64\)"),
        (card, {k: v for k, v in weights.items() if "position" not in k}, {}, "missing.*position_embeddings"),
        (card, {k: v.double() for k, v in weights.items()}, {}, "dtype differs"),
        (card, weights, {"arch": "arcee"}, "position_embedding_type: learned_absolute"),
        (card, weights, {"dtype": "int8"}, "--dtype"),
    ]
    for i, (c, w, kw, match) in enumerate(cases):
        out = tmp_path / f"out{i}"
        with pytest.raises(ConfigError, match=match):
            export_hf(c, w, str(out), **kw)
        assert not out.exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ConfigError, match="not empty"):
        export_hf(card, weights, str(tmp_path / "full"))
    assert os.listdir(tmp_path / "full") == ["x"]


SMALL = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48, vocab_size=320,
             max_position_embeddings=128, hidden_dropout=0.0, attention_dropout=0.0, normalization="RMSNorm",
             position_embedding_type="rope", add_bias_linear=False)


@pytest.mark.parametrize("changes, arch", [
    ({"add_bias_linear": True, "untie_embeddings_and_output_weights": True, "activation_func": "squared_relu"}, "arcee"),
    ({"activation_func": "swiglu"}, "llama"),
    ({"activation_func": "swiglu", "num_moe_experts": 4, "moe_router_topk": 2, "moe_ffn_hidden_size": 24}, "mixtral"),
    ({"normalization": "LayerNorm", "activation_func": "swiglu", "add_bias_linear": True, "qk_layernorm": True,
      "untie_embeddings_and_output_weights": True, "num_moe_experts": 4, "moe_router_topk": 2}, "fapool_gpt"),
    ({"qk_layernorm": True, "num_moe_experts": 4, "moe_router_topk": 2}, "fapool_gpt"),  # RoPE in our class
    ({"position_embedding_type": "none", "add_qkv_bias": True, "kv_channels": 12}, "fapool_gpt"),
])
def test_every_architecture_computes_our_logits(tmp_path, changes, arch):
    """In-process (the class registered): random non-trivial norms and biases, several shards."""
    from transformers import AutoModelForCausalLM

    from megatron_fapool.convert.hf import register_portable

    card = ModelCard(language_model=language_model_dict(LanguageModel(**dict(SMALL, **changes)).model_dump()))
    ids = torch.randint(0, 257, (2, 19), generator=torch.Generator().manual_seed(1))
    with world_of_one("cpu"):
        torch.manual_seed(0)
        model = build_gpt_model(run_config_for(card)).eval()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("bias") or "norm" in n:
                    p.normal_()
            want = model(ids, torch.arange(19)[None].expand(2, -1), None)
        weights = strip_extra_state(model.state_dict())
    info = export_hf(card, weights, str(tmp_path / "hf"), max_shard_bytes=60_000)
    assert info["arch"] == arch and info["shards"] > 1
    register_portable()
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf(ids).logits
    diff = (got - want).abs().max().item()
    assert diff <= 1e-5 * max(1.0, want.abs().max().item()), diff
