"""Ping-pong parts: strict turns, errors that end every part, batch cuts (no processes)."""

import threading

import pytest
import torch

from megatron_fapool.moe.pingpong import current_part, forward_in_parts, run_parts


def _part(log, steps):
    """A part that 'dispatches' ``steps`` times: it logs, then gives its turn away while it waits."""
    def fn():
        part = current_part()
        for s in range(steps):
            log.append((part.index, s))
            part.turns.pause_while(part.index, lambda: None)
        return part.index
    return fn


def test_parts_take_strict_turns_and_the_last_one_runs_alone():
    log = []
    assert run_parts([_part(log, 3), _part(log, 3), _part(log, 1)]) == [0, 1, 2]
    # round robin while all three live, then parts 0 and 1 alternate
    assert log == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
    assert current_part() is None  # outside a part


def test_a_failing_part_ends_the_others_and_is_raised():
    def bad():
        current_part().turns.pause_while(current_part().index, lambda: None)
        raise ValueError("boom")

    log = []
    done = threading.Event()

    def run():
        with pytest.raises(ValueError, match="boom"):
            run_parts([bad, _part(log, 100)])
        done.set()

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=30)
    assert done.is_set()  # no hang
    assert len(log) < 100


def test_forward_in_parts_cuts_the_batch_and_keeps_grad_mode():
    x = torch.arange(10.0).view(5, 2).requires_grad_()
    seen = []

    def fn(t):
        seen.append((current_part().index, t.shape[0], torch.is_grad_enabled()))
        return t * 2

    y = forward_in_parts(fn, x, parts=2)
    assert torch.equal(y, x * 2) and y.requires_grad
    assert sorted(seen) == [(0, 3, True), (1, 2, True)]
    with torch.no_grad():
        forward_in_parts(fn, x, parts=2)
    assert all(not g for _, _, g in seen[2:])
    with pytest.raises(ValueError, match="micro_batches <= batch"):
        forward_in_parts(fn, x, parts=6)
