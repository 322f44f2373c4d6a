"""Continuous batching over a :class:`~.engine.ServingEngine`: requests join the running batch as they arrive.

Each iteration of :func:`serve`:

1. requests whose arrival time has passed join the waiting queue (first come, first served);
2. as many waiting requests as there are free slots and prefill budget
   (``max_prefill_tokens``; a longer prompt runs alone) are prefilled together in one
   packed forward and join the running rows with their first token;
3. one decode step of every running row; requests that reached their ``max_new_tokens``
   (known in advance: no per-row counting) or produced the stop token leave, freeing
   their slots for the next iteration.

With nothing running and nothing waiting, the loop sleeps until the next arrival. A
request whose prompt + new tokens can never fit a slot is refused before any work, with
a message in its :class:`~.generate.Generation` (``refused``); it disturbs nothing. A
request that only waits for a slot is admitted when one frees up; its TTFT counts from
its arrival. ``clock``/``sleep`` are the time source (seconds); tests pass a simulated one.

Tensor-parallel ranks run this loop in lockstep, so every decision must be the same on
each: tokens are (gathered logits), and arrival times are compared with one agreed time
(``agree(now)``: TP rank 0's clock, broadcast; called only while requests are still to
arrive).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from .generate import Generation, Request
from .slots import SlotError

__all__ = ["TimedRequest", "place_on_replicas", "serve"]


@dataclass
class TimedRequest:
    request: Request
    arrival_s: float = 0.0  # seconds after the start of serving


#: How long the head of the queue waits before asking again for room that only other replicas can free
#: (a shared pool's slots) while nothing runs here.
WAIT_FOR_ROOM_S = 0.002


def serve(engine, timed: list[TimedRequest], *, stop_token: int | None = None, max_prefill_tokens: int = 32768,
          clock=time.perf_counter, sleep=time.sleep, on_step=None, agree=None) -> list[Generation]:
    """Serve ``timed`` requests as they arrive; one :class:`Generation` per request, in the given order.

    ``on_step(kind, rows, waiting)`` is called after each prefill ("prefill", requests
    prefilled) and decode step ("decode", running rows), with the waiting queue's length.
    """
    if max_prefill_tokens < 1:
        raise ValueError(f"max_prefill_tokens must be >= 1, got {max_prefill_tokens}")
    results = {t.request.id: Generation(id=t.request.id, prompt_len=len(t.request.prompt), arrival_s=t.arrival_s)
               for t in timed}
    if len(results) != len(timed):
        raise ValueError("request ids must be distinct")
    pending = deque()
    for t in sorted(timed, key=lambda t: t.arrival_s):
        r = t.request
        try:
            engine.check_fits(r.id, len(r.prompt) + r.max_new_tokens)
            if r.max_new_tokens > engine.max_new_tokens:
                raise SlotError(f"request {r.id}: max_new_tokens {r.max_new_tokens} exceeds the engine's"
                                f" {engine.max_new_tokens}")
        except SlotError as e:
            results[r.id].refused = str(e)
            continue
        pending.append(t)
    waiting: deque[TimedRequest] = deque()
    finish_at: dict[int, list[int]] = {}  # decode step -> requests whose last token it makes
    joined: dict[int, tuple[int, float]] = {}  # request -> (decode steps done at its join, first-token time)
    step_end: dict[int, float] = {}  # engine decode step -> time after it (the engine counts steps across calls)
    t0 = clock()

    def leave(requests, now: float) -> None:
        for rid, tokens in engine.leave(sorted(set(requests))).items():
            g = results[rid]
            j0, first = joined.pop(rid)
            times = [first] + [step_end[k] for k in range(j0 + 1, j0 + len(tokens))]
            g.tokens, g.done_s = tokens, times[-1]
            g.decode_s = [b - a for a, b in zip(times, times[1:])]

    while pending or waiting or engine.running:
        now = clock() - t0
        if pending and agree is not None:
            now = agree(now)
        while pending and pending[0].arrival_s <= now:
            waiting.append(pending.popleft())
        batch, budget = [], max_prefill_tokens
        while waiting:
            r = waiting[0].request
            if batch and len(r.prompt) > budget:
                break
            if not engine.admit(r.id, len(r.prompt) + r.max_new_tokens, prompt_len=len(r.prompt)):
                break  # no free slot: it waits, first in line
            batch.append(waiting.popleft().request)
            budget -= len(r.prompt)
        if batch:
            first = engine.prefill([(r.id, r.prompt) for r in batch])
            now = clock() - t0
            done = []
            for r, token in zip(batch, first):
                g = results[r.id]
                g.ttft_s = now - g.arrival_s
                g.pooled = engine.members(r.id) > 1
                joined[r.id] = (engine.steps, now)
                if r.max_new_tokens == 1 or token == stop_token:
                    done.append(r.id)
                else:
                    finish_at.setdefault(engine.steps + r.max_new_tokens - 1, []).append(r.id)
            leave(done, now)
            if on_step is not None:
                on_step("prefill", len(batch), len(waiting))
        if engine.running:
            tokens = engine.decode()
            now = clock() - t0
            step_end[engine.steps] = now
            done = [rid for rid in finish_at.pop(engine.steps, []) if rid in joined]  # not gone at a stop token
            if stop_token is not None:
                hits = (tokens == stop_token).nonzero().flatten().tolist()  # host tensor: no device sync
                done = done + [engine.rows[i] for i in hits]
            if on_step is not None:
                on_step("decode", engine.running, len(waiting))
            leave(done, now)
        elif not batch and waiting and not engine.running:  # room held by other replicas (a shared pool)
            sleep(WAIT_FOR_ROOM_S)
        elif not batch and pending and not waiting:
            sleep(max(0.0, pending[0].arrival_s - (clock() - t0)))
    return [results[t.request.id] for t in timed]


def place_on_replicas(requests, arrivals, *, replicas: int, threshold: int) -> list[int]:
    """The front scheduler: the replica that serves each of ``requests`` (arriving at ``arrivals``), in their
    order, the same on every rank. In arrival order (ties: the given order), long requests (prompt over
    ``threshold``) go to the replica with the fewest long ones so far, then the fewest tokens (prompt + new)
    placed; short ones to the fewest tokens placed; ties to the lowest replica."""
    tokens, longs, out = [0] * replicas, [0] * replicas, [0] * len(requests)
    for i in sorted(range(len(requests)), key=lambda i: (arrivals[i], i)):
        r = requests[i]
        long = len(r.prompt) > threshold
        choice = min(range(replicas), key=lambda k: ((longs[k] if long else 0), tokens[k], k))
        tokens[choice] += len(r.prompt) + r.max_new_tokens
        longs[choice] += long
        out[i] = choice
    return out
