"""MoE router losses under DeepSpeed: their gradient scale, and their values for the log.

**Scale.** Megatron's router adds the load-balancing (aux) and z losses to the graph
with ``MoEAuxLossAutoScaler``, whose backward injects ``main_loss_backward_scale`` as
their gradient, independent of the main loss's. DeepSpeed divides the main loss by the
gradient accumulation steps inside ``engine.backward``; the router losses must be
scaled alike, or they weigh ``gas`` times too much (Megatron's own schedule sets
``loss_scale / num_microbatches``). :func:`set_aux_loss_scale` sets ``1 / gas`` before
each backward (DeepSpeed's data-parallel averaging then treats both alike).

**Values.** The router records each layer's losses (unscaled by their coefficient) in
Megatron's tracker (``get_moe_layer_wise_logging_tracker``), summed over the
iteration's micro-batches. :func:`collect_aux_losses` reduces them as Megatron's
``track_moe_metrics`` does — summed over the group the loss was computed on (TP x CP for
the load-balancing loss), averaged over data-parallel replicas, times ``1 / gas``,
averaged over the MoE layers — and clears the tracker. (Megatron logs the z loss of
the reporting replica only; here it is averaged over replicas as well, so the number
does not depend on which rank prints. Gloo has no AVG reduction: sum, then divide.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["collect_aux_losses", "set_aux_loss_scale"]


def set_aux_loss_scale(scale: float, device) -> None:
    """The gradient scale of the router's aux and z losses for the next backward."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(float(scale), device=device))


def collect_aux_losses(*, num_moe_layers: int, gas: int, dp_group) -> dict[str, float]:
    """This iteration's router losses per name (``load_balancing_loss``, ``z_loss``), then clears them.

    Collective over the trackers' reduce groups and ``dp_group``: every base rank calls it.
    """
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

    tracker = get_moe_layer_wise_logging_tracker()
    out = {}
    dp = dist.get_world_size(dp_group) if dp_group is not None else 1
    for name in sorted(tracker):
        entry = tracker[name]
        values = entry["values"].detach().clone().float()
        group = entry.get("reduce_group")
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(values, group=group)
        if dp > 1 and not entry.get("reduce_group_has_dp", False):
            dist.all_reduce(values, group=dp_group)
            values /= dp
        avg = entry.get("avg_group")
        if avg is not None and dist.get_world_size(avg) > 1:
            dist.all_reduce(values, group=avg)
            values /= dist.get_world_size(avg)
        out[name] = float(values.double().sum() / gas / max(num_moe_layers, 1))
    clear_aux_losses_tracker()
    return out
