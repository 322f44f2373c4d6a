"""Configuration of ``fapool_gpt``: a Megatron-Core GPT (fapool layer spec) as a Hugging Face model.

Self-contained (imports only ``transformers``): this file is copied into every ``fapool_gpt``
export next to ``modeling_fapool_gpt.py``, and ``config.json``'s ``auto_map`` names both, so
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` loads the export in a
process that has never seen the package that wrote it.

The fields mirror the model YAML's ``language_model`` keys (Megatron's names in parentheses):

* ``position_embedding_type``: ``"learned_absolute"`` (``model.embed_positions``), ``"rope"``
  (half-split RoPE, ``rotary_base``) or ``"none"``;
* ``normalization``: ``"RMSNorm"`` or ``"LayerNorm"`` (torch's norms, ``norm_eps``);
* ``hidden_act``: ``"gelu"`` (erf), ``"relu"``, ``"relu2"`` (squared ReLU) or ``"silu"``;
  ``gated_mlp``: ``act(gate) * up`` (swiglu is ``silu`` + gated);
* ``linear_bias`` (``add_bias_linear``: every linear layer, the router included) and
  ``qkv_bias`` (``add_qkv_bias``: q, k, v only); ``qk_layernorm``;
* MoE (``num_experts`` > 0): Megatron's ``TopKRouter`` with its defaults (softmax score
  function, top-k on the logits, softmax over the k chosen, logits in ``router_dtype``),
  no capacity (no token is dropped), ``moe_intermediate_size`` per expert.
"""

from __future__ import annotations

from transformers import PreTrainedConfig

__all__ = ["FapoolGPTConfig"]

_ACTS = ("gelu", "relu", "relu2", "silu")


class FapoolGPTConfig(PreTrainedConfig):
    model_type = "fapool_gpt"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 4096
    position_embedding_type: str = "learned_absolute"
    rotary_base: float = 10000.0
    normalization: str = "RMSNorm"
    norm_eps: float = 1e-5
    hidden_act: str = "gelu"
    gated_mlp: bool = False
    linear_bias: bool = False
    qkv_bias: bool = False
    qk_layernorm: bool = False
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None
    router_dtype: str = "fp32"
    initializer_range: float = 0.02
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 256
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.moe_intermediate_size is None:
            self.moe_intermediate_size = self.intermediate_size
        super().__post_init__(**kwargs)
        self._check()

    def _check(self) -> None:
        choices = {
            "position_embedding_type": ("learned_absolute", "rope", "none"),
            "normalization": ("RMSNorm", "LayerNorm"),
            "hidden_act": _ACTS,
            "router_dtype": ("fp32", "fp64"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"fapool_gpt config: {name}={getattr(self, name)!r}, expected one of {allowed}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"fapool_gpt config: num_attention_heads {self.num_attention_heads} is not divisible by"
                f" num_key_value_heads {self.num_key_value_heads}"
            )
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"fapool_gpt config: num_experts_per_tok {self.num_experts_per_tok} must be in 1..{self.num_experts}"
            )
