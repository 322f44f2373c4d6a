"""An expert rank lost during inference: agree on who was lost, then go on without it or fail naming it.

What a lost rank looks like (CPU, gloo, measured): every collective of a dispatch group
touches every pair of its members (even a zero-row split exchanges an empty message), so
once a member is killed every other member's current or next all-to-all fails within
milliseconds ("Connection reset by peer" / "Connection closed by peer", naming an address,
never a rank), and the members can be at different operations when it happens (one has
finished a call another is still in). Nobody can tell *who* died from the error.

:class:`LossAgreement` finds out over the rendezvous store: every member that saw the
failure checks in; the stage's leader (its first attention rank) waits until every
member has either checked in or has a heartbeat that has not moved for ``stale_s``
(:meth:`~megatron_fapool.parallel.liveness.LivenessMonitor.silent_s`: dead, not slow),
and publishes the lost ranks; everyone reads the same answer. A few seconds after a
kill (``stale_s`` plus the heartbeat interval), not the liveness timeout.

:func:`survivor_geometry` then decides: with ``on_expert_loss: "degrade"`` and one expert
rank lost, the survivors' dispatch geometry and its group (made at start-up by
:func:`~megatron_fapool.parallel.groups.create_survivor_groups`); otherwise a
:class:`~megatron_fapool.parallel.service.PeerLost` naming the lost rank and its experts.
:func:`serve_degradable` is the expert ranks' loop around it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta

from ..parallel.service import PeerLost
from .wire import DispatchGeometry

__all__ = ["LossAgreement", "serve_degradable", "survivor_geometry"]

_NONE = "none"
_ERROR = "error:"


class LossAgreement:
    """Which members of a dispatch group were lost: the same answer on every member, over the store.

    ``members``: the group's global ranks; ``leader``: the member that decides (alive by
    assumption: the stage's first attention rank); ``silent_s(rank)``: seconds since that
    rank's heartbeat moved. Each loss is one *epoch*: every surviving member calls
    :meth:`agree` once for it.
    """

    def __init__(self, *, rank: int, members, leader: int, store, silent_s: Callable[[int], float],
                 stale_s: float = 3.0, timeout_s: float = 60.0, prefix: str = "fapool/ma/loss"):
        self.rank = rank
        self.members = tuple(members)
        self.leader = leader
        self.store = store
        self.silent_s = silent_s
        self.stale_s = stale_s
        self.timeout_s = timeout_s
        self.prefix = f"{prefix}/{leader}"
        self.epoch = 0

    def _key(self, *parts) -> str:
        return "/".join((self.prefix, str(self.epoch)) + tuple(str(p) for p in parts))

    def agree(self) -> tuple[int, ...]:
        """Check in for the current loss; returns the lost ranks (ascending) as the leader decided them."""
        self.store.set(self._key("in", self.rank), "1")
        if self.rank == self.leader:
            self.store.set(self._key("lost"), self._decide())
        try:
            self.store.wait([self._key("lost")], timedelta(seconds=self.timeout_s))
        except Exception as e:  # noqa: BLE001 - the store's timeout error type differs between versions
            raise PeerLost(f"rank {self.rank}: no word from rank {self.leader} on which rank was lost within"
                           f" {self.timeout_s:.0f}s ({str(e).splitlines()[0]})") from e
        value = self.store.get(self._key("lost")).decode()
        self.store.set(self._key("read", self.rank), "1")
        lost = () if value == _NONE or value.startswith(_ERROR) else tuple(int(r) for r in value.split(","))
        if self.rank == self.leader:  # the store may live in this process: leave only once all have read it
            self._wait_read([r for r in self.members if r not in lost and r != self.rank])
        self.epoch += 1
        if value.startswith(_ERROR):
            raise PeerLost(value[len(_ERROR):].strip())
        return lost

    def _wait_read(self, ranks) -> None:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if all(self.store.check([self._key("read", r)]) for r in ranks):
                return
            time.sleep(0.02)

    def _decide(self) -> str:
        deadline = time.monotonic() + self.timeout_s
        others = [r for r in self.members if r != self.rank]
        while True:
            missing = [r for r in others if not self.store.check([self._key("in", r)])]
            dead = [r for r in missing if self.silent_s(r) >= self.stale_s]
            if len(dead) == len(missing):
                return ",".join(map(str, dead)) if dead else _NONE
            if time.monotonic() > deadline:
                alive = [r for r in missing if r not in dead]
                return (f"{_ERROR} rank {self.rank}: a collective of ranks {list(self.members)} failed; rank(s)"
                        f" {alive} neither answered nor went silent within {self.timeout_s:.0f}s")
            time.sleep(0.05)


def survivor_geometry(geometry: DispatchGeometry, lost: tuple[int, ...], survivors: dict, *, mode: str,
                      describe: Callable[[int], str], what: str) -> tuple[DispatchGeometry, object]:
    """The geometry and group to go on with after ``lost`` (:meth:`LossAgreement.agree`), or a
    :class:`PeerLost` naming the lost ranks. ``survivors``: lost expert rank -> survivor group."""
    if not lost:
        raise PeerLost(f"{what}: a collective failed but every rank of {list(geometry.members)} answered")
    names = ", ".join(describe(r) for r in lost)
    if mode != "degrade":
        raise PeerLost(f"{what}: lost {names}; fapool.ma_separation.on_expert_loss is 'fail' ('degrade' masks a lost"
                       " expert rank's experts from routing and goes on)")
    if len(lost) > 1 or lost[0] not in geometry.expert_ranks:
        raise PeerLost(f"{what}: lost {names}: degraded inference survives the loss of one expert rank, not of"
                       " an attention rank or of several")
    if geometry.slots is not None or lost[0] not in survivors:
        raise PeerLost(f"{what}: lost {names} after an earlier expert rank: no survivor group for a second loss")
    if geometry.num_expert_ranks == 1:
        raise PeerLost(f"{what}: lost {names}, the only expert rank of its stage: no experts left")
    return geometry.without(lost[0]), survivors[lost[0]]


def serve_degradable(server, agreement: LossAgreement | None, survivors: dict, *, mode: str,
                     describe: Callable[[int], str], on_switch=None):
    """An expert rank's serving loop that survives the loss of another expert rank (``mode`` "degrade").

    On a lost contact it agrees with the others on the lost rank and, when survivable,
    switches to the survivor group and serves on; ``on_switch(lost_rank)`` is told. Without
    ``agreement`` a lost contact fails as :meth:`ExpertServer.serve` does. Returns the stats.
    """
    while True:
        try:
            return server.serve()
        except PeerLost as e:
            if agreement is None:
                raise
            lost = agreement.agree()
            try:
                geometry, group = survivor_geometry(server.geometry, lost, survivors, mode=mode, describe=describe,
                                                    what=f"expert rank {server.rank}")
            except PeerLost as named:
                raise named from e
            server.switch(geometry, group)
            if on_switch is not None:
                on_switch(lost[0])
