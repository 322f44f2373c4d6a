"""Configuration: the ``fapool`` section of the DeepSpeed JSON and the model YAML."""

from .errors import ConfigError
from .loader import RunConfig, load_deepspeed_json, load_model_yaml, load_run_config, parse_fapool
from .model_yaml import LanguageModel, ModelParallel, ModelYaml, to_transformer_config
from .schema import (
    ATTENTION_BACKENDS,
    AttentionBackendConfig,
    AttentionPoolConfig,
    DilatedAttentionConfig,
    FAPoolConfig,
    MASeparationConfig,
    ParallelConfig,
)

__all__ = [
    "ATTENTION_BACKENDS",
    "AttentionBackendConfig",
    "AttentionPoolConfig",
    "ConfigError",
    "DilatedAttentionConfig",
    "FAPoolConfig",
    "LanguageModel",
    "MASeparationConfig",
    "ModelParallel",
    "ModelYaml",
    "ParallelConfig",
    "RunConfig",
    "load_deepspeed_json",
    "load_model_yaml",
    "load_run_config",
    "parse_fapool",
    "to_transformer_config",
]
