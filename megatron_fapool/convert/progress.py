"""Progress lines of a conversion: one per phase with bytes and rate, a summary with peak memory."""

from __future__ import annotations

import resource
import sys
import time

__all__ = ["Progress", "fmt_bytes", "peak_rss_bytes"]


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM), children that have exited included."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) * 1024  # Linux: KiB


def fmt_bytes(n: float) -> str:
    """``1.87 GB``, ``491.20 kB``, ``12 B``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


class Progress:
    """``with progress.phase("reading iter_0000010"): ... progress.add(nbytes)`` prints
    ``[2/5] reading iter_0000010 ... 1.90 GB in 3.1 s (610 MB/s)``; :meth:`summary` the totals
    and the peak resident memory. ``quiet`` prints nothing (the numbers are still kept)."""

    def __init__(self, total_phases: int | None = None, *, stream=None, quiet: bool = False):
        self.total = total_phases
        self.stream = stream or sys.stdout
        self.quiet = quiet
        self.done = 0
        self.bytes_total = 0
        self.tensors_total = 0
        self._bytes = 0
        self.t_start = time.perf_counter()

    def say(self, text: str) -> None:
        if not self.quiet:
            print(text, file=self.stream, flush=True)

    def add(self, nbytes: int, tensors: int = 1) -> None:
        self._bytes += int(nbytes)
        self.bytes_total += int(nbytes)
        self.tensors_total += tensors

    class _Phase:
        def __init__(self, owner: "Progress", name: str):
            self.owner, self.name = owner, name

        def __enter__(self):
            o = self.owner
            o.done += 1
            o._bytes = 0
            self.t0 = time.perf_counter()
            o.say(f"[{o.done}/{o.total or '?'}] {self.name} ...")
            return self

        def __exit__(self, exc_type, exc, tb):
            if exc_type is not None:
                return False
            o, dt = self.owner, time.perf_counter() - self.t0
            rate = f" ({fmt_bytes(o._bytes / dt)}/s)" if o._bytes and dt > 0 else ""
            amount = f"{fmt_bytes(o._bytes)} in " if o._bytes else ""
            o.say(f"[{o.done}/{o.total or '?'}] {self.name}: {amount}{dt:.1f} s{rate}")
            return False

    def phase(self, name: str) -> "Progress._Phase":
        return Progress._Phase(self, name)

    def summary(self) -> str:
        dt = time.perf_counter() - self.t_start
        line = (f"done in {dt:.1f} s: {self.tensors_total} tensors, {fmt_bytes(self.bytes_total)};"
                f" peak memory {fmt_bytes(peak_rss_bytes())} (resident, this process and its workers)")
        self.say(line)
        return line
