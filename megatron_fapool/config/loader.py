"""Load a DeepSpeed JSON with its ``fapool`` section and the model YAML it names.

Everything is checked here, before any process group or tensor exists: duplicate
JSON/YAML keys, unknown keys, wrong types, conflicting parallel sizes. Every failure
is a :class:`ConfigError` with a one-line message naming the file and the key.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import ValidationError

from .calibration import load_calibration
from .errors import ConfigError, from_validation_error
from .model_yaml import DEFAULT_MOE_AUX_LOSS_COEFF, LanguageModel, ModelYaml, UniqueKeyLoader
from .schema import FAPoolConfig, MASeparationConfig, known_keys

__all__ = ["RunConfig", "load_deepspeed_json", "load_model_yaml", "load_run_config", "parse_fapool"]


@dataclass(frozen=True)
class RunConfig:
    """The resolved configuration of one run."""

    json_path: str
    deepspeed: dict  # the DeepSpeed JSON without the fapool section, for deepspeed.initialize
    fapool: FAPoolConfig
    model_yaml_path: str
    model: ModelYaml
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    precision: str  # "fp32" | "bf16" | "fp16", from the DeepSpeed JSON

    @property
    def params_dtype(self):
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]

    def describe(self) -> str:
        """Readable resolved config (printed on rank 0)."""
        lm = self.model.language_model
        pool = self.fapool.attention_pool
        ma = self.fapool.ma_separation
        dil = self.fapool.dilated_attention
        lines = [
            f"config        {self.json_path}",
            f"model yaml    {self.model_yaml_path}",
            f"model         layers={lm.num_layers} hidden={lm.hidden_size} heads={lm.num_attention_heads}"
            f" (query groups {lm.query_groups}, head dim {lm.head_dim}) ffn={lm.ffn_hidden_size or 4 * lm.hidden_size}"
            f" {lm.activation_func} {lm.normalization} vocab={lm.vocab_size}"
            f" max_pos={lm.max_position_embeddings} pos={lm.position_embedding_type}"
            + (
                f" experts={lm.num_moe_experts} top{lm.moe_router_topk}"
                f" expert_ffn={lm.moe_ffn_hidden_size or lm.ffn_hidden_size or 4 * lm.hidden_size}"
                f" aux={DEFAULT_MOE_AUX_LOSS_COEFF if lm.moe_aux_loss_coeff is None else lm.moe_aux_loss_coeff}"
                f" z={lm.moe_z_loss_coeff} capacity={lm.moe_expert_capacity_factor} router={lm.moe_router_dtype}"
                if lm.num_moe_experts
                else ""
            ),
            f"parallel      TP={self.tensor_model_parallel_size} PP={self.pipeline_model_parallel_size}"
            f" precision={self.precision}",
            f"attention     backend={self.fapool.attention_backend.backend}"
            + (
                f" dilated(w={dil.segment_lengths}, r={dil.dilation_rates})"
                if dil.enabled
                else " dense"
            ),
            "attention pool "
            + (
                f"on: pool_size={pool.pool_size} threshold={pool.threshold}"
                f" max_active={pool.max_active or 'all'} hysteresis={pool.hysteresis}"
                f" kv_chunk_tokens={pool.kv_chunk_tokens}"
                if pool.enabled
                else "off"
            ),
            "MA separation "
            + (
                f"on: attention:expert={ma.attention_expert_ratio} micro_batches={ma.micro_batches}"
                f" on_expert_loss={ma.on_expert_loss}"
                if ma.enabled
                else "off"
            ),
        ]
        return "\n".join(lines)


def _duplicate_checked_pairs(pairs):
    keys = [k for k, _ in pairs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ConfigError(dup[0], "key appears more than once in the same object (JSON keeps only one; remove the duplicate)")
    return dict(pairs)


def load_deepspeed_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError("--deepspeed_config", f"file not found: {path}")
    with open(path) as f:
        try:
            data = json.load(f, object_pairs_hook=_duplicate_checked_pairs)
        except ConfigError as e:
            raise ConfigError(e.key, e.reason, source=path) from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"line {e.lineno} column {e.colno}", f"invalid JSON: {e.msg}", source=path) from None
    if not isinstance(data, dict):
        raise ConfigError("<top level>", f"expected a JSON object, got {type(data).__name__}", source=path)
    return data


def parse_fapool(section: Any, *, source: str | None = None) -> FAPoolConfig:
    if not isinstance(section, dict):
        raise ConfigError("fapool", f"expected an object, got {type(section).__name__}", source=source)
    try:
        return FAPoolConfig.model_validate(section)
    except ValidationError as e:
        raise from_validation_error(
            e, prefix="fapool", source=source, known_keys=lambda p: known_keys(FAPoolConfig, p)
        ) from None


def load_model_yaml(path: str) -> ModelYaml:
    if not os.path.isfile(path):
        raise ConfigError("fapool.model_yaml", f"file not found: {path}")
    with open(path) as f:
        try:
            data = yaml.load(f, Loader=UniqueKeyLoader)
        except yaml.YAMLError as e:
            raise ConfigError("<yaml>", " ".join(str(e).split()), source=path) from None
    if not isinstance(data, dict):
        raise ConfigError("<top level>", "expected a mapping with language_model: and model_parallel:", source=path)
    try:
        return ModelYaml.model_validate(data)
    except ValidationError as e:
        raise from_validation_error(
            e, prefix="", source=path, known_keys=lambda p: known_keys(ModelYaml, p)
        ) from None


def _relative_to(directory: str, path: str) -> str:
    """Paths in the JSON are relative to the JSON file, as users write them."""
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(directory, path))


def _precision(ds: dict, source: str) -> str:
    enabled = [
        name
        for key, name in (("bf16", "bf16"), ("fp16", "fp16"))
        if isinstance(ds.get(key), dict) and ds[key].get("enabled") in (True, "true", "auto")
    ]
    if len(enabled) > 1:
        raise ConfigError("bf16/fp16", "both are enabled: enable at most one", source=source)
    return enabled[0] if enabled else "fp32"


def load_run_config(json_path: str, *, model_yaml: str | None = None) -> RunConfig:
    """Read and validate the DeepSpeed JSON at ``json_path`` and its model YAML.

    ``model_yaml`` (a ``--yaml-cfg`` path, relative to the working directory) replaces
    the JSON's ``fapool.model_yaml``.
    """
    ds = load_deepspeed_json(json_path)
    if "fapool" not in ds:
        raise ConfigError("fapool", "section missing: add a top-level \"fapool\" object (see configs/)", source=json_path)
    fapool = parse_fapool(ds.pop("fapool"), source=json_path)
    here = os.path.dirname(os.path.abspath(json_path))
    if model_yaml is not None:
        if not os.path.isfile(model_yaml):
            raise ConfigError("--yaml-cfg", f"file not found: {model_yaml}")
        yaml_path = os.path.abspath(model_yaml)
    else:
        yaml_path = _relative_to(here, fapool.model_yaml)
    pool = fapool.attention_pool
    if pool.calibration_file:
        pool = pool.model_copy(update={"calibration_file": _relative_to(here, pool.calibration_file)})
        load_calibration(pool.calibration_file)  # a missing or broken file fails now, not mid-run
        fapool = fapool.model_copy(update={"attention_pool": pool})
    model = load_model_yaml(yaml_path)

    sizes = {}
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
        from_json = getattr(fapool.parallel, name)
        from_yaml = getattr(model.model_parallel, name)
        yaml_given = name in model.model_parallel.model_fields_set
        if from_json is not None and yaml_given and from_json != from_yaml:
            raise ConfigError(
                f"fapool.parallel.{name}",
                f"{from_json} conflicts with model_parallel.{name}={from_yaml} in {yaml_path}: give it in one place",
                source=json_path,
            )
        sizes[name] = from_json if from_json is not None else from_yaml

    lm = model.language_model
    tp, pp = sizes["tensor_model_parallel_size"], sizes["pipeline_model_parallel_size"]
    if lm.num_layers % pp:
        raise ConfigError(
            "pipeline_model_parallel_size",
            f"{pp} does not divide num_layers={lm.num_layers}: pick a divisor",
            source=json_path,
        )
    precision = _precision(ds, json_path)
    ma = fapool.ma_separation
    if ma.calibration_file:
        ma = ma.model_copy(update={"calibration_file": _relative_to(here, ma.calibration_file)})
        if not os.path.isfile(ma.calibration_file):
            raise ConfigError("fapool.ma_separation.calibration_file", f"file not found: {ma.calibration_file}",
                              source=json_path)
        fapool = fapool.model_copy(update={"ma_separation": ma})
    lm = _resolve_moe(lm, ma, yaml_path=yaml_path, json_path=json_path)
    model = model.model_copy(update={"language_model": lm})
    _check_moe(model, fapool, precision, tp, yaml_path=yaml_path, json_path=json_path)
    return RunConfig(
        json_path=json_path,
        deepspeed=ds,
        fapool=fapool,
        model_yaml_path=yaml_path,
        model=model,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        precision=precision,
    )


# fapool.ma_separation key -> model YAML (language_model) key
MA_MODEL_KEYS = {
    "num_experts": "num_moe_experts",
    "top_k": "moe_router_topk",
    "capacity_factor": "moe_expert_capacity_factor",
    "aux_loss_coeff": "moe_aux_loss_coeff",
    "z_loss_coeff": "moe_z_loss_coeff",
}


def _resolve_moe(lm: LanguageModel, ma: MASeparationConfig, *, yaml_path: str, json_path: str) -> LanguageModel:
    """The model with ``fapool.ma_separation``'s model keys filled in (they must agree with the YAML's)."""
    given = {k: getattr(ma, k) for k in MA_MODEL_KEYS if getattr(ma, k) is not None}
    if lm.num_moe_experts is None:
        if ma.enabled:
            raise ConfigError(
                "fapool.ma_separation.enabled",
                f"true, but {yaml_path} is a dense model (no num_moe_experts): MA separation places MoE experts;"
                " add num_moe_experts (and moe_router_topk) to the model YAML or set enabled to false",
                source=json_path,
            )
        if given:
            key = next(iter(given))
            raise ConfigError(
                f"fapool.ma_separation.{key}",
                f"given, but {yaml_path} is a dense model (no num_moe_experts): remove it",
                source=json_path,
            )
        return lm
    update = {}
    for key, value in given.items():
        yaml_key = MA_MODEL_KEYS[key]
        if yaml_key in lm.model_fields_set:
            if getattr(lm, yaml_key) != value:
                raise ConfigError(
                    f"fapool.ma_separation.{key}",
                    f"{value} differs from language_model.{yaml_key}={getattr(lm, yaml_key)} in {yaml_path}:"
                    " give it in one place, or the same value in both",
                    source=json_path,
                )
        else:
            update[yaml_key] = value
    lm = lm.model_copy(update=update)
    if lm.moe_router_topk > lm.num_moe_experts:
        raise ConfigError(
            "fapool.ma_separation.top_k" if "top_k" in given else "language_model.moe_router_topk",
            f"top-{lm.moe_router_topk} routing over {lm.num_moe_experts} experts: top_k must be <= the experts",
            source=json_path if "top_k" in given else yaml_path,
        )
    return lm


def _check_moe(model: ModelYaml, fapool: FAPoolConfig, precision: str, tp: int, *, yaml_path: str,
               json_path: str) -> None:
    """What an MoE model (colocated or MA separated) cannot run with, refused at load."""
    lm, ma = model.language_model, fapool.ma_separation
    ep = model.model_parallel.expert_model_parallel_size
    if ep > 1:
        raise ConfigError(
            "model_parallel.expert_model_parallel_size",
            f"{ep}: Megatron expert parallelism over the base ranks is not supported (every base rank holds all"
            " experts); use 1, or put the experts on their own ranks with fapool.ma_separation",
            source=yaml_path,
        )
    if not lm.num_moe_experts:
        return
    if precision == "fp16":
        raise ConfigError(
            "fp16.enabled",
            f"fp16 with {'MA separation' if ma.enabled else 'an MoE model'}: the fp16 loss scale does not reach the"
            " router's aux/z-loss gradients (Megatron's MoEAuxLossAutoScaler); use bf16 or fp32",
            source=json_path,
        )
    if tp > 1 and lm.seq_length and lm.seq_length % tp:
        raise ConfigError(
            "language_model.seq_length",
            f"{lm.seq_length} is not divisible by tensor_model_parallel_size={tp}: an MoE model at TP > 1 runs"
            " sequence parallel (Megatron's MoELayer trains only so), which splits the sequence over TP",
            source=yaml_path,
        )
    if not ma.enabled:
        return
    if fapool.attention_pool.enabled:
        raise ConfigError(
            "fapool.ma_separation.enabled",
            "MA separation together with the attention pool is not supported yet: disable one of"
            " fapool.attention_pool and fapool.ma_separation",
            source=json_path,
        )
    if ma.micro_batches > 1 and lm.moe_expert_capacity_factor is not None:
        raise ConfigError(
            "fapool.ma_separation.micro_batches",
            f"{ma.micro_batches} with capacity factor {lm.moe_expert_capacity_factor}: capacity drops depend on all"
            " tokens of the call; use micro_batches 1 or no capacity",
            source=json_path,
        )
