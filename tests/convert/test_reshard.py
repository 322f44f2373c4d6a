"""Resharded launch/train.py checkpoints resume training as if nothing happened (CPU, gloo).

One chain of runs, each compared with the uninterrupted reference A (TP 2, ZeRO 1, global
batch 2 = 2 micro-batches per step, checkpoints at 10 and 20):

* B = A@10 resharded to TP 1, resumed to 22 (saving at 12): TP 2 -> 1;
* C = B@12 resharded to TP 2, resumed: TP 1 -> 2;
* D = B@12 resharded to DP 2 (ZeRO 1, one micro-batch per replica, same global batch): DP 1 -> 2;

each has A's learning rate exactly at every iteration, its loss at the next iteration within
1e-5 and over the next 10 within 1e-4 (relative). The control, A@10 resharded with the
optimizer reset (weights, LR schedule and counters carried; Adam's moments and step fresh),
matches at the next iteration (same weights) but fails the 10-iteration bar.

A reshard is ``ours_to_dist`` into a staging folder, then ``dist_to_ours``: B and C go through
``reshard``; D and the control reuse C's and B's staging copies of the same sources (B@12, A@10)
for the second half alone.
"""

from __future__ import annotations


import pytest

from megatron_fapool.config import load_run_config
from megatron_fapool.convert.deepspeed_io import dist_to_ours, reshard
from megatron_fapool.convert.ours import open_ours
from megatron_fapool.convert.progress import Progress
from megatron_fapool.testing.launch import launch_command, read_metrics, run_ok, train_args

SEQ = 64
ITERS = 22


def _train(cfg, corpus, metrics, *extra, nproc: int) -> dict:
    run_ok(launch_command("torchrun", nproc, "train", train_args(cfg, corpus, metrics, *extra, iters=ITERS, seq=SEQ)),
           timeout=300)
    return read_metrics(metrics)


def _reshard(src: str, tag: str, cfg: str, out, *, optimizer: str = "carry") -> str:
    reshard(open_ours(src, tag), load_run_config(cfg), str(out), staging=str(out) + ".dist",
            optimizer=optimizer, progress=Progress(quiet=True), timeout=300)
    return str(out)


def _reshard_again(first, cfg: str, out, *, optimizer: str = "carry") -> str:
    """The second half of a reshard (``dist_to_ours``) from the staging copy that ``_reshard`` left for ``first``
    (reshard = ``ours_to_dist`` into the staging folder, then ``dist_to_ours``): the same source resharded
    for another target, without writing the same distributed checkpoint a second time."""
    dist_to_ours(str(first) + ".dist", load_run_config(cfg), str(out), optimizer=optimizer,
                 progress=Progress(quiet=True), timeout=300)
    return str(out)


def _misses(resumed: dict, ref: dict, start: int) -> list[str]:
    """Where ``resumed`` (from iteration ``start``) misses the bar against ``ref``; empty when it holds."""
    out = []
    for it in range(start + 1, start + 11):
        a, b = resumed[it], ref[it]
        if a["learning_rate"] != b["learning_rate"]:
            out.append(f"iteration {it}: lr {a['learning_rate']} != {b['learning_rate']}")
        tol = 1e-5 if it == start + 1 else 1e-4
        if abs(a["loss"] - b["loss"]) > tol * abs(b["loss"]):
            out.append(f"iteration {it}: loss {a['loss']} vs {b['loss']} (rel {abs(a['loss'] / b['loss'] - 1):.1e})")
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory, corpus, write_config):
    d = tmp_path_factory.mktemp("reshard")
    w = {"dir": d, "corpus": corpus,
         "tp2": write_config(d / "tp2.json", tp=2, gas=2), "tp1": write_config(d / "tp1.json", tp=1, gas=2),
         "dp2": write_config(d / "dp2.json", tp=1, gas=1)}
    w["A"] = _train(w["tp2"], w["corpus"], d / "a.jsonl", "--save", str(d / "A"), "--save-interval", "10", nproc=2)
    assert sorted(w["A"]) == list(range(1, ITERS + 1))
    return w


@pytest.fixture(scope="module")
def run_b(world):
    d = world["dir"]
    out = _reshard(str(d / "A"), "iter_0000010", world["tp1"], d / "B")
    metrics = _train(world["tp1"], world["corpus"], d / "b.jsonl", "--load", out, "--save", out,
                     "--save-interval", "12", nproc=1)
    return out, metrics


def test_tp2_to_tp1_resumes(world, run_b):
    out, metrics = run_b
    assert sorted(metrics) == list(range(11, ITERS + 1))
    assert not _misses(metrics, world["A"], 10)
    assert open_ours(out, "iter_0000012").tp == 1


@pytest.fixture(scope="module")
def run_c(world, run_b):
    """B@12 resharded to TP 2 (its staging copy of B@12 is resharded again for D)."""
    return _reshard(run_b[0], "iter_0000012", world["tp2"], world["dir"] / "C")


def test_tp1_to_tp2_resumes(world, run_c):
    d = world["dir"]
    out = run_c
    assert open_ours(out).tp == 2 and open_ours(out).meta["config"] == world["tp2"]
    metrics = _train(world["tp2"], world["corpus"], d / "c.jsonl", "--load", out, nproc=2)
    assert sorted(metrics) == list(range(13, ITERS + 1))
    assert not _misses(metrics, world["A"], 12)


def test_dp1_to_dp2_resumes(world, run_b, run_c):
    d = world["dir"]
    out = _reshard_again(run_c, world["dp2"], d / "D")  # B@12, through C's staging copy of it
    assert open_ours(out).dp == 2
    metrics = _train(world["dp2"], world["corpus"], d / "d.jsonl", "--load", out, nproc=2)
    assert sorted(metrics) == list(range(13, ITERS + 1))
    assert not _misses(metrics, world["A"], 12)


def test_control_with_the_optimizer_reset_fails_the_bar(world, run_b):
    d = world["dir"]
    out = _reshard_again(run_b[0], world["tp1"], d / "R", optimizer="reset")  # A@10, through B's staging copy
    metrics = _train(world["tp1"], world["corpus"], d / "r.jsonl", "--load", out, "--train-iters", "16", nproc=1)
    ref = world["A"]
    assert abs(metrics[11]["loss"] - ref[11]["loss"]) <= 1e-5 * ref[11]["loss"]  # the weights were carried
    assert metrics[11]["learning_rate"] == ref[11]["learning_rate"]  # and the LR schedule
    misses = _misses({**ref, **metrics}, ref, 10)
    assert any("loss" in m for m in misses), "a fresh Adam state should change the losses after iteration 11"
