"""Cuts and codecs for a chain of devices, chosen jointly: the latency x throughput front, exactly.

A chain of K+1 devices runs the model in K+1 consecutive segments of its topological order, split at
positions 0 <= p1 <= ... <= pK < n (p = number of compute nodes before the cut; an equal pair leaves
a device empty, forwarding what it receives). Each hop has a codec. With requests pipelined, each
device and each link is a stage of the pipeline: throughput is 1 / the busiest stage (the
*bottleneck*), latency the sum of every stage on the way and the replies' way back.

Minimising latency under a bottleneck limit T is a shortest path over (hop, cut position, codec):
a dynamic programme of K steps, each a min over (position, codec) pairs, vectorised in numpy. The
front is then found exactly by lowering T: the fastest plan with no limit has some bottleneck B; the
fastest plan whose bottleneck is below B is the next point, and so on until nothing fits. Each step
yields one front point, so the search costs at most (front size) x K x (positions x codecs)^2 operations,
not an enumeration of every K-tuple of cuts; each step reads only the band of starts and ends that the
limit leaves feasible, which narrows as the limit falls.

Pure functions over plain arrays (``ChainCosts``); everything in them is measured (profiles, encoded
sizes, codec speeds) or a network profile's figure, so every output is derived and labelled so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .costmodel import Link, downlink_ms, uplink_ms

INF = math.inf
ANY, EMPTY, BUSY = "any", "empty", "busy"  # what a stage may be: either, forwarding only, running nodes


@dataclass(frozen=True)
class ChainCosts:
    """Everything the chain's cost model needs, as arrays over cut positions and codecs.

    ``positions`` are the candidate cut positions, increasing, first 0 (nothing before: the raw inputs
    cross) and last n (everything before). Per device d: ``prefix_ms[d][i]``, the time to run the first
    ``positions[i]`` nodes there (so a segment's time is a difference); ``enc_ms[d][i, k]`` /
    ``dec_ms[d][i, k]``, encoding / decoding what crosses position i with codec k there. Per position:
    ``bytes[i, k]`` sent, ``weights[i]`` weight bytes before it, ``act[i]`` the bytes crossing it as held;
    ``act_peak[i, i']`` the activation bytes alive at once in the segment between positions i and i' (None:
    the larger of its ends). Per device, ``memory_overhead`` is what a session holds besides weights and
    activations (measured by its profile). ``reply_bytes`` come back over every hop. ``memory_limit`` and
    ``max_hop_bytes`` are constraints the search obeys exactly (a plan that breaks one is never a
    solution)."""

    devices: tuple[str, ...]
    links: tuple[Link, ...]
    codecs: tuple[str, ...]
    positions: np.ndarray  # (m,)
    prefix_ms: np.ndarray  # (devices, m)
    enc_ms: np.ndarray  # (devices, m, codecs)
    dec_ms: np.ndarray  # (devices, m, codecs)
    bytes: np.ndarray  # (m, codecs)
    weights: np.ndarray  # (m,)
    act: np.ndarray  # (m,)
    reply_bytes: float
    memory_limit: tuple[float | None, ...] = ()  # bytes per device; () or None: no limit
    # per device: the runtime's own time per request (measured; every device on the way pays it,
    # a forwarding one too); () counts none
    overhead_ms: tuple[float, ...] = ()
    # bytes one hop may carry per request, both ways: its cut tensor and the reply (a metered or narrow
    # link); None: no limit
    max_hop_bytes: float | None = None
    act_peak: np.ndarray | None = None  # (m, m)
    memory_overhead: tuple[float, ...] = ()  # bytes per device; () counts none

    def __post_init__(self) -> None:
        d, m, c = len(self.devices), len(self.positions), len(self.codecs)
        if len(self.links) != d - 1:
            raise ValueError(f"{d} devices need {d - 1} links, got {len(self.links)}")
        for name, per_device in (("overheads", self.overhead_ms), ("memory overheads", self.memory_overhead)):
            if per_device and len(per_device) != d:
                raise ValueError(f"{d} devices need {d} {name}, got {len(per_device)}")
        if self.act_peak is not None and np.shape(self.act_peak) != (m, m):
            raise ValueError(f"act_peak has shape {np.shape(self.act_peak)}, expected {(m, m)}")
        for name, arr, shape in (
            ("prefix_ms", self.prefix_ms, (d, m)),
            ("enc_ms", self.enc_ms, (d, m, c)),
            ("dec_ms", self.dec_ms, (d, m, c)),
            ("bytes", self.bytes, (m, c)),
            ("weights", self.weights, (m,)),
            ("act", self.act, (m,)),
        ):
            if np.shape(arr) != shape:
                raise ValueError(f"{name} has shape {np.shape(arr)}, expected {shape}")


@dataclass
class ChainPlan:
    """One choice of cuts and codecs, with its predicted (derived) figures."""

    cuts: tuple[int, ...]  # indices into ChainCosts.positions, one per hop
    codecs: tuple[int, ...]  # indices into ChainCosts.codecs, one per hop
    latency_ms: float
    bottleneck_ms: float
    stage_ms: list[float]  # per device: decode + segment + encode + the runtime's own time per request
    hop_up_ms: list[float]
    hop_down_ms: list[float]
    hop_bytes: list[int]
    memory_bytes: list[int]  # per device: segment weights + its activations + its session's overhead
    fidelity: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def throughput_ips(self) -> float:
        return 1000.0 / self.bottleneck_ms if self.bottleneck_ms > 0 else INF


def _up(costs: ChainCosts, hop: int) -> np.ndarray:
    """(m, codecs): uplink ms of hop ``hop`` for every position and codec (worked out once per costs)."""
    cache = costs.__dict__.setdefault("_up_cache", {})
    if hop not in cache:
        link = costs.links[hop]
        cache[hop] = np.vectorize(lambda b: uplink_ms(b, link) if b > 0 else 0.0, otypes=[float])(costs.bytes)
    return cache[hop]


def evaluate_chain(costs: ChainCosts, cuts: tuple[int, ...], codecs: tuple[int, ...]) -> ChainPlan:
    """The figures of one choice (the DP's objective, recomputed plainly: the two must agree)."""
    d = len(costs.devices)
    if len(cuts) != d - 1 or len(codecs) != d - 1:
        raise ValueError(f"{d} devices need {d - 1} cuts and codecs")
    m = len(costs.positions)
    bounds = [0, *cuts, m - 1]
    if any(b < a for a, b in zip(bounds, bounds[1:], strict=False)):
        raise ValueError("cuts must not go backwards")
    own, stage, mem = [], [], []  # per device: its compute; with the runtime's own time per request
    for j in range(d):
        a, b = bounds[j], bounds[j + 1]
        t = max(0.0, costs.prefix_ms[j, b] - costs.prefix_ms[j, a])
        if j > 0:
            t += costs.dec_ms[j, a, codecs[j - 1]]
        if j < d - 1:
            t += costs.enc_ms[j, b, codecs[j]]
        own.append(float(t))
        # the runtime's own time is a device's that sends or receives: alone, the model sends nothing
        # (its one device paid it, and a split read 1.3x faster than the edge alone that it is not)
        stage.append(float(t) + (_overhead(costs, j) if d > 1 else 0.0))
        mem.append(int(segment_memory(costs)[j][a, b]))
    ups, downs, sent = [], [], []
    for h in range(d - 1):
        nbytes = float(costs.bytes[cuts[h], codecs[h]])
        ups.append(uplink_ms(nbytes, costs.links[h]) if nbytes > 0 else 0.0)
        downs.append(downlink_ms(costs.reply_bytes, costs.links[h]))
        sent.append(int(nbytes))
    # one request alone does not wait for the runtime's CPU share (it runs in the quota's bursts), a
    # pipeline does: the runtime's time counts in the busiest stage, not in the latency
    latency = sum(own) + sum(ups) + sum(downs) + sum(link.rtt_ms for link in costs.links)
    bottleneck = max([*stage, *ups, *downs, 1e-9])
    return ChainPlan(tuple(cuts), tuple(codecs), latency, bottleneck, stage, ups, downs, sent, mem)


def solve(
    costs: ChainCosts,
    limit: float = INF,
    modes: tuple[str, ...] | None = None,
    allowed: np.ndarray | None = None,
) -> ChainPlan | None:
    """The lowest-latency choice whose every stage (device and link) takes less than ``limit`` ms;
    None if none does. ``modes[j]`` constrains device j (ANY, EMPTY: runs no node, BUSY: runs some);
    ``allowed[h, k]`` says whether hop h may use codec k, or ``allowed[h, i, k]`` whether it may use
    codec k at position i (the pairs a fidelity floor rules out)."""
    d, m, c = len(costs.devices), len(costs.positions), len(costs.codecs)
    modes = modes or (ANY,) * d
    if d == 1:  # one device: the whole model there, if it fits the device's memory
        only = evaluate_chain(costs, (), ())
        fits_memory = bool(_memory_ok(costs)[0][0, m - 1])
        return only if only.bottleneck_ms < limit and modes[0] != EMPTY and fits_memory else None
    allowed = np.ones((d - 1, c), bool) if allowed is None else np.asarray(allowed, bool)
    per_pair = [a.ravel() if a.ndim == 2 else np.tile(a, m) for a in allowed]  # (m * c,) per hop
    if any(downlink_ms(costs.reply_bytes, link) >= limit for link in costs.links):
        return None
    first_busy, last_busy = _ends(costs, modes)
    lim = [limit - _overhead(costs, j) for j in range(d)]  # what device j may spend on the model
    # dp[i * c + k]: least latency of devices 0..h and hops 0..h, hop h at position i with codec k
    ups = [_up(costs, h).ravel() for h in range(d - 1)]
    cap = costs.max_hop_bytes
    fits = np.ones(m * c, bool) if cap is None else costs.bytes.ravel() + costs.reply_bytes <= cap
    ok = (first_busy < lim[0]) & (ups[0] < limit) & per_pair[0] & fits
    dp = np.where(ok, first_busy + ups[0], INF)
    back: list[np.ndarray] = []
    for h in range(1, d - 1):
        ok = (ups[h] < limit) & per_pair[h] & fits
        if h == d - 2:  # the last device must be able to start where this one ends
            ok &= last_busy < lim[d - 1]
        best, arg = _middle_step(costs, h, modes[h], dp, lim[h], ok)
        dp = np.where(ok & np.isfinite(best), best + ups[h], INF)
        back.append(arg)
    final = np.where(last_busy < lim[d - 1], dp + last_busy, INF)
    if not np.isfinite(final).any():
        return None
    flat = int(np.argmin(final))
    chosen = [flat]
    for arg in reversed(back):
        chosen.insert(0, int(arg[chosen[0]]))
    return evaluate_chain(costs, tuple(f // c for f in chosen), tuple(f % c for f in chosen))


def _overhead(costs: ChainCosts, j: int) -> float:
    return float(costs.overhead_ms[j]) if costs.overhead_ms else 0.0


ROWS_PER_BLOCK = 64  # positions per block of the middle step: ~13 MB of scratch at 1,001 positions


def _middle_step(
    costs: ChainCosts, j: int, mode: str, dp: np.ndarray, lim: float, wanted: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For every way (i', k') a middle device j can end (those ``wanted`` by the next steps): the least
    latency so far over every way (i, k) it can start, and which. Only the band that can hold a
    solution is read: starts with a finite latency so far, at or before the end, and (prefix times
    being non-decreasing) not so far before it that the segment alone takes ``lim``. Early in the front
    search the band is a triangle; as the limit falls it narrows to the diagonal and to the positions
    the devices before and after can reach, so the step costs far less than the (positions x codecs)^2
    table."""
    m, c = len(costs.positions), len(costs.codecs)
    best = np.full(m * c, INF)
    arg = np.zeros(m * c, dtype=np.intp)
    finite = np.flatnonzero(np.isfinite(dp))
    rows = np.flatnonzero(wanted)
    if not finite.size or not rows.size:
        return best, arg
    first, last = int(finite[0]) // c, int(finite[-1]) // c
    pre = costs.prefix_ms[j]
    monotone = bool(np.all(np.diff(pre) >= 0))
    for a in range(max(first, int(rows[0]) // c), int(rows[-1]) // c + 1, ROWS_PER_BLOCK):
        b = min(m, a + ROWS_PER_BLOCK)
        lo = first
        if monotone and math.isfinite(lim):  # pre[i'] - pre[i] < lim for some i' >= a
            lo = max(lo, int(np.searchsorted(pre, pre[a] - lim, side="right")))
        hi = min(b, last + 1)
        if lo >= hi:
            continue
        sub = _middle_block(costs, j, mode, a, b, lo, hi)
        total = sub + dp[None, lo * c : hi * c]
        total[sub >= lim] = INF
        k = total.argmin(axis=1)
        best[a * c : b * c] = total[np.arange(len(k)), k]
        arg[a * c : b * c] = lo * c + k
    return best, arg


def _ends(costs: ChainCosts, modes: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The first device's busy time by its end (i', k') and the last's by its start (i, k), as the DP
    reads them (infinite where its mode or memory forbids); the middle devices' (i', k') x (i, k) times
    ``_middle_block`` works out band by band. Independent of the limit, so worked out once per
    (costs, modes) and reused by every step of the front search."""
    cache = costs.__dict__.setdefault("_ends", {})
    if modes in cache:
        return cache[modes]
    d, m = len(costs.devices), len(costs.positions)
    mem = _memory_ok(costs)
    pos = np.arange(m)
    pre = costs.prefix_ms[0]  # the first device: from position 0 to i', encoding with k'
    ok = _mode_ok(modes[0], np.zeros((m, 1), int), pos[:, None]) & mem[0][0][:, None]
    first = np.where(ok, pre[:, None] + costs.enc_ms[0], INF).ravel()
    pre = costs.prefix_ms[d - 1]  # the last device: from position i, decoding with k, to the end
    ok = _mode_ok(modes[d - 1], pos[:, None], np.full((m, 1), m - 1)) & mem[d - 1][:, m - 1][:, None]
    ok &= pos[:, None] < m - 1  # the last device runs something
    last = np.where(ok, costs.dec_ms[d - 1] + (pre[m - 1] - pre)[:, None], INF).ravel()
    cache[modes] = first, last
    return first, last


def _middle_block(costs: ChainCosts, j: int, mode: str, a: int, b: int, lo: int, hi: int) -> np.ndarray:
    """Middle device j's busy time for ends (i', k') at positions a..b-1 and starts (i, k) at lo..hi-1:
    its segment, decoding what arrives and encoding what leaves; infinite where the start is after the
    end, or its mode or memory forbids."""
    c, pre = len(costs.codecs), costs.prefix_ms[j]
    right = (pre[a:b, None] + costs.enc_ms[j][a:b]).ravel()
    left = (costs.dec_ms[j][lo:hi] - pre[lo:hi, None]).ravel()
    busy = right[:, None] + left[None, :]
    limit = _memory_limit(costs, j)
    if hi - 1 <= a and mode == ANY and limit is None:
        return busy  # every start is at or before every end, and nothing else forbids
    end = np.repeat(np.arange(a, b), c)[:, None]
    start = np.repeat(np.arange(lo, hi), c)[None, :]
    ok = (start <= end) & _mode_ok(mode, start, end)
    if limit is not None:
        ok &= _memory_ok(costs)[j][start, end]
    busy[~ok] = INF
    return busy


def _mode_ok(mode: str, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Whether a device from ``start`` to ``end`` satisfies its mode (broadcast over the arrays)."""
    empty = np.asarray(start) == np.asarray(end)
    if mode == ANY:
        return np.ones(empty.shape, bool)
    return empty if mode == EMPTY else ~empty


def _memory_limit(costs: ChainCosts, j: int) -> float | None:
    return costs.memory_limit[j] if j < len(costs.memory_limit) else None


def segment_memory(costs: ChainCosts) -> list[np.ndarray]:
    """Per device, (m, m): the bytes it holds running the segment from position i to i' (derived): the
    segment's weights, its activations alive at once, and the device's session overhead where it runs
    anything (a device with an empty segment only forwards what crosses). Worked out once per costs."""
    if "_segment_memory" in costs.__dict__:
        return costs.__dict__["_segment_memory"]
    w, a = costs.weights, costs.act
    ends = np.maximum(a[:, None], a[None, :])
    act = ends if costs.act_peak is None else np.maximum(ends, costs.act_peak)
    runs = np.triu(np.ones(act.shape, bool), 1)  # i < i': the segment holds nodes
    out = []
    for j in range(len(costs.devices)):
        overhead = costs.memory_overhead[j] if j < len(costs.memory_overhead) else 0.0
        out.append(w[None, :] - w[:, None] + act + overhead * runs)
    costs.__dict__["_segment_memory"] = out
    return out


def _memory_ok(costs: ChainCosts) -> list[np.ndarray]:
    """Per device, (m, m): whether the segment from position i to i' fits its memory limit (worked out
    once per costs)."""
    if "_memory_ok" in costs.__dict__:
        return costs.__dict__["_memory_ok"]
    m, out = len(costs.positions), []
    for j in range(len(costs.devices)):
        limit = _memory_limit(costs, j)
        out.append(np.ones((m, m), bool) if limit is None else segment_memory(costs)[j] <= limit)
    costs.__dict__["_memory_ok"] = out
    return out


def memory_shortfall(costs: ChainCosts, names: list[str] | None = None) -> str:
    """Why no plan fits the memory limits, in figures: the model's weights against the most that any
    segment each limited device could take holds (the first device's segment starts at the inputs, the
    last's ends at the outputs). Which limit to raise is then plain, where "every one exceeds a device's
    memory limit" left the user to guess."""
    mib = 1 << 20
    w, fits, m = costs.weights, _memory_ok(costs), len(costs.positions)
    held = np.triu(w[None, :] - w[:, None])  # weight bytes of the segment from position i to i'
    said = []
    for j, name in enumerate(names or costs.devices):
        limit = _memory_limit(costs, j)
        if limit is None:
            continue
        ok = np.triu(fits[j]).copy()
        if j == 0:
            ok[1:, :] = False
        if j == len(costs.devices) - 1:
            ok[:, : m - 1] = False
        held_most = (
            f"holds at most {held[ok].max() / mib:.1f} MiB of weights"
            if ok.any()
            else "holds no segment, not even the activation it would take in"
        )
        said.append(f"{name} (limit {limit / mib:.1f} MiB) {held_most}")
    return (
        f"no plan over this chain fits the memory limits: the model's weights are {(w[-1] - w[0]) / mib:.1f} "
        f"MiB; {'; '.join(said)} (a segment also holds its activations and its session's overhead): raise a "
        "--memory limit or add a device"
    )


def chain_front(
    costs: ChainCosts,
    modes: tuple[str, ...] | None = None,
    allowed: np.ndarray | None = None,
    max_points: int = 2000,
) -> list[ChainPlan]:
    """The exact latency x throughput front (lowest latency for each attainable bottleneck), fastest
    first: solve with no limit, then below each solution's bottleneck, until nothing fits."""
    out: list[ChainPlan] = []
    limit = INF
    for _ in range(max_points):
        plan = solve(costs, limit, modes, allowed)
        if plan is None:
            break
        out.append(plan)
        limit = plan.bottleneck_ms * (1 - 1e-9)  # strictly below: the next, higher-throughput point
    return out
