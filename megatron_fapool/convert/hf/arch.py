"""Which Hugging Face architecture computes a model card's function exactly.

A rule table, one row per feature: an architecture is a target only when every row
holds (the same weights under another function would be a silently wrong model):

==================  =======================================================================
arch                what it computes (transformers 5.23)
==================  =======================================================================
``arcee``           RoPE (half-split), RMSNorm, non-gated ``down(act(up(x)))``, GQA, biases
                    on every linear layer or none (``attention_bias`` / ``mlp_bias``)
``llama``           as ``arcee`` with a gated MLP ``down(silu(gate(x)) * up(x))`` (swiglu)
``mixtral``         swiglu experts, softmax top-k router without bias (Megatron's default
                    routing: top-k of the logits, softmax over the k; Mixtral: softmax,
                    top-k, renormalised: the same numbers), no bias anywhere
``fapool_gpt``      our class (:mod:`.portable`): learned / RoPE / no positions,
                    RMSNorm / LayerNorm, any activation, gated or not, biases, q/k
                    layernorm, non-gated or gated experts
==================  =======================================================================

``auto`` takes the first exact row of ``arcee``, ``llama``, ``mixtral``, else ``fapool_gpt``.
Refused for every target: dilated attention (the same weights, another function) and
expert capacity (token dropping depends on the batch; no HF model drops tokens).
"""

from __future__ import annotations

from ...config import ConfigError
from ...config.model_yaml import LanguageModel
from ..canonical import ModelCard

__all__ = ["ARCHES", "STANDARD_ARCHES", "check_exportable", "mismatches"]

STANDARD_ARCHES = ("arcee", "llama", "mixtral")
ARCHES = STANDARD_ARCHES + ("fapool_gpt",)


def _bias_all_or_none(lm: LanguageModel) -> str | None:
    if lm.add_qkv_bias and not lm.add_bias_linear:
        return ("add_qkv_bias: true with add_bias_linear: false (biases on q/k/v only; the target's"
                " attention_bias flag puts them on q, k, v and o)")
    return None


def _standard_common(lm: LanguageModel) -> list[str]:
    out = []
    if lm.position_embedding_type != "rope":
        out.append(f"position_embedding_type: {lm.position_embedding_type} (the target has RoPE only)")
    if lm.normalization != "RMSNorm":
        out.append(f"normalization: {lm.normalization} (the target has RMSNorm only)")
    if lm.qk_layernorm:
        out.append("qk_layernorm: true (the target has no q/k layernorm)")
    if lm.hidden_size % lm.num_attention_heads:
        out.append(f"hidden_size {lm.hidden_size} not divisible by num_attention_heads {lm.num_attention_heads}"
                   " (the target's config refuses it)")
    return out


def _arcee(lm: LanguageModel) -> list[str]:
    out = _standard_common(lm)
    if lm.activation_func == "swiglu":
        out.append("activation_func: swiglu (Arcee's MLP is not gated: use llama)")
    if lm.num_moe_experts:
        out.append("num_moe_experts (Arcee is dense)")
    if why := _bias_all_or_none(lm):
        out.append(why)
    return out


def _llama(lm: LanguageModel) -> list[str]:
    out = _standard_common(lm)
    if lm.activation_func != "swiglu":
        out.append(f"activation_func: {lm.activation_func} (Llama's MLP is gated silu: swiglu only)")
    if lm.num_moe_experts:
        out.append("num_moe_experts (Llama is dense: use mixtral)")
    if why := _bias_all_or_none(lm):
        out.append(why)
    return out


def _mixtral(lm: LanguageModel) -> list[str]:
    out = _standard_common(lm)
    if not lm.num_moe_experts:
        out.append("no num_moe_experts (Mixtral is an MoE)")
    if lm.activation_func != "swiglu":
        out.append(f"activation_func: {lm.activation_func} (Mixtral's experts are gated silu: swiglu only)")
    if lm.add_bias_linear or lm.add_qkv_bias:
        out.append("add_bias_linear / add_qkv_bias (Mixtral has no biases)")
    return out


def _fapool_gpt(lm: LanguageModel) -> list[str]:
    return []


_RULES = {"arcee": _arcee, "llama": _llama, "mixtral": _mixtral, "fapool_gpt": _fapool_gpt}


def mismatches(card: ModelCard, arch: str) -> list[str]:
    """The features of ``card`` that ``arch`` does not compute exactly (empty: an exact target)."""
    if arch not in _RULES:
        raise ConfigError("--hf-arch", f"{arch!r}: expected auto or one of {', '.join(ARCHES)}")
    return _RULES[arch](card.lm())


def check_exportable(card: ModelCard, arch: str = "auto") -> str:
    """The architecture an export of ``card`` writes (``arch``, or the exact one for ``auto``).

    Raises :class:`ConfigError` naming the feature when the model has no exact target:
    dilated attention, expert capacity, or a feature ``arch`` does not compute."""
    if card.attention.get("kind", "dense") != "dense":
        raise ConfigError(
            "attention", f"{card.attention.get('kind')!r}: a Hugging Face model computes dense attention, which is"
            " another function of the same weights; export a model trained with dense attention"
        )
    lm = card.lm()
    if lm.num_moe_experts and lm.moe_expert_capacity_factor is not None:
        raise ConfigError(
            "language_model.moe_expert_capacity_factor",
            f"{lm.moe_expert_capacity_factor}: tokens dropped beyond an expert's capacity depend on the batch;"
            " no Hugging Face target drops tokens (export a model trained without capacity)",
        )
    if arch == "auto":
        for name in STANDARD_ARCHES:
            if not mismatches(card, name):
                return name
        return "fapool_gpt"
    why = mismatches(card, arch)
    if why:
        raise ConfigError("--hf-arch", f"{arch} does not compute this model exactly: {'; '.join(why)};"
                          " use --hf-arch fapool_gpt (our class, shipped in the export) or auto")
    return arch
