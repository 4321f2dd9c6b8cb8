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


class EmulatedLink:
    def __init__(self, link: Link | None, mechanism: str = "auto", server_port: int | None = None):
        if mechanism not in MECHANISMS:
            raise SplitPointError(
                f"unknown link mechanism {mechanism!r}; choose from {', '.join(MECHANISMS)}"
            )
        self.link, self.mechanism, self.server_port = link, mechanism, server_port
        self._ns: netns.Namespaces | None = None
        self._proxy: subprocess.Popen | None = None

    def __enter__(self) -> Emulated:
        try:
            return self._setup()
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def _setup(self) -> Emulated:
        link, mech = self.link, self.mechanism
        if link is None or mech == "loopback":
            port = self.server_port or free_port()
            ep = f"tcp://127.0.0.1:{port}"
            return Emulated("loopback", "no emulation: tcp loopback", None, ep, ep, [], [])
        why_not = netns.available()
        if mech == "netns" and why_not:
            raise netns.NetnsError(f"the netns mechanism is not available: {why_not}")
        use_ns = mech == "netns" or (mech == "auto" and why_not is None)
        if use_ns:
            self._ns = netns.Namespaces(
                uuid.uuid4().hex[:6], link.uplink_mbps, link.downlink_mbps
            ).__enter__()
            port = self.server_port or 5555
            upstream, edge_prefix, server_prefix = (
                f"{netns.SERVER_IP}:{port}",
                self._ns.prefix("edge"),
                self._ns.prefix("server"),
            )
            rate = (0.0, 0.0)
            detail = (
                f"namespaces {self._ns.edge} / {self._ns.server} over veth; tbf {link.uplink_mbps:g} Mbit/s "
                f"up, "
                f"{link.downlink_mbps:g} Mbit/s down; userspace delay line {link.rtt_ms / 2:g} ms each way, "
                f"jitter {link.jitter_ms:g} ms, loss {link.loss:g} as retransmission delay"
            )
        else:
            port = self.server_port or free_port()
            upstream, edge_prefix, server_prefix = f"127.0.0.1:{port}", [], []
            rate = (link.uplink_mbps, link.downlink_mbps)
            detail = (
                f"userspace TCP link proxy on loopback{f' ({why_not})' if why_not else ''}: token bucket "
                f"{link.uplink_mbps:g} Mbit/s up, {link.downlink_mbps:g} Mbit/s down, {link.rtt_ms / 2:g} "
                f"ms each way, "
                f"jitter {link.jitter_ms:g} ms, loss {link.loss:g} as retransmission delay"
            )
        self._proxy = subprocess.Popen(
            [
                *edge_prefix,
                sys.executable,
                "-m",
                "splitpoint.app.bench.proxy",
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                upstream,
                "--up-mbps",
                str(rate[0]),
                "--down-mbps",
                str(rate[1]),
                "--delay-ms",
                str(link.rtt_ms / 2),
                "--jitter-ms",
                str(link.jitter_ms),
                "--loss",
                str(link.loss),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert self._proxy.stdout is not None and self._proxy.stderr is not None  # both PIPE
        line = self._proxy.stdout.readline()
        if not line:
            raise SplitPointError(f"link proxy did not start: {self._proxy.stderr.read().strip()}")
        listen = json.loads(line)["listen"]
        server_host = upstream.rpartition(":")[0]
        return Emulated(
            "netns" if use_ns else "proxy",
            detail,
            link,
            f"tcp://{server_host}:{port}",
            f"tcp://{listen}",
            server_prefix,
            edge_prefix,
        )

    def __exit__(self, *exc) -> None:
        if self._proxy is not None:
            stop(self._proxy, 5)
            self._proxy = None
        if self._ns is not None:
            self._ns.__exit__(None, None, None)
            self._ns = None


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
