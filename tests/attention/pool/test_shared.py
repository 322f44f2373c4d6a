"""One pool shared by many base replicas: per-step (training) and per-request (serving) decisions."""

import json
import math
import random

import pytest

from megatron_fapool.attention.pool.manager import CostModel
from megatron_fapool.attention.pool.shared import PoolCapacityError, PoolDemand, SharedPoolManager

D = PoolDemand


class Sizes:
    """A stand-in cost model: wants ``tokens // 1000`` ranks; time ``n**2 / (p + 1)``."""

    def best_active(self, n, max_active):
        return max(1, min(n // 1000, max_active))

    def time(self, n, p):
        return n * n / (p + 1)


def random_steps(seed, steps=40, replicas=5, micro=2):
    rng = random.Random(seed)
    return [
        [D(r, k, rng.choice([10, 50, 900, 2_000, 5_000, 9_000])) for r in range(replicas) for k in range(micro)
         if rng.random() < 0.8]
        for _ in range(steps)
    ]


# --- input checks ---------------------------------------------------------------------------


def test_bad_input_raises_with_what_was_expected():
    with pytest.raises(ValueError, match="tokens must be >= 0"):
        D(0, 0, -1)
    with pytest.raises(ValueError, match="kv_tokens must be >= 0"):
        D(0, 0, 5, kv_tokens=-3)
    with pytest.raises(ValueError, match="must be an int"):
        D(0, 0, 5.0)
    for kwargs in ({"threshold": -1}, {"threshold": 0, "max_per_demand": 0}, {"threshold": 0, "hysteresis": 0},
                   {"threshold": 0, "kv_capacity_tokens": 0}):
        with pytest.raises(ValueError):
            SharedPoolManager(2, **kwargs)
    with pytest.raises(ValueError, match="num_pool_ranks"):
        SharedPoolManager(0, threshold=0)
    m = SharedPoolManager(2, threshold=10)
    with pytest.raises(ValueError, match=r"duplicate demand \(replica 1, key 3\)"):
        m.assign_step([D(1, 3, 50), D(0, 3, 50), D(1, 3, 20)])
    with pytest.raises(TypeError, match="PoolDemand"):
        m.assign_step([(1, 3, 50)])
    with pytest.raises(ValueError, match="one mode"):
        m.admit(D(0, 0, 50))  # a training manager does not serve requests


# --- training -------------------------------------------------------------------------------


def test_short_demands_never_get_ranks_and_every_demand_is_answered():
    m = SharedPoolManager(4, threshold=100)
    out = m.assign_step([D(0, 0, 100), D(1, 0, 0), D(2, 0, 101)])
    assert out == {(0, 0): (), (1, 0): (), (2, 0): (0, 1, 2, 3)}
    for step in random_steps(seed=1):
        out = m.assign_step(step)
        assert set(out) == {d.stream for d in step}
        assert all(out[d.stream] == () for d in step if d.tokens <= 100)


@pytest.mark.parametrize("pool", [1, 3, 8])
def test_no_rank_serves_two_demands_and_the_pool_is_shared_fully(pool):
    m = SharedPoolManager(pool, threshold=100, cost_model=Sizes(), hysteresis=1)
    for step in random_steps(seed=pool):
        out = m.assign_step(step)
        used = [r for ranks in out.values() for r in ranks]
        assert len(used) == len(set(used)) and all(0 <= r < pool for r in used)
        assert all(list(ranks) == sorted(ranks) for ranks in out.values())
        long = [d for d in step if d.tokens > 100]
        want = sum(Sizes().best_active(d.tokens, pool) for d in long)
        assert len(used) == min(pool, want)  # no rank idles while a long demand wants more
        assert all(len(out[d.stream]) <= Sizes().best_active(d.tokens, pool) for d in long)
        if len(long) <= pool:
            assert all(out[d.stream] for d in long)  # every long demand gets at least one rank


def test_same_inputs_same_outputs_whatever_the_order_of_the_demands():
    a = SharedPoolManager(3, threshold=100, cost_model=Sizes(), hysteresis=2)
    b = SharedPoolManager(3, threshold=100, cost_model=Sizes(), hysteresis=2)
    rng = random.Random(7)
    for step in random_steps(seed=3, steps=60):
        shuffled = list(step)
        rng.shuffle(shuffled)
        assert a.assign_step(step) == b.assign_step(shuffled)
    assert a.counters() == b.counters()


@pytest.mark.parametrize("tokens", [(300, 200, 100), (500, 500, 500)])
def test_three_long_replicas_two_ranks_each_served_every_other_step(tokens):
    m = SharedPoolManager(2, threshold=50, max_per_demand=1)
    served = []
    for _ in range(12):
        out = m.assign_step([D(r, 0, t) for r, t in enumerate(tokens)])
        served.append({r for (r, _), ranks in out.items() if ranks})
        assert len(served[-1]) == 2
    for a, b in zip(served, served[1:]):
        assert a | b == {0, 1, 2}  # nobody waits 2 steps in a row: ceil(3 / 2) - 1 = 1
    assert all(m.counters()["replicas"][str(r)]["unserved"] >= 3 for r in (1, 2))


def test_waits_are_bounded_by_ceil_long_replicas_over_ranks():
    pool, replicas = 2, 5
    m = SharedPoolManager(pool, threshold=50)
    waited = [0] * replicas
    for step in range(40):
        out = m.assign_step([D(r, 0, 1000 - 100 * r + step % 3) for r in range(replicas)])
        for r in range(replicas):
            waited[r] = 0 if out[(r, 0)] else waited[r] + 1
            assert waited[r] <= math.ceil(replicas / pool) - 1


def test_longest_first_then_extra_ranks_to_the_longest_predicted_time():
    m = SharedPoolManager(2, threshold=50)
    out = m.assign_step([D(0, 0, 100), D(1, 0, 300), D(2, 0, 200)])
    assert out == {(0, 0): (), (1, 0): (0,), (2, 0): (1,)}  # no one waited yet: longest two
    m = SharedPoolManager(4, threshold=50)
    out = m.assign_step([D(0, 0, 500), D(1, 0, 1000)])
    # one each, then 1000**2/2 > 500**2/2 and 1000**2/3 > 500**2/2: both extra ranks to the longer
    assert [len(out[(r, 0)]) for r in (0, 1)] == [1, 3]
    m = SharedPoolManager(4, threshold=50)
    out = m.assign_step([D(0, 0, 900), D(1, 0, 1000)])
    # 1000**2/2 > 900**2/2, then 900**2/2 > 1000**2/3: one extra rank each
    assert [len(out[(r, 0)]) for r in (0, 1)] == [2, 2]


def test_equal_ties_rotate_every_step():
    m = SharedPoolManager(1, threshold=0)
    order = [next(r for (r, _), ranks in m.assign_step([D(r, 0, 10) for r in range(3)]).items() if ranks)
             for _ in range(6)]
    assert order == [0, 1, 2, 0, 1, 2]
    # with no waits to go by (a short step in between resets them), the rotation alone decides
    m = SharedPoolManager(1, threshold=0)
    order = []
    for step in range(9):
        out = m.assign_step([D(r, 0, 10 if step % 3 == 0 else 0) for r in range(3)])
        order += [r for (r, _), ranks in out.items() if ranks]
    assert sorted(order) == [0, 1, 2]


def test_each_replica_first_demand_before_any_second():
    m = SharedPoolManager(2, threshold=0)
    out = m.assign_step([D(0, 0, 900), D(0, 1, 800), D(1, 0, 100)])
    assert out[(0, 0)] and out[(1, 0)] and not out[(0, 1)]


def test_hysteresis_holds_size_changes_and_keeps_ranks():
    m = SharedPoolManager(8, threshold=100, cost_model=Sizes(), hysteresis=2)
    other = D(1, 0, 3000)  # longer: placed first
    assert m.assign_step([D(0, 0, 2000), other]) == {(0, 0): (3, 4), (1, 0): (0, 1, 2)}
    assert m.assign_step([D(0, 0, 4000), other])[(0, 0)] == (3, 4)  # first step asking for 4: held
    assert m.assign_step([D(0, 0, 4000), other]) == {(0, 0): (3, 4, 5, 6), (1, 0): (0, 1, 2)}
    assert m.assign_step([D(0, 0, 2000), other])[(0, 0)] == (3, 4, 5, 6)  # asks 2 once
    assert m.assign_step([D(0, 0, 4000), other])[(0, 0)] == (3, 4, 5, 6)  # ... then 4: count restarts
    assert m.assign_step([D(0, 0, 2000), other])[(0, 0)] == (3, 4, 5, 6)
    assert m.assign_step([D(0, 0, 2000), other])[(0, 0)] == (3, 4)  # two in a row: shrinks, keeps lowest
    # a newcomer takes free ranks and does not move the continuing streams ...
    out = m.assign_step([D(0, 0, 2000), other, D(2, 0, 2000)])
    assert out == {(0, 0): (3, 4), (1, 0): (0, 1, 2), (2, 0): (5, 6)}
    # ... and one that must share (9000**2 / (p + 1) is the longest time) shrinks them to their lowest ranks
    out = m.assign_step([D(0, 0, 2000), other, D(3, 0, 9000)])
    assert out == {(0, 0): (3,), (1, 0): (0,), (3, 0): (1, 2, 4, 5, 6, 7)}
    out = m.assign_step([D(0, 0, 2000), other])  # it left: back to the wanted sizes, kept rank + lowest free
    assert out == {(0, 0): (3, 4), (1, 0): (0, 1, 2)}
    # stopping and starting are immediate; a stream that stopped starts afresh on the lowest free ranks
    assert m.assign_step([D(0, 0, 10), other])[(0, 0)] == ()
    assert m.assign_step([D(0, 0, 4000), other])[(0, 0)] == (3, 4, 5, 6)
    assert m.assign_step([D(0, 0, 4000), D(1, 0, 10)])[(0, 0)] == (3, 4, 5, 6)  # freed ranks do not move it
    m1 = SharedPoolManager(8, threshold=100, cost_model=Sizes(), hysteresis=1)
    m1.assign_step([D(0, 0, 2000)])
    assert m1.assign_step([D(0, 0, 4000)])[(0, 0)] == (0, 1, 2, 3)  # hysteresis 1: at once


def test_cost_model_sizes_each_demand_and_max_per_demand_caps_it():
    cost = CostModel(attention_s_per_token2=1e-9, link_bytes_per_s=1e11, call_overhead_s=1e-3,
                     kv_bytes_per_token=4096, q_bytes_per_token=2048)
    short, long = 2_000, 200_000
    assert cost.best_active(short, 4) < cost.best_active(long, 4) == 4
    m = SharedPoolManager(8, threshold=1000, max_per_demand=4, cost_model=cost)
    out = m.assign_step([D(0, 0, short), D(1, 0, long)])
    assert len(out[(0, 0)]) == cost.best_active(short, 4) and len(out[(1, 0)]) == 4
    m = SharedPoolManager(8, threshold=1000, max_per_demand=3)
    out = m.assign_step([D(0, 0, short), D(1, 0, long)])
    assert [len(out[(r, 0)]) for r in (0, 1)] == [3, 3]
    assert len(SharedPoolManager(8, threshold=0).assign_step([D(0, 0, 5)])[(0, 0)]) == 8  # default: all


def test_training_counters():
    m = SharedPoolManager(2, threshold=50, max_per_demand=1)
    m.assign_step([D(0, 0, 100), D(1, 0, 200), D(2, 0, 300)])  # 2 and 1 served, 0 waits
    m.assign_step([D(0, 0, 100), D(1, 0, 20)])  # 0 served (on rank 0, free now), 1 short
    m.assign_step([])
    c = m.counters()
    assert json.loads(json.dumps(c)) == c
    assert c["replicas"]["0"] == {"activations": 1, "releases": 1, "busy_steps": 1, "tokens_served": 100,
                                  "unserved": 1, "kv_tokens_held": 0, "kv_tokens_peak": 0}
    assert c["replicas"]["1"]["activations"] == 1 and c["replicas"]["1"]["releases"] == 1
    assert c["replicas"]["2"]["tokens_served"] == 300 and c["replicas"]["2"]["unserved"] == 0
    # step 1: rank 0 -> replica 2, rank 1 -> replica 1; step 2: rank 0 -> replica 0; step 3: none
    assert c["pool_ranks"]["0"] == {"activations": 2, "releases": 2, "busy_steps": 2, "tokens_served": 400,
                                    "unserved": 0, "kv_tokens_held": 0, "kv_tokens_peak": 0}
    assert c["pool_ranks"]["1"]["busy_steps"] == 1 and c["pool_ranks"]["1"]["releases"] == 1


# --- serving ----------------------------------------------------------------------------------


def test_serving_admit_wait_release_with_kv_accounting():
    m = SharedPoolManager(2, threshold=100, max_per_demand=1, kv_capacity_tokens=1000)
    assert m.admit(D(0, 0, 500, kv_tokens=600)) == (0,)
    assert m.admit(D(1, 0, 500, kv_tokens=500)) == (1,)  # least K/V held
    assert m.admit(D(2, 0, 500, kv_tokens=600)) is None  # 600 + 600 and 500 + 600 > 1000: wait
    assert m.admit(D(2, 1, 500, kv_tokens=500)) == (1,)  # 500 + 500 fits on rank 1
    ranks = m.counters()["pool_ranks"]
    assert [ranks[i]["kv_tokens_held"] for i in "01"] == [600, 1000]
    m.release(0, 0)
    assert m.counters()["pool_ranks"]["0"]["releases"] == 1 and m.counters()["replicas"]["0"]["releases"] == 1
    assert m.admit(D(2, 0, 500, kv_tokens=600)) == (0,)  # room again
    m.release(2, 0)
    c = m.counters()
    assert [c["pool_ranks"][i]["kv_tokens_held"] for i in "01"] == [0, 1000]
    assert [c["pool_ranks"][i]["kv_tokens_peak"] for i in "01"] == [600, 1000]
    assert c["replicas"]["2"] == {"activations": 2, "releases": 1, "tokens_served": 1000,  # no steps in serving
                                  "unserved": 1, "kv_tokens_held": 500, "kv_tokens_peak": 1100}


def test_serving_spreads_kv_evenly_with_ceil_and_refuses_what_never_fits():
    m = SharedPoolManager(4, threshold=100, max_per_demand=2, kv_capacity_tokens=1000)
    assert m.admit(D(0, 7, 500, kv_tokens=1001)) == (0, 1)
    assert [m.counters()["pool_ranks"][i]["kv_tokens_held"] for i in "0123"] == [501, 501, 0, 0]
    assert m.counters()["replicas"]["0"]["kv_tokens_held"] == 1002
    assert m.admit(D(1, 7, 500, kv_tokens=10)) == (2, 3)  # least held, then lowest index
    with pytest.raises(PoolCapacityError, match=r"replica 3, key 9\).*2001 K/V tokens, 1001 on each of its 2.*1000"):
        m.admit(D(3, 9, 500, kv_tokens=2001))
    assert "\n" not in str(pytest.raises(PoolCapacityError, m.admit, D(3, 9, 500, kv_tokens=5000)).value)
    assert isinstance(PoolCapacityError("x"), ValueError)
    assert m.admit(D(3, 9, 500, kv_tokens=2000)) is None  # would fit on an empty pool: wait, not refuse


def test_serving_short_requests_and_bad_keys():
    m = SharedPoolManager(2, threshold=100, kv_capacity_tokens=10)
    assert m.admit(D(0, 1, 100, kv_tokens=10_000)) == ()  # short: nothing charged, never refused
    assert m.counters()["pool_ranks"]["0"]["kv_tokens_held"] == 0
    with pytest.raises(ValueError, match=r"\(replica 0, key 1\) is already admitted"):
        m.admit(D(0, 1, 100))
    m.release(0, 1)
    with pytest.raises(ValueError, match=r"unknown request \(replica 0, key 1\)"):
        m.release(0, 1)
    assert m.admit(D(0, 2, 101, kv_tokens=20)) == (0, 1)  # default size: all ranks, 10 each
    assert m.counters()["replicas"]["0"]["activations"] == 1
    with pytest.raises(ValueError, match="one mode"):
        m.assign_step([])


def test_serving_is_deterministic():
    def run():
        m = SharedPoolManager(3, threshold=100, cost_model=Sizes(), kv_capacity_tokens=5000)
        log = []
        for i, d in enumerate(D(i % 4, i, 200 + 700 * (i % 5), kv_tokens=300 * (i % 7)) for i in range(40)):
            log.append(m.admit(d))
            if i % 3 == 2:
                m.release(d.replica, d.key) if log[-1] is not None else None
        return log, m.counters()

    assert run() == run()


@pytest.mark.parametrize("pool", [2, 4, 6, 8])
def test_aligned_blocks_only_and_never_overlapping(pool):
    """The shared pool's training mode: every demand's ranks form an aligned power-of-two block (its
    communicator exists), blocks never overlap, and with ranks free no long demand goes without."""
    m = SharedPoolManager(pool, threshold=100, cost_model=Sizes(), aligned=True)
    twin = SharedPoolManager(pool, threshold=100, cost_model=Sizes(), aligned=True)
    for step in random_steps(7, steps=60):
        got = m.assign_step(step)
        assert got == twin.assign_step(list(reversed(step)))
        used = [r for ranks in got.values() for r in ranks]
        assert len(used) == len(set(used)) and all(0 <= r < pool for r in used)
        for ranks in got.values():
            if ranks:
                size = len(ranks)
                assert size & (size - 1) == 0 and ranks[0] % size == 0 and ranks == tuple(range(ranks[0], ranks[0] + size))
        long = [d for d in step if d.tokens > 100]
        if len(long) <= pool:
            assert all(got[(d.replica, d.key)] for d in long)
