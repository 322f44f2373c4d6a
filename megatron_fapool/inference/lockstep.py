"""MA separation inference: the attention replicas call the expert ranks in lockstep.

With MA separation every attention rank of a stage sends each MoE call to the same
expert ranks, which serve one call of all of them at a time (the headers must agree).
Attention replicas serve their own requests, so they run different numbers of forwards;
:class:`Lockstep` keeps them in step (``generate(..., lockstep=...)``):

* before each step, a one-integer all-reduce (MAX) over the attention ranks says whether
  any replica still has work; a replica with none runs an *idle step* (every MoE layer
  called with zero rows, without running the model: :meth:`ExpertClient.idle_step`);
* after each step, a second one says whether the step failed anywhere (an expert rank
  was lost). Then every attention rank agrees with the surviving expert ranks on who was
  lost (:class:`~megatron_fapool.moe.fault.LossAgreement`) and, with
  ``on_expert_loss: "degrade"``, masks the lost rank's experts in every router (top-k
  over the survivors), switches the client to the survivor group made at start-up and
  resumes at one call id; the step is undone and redone. Without the option the lost rank
  is named in the error.

The expert ranks stay in their serving loop (:func:`~megatron_fapool.moe.fault.serve_degradable`)
until :meth:`Lockstep.shutdown`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..moe.fault import survivor_geometry
from ..parallel.service import PeerLost

__all__ = ["Lockstep"]


class Lockstep:
    """The attention ranks' side of MA inference: lockstep, idle steps, and an expert rank's loss.

    ``client``: this rank's :class:`~megatron_fapool.moe.remote.ExpertClient`; ``group``: every
    attention rank of the job; ``routers``: the model's MoE routers (``FapoolTopKRouter``);
    ``agreement``/``survivors``/``mode``/``describe``: see :mod:`megatron_fapool.moe.fault`
    (without ``agreement`` a lost contact is raised as it is). ``dtype``/``hidden``: the rows of
    an idle step. ``log(message)``: where recoveries are reported.
    """

    def __init__(self, client, *, group, device, dtype, hidden: int, routers=(), agreement=None, survivors=None,
                 mode: str = "fail", describe=None, log=None):
        self.client = client
        self.group = group
        self.device = device
        self.dtype = dtype
        self.hidden = hidden
        self.routers = list(routers)
        self.agreement = agreement
        self.survivors = survivors or {}
        self.mode = mode
        self.describe = describe or (lambda r: f"rank {r}")
        self.log = log or (lambda message: None)
        self.steps = 0  # steps this replica took part in (its own, idle, redone)
        self.idle_steps = 0
        self.redone_steps = 0
        self.lost: list[int] = []  # expert ranks lost and survived, in order
        self.parts = 1  # ping-pong parts of the current step (any_work agrees on them)

    def _max(self, values) -> list[int]:
        t = torch.tensor(values, dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t.tolist()

    def any_work(self, has_work: bool, rows: int = 1, parts: int = 1) -> bool:
        """Whether any attention replica has a step to run (collective over the attention ranks).

        Also agrees on :attr:`parts`, the ping-pong parts of this step: at most ``parts``
        (the configured split) and at most the ``rows`` (requests) of the smallest step any
        replica runs, so that every replica calls the expert ranks the same number of times.
        """
        more, neg_rows = self._max([int(has_work), -(rows if has_work else parts)])
        self.parts = max(1, min(parts, -neg_rows))
        if more:
            self.steps += 1
        return bool(more)

    def idle(self) -> None:
        """This replica's part of a step it has no work for."""
        self.client.idle_step(self.device, self.dtype, self.hidden, parts=self.parts)
        self.idle_steps += 1

    def failed(self, error: PeerLost | None) -> bool:
        """Whether the step failed on any attention rank (collective). If so, the loss is recovered
        from (or raised, naming the lost rank) before this returns True: redo the step."""
        failed, next_id = self._max([int(error is not None), self.client.next_call_id])
        if not failed:
            return False
        self._recover(error)
        self.client.resume_at(next_id)
        self.redone_steps += 1
        return True

    def _recover(self, error: PeerLost | None) -> None:
        rank = self.client.rank
        if self.agreement is None:
            raise error or PeerLost(f"attention rank {rank}: another attention rank lost contact with an expert rank")
        lost = self.agreement.agree()
        geometry = self.client.geometry
        try:
            survivor, group = survivor_geometry(geometry, lost, self.survivors, mode=self.mode,
                                                describe=self.describe, what=f"attention rank {rank}")
        except PeerLost as named:
            raise named from error
        ids = geometry.expert_ids(geometry.expert_ranks.index(lost[0]))
        for router in self.routers:
            router.mask_experts(ids)
        self.client.switch(survivor, group)
        self.lost.append(lost[0])
        self.log(f"lost {self.describe(lost[0])}: its experts {ids.start}-{ids.stop - 1} are masked from routing"
                 f" (top-k over the {survivor.num_experts} surviving experts); redoing the step")

    def shutdown(self) -> None:
        """End the expert ranks' loops (collective over the attention ranks; survives a loss as a step does)."""
        while True:
            error = None
            try:
                self.client.shutdown(self.device)
            except PeerLost as e:
                error = e
            if not self.failed(error):
                return

    @property
    def rerouted_tokens(self) -> int:
        """Tokens (per MoE layer, summed) whose top-k over all experts held a masked one, on this rank."""
        return sum(int(r.rerouted_tokens) for r in self.routers)
