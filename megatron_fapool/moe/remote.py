"""MA separation, attention side: Megatron's ``MoELayer`` with its experts on other ranks.

On an attention rank the MoE layer is Megatron's own: ``TopKRouter`` (aux and z losses
attached by ``MoEAuxLossAutoScaler``), the allgather token dispatcher at expert
parallelism 1 (Megatron's ``permute`` / ``unpermute``, no communication). Only its
``experts`` submodule is :class:`RemoteExperts`, which holds no parameters: it receives
exactly what Megatron hands ``SequentialMLP`` (rows sorted by global expert id, so the
rows of expert rank ``j`` are one contiguous slice; ``tokens_per_expert`` on the host;
the routing probabilities) and ships them to the expert ranks.

Backward brings back the input gradient *and* the gradient of the routing
probabilities: the aux-loss gradient enters the router through the probabilities
(``MoEAuxLossAutoScaler.backward``); without it it would silently vanish.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.transformer.module import MegatronModule

from ..parallel.service import DTYPES, SHUTDOWN, Header, ServiceClient, TransferStats
from .pingpong import current_part
from .wire import MOE_BACKWARD, MOE_FORWARD, DispatchGeometry, all_to_all, exchange_headers

__all__ = ["ClientStats", "ExpertClient", "RemoteExperts", "bind_remote_experts"]


@dataclass
class ClientStats(TransferStats):
    """An attention rank's MA counters."""

    forward_calls: int = 0
    backward_calls: int = 0
    rows_sent: int = 0  # token rows sent to expert ranks in forward (top-k copies counted)
    idle_calls: int = 0  # forward calls of no rows (lockstep: this replica had no work, the others had)


class ExpertClient(ServiceClient):
    """An attention rank's end of its stage's dispatch group, shared by the stage's MoE layers.

    Layers register in construction order (:meth:`register`): their index is the
    layer id the expert ranks serve. Every attention rank of the stage must call the
    same layers in the same order (the expert ranks check it).
    """

    def __init__(self, groups, *, num_experts: int, stats: ClientStats | None = None):
        if not groups.is_base:
            raise ValueError(f"rank {groups.rank} is not an attention (base) rank")
        if groups.dispatch is None:
            raise ValueError("no dispatch group: MA separation is not enabled in this layout")
        self.geometry = DispatchGeometry.of_stage(groups.layout, groups.role.pp, num_experts)
        super().__init__(rank=groups.rank, peers=self.geometry.expert_ranks, control_group=groups.dispatch,
                         stats=stats or ClientStats())
        self.layers = 0
        self.total_experts = num_experts  # every expert of the stage (tokens_per_expert's length), lost or not

    def register(self) -> int:
        """A new MoE layer's id (0, 1, ... in construction order)."""
        self.layers += 1
        return self.layers - 1

    def send_header(self, device, *, counts=None, async_op: bool = False, **fields):
        """The header all-to-all of one operation (``counts``: rows per global expert); with
        ``async_op`` its ``(received, work, sent)``."""
        if counts is None:
            counts = torch.zeros(self.geometry.num_experts, dtype=torch.int64)
        else:  # those of the member expert ranks (all of them, unless one was lost: switch)
            counts = self.geometry.expert_counts(counts).reshape(-1)
        return exchange_headers(self.geometry, self.control_group, device,
                                header=Header(drop_before=self._drop_before(), **fields), counts=counts,
                                stats=self.stats, what=f"attention rank {self.rank} -> expert ranks",
                                async_op=async_op)

    def _rows_per_rank(self, tokens_per_expert: torch.Tensor) -> list[int]:
        return self.geometry.expert_counts(tokens_per_expert).sum(1).tolist()

    def _move(self, out, inp, out_rows, in_rows, what: str, async_op: bool = False):
        g = self.geometry
        return all_to_all(out, inp, out_rows, in_rows, self.control_group, what=f"attention rank {self.rank}: {what}",
                          peers=g.others(self.rank), stats=self.stats, async_op=async_op)

    def forward(self, layer: int, x: torch.Tensor, probs: torch.Tensor, tokens_per_expert: torch.Tensor, *,
                save: bool, micro: int = 0, pause=None) -> tuple[torch.Tensor, int]:
        """Expert outputs of the permuted rows ``x`` (``[T, h]``) and their ``probs`` (``[T]``); and the call id.

        ``pause(wait)``: issue every transfer asynchronously and let ``pause`` run ``wait``
        (ping-pong: another part computes meanwhile); without it, each transfer completes in turn.
        """
        g = self.geometry
        call_id = self.open_call(save)
        rows = self._rows_per_rank(tokens_per_expert)
        asyn = pause is not None
        header = self.send_header(x.device, op=MOE_FORWARD, call_id=call_id, layer=layer, batch=micro,
                                  dtype=DTYPES.index(x.dtype), save=int(save), counts=tokens_per_expert,
                                  async_op=asyn)
        out_none = g.to_experts([0] * g.num_expert_ranks)
        sent_probs = probs.float().contiguous()
        y = x.new_empty(x.shape)
        works = [
            self._move(x.new_empty(0, x.shape[1]), x, out_none, g.to_experts(rows), "dispatch tokens", asyn),
            self._move(probs.new_empty(0), sent_probs, out_none, g.to_experts(rows), "dispatch probabilities", asyn),
            self._move(y, x.new_empty(0, x.shape[1]), g.to_experts(rows), out_none, "combine outputs", asyn),
        ]
        if asyn:
            keep = (header, x, sent_probs)  # alive until every transfer is done

            def wait():
                for w in (header[1], *works):
                    w.wait()
                return keep

            pause(wait)
        self.stats.forward_calls += 1
        self.stats.rows_sent += x.shape[0]
        return y, call_id

    def backward(self, layer: int, call_id: int, grad_y: torch.Tensor, tokens_per_expert: torch.Tensor, *,
                 micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(d x, d probs) of a saved forward call, from its output gradient."""
        g = self.geometry
        rows = self._rows_per_rank(tokens_per_expert)
        self.send_header(grad_y.device, op=MOE_BACKWARD, call_id=call_id, layer=layer, batch=micro,
                         dtype=DTYPES.index(grad_y.dtype), save=0, counts=tokens_per_expert)
        none = g.to_experts([0] * g.num_expert_ranks)
        self._move(grad_y.new_empty(0, grad_y.shape[1]), grad_y, none, g.to_experts(rows), "send output gradients")
        dx = grad_y.new_empty(grad_y.shape)
        self._move(dx, grad_y.new_empty(0, grad_y.shape[1]), g.to_experts(rows), none, "input gradients")
        dprobs = torch.empty(grad_y.shape[0], dtype=torch.float32, device=grad_y.device)
        self._move(dprobs, dprobs.new_empty(0), g.to_experts(rows), none, "probability gradients")
        self.close_call(call_id)
        self.stats.backward_calls += 1
        return dx, dprobs

    def shutdown(self, device) -> None:
        """End the expert ranks' loops (every attention rank of the stage sends it)."""
        self.send_header(device, op=SHUTDOWN)

    def idle_step(self, device, dtype: torch.dtype, hidden: int, parts: int = 1) -> None:
        """One forward call of no rows for every registered layer, in order, without running a model.

        Inference with several attention replicas: every attention rank of a stage must
        call the MoE layers in lockstep, so a replica with no work left runs these while
        the others run a real step; with ``parts`` ping-pong parts, in their turn order
        (layer 0 of every part, then layer 1, ...).
        """
        x = torch.empty(0, hidden, dtype=dtype, device=device)
        probs = torch.empty(0, dtype=torch.float32, device=device)
        none = torch.zeros(self.total_experts, dtype=torch.int64)
        for layer in range(self.layers):
            for part in range(parts):
                self.forward(layer, x, probs, none, save=False, micro=part)
                self.stats.idle_calls += 1

    @property
    def next_call_id(self) -> int:
        return self._next_id

    def resume_at(self, call_id: int) -> None:
        """Number the next call ``call_id`` (after a failed step, every attention rank of the stage resumes
        at the same id: the largest any of them reached)."""
        if self._live:
            raise RuntimeError(f"attention rank {self.rank}: calls {sorted(self._live)} still hold expert state")
        self._next_id = int(call_id)

    def switch(self, geometry: DispatchGeometry, group) -> None:
        """Go on over ``group`` with ``geometry`` (a survivor geometry after an expert rank was lost,
        :meth:`DispatchGeometry.without`); the routers must mask the lost rank's experts."""
        self.geometry = geometry
        self.control_group = group
        self.peers = geometry.expert_ranks


def _pause_of_part(dispatcher):
    """In a ping-pong part: ``(part index, pause)``, giving the turn away while transfers run; else ``(0, None)``.

    Megatron's token dispatcher keeps the state of the call in flight on itself (the
    permutation that ``combine_preprocess`` undoes), and the other parts use the same
    dispatcher meanwhile: its state is put back when the turn returns.
    """
    part = current_part()
    if part is None:
        return 0, None
    if dispatcher is None:
        raise RuntimeError("ping-pong needs RemoteExperts bound to its MoELayer's token dispatcher"
                           " (build the model with models.gpt.build_gpt_model)")

    def pause(wait):
        state = dict(vars(dispatcher))
        part.turns.pause_while(part.index, wait)
        vars(dispatcher).update(state)

    return part.index, pause


class _RemoteExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, probs, client: ExpertClient, layer: int, tokens_per_expert, dispatcher):
        micro, pause = _pause_of_part(dispatcher)
        y, call_id = client.forward(layer, x, probs, tokens_per_expert, save=True, micro=micro, pause=pause)
        ctx.client, ctx.layer, ctx.call_id, ctx.micro = client, layer, call_id, micro
        ctx.tokens_per_expert = tokens_per_expert
        ctx.probs_dtype = probs.dtype
        client.close_when_dropped(ctx, call_id)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        dx, dprobs = ctx.client.backward(ctx.layer, ctx.call_id, grad_y.contiguous(), ctx.tokens_per_expert,
                                         micro=ctx.micro)
        return dx, dprobs.to(ctx.probs_dtype), None, None, None, None


class RemoteExperts(MegatronModule):
    """The ``experts`` submodule of Megatron's ``MoELayer`` on an attention rank: no parameters.

    Built by Megatron's ``build_module(submodules.experts, num_local_experts, config,
    pg_collection=...)``; ``client`` comes from the spec's params. Attention ranks run at
    expert parallelism 1, so ``num_local_experts`` is every expert of the layer.
    """

    def __init__(self, num_local_experts: int, config, pg_collection=None, *, client: ExpertClient):
        super().__init__(config=config)
        if num_local_experts != client.geometry.num_experts:
            raise ValueError(
                f"RemoteExperts sees {num_local_experts} local experts but the expert ranks own"
                f" {client.geometry.num_experts}: attention ranks must run at expert_model_parallel_size 1"
            )
        self.client = client
        self.layer = client.register()
        self.dispatcher = None  # the owning MoELayer's token dispatcher (bind_remote_experts), for ping-pong

    def forward(self, permuted_hidden: torch.Tensor, tokens_per_expert: torch.Tensor, permuted_probs: torch.Tensor):
        tokens_per_expert = tokens_per_expert.cpu()
        if torch.is_grad_enabled() and (permuted_hidden.requires_grad or permuted_probs.requires_grad):
            y = _RemoteExpertsFunction.apply(permuted_hidden, permuted_probs, self.client, self.layer,
                                             tokens_per_expert, self.dispatcher)
        else:
            micro, pause = _pause_of_part(self.dispatcher)
            y, _ = self.client.forward(self.layer, permuted_hidden, permuted_probs, tokens_per_expert, save=False,
                                       micro=micro, pause=pause)
        return y, None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        return {}  # the expert weights live on the expert ranks


def bind_remote_experts(model: torch.nn.Module) -> int:
    """Give every :class:`RemoteExperts` of ``model`` its ``MoELayer``'s token dispatcher; returns how many."""
    n = 0
    for module in model.modules():
        experts = getattr(module, "experts", None)
        if isinstance(experts, RemoteExperts) and getattr(module, "token_dispatcher", None) is not None:
            experts.dispatcher = module.token_dispatcher
            n += 1
    return n
