"""Plan sets: the few candidates that are each the best for some range of uplink bandwidth, so that an
edge can switch between them as its link changes without asking anyone. Pure functions over the
measured candidate facts; the run-time choice (``choose``) is the same cost model the planner uses."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .costmodel import Candidate, CandidateInput, Link, evaluate

# A member must be predicted to serve this many times the arrival rate: at 1x a queue grows without
# bound on any slow spell, and the throughput predictions are good to about 10 %.
RATE_HEADROOM = 1.2


def fastest(cands: list[CandidateInput], link: Link, rate_ips: float | None = None) -> CandidateInput:
    """The candidate to run on ``link`` when requests arrive at ``rate_ips`` per second (None: one at a
    time): the lowest latency among those predicted to keep up with the rate; if none does, the one
    that comes closest (highest throughput), since a queue then grows whatever runs and grows slowest
    there. Latency alone would pick a member that is fast for one request and drowns at the rate."""
    return cands[_to_run([evaluate(c, link) for c in cands], rate_ips)]


def _to_run(evs: list[Candidate], rate_ips: float | None) -> int:
    """``fastest``'s choice among candidates already evaluated on the link, as an index."""
    order = list(range(len(evs)))
    if rate_ips:
        keep = [i for i in order if evs[i].throughput_ips >= rate_ips * RATE_HEADROOM]
        if not keep:
            return max(order, key=lambda i: (evs[i].throughput_ips, -evs[i].latency_ms))
        order = keep
    return min(order, key=lambda i: evs[i].latency_ms)


@dataclass(frozen=True)
class Member:
    """One member of a plan set and the uplink range (Mbit/s, at the set's reference RTT) where it is
    predicted fastest; ``lo_mbps`` of the first member is 0, ``hi_mbps`` of the last is infinite."""

    inp: CandidateInput
    lo_mbps: float
    hi_mbps: float

    @property
    def inside_mbps(self) -> float:
        """An uplink well inside the range (its middle in log bandwidth where both ends are finite)."""
        if self.lo_mbps > 0 and math.isfinite(self.hi_mbps):
            return math.sqrt(self.lo_mbps * self.hi_mbps)
        if math.isfinite(self.hi_mbps):
            return self.hi_mbps / 2
        return max(self.lo_mbps * 2, 1.0)

    @property
    def label(self) -> str:
        return evaluate(self.inp, Link("x", 1.0, 1.0, 0.0)).label


def sweep_links(lo_mbps: float, hi_mbps: float, points: int, rtt_ms: float, down_ratio: float) -> list[Link]:
    """Links from ``lo_mbps`` to ``hi_mbps`` uplink, log-spaced, downlink ``down_ratio`` times faster."""
    return [
        Link(f"{b:.3g} Mbit/s", b, b * down_ratio, rtt_ms) for b in np.geomspace(lo_mbps, hi_mbps, points)
    ]


def plan_set(
    inputs: list[CandidateInput],
    rtt_ms: float,
    down_ratio: float = 1.0,
    min_fidelity: float = 0.0,
    max_members: int = 6,
    lo_mbps: float = 0.1,
    hi_mbps: float = 10_000.0,
    points: int = 241,
    rate_ips: float | None = None,
) -> list[Member]:
    """The candidate to run (``fastest``) at each bandwidth of a sweep, merged into ranges, slowest link
    first. Above ``max_members`` the member with the narrowest range (in log bandwidth) is dropped and
    the sweep repeated over those left, so every bandwidth keeps a member that is best among them."""
    pool = _at_floor(inputs, min_fidelity)
    links = sweep_links(lo_mbps, hi_mbps, points, rtt_ms, down_ratio)
    while True:
        winners = [fastest(pool, link, rate_ips) for link in links]
        runs: list[tuple[CandidateInput, int, int]] = []  # (candidate, first index, last index)
        for i, w in enumerate(winners):
            if runs and runs[-1][0] is w:
                runs[-1] = (w, runs[-1][1], i)
            else:
                runs.append((w, i, i))
        distinct = list(dict.fromkeys(w for w, _, _ in runs))
        if len(distinct) <= max_members:
            break
        width = {c: sum(b - a + 1 for w, a, b in runs if w is c) for c in distinct}
        pool = [c for c in pool if c in width and c is not min(width, key=lambda c: width[c])]
    out: list[Member] = []
    for k, (w, a, _b) in enumerate(runs):
        lo = 0.0 if k == 0 else _edge(links[a - 1].uplink_mbps, links[a].uplink_mbps)
        hi = (
            math.inf
            if k == len(runs) - 1
            else _edge(links[runs[k + 1][1] - 1].uplink_mbps, links[runs[k + 1][1]].uplink_mbps)
        )
        out.append(Member(w, lo, hi))
    return out


@dataclass(frozen=True)
class Shortfall:
    """Where a set's members cannot keep up with the arrival rate (at ``RATE_HEADROOM``): there the one
    that comes closest runs, and requests queue whatever runs."""

    lo_mbps: float  # the slowest and fastest uplink of the sweep where no member keeps up
    hi_mbps: float
    everywhere: bool  # no member keeps up at any uplink of the sweep
    most_ips: float  # the highest throughput any member is predicted to reach there


def short_of_rate(
    members: list[Member],
    rate_ips: float,
    rtt_ms: float,
    down_ratio: float = 1.0,
    lo_mbps: float = 0.1,
    hi_mbps: float = 10_000.0,
    points: int = 241,
) -> Shortfall | None:
    """The uplinks of ``plan_set``'s sweep where no member is predicted to serve ``rate_ips`` with the
    headroom, or None where one does everywhere: a rate the set cannot meet is said, not left to be
    found in production as a growing queue."""
    need = rate_ips * RATE_HEADROOM
    short: list[tuple[float, float]] = []
    for link in sweep_links(lo_mbps, hi_mbps, points, rtt_ms, down_ratio):
        most = max(evaluate(m.inp, link).throughput_ips for m in members)
        if most < need:
            short.append((link.uplink_mbps, most))
    if not short:
        return None
    return Shortfall(short[0][0], short[-1][0], len(short) == points, max(m for _, m in short))


def _at_floor(inputs: list[CandidateInput], min_fidelity: float) -> list[CandidateInput]:
    pool = [c for c in inputs if c.fidelity is not None and c.fidelity >= min_fidelity]
    if not pool:
        raise ValueError(f"no measured candidate reaches fidelity {min_fidelity:g}")
    return pool


def _edge(a: float, b: float) -> float:
    return math.sqrt(a * b)  # the boundary between two sweep points, in log bandwidth


def choose(
    members: list[CandidateInput],
    current: int | None,
    uplink_mbps: float,
    rtt_ms: float,
    down_ratio: float = 1.0,
    hysteresis: float = 0.15,
    rate_ips: float | None = None,
) -> int:
    """The member to use at an estimated uplink and RTT (and arrival rate): ``fastest``'s, unless the
    current one is predicted within ``hysteresis`` of it in latency and still keeps up with the rate
    (so that a bandwidth sitting on a boundary does not flap)."""
    link = Link("estimate", uplink_mbps, uplink_mbps * down_ratio, rtt_ms)
    evs = [evaluate(c, link) for c in members]
    best = _to_run(evs, rate_ips)
    if current is None or current == best:
        return best
    cur, top = evs[current], evs[best]
    if rate_ips and cur.throughput_ips < rate_ips * RATE_HEADROOM * (1.0 - hysteresis):
        # the current one cannot keep up: move to one that does, or (none does) to one that serves
        # clearly more; two members that both fall short and trade places as the estimate wobbles
        # would otherwise flap
        if top.throughput_ips >= rate_ips * RATE_HEADROOM:
            return best
        return best if top.throughput_ips > cur.throughput_ips * (1.0 + hysteresis) else current
    return best if top.latency_ms < cur.latency_ms * (1.0 - hysteresis) else current


def bits_only_set(
    inputs: list[CandidateInput], reference: Link, min_fidelity: float = 0.0, rate_ips: float | None = None
) -> list[Member]:
    """QuantPipe's policy as a plan set: the cut (and head precision) stays the one to run on the
    ``reference`` link, and only the codec of the cut tensor follows the bandwidth."""
    pool = _at_floor(inputs, min_fidelity)
    best = fastest(pool, reference, rate_ips)
    same = [c for c in pool if (c.kind, c.cut, c.head_weights) == (best.kind, best.cut, best.head_weights)]
    down_ratio = reference.downlink_mbps / reference.uplink_mbps
    return plan_set(same, reference.rtt_ms, down_ratio, min_fidelity, rate_ips=rate_ips)
