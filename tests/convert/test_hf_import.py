"""read_hf: Hugging Face folders -> card + canonical weights.

Random-init ArceeForCausalLM / LlamaForCausalLM / MixtralForCausalLM saved by transformers load into our
GPTModel (build_gpt_model(run_config_for(card)), TP 1) with HF's logits (1e-5); ours -> HF -> ours is
bitwise (weights and card) for every architecture and dtype; broken folders are refused naming the file.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from megatron_fapool.config import ConfigError
from megatron_fapool.config.model_yaml import LanguageModel
from megatron_fapool.convert.canonical import DTYPES, ModelCard, language_model_dict, run_config_for
from megatron_fapool.convert.hf import canonical_shapes, check_exportable, export_hf, read_hf
from megatron_fapool.models.gpt import build_gpt_model
from megatron_fapool.runtime.local import world_of_one

SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1, rms_norm_eps=1e-5,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, eos_token_id=256, bos_token_id=None)


def hf_model(kind: str, **changes):
    import transformers

    cfg = dict(SHAPE, **changes)
    if kind == "arcee":
        return transformers.ArceeForCausalLM(transformers.ArceeConfig(hidden_act="gelu", **cfg))
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **cfg))


@pytest.mark.parametrize("kind, changes", [
    ("arcee", {}),
    ("arcee", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}),
    ("llama", {}),
    ("mixtral", {}),
])
def test_random_hf_model_imports_with_its_logits(tmp_path, kind, changes):
    torch.manual_seed(0)
    hf = hf_model(kind, **changes).eval()
    if changes.get("attention_bias"):  # non-zero biases (HF initialises them to 0)
        with torch.no_grad():
            for n, p in hf.named_parameters():
                if n.endswith(".bias"):
                    p.normal_(std=0.1)
    hf.save_pretrained(str(tmp_path))
    ids = torch.randint(0, 257, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
    card, weights = read_hf(str(tmp_path))
    assert check_exportable(card) == kind
    with world_of_one("cpu"):
        model = build_gpt_model(run_config_for(card)).eval()
        res = model.load_state_dict(weights, strict=False)
        assert not res.unexpected_keys and all(k.endswith("._extra_state") for k in res.missing_keys)
        with torch.no_grad():
            got = model(ids, torch.arange(37)[None].expand(2, -1), None)
    diff = (got - want).abs().max().item()
    assert diff <= 1e-5 * max(1.0, want.abs().max().item()), diff
    assert torch.equal(got.argmax(-1), want.argmax(-1))


TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96, vocab_size=512,
            max_position_embeddings=256, position_embedding_type="rope", normalization="RMSNorm",
            activation_func="gelu", add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0)


@pytest.mark.parametrize("changes, dtype", [
    ({}, "float32"),  # arcee
    ({}, "bfloat16"),
    ({"position_embedding_type": "learned_absolute"}, "float32"),  # fapool_gpt
    ({"num_moe_experts": 4, "moe_router_topk": 2}, "float32"),  # fapool_gpt MoE
    ({"activation_func": "swiglu", "untie_embeddings_and_output_weights": True}, "bfloat16"),  # llama
    ({"activation_func": "swiglu", "num_moe_experts": 4, "moe_router_topk": 2, "moe_ffn_hidden_size": 32}, "float32"),
    ({"normalization": "LayerNorm", "add_bias_linear": True, "qk_layernorm": True, "activation_func": "swiglu",
      "num_moe_experts": 4, "moe_router_topk": 2, "untie_embeddings_and_output_weights": True}, "float32"),
    ({"add_qkv_bias": True, "kv_channels": 24, "position_embedding_type": "none"}, "float16"),
])
def test_ours_to_hf_to_ours_is_bitwise(tmp_path, changes, dtype):
    card = ModelCard(language_model=language_model_dict(LanguageModel(**dict(TINY, **changes)).model_dump()),
                     dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(s, generator=gen).to(DTYPES[dtype]) for k, s in canonical_shapes(card).items()}
    info = export_hf(card, weights, str(tmp_path / "hf"), max_shard_bytes=100_000)
    back_card, back = read_hf(str(tmp_path / "hf"))
    assert back_card.dtype == dtype and canonical_shapes(back_card) == canonical_shapes(card)
    want = card.lm()
    if check_exportable(card) == "mixtral":  # one FFN size in Mixtral's config: the experts' (ours: unused dense one)
        want = want.model_copy(update={"ffn_hidden_size": want.moe_ffn_hidden_size, "moe_ffn_hidden_size": None})
    assert back_card.lm() == want, (back_card.language_model, card.language_model)
    assert set(back) == set(weights)
    for k in weights:
        assert back[k].dtype == weights[k].dtype and torch.equal(back[k], weights[k]), k
    assert info["shards"] > 1


@pytest.fixture()
def arcee_dir(tmp_path):
    card = ModelCard(language_model=language_model_dict(LanguageModel(**TINY).model_dump()))
    weights = {k: torch.randn(s) for k, s in canonical_shapes(card).items()}
    export_hf(card, weights, str(tmp_path / "hf"), max_shard_bytes=200_000, tokenizer=False)
    return tmp_path / "hf"


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_broken_folders_are_refused_naming_the_file(arcee_dir, tmp_path):
    with pytest.raises(ConfigError, match="config.json: missing"):
        read_hf(str(tmp_path))
    shards = sorted(arcee_dir.glob("model-*.safetensors"))
    assert len(shards) > 1
    shard = shards[1]
    copy = tmp_path / "copy"
    shutil.copytree(arcee_dir, copy)
    data = shard.read_bytes()
    (copy / shard.name).write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ConfigError, match=f"{shard.name}: not a readable safetensors file"):
        read_hf(str(copy))
    (copy / shard.name).unlink()
    with pytest.raises(ConfigError, match=f"{shard.name}: missing"):
        read_hf(str(copy))
    _edit_config(arcee_dir, hidden_act="gelu_pytorch_tanh")
    with pytest.raises(ConfigError, match="config.json: hidden_act: 'gelu_pytorch_tanh'"):
        read_hf(str(arcee_dir))
    _edit_config(arcee_dir, hidden_act="gelu", tie_word_embeddings=False)
    with pytest.raises(ConfigError, match="missing \\['lm_head.weight'\\].*tie_word_embeddings: true"):
        read_hf(str(arcee_dir))
    _edit_config(arcee_dir, tie_word_embeddings=True, intermediate_size=128)
    with pytest.raises(ConfigError, match="shapes disagree with config.json: model.layers.0.mlp.up_proj.weight"):
        read_hf(str(arcee_dir))
    _edit_config(arcee_dir, intermediate_size=96, dtype="bfloat16")
    with pytest.raises(ConfigError, match="dtype.*'bfloat16' but the tensors are \\['float32'\\]"):
        read_hf(str(arcee_dir))
    _edit_config(arcee_dir, dtype="float32")
    assert read_hf(str(arcee_dir))[0].dtype == "float32"
    (arcee_dir / "model.safetensors.index.json").unlink()
    with pytest.raises(ConfigError, match="no model.safetensors.index.json or model.safetensors"):
        read_hf(str(arcee_dir))
    assert os.path.exists(arcee_dir / "config.json")
