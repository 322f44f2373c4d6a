"""A model card's ``language_model`` <-> a Hugging Face ``config.json`` (arcee, llama, mixtral, fapool_gpt).

:func:`hf_config_dict` gives the keyword arguments of the target's config class;
:func:`card_of_hf_config` reads a ``config.json`` back and refuses, naming the field, what
our model cannot compute exactly (RoPE scaling, sliding windows, tanh GELU, biases on
only some layers, attention dropout, ...). The byte tokenizer's end of document (256) is
the EOS token.
"""

from __future__ import annotations

from ...config import ConfigError
from ...config.model_yaml import DEFAULT_MOE_AUX_LOSS_COEFF, LanguageModel
from ...data.tokenizer import EOD_ID
from ..canonical import DTYPES, ModelCard, language_model_dict

__all__ = ["ARCH_CLASSES", "card_of_hf_config", "hf_config_dict"]

#: arch -> (model_type, architectures[0])
ARCH_CLASSES = {
    "arcee": ("arcee", "ArceeForCausalLM"),
    "llama": ("llama", "LlamaForCausalLM"),
    "mixtral": ("mixtral", "MixtralForCausalLM"),
    "fapool_gpt": ("fapool_gpt", "FapoolGPTForCausalLM"),
}
_HF_ACT = {"gelu": "gelu", "relu": "relu", "silu": "silu", "squared_relu": "relu2"}
_OUR_ACT = {v: k for k, v in _HF_ACT.items()}


def hf_config_dict(card: ModelCard, arch: str, dtype: str) -> dict:
    """Keyword arguments of ``arch``'s config class for ``card`` (weights of ``dtype``)."""
    lm = card.lm()
    ffn = lm.ffn_hidden_size or 4 * lm.hidden_size
    common = dict(
        vocab_size=lm.vocab_size, hidden_size=lm.hidden_size, num_hidden_layers=lm.num_layers,
        num_attention_heads=lm.num_attention_heads, num_key_value_heads=lm.query_groups, head_dim=lm.head_dim,
        max_position_embeddings=lm.max_position_embeddings, initializer_range=lm.init_method_std,
        tie_word_embeddings=not lm.untie_embeddings_and_output_weights, bos_token_id=None, eos_token_id=EOD_ID,
        pad_token_id=None, dtype=dtype, use_cache=True,
    )
    moe_coeff = DEFAULT_MOE_AUX_LOSS_COEFF if lm.moe_aux_loss_coeff is None else lm.moe_aux_loss_coeff
    if arch == "fapool_gpt":
        return dict(
            common, intermediate_size=ffn, position_embedding_type=lm.position_embedding_type,
            rotary_base=float(lm.rotary_base), normalization=lm.normalization, norm_eps=lm.layernorm_epsilon,
            hidden_act=_HF_ACT.get(lm.activation_func, "silu"), gated_mlp=lm.activation_func == "swiglu",
            linear_bias=lm.add_bias_linear, qkv_bias=lm.add_qkv_bias, qk_layernorm=lm.qk_layernorm,
            num_experts=lm.num_moe_experts or 0, num_experts_per_tok=lm.moe_router_topk if lm.num_moe_experts else 2,
            moe_intermediate_size=(lm.moe_ffn_hidden_size or ffn) if lm.num_moe_experts else None,
            router_dtype=lm.moe_router_dtype,
        )
    rope = {"rope_type": "default", "rope_theta": float(lm.rotary_base)}
    out = dict(common, rms_norm_eps=lm.layernorm_epsilon, rope_parameters=rope, attention_dropout=0.0)
    if arch == "mixtral":
        return dict(out, intermediate_size=lm.moe_ffn_hidden_size or ffn, hidden_act="silu",
                    num_local_experts=lm.num_moe_experts, num_experts_per_tok=lm.moe_router_topk,
                    router_aux_loss_coef=moe_coeff, router_jitter_noise=0.0, sliding_window=None,
                    output_router_logits=False)
    bias = lm.add_bias_linear
    act = "silu" if arch == "llama" else _HF_ACT[lm.activation_func]
    out.update(intermediate_size=ffn, hidden_act=act, attention_bias=bias, mlp_bias=bias)
    if arch == "llama":
        out["pretraining_tp"] = 1
    return out


def _refuse(field: str, value, why: str, where: str):
    raise ConfigError(f"{where}: {field}", f"{value!r}: {why}")


def _rope_base(cfg: dict, where: str) -> int:
    rope = cfg.get("rope_parameters") or {}
    if cfg.get("rope_scaling"):
        _refuse("rope_scaling", cfg["rope_scaling"], "RoPE scaling is not modelled (default RoPE only)", where)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        _refuse("rope_parameters.rope_type", kind, "only the default RoPE is modelled (no scaling)", where)
    extra = sorted(set(rope) - {"rope_type", "type", "rope_theta"})
    if extra:
        _refuse("rope_parameters", rope, f"keys {extra} are not modelled (default RoPE only)", where)
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        _refuse("partial_rotary_factor", cfg["partial_rotary_factor"], "only full rotary is modelled", where)
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    if float(theta) != int(theta) or int(theta) <= 0:
        _refuse("rope_parameters.rope_theta", theta, "rotary_base is a positive integer in our model YAML", where)
    return int(theta)


def _dtype(cfg: dict, where: str) -> str:
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    if dtype not in DTYPES:
        _refuse("dtype", dtype, f"expected one of {sorted(DTYPES)}", where)
    return dtype


def card_of_hf_config(cfg: dict, where: str = "config.json") -> tuple[ModelCard, str]:
    """``(card, arch)`` of a ``config.json``; :class:`ConfigError` naming the field for what we cannot represent."""
    model_type = cfg.get("model_type")
    arch = {v[0]: k for k, v in ARCH_CLASSES.items()}.get(model_type)
    if arch is None:
        _refuse("model_type", model_type, f"not importable; supported: {', '.join(ARCH_CLASSES)}", where)
    for key in ("attention_dropout", "hidden_dropout"):
        if float(cfg.get(key) or 0.0):
            _refuse(key, cfg[key], "our core attention runs without dropout: set it to 0.0", where)
    if cfg.get("sliding_window") is not None:
        _refuse("sliding_window", cfg["sliding_window"], "sliding-window attention is not modelled", where)
    heads = cfg["num_attention_heads"]
    lm = dict(
        num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"], num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads") or heads, vocab_size=cfg["vocab_size"],
        max_position_embeddings=cfg["max_position_embeddings"], hidden_dropout=0.0, attention_dropout=0.0,
        init_method_std=float(cfg.get("initializer_range", 0.02)),
        untie_embeddings_and_output_weights=not cfg.get("tie_word_embeddings", False),
    )
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    if head_dim * heads != cfg["hidden_size"] or cfg["hidden_size"] % heads:
        lm["kv_channels"] = head_dim
    if arch == "fapool_gpt":
        act = cfg.get("hidden_act", "gelu")
        if act not in _OUR_ACT:
            _refuse("hidden_act", act, f"expected one of {sorted(_OUR_ACT)}", where)
        gated = bool(cfg.get("gated_mlp"))
        if gated and act != "silu":
            _refuse("hidden_act", act, "a gated MLP is modelled with silu only (swiglu)", where)
        lm.update(
            ffn_hidden_size=cfg["intermediate_size"], position_embedding_type=cfg.get("position_embedding_type"),
            rotary_base=int(cfg.get("rotary_base", 10000)), normalization=cfg.get("normalization"),
            layernorm_epsilon=float(cfg.get("norm_eps", 1e-5)), activation_func="swiglu" if gated else _OUR_ACT[act],
            add_bias_linear=bool(cfg.get("linear_bias")), add_qkv_bias=bool(cfg.get("qkv_bias")),
            qk_layernorm=bool(cfg.get("qk_layernorm")),
        )
        if cfg.get("num_experts"):
            lm.update(num_moe_experts=cfg["num_experts"], moe_router_topk=cfg["num_experts_per_tok"],
                      moe_router_dtype=cfg.get("router_dtype", "fp32"))
            moe_ffn = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
            if moe_ffn != cfg["intermediate_size"]:  # the default is ffn_hidden_size
                lm["moe_ffn_hidden_size"] = moe_ffn
    else:
        act = cfg.get("hidden_act")
        if arch in ("llama", "mixtral"):
            if act != "silu":
                _refuse("hidden_act", act, f"{arch}'s gated MLP is modelled with silu only (swiglu)", where)
            our_act = "swiglu"
        else:
            if act not in _OUR_ACT:
                why = ("the tanh approximation is not our erf GELU ('gelu')" if act == "gelu_pytorch_tanh"
                       else f"expected one of {sorted(_OUR_ACT)}")
                _refuse("hidden_act", act, why, where)
            our_act = _OUR_ACT[act]
        if arch == "llama" and cfg.get("pretraining_tp", 1) != 1:
            _refuse("pretraining_tp", cfg["pretraining_tp"], "only 1 is modelled", where)
        attn_bias, mlp_bias = bool(cfg.get("attention_bias")), bool(cfg.get("mlp_bias"))
        if attn_bias != mlp_bias:
            _refuse("attention_bias", attn_bias, f"with mlp_bias={mlp_bias}: our add_bias_linear puts biases on every"
                    " linear layer or none", where)
        lm.update(ffn_hidden_size=cfg["intermediate_size"], position_embedding_type="rope",
                  rotary_base=_rope_base(cfg, where), normalization="RMSNorm",
                  layernorm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)), activation_func=our_act,
                  add_bias_linear=attn_bias)
        if arch == "mixtral":
            if float(cfg.get("router_jitter_noise") or 0.0):
                _refuse("router_jitter_noise", cfg["router_jitter_noise"], "router jitter is not modelled", where)
            # Mixtral has one FFN size, the experts'; our dense ffn_hidden_size is unused by an MoE model
            lm.update(num_moe_experts=cfg["num_local_experts"], moe_router_topk=cfg["num_experts_per_tok"])
            coeff = float(cfg.get("router_aux_loss_coef", DEFAULT_MOE_AUX_LOSS_COEFF))
            if coeff != DEFAULT_MOE_AUX_LOSS_COEFF:
                lm["moe_aux_loss_coeff"] = coeff
    try:
        model = LanguageModel(**lm)
    except ValueError as e:
        raise ConfigError(where, f"not representable as our model YAML: {e}".replace("\n", " ")) from None
    card = ModelCard(language_model=language_model_dict(model.model_dump()), dtype=_dtype(cfg, where))
    return card, arch
