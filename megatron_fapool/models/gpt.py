"""Build Megatron's ``GPTModel`` on a base rank from the resolved config."""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from ..config import ConfigError, RunConfig, to_transformer_config
from .rope import install_rope
from .specs import layer_spec_for

__all__ = ["build_gpt_model", "check_runnable_here", "transformer_config_for"]


def transformer_config_for(run_config: RunConfig, **overrides):
    kwargs = dict(
        tensor_model_parallel_size=run_config.tensor_model_parallel_size,
        pipeline_model_parallel_size=run_config.pipeline_model_parallel_size,
        params_dtype=run_config.params_dtype,
    )
    kwargs.update(overrides)
    return to_transformer_config(run_config.model.language_model, **kwargs)


def check_runnable_here(run_config: RunConfig, *, pipeline_model_parallel_size: int | None = None) -> None:
    """What this package cannot build, and what megatron-core 0.16 can only build with CUDA on a
    CPU-only machine, refused before start-up."""
    lm = run_config.model.language_model
    if lm.num_moe_experts:
        raise ConfigError(
            "language_model.num_moe_experts",
            f"{lm.num_moe_experts} experts, but this version builds no MoE layers: the model would silently be"
            " dense; remove num_moe_experts (and the moe_* keys) from the model YAML",
            source=run_config.model_yaml_path,
        )
    if torch.cuda.is_available():
        return
    pp = pipeline_model_parallel_size or run_config.pipeline_model_parallel_size
    if pp > 1 and not lm.untie_embeddings_and_output_weights:
        raise ConfigError(
            "language_model.untie_embeddings_and_output_weights",
            "tied input/output embeddings across pipeline stages need a GPU with megatron-core 0.16"
            " (it copies them with .cuda()); set it to true on CPU",
            source=run_config.model_yaml_path,
        )


def build_gpt_model(run_config: RunConfig, *, layer_spec=None, config=None, pool=None, **config_overrides) -> GPTModel:
    """``GPTModel`` for this base rank's pipeline stage (Megatron groups must exist).

    Without ``layer_spec`` the core attention follows the config (dense or dilated,
    through ``pool`` when given): :func:`.specs.layer_spec_for`. A RoPE model gets
    :func:`.rope.install_rope`: its forward's ``position_ids`` are its RoPE positions.
    """
    lm = run_config.model.language_model
    pp = (config.pipeline_model_parallel_size if config is not None
          else config_overrides.get("pipeline_model_parallel_size", run_config.pipeline_model_parallel_size))
    check_runnable_here(run_config, pipeline_model_parallel_size=pp)
    config = config or transformer_config_for(run_config, **config_overrides)
    if layer_spec is None:
        layer_spec = layer_spec_for(run_config, pool)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=lm.vocab_size,
        max_sequence_length=lm.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=not lm.untie_embeddings_and_output_weights,
        position_embedding_type=lm.position_embedding_type,
        rotary_base=lm.rotary_base,
    )
    install_rope(model)  # RoPE at the forward's position_ids, on any device
    return model
