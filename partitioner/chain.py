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
yields one front point, so the search costs (front size) x K x (positions x codecs)^2 operations,
not an enumeration of every K-tuple of cuts.

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
    ``bytes[i, k]`` sent, ``weights[i]`` weight bytes before it, ``act[i]`` float32 bytes crossing it.
    ``reply_bytes`` come back over every hop."""

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

    def __post_init__(self) -> None:
        d, m, c = len(self.devices), len(self.positions), len(self.codecs)
        if len(self.links) != d - 1:
            raise ValueError(f"{d} devices need {d - 1} links, got {len(self.links)}")
        if self.overhead_ms and len(self.overhead_ms) != d:
            raise ValueError(f"{d} devices need {d} overheads, got {len(self.overhead_ms)}")
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
    memory_bytes: list[int]  # per device: segment weights + the larger activation at its ends
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
        stage.append(float(t) + _overhead(costs, j))
        mem.append(int(costs.weights[b] - costs.weights[a] + max(costs.act[a], costs.act[b])))
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
    ``allowed[h, k]`` says whether hop h may use codec k."""
    d, m, c = len(costs.devices), len(costs.positions), len(costs.codecs)
    modes = modes or (ANY,) * d
    if d == 1:  # one device: the whole model there
        only = evaluate_chain(costs, (), ())
        return only if only.bottleneck_ms < limit and modes[0] != EMPTY else None
    allowed = np.ones((d - 1, c), bool) if allowed is None else np.asarray(allowed, bool)
    if any(downlink_ms(costs.reply_bytes, link) >= limit for link in costs.links):
        return None
    tables = _tables(costs, modes)
    lim = [limit - _overhead(costs, j) for j in range(d)]  # what device j may spend on the model
    # dp[i * c + k]: least latency of devices 0..h and hops 0..h, hop h at position i with codec k
    first_busy, _ = tables[0]
    ups = [_up(costs, h).ravel() for h in range(d - 1)]
    ok = (first_busy < lim[0]) & (ups[0] < limit) & np.tile(allowed[0], m)
    dp = np.where(ok, first_busy + ups[0], INF)
    back: list[np.ndarray] = []
    for h in range(1, d - 1):
        busy, _ = tables[h]  # (out: i', k') x (in: i, k): the device between hop h-1 and hop h
        total = _scratch(costs, busy.shape)
        np.add(busy, dp[None, :], out=total)
        np.copyto(total, INF, where=busy >= lim[h])
        arg = total.argmin(axis=1)
        best = total[np.arange(m * c), arg]
        ok = (ups[h] < limit) & np.tile(allowed[h], m)
        dp = np.where(ok & np.isfinite(best), best + ups[h], INF)
        back.append(arg)
    last_busy, _ = tables[d - 1]
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


def _scratch(costs: ChainCosts, shape: tuple[int, ...]) -> np.ndarray:
    """One reused buffer per costs (the DP's largest array, allocated once, not per step)."""
    buf = costs.__dict__.get("_scratch")
    if buf is None or buf.shape != shape:
        buf = costs.__dict__["_scratch"] = np.empty(shape)
    return buf


def _tables(costs: ChainCosts, modes: tuple[str, ...]) -> list[tuple[np.ndarray, None]]:
    """Per device, its busy time for every way it can start and end, as the DP reads it (infinite
    where its mode, order or memory forbids): the first device by its end (i', k'), the last by its
    start (i, k), the others as an (i', k') x (i, k) matrix. Independent of the limit, so worked out
    once per (costs, modes) and reused by every step of the front search."""
    cache = costs.__dict__.setdefault("_tables", {})
    if modes in cache:
        return cache[modes]
    d, m, c = len(costs.devices), len(costs.positions), len(costs.codecs)
    mem = _memory_ok(costs)
    pos = np.arange(m)
    out: list[tuple[np.ndarray, None]] = []
    for j in range(d):
        pre = costs.prefix_ms[j]
        if j == 0:  # from position 0 to i', encoding with k'
            busy = pre[:, None] + costs.enc_ms[j]
            ok = _mode_ok(modes[j], np.zeros((m, 1), int), pos[:, None]) & mem[j][0][:, None]
            out.append((np.where(ok, busy, INF).ravel(), None))
        elif j == d - 1:  # from position i, decoding with k, to the end
            busy = costs.dec_ms[j] + (pre[m - 1] - pre)[:, None]
            ok = _mode_ok(modes[j], pos[:, None], np.full((m, 1), m - 1)) & mem[j][:, m - 1][:, None]
            ok &= pos[:, None] < m - 1  # the last device runs something
            out.append((np.where(ok, busy, INF).ravel(), None))
        else:
            right = (pre[:, None] + costs.enc_ms[j]).ravel()  # (i', k')
            left = (costs.dec_ms[j] - pre[:, None]).ravel()  # (i, k)
            busy = right[:, None] + left[None, :]
            start = np.repeat(pos, c)  # i for each (i, k)
            end = np.repeat(pos, c)  # i' for each (i', k')
            ok = _mode_ok(modes[j], start[None, :], end[:, None]) & (start[None, :] <= end[:, None])
            ok &= mem[j][start[None, :], end[:, None]]
            out.append((np.where(ok, busy, INF), None))
    cache[modes] = out
    return out


def _mode_ok(mode: str, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Whether a device from ``start`` to ``end`` satisfies its mode (broadcast over the arrays)."""
    empty = np.asarray(start) == np.asarray(end)
    if mode == ANY:
        return np.ones(empty.shape, bool)
    return empty if mode == EMPTY else ~empty


def _memory_ok(costs: ChainCosts) -> list[np.ndarray]:
    """Per device, (m, m): whether the segment from position i to i' fits its memory limit."""
    m, out = len(costs.positions), []
    for j in range(len(costs.devices)):
        limit = costs.memory_limit[j] if j < len(costs.memory_limit) else None
        if limit is None:
            out.append(np.ones((m, m), bool))
            continue
        w, a = costs.weights, costs.act
        seg = w[None, :] - w[:, None] + np.maximum(a[:, None], a[None, :])
        out.append(seg <= limit)
    return out


def chain_front(
    costs: ChainCosts,
    modes: tuple[str, ...] | None = None,
    allowed: np.ndarray | None = None,
    max_points: int = 200,
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
