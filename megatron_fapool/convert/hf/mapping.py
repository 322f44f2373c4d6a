"""Canonical (Megatron TP 1) tensors <-> Hugging Face tensors, per architecture, both directions.

A :class:`Rule` maps a few canonical tensors to a few HF tensors and back; every layout
change is a pure re-arrangement (views, slices, concatenation), so a round trip is
bitwise. :func:`rules_for` lists a model's rules in file order (embeddings, layer 0, ...,
final norm, head). Layouts (megatron-core 0.16.1, checked against the built model):

* ``linear_qkv`` ``[ng (np/ng + 2) hn, h]`` per query group ``[q_0 .. q_{np/ng-1}, k, v]``
  <-> ``q_proj [np hn, h]``, ``k_proj [ng hn, h]``, ``v_proj [ng hn, h]`` (the bias alike);
* a GLU's ``linear_fc1`` ``[gate; up]`` <-> ``gate_proj``, ``up_proj`` (Mixtral: ``w1``, ``w3``);
* RoPE is half-split on both sides: no permutation of q / k rows;
* ``fapool_gpt`` experts: the experts' ``linear_fc1`` / ``linear_fc2`` stacked on a leading
  expert axis (``mlp.experts.up_proj [E, I, H]``, ``down_proj [E, H, I]``);
* Mixtral: the layout ``save_pretrained`` writes (``block_sparse_moe.experts.{e}.w1/w2/w3``,
  ``block_sparse_moe.gate``), which transformers 5 converts on load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch

from ...config.model_yaml import LanguageModel, activation
from ..canonical import ModelCard

__all__ = ["Rule", "canonical_shapes", "canonical_to_hf", "hf_shapes", "hf_to_canonical", "rules_for"]

Tensors = list[torch.Tensor]


@dataclass(frozen=True)
class Rule:
    """``canonical`` tensors <-> ``hf`` tensors; ``kind`` names the layout change (``same``, ``qkv``, ``glu``, ``stack``)."""

    canonical: tuple[str, ...]
    hf: tuple[str, ...]
    kind: str
    to_hf: Callable[[Tensors], Tensors]
    to_canonical: Callable[[Tensors], Tensors]

    def describe(self, hf_name: str) -> str:
        """``hf_name``'s source, e.g. ``decoder.layers.0.self_attention.linear_qkv.weight[q]``."""
        part = {"qkv": ("[q]", "[k]", "[v]"), "glu": ("[gate]", "[up]")}.get(self.kind)
        if part:
            return self.canonical[0] + part[self.hf.index(hf_name)]
        if self.kind == "stack":
            return f"{self.canonical[0]} .. ({len(self.canonical)} experts)"
        return self.canonical[0]


def _same(c: str, h: str) -> Rule:
    return Rule((c,), (h,), "same", lambda t: [t[0]], lambda t: [t[0]])


def _qkv(c: str, q: str, k: str, v: str, lm: LanguageModel) -> Rule:
    ng, hn = lm.query_groups, lm.head_dim
    r = lm.num_attention_heads // ng

    def split(t: Tensors) -> Tensors:
        w = t[0]
        g = w.view(ng, r + 2, hn, *w.shape[1:])
        return [g[:, :r].reshape(ng * r * hn, *w.shape[1:]).contiguous(),
                g[:, r].reshape(ng * hn, *w.shape[1:]).contiguous(),
                g[:, r + 1].reshape(ng * hn, *w.shape[1:]).contiguous()]

    def merge(t: Tensors) -> Tensors:
        q_, k_, v_ = t
        rest = q_.shape[1:]
        g = torch.cat([q_.reshape(ng, r, hn, *rest), k_.reshape(ng, 1, hn, *rest), v_.reshape(ng, 1, hn, *rest)], dim=1)
        return [g.reshape(ng * (r + 2) * hn, *rest)]

    return Rule((c,), (q, k, v), "qkv", split, merge)


def _glu(c: str, gate: str, up: str) -> Rule:
    return Rule((c,), (gate, up), "glu", lambda t: [x.contiguous() for x in t[0].chunk(2, dim=0)],
                lambda t: [torch.cat(t, dim=0)])


def _stack(cs: tuple[str, ...], h: str) -> Rule:
    return Rule(cs, (h,), "stack", lambda t: [torch.stack(t)], lambda t: [x.clone() for x in t[0].unbind(0)])


def _layer_rules(lm: LanguageModel, arch: str, i: int) -> list[Rule]:
    c, h = f"decoder.layers.{i}.", f"model.layers.{i}."
    bias_names = ("weight", "bias") if lm.normalization == "LayerNorm" else ("weight",)
    qkv_bias = lm.add_bias_linear or lm.add_qkv_bias
    gated = activation(lm.activation_func)[1]
    att, hatt = c + "self_attention.", h + "self_attn."
    out = [_same(f"{c}input_layernorm.{p}", f"{h}input_layernorm.{p}") for p in bias_names]
    out.append(_qkv(att + "linear_qkv.weight", hatt + "q_proj.weight", hatt + "k_proj.weight", hatt + "v_proj.weight", lm))
    if qkv_bias:
        out.append(_qkv(att + "linear_qkv.bias", hatt + "q_proj.bias", hatt + "k_proj.bias", hatt + "v_proj.bias", lm))
    if lm.qk_layernorm:
        for which in ("q", "k"):
            out += [_same(f"{att}{which}_layernorm.{p}", f"{hatt}{which}_norm.{p}") for p in bias_names]
    out.append(_same(att + "linear_proj.weight", hatt + "o_proj.weight"))
    if lm.add_bias_linear:
        out.append(_same(att + "linear_proj.bias", hatt + "o_proj.bias"))
    out += [_same(f"{c}pre_mlp_layernorm.{p}", f"{h}post_attention_layernorm.{p}") for p in bias_names]
    params = ("weight", "bias") if lm.add_bias_linear else ("weight",)
    mlp, hmlp = c + "mlp.", h + "mlp."
    if not lm.num_moe_experts:
        for p in params:
            if gated:
                out.append(_glu(f"{mlp}linear_fc1.{p}", f"{hmlp}gate_proj.{p}", f"{hmlp}up_proj.{p}"))
            else:
                out.append(_same(f"{mlp}linear_fc1.{p}", f"{hmlp}up_proj.{p}"))
            out.append(_same(f"{mlp}linear_fc2.{p}", f"{hmlp}down_proj.{p}"))
        return out
    experts = range(lm.num_moe_experts)
    ex = mlp + "experts.local_experts.{}."
    if arch == "mixtral":
        moe = h + "block_sparse_moe."
        out.append(_same(mlp + "router.weight", moe + "gate.weight"))
        for e in experts:
            out.append(_glu(ex.format(e) + "linear_fc1.weight", f"{moe}experts.{e}.w1.weight", f"{moe}experts.{e}.w3.weight"))
            out.append(_same(ex.format(e) + "linear_fc2.weight", f"{moe}experts.{e}.w2.weight"))
        return out
    out += [_same(f"{mlp}router.{p}", f"{hmlp}router.{p}") for p in params]
    suffix = {"weight": "", "bias": "_bias"}
    for p in params:
        out.append(_stack(tuple(ex.format(e) + f"linear_fc1.{p}" for e in experts), f"{hmlp}experts.up_proj{suffix[p]}"))
        out.append(_stack(tuple(ex.format(e) + f"linear_fc2.{p}" for e in experts), f"{hmlp}experts.down_proj{suffix[p]}"))
    return out


def rules_for(card: ModelCard, arch: str) -> list[Rule]:
    """Every tensor of ``card``'s model under ``arch`` (one of :data:`.arch.ARCHES`), in file order."""
    lm = card.lm()
    out = [_same("embedding.word_embeddings.weight", "model.embed_tokens.weight")]
    if lm.position_embedding_type == "learned_absolute":
        out.append(_same("embedding.position_embeddings.weight", "model.embed_positions.weight"))
    for i in range(lm.num_layers):
        out += _layer_rules(lm, arch, i)
    norm = ("weight", "bias") if lm.normalization == "LayerNorm" else ("weight",)
    out += [_same(f"decoder.final_layernorm.{p}", f"model.norm.{p}") for p in norm]
    if lm.untie_embeddings_and_output_weights:
        out.append(_same("output_layer.weight", "lm_head.weight"))
    return out


def canonical_shapes(card: ModelCard) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every canonical tensor of ``card``'s model (``GPTModel`` at TP 1, no ``_extra_state``)."""
    lm = card.lm()
    h, hn, ng, heads = lm.hidden_size, lm.head_dim, lm.query_groups, lm.num_attention_heads
    ffn = lm.ffn_hidden_size or 4 * h
    gated = activation(lm.activation_func)[1]
    shapes = {"embedding.word_embeddings.weight": (lm.vocab_size, h)}
    if lm.position_embedding_type == "learned_absolute":
        shapes["embedding.position_embeddings.weight"] = (lm.max_position_embeddings, h)
    norm = ("weight", "bias") if lm.normalization == "LayerNorm" else ("weight",)
    qkv_rows = ng * (heads // ng + 2) * hn
    for i in range(lm.num_layers):
        c = f"decoder.layers.{i}."
        a = c + "self_attention."
        shapes.update({f"{c}input_layernorm.{p}": (h,) for p in norm})
        shapes[a + "linear_qkv.weight"] = (qkv_rows, h)
        if lm.add_bias_linear or lm.add_qkv_bias:
            shapes[a + "linear_qkv.bias"] = (qkv_rows,)
        if lm.qk_layernorm:
            shapes.update({f"{a}{w}_layernorm.{p}": (hn,) for w in ("q", "k") for p in norm})
        shapes[a + "linear_proj.weight"] = (h, heads * hn)
        if lm.add_bias_linear:
            shapes[a + "linear_proj.bias"] = (h,)
        shapes.update({f"{c}pre_mlp_layernorm.{p}": (h,) for p in norm})
        mlps = [(c + "mlp.", ffn)]
        if lm.num_moe_experts:
            shapes[c + "mlp.router.weight"] = (lm.num_moe_experts, h)
            if lm.add_bias_linear:
                shapes[c + "mlp.router.bias"] = (lm.num_moe_experts,)
            moe_ffn = lm.moe_ffn_hidden_size or ffn
            mlps = [(f"{c}mlp.experts.local_experts.{e}.", moe_ffn) for e in range(lm.num_moe_experts)]
        for m, f in mlps:
            fc1 = 2 * f if gated else f
            shapes[m + "linear_fc1.weight"] = (fc1, h)
            shapes[m + "linear_fc2.weight"] = (h, f)
            if lm.add_bias_linear:
                shapes[m + "linear_fc1.bias"] = (fc1,)
                shapes[m + "linear_fc2.bias"] = (h,)
    shapes.update({f"decoder.final_layernorm.{p}": (h,) for p in norm})
    if lm.untie_embeddings_and_output_weights:
        shapes["output_layer.weight"] = (lm.vocab_size, h)
    return shapes


def hf_shapes(card: ModelCard, arch: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every HF tensor of ``card``'s model under ``arch`` (the rules applied to meta tensors)."""
    canon = canonical_shapes(card)
    out = {}
    for rule in rules_for(card, arch):
        metas = [torch.empty(canon[n], device="meta") for n in rule.canonical]
        out.update({n: tuple(t.shape) for n, t in zip(rule.hf, rule.to_hf(metas))})
    return out


def canonical_to_hf(card: ModelCard, arch: str, weights: Mapping[str, torch.Tensor]
                    ) -> Iterator[tuple[Rule, dict[str, torch.Tensor]]]:
    """Per rule, its HF tensors from ``weights`` (a mapping: may load lazily)."""
    for rule in rules_for(card, arch):
        yield rule, dict(zip(rule.hf, rule.to_hf([weights[n] for n in rule.canonical])))


def hf_to_canonical(card: ModelCard, arch: str, tensors: Mapping[str, torch.Tensor]
                    ) -> Iterator[tuple[Rule, dict[str, torch.Tensor]]]:
    """Per rule, its canonical tensors from HF ``tensors`` (a mapping: may load lazily); the inverse of
    :func:`canonical_to_hf`, for import and for a verification table after the inverse mapping."""
    for rule in rules_for(card, arch):
        yield rule, dict(zip(rule.canonical, rule.to_canonical([tensors[n] for n in rule.hf])))
