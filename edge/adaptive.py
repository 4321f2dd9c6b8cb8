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
a probe that is also answered. The estimate needs three samples in a row to believe a change, so probing
more often finds a better link sooner, at the price of more requests over a link that may be slow.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from splitpoint.core.plan import EDGE_ONLY
from splitpoint.core.planset import PlanSet
from splitpoint.core.telemetry import Telemetry
from splitpoint.partitioner.costmodel import CandidateInput
from splitpoint.partitioner.planset import choose

from .client import EdgeClient, EdgeResult
from .config import EdgeConfig
from .estimator import LinkEstimator


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
    ):
        """``config`` is every member's client configuration (its ``plan_dir`` is replaced by each
        member's); ``start_mbps``: the uplink to start from (default: the set's network profile);
        ``probe_every``: requests per probe while on the edge (default: ``window``); ``rate_ips``: the
        arrival rate a member must keep up with (default: the set's, if it was planned for one)."""
        if window < 1:
            raise ValueError("window must be at least 1 request")
        if probe_every is not None and probe_every < 1:
            raise ValueError("probe_every must be at least 1 request")
        self.probe_every = probe_every or window
        self.set, plans = PlanSet.load(set_dir, role="edge")
        self.plans = plans
        self.rate_ips = rate_ips if rate_ips is not None else self.set.rate_ips
        self.inputs = [CandidateInput(**m.facts) for m in self.set.members]
        self.window, self.hysteresis = window, hysteresis
        self.link = LinkEstimator()
        self._own_telemetry = telemetry is None
        self.telemetry = telemetry or (
            Telemetry(config.device_id, "edge", config.mqtt) if config.mqtt else None
        )
        self.sends = [p.kind != EDGE_ONLY for p in plans]
        probe = [i for i, s in enumerate(self.sends) if s]
        self._probe = min(probe, key=lambda i: self.inputs[i].up_bytes) if probe else None
        ref = start_mbps if start_mbps is not None else self.set.uplink_mbps
        self.current = self.set.index_for(ref) if ref else 0
        self.requests = 0
        self.switches: list[dict] = []
        self._lock = threading.Lock()
        self.clients: list[EdgeClient] = []
        try:
            for m in self.set.members:
                cfg = config.model_copy(update={"plan_dir": Path(set_dir) / m.dir})
                c = EdgeClient(cfg, telemetry=self.telemetry)
                c.link = self.link
                c.status_extra = self._status_extra
                self.clients.append(c)
        except BaseException:
            self.close(drain=False)
            raise
        self._publish_status()

    # -- the choice ----------------------------------------------------------------------------
    def _status_extra(self) -> dict:
        m = self.set.members[self.current]
        return {"plan": m.plan_id, "member": f"m{self.current} {m.label}", "plan_set": len(self.set.members)}

    def _publish_status(self) -> None:
        if self.telemetry:
            self.telemetry.status("online", {"server": self.clients[0].config.server, **self._status_extra()})

    def _decide(self) -> None:
        est = self.link.uplink_mbps
        if est is None:
            return
        rtt = self.link.rtt_ms if self.link.rtt_ms is not None else self.set.rtt_ms
        new = choose(self.inputs, self.current, est, rtt, self.set.down_ratio, self.hysteresis, self.rate_ips)
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
        if self.telemetry:
            self.telemetry.switch(event)
        self._publish_status()

    def _member_for_next(self) -> int:
        with self._lock:
            if self.requests and self.requests % self.window == 0:
                self._decide()
            k = self.current
            probing = not self.sends[k] and self._probe is not None and self.requests % self.probe_every == 0
            self.requests += 1
            return self._probe if probing and self._probe is not None else k

    # -- public API ----------------------------------------------------------------------------
    def submit(self, feeds: dict[str, np.ndarray]) -> Future:
        """Start one inference on the current member; the result's breakdown names the member."""
        k = self._member_for_next()
        inner = self.clients[k].submit(feeds)
        outer: Future = Future()

        def done(f: Future) -> None:
            exc = f.exception()
            if exc is not None:
                outer.set_exception(exc)
                return
            r: EdgeResult = f.result()
            r.breakdown["member"] = k
            outer.set_result(r)

        inner.add_done_callback(done)
        return outer

    def infer(self, feeds: dict[str, np.ndarray], timeout: float | None = None) -> EdgeResult:
        k = self._member_for_next()
        r = self.clients[k].infer(feeds, timeout)
        r.breakdown["member"] = k
        return r

    def close(self, drain: bool = True) -> None:
        for c in self.clients:
            c.close(drain=drain)
        if self.telemetry and self._own_telemetry:
            self.telemetry.close()

    def __enter__(self) -> AdaptiveClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
