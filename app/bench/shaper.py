"""The link model a proxy applies to each direction of a TCP stream. Pure: it turns "these bytes
arrived now" into "deliver them then", so it is tested without sockets or clocks.

One bottleneck of ``rate`` bit/s serialises the bytes in order (with TCP/IP framing counted
as on a real link), shared by every connection over the link as a modem's queue is: a connection
opened while another has a backlog waits behind it instead of getting a link of its own. Each piece
then travels ``delay`` plus a jitter sample, and never overtakes the piece before it on its
connection (TCP delivers in order, so jitter can only hold data back). A segment lost with
probability ``loss`` holds its piece back one extra round trip (fast retransmit); TCP's
congestion-window reaction to the loss is not modelled.
"""

from __future__ import annotations

import math
import random
import threading
from dataclasses import dataclass, field

from splitpoint.partitioner.costmodel import MSS, wire_bytes

PIECE = 16 * 1024  # the proxy schedules at most this many bytes at a time


@dataclass
class Direction:
    rate_bps: float | None  # None: no rate limit here (tbf does it, or an unlimited link)
    delay_s: float  # one way
    jitter_s: float = 0.0  # standard deviation of the per-piece delay variation
    loss: float = 0.0  # per-segment loss probability


@dataclass
class Bottleneck:
    """The serialising queue of one direction of a link, shared by its connections' shapers."""

    free_at: float = 0.0  # when it has sent everything so far
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def take(self, now: float, seconds: float) -> float:
        """Occupy the link for ``seconds`` from ``now`` or when it is free; when that ends."""
        with self.lock:
            self.free_at = max(now, self.free_at) + seconds
            return self.free_at


class Shaper:
    """One connection's direction: its own delay, jitter and order over a (shared) bottleneck."""

    def __init__(self, d: Direction, seed: int = 0, link: Bottleneck | None = None):
        self.d = d
        self.rng = random.Random(seed)
        self.link = link or Bottleneck()
        self.last_delivery = 0.0

    def schedule(self, now: float, n: int) -> float:
        """Delivery time of ``n`` bytes that reached the link at ``now``."""
        sent = self.link.take(now, 8.0 * wire_bytes(n) / self.d.rate_bps if self.d.rate_bps else 0.0)
        delay = self.d.delay_s
        if self.d.jitter_s:
            delay += min(max(self.rng.gauss(0.0, self.d.jitter_s), -self.d.delay_s), 3 * self.d.jitter_s)
        if self.d.loss:
            segments = max(1, math.ceil(n / MSS))
            if any(self.rng.random() < self.d.loss for _ in range(segments)):
                delay += 2 * self.d.delay_s  # losses in one piece are recovered in the same round trip
        t = max(sent + delay, self.last_delivery)
        self.last_delivery = t
        return t
