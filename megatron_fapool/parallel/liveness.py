"""Liveness: a lost rank makes every rank exit non-zero quickly, naming the lost rank.

A collective with a dead peer can block for the whole process-group timeout (NCCL)
or fail with a message that names no rank (gloo). Each rank runs a daemon thread
that bumps a heartbeat counter in the rendezvous store every ``interval`` seconds and
watches everyone else's; a counter that has not moved for ``timeout`` seconds (on
this rank's own monotonic clock, so no clock skew) means that rank is lost: the
thread prints which rank (and its role) and ends the process with exit code 1.
A rank that finishes normally marks itself done and is never reported.

Degraded inference (MA separation, ``on_expert_loss: degrade``) survives the loss of an
expert rank: :meth:`LivenessMonitor.tolerate` names ranks whose loss is only reported,
and :meth:`LivenessMonitor.silent_s` tells how long a rank's heartbeat has not moved
(the recovery uses it to tell a dead rank from a slow one). The job hands the monitor
to its work as ``groups.liveness`` (``runtime/job.py``).
"""

from __future__ import annotations

import os
import sys
import threading
import time

import torch.distributed as dist

__all__ = ["LivenessMonitor"]

_DONE = b"done"
EXIT_CODE = 17


class LivenessMonitor:
    def __init__(self, *, rank: int, world_size: int, describe_rank=None, interval: float = 1.0,
                 timeout: float = 20.0, store=None, prefix: str = "fapool/heartbeat"):
        self.rank = rank
        self.world = world_size
        self.describe_rank = describe_rank or (lambda r: f"rank {r}")
        self.interval = interval
        self.timeout = timeout
        self.store = store if store is not None else dist.distributed_c10d._get_default_store()
        self.prefix = prefix
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.tolerated: dict[int, str] = {}  # rank -> why its loss does not end this process
        self.lost: set[int] = set()  # tolerated ranks found lost (reported once each)
        self._last_change: dict[int, float] = {}  # rank -> monotonic time its heartbeat last moved

    def tolerate(self, ranks, why: str) -> None:
        """From now on, the loss of any of ``ranks`` is reported (once) but does not end this process."""
        for r in ranks:
            self.tolerated[int(r)] = why

    def silent_s(self, rank: int) -> float:
        """Seconds since ``rank``'s heartbeat last moved, as this monitor last looked (0: not watched yet,
        itself, or finished normally)."""
        t = self._last_change.get(rank)
        return 0.0 if t is None else max(0.0, time.monotonic() - t)

    def _key(self, r: int) -> str:
        return f"{self.prefix}/{r}"

    def start(self) -> "LivenessMonitor":
        self.store.set(self._key(self.rank), "0")
        self._thread = threading.Thread(target=self._run, name="fapool-liveness", daemon=True)
        self._thread.start()
        return self

    def stop(self, *, done: bool = True) -> None:
        """Mark this rank as finished normally and stop watching (``done=False``: stop watching only, as a
        rank that is failing on its own does, so that it reports nothing else on its way out)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if not done:
            return
        try:
            self.store.set(self._key(self.rank), _DONE)
        except Exception:  # noqa: BLE001 - the store may already be gone at shutdown
            pass

    def _fail(self, message: str) -> None:
        print(f"fapool: error: [rank {self.rank}] {message}; exiting", file=sys.stderr, flush=True)
        os._exit(EXIT_CODE)

    def _run(self) -> None:
        beat = 0
        others = [r for r in range(self.world) if r != self.rank]
        keys = [self._key(r) for r in others]
        last_value: dict[int, bytes] = {}
        last_change = self._last_change
        last_change.update({r: time.monotonic() for r in others})
        while not self._stop.wait(self.interval):
            beat += 1
            try:
                self.store.set(self._key(self.rank), str(beat))
                values = self.store.multi_get(keys) if keys else []
            except Exception as e:  # noqa: BLE001
                if self._stop.is_set():
                    return
                self._fail(f"lost the rendezvous store (its host, usually rank 0 or the launcher, is gone): {e}")
            now = time.monotonic()
            stale = []
            for r, v in zip(others, values):
                if v == _DONE:
                    last_change[r] = now
                    continue
                if last_value.get(r) != v:
                    last_value[r] = v
                    last_change[r] = now
                elif now - last_change[r] > self.timeout:
                    stale.append((now - last_change[r], r))
            for age, r in [x for x in stale if x[1] in self.tolerated]:
                stale.remove((age, r))
                if r not in self.lost:
                    self.lost.add(r)
                    print(f"fapool: warning: [rank {self.rank}] lost {self.describe_rank(r)} (silent {age:.0f}s);"
                          f" going on: {self.tolerated[r]}", file=sys.stderr, flush=True)
            if stale and not self._stop.is_set():
                stale.sort(reverse=True)  # the one silent longest went first
                names = ", ".join(f"{self.describe_rank(r)} (silent {age:.0f}s)" for age, r in stale)
                self._fail(f"lost {names}")
