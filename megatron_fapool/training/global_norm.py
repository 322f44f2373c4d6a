"""One gradient norm over two DeepSpeed engines: attention ranks' and expert ranks'.

With MA separation a step updates two disjoint sets of parameters, owned by two kinds
of engine (base ranks: the model without its experts; expert ranks: the experts). The
norm that gradient clipping divides by must be that of *all* of them,
``sqrt(|g_attention|^2 + sum_stages |g_experts|^2)``, and both engines must clip with it;
each engine alone knows only its own part (already reduced over its data- and
model-parallel groups, so every rank of a role holds the same value).

:func:`install_global_grad_norm` replaces the one place where each engine computes its
norm, on the engine instance (DeepSpeed's code is not changed):

* ZeRO 1 and 2 (fp32 or bf16): ``engine.optimizer.scaled_global_norm`` — its result is
  what ``step()`` clips by and what ``engine.get_global_grad_norm()`` reports;
* ZeRO 0 in fp32: ``engine.clip_fp32_gradients`` (called before the optimizer step when
  ``gradient_clipping > 0``), replaced by the same computation DeepSpeed does
  (``runtime.utils.clip_grad_norm_``: per-parameter norms, model-parallel parameters
  counted on every model-parallel rank, the rest once) with the combined norm; it
  records the norm so ``get_global_grad_norm()`` reports it.

(bf16 without ZeRO uses DeepSpeed's ``BF16_Optimizer``, whose norm is a module-level
function: refused with MA separation by ``arguments.check_run``.)

The combination is one all-reduce of ``[norm^2, invalid]`` (float64) over ``group`` —
all attention and expert ranks of the job — to which exactly one rank per engine kind
and stage contributes (``contributes``): every rank calls it at the same point of the
same step, the attention ranks from their engine's boundary ``step()``, the expert
ranks from the ``STEP`` operation (``training/experts.py``). A non-finite part (DeepSpeed
marks it -1) makes the combined norm -1 as well, so both engines skip the step alike.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..parallel.service import named_failure

__all__ = ["combine_norms", "install_global_grad_norm"]


def combine_norms(local: torch.Tensor | float, *, group, contributes: bool) -> torch.Tensor:
    """``sqrt(sum of the contributors' local^2)`` over ``group``; -1 if any contributor's is not finite."""
    t = local if torch.is_tensor(local) else torch.tensor(float(local))
    value = float(t)
    vec = torch.zeros(2, dtype=torch.float64, device=t.device)
    if contributes:
        if value < 0 or not math.isfinite(value):
            vec[1] = 1.0
        else:
            vec[0] = value * value
    peers = [r for r in dist.get_process_group_ranks(group) if r != dist.get_rank()]
    named_failure("the gradient norm over attention and expert ranks", peers, dist.all_reduce, vec, group=group)
    total = -1.0 if float(vec[1]) > 0 else math.sqrt(float(vec[0]))
    return torch.tensor(total, dtype=torch.float32, device=t.device)


def install_global_grad_norm(engine, *, group, contributes: bool) -> None:
    """Make ``engine`` clip by (and report) the norm combined over ``group`` (see the module doc)."""
    opt = engine.optimizer
    if engine.zero_optimization():
        if not hasattr(opt, "scaled_global_norm"):
            raise RuntimeError(f"{type(opt).__name__} has no scaled_global_norm: ZeRO stage"
                               f" {engine.zero_optimization_stage()} is not supported with MA separation")
        own = opt.scaled_global_norm

        def scaled_global_norm(norm_type=2):
            local = own(norm_type)
            # ``local`` carries the loss scale (1 in fp32 / bf16); so does the combined value
            return combine_norms(local, group=group, contributes=contributes).to(local.device)

        opt.scaled_global_norm = scaled_global_norm
        return
    if engine.bfloat16_enabled() or engine.fp16_enabled():
        raise RuntimeError("one gradient norm over attention and expert ranks needs ZeRO stage 1 or 2 with bf16/fp16")

    def clip_fp32_gradients():
        from deepspeed.runtime.utils import is_model_parallel_parameter

        mpu = engine.mpu
        mp_rank = mpu.get_model_parallel_rank() if mpu is not None else 0
        params = [p for p in engine.module.parameters() if p.grad is not None]
        sq = torch.zeros((), dtype=torch.float32, device=engine.device)
        for p in params:
            if mp_rank == 0 or is_model_parallel_parameter(p):
                sq = sq + p.grad.detach().float().norm(2).to(sq.device) ** 2
        if mpu is not None:
            dist.all_reduce(sq, group=mpu.get_model_parallel_group())
        local = sq.sqrt()
        total = combine_norms(local, group=group, contributes=contributes)
        engine._global_grad_norm = float(total)
        max_norm = engine.gradient_clipping()
        coef = max_norm / (float(total) + 1e-6)
        if float(total) >= 0 and coef < 1:
            for p in params:
                p.grad.detach().mul_(coef)

    engine.clip_fp32_gradients = clip_fp32_gradients
