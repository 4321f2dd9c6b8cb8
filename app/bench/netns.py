"""Two network namespaces joined by a veth pair, with a tbf rate limit on each end: real kernel
queueing for the bandwidth. Delay and jitter come from the proxy (this kernel has no netem).

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

EDGE_IP, SERVER_IP = "10.213.0.1", "10.213.0.2"


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


@dataclass
class Namespaces:
    tag: str
    up_mbps: float | None
    down_mbps: float | None
    created: list[str] = field(default_factory=list)

    @property
    def edge(self) -> str:
        return f"sp-e-{self.tag}"

    @property
    def server(self) -> str:
        return f"sp-s-{self.tag}"

    def prefix(self, role: str) -> list[str]:
        return ["ip", "netns", "exec", self.edge if role == "edge" else self.server]

    def __enter__(self) -> Namespaces:
        if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
            raise NetnsError("network namespaces need root and iproute2 (ip, tc)")
        try:
            for ns in (self.edge, self.server):
                _run("ip", "netns", "add", ns)
                self.created.append(ns)
            ve, vs = f"spe{self.tag}"[:15], f"sps{self.tag}"[:15]
            _run(
                "ip",
                "link",
                "add",
                ve,
                "netns",
                self.edge,
                "type",
                "veth",
                "peer",
                "name",
                vs,
                "netns",
                self.server,
            )
            for ns, dev, ip, mbps in (
                (self.edge, ve, EDGE_IP, self.up_mbps),
                (self.server, vs, SERVER_IP, self.down_mbps),
            ):
                _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
                _run("ip", "-n", ns, "link", "set", dev, "up")
                _run("ip", "-n", ns, "link", "set", "lo", "up")
                if mbps:
                    _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", *tbf_args(mbps))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.created.clear()
