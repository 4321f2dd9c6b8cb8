"""The cost model's arithmetic, the Pareto front against brute force, and the constrained pick."""

from __future__ import annotations

import numpy as np
import pytest

from splitpoint.core.plan import EDGE_ONLY, SERVER_ONLY, SPLIT
from splitpoint.partitioner.costmodel import (
    CandidateInput,
    Link,
    evaluate,
    wire_bytes,
)
from splitpoint.partitioner.pareto import Constraints, InfeasibleError, front, non_dominated, pick

LTE = Link("lte", 5.85, 20.0, 70.0)


def ci(
    kind=SPLIT,
    cut=5,
    codec="int8",
    head=10.0,
    tail=5.0,
    enc=1.0,
    dec=0.5,
    up=10_000,
    down=4_000,
    mem=1 << 20,
    fid=1.0,
):
    return CandidateInput(kind, cut, codec, "float32", head, tail, enc, dec, up, down, mem, fid)


def test_latency_and_throughput_follow_the_stages():
    c = evaluate(ci(), LTE)
    up = 8e-3 * (10_000 + 7 * 66) / 5.85  # 7 TCP segments, each with 66 bytes of framing
    down = 8e-3 * (4_000 + 3 * 66) / 20.0
    assert wire_bytes(10_000) == 10_462 and wire_bytes(0) == 0 and wire_bytes(1) == 67
    assert c.latency_ms == pytest.approx(10 + 1 + up + 70 + down + 0.5 + 5)
    assert c.throughput_ips == pytest.approx(1000 / max(11, up, 5.5, down))
    assert c.bytes_per_inference == 14_000 and c.edge_ms == 11
    lossy = evaluate(ci(), Link("x", 5.85, 20.0, 70.0, loss=0.5))
    assert lossy.breakdown["uplink_ms"] == pytest.approx(2 * up)
    edge = evaluate(ci(kind=EDGE_ONLY, cut=None, head=40.0, tail=0, enc=0, dec=0, up=0, down=0), LTE)
    assert edge.latency_ms == 40 and edge.transfer_ms == 0 and edge.throughput_ips == pytest.approx(25)
    # the requests in flight that throughput needs (Little's law), which the plan records for `edge run`
    assert c.window == int(np.ceil(c.latency_ms * c.throughput_ips / 1000)) and c.window > 4
    assert c.to_dict()["window"] == c.window and edge.window == 1


def test_edge_run_takes_the_plan_s_window(tmp_path):
    """At the default window of 4, a plan predicted at 2,665/s behind a 70 ms round trip served 57/s."""
    import json

    import onnx

    from splitpoint.core import zoo
    from splitpoint.core.graph import open_model
    from splitpoint.core.plandir import write_plan
    from splitpoint.edge.config import planned_window

    (tmp_path / "plan.json").write_text("{not a plan")
    assert planned_window(tmp_path) == 4  # the client says what is wrong with it
    plan, path = tmp_path / "p", tmp_path / "m.onnx"
    onnx.save(zoo.build("resnet18", width=0.25, resolution=32), str(path))
    h = open_model(path)
    for predicted, expect in (({"window": 9}, 9), ({"window": 500}, 64), ({}, 4), ({"window": "x"}, 4)):
        write_plan(h, plan, cut=h.cuts()[5], predicted=predicted, force=True)
        assert planned_window(plan) == expect, (predicted, json.loads((plan / "plan.json").read_text()))


def brute_force(points):
    keep = []
    for i, p in enumerate(points):
        dominated = any(
            all(q[k] <= p[k] for k in range(len(p))) and any(q[k] < p[k] for k in range(len(p)))
            for j, q in enumerate(points)
            if j != i
        )
        if not dominated:
            keep.append(i)
    return keep


@pytest.mark.parametrize("seed", range(20))
def test_non_dominated_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(1, 80)), int(rng.integers(1, 6))
    pts = rng.integers(0, 6, (n, d)).astype(float)  # small integers: many ties and duplicates
    assert sorted(non_dominated(pts).tolist()) == brute_force(pts.tolist())


def _candidates(seed=0, n=60):
    rng = np.random.default_rng(seed)
    out = [
        evaluate(
            ci(kind=EDGE_ONLY, cut=None, head=80.0, tail=0, enc=0, dec=0, up=0, down=0, mem=50 << 20), LTE
        ),
        evaluate(ci(kind=SERVER_ONLY, cut=0, head=0, tail=8.0, up=600_000, mem=600_000, fid=1.0), LTE),
    ]
    for k in range(n):
        out.append(
            evaluate(
                ci(
                    cut=k + 1,
                    codec=str(rng.choice(["int8", "float32", "int4"])),
                    head=float(rng.uniform(1, 60)),
                    tail=float(rng.uniform(1, 20)),
                    up=int(rng.integers(1000, 500_000)),
                    mem=int(rng.integers(1 << 20, 40 << 20)),
                    fid=float(rng.choice([1.0, 0.99, 0.9, 0.6])),
                ),
                LTE,
            )
        )
    return out


def test_front_is_exactly_the_non_dominated_set():
    cands = _candidates()
    f = front(cands)
    objs = [c.objectives() for c in cands]
    expected = {id(cands[i]) for i in brute_force(objs)}
    assert {id(c) for c in f} == expected
    assert [c.latency_ms for c in f] == sorted(c.latency_ms for c in f)


_KEY = {
    "latency": lambda c: c.latency_ms,
    "bytes": lambda c: c.bytes_per_inference,
    "throughput": lambda c: -c.throughput_ips,
}


@pytest.mark.parametrize(
    "cons, feasible_expected",
    [
        (Constraints(), True),
        (Constraints(min_fidelity=0.99), True),
        (Constraints(max_latency_ms=150, min_fidelity=0.9), True),
        (Constraints(max_edge_memory_bytes=10 << 20), True),
        (Constraints(objective="bytes"), True),
        (Constraints(objective="throughput", min_fidelity=0.99), True),
        (Constraints(max_latency_ms=1.0), False),
        (Constraints(max_latency_ms=50, max_edge_memory_bytes=1 << 20), False),
    ],
)
def test_pick_honours_constraints_and_lies_on_the_front(cons, feasible_expected):
    cands = _candidates(seed=3)
    feasible = [c for c in cands if not cons.violations(c)]
    # each case states which branch it exercises, so no case can pass by skipping its asserts
    assert bool(feasible) is feasible_expected
    if not feasible_expected:
        with pytest.raises(InfeasibleError):
            pick(cands, cons)
        return
    p = pick(cands, cons)
    assert not cons.violations(p)
    assert id(p) in {id(c) for c in front(cands)}
    assert _KEY[cons.objective](p) == min(_KEY[cons.objective](c) for c in feasible)


def test_infeasible_constraints_name_the_closest_candidates():
    cands = _candidates(seed=1)
    with pytest.raises(InfeasibleError) as e:
        pick(cands, Constraints(max_latency_ms=1.0, min_fidelity=0.999))
    msg = str(e.value)
    assert "no candidate meets the constraints" in msg and "ms > 1 ms" in msg and "\n" not in msg
    assert len(e.value.closest) == 3


def test_front_equals_brute_force_at_a_thousand_candidates():
    # the size the planner meets (cuts x codecs); its timing is benchmarks/bench_planner.py's
    cands = [c for s in range(17) for c in _candidates(seed=s)]
    assert len(cands) > 1000
    objs = [c.objectives() for c in cands]
    assert len(set(objs)) < len(objs)  # ties included: the baselines recur in every seed
    f = front(cands)
    assert {id(c) for c in f} == {id(cands[i]) for i in brute_force(objs)}
    assert [c.latency_ms for c in f] == sorted(c.latency_ms for c in f)


def test_a_missed_memory_limit_reads_as_a_true_comparison():
    """At one decimal a 0.82 MiB candidate against a 0.75 MiB limit read '0.8 MiB > 0.8 MiB', and against
    0.55 as '0.6 MiB > 0.5 MiB' (the limit shown below what was given)."""
    c = evaluate(ci(cut=3, head=1.0, tail=1.0, up=1000, mem=858_000), LTE)
    for limit, shown in ((0.75, "0.75 MiB"), (0.55, "0.55 MiB")):
        (text,) = Constraints(max_edge_memory_bytes=int(limit * 2**20)).misses(c)
        assert text == f"edge memory 0.8183 MiB > {shown}", text


def test_the_pick_is_measured_in_rounds_that_double_and_stays_the_first_in_order_at_the_floor():
    """A detector whose every lossy codec changes its count: the best candidates fell below the floor one
    after another, measured one a round (68 rounds in 45 s, and on). Rounds now measure 1, 2, 4, ... of
    the best, never past the first already measured at the floor; the pick is the same."""
    from dataclasses import replace

    from splitpoint.partitioner.planner import unmeasured_pick

    cands = [ci(cut=k, head=float(k), fid=None) for k in range(1, 41)]  # faster the earlier the cut
    truth = {k: (1.0 if k == 30 else 0.5) for k in range(1, 41)}  # only cut 30 meets 0.99
    rounds, count = [], 1
    limits = Constraints(min_fidelity=0.99)
    while need := unmeasured_pick(cands, [LTE], limits, 0.99, count):
        rounds.append(len(need))
        cands = [
            replace(c, fidelity=truth[c.cut]) if (c.cut, "float32", c.codec) in need else c for c in cands
        ]
        count = min(2 * count, 64)
    assert rounds == [1, 2, 4, 8, 16]  # 5 rounds where one at a time took 30; one more measured than needed
    measured = [c.cut for c in cands if c.fidelity is not None]
    assert measured == list(range(1, 32))
    assert pick([evaluate(c, LTE) for c in cands if c.fidelity is not None], limits).inp.cut == 30
