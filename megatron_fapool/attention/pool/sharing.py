"""One attention pool shared by every base rank, step by step: who serves whom, agreed by all.

A shared pool's ranks belong to no base rank (``attention_pool.sharing: "shared"``,
:mod:`megatron_fapool.parallel.roles`). At the start of each training step every base rank
puts its *demand* (the length of its step's longest micro-batch) and every pool rank a 0 into
one all-gather over the coordination group; then every rank runs the same
:meth:`~.shared.SharedPoolManager.assign_step` on the same list (a pure function of it and of
the steps before), so all of them know the step's assignment without another message:

* a base rank given a block of pool ranks sends the step's pooled calls of its long
  micro-batches to that block (the pooled algorithms run unchanged over the attention group
  ``(base,) + block``, created at start-up) and ends the block's service with ``SHUTDOWN``
  after its last backward;
* a pool rank in a block serves that base rank until then (:meth:`PoolServer.serve_for`), a
  pool rank in none goes straight to the next step's all-gather;
* a base rank's demand :data:`DONE` at the end of the job releases every pool rank.

The manager sees each base rank as a demand of its replica (``replica`` = data-parallel index,
``key`` = the rank's place in its replica's TP x PP grid), so sharing is fair between replicas;
its blocks are aligned power-of-two blocks of the pool, which bounds the communicators
(``num_base * (2 * pool_size - 1)`` attention groups) and keeps a smaller active count a group
too (a block's first half is a block).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .manager import threshold_and_cost
from .shared import PoolDemand, SharedPoolManager

__all__ = ["DONE", "StepShare", "agree_step", "shared_manager"]

#: A base rank's demand that ends the job (every pool rank leaves its loop).
DONE = -1


def shared_manager(pool_cfg, layout) -> SharedPoolManager:
    """The manager every rank of a shared-pool job builds from the same config (hence the same decisions)."""
    threshold, cost = threshold_and_cost(pool_cfg)
    return SharedPoolManager(layout.pool_size, threshold=threshold, max_per_demand=pool_cfg.max_active,
                             hysteresis=pool_cfg.hysteresis, cost_model=cost, aligned=True)


def agree_step(groups, manager: SharedPoolManager, demand: int, device):
    """This step's ``(demands, blocks)``: every base rank's demand and ``{base rank: global pool ranks}`` (base
    ranks without a block left out), agreed by one all-gather of every rank's ``demand`` (pool ranks give 0);
    ``None`` once a base rank says :data:`DONE`."""
    layout = groups.layout
    mine = torch.tensor([demand], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(groups.coordination))]
    dist.all_gather(every, mine, group=groups.coordination)
    values = torch.cat(every).tolist()[: layout.num_base]
    if DONE in values:
        return None
    demands = []
    for rank, tokens in enumerate(values):
        tp, dp, pp = layout.base_coords(rank)
        demands.append(PoolDemand(replica=dp, key=tp + layout.tp * pp, tokens=tokens))
    blocks = manager.assign_step(demands)
    out = {}
    for rank, d in enumerate(demands):
        block = blocks.get((d.replica, d.key), ())
        if block:
            out[rank] = tuple(layout.num_base + i for i in block)
    return dict(enumerate(values)), out


class StepShare:
    """A base rank's view of the shared pool for one step, in the resource manager's place in the model.

    The layer's core attention asks :meth:`decide` per micro-batch, as it asks a dedicated pool's
    :class:`~.manager.PoolResourceManager`: the step's block for a sequence over the threshold,
    else 0. :meth:`begin_step` / :meth:`end_step` frame a training step.
    """

    def __init__(self, groups, client, manager: SharedPoolManager, stats, device):
        self.groups, self.client, self.shared, self.stats, self.device = groups, client, manager, stats, device
        self.threshold = manager.threshold
        self.block: tuple[int, ...] = ()
        self.demands: dict[int, int] = {}  # this step's demand of every base rank
        self.assignment: dict[int, tuple[int, ...]] = {}  # and its blocks
        self.current = 0  # pool ranks of the micro-batch in progress (the loop's counter reads it)

    def begin_step(self, demand: int) -> dict[int, tuple[int, ...]]:
        """Agree on this step's blocks with every rank (``demand``: this rank's longest micro-batch)."""
        before = self.block
        self.demands, self.assignment = agree_step(self.groups, self.shared, demand, self.device)
        self.block = self.assignment.get(self.groups.rank, ())
        if self.block and not before:
            self.stats.activations += 1
        elif before and not self.block:
            self.stats.releases += 1
        elif before != self.block:
            self.stats.resizes += 1
        self.client.use(self.block)
        return self.assignment

    def end_step(self) -> None:
        """The step's last pooled call is done: release the block's ranks."""
        if self.block:
            self.client.shutdown(self.device)

    def finish(self) -> None:
        """The job is over: every pool rank leaves its loop."""
        agree_step(self.groups, self.shared, DONE, self.device)

    # -- the resource manager's interface to the layers --
    def new_step(self) -> None:
        """A micro-batch starts (the step's block stays)."""
        self.current = 0

    def decide(self, n: int) -> int:
        self.current = len(self.block) if n > self.threshold else 0
        return self.current

    def state_dict(self) -> dict:
        return {}  # the manager restarts on resume, identically on every rank

    def load_state_dict(self, state: dict) -> None:
        pass
