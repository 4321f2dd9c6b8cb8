"""The link model a proxy applies to each direction of a TCP stream. Pure: it turns "these bytes
arrived now" into "deliver them then", so it is tested without sockets or clocks.

One bottleneck of ``rate`` bit/s serialises the bytes in order (with TCP/IP framing counted
as on a real link); each piece then travels ``delay`` plus a jitter sample, and never overtakes
the piece before it (TCP delivers in order, so jitter can only hold data back). A segment
lost with probability ``loss`` holds its piece back one extra round trip (fast retransmit); TCP's
congestion-window reaction to the loss is not modelled.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from splitpoint.partitioner.costmodel import MSS, wire_bytes

PIECE = 16 * 1024  # the proxy schedules at most this many bytes at a time


@dataclass
class Direction:
    rate_bps: float | None  # None: no rate limit here (tbf does it, or an unlimited link)
    delay_s: float  # one way
    jitter_s: float = 0.0  # standard deviation of the per-piece delay variation
    loss: float = 0.0  # per-segment loss probability


class Shaper:
    def __init__(self, d: Direction, seed: int = 0):
        self.d = d
        self.rng = random.Random(seed)
        self.free_at = 0.0  # when the bottleneck has sent everything so far
        self.last_delivery = 0.0

    def schedule(self, now: float, n: int) -> float:
        """Delivery time of ``n`` bytes that reached the link at ``now``."""
        start = max(now, self.free_at)
        self.free_at = start + (8.0 * wire_bytes(n) / self.d.rate_bps if self.d.rate_bps else 0.0)
        delay = self.d.delay_s
        if self.d.jitter_s:
            delay += min(max(self.rng.gauss(0.0, self.d.jitter_s), -self.d.delay_s), 3 * self.d.jitter_s)
        if self.d.loss:
            segments = max(1, math.ceil(n / MSS))
            if any(self.rng.random() < self.d.loss for _ in range(segments)):
                delay += 2 * self.d.delay_s  # losses in one piece are recovered in the same round trip
        t = max(self.free_at + delay, self.last_delivery)
        self.last_delivery = t
        return t
