"""Megatron's ``TopKRouter`` with a gating that runs anywhere, and an expert mask.

Megatron-Core 0.16.1's ``Router.gating`` moves its weight to ``torch.cuda.current_device()``
when it is on the CPU, and ``router_gating_linear`` names ``te_general_gemm``, which is
undefined without Transformer Engine (a ``NameError`` on the CPU and on a GPU image
without TE). :class:`FapoolTopKRouter` overrides only :meth:`~FapoolTopKRouter.gating`:
the logits are the same linear map, in ``moe_router_dtype``, on the weight's device, with
the autograd of Megatron's ``RouterGatingLinearFunction`` (its non-TE branch, op for op,
so the result is bitwise Megatron's). Everything after the logits (z-loss, top-k, capacity,
aux losses attached through ``MoEAuxLossAutoScaler``, their logging) is Megatron's
``TopKRouter.routing``, unchanged.

The expert mask (degraded inference, an expert rank lost): :meth:`~FapoolTopKRouter.mask_experts`
sets the logits of those global expert ids to ``-inf`` before Megatron's routing, so the
top-k is taken over the surviving experts (their softmax renormalises over survivors,
masked experts get probability 0). :attr:`~FapoolTopKRouter.rerouted_tokens` counts the
tokens whose unmasked top-k (Megatron's own selection on the unmasked logits) contained a
masked expert. With no expert masked the path is exactly Megatron's.
"""

from __future__ import annotations

from typing import Iterable

import torch
from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function
from megatron.core.transformer.moe.router import TopKRouter

from .pingpong import current_part

__all__ = ["FapoolTopKRouter", "router_dtype_of"]

_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


def router_dtype_of(config, input_dtype: torch.dtype) -> torch.dtype:
    """The dtype Megatron computes router logits in: ``moe_router_dtype``, else the input's."""
    return _DTYPES.get(config.moe_router_dtype, input_dtype)


class _GatingLinear(torch.autograd.Function):
    """Megatron's ``RouterGatingLinearFunction`` without Transformer Engine (moe_utils.py:1160):
    the GEMMs in ``router_dtype``; the saved tensors stay in their own dtypes."""

    @staticmethod
    def forward(ctx, inp, weight, bias, router_dtype):
        ctx.save_for_backward(inp, weight, bias)
        ctx.router_dtype = router_dtype
        ctx.input_dtype = inp.dtype
        ctx.weight_dtype = weight.dtype
        shape = inp.shape
        inp = inp.view(-1, shape[-1])
        if bias is None:
            out = torch.mm(inp.to(router_dtype), weight.to(router_dtype).t())
        else:
            out = torch.addmm(bias.to(router_dtype), inp.to(router_dtype), weight.to(router_dtype).t())
        return out.view(*shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_output):
        inp, weight, bias = ctx.saved_tensors
        shape = inp.shape
        inp = inp.view(-1, shape[-1])
        grad_output = grad_output.view(-1, grad_output.shape[-1])
        grad_input = torch.mm(grad_output, weight.to(ctx.router_dtype)).to(ctx.input_dtype)
        grad_weight = torch.mm(grad_output.t(), inp.to(ctx.router_dtype)).to(ctx.weight_dtype)
        grad_bias = grad_output.sum(dim=0).to(ctx.weight_dtype) if bias is not None else None
        return grad_input.view(*shape), grad_weight, grad_bias, None


class FapoolTopKRouter(TopKRouter):
    """``TopKRouter`` whose gating runs on the weight's device without TE, plus an expert mask.

    Constructed by Megatron's ``MoELayer`` as ``submodules.router(config=..., pg_collection=...)``.
    """

    def __init__(self, config, pg_collection=None) -> None:
        super().__init__(config=config, pg_collection=pg_collection)
        self._masked: tuple[int, ...] = ()
        self.rerouted_tokens = 0

    # --- gating ------------------------------------------------------------------------
    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """Router logits ``[s, b, num_experts]`` in ``moe_router_dtype``, masked experts at ``-inf``."""
        logits = _GatingLinear.apply(input, self.weight, self.bias, router_dtype_of(self.config, input.dtype))
        if self._masked:
            logits = self._apply_mask(logits)
        return logits

    # --- expert mask -------------------------------------------------------------------
    @property
    def masked_experts(self) -> tuple[int, ...]:
        """Global ids of the masked experts, ascending."""
        return self._masked

    def mask_experts(self, global_ids: Iterable[int]) -> None:
        """Route no token to ``global_ids`` from now on (added to those already masked).

        Raises ``ValueError`` for an id outside ``[0, num_experts)`` or when fewer than
        ``moe_router_topk`` experts would survive.
        """
        ids = {int(i) for i in global_ids}
        bad = sorted(i for i in ids if not 0 <= i < self.num_experts)
        if bad:
            raise ValueError(f"expert ids {bad} are outside 0..{self.num_experts - 1}")
        masked = tuple(sorted(ids | set(self._masked)))
        if self.num_experts - len(masked) < self.topk:
            raise ValueError(
                f"masking experts {list(masked)} leaves {self.num_experts - len(masked)} of {self.num_experts}:"
                f" top-{self.topk} routing needs at least {self.topk}"
            )
        self._masked = masked

    def unmask_all(self) -> None:
        """Route over every expert again (Megatron's routing exactly)."""
        self._masked = ()

    def _apply_mask(self, logits: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(self.num_experts, dtype=torch.bool, device=logits.device)
        mask[list(self._masked)] = True
        with torch.no_grad():
            flat = logits.detach().reshape(-1, self.num_experts)
            _, chosen = self._topk_map(flat)
            self.rerouted_tokens += int(chosen[:, mask].any(dim=1).sum())
        return logits.masked_fill(mask, float("-inf"))

    def _topk_map(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Megatron's top-k selection of ``logits`` ``[tokens, experts]`` (no replay, no capacity)."""
        cfg = self.config
        return topk_routing_with_score_function(
            logits, self.topk, use_pre_softmax=cfg.moe_router_pre_softmax, num_groups=cfg.moe_router_num_groups,
            group_topk=cfg.moe_router_group_topk, scaling_factor=cfg.moe_router_topk_scaling_factor,
            score_function=self.score_function, expert_bias=self.expert_bias, fused=cfg.moe_router_fusion,
            router_replay=None,
        )

    # --- ping-pong: the losses of the whole micro-batch --------------------------------
    def routing(self, logits: torch.Tensor, padding_mask=None):
        """Megatron's routing; in a ping-pong part (:mod:`.pingpong`), its losses over the whole micro-batch.

        Megatron's load-balancing and z losses are statistics of the whole micro-batch. Each
        part but the last is routed by Megatron's top-k alone (per token: the same choice)
        and leaves its logits; the last part routes the logits of every part at once with
        Megatron's ``routing`` (z-loss, top-k, aux losses attached, logged once) and keeps its
        own rows. The losses' gradients reach every part's logits through the concatenation.
        """
        part = current_part()
        if part is None or part.turns.parts == 1 or not (self.training and torch.is_grad_enabled()):
            return super().routing(logits, padding_mask)
        if padding_mask is not None:
            raise NotImplementedError("ping-pong parts with a padding mask")
        stash = part.turns.shared.setdefault(("router", id(self)), [None] * part.turns.parts)
        stash[part.index] = logits
        if part.index < part.turns.parts - 1:
            return self._topk_map(logits.reshape(-1, self.num_experts))
        del part.turns.shared[("router", id(self))]
        part.turns.wait_for_other_streams(part.index)
        first = sum(x.shape[1] for x in stash[:-1])  # parts are cut along the batch: [s, b_p, experts]
        probs, routing_map = super().routing(torch.cat(stash, dim=1))
        s, b = logits.shape[0], first + logits.shape[1]
        mine = lambda t: t.view(s, b, -1)[:, first:].reshape(-1, t.shape[-1])  # noqa: E731
        return mine(probs), mine(routing_map)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, topk={self.topk}, masked={list(self._masked)}"
