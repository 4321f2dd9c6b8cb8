"""Network namespaces, one per device, consecutive ones joined by a veth pair with a tbf rate limit on
each end: real kernel queueing for the bandwidth. Delay and jitter come from the proxy (this kernel has
no netem). Two namespaces (edge, server) are the chain of one hop.

Everything created is named with a per-run suffix and removed on exit, exceptions and
Ctrl-C included; deleting a namespace removes its veth end and qdiscs with it.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from dataclasses import dataclass, field

from splitpoint.core.errors import SplitPointError

EDGE_IP, SERVER_IP = "10.213.0.1", "10.213.0.2"  # hop 0's ends (hop_ips(0))


class NetnsError(SplitPointError):
    pass


@functools.lru_cache(maxsize=1)
def available() -> str | None:
    """None when namespaces + tbf can be used here, else why not. Being root is not enough in a
    container without CAP_NET_ADMIN or without sch_tbf, so a throwaway pair is tried once."""
    if os.geteuid() != 0:
        return "not root"
    if not shutil.which("ip") or not shutil.which("tc"):
        return "iproute2 (ip, tc) not installed"
    probe = Namespaces(f"p{os.getpid() % 100000}", 10.0, 10.0)
    try:
        with probe:
            pass
    except NetnsError as exc:
        return f"cannot create namespaces with tbf here ({exc})"
    return None


def _run(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise NetnsError(f"`{' '.join(cmd)}` failed: {r.stderr.strip() or r.stdout.strip()}")


def tbf_args(mbps: float) -> list[str]:
    """A small bucket (a few packets, >= 2 ms of rate) so the rate holds from the first packet;
    a queue deep enough (1 s) that the emulated link delays rather than drops."""
    rate_bytes = mbps * 1e6 / 8
    burst = int(max(2 * 1514, rate_bytes * 0.002))
    return [
        "tbf",
        "rate",
        f"{mbps * 1000:.0f}kbit",
        "burst",
        str(burst),
        "limit",
        str(int(max(rate_bytes, 200_000))),
    ]


def hop_ips(hop: int) -> tuple[str, str]:
    """The addresses at the two ends of hop ``hop`` of a chain (its own /24)."""
    return f"10.213.{hop}.1", f"10.213.{hop}.2"


@dataclass
class Chain:
    """One namespace per device of a chain, consecutive ones joined by a veth pair with a tbf on each
    end: ``rates[h]`` is hop h's (uplink, downlink) in Mbit/s (None: not limited)."""

    tag: str
    rates: list[tuple[float | None, float | None]]
    created: list[str] = field(default_factory=list)

    def name(self, device: int) -> str:
        return f"sp-{self.tag}-{device}"

    def device_prefix(self, device: int) -> list[str]:
        return ["ip", "netns", "exec", self.name(device)]

    def __enter__(self) -> Chain:
        if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
            raise NetnsError("network namespaces need root and iproute2 (ip, tc)")
        try:
            for d in range(len(self.rates) + 1):
                _run("ip", "netns", "add", self.name(d))
                self.created.append(self.name(d))
                _run("ip", "-n", self.name(d), "link", "set", "lo", "up")
            for h, (up, down) in enumerate(self.rates):
                a, b = f"sp{self.tag}{h}a"[:15], f"sp{self.tag}{h}b"[:15]
                veth = ["type", "veth", "peer", "name", b, "netns", self.name(h + 1)]
                _run("ip", "link", "add", a, "netns", self.name(h), *veth)
                for ns, dev, ip, mbps in (
                    (self.name(h), a, hop_ips(h)[0], up),
                    (self.name(h + 1), b, hop_ips(h)[1], down),
                ):
                    _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
                    _run("ip", "-n", ns, "link", "set", dev, "up")
                    if mbps:
                        tc = ["tc", "qdisc", "add", "dev", dev, "root", *tbf_args(mbps)]
                        _run("ip", "netns", "exec", ns, *tc)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.created.clear()


class Namespaces(Chain):
    """Two namespaces, edge and server: the chain of one hop."""

    def __init__(self, tag: str, up_mbps: float | None, down_mbps: float | None):
        super().__init__(tag, [(up_mbps, down_mbps)])

    @property
    def edge(self) -> str:
        return self.name(0)

    @property
    def server(self) -> str:
        return self.name(1)

    def prefix(self, role: str) -> list[str]:
        return self.device_prefix(0 if role == "edge" else 1)
