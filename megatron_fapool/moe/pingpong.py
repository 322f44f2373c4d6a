"""Ping-pong: the parts of a micro-batch take turns, so one part's attention overlaps another's experts.

A micro-batch is split along the batch into ``m`` parts; each part runs the whole model
forward in its own thread, but only one thread runs at a time (:class:`Turns`, strict
round robin). A part gives up its turn at exactly one kind of point: an MoE layer whose
experts are remote, right after it has *issued* its tokens to the expert ranks (the
header, the tokens and the receive of the outputs are all asynchronous). While the
expert ranks compute part ``p``'s experts of layer ``L``, part ``p + 1`` computes its
attention of layer ``L``; part ``p`` continues when its turn comes back and its outputs
have arrived. Every rank runs the same schedule, so every process group sees the same
sequence of collectives on every rank (issued only by the thread holding the turn).

Nothing changes numerically: each part's tokens go through the same layers; the router's
load-balancing and z losses, which Megatron defines over the whole micro-batch, are
computed once per layer over all parts' logits by the last part to route
(:class:`~megatron_fapool.moe.router.FapoolTopKRouter`). The backward is one ordinary
backward of the summed loss (its expert calls are synchronous, in autograd's order, the
same on every rank).

On CUDA every part thread issues its kernels on its own stream, so attention kernels of
one part and the all-to-all of another run concurrently; on gloo the asynchronous
collectives run on gloo's threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["Turns", "current_part", "forward_in_parts", "run_parts"]

_local = threading.local()


@dataclass
class _Part:
    turns: "Turns"
    index: int
    stream: object = None


def current_part():
    """The :class:`_Part` this thread runs (``index``, ``turns``), or ``None`` outside ping-pong."""
    return getattr(_local, "part", None)


@dataclass
class Turns:
    """Round-robin turns of ``parts`` threads, plus what the parts of one layer share."""

    parts: int
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _turn: int = 0
    _alive: set = field(default_factory=set)
    failed: BaseException | None = None
    shared: dict = field(default_factory=dict)  # per-layer values the parts leave for the last part
    streams: list = field(default_factory=list)  # CUDA: each part's stream (empty on CPU)

    def __post_init__(self):
        self._alive = set(range(self.parts))

    def _pass_turn(self, index: int) -> None:
        others = sorted(self._alive - {index})
        if others:
            later = [p for p in others if p > index]
            self._turn = later[0] if later else others[0]
        self._cond.notify_all()

    def _wait_turn(self, index: int) -> None:
        while self._turn != index and self.failed is None:
            self._cond.wait()
        if self.failed is not None:
            raise RuntimeError("another ping-pong part failed") from self.failed

    def wait_for_other_streams(self, index: int) -> None:
        """CUDA: this part's stream waits for the work the other parts have issued (to read their tensors)."""
        for p, stream in enumerate(self.streams):
            if p != index:
                torch.cuda.current_stream().wait_stream(stream)

    def begin(self, index: int) -> None:
        with self._cond:
            self._wait_turn(index)

    def pause_while(self, index: int, wait: Callable[[], None]) -> None:
        """Give the turn to the next part, run ``wait()`` (e.g. wait for an all-to-all), take the turn back."""
        with self._cond:
            self._pass_turn(index)
        wait()
        with self._cond:
            self._wait_turn(index)

    def end(self, index: int, error: BaseException | None = None) -> None:
        with self._cond:
            if error is not None and self.failed is None:
                self.failed = error
            self._pass_turn(index)
            self._alive.discard(index)
            self._cond.notify_all()


def run_parts(fns: Sequence[Callable[[], object]], *, device=None) -> list:
    """Run ``fns[p]()`` (part ``p``'s forward) in turns; their results, in order. The first error is raised."""
    turns = Turns(parts=len(fns))
    results: list = [None] * len(fns)
    grad = torch.is_grad_enabled()  # grad mode is per thread
    cuda = device is not None and torch.device(device).type == "cuda"
    caller = torch.cuda.current_stream(device) if cuda else None

    if cuda:
        turns.streams = [torch.cuda.Stream(device) for _ in fns]

    def body(p: int) -> None:
        stream = turns.streams[p] if cuda else None
        _local.part = _Part(turns, p, stream)
        error = None
        try:
            turns.begin(p)
            with torch.set_grad_enabled(grad):
                if cuda:
                    stream.wait_stream(caller)
                    with torch.cuda.stream(stream):
                        results[p] = fns[p]()
                else:
                    results[p] = fns[p]()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            error = e
        finally:
            _local.part = None
            turns.end(p, error)
            if cuda:
                caller.wait_stream(stream)

    threads = [threading.Thread(target=body, args=(p,), name=f"pingpong-part-{p}") for p in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if turns.failed is not None:
        raise turns.failed
    return results


def forward_in_parts(fn: Callable[..., torch.Tensor], *batch: torch.Tensor, parts: int, device=None):
    """``fn(*batch)`` computed as ``parts`` ping-pong parts, every tensor of ``batch`` cut along dim 0.

    ``fn`` returns a batch-first tensor (a ``GPTModel``'s logits or per-token loss); the
    parts' results are concatenated back.
    """
    size = batch[0].shape[0]
    if not 1 <= parts <= size:
        raise ValueError(f"ping-pong: cannot cut a batch of {size} into {parts} parts (micro_batches <= batch)")
    if parts == 1:
        return fn(*batch)
    pieces = list(zip(*(t.tensor_split(parts, dim=0) for t in batch)))
    outs = run_parts([lambda args=args: fn(*args) for args in pieces], device=device)
    return torch.cat(outs, dim=0)
