"""Single-process Megatron reference models on CPU, and TP-aware weight/grad helpers.

The reference is Megatron's own ``GPTModel`` with Megatron's own local layer spec
(``DotProductAttention``). A RoPE model gets the RoPE module that ``build_gpt_model``
installs (:func:`~megatron_fapool.models.rope.install_rope`, itself checked against
Megatron's ``RotaryEmbedding`` in ``tests/models/test_rope.py``). ``DotProductAttention``
allocates its score buffer from Megatron's global memory buffer on
``torch.cuda.current_device()`` and forks the CUDA RNG tracker around dropout;
:func:`cpu_reference_shims` points both at the CPU for the duration of a test (the
computation itself is Megatron's, unchanged).

An MoE model's reference is Megatron's own MoE local spec (``MoELayer`` with Megatron's
``TopKRouter``, allgather dispatcher, ``SequentialMLP``). Its router moves its weight to
``torch.cuda.current_device()`` and calls ``te_general_gemm``, a name undefined without
Transformer Engine; for the reference only, the shims answer ``"cpu"`` for the current
device and define the name as ``None`` (Megatron's own non-TE GEMM branch then runs).
(The product's router, ``moe.FapoolTopKRouter``, needs neither.) The CPU current device
also lets Megatron's sequence-parallel collectives (``tensor_parallel/mappings.py``, which
allocate on it) run a TP > 1 MoE model on the CPU in tests.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from ..models.gpt import transformer_config_for
from ..models.rope import install_rope

from .compare import rel_err

__all__ = [
    "cpu_reference_shims", "errors_against", "full_from_shard", "load_sharded", "megatron_reference_spec",
    "reference_gpt_model",
]


class _CPUMemoryBuffer:
    def get_tensor(self, shape, dtype, name, mem_alloc_context=None):
        return torch.empty(shape, dtype=dtype)


class _NoForkTracker:
    @contextlib.contextmanager
    def fork(self, name=None):
        yield


@contextlib.contextmanager
def cpu_reference_shims():
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer.moe import moe_utils

    saved = (parallel_state._GLOBAL_MEMORY_BUFFER, tp_random._CUDA_RNG_STATE_TRACKER,
             tp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED)
    parallel_state._GLOBAL_MEMORY_BUFFER = _CPUMemoryBuffer()
    tp_random._CUDA_RNG_STATE_TRACKER = _NoForkTracker()
    tp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    define_gemm = not hasattr(moe_utils, "te_general_gemm")
    if define_gemm:
        moe_utils.te_general_gemm = None  # Megatron's router GEMM without TE: its torch.mm branch
    current_device = torch.cuda.current_device
    torch.cuda.current_device = lambda: "cpu"  # Router.gating moves its weight there, SP collectives allocate there
    try:
        yield
    finally:
        (parallel_state._GLOBAL_MEMORY_BUFFER, tp_random._CUDA_RNG_STATE_TRACKER,
         tp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED) = saved
        if define_gemm:
            del moe_utils.te_general_gemm
        torch.cuda.current_device = current_device


def megatron_reference_spec(normalization: str = "RMSNorm", num_experts: int | None = None):
    """Megatron's own local GPT layer spec (nothing of ours); with ``num_experts`` its MoE one."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return get_gpt_layer_local_spec(num_experts=num_experts, normalization=normalization)


def reference_gpt_model(run_config, *, seed: int = 7):
    """Megatron's ``GPTModel`` of ``run_config`` at TP 1 with Megatron's local spec (its MoE local
    spec for an MoE model), in this single process.

    Initialises Megatron's groups for a world of one; run it inside :func:`cpu_reference_shims`.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    lm = run_config.model.language_model
    parallel_state.initialize_model_parallel(1, 1, create_gloo_process_groups=False)
    torch.manual_seed(seed)
    model = GPTModel(
        transformer_config_for(run_config, tensor_model_parallel_size=1),
        megatron_reference_spec(num_experts=lm.num_moe_experts),
        vocab_size=lm.vocab_size, max_sequence_length=lm.max_position_embeddings,
        position_embedding_type=lm.position_embedding_type, rotary_base=lm.rotary_base,
        share_embeddings_and_output_weights=not lm.untie_embeddings_and_output_weights,
    )
    install_rope(model)
    return model


def _partition(param) -> tuple[bool, int]:
    return bool(getattr(param, "tensor_model_parallel", False)), getattr(param, "partition_dim", -1)


def load_sharded(model: torch.nn.Module, full_state: dict, tp_rank: int, tp_size: int) -> None:
    """Copy a TP=1 state dict into a TP-sharded model (slices along each parameter's partition dim).

    A parameter already of its full shape is copied whole: MoE experts are whole on every TP rank
    (expert TP 1) although Megatron marks their linears tensor-parallel."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            full = full_state[name]
            sharded, dim = _partition(p)
            if sharded and tp_size > 1 and full.shape != p.shape:
                full = full.chunk(tp_size, dim=dim)[tp_rank]
            if full.shape != p.shape:
                raise ValueError(f"{name}: reference shape {tuple(full.shape)} vs model {tuple(p.shape)}")
            p.copy_(full)


def full_from_shard(param: torch.nn.Parameter, tensor: torch.Tensor, tp_group, full_shape=None) -> torch.Tensor:
    """Gather a TP-sharded tensor (e.g. a gradient) of ``param`` back to its full shape
    (``full_shape``, when given: a tensor already of that shape, an MoE expert's, is whole)."""
    sharded, dim = _partition(param)
    size = dist.get_world_size(tp_group) if tp_group is not None else 1
    if not sharded or size == 1 or (full_shape is not None and tuple(tensor.shape) == tuple(full_shape)):
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor.contiguous(), group=tp_group)
    return torch.cat(parts, dim=dim)


def errors_against(model, logits: torch.Tensor, loss: torch.Tensor, ref: dict, tp_group) -> dict:
    """This TP rank's logits (gathered over TP), loss and every gradient against a single-process
    reference ``{"logits", "loss", "grads": {name: full gradient}}``: relative errors
    (:func:`~megatron_fapool.testing.compare.rel_err`), the worst gradient and its name."""
    size = dist.get_world_size(tp_group) if tp_group is not None else 1
    parts = [torch.empty_like(logits) for _ in range(size)]
    dist.all_gather(parts, logits.contiguous(), group=tp_group)
    err = {
        "logits": rel_err(torch.cat(parts, dim=-1), ref["logits"]),
        "loss": abs(loss.item() - ref["loss"].item()) / abs(ref["loss"].item()),
        "grads": 0.0,
        "worst_grad": None,
    }
    for name, p in model.named_parameters():
        e = rel_err(full_from_shard(p, p.grad, tp_group, ref["grads"][name].shape), ref["grads"][name])
        if e > err["grads"]:
            err["grads"], err["worst_grad"] = e, name
    return err
