"""launch/train.py with one attention pool shared by two base replicas (DP 2), on CPU.

Each step every replica trains on one document (threshold 200, sequences up to 256), so in some
steps one replica is long and the other short, in others the reverse, both or neither. The two
pool ranks belong to no replica: every step's assignment (agreed by all ranks from the
replicas' lengths) gives them to the long replicas only, and the losses equal the same run
without the pool (TP 1 and TP 2 replicas, through torchrun). Killing a pool rank that serves both replicas (in turn) ends every rank within 60 s,
naming it.
"""

from __future__ import annotations

import json
import os
import re

import pytest

from megatron_fapool.testing.launch import build_corpus, launch_command, read_metrics, run_and_kill, run_ok, train_args

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny_dense_pool.json")
THRESHOLD = 200  # of this corpus, steps 1-4 are: replica 1 long, replica 0 long, 1 long, both long


@pytest.fixture(scope="module")
def corpus(build_once):
    return build_once("corpus60", lambda d: build_corpus(str(d / "stdlib")))


def _config(path, *, tp: int, pool: bool) -> str:
    data = json.load(open(TINY))
    data["fapool"]["model_yaml"] = os.path.join(ROOT, "configs", "models", "tiny_dense.yaml")
    data["fapool"]["parallel"]["tensor_model_parallel_size"] = tp
    data["fapool"]["attention_pool"].update(enabled=pool, pool_size=2, sharing="shared", threshold=THRESHOLD)
    data["zero_optimization"]["stage"] = 1
    data["steps_per_print"] = 1000
    path.write_text(json.dumps(data))
    return str(path)


ITERS = 4


@pytest.fixture(scope="module")
def pool_off(corpus, tmp_path_factory):
    """The reference: the same two replicas (TP 1) without the pool."""
    d = tmp_path_factory.mktemp("off")
    run_ok(launch_command("torchrun", 2, "train", train_args(_config(d / "off.json", tp=1, pool=False), corpus,
                                                            d / "off.jsonl", iters=ITERS, seq=256)))
    return read_metrics(d / "off.jsonl")


@pytest.mark.parametrize("tp", [1, 2])
def test_shared_pool_serves_the_long_replica_and_equals_pool_off(corpus, pool_off, tmp_path, tp):
    """TP 2 replicas are compared with the TP 1 reference too (the same model; TP changes sums' order only)."""
    on_cfg = _config(tmp_path / "on.json", tp=tp, pool=True)
    proc = run_ok(launch_command("torchrun", 2 * tp + 2, "train",
                                 train_args(on_cfg, corpus, tmp_path / "on.jsonl", iters=ITERS, seq=256)))
    on, off = read_metrics(tmp_path / "on.jsonl"), pool_off
    assert sorted(on) == sorted(off) == list(range(1, ITERS + 1))
    for it in on:
        a, b = on[it]["loss"], off[it]["loss"]
        assert abs(a - b) <= 1e-4 * abs(b), (it, a, b)
    orders = set()
    for it, row in on.items():  # the base ranks of a replica: tp * replica .. tp * replica + tp - 1
        demands = {int(b): n for b, n in row["pool_demands"].items()}
        blocks = {int(b): r for b, r in row["pool_blocks"].items()}
        long = {b for b, n in demands.items() if n > THRESHOLD}
        used = [r for rs in blocks.values() for r in rs]
        assert len(used) == len(set(used)) and set(used) <= {2 * tp, 2 * tp + 1}  # no pool rank twice
        replica_long = tuple(any(demands[r * tp + t] > THRESHOLD for t in range(tp)) for r in range(2))
        orders.add(replica_long)
        assert set(blocks) <= long, (it, demands, blocks)  # a short replica's rank never gets a pool rank
        if len(long) <= 2:  # every long rank gets one
            assert set(blocks) == long, (it, demands, blocks)
        else:  # more long ranks than pool ranks (TP 2, both long): both pool ranks busy, one per long replica
            assert len(used) == 2 and all(any(r * tp + t in blocks for t in range(tp))
                                          for r in range(2) if replica_long[r]), (it, demands, blocks)
    assert {(True, False), (False, True)} <= orders, orders  # one replica long and the other short, and the reverse
    assert "pool rank for a shared pool" in proc.stdout and "shared pool counters:" in proc.stdout
    assert re.search(r"pool rank for a shared pool .*busy [0-9.]+ s", proc.stdout)


def test_sigkill_of_a_shared_pool_rank_ends_every_rank(corpus, tmp_path):
    cfg = _config(tmp_path / "c.json", tp=1, pool=True)
    args = train_args(cfg, corpus, tmp_path / "m.jsonl", iters=400, seq=256)
    rc, out, took = run_and_kill(launch_command("torchrun", 4, "train", args), f"iteration {3:>8d}/", 2)
    assert rc != 0 and took < 60
    named = ("lost contact with rank(s) [2" in out or "lost rank 2 (pool)" in out
             or re.search(r"Root Cause.*?rank\s*:\s*2 \(local_rank: 2\)", out, re.S))
    assert named, out[-3000:]
