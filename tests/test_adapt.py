"""Run-time adaptation's pure parts: plan sets over bandwidth ranges, the member chosen at an estimate
(with hysteresis), and the edge's uplink estimate from its own requests."""

from __future__ import annotations

import math

import numpy as np
import pytest

from splitpoint.edge.estimator import LinkEstimator
from splitpoint.partitioner.costmodel import CandidateInput, Link, evaluate, wire_bytes
from splitpoint.partitioner.planset import bits_only_set, choose, plan_set, short_of_rate


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


def test_a_rate_the_set_cannot_serve_is_located_on_the_bandwidth_axis():
    pool = [EDGE, SERVER, MID, LATE]
    members = plan_set(pool, rtt_ms=20.0, rate_ips=5)
    assert short_of_rate(members, 5, rtt_ms=20.0) is None  # the edge alone serves 8/s
    members = plan_set(pool, rtt_ms=20.0, rate_ips=50)
    short = short_of_rate(members, 50, rtt_ms=20.0)
    assert short is not None and not short.everywhere
    # slow links leave only the edge's 8/s, fast ones the server's: the shortfall is the low end
    assert short.lo_mbps == pytest.approx(0.1) and 1 < short.hi_mbps < 1000
    fast = Link("t", short.hi_mbps * 1.1, short.hi_mbps * 1.1, 20.0)
    assert max(evaluate(m.inp, fast).throughput_ips for m in members) >= 50 * 1.2
    short = short_of_rate(plan_set(pool, rtt_ms=20.0, rate_ips=10_000), 10_000, rtt_ms=20.0)
    assert short is not None and short.everywhere
    top = Link("t", 10_000, 10_000, 20.0)
    assert short.most_ips == pytest.approx(max(evaluate(c, top).throughput_ips for c in pool), rel=0.05)


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


def _feed(est, mbps, n, rtt=10.0, nbytes=100_000, t0=0.0, every=0.2, wait=0.0):
    """``n`` requests, one every ``every`` s from ``t0``, each a round trip plus its payload (plus
    ``wait``: time the reply sat waiting for a busy edge's thread); the time after the last."""
    for k in range(n):
        est.observe(nbytes, wait + rtt + 8e-3 * wire_bytes(nbytes) / mbps, now=t0 + k * every)
    return t0 + n * every


def _ping(est, rtt, n, t0=0.0, every=0.2):
    for k in range(n):
        est.observe_rtt(rtt, now=t0 + k * every)
    return t0 + n * every


def test_estimator_tracks_the_uplink_and_ignores_one_slow_request():
    est = LinkEstimator()
    _ping(est, 10.0, 5)
    t = _feed(est, 40.0, 10)
    assert est.uplink_mbps == pytest.approx(40.0, rel=0.01)
    est.observe(100_000, 10.0 + 8e-3 * wire_bytes(100_000) / 4.0, now=t)  # one request 10x slower
    assert est.uplink_mbps == pytest.approx(40.0, rel=0.01)
    t = _feed(est, 40.0, 1, t0=t + 0.2)
    # a real change (Wi-Fi to LTE, 10x) takes the estimate over once half the window is new
    half = int(est.horizon_s / 0.2 + 1) // 2 + 1
    t = _feed(est, 4.0, half, t0=t)
    assert est.uplink_mbps == pytest.approx(4.0, rel=0.01)
    _feed(est, 40.0, half, t0=t)
    assert est.uplink_mbps == pytest.approx(40.0, rel=0.01)


def test_estimator_treats_outliers_on_both_sides_as_noise():
    est = LinkEstimator()
    _ping(est, 10.0, 5)
    t = _feed(est, 40.0, 5)
    for mbps in (4.0, 400.0, 4.0, 400.0):
        t = _feed(est, mbps, 1, t0=t)
    assert est.uplink_mbps == pytest.approx(40.0, rel=0.01)


def test_large_requests_outweigh_small_ones_whose_time_is_mostly_jitter():
    """A 27 KiB request crosses an 18.9 Mbit/s link in 11 ms, and 10-30 ms of jitter and edge wake-ups
    on its network time read it as 6-10 Mbit/s: by count, eight of them outvoted two 150 KiB probes
    that read the link right, and the edge stayed on the member for a slow link for three windows.
    Weighted by the bits each carried, the probes decide; one slow probe among them still does not."""
    est = LinkEstimator()
    t = _ping(est, 20.0, 5)
    for k in range(8):
        est.observe(27_000, 20.0 + 8e-3 * wire_bytes(27_000) / 18.9 + 12.0 + 2 * k, now=t + 0.2 * k)
    by_count = est.uplink_mbps
    assert by_count is not None and by_count < 10.0  # what the small requests alone read
    _feed(est, 18.9, 2, rtt=20.0, nbytes=150_000, t0=t + 1.6)
    assert est.uplink_mbps == pytest.approx(18.9, rel=0.01)
    slow = LinkEstimator()
    t = _ping(slow, 20.0, 5)
    t = _feed(slow, 18.9, 3, rtt=20.0, nbytes=150_000, t0=t)
    _feed(slow, 1.0, 1, rtt=20.0, nbytes=150_000, t0=t)  # a retransmission
    assert slow.uplink_mbps == pytest.approx(18.9, rel=0.01)


def test_weighted_median_is_the_plain_median_at_equal_weights():
    from splitpoint.edge.estimator import weighted_median

    assert weighted_median([(3.0, 1.0), (1.0, 1.0), (2.0, 1.0)]) == 2.0
    assert weighted_median([(4.0, 1.0), (1.0, 1.0), (2.0, 1.0), (3.0, 1.0)]) == 2.5
    assert weighted_median([(1.0, 1.0), (9.0, 5.0), (2.0, 1.0)]) == 9.0


def test_a_busy_edge_waiting_on_every_reply_does_not_read_as_a_slow_link():
    """A saturated head delays the handling of every reply, pings' and requests' alike (30 ms here,
    against a 4 ms transfer): the wait cancels out of the uplink, and shows in the round trip."""
    est = LinkEstimator()
    t = _ping(est, 20.0 + 30.0, 5)
    _feed(est, 40.0, 10, rtt=20.0, nbytes=20_000, t0=t, wait=30.0)
    assert est.uplink_mbps == pytest.approx(40.0, rel=0.01)
    assert est.rtt_ms == pytest.approx(50.0)


def test_the_round_trip_is_the_recent_pings_median_and_payload_runs_do_not_erase_them():
    est = LinkEstimator()
    est.observe_rtt(40.0, now=0.0)  # the first ping waited for the handshake
    est.observe_rtt(10.0, now=0.1)
    est.observe_rtt(11.0, now=0.2)
    est.observe_rtt(9.0, now=0.3)
    est.observe_rtt(25.0, now=0.4)  # one queued behind a request's payload
    assert est.rtt_ms == 11.0
    _feed(est, 40.0, 50, rtt=11.0, t0=0.5)  # a busy stretch: requests only, each with its payload
    assert est.rtt_ms == 11.0 and est.uplink_mbps == pytest.approx(40.0, rel=0.03)
    # the link changes (Wi-Fi to LTE): the old pings leave the window, the round trip follows
    for k in range(20):
        est.observe_rtt(70.0, now=11.0 + 0.2 * k)
        est.observe(100_000, 70.0 + 8e-3 * wire_bytes(100_000) / 4.0, now=11.1 + 0.2 * k)
    assert est.rtt_ms == 70.0 and est.uplink_mbps == pytest.approx(4.0, rel=0.01)
    # requests that carry too little to time (faster than the round trip's median) are not slow ones
    _feed(est, 1e6, 40, rtt=65.0, nbytes=100, t0=15.0)
    assert est.uplink_mbps == pytest.approx(4.0, rel=0.01)  # unknown: the last estimate stands


def test_a_faster_path_takes_over_the_round_trip_within_two_samples():
    """LTE (70 ms, 5.85 Mbit/s) gives way to Wi-Fi (20 ms, 18.9): at a ping a second the last five pings
    make the median, so for seconds part of the old 70 ms was taken off Wi-Fi's network times and a
    window's requests (four of 27 KB, one 150 KB probe) read 21.5 Mbit/s, past the member boundary the
    set had at 20. Two samples well under the old round trip restart it; one alone (jitter) does not."""
    est = LinkEstimator()
    t = 0.0
    for k in range(10):  # LTE: a ping a second, requests at 5/s
        est.observe_rtt(70.0 + (-1) ** k * 8.0, now=t + k)
        _feed(est, 5.85, 5, rtt=70.0, nbytes=27_000, t0=t + k + 0.1)
    assert est.rtt_ms == pytest.approx(70.0, abs=8.0)
    est.observe_rtt(30.0, now=10.0)  # one ping in the jitter's lower tail: the round trip stands
    assert est.rtt_ms == pytest.approx(70.0, abs=8.0)
    t = 12.0  # Wi-Fi from here
    est.observe_rtt(22.0, now=t)
    for k in range(10):  # two seconds of requests, every fifth a probe; no second ping yet
        big = k % 5 == 4
        _feed(est, 18.9, 1, rtt=20.0, nbytes=150_000 if big else 27_000, t0=t + 0.1 + 0.2 * k)
    assert est.rtt_ms == pytest.approx(21.0, abs=2.0)
    assert est.uplink_mbps == pytest.approx(18.9, rel=0.1)


def test_a_burst_on_the_old_link_does_not_hold_the_estimate_for_a_whole_window():
    """48 requests in a quarter second on a fast link, then a link 12x slower at 25 requests a second:
    with every sample of the last 2 s voting, the fast burst outvoted the slow link's requests for
    nearly two seconds (its first 48). A window of at most the last 32 samples lets the new link take
    it over after 17; one slow request still moves nothing."""
    est = LinkEstimator()
    t = _ping(est, 4.0, 5)
    t = _feed(est, 130.0, 48, rtt=4.0, t0=t, every=0.005)
    t = _feed(est, 130.0 / 12, 1, rtt=4.0, t0=t, every=0.04)
    assert est.uplink_mbps == pytest.approx(130.0, rel=0.01)
    _feed(est, 130.0 / 12, 16, rtt=4.0, t0=t, every=0.04)
    assert est.uplink_mbps == pytest.approx(130.0 / 12, rel=0.01)


def test_a_request_unanswered_at_its_timeout_bounds_the_uplink_until_one_completes():
    """A link fallen to next to nothing completes no request: the estimate, made of completed ones, held
    its last value and a plan set stayed on a member that sends. A request unanswered after its timeout
    bounds the uplink at its bytes over the wait, apart from the estimate (taken in as a sample it held
    the client's own sending back, and after one lost reply nothing was sent again), until a request
    completes."""
    est = LinkEstimator()
    t = _ping(est, 10.0, 5)
    t = _feed(est, 40.0, 10, t0=t)
    assert est.uplink_mbps == pytest.approx(40.0, rel=0.01) and est.ceiling_mbps is None
    est.unanswered(20_000, 2000.0)  # still unanswered 2 s after it was sent
    bound = 8e-3 * wire_bytes(20_000) / (2000.0 - 10.0)
    assert est.ceiling_mbps == pytest.approx(bound)
    assert est.uplink_mbps == pytest.approx(40.0, rel=0.01)  # what the send gate reads is untouched
    est.unanswered(20_000, 4000.0)
    assert est.ceiling_mbps == pytest.approx(8e-3 * wire_bytes(20_000) / (4000.0 - 10.0))  # the least
    _feed(est, 40.0, 1, t0=t + 5.0)  # one gets through
    assert est.ceiling_mbps is None
    # before any ping is answered there is no round trip to take off: no bound
    fresh = LinkEstimator()
    fresh.unanswered(20_000, 10_000.0)
    assert fresh.ceiling_mbps is None and not fresh.started and fresh.rtt_ms is None


def test_a_replys_way_back_is_not_read_as_upload_time():
    """1.5 Mbit/s up, 3.18 down, 18.5 KB requests answered with 4.3 KB: the reply's 11 ms on the downlink
    sat in each network time and the uplink read 1.33 (-12 %). With the link's down/up ratio known (a
    plan set's), the reply counts as that many times fewer uplink bits; the round trip's age is told."""
    up, down, rtt, req, reply = 1.5, 3.18, 20.0, 18_500, 4_300

    def network_ms() -> float:
        return rtt + 8e-3 * wire_bytes(req) / up + 8e-3 * wire_bytes(reply) / down

    known, unknown = LinkEstimator(down_ratio=down / up), LinkEstimator()
    for est in (known, unknown):
        t = _ping(est, rtt, 5)
        for k in range(10):
            est.observe(req, network_ms(), now=t + 0.2 * k, reply_bytes=reply)
    assert known.uplink_mbps == pytest.approx(up, rel=0.01)
    assert unknown.uplink_mbps == pytest.approx(1.33, rel=0.02)  # the reply's time left in: as before
    assert known.rtt_age_s(now=t + 3.0) == pytest.approx(3.0 + 0.2, abs=0.01)  # the last ping, 0.2 s before t
    assert LinkEstimator().rtt_age_s() is None


def _queued_stream(est, mbps, n, nbytes, every, rtt_ms):
    """``n`` requests sent every ``every`` s onto a FIFO link of ``mbps``, faster than it carries them:
    each waits for the one before it to leave the edge, and its reply comes a round trip after."""
    free = 0.0
    for k in range(n):
        sent = k * every
        start = max(sent, free)
        free = start + 8e-3 * wire_bytes(nbytes) / mbps / 1e3
        network_ms = (free - sent) * 1e3 + rtt_ms
        est.observe(nbytes, network_ms, now=sent + network_ms / 1e3, sent_at=sent)
    return n * every


def test_a_queue_on_the_link_does_not_read_as_a_slower_link():
    """LTE's 5.85 Mbit/s given 300 KB five times a second (twice what it carries): each request's network
    time holds the wait behind the ones before, and grows; the transfer between arrivals does not."""
    est = LinkEstimator()
    _ping(est, 70.0, 5)
    _queued_stream(est, 5.85, 60, 300_000, 0.2, 70.0)
    assert est.uplink_mbps == pytest.approx(5.85, rel=0.01)
    naive = LinkEstimator()  # the same samples without send times: the queue reads as a slow link
    _ping(naive, 70.0, 5)
    free = 0.0
    for k in range(60):
        start = max(k * 0.2, free)
        free = start + 8e-3 * wire_bytes(300_000) / 5.85 / 1e3
        naive.observe(300_000, (free - k * 0.2) * 1e3 + 70.0, now=free)
    assert naive.uplink_mbps < 0.2 * 5.85
    # unqueued requests (one every second, each 0.4 s on the link) are read from their network time
    est2 = LinkEstimator()
    _ping(est2, 70.0, 5)
    _queued_stream(est2, 5.85, 20, 300_000, 1.0, 70.0)
    assert est2.uplink_mbps == pytest.approx(5.85, rel=0.01)


def test_the_wait_behind_what_is_on_the_link():
    est = LinkEstimator()
    assert est.wait_s(100_000) is None  # nothing measured: no estimate to judge by
    _ping(est, 20.0, 5)
    _feed(est, 8.0, 10, rtt=20.0)
    assert est.in_pipe == 0
    alone = est.wait_s(100_000)
    assert alone == pytest.approx(8 * wire_bytes(100_000) / 8e6 + 0.020, rel=0.01)
    for _ in range(9):
        est.sent(100_000)
    assert est.wait_s(100_000) == pytest.approx(10 * (alone - 0.020) + 0.020, rel=0.01)
    for _ in range(9):
        est.cleared(100_000)
    assert est.in_pipe == 0 and est.wait_s(100_000) == pytest.approx(alone)
    est.cleared(100_000)  # a second clear of one request (a late reply after a dropped connection)
    assert est.in_pipe == 0


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
