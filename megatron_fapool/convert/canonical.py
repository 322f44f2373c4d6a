"""The converter's common form: what a model is (:class:`ModelCard`) and its weights as
TP 1 / PP 1 global tensors under Megatron's names.

**Weights** are a ``dict[str, torch.Tensor]`` keyed like ``GPTModel.state_dict()`` of
the model built at TP = PP = 1 with the fapool layer spec, without the ``_extra_state``
entries (they hold nothing for these modules): ``embedding.word_embeddings.weight``,
``decoder.layers.{i}.self_attention.linear_qkv.weight`` (per query group
``[q..., k, v]``), ``decoder.layers.{i}.mlp.linear_fc1.weight`` (``[gate; up]`` for a
GLU), ... An MoE model's experts are under the colocated names with global expert ids,
``decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc1.weight``, wherever they
were trained (colocated or on MA-separation expert ranks). Every format converts to and
from this form; Megatron's distributed checkpoint (``torch_dist``) is its form on disk.

**The card** is the model's structure (every ``language_model`` key of the model
YAML), the attention it was trained with (dense, or dilated: the same weights compute
another function) and the dtype of the weights. It travels as ``fapool_dist.json``
beside a distributed checkpoint and is derived from ``fapool_checkpoint.json`` for
checkpoints of ``launch/train.py``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import torch

from ..config import ConfigError, RunConfig
from ..config.model_yaml import LanguageModel, ModelYaml
from ..config.schema import FAPoolConfig

__all__ = [
    "DTYPES",
    "ModelCard",
    "TrainingState",
    "card_of_run_config",
    "language_model_dict",
    "resolved_model",
    "SHAPE_FREE",
    "dtype_name",
    "run_config_for",
    "strip_extra_state",
]

#: dtype names of cards and ``--dtype`` flags
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PRECISION = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def dtype_name(dtype: torch.dtype) -> str:
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"unsupported dtype {dtype}")


def strip_extra_state(state: dict) -> dict:
    """A Megatron state dict without its ``_extra_state`` entries (TE-style placeholders)."""
    return {k: v for k, v in state.items() if not k.endswith("._extra_state")}


@dataclass
class ModelCard:
    """What the weights are: the model YAML's ``language_model`` (every key), the attention
    (``{"kind": "dense"}`` or ``{"kind": "dilated", "segment_lengths": [...], "dilation_rates": [...]}``)
    and the dtype of the weights (``float32`` / ``bfloat16`` / ``float16``)."""

    language_model: dict
    attention: dict = field(default_factory=lambda: {"kind": "dense"})
    dtype: str = "float32"

    def __post_init__(self):
        self.language_model = language_model_dict(self.language_model)

    def lm(self) -> LanguageModel:
        return LanguageModel(**self.language_model)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, *, where: str = "card") -> "ModelCard":
        try:
            card = cls(language_model=dict(d["language_model"]), attention=dict(d.get("attention", {"kind": "dense"})),
                       dtype=str(d.get("dtype", "float32")))
            card.lm()
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(where, f"not a model card of this tool: {e}") from None
        if card.dtype not in DTYPES:
            raise ConfigError(where, f"dtype {card.dtype!r}: expected one of {sorted(DTYPES)}")
        return card


@dataclass
class TrainingState:
    """What resuming needs besides weights and optimizer tensors (``fapool_dist.json``'s ``training``).

    ``lr_scheduler`` is DeepSpeed's scheduler ``state_dict()``; ``adam_step`` the optimizer's step
    count (every parameter's, they are equal); ``pool_manager`` the attention pool's resource
    manager state (``None`` without a pool).
    """

    iteration: int
    consumed_samples: int
    global_steps: int
    global_samples: int
    skipped_steps: int = 0
    adam_step: int | None = None
    lr_scheduler: dict | None = None
    pool_manager: dict | None = None
    data_parallel_size: int = 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainingState":
        return cls(**d)


def language_model_dict(d: dict) -> dict:
    """``language_model`` keys as a card keeps them: the YAML's keys of :class:`LanguageModel` only, and
    the ``moe_*`` defaults dropped for a dense model (a dump of a validated model carries them)."""
    known = set(LanguageModel.model_fields)
    out = {k: v for k, v in d.items() if k in known}
    if out.get("num_moe_experts") is None:
        out = {k: v for k, v in out.items() if not k.startswith("moe_") and k != "num_moe_experts"}
    return out


#: language-model keys that change no weight and no function of a trained model (training-only
#: coefficients included: a Hugging Face folder does not keep them)
SHAPE_FREE = ("seq_length", "hidden_dropout", "attention_dropout", "moe_aux_loss_coeff", "moe_z_loss_coeff")


def resolved_model(lm: LanguageModel) -> dict:
    """``lm``'s keys with Megatron's defaults filled in (query groups, head dim, FFN sizes) and the keys
    that change no weight dropped: two spellings of one model compare equal."""
    d = {k: v for k, v in language_model_dict(lm.model_dump()).items() if k not in SHAPE_FREE}
    d.update(num_query_groups=lm.query_groups, kv_channels=lm.head_dim,
             ffn_hidden_size=lm.ffn_hidden_size or 4 * lm.hidden_size)
    if lm.num_moe_experts:
        d["moe_ffn_hidden_size"] = lm.moe_ffn_hidden_size or d["ffn_hidden_size"]
    return d


def card_of_run_config(cfg: RunConfig) -> ModelCard:
    """The card of the model ``cfg`` builds."""
    dil = cfg.fapool.dilated_attention
    attention = ({"kind": "dilated", "segment_lengths": list(dil.segment_lengths), "dilation_rates": list(dil.dilation_rates)}
                 if dil.enabled else {"kind": "dense"})
    return ModelCard(language_model=cfg.model.language_model.model_dump(), attention=attention,
                     dtype={"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[cfg.precision])


def run_config_for(card: ModelCard, *, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                   deepspeed: dict | None = None, json_path: str = "<converter>") -> RunConfig:
    """A :class:`RunConfig` that builds ``card``'s model (dense attention: the weights are the same
    for dilated) at the given TP/PP, for the converter's own model instances."""
    lm = card.lm()
    return RunConfig(
        json_path=json_path,
        deepspeed=dict(deepspeed or {}),
        fapool=FAPoolConfig(model_yaml="<card>"),
        model_yaml_path="<card>",
        model=ModelYaml(language_model=lm),
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        precision=_PRECISION[card.dtype],
    )


def write_json(path: str, obj: dict) -> None:
    """JSON to ``path`` through a temporary file and ``os.replace`` (never half written)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
