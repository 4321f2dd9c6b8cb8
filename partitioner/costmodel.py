"""The cost model: predicted figures for one candidate on one link. Pure functions over plain
data, no I/O, so they are tested exhaustively and run in microseconds.

Every input is a measurement (profiles, encoded sizes, codec throughput, fidelity runs) or a
network profile's figure; every output is therefore *derived*, and labelled so by the planner.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from splitpoint.core.plan import EDGE_ONLY, SERVER_ONLY


@dataclass(frozen=True)
class Link:
    """What the cost model needs of a network profile."""

    name: str
    uplink_mbps: float
    downlink_mbps: float
    rtt_ms: float
    jitter_ms: float = 0.0
    loss: float = 0.0


@dataclass(frozen=True)
class CandidateInput:
    """Measured facts about one (cut, codec, head precision) choice, independent of the link."""

    kind: str  # split | edge-only | server-only
    cut: int | None  # cut index; 0 for server-only, None for edge-only
    codec: str
    head_weights: str  # float32 | int8
    head_ms: float  # edge compute before the cut (edge profile)
    tail_ms: float  # server compute after the cut (server profile)
    encode_ms: float  # on the edge
    decode_ms: float  # on the server
    up_bytes: int  # encoded payload per inference (measured on sample inputs)
    down_bytes: int  # reply: the tail's outputs, float32
    edge_memory_bytes: int
    fidelity: float | None  # measured agreement with the unsplit float model (1.0 = identical)
    # the runtime's own time per request beyond compute and codec (its sockets, threads and framing), on
    # each side, from profiles measured with --runtime: a tiny model's 3 ms per request on a Pi-class
    # edge bounds it at 300/s, which a plan without it predicted at 5,000/s
    edge_runtime_ms: float = 0.0
    server_runtime_ms: float = 0.0
    # where head_ms and tail_ms come from: "measured" (the whole model, or an anchor cut the profiler
    # timed), "interpolated" (between anchors along the per-node profile), "scaled" (an int8 head: the
    # float32 time times the measured int8/float32 ratio); what a plan's labels say of them
    head_timing: str = "measured"
    tail_timing: str = "measured"
    # edge_runtime_ms and server_runtime_ms: measured by `profile --runtime`, or 0 where it was not
    runtime_timing: str = "measured"


# what a plan set records of a member (``MemberFacts``): the figures the edge re-judges it by
TIMING_FIELDS = ("head_timing", "tail_timing", "runtime_timing")
RUNTIME_NOT_MEASURED = "not measured (profiles made without --runtime): none counted"


def member_facts(c: CandidateInput) -> dict:
    return {k: v for k, v in asdict(c).items() if k not in TIMING_FIELDS}


@dataclass
class Candidate:
    inp: CandidateInput
    link: str
    latency_ms: float
    throughput_ips: float
    edge_ms: float
    transfer_ms: float
    bytes_per_inference: int
    breakdown: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        i = self.inp
        if i.kind == EDGE_ONLY:
            return f"edge-only{' int8' if i.head_weights == 'int8' else ''}"
        if i.kind == SERVER_ONLY:
            return f"server-only {i.codec}"
        return f"cut {i.cut} {i.codec}{' int8-head' if i.head_weights == 'int8' else ''}"

    @property
    def window(self) -> int:
        """Requests in flight that reach ``throughput_ips`` (Little's law: throughput × latency, rounded
        up). With fewer the edge gets at most window ÷ latency: at its default of 4, a small model behind a
        70 ms round trip served 57/s of a predicted 2,665/s. Derived, as the figures it comes from."""
        if not (math.isfinite(self.throughput_ips) and math.isfinite(self.latency_ms)):
            return 1
        return max(1, math.ceil(self.latency_ms * self.throughput_ips / 1000 - 1e-9))

    def objectives(self) -> tuple[float, float, float, float, float]:
        """All to be minimised: latency, -throughput, edge memory, bytes, -fidelity."""
        return (
            self.latency_ms,
            -self.throughput_ips,
            float(self.inp.edge_memory_bytes),
            float(self.bytes_per_inference),
            -(self.inp.fidelity if self.inp.fidelity is not None else -1.0),
        )

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            **asdict(self.inp),
            "link": self.link,
            "latency_ms": self.latency_ms,
            "throughput_ips": self.throughput_ips,
            "window": self.window,  # requests in flight that throughput needs
            "edge_ms": self.edge_ms,
            "transfer_ms": self.transfer_ms,
            "bytes_per_inference": self.bytes_per_inference,
            "breakdown": self.breakdown,
            "derived": True,  # the prediction as a whole; ``labels`` says it of each figure
            "labels": self.labels(),
        }

    def labels(self) -> dict[str, str]:
        """Measured or derived, figure by figure (a plan's reader cannot otherwise tell an anchor cut's
        timing from an interpolated one, or a measured fidelity from a missing one)."""
        i = self.inp
        derived = "derived"
        return {
            "latency_ms": derived,
            "throughput_ips": derived,
            "window": derived,
            "edge_ms": derived,
            "transfer_ms": derived,
            "breakdown": derived,
            "head_ms": i.head_timing,
            "tail_ms": i.tail_timing,
            "encode_ms": "derived: bytes / the edge's measured codec speed",
            "decode_ms": "derived: bytes / the server's measured codec speed",
            "up_bytes": "measured: the encoded cut tensor on the samples",
            "down_bytes": "derived: the reply's tensors at their declared sizes (measured on the samples "
            "where none is declared), and a 128-byte header",
            "bytes_per_inference": "up_bytes + down_bytes",
            "edge_memory_bytes": "from the edge profile (each cut's memory_source says how)",
            "fidelity": "measured" if i.fidelity is not None else "not measured",
            "edge_runtime_ms": i.runtime_timing,
            "server_runtime_ms": i.runtime_timing,
        }


def traffic_bytes(c: CandidateInput) -> int:
    """Bytes sent and received per inference (the encoded cut tensor, the reply), as ``--max-bytes``
    limits them; the link's TCP/IP framing is not counted (``wire_bytes``)."""
    return 0 if c.kind == EDGE_ONLY else c.up_bytes + c.down_bytes


MSS = 1448  # TCP payload per segment on a 1500-byte MTU with timestamps
FRAME_OVERHEAD = 66  # Ethernet 14 + IPv4 20 + TCP 20 + timestamps 12 bytes per segment


def wire_bytes(payload: float) -> float:
    """Bytes a link carries for ``payload`` bytes of TCP payload: link rates count the framing too."""
    return payload + FRAME_OVERHEAD * max(1, math.ceil(payload / MSS)) if payload else 0


def uplink_ms(n_bytes: float, link: Link) -> float:
    """Serialisation time on the uplink; loss is charged as the share of bytes sent again."""
    return 8e-3 * wire_bytes(n_bytes) / (link.uplink_mbps * (1.0 - link.loss))


def downlink_ms(n_bytes: float, link: Link) -> float:
    return 8e-3 * wire_bytes(n_bytes) / (link.downlink_mbps * (1.0 - link.loss))


def evaluate(c: CandidateInput, link: Link) -> Candidate:
    """Latency = head + encode + uplink + RTT + decode + tail + downlink; pipelined throughput
    = 1 / the slowest stage (edge compute, uplink, server compute, downlink), because with
    several requests in flight each stage works on a different one."""
    if c.kind == EDGE_ONLY:
        return Candidate(
            c,
            link.name,
            c.head_ms,
            1000.0 / c.head_ms if c.head_ms > 0 else float("inf"),
            c.head_ms,
            0.0,
            0,
            {"head_ms": c.head_ms},
        )
    up = uplink_ms(c.up_bytes, link)
    down = downlink_ms(c.down_bytes, link)
    transfer = up + down + link.rtt_ms
    edge = c.head_ms + c.encode_ms + c.edge_runtime_ms
    server = c.decode_ms + c.tail_ms + c.server_runtime_ms
    latency = edge + transfer + server
    slowest = max(edge, up, server, down, 1e-9)
    return Candidate(
        c,
        link.name,
        latency,
        1000.0 / slowest,
        edge,
        transfer,
        traffic_bytes(c),
        {
            "head_ms": c.head_ms,
            "encode_ms": c.encode_ms,
            "uplink_ms": up,
            "rtt_ms": link.rtt_ms,
            "decode_ms": c.decode_ms,
            "tail_ms": c.tail_ms,
            "downlink_ms": down,
            **({"runtime_edge_ms": c.edge_runtime_ms} if c.edge_runtime_ms else {}),
            **({"runtime_server_ms": c.server_runtime_ms} if c.server_runtime_ms else {}),
        },
    )
