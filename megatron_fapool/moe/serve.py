"""MA separation, expert side: Megatron's own expert MLPs in a serving loop.

An expert rank holds :class:`ExpertStack`: one Megatron ``SequentialMLP`` per MoE layer
of its stage, on its ``k`` experts (global ids ``[j*k, (j+1)*k)``). It holds no
embedding, attention, norm or router. :class:`ExpertServer` is its loop over the
serving transport (:mod:`megatron_fapool.parallel.service`): one header all-to-all per
operation from every attention rank of the stage (:mod:`.wire`), then

* ``MOE_FORWARD``: receive each attention rank's rows and probabilities, merge them per
  local expert with Megatron's ``sort_chunks_by_idxs`` (Megatron's "permutation 2"), run
  the layer's ``SequentialMLP``, restore the order, send the outputs back; keep the graph
  when the call will have a backward;
* ``MOE_BACKWARD``: receive the output gradients, run the saved graph's backward (the
  expert weights accumulate their gradients, summed over attention ranks), send back
  the input and probability gradients.

Extra operations (training's optimizer step and checkpoint) come as extra handler tables.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_utils import sort_chunks_by_idxs

from ..parallel.service import DTYPES, Header, ServiceMember, TransferStats, merge_handlers
from .wire import MOE_BACKWARD, MOE_FORWARD, DispatchGeometry, agreed_header, all_to_all, exchange_headers

__all__ = ["ExpertServer", "ExpertStack", "ExpertStats", "HANDLERS", "megatron_expert_name"]


def megatron_expert_name(layer: int, expert: int, rest: str) -> str:
    """The name of a colocated Megatron ``GPTModel``'s expert parameter (``rest``: e.g. ``linear_fc1.weight``)."""
    return f"decoder.layers.{layer}.mlp.experts.local_experts.{expert}.{rest}"


class ExpertStack(torch.nn.Module):
    """The expert weights of one expert rank: ``layers[L]`` is MoE layer ``L``'s ``SequentialMLP``.

    ``config``: a TransformerConfig at TP 1 and expert parallelism 1 (the expert
    parallelism is ours, not Megatron's, so DeepSpeed sees ordinary parameters);
    ``self_group``: a process group of this rank alone (Megatron's expert TP / EP / DP).
    """

    def __init__(self, config, *, num_layers: int, first_expert: int, num_local_experts: int, self_group):
        super().__init__()
        pgs = ProcessGroupCollection(ep=self_group, expt_tp=self_group, expt_dp=self_group, tp=self_group)
        spec = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
        self.first_expert = first_expert
        self.num_local_experts = num_local_experts
        self.layers = torch.nn.ModuleList(
            SequentialMLP(num_local_experts, config, spec, pg_collection=pgs) for _ in range(num_layers)
        )

    @classmethod
    def for_rank(cls, groups, config, *, num_layers: int, num_experts: int) -> "ExpertStack":
        """The stack of expert rank ``groups.rank``: its stage's ``num_layers`` MoE layers, its experts."""
        geom = DispatchGeometry.of_stage(groups.layout, groups.role.pp, num_experts)
        ids = geom.expert_ids(groups.role.expert_index)
        return cls(config, num_layers=num_layers, first_expert=ids.start, num_local_experts=len(ids),
                   self_group=groups.expert_self)

    @property
    def global_ids(self) -> range:
        return range(self.first_expert, self.first_expert + self.num_local_experts)

    def megatron_names(self) -> dict[str, str]:
        """This stack's parameter names -> the colocated Megatron model's names (global expert ids)."""
        out = {}
        for name, _ in self.named_parameters():
            _, layer, _, local, rest = name.split(".", 4)  # layers.L.local_experts.e.<rest>
            out[name] = megatron_expert_name(int(layer), self.first_expert + int(local), rest)
        return out

    def load_from_megatron(self, state: dict) -> None:
        """Copy this rank's experts out of a colocated Megatron state dict (``named_parameters`` names)."""
        names = self.megatron_names()
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(state[names[name]])


@dataclass
class ExpertStats(TransferStats):
    """An expert rank's counters: calls, and rows per (layer, local expert) forward and backward."""

    num_layers: int = 0
    num_local_experts: int = 0
    forward_calls: int = 0
    backward_calls: int = 0
    tokens_forward: torch.Tensor = field(default=None)
    tokens_backward: torch.Tensor = field(default=None)
    recent_forward: deque = field(default_factory=lambda: deque(maxlen=256))  # (layer, ping-pong part) served

    def __post_init__(self):
        shape = (self.num_layers, self.num_local_experts)
        self.tokens_forward = torch.zeros(shape, dtype=torch.int64)
        self.tokens_backward = torch.zeros(shape, dtype=torch.int64)


@dataclass
class _Saved:
    x: torch.Tensor  # received rows (leaf)
    probs: torch.Tensor  # received probabilities (leaf)
    y: torch.Tensor  # outputs in the received order
    counts: torch.Tensor  # [A, k]


def _merge_orders(num_attention: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk orders: received (attention rank, expert) -> (expert, attention rank), and back."""
    to_expert_major = torch.tensor([a * k + e for e in range(k) for a in range(num_attention)])
    back = torch.tensor([e * num_attention + a for a in range(num_attention) for e in range(k)])
    return to_expert_major, back


def serve_forward(server: "ExpertServer", h: Header) -> None:
    g, counts = server.geometry, server.counts
    rows = counts.sum(1).tolist()
    mlp = server.layer(h)
    dtype, dev = DTYPES[h.dtype], server.device
    x = torch.empty(sum(rows), server.hidden, dtype=dtype, device=dev)
    none = g.from_attention([0] * g.num_attention)
    server.move(x, x.new_empty(0, server.hidden), g.from_attention(rows), none, "receive tokens")
    probs = torch.empty(sum(rows), dtype=torch.float32, device=dev)
    server.move(probs, probs.new_empty(0), g.from_attention(rows), none, "receive probabilities")
    to_expert_major, back = server.orders
    with torch.set_grad_enabled(bool(h.save)):
        if h.save:
            x.requires_grad_()
            probs.requires_grad_()
        xs, ps = sort_chunks_by_idxs(x, counts.reshape(-1), to_expert_major, probs=probs)
        ys, _ = mlp(xs, counts.sum(0), ps)
        y, _ = sort_chunks_by_idxs(ys, counts.t().reshape(-1), back)
        y = y.to(dtype)
    server.move(y.new_empty(0, server.hidden), y.detach(), none, g.from_attention(rows), "send outputs")
    if h.save:
        server.saved[h.call_id] = _Saved(x, probs, y, counts)
    server.stats.forward_calls += 1
    server.stats.tokens_forward[h.layer] += counts.sum(0)
    server.stats.recent_forward.append((h.layer, h.batch))


def serve_backward(server: "ExpertServer", h: Header) -> None:
    g = server.geometry
    s = server.take_saved(h.call_id, _Saved, "an expert backward")
    rows = s.counts.sum(1).tolist()
    none = g.from_attention([0] * g.num_attention)
    grad = torch.empty(sum(rows), server.hidden, dtype=DTYPES[h.dtype], device=server.device)
    server.move(grad, grad.new_empty(0, server.hidden), g.from_attention(rows), none, "receive output gradients")
    if s.y.requires_grad:
        server.backward(s.y, grad)
    dx = s.x.grad if s.x.grad is not None else torch.zeros_like(s.x)
    dp = s.probs.grad if s.probs.grad is not None else torch.zeros_like(s.probs)
    server.move(dx.new_empty(0, server.hidden), dx, none, g.from_attention(rows), "send input gradients")
    server.move(dp.new_empty(0), dp.float(), none, g.from_attention(rows), "send probability gradients")
    server.stats.backward_calls += 1
    server.stats.tokens_backward[h.layer] += s.counts.sum(0)


HANDLERS = {MOE_FORWARD: serve_forward, MOE_BACKWARD: serve_backward}


def _autograd_backward(y: torch.Tensor, grad: torch.Tensor) -> None:
    torch.autograd.backward(y, grad)


class ExpertServer(ServiceMember):
    """An expert rank's loop: serves every MoE layer of its stage for all attention ranks until SHUTDOWN.

    ``handlers``: extra op tables (training's step / save); ``backward(y, grad)``: how the
    saved graph of one call is differentiated (default ``torch.autograd.backward``).
    """

    def __init__(self, groups, stack: ExpertStack, *, device, num_experts: int, handlers=(), backward=None,
                 stats: ExpertStats | None = None):
        if not groups.is_expert:
            raise ValueError(f"rank {groups.rank} is not an expert rank")
        geom = DispatchGeometry.of_stage(groups.layout, groups.role.pp, num_experts)
        j = groups.role.expert_index
        if tuple(stack.global_ids) != tuple(geom.expert_ids(j)):
            raise ValueError(f"expert rank {groups.rank} owns experts {list(geom.expert_ids(j))},"
                             f" its stack holds {list(stack.global_ids)}")
        super().__init__(
            rank=groups.rank, leader=geom.attention_ranks[0], member=geom.num_attention + j,
            control_group=groups.dispatch, group_of=lambda members: groups.dispatch, device=device,
            stats=stats or ExpertStats(num_layers=len(stack.layers), num_local_experts=stack.num_local_experts),
            handlers=merge_handlers(HANDLERS, *handlers),
        )
        self.leaders = geom.attention_ranks
        self.geometry = geom
        self.stack = stack
        self.hidden = stack.layers[0].config.hidden_size if len(stack.layers) else 0
        self.orders = _merge_orders(geom.num_attention, geom.experts_per_rank)
        self.backward = backward or _autograd_backward
        self.counts = None  # [A, k] rows of the current operation

    def switch(self, geometry: DispatchGeometry, group) -> None:
        """Go on serving over ``group`` with ``geometry`` (a survivor geometry after another expert rank
        was lost, :meth:`DispatchGeometry.without`); this rank keeps its experts. Saved calls are dropped."""
        j = geometry.expert_ranks.index(self.rank)
        if tuple(self.stack.global_ids) != tuple(geometry.expert_ids(j)):
            raise ValueError(f"expert rank {self.rank} holds experts {list(self.stack.global_ids)}, the survivor"
                             f" geometry gives it {list(geometry.expert_ids(j))}")
        self.geometry = geometry
        self.control_group = group
        self.group_of = lambda members: group
        self.member = geometry.num_attention + j
        self.saved.clear()

    def recv_header(self) -> Header:
        received = exchange_headers(self.geometry, self.control_group, self.device, header=None, stats=self.stats,
                                    what=f"expert rank {self.rank} <- attention ranks")
        header, self.counts = agreed_header(self.geometry, received, rank=self.rank)
        return header

    def layer(self, h: Header):
        if not 0 <= h.layer < len(self.stack.layers):
            raise RuntimeError(f"expert rank {self.rank}: MoE layer {h.layer} asked for, it holds"
                               f" {len(self.stack.layers)}")
        return self.stack.layers[h.layer]

    def move(self, out, inp, out_rows, in_rows, what: str):
        return all_to_all(out, inp, out_rows, in_rows, self.control_group, what=f"expert rank {self.rank}: {what}",
                          peers=self.geometry.others(self.rank), stats=self.stats)
