"""An emulated link between an edge process and a server process, set up and torn down whole.

Mechanisms, chosen automatically and reported:
- ``netns``: as root, two network namespaces joined by a veth pair, tbf for each direction's
  rate (kernel queueing), and the link proxy in the edge namespace as the delay line;
- ``proxy``: without root, the link proxy on loopback does rate, delay and jitter itself;
- ``loopback``: no emulation (the runtime's own overhead).
Loss is emulated by the proxy in both as retransmission delay (see ``shaper``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass

from splitpoint.app.broker import free_port
from splitpoint.app.process import stop
from splitpoint.core.errors import SplitPointError
from splitpoint.partitioner.costmodel import Link, downlink_ms, uplink_ms

from . import netns

MECHANISMS = ("auto", "netns", "proxy", "loopback")


@dataclass
class Emulated:
    """What the runs need to know: where the server binds, where the edge connects, how to start each."""

    mechanism: str
    detail: str
    link: Link | None
    server_bind: str
    edge_connect: str
    server_prefix: list[str]
    edge_prefix: list[str]

    def predicted_ms(self, up_bytes: int, down_bytes: int) -> float:
        """One request/response over this link by the cost model (framing included)."""
        if self.link is None:
            return 0.0
        return self.link.rtt_ms + uplink_ms(up_bytes, self.link) + downlink_ms(down_bytes, self.link)

    def to_dict(self) -> dict:
        return {
            "mechanism": self.mechanism,
            "detail": self.detail,
            "link": None if self.link is None else self.link.__dict__,
        }


@dataclass
class EmulatedHops:
    """A chain of devices over emulated links: device j binds ``binds[j]`` (j >= 1), reaches device j+1
    at ``connects[j]``, and is started with ``prefixes[j]`` (its namespace, if any)."""

    mechanism: str
    details: list[str]
    links: list[Link | None]
    binds: list[str]
    connects: list[str]
    prefixes: list[list[str]]

    def hop(self, h: int) -> Emulated:
        """Hop ``h`` seen as one link between two devices."""
        return Emulated(
            self.mechanism,
            self.details[h],
            self.links[h],
            self.binds[h + 1],
            self.connects[h],
            self.prefixes[h + 1],
            self.prefixes[h],
        )


class EmulatedChain:
    """One emulated link per hop of a chain, set up and torn down whole: network namespaces (one per
    device, tbf on each veth, a userspace delay line per hop) as root, else link proxies on loopback."""

    def __init__(self, links: list[Link | None], mechanism: str = "auto", base_port: int | None = None):
        if mechanism not in MECHANISMS:
            raise SplitPointError(
                f"unknown link mechanism {mechanism!r}; choose from {', '.join(MECHANISMS)}"
            )
        self.links, self.mechanism, self.base_port = links, mechanism, base_port
        self._ns: netns.Chain | None = None
        self._proxies: list[subprocess.Popen] = []

    def __enter__(self) -> EmulatedHops:
        try:
            return self._setup()
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def _setup(self) -> EmulatedHops:
        n = len(self.links) + 1
        if all(link is None for link in self.links) or self.mechanism == "loopback":
            ports = [self.base_port + h if self.base_port else free_port() for h in range(n - 1)]
            eps = ["", *(f"tcp://127.0.0.1:{p}" for p in ports)]
            details = ["no emulation: tcp loopback"] * (n - 1)
            return EmulatedHops(
                "loopback", details, list(self.links), eps, [*eps[1:], ""], [[] for _ in range(n)]
            )
        why_not = netns.available()
        if self.mechanism == "netns" and why_not:
            raise netns.NetnsError(f"the netns mechanism is not available: {why_not}")
        use_ns = self.mechanism == "netns" or (self.mechanism == "auto" and why_not is None)
        binds, connects, details = [""], [], []
        if use_ns:
            rates: list[tuple[float | None, float | None]] = [
                (link.uplink_mbps, link.downlink_mbps) if link else (None, None) for link in self.links
            ]
            self._ns = netns.Chain(uuid.uuid4().hex[:6], rates).__enter__()
            prefixes = [self._ns.device_prefix(j) for j in range(n)]
        else:
            prefixes = [[] for _ in range(n)]
        for h, link in enumerate(self.links):
            port = (self.base_port + h) if self.base_port else (5555 + h if use_ns else free_port())
            host = netns.hop_ips(h)[1] if use_ns else "127.0.0.1"
            binds.append(f"tcp://{host}:{port}")
            if link is None:
                connects.append(binds[-1])
                details.append("no emulation")
                continue
            rate = (0.0, 0.0) if use_ns else (link.uplink_mbps, link.downlink_mbps)
            listen = self._proxy(prefixes[h], f"{host}:{port}", rate, link)
            connects.append(f"tcp://{listen}")
            details.append(_describe(link, use_ns, why_not))
        connects.append("")
        return EmulatedHops(
            "netns" if use_ns else "proxy", details, list(self.links), binds, connects, prefixes
        )

    def _proxy(self, prefix: list[str], upstream: str, rate: tuple[float, float], link: Link) -> str:
        """A link proxy (in the sending device's namespace): it listens on loopback there."""
        args = ["--listen", "127.0.0.1:0", "--upstream", upstream]
        args += ["--up-mbps", str(rate[0]), "--down-mbps", str(rate[1]), "--delay-ms", str(link.rtt_ms / 2)]
        args += ["--jitter-ms", str(link.jitter_ms), "--loss", str(link.loss)]
        proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "splitpoint.app.bench.proxy", *args],
            stdin=subprocess.PIPE,  # reshape commands (``reshape``); never this process's own input
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._proxies.append(proc)
        assert proc.stdout is not None and proc.stderr is not None  # both PIPE
        line = proc.stdout.readline()
        if not line:
            raise SplitPointError(f"link proxy did not start: {proc.stderr.read().strip()}")
        return json.loads(line)["listen"]

    def reshape(self, h: int, link: Link) -> None:
        """Hop ``h`` becomes ``link`` now, under live connections (a trace's next phase). The proxy
        mechanism only: there the proxy holds both rate and delay."""
        if self._ns is not None:
            raise SplitPointError("live reshaping needs the proxy mechanism (--link proxy)")
        if not 0 <= h < len(self._proxies):
            raise SplitPointError(f"no emulated hop {h}")
        proc = self._proxies[h]
        assert proc.stdin is not None and proc.stdout is not None  # both PIPE
        cmd = {
            "up_mbps": link.uplink_mbps,
            "down_mbps": link.downlink_mbps,
            "delay_ms": link.rtt_ms / 2,
            "jitter_ms": link.jitter_ms,
            "loss": link.loss,
        }
        proc.stdin.write(json.dumps(cmd) + "\n")
        proc.stdin.flush()
        answer = json.loads(proc.stdout.readline() or '{"error": "the link proxy has exited"}')
        if "error" in answer:
            raise SplitPointError(f"link proxy refused to reshape: {answer['error']}")

    def __exit__(self, *exc) -> None:
        for proc in self._proxies:
            stop(proc, 5)
        self._proxies.clear()
        if self._ns is not None:
            self._ns.__exit__(None, None, None)
            self._ns = None


def _describe(link: Link, use_ns: bool, why_not: str | None) -> str:
    shaping = (
        f"tbf {link.uplink_mbps:g} Mbit/s up, {link.downlink_mbps:g} Mbit/s down on the veth pair; userspace "
        "delay line"
        if use_ns
        else f"userspace TCP link proxy on loopback{f' ({why_not})' if why_not else ''}: token bucket "
        f"{link.uplink_mbps:g} Mbit/s up, {link.downlink_mbps:g} Mbit/s down"
    )
    return (
        f"{shaping}, {link.rtt_ms / 2:g} ms each way, jitter {link.jitter_ms:g} ms, loss {link.loss:g} as "
        "retransmission delay"
    )


class EmulatedLink:
    """The link between an edge process and a server process: the chain of one hop."""

    def __init__(self, link: Link | None, mechanism: str = "auto", server_port: int | None = None):
        self._chain = EmulatedChain([link], mechanism, server_port)

    def __enter__(self) -> Emulated:
        return self._chain.__enter__().hop(0)

    def __exit__(self, *exc) -> None:
        self._chain.__exit__(*exc)


def probe_link(em: Emulated, cases: list[tuple[int, int, int]]) -> list[dict]:
    """The link itself, measured with plain TCP request/response exchanges between the two sides
    (server namespace ↔ edge namespace, or through the proxy) before the runtime uses the port.

    ``cases``: (bytes up, bytes down, repeats). Each row gets the cost model's figure beside the median."""
    bind = em.server_bind[len("tcp://") :]
    srv = subprocess.Popen(
        [*em.server_prefix, sys.executable, "-m", "splitpoint.app.bench.probe", "serve", "--bind", bind],
        stdout=subprocess.PIPE,
        text=True,
    )
    rows: list[dict] = []
    try:
        assert srv.stdout is not None  # PIPE
        if not srv.stdout.readline():
            raise SplitPointError("the link probe's server did not start")
        for up, down, repeats in cases:
            cmd = [*em.edge_prefix, sys.executable, "-m", "splitpoint.app.bench.probe", "measure"]
            args = [
                "--connect",
                em.edge_connect[len("tcp://") :],
                "--sizes",
                f"{up}:{down}",
                "--repeats",
                str(repeats),
            ]
            out = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)
            if out.returncode:
                raise SplitPointError(f"link probe failed: {out.stderr.strip()[-300:]}")
            rows += json.loads(out.stdout)
    finally:
        srv.kill()
        srv.wait()
    for r in rows:
        r["predicted_ms"] = em.predicted_ms(r["up_bytes"], r["down_bytes"])
        r.pop("samples_ms", None)
    return rows
