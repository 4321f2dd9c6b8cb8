"""The edge on a link slower than its requests (a real server behind a real shaped TCP link): what it
cannot carry in time it refuses at once, what it sent it keeps counting until the reply, and the link
comes back as soon as the burst is over."""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import wait

import numpy as np
import pytest

from splitpoint.app.bench.emulate import EmulatedLink
from splitpoint.core.graph import open_model
from splitpoint.core.plan import SERVER_ONLY
from splitpoint.core.plandir import write_plan
from splitpoint.edge.client import EdgeClient, EdgeConfig, EdgeError
from splitpoint.partitioner.costmodel import Link
from splitpoint.server.tail_server import ServerConfig, TailServer

RNG = np.random.default_rng(5)


@pytest.fixture(scope="module")
def plan(tmp_path_factory, small_resnet18):
    """Server-only, float32: 48 KiB of input per request."""
    d = tmp_path_factory.mktemp("congested") / "plans"
    h = open_model(small_resnet18)
    write_plan(h, d / "srv", kind=SERVER_ONLY)
    write_plan(h, d / "srv-full", kind=SERVER_ONLY, include_full=True)  # with the model to fall back on
    return d


def x():
    return {"input": RNG.standard_normal((1, 3, 64, 64)).astype(np.float32)}


@contextlib.contextmanager
def served(plans, link, **cfg):
    """A server behind ``link`` and an edge client in front of it."""
    with EmulatedLink(link, "proxy") as em:
        srv = TailServer(ServerConfig(bind=em.server_bind, plans_dir=plans, workers=1)).start()
        try:
            cfg = {"plan_dir": plans / "srv", "server": em.edge_connect, "fallback": False, **cfg}
            cfg["plan_dir"] = plans / ("srv-full" if cfg["fallback"] else "srv")
            with EdgeClient(EdgeConfig(**cfg)) as c:
                yield c
        finally:
            srv.stop()


def test_a_burst_the_link_cannot_carry_is_refused_at_once_and_the_link_recovers(plan):
    link = Link("slow", 4.0, 20.0, 20.0)  # 48 KiB in ~0.1 s up: about 10 requests a second
    with served(plan, link, window=64, timeout_s=1.0, heartbeat_s=0.1) as c:
        # the edge's estimate of the link, from its own pings and requests; pings go out only while the
        # link is idle, and with one a single slow one (the server still starting, on a loaded machine)
        # was the round trip, and 4 Mbit/s read as 6
        time.sleep(0.5)
        for _ in range(6):
            assert not c.infer(x(), timeout=10).fallback
        assert c.link.uplink_mbps == pytest.approx(4.0, rel=0.35)
        t0, futs, took = time.perf_counter(), [], {}
        for k in range(60):  # 30 a second for 2 s: three times what the link carries
            time.sleep(max(0.0, t0 + k / 30 - time.perf_counter()))
            asked = time.perf_counter()
            f = c.submit(x())
            f.add_done_callback(lambda f, t=asked: took.setdefault(id(f), time.perf_counter() - t))
            futs.append(f)
        done, left = wait(futs, timeout=20)
        assert not left  # every request answered or refused, once
        codes = [e.code if isinstance(e := f.exception(), EdgeError) else "ok" for f in futs]
        busy, ok, late = codes.count("busy"), codes.count("ok"), codes.count("timeout")
        # the link carried about a third of them in time; the rest were refused, not sent to time out
        assert ok >= 12 and busy >= 20 and late <= 3, codes
        for f, code in zip(futs, codes, strict=True):
            if code == "busy":  # at once, saying why
                assert took[id(f)] < 0.3 and "KiB of earlier requests are still on the uplink" in str(
                    f.exception()
                )
            elif code == "ok":
                assert took[id(f)] < 1.0
        # once the burst is over the link is free again: the next request is answered in time
        end = time.monotonic() + 5
        while c.link.in_pipe and time.monotonic() < end:
            time.sleep(0.05)
        assert c.link.in_pipe == 0
        r = c.infer(x(), timeout=10)
        assert r.breakdown["network_ms"] < 500


def test_a_request_past_its_deadline_keeps_its_place_in_the_window_until_its_reply(plan):
    link = Link("slower", 1.0, 20.0, 20.0)  # 48 KiB in ~0.4 s up
    with served(plan, link, window=2, timeout_s=0.3) as c:
        futs = [c.submit(x()) for _ in range(2)]
        for f in futs:
            with pytest.raises(EdgeError) as e:
                f.result(10)
            assert e.value.code == "timeout"
        # both answered (with an error), both still on the link: no room for a third yet
        assert c.try_submit(x()) is None
        end = time.monotonic() + 5
        third = None
        while third is None and time.monotonic() < end:
            time.sleep(0.02)
            third = c.try_submit(x())
        # the late replies freed the window, after the link carried both (~0.8 s), not at the deadline
        assert third is not None
        assert c.link.in_pipe > 0  # the third is on its way


def test_with_a_model_to_fall_back_on_what_the_link_cannot_carry_runs_on_the_edge(plan):
    link = Link("slow", 4.0, 20.0, 20.0)
    with served(plan, link, window=64, timeout_s=1.0, fallback=True) as c:
        for _ in range(6):
            assert not c.infer(x(), timeout=10).fallback
        t0, futs = time.perf_counter(), []
        for k in range(45):  # 30 a second for 1.5 s
            time.sleep(max(0.0, t0 + k / 30 - time.perf_counter()))
            futs.append(c.submit(x()))
        results = [f.result(timeout=20) for f in futs]  # every one answered: sent, or run here
    why = [r.breakdown["reason"] for r in results if r.fallback]
    assert why.count("uplink backed up") >= 10 and len(results) - len(why) >= 8, why
    # a request that was sent and then timed out (rare) falls back too, and says so
    assert set(why) <= {"uplink backed up", "server timed out", "server unreachable"}, why
