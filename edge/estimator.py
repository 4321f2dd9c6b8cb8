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
    """Samples go in on the request path in constant time; the medians are taken when the estimate is
    read (telemetry, a plan set's window boundary), not per request: over a full window of 512 samples
    that took ~0.3 ms, more than the rest of a small request's own overhead."""

    horizon_s: float = 2.0  # samples this recent make the estimate
    min_samples: int = 5  # ... and at least this many of each kind, however old
    samples: int = 0  # requests observed
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # shared by a set's clients
    _pings: collections.deque = field(default_factory=lambda: collections.deque(maxlen=KEEP), repr=False)
    # (time, kilobits on the wire, network ms): the framing is added once, when the sample comes in
    _trips: collections.deque = field(default_factory=lambda: collections.deque(maxlen=KEEP), repr=False)
    _last: float = field(default=-math.inf, repr=False)  # the newest sample's time: the estimate's "now"
    _stale: bool = field(default=False, repr=False)
    _uplink: float | None = field(default=None, repr=False)
    _rtt: float | None = field(default=None, repr=False)

    def observe_rtt(self, rtt_ms: float, now: float | None = None) -> None:
        """A round trip with (almost) no payload: a ping's."""
        if rtt_ms >= 0:
            t = _now(now)
            with self._lock:
                self._pings.append((t, rtt_ms))
                self._mark(t)

    def observe(self, sent_bytes: int, network_ms: float, now: float | None = None) -> None:
        """One request's bytes and network time."""
        if network_ms > 0:
            t = _now(now)
            kbits = 8e-3 * wire_bytes(sent_bytes) if sent_bytes > 0 else 0.0
            with self._lock:
                self._trips.append((t, kbits, network_ms))
                self.samples += 1
                self._mark(t)

    @property
    def started(self) -> bool:
        """Whether any sample came in (cheap: no estimate is computed)."""
        return bool(self._pings or self._trips)

    @property
    def uplink_mbps(self) -> float | None:
        """The uplink estimate (None: none yet); a request too small to time leaves the last one standing."""
        with self._lock:
            self._refresh()
            return self._uplink

    @property
    def rtt_ms(self) -> float | None:
        with self._lock:
            self._refresh()
            return self._rtt

    def _mark(self, t: float) -> None:
        self._last = max(self._last, t)
        self._stale = True

    def _recent(self, q: collections.deque, now: float) -> list:
        """The samples inside the window, or the last ``min_samples`` if fewer are."""
        cut = now - self.horizon_s
        inside = [s for s in q if s[0] >= cut]
        return inside if len(inside) >= self.min_samples else list(q)[-self.min_samples :]

    def _refresh(self) -> None:
        if not self._stale:
            return
        self._stale = False
        pings = self._recent(self._pings, self._last)
        trips = self._recent(self._trips, self._last)
        if pings:
            self._rtt = statistics.median(r for _, r in pings)
        elif trips:  # no ping answered yet: a request's network time is an upper bound on the path's
            self._rtt = min(n for _, _, n in trips)
        rtt = self._rtt or 0.0
        # each request's uplink rate; one whose network time is within the round trip's spread carried
        # too little to time (its transfer is lost in the jitter): as fast as can be told, not skipped,
        # which would leave only the slow ones to vote
        rates = [kb / (n - rtt) if n - rtt > 0.05 else math.inf for _, kb, n in trips if kb > 0]
        if rates:
            mid = statistics.median(rates)
            if math.isfinite(mid):
                self._uplink = mid


def _now(now: float | None) -> float:
    return time.monotonic() if now is None else now
