"""The edge's estimate of its uplink and round trip, from its own traffic: no probe traffic.

Two kinds of sample, both timed by the edge's own threads: a ping's round trip (no payload), and a
request's network time (its time on the edge's clock minus the server's own time) with the bytes it
sent. On a busy edge both include the time a reply waited for a thread to run it: a head that keeps a
Pi-class CPU saturated adds tens of milliseconds to every sample, far more than a 20 KiB transfer
lasts on Wi-Fi. That wait is in the pings as much as in the requests, so the uplink comes from the
difference, each request's bytes over its network time less the pings' round trip, and the round trip
from the pings alone.

Pings go out only while nothing is unanswered on the link, from any client sharing it: a ping
behind payloads (or behind a tail at the server) reads that queue as round trip. Requests still in
the head put nothing on the link and do not hold pings back (a Pi-class edge at a camera's rate
always has one there). On a link that is never idle the round trip keeps its last idle reading,
however old (``rtt_age_s`` says how old: telemetry and the trace bench show it beside the figure); the
uplink from queued requests needs no round trip, the one from a lone request's network time does.

A lone request's network time holds its reply's way back too: on a link whose downlink is
``down_ratio`` times its uplink, the reply's bits count as that many times fewer bits sent (the
planner's own link model), else a detector's large reply read as a slower uplink (-12 % at 1.5
Mbit/s up, 3.2 down, with a 4 KiB reply). With no ratio given, the reply's time is left in.

Requests in flight together queue on the link: one sent while the one before it is still crossing
waits for it, and its network time then holds that wait as well as its own transfer. Read as one
request's bytes over that time, a link kept busy by a steady stream looks slower the longer the queue
gets (a 5.85 Mbit/s LTE uplink read 2.7-5.3 with a camera's frames queued on it), which sends the edge
to members that send less and serve fewer. Such a request's own transfer is the time between the
previous request's arrival at the server and its own, both on the edge's clock (reply time less the
server's time): the round trip and any wait for an edge thread are in both and cancel, as in TCP's
delivery-rate samples. A request counts as queued when it was sent before the previous one's last byte
left the edge (its arrival less a round trip).

The bytes sent and not yet answered (``in_pipe``) are the queue a new request would join: ``wait_s``
is the time it would take to reach the server and answer, which the client checks against its timeout
before sending (a request that cannot be answered in time is not put on a link it would only clog).

A round trip only gets longer by waiting (a queue, a busy thread), never shorter: a sample well under
the round trip held (under ``DROP`` of it, twice within half a window, a ping's or a request's whole
network time, at least one a ping) means a faster path, as when LTE gives way to Wi-Fi. The round trip
then starts again from the pings since the first of them, rather than
waiting for the old pings to leave the median: at a ping a second, the last five are kept whatever
their age, and two seconds after LTE (70 ms) gave way to Wi-Fi (20 ms) the round trip still read 35 ms,
which taken off each request's network time read an 18.9 Mbit/s link as 21.5, past the set's member
boundary at 20: the edge went to the member for a faster link, and hysteresis kept it there.
A longer round trip is left to the median: one ping that waited on a busy edge must not move it.

Medians (the uplink's weighted by each request's bits) over a sliding window of ``horizon_s``
seconds (at most the last ``max_samples`` of each kind, and at least the last ``min_samples``, however
old): one slow request (a retransmission, a scheduling hiccup) does not move a median, while a real
change of link (Wi-Fi to LTE, 10× within a second) takes the median over once half the window is new,
about ``horizon_s / 2`` later, or sooner at a high request rate: 48 requests in a quarter second on a
fast link held the median there for two seconds, through 44 requests on a link 12× slower.
A least-of-recent filter, as TCP's min-RTT, is the wrong statistic here: the cost model adds
the path's typical round trip to every request, and the least of 80 pings on a 20 ± 5 ms link is
the jitter's lower tail (4 ms measured).
"""

from __future__ import annotations

import collections
import math
import statistics
import threading
import time
from dataclasses import dataclass, field

from splitpoint.partitioner.costmodel import wire_bytes

REFRESH_S = 0.05  # wait_s's estimate is at most this old
KEEP = 512  # samples of each kind held at most, whatever the window (bounds memory at any rate)
DROP = 0.6  # a sample under this share of the round trip held is evidence of a faster path


@dataclass
class LinkEstimator:
    """Samples go in on the request path in constant time; the medians are taken when the estimate is
    read (telemetry, a plan set's window boundary), not per request: over a full window of 512 samples
    that took ~0.3 ms, more than the rest of a small request's own overhead."""

    horizon_s: float = 2.0  # samples this recent make the estimate
    min_samples: int = 5  # ... and at least this many of each kind, however old
    max_samples: int = 32  # ... and at most this many of each kind, however recent
    down_ratio: float | None = None  # downlink / uplink, where known (a plan set's): see the docstring
    samples: int = 0  # requests observed
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # shared by a set's clients
    _pings: collections.deque = field(default_factory=lambda: collections.deque(maxlen=KEEP), repr=False)
    # (time, kilobits on the wire, network ms, transfer ms or None, the reply's kilobits at uplink speed):
    # the framing is added once, when the sample comes in; the transfer where the request queued behind
    # the one before it
    _trips: collections.deque = field(default_factory=lambda: collections.deque(maxlen=KEEP), repr=False)
    _arrived: float = field(default=-math.inf, repr=False)  # the last request's arrival, edge clock (s)
    _in_pipe: int = field(default=0, repr=False)  # wire bytes sent and not yet answered
    _refreshed: float = field(default=-math.inf, repr=False)  # when wait_s last took the medians
    _last: float = field(default=-math.inf, repr=False)  # the newest sample's time: the estimate's "now"
    _stale: bool = field(default=False, repr=False)
    _uplink: float | None = field(default=None, repr=False)
    _rtt: float | None = field(default=None, repr=False)
    _last_ping: float = field(default=-math.inf, repr=False)
    _rtt_since: float = field(default=-math.inf, repr=False)  # the round trip comes from samples since
    _ceiling: float | None = field(default=None, repr=False)  # Mbit/s, from timeouts (``unanswered``)
    # samples well under the round trip lately: (time, a ping's?)
    _lower: list[tuple[float, bool]] = field(default_factory=list, repr=False)

    def observe_rtt(self, rtt_ms: float, now: float | None = None) -> None:
        """A round trip with (almost) no payload: a ping's."""
        if rtt_ms >= 0:
            t = _now(now)
            with self._lock:
                self._pings.append((t, rtt_ms))
                self._last_ping = max(self._last_ping, t)
                self._mark(t)
                self._check_faster(t, rtt_ms, ping=True)

    def rtt_age_s(self, now: float | None = None) -> float | None:
        """Seconds since the newest ping the round trip comes from (None: none yet): a link never idle
        keeps an old reading, which a reader should know is old."""
        return None if self._last_ping == -math.inf else max(0.0, _now(now) - self._last_ping)

    def observe(
        self,
        sent_bytes: int,
        network_ms: float,
        now: float | None = None,
        sent_at: float | None = None,
        reply_bytes: int = 0,
    ) -> None:
        """One request's bytes and network time; ``sent_at``: when it was sent (seconds, the clock all
        of a link's clients use), which tells whether it queued behind the one before; ``reply_bytes``:
        its answer's, whose way back is in the network time too."""
        if network_ms > 0:
            t = _now(now)
            kbits = 8e-3 * wire_bytes(sent_bytes) if sent_bytes > 0 else 0.0
            # the reply's time, in uplink bits (a queued request's transfer is timed between arrivals at
            # the server, which its reply is not part of)
            back = (
                8e-3 * wire_bytes(reply_bytes) / self.down_ratio
                if reply_bytes > 0 and self.down_ratio
                else 0.0
            )
            with self._lock:
                transfer = None
                if sent_at is not None:
                    arrived = sent_at + network_ms / 1e3
                    if sent_at < self._arrived - (self._rtt or 0.0) / 1e3 and arrived > self._arrived:
                        transfer = (arrived - self._arrived) * 1e3
                    self._arrived = max(self._arrived, arrived)
                self._trips.append((t, kbits, network_ms, transfer, back))
                self._ceiling = None  # a request got through: the link carries what it carries
                self.samples += 1
                self._mark(t)
                self._check_faster(t, network_ms, ping=False)

    def unanswered(self, sent_bytes: int, waited_ms: float) -> None:
        """A request still unanswered ``waited_ms`` after it was sent (its timeout): its bytes took longer
        than that to cross, so the uplink is at most their rate over the wait (``ceiling_mbps``, until a
        request completes again). A link that fell to next to nothing completes no request, and the
        estimate, made of completed ones, held its last value: a plan set stayed on a member that sends,
        each request waiting out its timeout (0.05 Mbit/s for 10 s read 8.9 throughout). The bound is
        kept apart from the estimate: taken in as a sample it also held the client's own sending back
        (a request that cannot be answered in time at the estimate is not sent), so after one lost reply
        nothing was sent again and nothing could lift it. Not before a ping was answered: no round trip
        to take off."""
        with self._lock:
            if not self._pings:
                return
            ms = max(waited_ms - (self._rtt or 0.0), 1e-3)
            bound = 8e-3 * wire_bytes(sent_bytes) / ms
            self._ceiling = bound if self._ceiling is None else min(bound, self._ceiling)

    @property
    def ceiling_mbps(self) -> float | None:
        """The most the uplink can be, from requests unanswered at their timeout since the last one that
        completed (None: none)."""
        return self._ceiling

    # -- the queue on the link ---------------------------------------------------------------------
    def sent(self, nbytes: int) -> None:
        """A request's payload went onto the link."""
        with self._lock:
            self._in_pipe += round(wire_bytes(nbytes))

    def cleared(self, nbytes: int) -> None:
        """A request's payload is off the link: answered, or lost with its connection."""
        with self._lock:
            self._in_pipe = max(0, self._in_pipe - round(wire_bytes(nbytes)))

    @property
    def in_pipe(self) -> int:
        return self._in_pipe

    def wait_s(self, nbytes: int) -> float | None:
        """Seconds until a request of ``nbytes`` sent now would be answered, at the estimate, behind what
        is still unanswered (estimated; None without an uplink estimate). An upper bound: part of what is
        unanswered is already past the link, at the server or on its way back. Asked before each
        pipelined send, it takes the medians again at most every ``REFRESH_S`` (over a full window they
        cost ~0.3 ms, more than the rest of a small request's overhead)."""
        t = time.monotonic()
        with self._lock:
            if t - self._refreshed >= REFRESH_S or self._uplink is None:
                self._refresh()
                self._refreshed = t
            up, rtt, ahead = self._uplink, self._rtt, self._in_pipe
        if up is None or up <= 0:
            return None
        return 8 * (ahead + wire_bytes(nbytes)) / (up * 1e6) + (rtt or 0.0) / 1e3

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

    def _check_faster(self, t: float, ms: float, ping: bool) -> None:
        """Restart the round trip from the first of the samples that came in well under it within half a
        window, once there are two and one is a ping (see the module's docstring): one alone can be the
        jitter's lower tail, and a request's network time bounds the round trip only from above (it
        holds the request's own transfer: taken as the round trip, the least of a few requests' times
        leaves each of them next to no transfer time, and the uplink reads as fast as can be told)."""
        if self._rtt is None or ms >= DROP * self._rtt:
            return
        low = [s for s in self._lower if t - s[0] <= self.horizon_s / 2] + [(t, ping)]
        if len(low) >= 2 and any(p for _, p in low):
            self._rtt_since, self._lower = low[0][0], []
            self._refresh()  # later samples are judged against the new round trip: the pings since
        else:
            self._lower = low[-2:]

    def _recent(self, q: collections.deque | list, now: float) -> list:
        """The samples inside the window (the last ``max_samples`` of them), or the last ``min_samples``
        if fewer are."""
        cut = now - self.horizon_s
        inside = [s for s in q if s[0] >= cut]
        return (
            inside[-self.max_samples :] if len(inside) >= self.min_samples else list(q)[-self.min_samples :]
        )

    def _refresh(self) -> None:
        if not self._stale:
            return
        self._stale = False
        since = self._rtt_since
        pings = self._recent(
            self._pings if since == -math.inf else [p for p in self._pings if p[0] >= since], self._last
        )
        trips = self._recent(self._trips, self._last)
        if pings:
            self._rtt = statistics.median(r for _, r in pings)
        elif trips:  # no ping answered yet: a request's network time is an upper bound on the path's
            self._rtt = min(t[2] for t in trips)
        rtt = self._rtt or 0.0
        # each request's uplink rate; one whose network time is within the round trip's spread carried
        # too little to time (its transfer is lost in the jitter): as fast as can be told, not skipped,
        # which would leave only the slow ones to vote
        rates = [(_rate(kb, n, rtt, x, back), kb) for _, kb, n, x, back in trips if kb > 0]
        if rates:
            mid = weighted_median(rates)
            if math.isfinite(mid):
                self._uplink = mid


def weighted_median(samples: list[tuple[float, float]]) -> float:
    """The median of (rate, kilobits) samples with each weighted by the bits it carried, as a link's rate
    is its bits over its time: a 27 KiB request on Wi-Fi crosses in about 11 ms, less than the jitter
    and a throttled edge's wake-ups add to its network time, while a 150 KiB one is timed well. By count,
    a stream of small requests outvoted the few large ones and read an 18.9 Mbit/s link as 8-12 for
    seconds after a change. Still a median: one slow request moves it only as far as its bits weigh."""
    ordered = sorted(samples)
    half = sum(w for _, w in ordered) / 2
    seen = 0.0
    for i, (rate, w) in enumerate(ordered):
        seen += w
        if seen > half:
            return rate
        if seen == half:  # exactly between two samples, as the plain median of an even count
            return (rate + ordered[i + 1][0]) / 2
    return ordered[-1][0]


def _rate(
    kbits: float, network_ms: float, rtt_ms: float, transfer_ms: float | None, back: float = 0.0
) -> float:
    """Kilobits per millisecond (Mbit/s): over the transfer where the request queued, else over its
    network time less the round trip, which also carried the reply (``back``: its kilobits at uplink
    speed)."""
    if transfer_ms is not None:
        return kbits / transfer_ms if transfer_ms > 0.05 else math.inf
    ms = network_ms - rtt_ms
    return (kbits + back) / ms if ms > 0.05 else math.inf


def _now(now: float | None) -> float:
    return time.monotonic() if now is None else now
