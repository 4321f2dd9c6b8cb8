"""Link emulation: the shaper's arithmetic, and real TCP traffic through each mechanism taking
as long as the network profile says (10 Mbit/s, 40 ms RTT: 1 MiB and 64 B within 10 %)."""

from __future__ import annotations

import socket
import subprocess
import threading
import time

import pytest

from splitpoint.app.bench import netns
from splitpoint.app.bench.emulate import EmulatedLink, probe_link
from splitpoint.app.bench.proxy import LinkProxy, direction
from splitpoint.app.bench.shaper import Bottleneck, Direction, Shaper
from splitpoint.core.errors import SplitPointError
from splitpoint.partitioner.costmodel import Link, wire_bytes

LINK = Link("validation", 10.0, 10.0, 40.0)


def test_shaper_serialises_at_the_rate_then_delays():
    s = Shaper(Direction(8e6, 0.010))  # 1 MB/s, 10 ms one way
    first = s.schedule(0.0, 1448)
    assert first == pytest.approx(0.010 + wire_bytes(1448) * 8 / 8e6)
    # a second piece arriving at once waits for the first to leave the bottleneck
    second = s.schedule(0.0, 1448)
    assert second == pytest.approx(first + wire_bytes(1448) * 8 / 8e6)
    # after an idle gap the bottleneck is free again
    assert s.schedule(10.0, 1448) == pytest.approx(10.0 + first)


def test_connections_over_one_link_share_its_rate():
    link = Bottleneck()
    a, b = Shaper(Direction(8e6, 0.010), link=link), Shaper(Direction(8e6, 0.010), link=link)
    backlog = a.schedule(0.0, 1_000_000)  # one connection's megabyte, about a second at 1 MB/s
    # a second connection's first piece waits behind it, as behind a modem's queue, not beside it
    assert b.schedule(0.0, 1448) == pytest.approx(backlog + wire_bytes(1448) * 8 / 8e6)
    alone = Shaper(Direction(8e6, 0.010))  # a link of its own
    assert alone.schedule(0.0, 1448) < 0.02


def test_two_streams_through_the_proxy_take_the_time_of_both():
    """Real TCP: two connections sending 512 KiB each at once over 10 Mbit/s finish together after
    about the time of 1 MiB (0.86 s), not of 512 KiB each (0.43 s)."""
    sink = socket.create_server(("127.0.0.1", 0))
    got: list[int] = []

    def drain(conn: socket.socket) -> None:
        n = 0
        while n < 2**19:
            chunk = conn.recv(1 << 16)
            if not chunk:
                break
            n += len(chunk)
        conn.sendall(b"k")
        got.append(n)

    def accept() -> None:
        for _ in range(2):
            c, _ = sink.accept()
            threading.Thread(target=drain, args=(c,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    d = direction(10.0, 1.0)
    with LinkProxy(("127.0.0.1", 0), sink.getsockname()[:2], d, direction(10.0, 1.0)) as proxy:
        took: list[float] = []

        def send() -> None:
            with socket.create_connection(proxy.address) as s:
                t0 = time.monotonic()
                s.sendall(b"x" * 2**19)
                assert s.recv(1) == b"k"
                took.append(time.monotonic() - t0)

        senders = [threading.Thread(target=send) for _ in range(2)]
        for t in senders:
            t.start()
        for t in senders:
            t.join(10)
    sink.close()
    both = 8 * wire_bytes(2**20) / 10e6
    assert got == [2**19, 2**19] and len(took) == 2
    assert max(took) > 0.85 * both, took


def test_jitter_never_reorders_and_loss_costs_a_round_trip():
    s = Shaper(Direction(None, 0.020, jitter_s=0.010), seed=3)
    times = [s.schedule(i * 0.001, 100) for i in range(500)]
    assert times == sorted(times)
    assert max(t - i * 0.001 for i, t in enumerate(times)) > 0.025  # jitter does something
    lossy = Shaper(Direction(None, 0.020, loss=1.0))
    assert lossy.schedule(0.0, 100) == pytest.approx(0.060)  # delay + one round trip to recover


def _validate(em) -> None:
    # medians: of 9 pings (each is one RTT, so cheap) and of 3 one-MiB uploads
    for r in probe_link(em, [(64, 64, 9), (2**20, 64, 3)]):
        assert abs(r["median_ms"] - r["predicted_ms"]) / r["predicted_ms"] < 0.10, (em.mechanism, r)


def test_userspace_proxy_matches_the_profile():
    with EmulatedLink(LINK, "proxy") as em:
        assert em.mechanism == "proxy"
        _validate(em)


@pytest.mark.skipif(netns.available() is not None, reason=f"netns mechanism unavailable: {netns.available()}")
def test_namespaces_with_tbf_match_the_profile_and_leave_nothing_behind():
    before = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    with EmulatedLink(LINK, "netns") as em:
        assert em.mechanism == "netns" and "tbf" in em.detail
        _validate(em)
    assert subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout == before
    # a failure inside the block still tears everything down
    with pytest.raises(RuntimeError), EmulatedLink(LINK, "netns"):
        raise RuntimeError("boom")
    assert subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout == before


def test_unknown_mechanism_is_refused():
    with pytest.raises(SplitPointError, match="unknown link mechanism"):
        EmulatedLink(LINK, "carrier-pigeon")
