"""Run-time adaptation's pure parts: plan sets over bandwidth ranges, the member chosen at an estimate
(with hysteresis), and the edge's uplink estimate from its own requests."""

from __future__ import annotations

import math

import numpy as np
import pytest

from splitpoint.edge.estimator import LinkEstimator
from splitpoint.partitioner.costmodel import CandidateInput, Link, evaluate, wire_bytes
from splitpoint.partitioner.planset import bits_only_set, choose, plan_set


def cand(kind, cut, codec, head_ms, tail_ms, up, fidelity=1.0):
    return CandidateInput(
        kind, cut, codec, "float32", head_ms, tail_ms, 0.5, 0.5, up, 4000, 1 << 20, fidelity
    )


EDGE = cand("edge-only", None, "float32", 120.0, 0.0, 0)
SERVER = cand("server-only", 0, "int8+zstd", 0.0, 5.0, 150_000)
MID = cand("split", 20, "int8", 40.0, 4.0, 20_000)
LATE = cand("split", 40, "int8", 90.0, 1.0, 2_000)
LOSSY = cand("split", 30, "int4", 30.0, 3.0, 1_000, fidelity=0.9)


def test_each_member_is_the_fastest_inside_its_range_and_ranges_tile_the_axis():
    members = plan_set([EDGE, SERVER, MID, LATE, LOSSY], rtt_ms=20.0, min_fidelity=0.99)
    assert members[0].lo_mbps == 0 and math.isinf(members[-1].hi_mbps)
    for a, b in zip(members, members[1:], strict=False):
        assert a.hi_mbps == b.lo_mbps and a.inp is not b.inp
    assert all(m.inp is not LOSSY for m in members)  # below the fidelity floor
    pool = [EDGE, SERVER, MID, LATE]
    for m in members:
        hi = m.hi_mbps if math.isfinite(m.hi_mbps) else m.lo_mbps * 10
        for b in np.geomspace(max(m.lo_mbps, 0.1) * 1.05, hi / 1.05, 5):
            link = Link("t", b, b, 20.0)
            assert min(pool, key=lambda c: evaluate(c, link).latency_ms) is m.inp, (m.label, b)
    # slow links keep the work on the device, fast ones send the input
    assert members[0].inp is EDGE and members[-1].inp is SERVER


def test_a_set_is_cut_to_its_largest_members_without_leaving_a_gap():
    members = plan_set([EDGE, SERVER, MID, LATE], rtt_ms=20.0, max_members=2)
    assert len(members) == 2
    assert members[0].hi_mbps == members[1].lo_mbps
    with pytest.raises(ValueError, match="fidelity"):
        plan_set([LOSSY], rtt_ms=20.0, min_fidelity=0.99)


def test_choose_switches_only_when_clearly_better():
    pool = [EDGE, MID, SERVER]
    fast = choose(pool, None, 500.0, 5.0)
    slow = choose(pool, None, 0.5, 5.0)
    assert pool[fast] is SERVER and pool[slow] is EDGE
    # find the bandwidth where MID and SERVER tie: around it the current member is kept
    bs = np.geomspace(1, 500, 400)
    tie = next(
        b
        for b in bs
        if evaluate(SERVER, Link("t", b, b, 5)).latency_ms < evaluate(MID, Link("t", b, b, 5)).latency_ms
    )
    assert choose(pool, 1, tie * 1.02, 5.0) == 1  # MID kept just past the boundary
    assert choose(pool, 2, tie / 1.02, 5.0) == 2  # SERVER kept just before it
    assert choose(pool, 1, tie * 4, 5.0) == 2  # far past it: switch


def _feed(est, mbps, n, rtt=10.0, nbytes=100_000):
    for _ in range(n):
        est.observe(nbytes, rtt + 8e-3 * wire_bytes(nbytes) / mbps)


def test_estimator_tracks_the_uplink_and_ignores_one_slow_request():
    est = LinkEstimator()
    est.observe_rtt(10.0)
    _feed(est, 40.0, 10)
    assert est.uplink_mbps == pytest.approx(40.0, rel=0.01)
    est.observe(100_000, 10.0 + 8e-3 * wire_bytes(100_000) / 4.0)  # one request 10x slower
    assert est.uplink_mbps == pytest.approx(40.0, rel=0.01)
    _feed(est, 40.0, 1)
    # a real change (Wi-Fi to LTE, 10x) moves it within `confirm` requests
    _feed(est, 4.0, est.confirm)
    assert est.uplink_mbps == pytest.approx(4.0, rel=0.01)
    _feed(est, 40.0, est.confirm)
    assert est.uplink_mbps == pytest.approx(40.0, rel=0.01)


def test_estimator_treats_outliers_on_both_sides_as_noise():
    est = LinkEstimator()
    est.observe_rtt(10.0)
    _feed(est, 40.0, 5)
    for mbps in (4.0, 400.0, 4.0, 400.0):
        _feed(est, mbps, 1)
    assert est.uplink_mbps == pytest.approx(40.0, rel=0.01)
    assert est.rejected == 4


def test_the_round_trip_is_the_least_recent_one_and_payload_runs_do_not_erase_the_pings():
    est = LinkEstimator()
    est.observe_rtt(40.0)  # the first ping waited for the handshake
    est.observe_rtt(10.0)
    est.observe_rtt(25.0)  # one queued behind a request's payload
    assert est.rtt_ms == 10.0
    _feed(est, 40.0, 50)  # a busy stretch: requests only, each a round trip plus its payload
    assert est.rtt_ms == 10.0 and est.uplink_mbps == pytest.approx(40.0, rel=0.01)
    est.observe(100, 6.0)  # a request faster than any ping: the path is no slower than that
    assert est.rtt_ms == 6.0


def test_bits_only_keeps_the_cut_and_lets_only_the_codec_follow_the_link():
    mid_f16 = cand("split", 20, "float16", 40.0, 4.0, 40_000)
    # int4 packs slower: worth it only where the link is slow
    mid_i4 = CandidateInput("split", 20, "int4", "float32", 40.0, 4.0, 4.0, 2.0, 10_000, 4000, 1 << 20, 0.995)
    pool = [EDGE, SERVER, MID, LATE, mid_f16, mid_i4]
    wifi = Link("wifi", 20.0, 20.0, 20.0)
    best = min(pool, key=lambda c: evaluate(c, wifi).latency_ms)
    members = bits_only_set(pool, wifi, min_fidelity=0.99)
    assert {(m.inp.kind, m.inp.cut) for m in members} == {(best.kind, best.cut)}
    # fewer bytes on the slow links, more where bytes are cheap
    assert [m.inp.up_bytes for m in members] == sorted(m.inp.up_bytes for m in members)
    assert len(members) >= 2 and members[0].inp is mid_i4
