"""The adaptive edge client: one plan set, a client per member, the member chosen from the link.

Every member of the set is loaded at start (its head session, its connection), so a switch costs
nothing at run time and needs no word to the server, which loads every member and reads from each
request which plan it uses. The uplink estimate comes from the requests themselves (bytes sent over
network time, ``LinkEstimator``), shared by every member's client. At each window boundary (every
``window`` requests) the members are re-judged with the planner's own cost model at the estimate, and
the current one is kept unless another is predicted faster by more than ``hysteresis`` (no flapping
on a boundary). A request runs to the end on the member it started on, so a switch loses nothing.

While the current member sends nothing (all on the edge), requests say nothing about the link: one
request in every ``probe_every`` (by default one a window) then goes over the member that sends least, as
a probe that is also answered. Once a window, an edge takes about four windows to leave its own member
after the link gets 10x faster; the trace bench probes one request in 3 and leaves within two. A probe
waits on the link it measures: on LTE one request in three took 300 ms against 160 on the edge, and
with the first window's requests on the server member two in five were that slow, which moved the
median of a whole phase by up to 46 %. With ``hedge``, a probe over a member with no head (all on the
server) is hedged: the edge runs its own model on the same input as well, and the first answer is the
request's (the other is dropped; the probe's reply still times the link). It is off by default: the
edge then runs every request itself, and on an edge whose CPU is the bottleneck that costs more than the
probes did. On the trace bench at 3 requests/s on a Pi 4-class edge (ResNet-18), hedged LTE phases
ran 12-15 % above the edge-only member fixed (1 of 8 within 10 %); unhedged, 7 of 8 were within 10 %
(each probe the server answers is a request the edge's CPU does not run). A probe whose member runs a
head on the edge is never hedged: the edge would run that head and its whole model for one request.

While it sends little, its requests cross a fast link in less time than
the jitter in their network time, and a faster link goes unseen: one request in ``PROBE_UP_EVERY``,
sent while the link is idle, then goes over the member the set would run on a link ``PROBE_UP`` times
faster, if that one sends more (``_probe_up``). The estimate is a median over the last 2 s of samples
(at least 5), so it believes a change once about half its samples are new: probing more often finds a
better link sooner, at the price of more requests over a link that may be slow. A request unanswered at
its timeout bounds the link until one completes again (``LinkEstimator.ceiling_mbps``): one that falls to
next to nothing completes no request, and without it the set stayed on a member that sends, each request
waiting out its timeout; the probes (one a window) find the link again.
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from splitpoint.core.plan import EDGE_ONLY, SERVER_ONLY
from splitpoint.core.planset import PlanSet
from splitpoint.core.telemetry import Telemetry
from splitpoint.partitioner.costmodel import CandidateInput
from splitpoint.partitioner.planset import choose

from .client import EdgeClient, EdgeError, EdgeResult
from .config import EdgeConfig
from .estimator import LinkEstimator

MAX_SWITCHES_KEPT = 10_000

PROBE_UP = 4.0  # a probe goes over the member the set would run on a link this many times faster
# ... one request in this many: weighted by their bits, two such probes in the estimate's window (2 s,
# 10 requests at 5/s) outweigh eight small requests, one does not
PROBE_UP_EVERY = 5


class AdaptiveClient:
    def __init__(
        self,
        set_dir: str | Path,
        config: EdgeConfig,
        window: int = 10,
        hysteresis: float = 0.15,
        telemetry: Telemetry | None = None,
        start_mbps: float | None = None,
        probe_every: int | None = None,
        rate_ips: float | None = None,
        hedge: bool = False,
    ):
        """``config`` is every member's client configuration (its ``plan_dir`` is replaced by each
        member's); ``start_mbps``: the uplink to start from (default: the set's network profile);
        ``probe_every``: requests per probe while on the edge (default: ``window``); ``rate_ips``: the
        arrival rate a member must keep up with (default: the set's, if it was planned for one);
        ``hedge``: hedge probes over a member with no head (see the module's docstring; off by default:
        it costs an edge whose CPU is the bottleneck more than it saves)."""
        if window < 1:
            raise ValueError("window must be at least 1 request")
        if probe_every is not None and probe_every < 1:
            raise ValueError("probe_every must be at least 1 request")
        # NaN compares false with everything: a NaN hysteresis turned switching off without a word
        if not (math.isfinite(hysteresis) and 0 <= hysteresis < 1):
            raise ValueError(f"hysteresis must be a fraction from 0 to below 1, not {hysteresis}")
        for name, v in (("start_mbps", start_mbps), ("rate_ips", rate_ips)):
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number above 0, not {v}")
        self.probe_every = probe_every or window
        self.hedge = hedge
        self.set, plans = PlanSet.load(set_dir, role="edge")
        self.plans = plans
        self.rate_ips = rate_ips if rate_ips is not None else self.set.rate_ips
        self.inputs = [CandidateInput(**m.facts) for m in self.set.members]
        self.window, self.hysteresis = window, hysteresis
        self.link = LinkEstimator(down_ratio=self.set.down_ratio)
        self._own_telemetry = telemetry is None
        self.telemetry = telemetry or (
            Telemetry(config.device_id, "edge", config.mqtt) if config.mqtt else None
        )
        self.sends = [p.kind != EDGE_ONLY for p in plans]
        ref = start_mbps if start_mbps is not None else self.set.uplink_mbps
        self._start_mbps = ref  # the uplink assumed until the edge's own estimate has one
        self.current = self.set.index_for(ref) if ref else 0
        self.requests = 0
        self._counts = {"ok": 0, "fallback": 0, "errors": 0}  # the caller's requests (see ``counts``)
        # the latest switches, for the trace bench and the caller (a client up for months switching every
        # few minutes kept every one: 384 bytes each, without bound)
        self.switches: list[dict] = []
        self._lock = threading.Lock()
        self._status_lock = threading.Lock()
        self._last_status: dict | None = None
        self._stop = threading.Event()
        self.clients: list[EdgeClient] = []
        ids = itertools.count(1)  # one device: one request, one id, whichever member runs it
        try:
            for m in self.set.members:
                cfg = config.model_copy(update={"plan_dir": Path(set_dir) / m.dir})
                c = EdgeClient(cfg, telemetry=self.telemetry, report=self._publish_status, ids=ids)
                c.link = self.link
                self.clients.append(c)
        except BaseException:
            self.close(drain=False)
            raise
        # the edge-only member's whole model answers for every member while the server is out of reach
        # (one session, loaded once): before, a set that held it failed every request when the server died
        local = next((c for c, s in zip(self.clients, self.sends, strict=True) if not s), None)
        if local is not None:
            for c in self.clients:
                c.lend_fallback(local)
        self._reporter = threading.Thread(
            target=self._report_loop, name="splitpoint-set-metrics", daemon=True
        )
        self._reporter.start()
        self._publish_status()

    # -- health: one device, however many members ----------------------------------------------
    def _speaker(self) -> int | None:
        """The member whose connection speaks for the set's link: the current one, or while that one runs
        on the edge, the probe (None: no member sends)."""
        return self.current if self.sends[self.current] else self._probe()

    def _server_up(self) -> bool:
        k = self._speaker()
        return k is not None and self.clients[k].server_up

    def _status(self) -> dict:
        m = self.set.members[self.current]
        k = self._speaker()
        return {
            "plan": m.plan_id,
            "member": f"m{self.current} {m.label}",
            "plan_set": len(self.set.members),
            "server": self.clients[0].config.server if self.clients else None,
            "server_up": self._server_up(),
            "fallback": k is not None and self.clients[k].falling_back,
            # on the member that runs all here: answered locally whether the server is up or not
            "local": not self.sends[self.current],
        }

    def _publish_status(self) -> None:
        if not self.telemetry or len(self.clients) < len(self.set.members):
            return  # members still loading: the first status goes out once all are
        with self._status_lock:
            status = self._status()
            if status == self._last_status:
                return
            self._last_status = status
            self.telemetry.status("online", status)

    def _report_loop(self) -> None:
        """The set's metrics, every 2 s: its own counts of the caller's requests, over every member (each
        member publishing its own, under one device id, made ``watch`` show whichever came last)."""
        while not self._stop.wait(2.0):
            self._publish_metrics()
            self._publish_status()

    def _publish_metrics(self) -> None:
        if not self.telemetry:
            return
        self.telemetry.metrics(
            {
                "server_up": self._server_up(),
                "in_flight": sum(c.in_flight for c in self.clients),
                "rtt_ms_est": self.link.rtt_ms,
                "rtt_ms_est_age_s": self.link.rtt_age_s(),
                "bandwidth_mbps_est": self.link.uplink_mbps,
                "member": self.current,
                **self.counts,
            }
        )

    # -- the choice ----------------------------------------------------------------------------
    def _usable(self, k: int) -> bool:
        """A member the server is not known to refuse (a pong lists the plans it serves): one it does not
        serve is never chosen nor probed, so requests do not keep going to a plan that is refused."""
        return not self.sends[k] or self.clients[k].plan_served is not False

    def _probe(self) -> int | None:
        """The member that sends least, of those the server serves: the probe while on the edge."""
        live = [i for i, s in enumerate(self.sends) if s and self._usable(i)]
        return min(live, key=lambda i: self.inputs[i].up_bytes) if live else None

    def _decide(self) -> None:
        est = self._uplink()
        usable = [i for i in range(len(self.inputs)) if self._usable(i)]
        if not usable or (est is None and self._usable(self.current)):
            return
        if est is None:  # the current member is refused and nothing was measured yet: the set's own link
            est = self.set.uplink_mbps
        if not est:
            self._switch(usable[0], None, None)
            return
        rtt = self.link.rtt_ms if self.link.rtt_ms is not None else self.set.rtt_ms
        inside = usable.index(self.current) if self.current in usable else None
        pick = choose(
            [self.inputs[i] for i in usable],
            inside,
            est,
            rtt,
            self.set.down_ratio,
            self.hysteresis,
            self.rate_ips,
        )
        self._switch(usable[pick], est, rtt)

    def _uplink(self) -> float | None:
        """The uplink estimate, or less where requests went unanswered at their timeout since the last
        one that completed (``LinkEstimator.ceiling_mbps``)."""
        est, ceiling = self.link.uplink_mbps, self.link.ceiling_mbps
        return ceiling if ceiling is not None and (est is None or ceiling < est) else est

    def _switch(self, new: int, est: float | None, rtt: float | None) -> None:
        if new == self.current:
            return
        event = {
            "t": time.time(),
            "request": self.requests,
            "from": self.current,
            "to": new,
            "from_label": self.set.members[self.current].label,
            "to_label": self.set.members[new].label,
            "uplink_mbps_estimated": est,
            "rtt_ms_estimated": rtt,
        }
        self.current = new
        self.switches.append(event)
        if len(self.switches) > MAX_SWITCHES_KEPT:
            del self.switches[: len(self.switches) - MAX_SWITCHES_KEPT]
        if self.telemetry:
            self.telemetry.switch(event)
        self._publish_status()

    def _probe_up(self) -> int | None:
        """The member that the set would run on a link ``PROBE_UP``x faster than the estimate, if it sends
        more than the current one and the link is idle: a request over it times the link with enough
        bytes to see past the jitter (a 27 KiB cut tensor crosses Wi-Fi in 11 ms, less than the noise in
        its network time), as BBR probes for bandwidth above its estimate. Not while the link has a
        queue: there a larger request only waits longer, and queued requests time the link already."""
        # no estimate yet (or none: every request so far too small to time on this link) probes above
        # the uplink the set started from
        est, k = self._uplink() or self._start_mbps, self.current
        if not est or self.link.in_pipe:
            return None
        usable = [i for i in range(len(self.inputs)) if self._usable(i) and self.sends[i]]
        if k not in usable:
            return None
        rtt = self.link.rtt_ms if self.link.rtt_ms is not None else self.set.rtt_ms
        faster = [self.inputs[i] for i in usable]
        up = usable[choose(faster, None, est * PROBE_UP, rtt, self.set.down_ratio, 0.0, self.rate_ips)]
        return up if self.inputs[up].up_bytes > self.inputs[k].up_bytes else None

    def _member_for_next(self) -> tuple[int, int | None]:
        """The member the next request goes over, and the member that answers it too where that request
        is a hedged probe (see the module's docstring)."""
        with self._lock:
            if (self.requests and self.requests % self.window == 0) or not self._usable(self.current):
                self._decide()
            k, n = self.current, self.requests
            self.requests += 1
            if n % self.probe_every == 0 and not self.sends[k]:
                probe = self._probe()
                if probe is None:
                    return k, None
                return probe, (k if self.hedge and self.plans[probe].kind == SERVER_ONLY else None)
            if self.sends[k] and n % PROBE_UP_EVERY == PROBE_UP_EVERY // 2:
                up = self._probe_up()
                return (k if up is None else up), None
            return k, None

    # -- public API ----------------------------------------------------------------------------
    def submit(self, feeds: dict[str, np.ndarray]) -> Future:
        """Start one inference on the current member; the result's breakdown names the member that
        answered (``member``) and, for a hedged probe, the other one it went over (``hedged_with``)."""
        return self._start(feeds, *self._member_for_next())

    def infer(self, feeds: dict[str, np.ndarray], timeout: float | None = None) -> EdgeResult:
        k, also = self._member_for_next()
        if also is not None:
            return self._start(feeds, k, also).result(timeout)
        try:
            r = self.clients[k].infer(feeds, timeout, report=False)
        except EdgeError:
            self._count("errors")
            raise
        r.breakdown["member"] = k
        self._answered(r)
        return r

    def _start(self, feeds: dict[str, np.ndarray], k: int, also: int | None) -> Future:
        """The request over member ``k``; for a hedged probe, over member ``also`` (the edge's own run)
        first, as if there were no probe, and then over ``k`` only where its window has room now: a
        caller never waits for a link the edge does not need to answer it. The probe's leg never falls
        back to the local model (the edge runs it already)."""
        try:
            if also is None:
                return self._resolve([(k, self.clients[k].submit(feeds, report=False))])
            legs = [(also, self.clients[also].submit(feeds, report=False))]
        except EdgeError:
            self._count("errors")
            raise
        try:
            probe = self.clients[k].try_submit(feeds, fallback=False, report=False)
        except EdgeError:  # that member's client is closing or broken: the edge answers alone
            probe = None
        if probe is not None:
            legs.append((k, probe))
        return self._resolve(legs)

    def _resolve(self, legs: list[tuple[int, Future]]) -> Future:
        """The caller's future: the first answer among ``legs`` (member, future); an error once every
        leg failed (the first leg's)."""
        outer: Future = Future()
        errors: dict[int, BaseException] = {}
        left, lock = [len(legs)], threading.Lock()

        def done(member: int, other: int | None, f: Future) -> None:
            if f.cancelled():  # the caller cancelled ``outer``, and with it this leg: nobody waits
                return
            exc = f.exception()
            with lock:
                left[0] -= 1
                if left[0] < 0:
                    return  # answered already (left is set below zero once it is)
                if exc is not None:
                    errors[member] = exc
                    if left[0] > 0:
                        return  # another leg may still answer
                left[0] = -len(legs)
            # outside the lock: the caller's callbacks run in set_result. A request its caller cancelled
            # is counted nowhere (it was counted as answered)
            if not outer.set_running_or_notify_cancel():
                return
            if exc is not None:
                self._count("errors")
                outer.set_exception(errors.get(legs[0][0]) or next(iter(errors.values())))
                return
            r: EdgeResult = f.result()
            r.breakdown["member"] = member
            if other is not None:
                r.breakdown["hedged_with"] = other
            self._answered(r)
            outer.set_result(r)

        def cancelled(f: Future) -> None:
            if f.cancelled():  # passed on: a member's request that has not started is dropped
                for _, inner in legs:
                    inner.cancel()

        outer.add_done_callback(cancelled)
        for member, inner in legs:
            other = next((m for m, _ in legs if m != member), None)
            inner.add_done_callback(functools.partial(done, member, other))
        return outer

    def _answered(self, r: EdgeResult) -> None:
        """Counted once, and its latency published once, as the caller saw it, naming the member (the
        members' clients publish none: a hedged request would be two samples, the late one a probe's
        time that no caller waited)."""
        self._count("fallback" if r.fallback else "ok")
        if self.telemetry:
            self.telemetry.latency({"request": r.id, "fallback": r.fallback, **r.breakdown})

    def _count(self, outcome: str) -> None:
        with self._lock:
            self._counts[outcome] += 1

    @property
    def counts(self) -> dict[str, int]:
        """The caller's requests answered (``ok``, ``fallback``) and failed, as the caller saw them: a
        hedged request once, though two members ran it."""
        with self._lock:
            return dict(self._counts)

    def close(self, drain: bool = True) -> None:
        self._stop.set()
        for c in self.clients:
            c.close(drain=drain)
        if self.clients and len(self.clients) == len(self.set.members):
            self._publish_metrics()  # the last counts, as a single client's close sends them
        if self.telemetry and self._own_telemetry:
            self.telemetry.close()

    def __enter__(self) -> AdaptiveClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
