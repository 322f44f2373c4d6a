"""Build Megatron's ``GPTModel`` on a base rank from the resolved config.

An MoE model (``num_moe_experts``) is Megatron's MoE GPT (``MoELayer`` in every layer,
:mod:`.specs`), colocated: every base rank holds all experts (expert parallel size 1).
At TP > 1 it runs sequence parallel (Megatron's ``MoELayer`` trains only so): every TP
rank routes and computes the experts of its ``s / TP`` tokens, so the gradients of the
parameters those tokens share (norms, router, and the experts, which are whole on every
TP rank) are this rank's share; :func:`finalize_tensor_parallel_grads` sums them over
TP, as Megatron's ``finalize_model_grads`` does.

megatron-core 0.16.1's sequence parallelism needs CUDA (its collectives allocate on
``torch.cuda.current_device()``, ``tensor_parallel/mappings.py``): on a machine without
it :func:`check_runnable_here` refuses an MoE model at TP > 1 unless it runs without
sequence parallelism (inference, ``sequence_parallel=False``). Tests run it on the CPU
inside ``testing.megatron_reference.cpu_reference_shims``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import transformer_block
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import BaseTransformerLayer

from ..attention.core_attention import FapoolCoreAttention, Pooled
from ..config import ConfigError, RunConfig, to_transformer_config
from ..moe.remote import bind_remote_experts
from .rope import install_rope
from .specs import FapoolNorm, layer_spec_for

__all__ = [
    "build_gpt_model", "check_runnable_here", "expert_transformer_config", "finalize_tensor_parallel_grads",
    "moe_layers", "tensor_parallel_partial_params", "transformer_config_for",
]


def transformer_config_for(run_config: RunConfig, **overrides):
    kwargs = dict(
        tensor_model_parallel_size=run_config.tensor_model_parallel_size,
        pipeline_model_parallel_size=run_config.pipeline_model_parallel_size,
        params_dtype=run_config.params_dtype,
    )
    kwargs.update(overrides)
    return to_transformer_config(run_config.model.language_model, **kwargs)


def expert_transformer_config(run_config: RunConfig, **overrides):
    """The ``TransformerConfig`` an expert rank builds Megatron's ``SequentialMLP`` from (MA separation):
    the model's dtype and MoE keys at TP 1, PP 1, EP 1, expert TP 1, no sequence parallelism."""
    kwargs = dict(
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, expert_model_parallel_size=1,
        expert_tensor_parallel_size=1, sequence_parallel=False,
    )
    kwargs.update(overrides)
    lm = run_config.model.language_model
    if not lm.num_moe_experts:
        raise ConfigError("language_model.num_moe_experts", "not set: a dense model has no experts",
                          source=run_config.model_yaml_path)
    return transformer_config_for(run_config, **kwargs)


def check_runnable_here(
    run_config: RunConfig, *, pipeline_model_parallel_size: int | None = None, seq_length: int | None = None,
    sequence_parallel: bool | None = None,
) -> None:
    """What this package cannot build or run, and what megatron-core 0.16 can only run with CUDA on a
    CPU-only machine, refused before start-up (the launchers' preflight).

    ``seq_length``: the training length, when known; ``sequence_parallel``: whether the run is
    sequence parallel (default: as :func:`transformer_config_for` builds it, i.e. an MoE model at
    TP > 1; inference may build it with ``sequence_parallel=False``)."""
    _check_buildable(run_config, pipeline_model_parallel_size)
    lm = run_config.model.language_model
    tp = run_config.tensor_model_parallel_size
    if sequence_parallel is None:
        sequence_parallel = bool(lm.num_moe_experts) and tp > 1
    if sequence_parallel and seq_length and seq_length % tp:
        raise ConfigError(
            "--seq-length",
            f"{seq_length} is not divisible by tensor_model_parallel_size={tp}: an MoE model at TP > 1 runs"
            " sequence parallel (Megatron's MoELayer trains only so), which splits the sequence over TP",
        )
    if sequence_parallel and not torch.cuda.is_available():
        raise ConfigError(
            "tensor_model_parallel_size",
            f"{tp} with an MoE model needs a GPU: Megatron's MoELayer trains at TP > 1 only sequence parallel,"
            " whose collectives megatron-core 0.16.1 allocates on CUDA; use TP 1 on CPU",
            source=run_config.json_path,
        )


def _check_buildable(run_config: RunConfig, pipeline_model_parallel_size: int | None) -> None:
    if torch.cuda.is_available():
        return
    lm = run_config.model.language_model
    pp = pipeline_model_parallel_size or run_config.pipeline_model_parallel_size
    if pp > 1 and not lm.untie_embeddings_and_output_weights:
        raise ConfigError(
            "language_model.untie_embeddings_and_output_weights",
            "tied input/output embeddings across pipeline stages need a GPU with megatron-core 0.16"
            " (it copies them with .cuda()); set it to true on CPU",
            source=run_config.model_yaml_path,
        )


def moe_layers(model: torch.nn.Module) -> list[MoELayer]:
    """The model's Megatron ``MoELayer`` modules, in layer order."""
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def pooled_attention_layers(model: torch.nn.Module) -> int:
    """How many of the model's core attentions go through the attention pool above its threshold: the pooled
    calls of one micro-batch's forward (one announced pass, :meth:`~megatron_fapool.attention.pool.AttentionPool.forward_pass`)."""
    return sum(isinstance(m, FapoolCoreAttention) and isinstance(m.attend, Pooled) for m in model.modules())


def build_gpt_model(
    run_config: RunConfig, *, layer_spec=None, config=None, pool=None, experts=None, **config_overrides
) -> GPTModel:
    """``GPTModel`` for this base rank's pipeline stage (Megatron groups must exist).

    Without ``layer_spec`` the core attention follows the config (dense or dilated,
    through ``pool`` when given) and an MoE model gets Megatron's MoE layers, with
    ``experts`` (a ``ModuleSpec``) in place of ``SequentialMLP`` when given:
    :func:`.specs.layer_spec_for`. A RoPE model gets :func:`.rope.install_rope`: its
    forward's ``position_ids`` are its RoPE positions. An MoE config whose model came out
    without MoE layers (a dense ``layer_spec``) is refused, never built silently dense.
    """
    lm = run_config.model.language_model
    pp = (config.pipeline_model_parallel_size if config is not None
          else config_overrides.get("pipeline_model_parallel_size", run_config.pipeline_model_parallel_size))
    _check_buildable(run_config, pp)
    config = config or transformer_config_for(run_config, **config_overrides)
    if layer_spec is None:
        layer_spec = layer_spec_for(run_config, pool, experts=experts)
    elif experts is not None:
        raise ValueError("give experts= or layer_spec=, not both (layer_spec_for(..., experts=...) combines them)")
    if (config.sequence_parallel and transformer_block.LayerNormImpl is WrappedTorchNorm
            and isinstance(layer_spec, ModuleSpec) and issubclass(layer_spec.module, BaseTransformerLayer)):
        # the block's final norm, which Megatron builds as WrappedTorchNorm without Apex/TE
        layer_spec = TransformerBlockSubmodules(
            layer_specs=[layer_spec] * get_num_layers_to_build(config), layer_norm=FapoolNorm
        )
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
    layers = moe_layers(model)
    if bool(layers) != bool(lm.num_moe_experts):
        raise ValueError(
            f"the model YAML has num_moe_experts={lm.num_moe_experts} but the layer spec built"
            f" {len(layers)} MoE layers: build MoE models from layer_spec_for(run_config, ...)"
        )
    if config.sequence_parallel and config.tensor_model_parallel_size > 1:
        for layer in layers:  # whole experts on every TP rank, each computing its own tokens
            for p in layer.experts.parameters():
                p.sequence_parallel = True
    bind_remote_experts(model)  # MA separation: ping-pong parts share each layer's token dispatcher
    install_rope(model)  # RoPE at the forward's position_ids, on any device
    return model


def tensor_parallel_partial_params(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """Parameters whose gradient on a TP rank is only that rank's share, to be summed over TP:
    the sequence-parallel ones (norms, router, row-parallel biases; MoE experts under sequence
    parallelism) and the q/k layernorms (shared by the heads the TP ranks split), as in
    Megatron's ``finalize_model_grads`` (``_allreduce_non_tensor_model_parallel_grads``)."""
    config = getattr(model, "config", None)
    sp = bool(getattr(config, "sequence_parallel", False))
    qk = bool(getattr(config, "qk_layernorm", False))
    return [
        (name, p) for name, p in model.named_parameters()
        if p.requires_grad and ((sp and getattr(p, "sequence_parallel", False))
                                or (qk and ("q_layernorm" in name or "k_layernorm" in name)))
    ]


def finalize_tensor_parallel_grads(model: torch.nn.Module, tp_group=None) -> int:
    """Sum the :func:`tensor_parallel_partial_params` gradients over TP (one all-reduce) after a
    backward; returns how many tensors were reduced. A no-op at TP 1."""
    group = tp_group if tp_group is not None else parallel_state.get_tensor_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return 0
    grads = [p.grad for _, p in tensor_parallel_partial_params(model) if p.grad is not None]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for dtype in sorted(by_dtype, key=str):  # the same order on every TP rank
        same = by_dtype[dtype]
        flat = torch.cat([g.reshape(-1) for g in same])
        dist.all_reduce(flat, group=group)
        offset = 0
        for g in same:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
    return len(grads)
