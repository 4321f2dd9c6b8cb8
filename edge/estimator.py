"""The edge's estimate of its uplink and round trip, from its own traffic: no probe traffic.

Two kinds of sample, both timed by the edge's own threads: a ping's round trip (no payload), and a
request's network time (its time on the edge's clock minus the server's own time) with the bytes it
sent. On a busy edge both include the time a reply waited for a thread to run it: a head that keeps a
Pi-class CPU saturated adds tens of milliseconds to every sample, far more than a 20 KiB transfer
lasts on Wi-Fi. That wait is in the pings as much as in the requests, so the uplink comes from the
difference, each request's bytes over its network time less the pings' round trip, and the round trip
from the pings alone.

Medians over a sliding window of ``horizon_s`` seconds (and at least the last ``min_samples`` of each
kind, however old): one slow request (a retransmission, a scheduling hiccup) does not move a median,
while a real change of link (Wi-Fi to LTE, 10× within a second) takes the median over once half the
window is new, about ``horizon_s / 2`` later. A least-of-recent filter, as TCP's min-RTT, is the
wrong statistic here: the cost model adds the path's typical round trip to every request, and the
least of 80 pings on a 20 ± 5 ms link is the jitter's lower tail (4 ms measured).
"""

from __future__ import annotations

import collections
import math
import statistics
import threading
import time
from dataclasses import dataclass, field

from splitpoint.partitioner.costmodel import wire_bytes

KEEP = 512  # samples of each kind held at most, whatever the window (bounds memory at any rate)


@dataclass
class LinkEstimator:
    horizon_s: float = 2.0  # samples this recent make the estimate
    min_samples: int = 5  # ... and at least this many of each kind, however old
    uplink_mbps: float | None = None
    rtt_ms: float | None = None
    samples: int = 0  # requests observed
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # shared by a set's clients
    _pings: collections.deque = field(default_factory=lambda: collections.deque(maxlen=KEEP), repr=False)
    _trips: collections.deque = field(default_factory=lambda: collections.deque(maxlen=KEEP), repr=False)

    def observe_rtt(self, rtt_ms: float, now: float | None = None) -> None:
        """A round trip with (almost) no payload: a ping's."""
        if rtt_ms >= 0:
            t = _now(now)
            with self._lock:
                self._pings.append((t, rtt_ms))
                self._update(t)

    def observe(self, sent_bytes: int, network_ms: float, now: float | None = None) -> float | None:
        """One request's bytes and network time; the updated uplink estimate (None: none yet)."""
        t = _now(now)
        with self._lock:
            if network_ms > 0:
                self._trips.append((t, sent_bytes, network_ms))
                self.samples += 1
                self._update(t)
            return self.uplink_mbps

    def _recent(self, q: collections.deque, now: float) -> list:
        """The samples inside the window, or the last ``min_samples`` if fewer are."""
        cut = now - self.horizon_s
        inside = [s for s in q if s[0] >= cut]
        return inside if len(inside) >= self.min_samples else list(q)[-self.min_samples :]

    def _update(self, now: float) -> None:
        pings = self._recent(self._pings, now)
        trips = self._recent(self._trips, now)
        if pings:
            self.rtt_ms = statistics.median(r for _, r in pings)
        elif trips:  # no ping answered yet: a request's network time is an upper bound on the path's
            self.rtt_ms = min(n for _, _, n in trips)
        rtt = self.rtt_ms or 0.0
        # each request's uplink rate; one whose network time is within the round trip's spread carried
        # too little to time (its transfer is lost in the jitter): as fast as can be told, not skipped,
        # which would leave only the slow ones to vote
        rates = [
            8e-3 * wire_bytes(b) / (n - rtt) if n - rtt > 0.05 else math.inf for _, b, n in trips if b > 0
        ]
        if rates:
            mid = statistics.median(rates)
            if math.isfinite(mid):
                self.uplink_mbps = mid


def _now(now: float | None) -> float:
    return time.monotonic() if now is None else now
