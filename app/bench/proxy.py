"""A link-emulating TCP proxy: the edge connects to it, it connects to the server, and each
direction of every connection goes through a Shaper (rate, delay, jitter, loss); the rate is one
bottleneck per direction that all the proxy's connections share, as they share a real uplink (an
edge with a connection per plan-set member gets one link, not one each).

This is the userspace mechanism (no root needed) and, with the rate left to tbf, the delay
line of the namespace mechanism: this kernel has no netem. Run it in-process (``LinkProxy``)
or as its own process (``python -m splitpoint.app.bench.proxy``) so the edge's CPU limit does
not slow the link down.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import signal
import socket
import sys
import threading
import time

from .shaper import PIECE, Bottleneck, Direction, Shaper

log = logging.getLogger("splitpoint.app.bench.proxy")
MAX_BUFFERED = 64 * 2**20  # per direction: the reader stops reading beyond this (back-pressure)


class _Pipe:
    """One direction of one connection: a reader that stamps and schedules, a writer that waits."""

    def __init__(self, src: socket.socket, dst: socket.socket, shaper: Shaper, stats: dict, key: str):
        self.src, self.dst, self.shaper = src, dst, shaper
        self.queue: collections.deque = collections.deque()
        self.cond = threading.Condition()
        self.buffered = 0
        self.eof = False
        self.stats, self.key = stats, key
        self.threads = [
            threading.Thread(target=self._read, daemon=True),
            threading.Thread(target=self._write, daemon=True),
        ]
        for t in self.threads:
            t.start()

    def _read(self) -> None:
        try:
            while True:
                data = self.src.recv(256 * 1024)
                if not data:
                    break
                now = time.monotonic()
                with self.cond:
                    while self.buffered > MAX_BUFFERED:
                        self.cond.wait(0.1)
                    for i in range(0, len(data), PIECE):
                        piece = data[i : i + PIECE]
                        self.queue.append((self.shaper.schedule(now, len(piece)), piece))
                        self.buffered += len(piece)
                    self.stats[self.key] += len(data)
                    self.cond.notify_all()
        except OSError:
            pass
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    def _write(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self.queue and not self.eof:
                        self.cond.wait(0.5)
                    if not self.queue:
                        break
                    due, piece = self.queue[0]
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                self.dst.sendall(piece)
                with self.cond:
                    self.queue.popleft()
                    self.buffered -= len(piece)
                    self.cond.notify_all()
        except OSError:
            pass
        for s in (self.dst, self.src):  # one side gone: close both so the peers see it
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


class LinkProxy:
    """Listen on ``listen`` (host, port; port 0 picks one), forward to ``upstream`` through the
    uplink shaper, and the replies back through the downlink shaper."""

    def __init__(
        self,
        listen: tuple[str, int],
        upstream: tuple[str, int],
        up: Direction,
        down: Direction,
        seed: int = 0,
    ):
        self.upstream, self.up, self.down, self.seed = upstream, up, down, seed
        self._links = Bottleneck(), Bottleneck()  # uplink, downlink: every connection's
        self.sock = socket.create_server(listen, reuse_port=False)
        self.address = self.sock.getsockname()[:2]
        self.stats: collections.Counter[str] = collections.Counter()
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True, name="splitpoint-link")

    def start(self) -> LinkProxy:
        self._thread.start()
        return self

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        n = 0
        while not self._stop.is_set():
            try:
                client, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError as exc:
                log.warning("upstream %s unreachable: %s", self.upstream, exc)
                client.close()
                continue
            server.settimeout(None)
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conns += [client, server]
            n += 1
            up = Shaper(self.up, self.seed + 2 * n, self._links[0])
            down = Shaper(self.down, self.seed + 2 * n + 1, self._links[1])
            _Pipe(client, server, up, self.stats, "up_bytes")
            _Pipe(server, client, down, self.stats, "down_bytes")

    def reshape(self, up: Direction, down: Direction) -> None:
        """Change the link under live connections (a trace's next phase): every shaper reads its
        direction's fields at each piece, so data from now on goes at the new rate and delay, while
        data already scheduled keeps its delivery time (as bytes already in flight would)."""
        for mine, new in ((self.up, up), (self.down, down)):
            mine.rate_bps, mine.delay_s, mine.jitter_s, mine.loss = (
                new.rate_bps,
                new.delay_s,
                new.jitter_s,
                new.loss,
            )

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()
        for s in self._conns:
            with contextlib.suppress(OSError):
                s.close()
        self._thread.join(2)

    def __enter__(self) -> LinkProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def direction(mbps: float, delay_ms: float, jitter_ms: float = 0.0, loss: float = 0.0) -> Direction:
    """One direction from a profile's figures (``mbps`` 0: no rate limit; ``delay_ms`` one way)."""
    return Direction(mbps * 1e6 if mbps else None, delay_ms / 1e3, jitter_ms / 1e3, loss)


def _control(proxy: LinkProxy, done: threading.Event) -> None:
    """Reshape commands on standard input, one JSON object a line: ``{"up_mbps", "down_mbps",
    "delay_ms", "jitter_ms", "loss"}``; each is answered ``{"ok": true}`` or ``{"error": ...}``.
    End of input changes nothing (the proxy runs until signalled)."""
    for line in sys.stdin:
        try:
            c = json.loads(line)
            d = float(c.get("delay_ms", 0.0)), float(c.get("jitter_ms", 0.0)), float(c.get("loss", 0.0))
            proxy.reshape(direction(float(c["up_mbps"]), *d), direction(float(c["down_mbps"]), *d))
            print(json.dumps({"ok": True}), flush=True)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        if done.is_set():
            return


def _hostport(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="link-emulating TCP proxy")
    ap.add_argument("--listen", required=True, help="host:port (port 0 picks one)")
    ap.add_argument("--upstream", required=True, help="host:port of the server")
    ap.add_argument("--up-mbps", type=float, default=0.0, help="0: no rate limit")
    ap.add_argument("--down-mbps", type=float, default=0.0)
    ap.add_argument("--delay-ms", type=float, default=0.0, help="one way")
    ap.add_argument("--jitter-ms", type=float, default=0.0)
    ap.add_argument("--loss", type=float, default=0.0)
    a = ap.parse_args(argv)

    proxy = LinkProxy(
        _hostport(a.listen),
        _hostport(a.upstream),
        direction(a.up_mbps, a.delay_ms, a.jitter_ms, a.loss),
        direction(a.down_mbps, a.delay_ms, a.jitter_ms, a.loss),
    ).start()
    print(
        json.dumps({"listen": f"{proxy.address[0]}:{proxy.address[1]}"}), flush=True
    )  # the parent reads the port
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    threading.Thread(target=_control, args=(proxy, done), daemon=True).start()
    done.wait()
    proxy.stop()
    sys.exit(0)


if __name__ == "__main__":
    main()
