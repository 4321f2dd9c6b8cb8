"""The edge's estimate of its uplink, from its own requests: no probe traffic.

Each answered request gives one sample: the bytes it sent over the time the network took (the request's
time on the edge's clock minus the server's own time minus the round trip). One slow request (a
scheduling hiccup, a retransmission) must not move the estimate, yet a real change of link (Wi-Fi to
LTE: 10× within a second) must move it within a few requests. So a sample far from the estimate (by
more than ``reject``× either way) is held back; ``confirm`` such samples in a row, on the same side,
are a change, and the estimate restarts from their median.
"""

from __future__ import annotations

import collections
import statistics
import threading
from dataclasses import dataclass, field

from splitpoint.partitioner.costmodel import wire_bytes


@dataclass
class LinkEstimator:
    alpha: float = 0.3  # weight of a new sample in the running estimate
    reject: float = 2.0  # a sample this many times off the estimate (either way) is an outlier
    confirm: int = 3  # outliers in a row on the same side that mean the link changed
    uplink_mbps: float | None = None
    rtt_ms: float | None = None
    samples: int = 0
    rejected: int = 0
    _held: list[float] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # shared by a set's clients
    _pings: collections.deque = field(default_factory=lambda: collections.deque(maxlen=16), repr=False)
    _trips: collections.deque = field(default_factory=lambda: collections.deque(maxlen=16), repr=False)

    def observe_rtt(self, rtt_ms: float) -> None:
        """A round trip with (almost) no payload: a ping's."""
        if rtt_ms >= 0:
            with self._lock:
                self._pings.append(rtt_ms)
                self._round_trip()

    def _round_trip(self) -> None:
        """The round trip is the least of the recent pings and requests (as TCP's min-RTT filter):
        every round trip is the path's plus some waiting (a handshake, a busy thread, payload),
        never less. Kept apart, so that a run of requests, all with payload, cannot push the pings
        out of the window."""
        self.rtt_ms = min([*self._pings, *self._trips]) if self._pings or self._trips else None

    def observe(self, sent_bytes: int, network_ms: float) -> float | None:
        """One request's bytes and network time; the updated uplink estimate (None: none yet)."""
        with self._lock:
            return self._observe(sent_bytes, network_ms)

    def _observe(self, sent_bytes: int, network_ms: float) -> float | None:
        if network_ms > 0:
            self._trips.append(network_ms)  # a round trip with a payload: no shorter than the path's
            self._round_trip()
        transfer = network_ms - (self.rtt_ms or 0.0)
        if sent_bytes <= 0 or transfer <= 0.05:
            return self.uplink_mbps
        mbps = 8e-3 * wire_bytes(sent_bytes) / transfer
        self.samples += 1
        est = self.uplink_mbps
        if est is None:
            self.uplink_mbps = mbps
            return mbps
        ratio = mbps / est
        if 1 / self.reject <= ratio <= self.reject:
            self._held.clear()
            self.uplink_mbps = (1 - self.alpha) * est + self.alpha * mbps
            return self.uplink_mbps
        if self._held and (self._held[-1] > est) != (mbps > est):
            self._held.clear()  # outliers on both sides: noise, not a change
        self._held.append(mbps)
        self.rejected += 1
        if len(self._held) >= self.confirm:
            self.uplink_mbps = statistics.median(self._held)
            self._held.clear()
        return self.uplink_mbps
