"""The split runtime over real ZeroMQ sockets, with a real mosquitto for telemetry."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from splitpoint.app.broker import free_port
from splitpoint.app.orchestrator import FleetSubscriber, collect, deploy
from splitpoint.app.process import start_server
from splitpoint.core import wire
from splitpoint.core.codecs import decode, encode
from splitpoint.core.errors import ConfigError, PlanError, SplitPointError
from splitpoint.core.graph import open_model
from splitpoint.core.plandir import write_plan
from splitpoint.core.runner import make_session
from splitpoint.edge.client import SPLIT_PARTS, EdgeClient, EdgeConfig, EdgeError
from splitpoint.server.tail_server import ServerConfig, TailServer

RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def model(tmp_path_factory, small_resnet18):
    d = tmp_path_factory.mktemp("rt")
    path = small_resnet18
    h = open_model(path)
    plans = d / "plans"
    write_plan(h, plans / "p-f32", cut=h.cuts()[19], include_full=True)
    write_plan(h, plans / "p-int8", cut=h.cuts()[19], include_full=True, codec="int8+zstd")
    return {"path": path, "plans": plans, "h": h, "full": make_session(path)}


def x(n=1):
    return {"input": RNG.standard_normal((n, 3, 64, 64)).astype(np.float32)}


@pytest.fixture
def server(model):
    srv = TailServer(ServerConfig(bind="tcp://127.0.0.1:0", plans_dir=model["plans"], workers=2)).start()
    yield srv
    srv.stop()


def client(model, srv, plan="p-f32", **kw):
    return EdgeClient(
        EdgeConfig(
            plan_dir=model["plans"] / plan,
            server=srv.endpoint if srv else "tcp://127.0.0.1:1",
            timeout_s=kw.pop("timeout_s", 5.0),
            **kw,
        )
    )


def test_results_equal_the_unsplit_model(model, server):
    with client(model, server) as c:
        for _ in range(5):
            feeds = x()
            r = c.infer(feeds, timeout=30)
            assert not r.fallback
            np.testing.assert_allclose(r.outputs[0], model["full"].run(None, feeds)[0], atol=1e-5)
            for k in ("head_ms", "encode_ms", "network_ms", "tail_ms", "decode_ms", "total_ms"):
                assert r.breakdown[k] >= 0
            # the timed parts fit in the whole, none counted twice; the rest is time spent on the edge
            parts = sum(r.breakdown[k] or 0.0 for k in SPLIT_PARTS)
            assert parts <= r.breakdown["total_ms"]
            assert r.breakdown["edge_wait_ms"] == pytest.approx(r.breakdown["total_ms"] - parts, abs=1e-9)
    with client(model, server, plan="p-int8") as c:  # lossy codec: close, not equal
        feeds = x()
        r = c.infer(feeds, timeout=30)
        ref = model["full"].run(None, feeds)[0]
        assert np.abs(r.outputs[0] - ref).max() < 0.2 * np.abs(ref).max()


def test_many_clients_at_once(model, server):
    errors, done = [], []

    def one(k):
        try:
            with client(model, server, window=3) as c:
                batch = [x() for _ in range(15)]
                futs = [c.submit(f) for f in batch]
                for f, feeds in zip(futs, batch, strict=True):
                    r = f.result(60)
                    np.testing.assert_allclose(r.outputs[0], model["full"].run(None, feeds)[0], atol=1e-5)
                    done.append(r.fallback)
        except Exception as exc:  # collected: assertion errors in threads are otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(done) == 60 and not any(done)


def test_an_edge_only_plan_loads_its_model_once(model, tmp_path, monkeypatch):
    """Its head is the whole model, and it was loaded a second time as the fallback: twice the memory
    the plan's edge-memory figure promised (886 MiB against 397 MiB for a 200 MB model)."""
    from splitpoint.edge import client as edge_client

    write_plan(model["h"], tmp_path / "eo", kind="edge-only")
    loaded, real = [], edge_client.make_session

    def counted(path, *args, **kwargs):
        loaded.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(edge_client, "make_session", counted)
    with EdgeClient(EdgeConfig(plan_dir=tmp_path / "eo", server="tcp://127.0.0.1:1")) as c:
        feeds = x()
        r = c.infer(feeds, timeout=30)
    assert loaded == ["head.onnx"]
    np.testing.assert_allclose(r.outputs[0], model["full"].run(None, feeds)[0], atol=1e-5)


def test_without_fallback_each_request_gets_an_explicit_error(model):
    with client(model, None, fallback=False, timeout_s=0.5) as c:
        futs = [c.submit(x()) for _ in range(3)]
        for f in futs:
            with pytest.raises(EdgeError) as e:
                f.result(30)
            assert e.value.code in ("unreachable", "timeout")


def test_wrong_input_is_an_error_not_a_crash(model, server):
    with client(model, server) as c:
        with pytest.raises(EdgeError, match="missing model input"):
            c.infer({"image": np.zeros((1, 3, 64, 64), np.float32)}, timeout=10)
        with pytest.raises(EdgeError, match=r"shape \[1, 3, 32, 64\], the plan expects shape \[.*64, 64\]"):
            c.infer({"input": np.zeros((1, 3, 32, 64), np.float32)}, timeout=10)
        assert not c.infer(x(), timeout=30).fallback


def _raw(endpoint):
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    return s


def _ask(s, frames, timeout=5000):
    s.send_multipart(frames)
    assert s.poll(timeout), "no reply"
    return wire.parse(s.recv_multipart())


def test_server_answers_bad_requests_specifically(model, server):
    from splitpoint.core.plan import Plan

    plan = Plan.load(model["plans"] / "p-f32")
    s = _raw(server.endpoint)
    names = [t.name for t in plan.cut_tensors]
    good = [
        encode(np.zeros((1, 16, 16, 16), np.float32), "float32"),
        encode(np.zeros((1, 32, 8, 8), np.float32), "float32"),
    ]
    cases = [
        ([b"not json"], "bad-message"),
        ([json.dumps({"v": 9, "type": "infer"}).encode()], "bad-version"),
        ([wire.Message(wire.INFER, 1, "f" * 64, names, frames=good).header(), *good], "unknown-plan"),
        (
            [wire.Message(wire.INFER, 2, plan.plan_id, names[:1], frames=good[:1]).header(), good[0]],
            "bad-tensor",
        ),
        ([wire.Message(wire.INFER, 3, plan.plan_id, names).header(), good[0]], "bad-message"),
        (
            [wire.Message(wire.INFER, 4, plan.plan_id, names, frames=good).header(), good[1], good[0]],
            "bad-tensor",
        ),
        (
            [wire.Message(wire.INFER, 5, plan.plan_id, names, frames=good).header(), b"garbage", good[1]],
            "bad-tensor",
        ),
        ([wire.Message(wire.RESULT, 6).header()], "bad-message"),
    ]
    for frames, code in cases:
        reply = _ask(s, frames)
        assert reply.type == wire.ERROR and reply.meta["code"] == code, (code, reply.meta)
    s.close(0)


def test_deploy_pushes_a_verified_plan(model, tmp_path):
    srv = TailServer(ServerConfig(bind="tcp://127.0.0.1:0", plans_dir=tmp_path / "empty")).start()
    try:
        with pytest.raises(Exception, match="unknown plan"), client(model, srv, fallback=False) as c:
            c.infer(x(), timeout=10)
        pid = deploy(model["plans"] / "p-f32", srv.endpoint)
        assert pid in srv.registry.ids()
        # the server holds what it runs, not the edge's head or the 'full' fallback model
        (installed,) = (tmp_path / "empty").iterdir()
        assert sorted(p.name for p in installed.iterdir()) == ["plan.json", "tail.onnx"]
        with client(model, srv) as c:
            assert not c.infer(x(), timeout=30).fallback
        # a tampered push is refused and nothing is installed
        bad = tmp_path / "bad"
        import shutil

        shutil.copytree(model["plans"] / "p-int8", bad)
        s = _raw(srv.endpoint)
        names = ["plan.json", "head.onnx", "tail.onnx", "full.onnx"]
        frames = [(bad / n).read_bytes() for n in names]
        frames[2] = frames[2] + b"\0"
        reply = _ask(s, wire.Message(wire.DEPLOY, 9, meta={"files": names}, frames=frames).to_frames())
        assert reply.type == wire.ERROR and "checksum mismatch for tail.onnx" in reply.meta["message"]
        assert len(srv.registry.ids()) == 1
        s.close(0)
    finally:
        srv.stop()


def test_a_plan_pushed_again_repairs_its_files_and_a_dead_deploy_s_leftovers_go(model, tmp_path):
    """A plan pushed again while its tail.onnx had been deleted was acknowledged and left so, and the
    next start skipped it; a server killed while loading a deploy left its temporary directory for ever."""
    import os

    from splitpoint.core.plan import Plan

    plans = tmp_path / "plans"
    plans.mkdir()
    old = plans / ".0123456789abcdef.tmp-deadbeef"
    old.mkdir()
    (old / "tail.onnx").write_bytes(b"half")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    young = plans / ".fedcba9876543210.tmp-busybusy"  # another writer's, still at work
    young.mkdir()
    # a writer of this host that is gone (a server killed and restarted at once): its directory goes
    # whatever its age; a live one's stays
    from splitpoint.core.files import writer_tag

    dead_pid = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_pid.wait()
    host = writer_tag().split("@", 1)[1]
    crashed = plans / f".00112233445566aa.tmp-{dead_pid.pid}@{host}-x1y2x1y2"
    crashed.mkdir()
    (crashed / "tail.onnx").write_bytes(b"77 MB of a half-written tail")
    live = plans / f".00112233445566bb.tmp-{os.getpid()}@{host}-x3y4x3y4"
    live.mkdir()
    srv = TailServer(ServerConfig(bind="tcp://127.0.0.1:0", plans_dir=plans)).start()
    try:
        assert not old.exists() and young.exists()
        assert not crashed.exists() and live.exists()
        pid = deploy(model["plans"] / "p-f32", srv.endpoint)
        installed = plans / pid[:16]
        (installed / "tail.onnx").unlink()
        assert deploy(model["plans"] / "p-f32", srv.endpoint) == pid
        assert (installed / "tail.onnx").is_file()
        Plan.load(installed, role="server")  # every file verifies again
        with client(model, srv) as c:
            assert not c.infer(x(), timeout=30).fallback
    finally:
        srv.stop()


def test_a_plans_directory_that_cannot_be_written_fails_the_deploy_in_one_line(
    model, tmp_path, monkeypatch, caplog
):
    """A read-only (or full) plans directory: the deploy failed with the OSError's repr, and the server
    logged a traceback for what is the machine's state, not a bug. (Root writes through a mode of 0555,
    so the file system's refusal is raised where the plan's directory is made.)"""
    import errno
    import logging

    from splitpoint.core import plan as plan_module

    plans = tmp_path / "plans"
    plans.mkdir()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(plans))

    srv = TailServer(ServerConfig(bind="tcp://127.0.0.1:0", plans_dir=plans)).start()
    try:
        monkeypatch.setattr(plan_module.tempfile, "mkdtemp", read_only)
        with (
            caplog.at_level(logging.ERROR, logger="splitpoint.server"),
            pytest.raises(SplitPointError) as exc,
        ):
            deploy(model["plans"] / "p-f32", srv.endpoint, timeout_s=30)
        assert f"the server cannot store the plan (Read-only file system: {plans})" in str(exc.value)
        assert not any(r.exc_info for r in caplog.records), [r.getMessage() for r in caplog.records]
        monkeypatch.undo()
        assert deploy(
            model["plans"] / "p-f32", srv.endpoint, timeout_s=30
        )  # and the next one, allowed, lands
    finally:
        srv.stop()


def test_a_status_set_before_the_broker_answers_is_sent_once_connected_and_none_is_dropped(mosquitto):
    """A status published before the connection was up was queued by paho (QoS 1) and counted as
    dropped although the broker got it; and it went out after the newer one re-sent on connecting, so
    the broker could retain the older state."""
    from splitpoint.core.telemetry import Telemetry

    seen: list[dict] = []
    with FleetSubscriber(
        mosquitto, lambda d, k, p: seen.append(p) if (d, k) == ("early", "status") else None
    ):
        time.sleep(0.3)
        t = Telemetry("early", "edge", mosquitto)
        try:
            t.status("starting")
            t.status("online", {"plan": "x"})
            assert t.connected.wait(15)
            t.switch({"from": 0, "to": 1})  # QoS 1 as well
            time.sleep(0.5)
        finally:
            t.close()
        time.sleep(0.3)
    states = [p["state"] for p in seen]
    assert states[-2:] == ["online", "offline"], states  # whether "starting" went out depends on timing
    assert [p["ts"] for p in seen] == sorted(p["ts"] for p in seen)
    assert t.dropped == 0


def test_telemetry_reaches_mosquitto(model, mosquitto, broker_log):
    srv = TailServer(
        ServerConfig(
            bind="tcp://127.0.0.1:0",
            plans_dir=model["plans"],
            mqtt=mosquitto,
            device_id="t-server",
            metrics_interval_s=0.2,
        )
    ).start()
    seen: list[tuple] = []
    with FleetSubscriber(mosquitto, lambda d, k, p: seen.append((d, k, p))):
        with client(model, srv, mqtt=mosquitto, device_id="t-edge") as c:
            # both connect in the background, retrying a second later if the first try fails: on a loaded
            # machine a run shorter than that reported nothing from the side that had not connected yet
            for side in (c.telemetry, srv.telemetry):
                assert side.connected.wait(15), (side.role, side.dropped, broker_log(mosquitto))
            for _ in range(10):
                c.infer(x(), timeout=30)
                time.sleep(0.06)
        srv.stop()
        time.sleep(0.5)
    kinds = {(d, k) for d, k, _ in seen}
    assert {
        ("t-edge", "latency"),
        ("t-server", "metrics"),
        ("t-edge", "status"),
        ("t-server", "status"),
    } <= kinds, broker_log(mosquitto)
    lat = next(p for d, k, p in seen if (d, k) == ("t-edge", "latency"))
    assert lat["unit"] == "ms" and lat["measured"] is True and lat["fallback"] is False and lat["head_ms"] > 0
    # what is not timed itself, and what is not milliseconds, is said so
    assert {"network_ms", "edge_wait_ms"} <= set(lat["derived"]) and lat["units"] == {"bytes_sent": "B"}
    # the first metrics message measures the CPU since the publisher started (psutil's first reading is
    # 0.0 whatever the load: every edge's first message said it was idle)
    edge_metrics = [p for d, k, p in seen if (d, k) == ("t-edge", "metrics")]
    assert all(p["process_cpu_percent"] is not None for p in edge_metrics)
    assert edge_metrics[-1]["process_cpu_percent"] > 0, edge_metrics  # over the ten inferences
    assert edge_metrics[-1]["cpu_percent"] > 0, edge_metrics  # the host's too: this process was busy in it
    met = next(p for d, k, p in seen if (d, k) == ("t-server", "metrics"))
    assert {"cpu_percent", "process_cpu_percent", "memory_used_bytes", "requests", "units"} <= set(met)
    assert "host" in met["units"]["cpu_percent"] and "this process" in met["units"]["process_cpu_percent"]
    # the edge's last word before it goes offline counts every request (a short run's were never reported)
    last = [p for d, k, p in seen if (d, k) == ("t-edge", "metrics")][-1]
    assert last["ok"] == 10 and last["errors"] == 0, last
    final = collect(mosquitto, 0.5)  # retained: both closed cleanly, so both say offline
    assert (
        final["t-edge"]["status"]["state"] == "offline" and final["t-server"]["status"]["state"] == "offline"
    )


def test_a_publisher_measures_the_cpu_over_its_own_periods_whatever_thread_sends():
    """psutil keeps its last system-CPU reading per calling thread: a publisher made on one thread and
    sending from its socket thread measured 0.0 in its first message, however busy the host had been."""
    from splitpoint.core.telemetry import CpuMeter, busy_percent

    meter = CpuMeter()
    quiet = CpuMeter()
    t_end = time.process_time() + 0.3
    while time.process_time() < t_end:  # busy on this thread
        pass
    read: list[dict] = []
    sender = threading.Thread(target=lambda: read.append(meter.read()))
    sender.start()
    sender.join()
    assert read[0]["cpu_percent"] > 0 and read[0]["process_cpu_percent"] > 0, read
    assert quiet.read()["cpu_percent"] > 0  # a second publisher measures its own period, not the first's
    import psutil

    now = psutil.cpu_times()
    assert busy_percent(now, now) is None  # no tick between two readings: not measured, not 0.0


def test_status_says_fallback_only_where_the_edge_can_fall_back(model, mosquitto):
    """No server: an edge with the whole model answers from it and its status says fallback; one
    without answers every request with an error, and its status says the server is down, not fallback."""
    for device, fallback in (("fb-yes", True), ("fb-no", False)):
        with client(model, None, fallback=fallback, mqtt=mosquitto, device_id=device, connect_grace_s=0) as c:
            assert c.telemetry.connected.wait(5)
            status = {}
            for _ in range(50):  # retained; published once the client has looked for the server
                status = collect(mosquitto, 0.2).get(device, {}).get("status", {})
                if status.get("state") == "online":
                    break
            assert status["state"] == "online" and status["server_up"] is False, status
            assert status["fallback"] is fallback, status


def test_the_round_trip_estimate_follows_the_link_while_requests_keep_coming(tmp_path):
    """An edge that always has a request in its head (one after another, as a camera's frames on a slow
    device) still pings while nothing is on the link: its round trip once stayed that of the link before
    (9 ms through a 150 ms 3G phase), and the uplink judged from network time less that was wrong."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from splitpoint.app.bench.proxy import LinkProxy, direction

    # a head of ~10-30 ms (two 256x1024x1024 MatMuls) that sends 4 KiB, and a trivial tail
    w = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32) / 32, "w"
    )
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"]),
        helper.make_node("Tanh", ["a"], ["b"]),
        helper.make_node("MatMul", ["b", "w"], ["c"]),
        helper.make_node("ReduceMean", ["c"], ["m"], axes=[0], keepdims=1),
        helper.make_node("Relu", ["m"], ["y"]),
    ]
    g = helper.make_graph(
        nodes,
        "slow-head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [256, 1024])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1024])],
        [w],
    )
    path = tmp_path / "slow.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    h = open_model(path)
    cut = next(c for c in h.cuts() if [t.name for t in c.crossing] == ["m"])
    write_plan(h, tmp_path / "plans" / "slow", cut=cut)
    feeds = {"x": np.random.default_rng(1).standard_normal((256, 1024)).astype(np.float32)}
    srv = TailServer(ServerConfig(bind="tcp://127.0.0.1:0", plans_dir=tmp_path / "plans")).start()
    assert srv.endpoint is not None
    port = int(srv.endpoint.rsplit(":", 1)[1])
    try:
        with LinkProxy(("127.0.0.1", 0), ("127.0.0.1", port), direction(0, 1), direction(0, 1)) as proxy:
            ep = f"tcp://127.0.0.1:{proxy.address[1]}"
            cfg = EdgeConfig(plan_dir=tmp_path / "plans" / "slow", server=ep, fallback=False, heartbeat_s=0.1)
            with EdgeClient(cfg) as c:
                end = time.monotonic() + 1.5
                while time.monotonic() < end:
                    c.infer(feeds, timeout=30)
                before = c.rtt_ms
                proxy.reshape(direction(0, 40), direction(0, 40))  # 80 ms round trip from now on
                end = time.monotonic() + 4
                while time.monotonic() < end:
                    c.infer(feeds, timeout=30)
                after = c.rtt_ms
    finally:
        srv.stop()
    assert before is not None and before < 30, before
    assert after is not None and 70 < after < 150, (before, after)


def test_dead_broker_never_blocks_inference(model, server):

    with client(model, server, mqtt=f"mqtt://127.0.0.1:{free_port()}", device_id="nobroker") as c:
        slowest = 0.0
        for _ in range(20):
            t0 = time.perf_counter()
            c.telemetry.latency({"probe": 1})
            slowest = max(slowest, time.perf_counter() - t0)
            assert not c.infer(x(), timeout=30).fallback
        assert slowest < 0.05  # a publish towards a dead broker returns at once
        assert c.telemetry.dropped > 0 and c.telemetry.sent == 0


def test_a_daemon_says_once_when_its_broker_goes_and_once_when_it_answers_again(tmp_path, caplog):
    """An operator reading a daemon's log learns that telemetry stopped and why (one line per outage, not
    one per retry) and that it came back: before, a lost or refusing broker was silent."""
    import logging

    from splitpoint.core.telemetry import Telemetry

    from .conftest import running_mosquitto

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "splitpoint.core.telemetry"]

    def wait_for(pred, seconds: float = 15.0) -> bool:
        end = time.monotonic() + seconds
        while time.monotonic() < end and not pred():
            time.sleep(0.05)
        return pred()

    port = free_port()
    caplog.set_level(logging.WARNING, logger="splitpoint.core.telemetry")
    t = Telemetry("outage", "edge", f"mqtt://127.0.0.1:{port}")
    try:
        assert wait_for(lambda: len(warnings()) >= 1)
        time.sleep(3)  # several retries at 1 s, still one line
        assert len(warnings()) == 1 and "is unreachable" in warnings()[0] and str(port) in warnings()[0]
        with running_mosquitto(tmp_path, port=port):
            assert t.connected.wait(15)
            assert wait_for(lambda: len(warnings()) == 2) and "answers again" in warnings()[1]
        assert wait_for(lambda: len(warnings()) == 3) and "dropped the connection" in warnings()[2]
        with running_mosquitto(tmp_path, anonymous=False, port=port):
            assert wait_for(lambda: len(warnings()) == 4) and "answers again" not in warnings()[-1]
            time.sleep(3)
            assert not t.connected.is_set() and len(warnings()) == 4  # refused on every retry: said once
        with running_mosquitto(tmp_path, port=port):
            assert t.connected.wait(15) and wait_for(lambda: len(warnings()) == 5)
            assert "answers again" in warnings()[-1]
            t.close()  # a daemon's own clean shutdown is not an outage
            time.sleep(1)
            assert len(warnings()) == 5, warnings()
    finally:
        t.close()


def test_deploy_to_the_edge_then_status_shows_it_online_with_the_new_plan(model, server, mosquitto, tmp_path):
    from splitpoint.core.plan import Plan

    from .conftest import run_cli

    start = tmp_path / "plans" / "start"
    shutil.copytree(model["plans"] / "p-f32", start)
    sock = f"ipc://{tmp_path}/edge.sock"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "splitpoint.app",
            "edge",
            "run",
            str(start),
            "--server",
            server.endpoint,
            "--listen",
            sock,
            "--mqtt",
            mosquitto,
            "--device-id",
            "t-deployed",
            "--quiet",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        s = _raw(sock)
        assert _ask(s, wire.Message(wire.PING, 1).to_frames(), timeout=30000).type == wire.PONG
        s.close(0)
        new = Plan.load(model["plans"] / "p-int8")
        done = run_cli("deploy", str(model["plans"] / "p-int8"), "--edge", sock, timeout=120)
        assert done.returncode == 0 and "acknowledged (edge)" in done.stdout, done.stderr
        # in a hidden folder beside the plan: a server sharing that folder as --plans never reads it (the
        # edge's copy, without tail.onnx, replaced the server's under the same id)
        pushed = tmp_path / "plans" / ".edge-deployed" / new.plan_id[:16]
        assert sorted(p.name for p in pushed.iterdir()) == ["full.onnx", "head.onnx", "plan.json"]  # no tail
        from splitpoint.server.registry import PlanRegistry

        assert PlanRegistry(tmp_path / "plans").skipped == {}  # a server there sees the start plan only
        shown = run_cli("status", "--mqtt", mosquitto, "--seconds", "1.5", timeout=60)
        row = next(line for line in shown.stdout.splitlines() if "t-deployed" in line)
        assert "online" in row and new.plan_id[:12] in row, shown.stdout
        # and for a script: the same from --json, one document of each device's latest messages
        js = run_cli("status", "--mqtt", mosquitto, "--seconds", "1.5", "--json", timeout=60)
        status = json.loads(js.stdout)["devices"]["t-deployed"]["status"]
        assert status["state"] == "online" and status["plan"] == new.plan_id, status
    finally:
        proc.terminate()
        proc.wait(30)
    # restarted with the same command (systemd after a crash, a reboot), it runs the deployed plan
    cmd = [a for a in proc.args if a != "--quiet"]
    again = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        s = _raw(sock)
        assert _ask(s, wire.Message(wire.PING, 2).to_frames(), timeout=30000).type == wire.PONG
        s.close(0)
    finally:
        again.terminate()
        _, err = again.communicate(timeout=30)
    assert f"running {pushed}, the plan last deployed here in place of {start}" in err, err


def test_an_unreadable_deploy_record_or_a_plan_without_fallback_is_said_at_start(model, tmp_path, caplog):
    """A corrupt deployed.json rolled the daemon back to its command line's plan without a word, and a
    plan with no full model (fallback on) said so only when a request failed with the server gone."""
    import logging

    from splitpoint.edge.daemon import DEPLOYED, EdgeDaemon, deployed_plan

    plans = tmp_path / "plans"
    start = plans / "start"
    write_plan(model["h"], start, cut=model["h"].cuts()[19])  # no full.onnx
    caplog.set_level(logging.INFO, logger="splitpoint")
    (plans / DEPLOYED).write_text("{garbage")
    assert deployed_plan(start, plans) == start
    (plans / DEPLOYED).write_text("[" * 200_000 + "]" * 200_000)  # a RecursionError ended the daemon
    assert deployed_plan(start, plans) == start
    (plans / DEPLOYED).write_text(json.dumps({"replaces": str(start.resolve()), "plan": "gone"}))
    assert deployed_plan(start, plans) == start
    (plans / DEPLOYED).unlink()
    assert deployed_plan(start, plans) == start  # none recorded: nothing to say
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(said) == 3 and "is unreadable" in said[0] and "names plan 'gone'" in said[2], said
    assert "is unreadable (nested too deeply" in said[1], said
    caplog.clear()
    daemon = EdgeDaemon(EdgeConfig(plan_dir=start, server="tcp://127.0.0.1:1"), plans)
    try:
        said = [r.getMessage() for r in caplog.records]
        assert any("no local fallback" in m and "--with-full" in m for m in said), said
    finally:
        daemon.client.close(drain=False)
    # a deploy that takes the fallback away from a daemon that had one is a warning
    caplog.clear()
    shutil.copytree(model["plans"] / "p-f32", plans / "with-full")
    daemon = EdgeDaemon(EdgeConfig(plan_dir=plans / "with-full", server="tcp://127.0.0.1:1"), plans)
    try:
        names = ["plan.json", "head.onnx"]
        frames = [(start / n).read_bytes() for n in names]
        daemon._deploy(wire.Message(wire.DEPLOY, 1, meta={"files": names}, frames=frames))
        said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("takes away this daemon's local fallback" in m for m in said), said
    finally:
        daemon.client.close(drain=False)


def test_an_interrupted_infer_gives_its_place_in_the_window_back(model, server):
    """Ctrl-C landing in infer before the request was sent left it pending with no deadline: its place in
    the window was never given back, and with the window used up every later infer blocked for good,
    its timeout ignored. And infer's timeout bounds the wait for a place in the window too."""
    from concurrent.futures import TimeoutError as FutureTimeout

    with client(model, server, window=2, timeout_s=60) as c:
        real = c._head.run

        def interrupted(feeds):
            raise KeyboardInterrupt

        c._head.run = interrupted
        for _ in range(3):
            with pytest.raises(KeyboardInterrupt):
                c.infer(x(), timeout=5)
        c._head.run = real
        assert not c._pending
        assert not c.infer(x(), timeout=30).fallback  # a place was free at once
    # a server that takes requests and answers none: two fill the window for their 60 s timeout
    ctx = zmq.Context.instance()
    mute = ctx.socket(zmq.ROUTER)
    port = mute.bind_to_random_port("tcp://127.0.0.1")
    cfg = EdgeConfig(
        plan_dir=model["plans"] / "p-f32",
        server=f"tcp://127.0.0.1:{port}",
        timeout_s=60,
        window=2,
        fallback=False,
    )
    try:
        with EdgeClient(cfg) as c:
            held = [c.submit(x()) for _ in range(2)]
            t0 = time.monotonic()
            with pytest.raises(FutureTimeout, match="no room among the 2 requests in flight within 0.5 s"):
                c.infer(x(), timeout=0.5)
            assert time.monotonic() - t0 < 20 and not any(f.done() for f in held)
            c.close(drain=False)
    finally:
        mute.close(0)


def test_an_edge_deploy_its_record_cannot_keep_is_refused_and_leaves_nothing(model, tmp_path, monkeypatch):
    """A disk with room for the pushed plan and not for deployed.json: the deploy was acknowledged, and the
    next start ran the old plan without a word. Refused now, the daemon on its plan, the pushed one gone."""
    import errno

    from splitpoint.core.plan import Plan
    from splitpoint.edge import daemon as edge_daemon

    plans = tmp_path / "plans"
    shutil.copytree(model["plans"] / "p-f32", plans / "start")
    daemon = edge_daemon.EdgeDaemon(EdgeConfig(plan_dir=plans / "start", server="tcp://127.0.0.1:1"), plans)

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(edge_daemon, "atomic_write_text", full)  # the file system's refusal, unprivileged
    try:
        pushed = model["plans"] / "p-int8"
        names = [n for n in ("plan.json", "head.onnx", "full.onnx") if (pushed / n).exists()]
        msg = wire.Message(
            wire.DEPLOY, 1, meta={"files": names}, frames=[(pushed / n).read_bytes() for n in names]
        )
        with pytest.raises(OSError, match="No space left"):
            daemon._deploy(msg)
        assert daemon.client.plan.plan_id == Plan.load(plans / "start").plan_id
        assert sorted(p.name for p in plans.iterdir()) == ["start"]  # nothing installed is left
        # the same plan installed before (another daemon's record names it): refused, it stays
        there = plans / Plan.load(pushed).plan_id[:16]
        shutil.copytree(pushed, there)
        with pytest.raises(OSError, match="No space left"):
            daemon._deploy(msg)
        assert sorted(p.name for p in plans.iterdir()) == sorted(["start", there.name])
    finally:
        daemon.client.close(drain=False)


def test_an_edge_daemon_takes_deploys_up_to_its_max_message_mb(model, server, tmp_path):
    """`edge run` had no --max-message-mb: a plan with a file over 256 MiB could never be deployed to an
    edge, and the refusal named an option the edge lacked."""
    sock = f"ipc://{tmp_path}/edge.sock"
    largest = max((model["plans"] / "p-int8" / n).stat().st_size for n in ("head.onnx", "full.onnx"))

    def daemon(limit_mb: float) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "splitpoint.app", "edge", "run", str(model["plans"] / "p-f32")]
        cmd += ["--server", server.endpoint, "--listen", sock, "--quiet", "--max-message-mb", str(limit_mb)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        s = _raw(sock)
        assert _ask(s, wire.Message(wire.PING, 1).to_frames(), timeout=30000).type == wire.PONG
        s.close(0)
        return proc

    for limit_mb, taken in ((largest / 2 / 2**20, False), (largest * 2 / 2**20, True)):
        proc = daemon(limit_mb)
        try:
            if taken:
                deploy(model["plans"] / "p-int8", sock, role="edge")
            else:
                with pytest.raises(SplitPointError, match="takes no file this large.*--max-message-mb"):
                    deploy(model["plans"] / "p-int8", sock, role="edge", timeout_s=10)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=30)


def test_edge_daemon_local_socket_and_sigterm_drain(model, server, tmp_path):
    sock = f"ipc://{tmp_path}/edge.sock"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "splitpoint.app",
            "edge",
            "run",
            str(model["plans"] / "p-f32"),
            "--server",
            server.endpoint,
            "--listen",
            sock,
            "--quiet",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        s = _raw(sock)
        pong = _ask(s, wire.Message(wire.PING, 1).to_frames(), timeout=30000)
        assert pong.type == wire.PONG
        feeds = [x() for _ in range(6)]
        for i, f in enumerate(feeds):
            s.send_multipart(
                wire.Message(
                    wire.INFER, 100 + i, tensors=["input"], frames=[encode(f["input"], "float32")]
                ).to_frames()
            )
        time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # in-flight requests must still be answered
        for i in range(20):  # on their way as SIGTERM comes: answered `closed`, not dropped with the socket
            s.send_multipart(
                wire.Message(
                    wire.INFER, 200 + i, tensors=["input"], frames=[encode(feeds[0]["input"], "float32")]
                ).to_frames()
            )
        got = {}
        while len(got) < len(feeds) + 20 and s.poll(20000):
            m = wire.parse(s.recv_multipart())
            got[m.id] = m
        assert sorted(got) == [100 + i for i in range(6)] + [200 + i for i in range(20)]
        assert all(
            got[200 + i].type == wire.RESULT or got[200 + i].meta["code"] == "closed" for i in range(20)
        )

        # what the daemon had taken is answered with its result; one still waiting for room in the window
        # when SIGTERM came is told `closed` (protocol.md), never dropped
        taken = [i for i in range(len(feeds)) if got[100 + i].type == wire.RESULT]
        assert taken and all(got[100 + i].meta["code"] == "closed" for i in range(6) if i not in taken)
        for i in taken:
            out = decode(got[100 + i].frames[0])
            np.testing.assert_allclose(out, model["full"].run(None, feeds[i])[0], atol=1e-5)
        assert proc.wait(30) == 0
        s.close(0)
    finally:
        if proc.poll() is None:
            proc.kill()


def _serve_proc(plans, endpoint, *extra):
    return start_server(endpoint, plans, *extra)


def _client_of_a_server_process(model, **cfg):
    """A `splitpoint serve` process of the module's plans (to kill and restart) and an edge client of it."""

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    srv = _serve_proc(model["plans"], endpoint)
    cfg = {"plan_dir": model["plans"] / "p-f32", "server": endpoint, "connect_grace_s": 20, **cfg}
    return endpoint, srv, EdgeClient(EdgeConfig(**cfg))


def _until_back(c, within_s: float = 30) -> None:
    end = time.monotonic() + within_s
    while not c.server_up and time.monotonic() < end:
        time.sleep(0.05)
    assert c.server_up, "edge did not reconnect to the restarted server"


def test_server_killed_and_restarted_mid_stream(model):
    """The edge falls back while the server is gone, comes back when it returns, and every
    request gets exactly one correct answer."""
    endpoint, srv, c = _client_of_a_server_process(
        model, timeout_s=1.0, heartbeat_s=0.1, dead_after_s=0.5, window=4
    )
    try:
        assert c.server_up, "server did not come up"
        futs, phases = [], []

        def stream(n, phase):
            for _ in range(n):
                feeds = x()
                futs.append((c.submit(feeds), feeds))
                phases.append(phase)
                time.sleep(0.01)

        stream(20, "before")
        srv.kill()  # SIGKILL: no goodbye, requests in flight are lost on the server side
        srv.wait(10)
        stream(30, "down")
        srv = _serve_proc(model["plans"], endpoint)
        _until_back(c)
        stream(20, "after")
        results = []
        for (f, feeds), phase in zip(futs, phases, strict=True):
            r = f.result(60)  # exactly one answer each: an error would raise here
            np.testing.assert_allclose(r.outputs[0], model["full"].run(None, feeds)[0], atol=1e-4)
            results.append((phase, r.fallback))
        assert len(results) == 70
        assert any(fb for ph, fb in results if ph == "down"), "no fallback while the server was down"
        assert not any(fb for ph, fb in results[-10:]), "still falling back after the server returned"
        assert c.counts["fallback"] + c.counts["ok"] == 70 and c.counts["errors"] == 0
    finally:
        c.close()
        srv.kill()
        srv.wait(10)


def test_requests_lost_with_a_dropped_connection_free_the_window_at_their_deadline(model):
    """A request answered at its deadline keeps its place in the window until its late reply, since it
    may still be on the link; but one whose connection dropped will never be answered. A relay killed
    with four requests in flight and restarted kept the edge's window full for four timeouts after it
    was back, refusing every new request."""
    import signal

    endpoint, srv, c = _client_of_a_server_process(model, timeout_s=2.0, fallback=False, window=2)
    try:
        assert c.server_up, "server did not come up"
        c.infer(x(), timeout=10)
        srv.send_signal(signal.SIGSTOP)  # the two requests go out and stay unanswered
        sent = time.monotonic()
        futs = [c.submit(x()) for _ in range(2)]
        time.sleep(0.3)
        srv.kill()  # then their connection drops
        srv.wait(10)
        srv = _serve_proc(model["plans"], endpoint)
        for f in futs:
            with pytest.raises(EdgeError) as e:
                f.result(10)
            assert e.value.code == "unreachable"  # when the drop is seen, not at the 2 s deadline
        _until_back(c)
        # (a request taken for lost would have kept its place until four timeouts after it was sent)
        assert time.monotonic() < sent + 4 * 2.0, "the server took too long to restart to tell"
        # back, and both places in the window are free: the next two go out at once
        feeds = [x() for _ in range(2)]
        more = [c.try_submit(f) for f in feeds]
        assert all(f is not None for f in more)
        for f, fd in zip(more, feeds, strict=True):
            np.testing.assert_allclose(f.result(10).outputs[0], model["full"].run(None, fd)[0], atol=1e-4)
    finally:
        c.close()
        srv.kill()
        srv.wait(10)


def test_curve_allow_list_admits_only_listed_clients(model, caplog):
    """And a refusal is said on both sides: the client's log names the handshake refused (it read only
    "unreachable" or fell back), the server's the key it refused (it logged nothing)."""
    import logging

    caplog.set_level(logging.WARNING)
    pub_s, sec_s = zmq.curve_keypair()
    good_pub, good_sec = zmq.curve_keypair()
    bad_pub, bad_sec = zmq.curve_keypair()
    srv = TailServer(
        ServerConfig(
            bind="tcp://127.0.0.1:0", plans_dir=model["plans"], curve_secret_key=sec_s, curve_allow=[good_pub]
        )
    ).start()
    try:
        with client(model, srv, curve_server_key=pub_s, curve_keypair=(good_pub, good_sec)) as c:
            feeds = x()
            r = c.infer(feeds, timeout=30)
            assert not r.fallback
            np.testing.assert_allclose(r.outputs[0], model["full"].run(None, feeds)[0], atol=1e-5)
        with client(
            model,
            srv,
            curve_server_key=pub_s,
            curve_keypair=(bad_pub, bad_sec),
            fallback=False,
            timeout_s=0.5,
            connect_grace_s=0.5,
        ) as c:
            assert not c.server_up
            with pytest.raises(EdgeError):
                c.infer(x(), timeout=30)
        said = [r.getMessage() for r in caplog.records]
        assert any("refused the connection's handshake: check that --curve-server-key" in m for m in said), (
            said
        )
        assert any(f"its key {bad_pub.decode()} is not on --curve-allow" in m for m in said), said
        assert sum("refused the connection's handshake" in m for m in said) == 1  # once, not per retry
        # a client that does not speak CURVE at all is not served either
        s = _raw(srv.endpoint)
        s.send_multipart(wire.Message(wire.PING, 1).to_frames())
        assert not s.poll(500)
        s.close(0)
        # an edge without keys is not told to check keys it never gave (the demo's plain client, its server
        # restarting, read "check that --curve-server-key is its public key")
        caplog.clear()
        caplog.set_level(logging.INFO, logger="splitpoint.edge")
        with client(model, srv, fallback=False, timeout_s=0.5, connect_grace_s=0.5) as c:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not any(
                "handshake" in r.getMessage() for r in caplog.records
            ):
                time.sleep(0.05)
        said = [r.getMessage() for r in caplog.records if "handshake" in r.getMessage()]
        assert said and "it asks for CurveZMQ (--curve-server-key)" in said[0], said
        assert not any("check that --curve-server-key is its public key" in m for m in said), said
    finally:
        srv.stop()


def test_an_edge_refused_by_the_allow_list_is_served_once_its_key_is_allowed(model, caplog):
    """libzmq never dials again after a refused handshake: an edge whose key was added to --curve-allow
    (the server restarted with it) answered "unreachable" until it was restarted too."""
    import logging

    caplog.set_level(logging.INFO, logger="splitpoint.edge")
    pub_s, sec_s = zmq.curve_keypair()
    edge_pub, edge_sec = zmq.curve_keypair()
    other_pub, _ = zmq.curve_keypair()
    endpoint = f"tcp://127.0.0.1:{free_port()}"

    def serve(allow):
        cfg = ServerConfig(bind=endpoint, plans_dir=model["plans"], curve_secret_key=sec_s, curve_allow=allow)
        return TailServer(cfg).start()

    srv = serve([other_pub])
    cfg = EdgeConfig(
        plan_dir=model["plans"] / "p-f32",
        server=endpoint,
        fallback=False,
        timeout_s=5.0,
        connect_grace_s=0.5,
        curve_server_key=pub_s,
        curve_keypair=(edge_pub, edge_sec),
    )
    with EdgeClient(cfg) as c:
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not any(
                "refused" in r.getMessage() for r in caplog.records
            ):
                time.sleep(0.05)
            assert not c.server_up
            with pytest.raises(EdgeError):
                c.infer(x(), timeout=30)
        finally:
            srv.stop()
        srv = serve([other_pub, edge_pub])
        try:
            deadline = time.monotonic() + 20  # dialled again 2 s after the refusal, then 4 s, ...
            while time.monotonic() < deadline and not c.server_up:
                time.sleep(0.05)
            assert c.server_up
            assert not c.infer(x(), timeout=30).fallback
        finally:
            srv.stop()


def test_only_deploy_keys_may_deploy_to_a_curve_server(model, tmp_path):
    pub_s, sec_s = zmq.curve_keypair()
    edge_pub, edge_sec = zmq.curve_keypair()
    ops_pub, ops_sec = zmq.curve_keypair()
    srv = TailServer(
        ServerConfig(
            bind="tcp://127.0.0.1:0",
            plans_dir=tmp_path / "pushed",
            curve_secret_key=sec_s,
            curve_allow=(edge_pub,),
            deploy_allow=(ops_pub,),
        )
    ).start()
    try:
        with pytest.raises(SplitPointError, match="refused plan .*deploy allow-list"):
            deploy(model["plans"] / "p-f32", srv.endpoint, 20, "server", pub_s, (edge_pub, edge_sec))
        assert not (tmp_path / "pushed").exists()  # an edge key may infer, not deploy: nothing written
        pid = deploy(model["plans"] / "p-f32", srv.endpoint, 60, "server", pub_s, (ops_pub, ops_sec))
        assert pid in srv.registry.ids()
    finally:
        srv.stop()


def _has_ipv6_loopback() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="this host has no IPv6 loopback")
def test_ipv6_endpoints_serve_answer_and_deploy(model, tmp_path):
    # libzmq resolves IPv4 alone unless told: tcp://[::1]:PORT failed with "No such device"
    srv = TailServer(ServerConfig(bind="tcp://[::1]:0", plans_dir=tmp_path / "v6")).start()
    try:
        assert srv.endpoint.startswith("tcp://[::1]:")
        deploy(model["plans"] / "p-f32", srv.endpoint)
        with client(model, srv, fallback=False) as c:
            assert not c.infer(x(), timeout=30).fallback
    finally:
        srv.stop()
    # a bind on * listens on IPv6 and IPv4 alike
    srv = TailServer(ServerConfig(bind="tcp://*:0", plans_dir=model["plans"], insecure=True)).start()
    try:
        port = srv.endpoint.rsplit(":", 1)[1]
        for host in ("127.0.0.1", "[::1]", "localhost"):
            cfg = EdgeConfig(plan_dir=model["plans"] / "p-f32", server=f"tcp://{host}:{port}", fallback=False)
            with EdgeClient(cfg) as c:
                assert not c.infer(x(), timeout=30).fallback, host
    finally:
        srv.stop()


def test_a_host_name_that_does_not_resolve_is_named_as_such(model):
    from splitpoint.core.endpoints import name_problem

    # .invalid never resolves (RFC 2606); libzmq retries such a name for ever without a word
    with pytest.raises(SplitPointError, match="'nowhere.invalid' has no IPv4 address"):
        deploy(model["plans"] / "p-f32", "tcp://nowhere.invalid:5555", timeout_s=2)
    assert name_problem("tcp://localhost:5555") is None
    assert name_problem("tcp://[::1]:5555") is None and name_problem("ipc:///tmp/x") is None


def test_only_loopback_binds_go_without_keys():
    from splitpoint.core.endpoints import is_loopback

    for e in (
        "tcp://127.0.0.1:1",
        "tcp://127.8.0.1:1",
        "tcp://[::1]:1",
        "tcp://[0:0::1]:1",
        "tcp://localhost:1",
    ):
        assert is_loopback(e), e
    for e in ("tcp://*:1", "tcp://[::]:1", "tcp://0.0.0.0:1", "tcp://10.0.0.2:1", "tcp://host.lan:1"):
        assert not is_loopback(e), e


def test_a_server_reachable_from_the_network_needs_keys_or_insecure():
    with pytest.raises(ConfigError, match="CurveZMQ keys"):
        ServerConfig.of(bind="tcp://0.0.0.0:5555")
    assert ServerConfig.of(bind="tcp://0.0.0.0:5555", insecure=True).insecure
    assert ServerConfig.of(bind="tcp://0.0.0.0:5555", curve_secret_key=zmq.curve_keypair()[1]).curve


def test_edge_daemon_refuses_malformed_deploys_and_keeps_serving(model, server, tmp_path):
    from splitpoint.edge.daemon import EdgeDaemon

    daemon = EdgeDaemon(
        EdgeConfig(
            plan_dir=model["plans"] / "p-f32",
            server=server.endpoint,
            timeout_s=5.0,
            listen=f"ipc://{tmp_path}/edge.sock",
        ),
        plans_dir=tmp_path / "pushed",
    )
    t = threading.Thread(target=daemon.run, daemon=True)
    t.start()
    try:
        s = _raw(f"ipc://{tmp_path}/edge.sock")
        good = model["plans"] / "p-f32"
        names = ["plan.json", "head.onnx", "tail.onnx", "full.onnx"]
        frames = [(good / n).read_bytes() for n in names]
        cases = [
            ({"files": names}, [b"{not json", *frames[1:]], "not valid JSON"),
            ({"files": 7}, frames, "meta.files"),
            ({"files": ["../plan.json", *names[1:]]}, frames, "plain names"),
            (
                {"files": names},
                [frames[0], frames[1], frames[2] + b"\0", frames[3]],
                "checksum mismatch for tail.onnx",
            ),
            ({"files": names + ["extra.bin"]}, [*frames, b"x"], "does not list"),
        ]
        # a decoder split: its head reads a KV cache no one-shot request carries (it was taken, and every
        # request then failed with a KeyError from inside the head)
        from splitpoint.core.decoders import open_decoder
        from splitpoint.core.plandir import write_decoder_plan

        dec_plan = write_decoder_plan(open_decoder("decoder-tiny"), tmp_path / "dec", edge_layers=1)
        dec_names = ["plan.json", *sorted(dec_plan.files_for("edge", fallback=False) - {"plan.json"})]
        dec_frames = [(tmp_path / "dec" / n).read_bytes() for n in dec_names]
        cases.append(({"files": dec_names}, dec_frames, "splits a decoder"))
        with pytest.raises(PlanError, match="runs with `splitpoint generate"):  # as `edge run` starts
            EdgeClient(EdgeConfig(plan_dir=tmp_path / "dec", server=server.endpoint))
        for i, (meta, fr, message) in enumerate(cases):
            reply = _ask(s, wire.Message(wire.DEPLOY, i, meta=meta, frames=fr).to_frames(), timeout=10000)
            assert (
                reply.type == wire.ERROR
                and reply.meta["code"] == "bad-plan"
                and message in reply.meta["message"]
            ), (message, reply.meta)
        assert not (tmp_path / "pushed").exists() or not any(
            (tmp_path / "pushed").iterdir()
        )  # nothing half-written
        assert _ask(s, wire.Message(wire.PING, 99).to_frames(), timeout=10000).type == wire.PONG
        # a bad local request is answered under its own id, whatever is wrong with it
        bad = [
            wire.Message(wire.INFER, 42, tensors=["not-an-input"], frames=[encode(x()["input"], "float32")]),
            wire.Message(wire.INFER, 43, tensors=["input"], frames=[b"garbage"]),
            wire.Message(
                wire.INFER, 44, tensors=["input"], frames=[encode(np.zeros((1, 3, 9), np.float32), "float32")]
            ),
        ]
        # naming another plan than the one the daemon runs
        bad.append(
            wire.Message(wire.INFER, 45, "ab" * 32, ["input"], frames=[encode(x()["input"], "float32")])
        )
        for m, code in zip(bad, ["bad-tensor", "bad-tensor", "bad-input", "unknown-plan"], strict=True):
            reply = _ask(s, m.to_frames(), timeout=10000)
            assert (reply.type, reply.id, reply.meta["code"]) == (wire.ERROR, m.id, code), reply.meta
            if m.plan:  # an error answering a request carries the plan it named
                assert reply.plan == m.plan
        # refused as malformed, the plan its header names still comes back (protocol.md, Errors)
        odd = {"v": 2, "type": "infer", "id": 47, "plan": "cd" * 32}
        reply = _ask(s, [json.dumps(odd).encode()], timeout=10000)
        assert (reply.id, reply.meta["code"], reply.plan) == (47, "bad-version", "cd" * 32), reply.meta
        # its own plan's id, or none, is answered
        plan_id = _ask(s, wire.Message(wire.PING, 98).to_frames(), timeout=10000).plan
        for pid in (plan_id, ""):
            m = wire.Message(wire.INFER, 46, pid, ["input"], frames=[encode(x()["input"], "float32")])
            assert _ask(s, m.to_frames(), timeout=30000).type == wire.RESULT
        s.close(0)
        assert (tmp_path / "edge.sock").is_socket()
    finally:
        daemon.stop()
        t.join(30)
    # its socket file goes with it (libzmq left it behind: in /run, a stale file after every stop)
    assert not t.is_alive() and not (tmp_path / "edge.sock").exists()


@contextlib.contextmanager
def _slow_server(out: str, delay_s: float):
    """A fake server that answers each request after ``delay_s`` (zeros for the output ``out``) and a
    ping at once; yields its endpoint."""
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if not router.poll(50):
                continue
            ident, head, *_ = router.recv_multipart()
            m = json.loads(head)
            if m["type"] == "ping":
                router.send_multipart([ident, *wire.Message(wire.PONG, m["id"]).to_frames()])
                continue
            time.sleep(delay_s)
            frames = [encode(np.zeros((1, 1000), np.float32), "float32")]
            reply = wire.Message(wire.RESULT, m["id"], tensors=[out], frames=frames)
            router.send_multipart([ident, *reply.to_frames()])

    srv = threading.Thread(target=serve, daemon=True)
    srv.start()
    try:
        yield f"tcp://127.0.0.1:{port}"
    finally:
        stop.set()
        srv.join(5)
        router.close(0)


def test_edge_daemon_keeps_answering_while_its_window_is_full(model, tmp_path):
    """A slow server fills the window: the daemon's socket still answers pings at once, each local request
    gets one answer (a result, or `timeout` once it waited past --timeout for room), and on stop the ones
    still waiting are told `closed` and the daemon returns."""
    from splitpoint.edge.daemon import EdgeDaemon

    h = model["h"]
    out = write_plan(h, tmp_path / "p", cut=h.cuts()[19]).outputs[0].name
    with _slow_server(out, 0.3) as endpoint:
        cfg = EdgeConfig(
            plan_dir=tmp_path / "p", server=endpoint, timeout_s=1.0, fallback=False,
            window=2, listen=f"ipc://{tmp_path}/edge.sock",
        )  # fmt: skip
        daemon = EdgeDaemon(cfg, plans_dir=tmp_path / "pushed")
        t = threading.Thread(target=daemon.run, daemon=True)
        t.start()
        try:
            s = _raw(f"ipc://{tmp_path}/edge.sock")
            assert _ask(s, wire.Message(wire.PING, 1).to_frames(), 10000).type == wire.PONG
            frame = encode(x()["input"], "float32")
            for k in range(12):
                s.send_multipart(
                    wire.Message(wire.INFER, 100 + k, tensors=["input"], frames=[frame]).to_frames()
                )
            t0 = time.monotonic()
            kinds = {}
            while len(kinds.setdefault("ids", set())) < 12:
                assert s.poll(10000), kinds
                m = wire.parse(s.recv_multipart())
                if m.type == wire.PONG:
                    continue
                assert m.id not in kinds["ids"] and 100 <= m.id < 112
                kinds["ids"].add(m.id)
                kind = m.type if m.type == wire.RESULT else m.meta["code"]
                kinds[kind] = kinds.get(kind, 0) + 1
                if len(kinds["ids"]) == 1:  # the window is full now: a ping is still answered at once
                    t1 = time.monotonic()
                    assert _ask(s, wire.Message(wire.PING, 2).to_frames(), 2000).type == wire.PONG
                    assert time.monotonic() - t1 < 1.0
            assert kinds.get(wire.RESULT, 0) >= 2 and kinds.get("timeout", 0) >= 1, kinds
            assert time.monotonic() - t0 < 8, kinds  # bounded by --timeout, not by the queue's length
            for k in range(6):  # then stop with requests waiting: each is answered
                s.send_multipart(
                    wire.Message(wire.INFER, 200 + k, tensors=["input"], frames=[frame]).to_frames()
                )
            time.sleep(0.1)
            daemon.stop()
            t.join(15)
            assert not t.is_alive()
            got = set()
            while s.poll(2000):
                m = wire.parse(s.recv_multipart())
                assert m.id not in got
                got.add(m.id)
            assert got == set(range(200, 206))
            s.close(0)
        finally:
            daemon.stop()


def test_edge_daemon_holds_a_bounded_number_of_bytes_of_local_requests(model, tmp_path, monkeypatch):
    """1,024 local requests of 3.1 MB each held 3.4 GB: past the bytes limit a request is answered busy
    at once, naming it, and once the held ones are answered there is room again (nothing is left
    counted)."""
    from splitpoint.edge import daemon as edge_daemon

    h = model["h"]
    out = write_plan(h, tmp_path / "p", cut=h.cuts()[19]).outputs[0].name
    frame = encode(x()["input"], "float32")
    monkeypatch.setattr(edge_daemon, "MAX_LOCAL_BYTES", 3 * x()["input"].nbytes)
    with _slow_server(out, 0.2) as endpoint:
        cfg = EdgeConfig(
            plan_dir=tmp_path / "p", server=endpoint, timeout_s=10.0, fallback=False, window=1,
            listen=f"ipc://{tmp_path}/edge.sock",
        )  # fmt: skip
        daemon = edge_daemon.EdgeDaemon(cfg, plans_dir=tmp_path / "pushed")
        t = threading.Thread(target=daemon.run, daemon=True)
        t.start()
        try:
            s = _raw(f"ipc://{tmp_path}/edge.sock")
            assert _ask(s, wire.Message(wire.PING, 1).to_frames(), 10000).type == wire.PONG
            for k in range(6):
                s.send_multipart(
                    wire.Message(wire.INFER, 10 + k, tensors=["input"], frames=[frame]).to_frames()
                )
            answers = {}
            while len(answers) < 6:
                assert s.poll(10000), answers
                m = wire.parse(s.recv_multipart())
                answers[m.id] = m.type if m.type == wire.RESULT else (m.meta["code"], m.meta["message"])
            assert [answers[10 + k] for k in range(3)] == [wire.RESULT] * 3, answers
            for k in range(3, 6):
                code, said = answers[10 + k]
                assert code == wire.E_BUSY and "MiB of inputs (the limit is 0 MiB)" in said, said
            for k in range(3):  # all answered: the room is back
                assert (
                    _ask(
                        s,
                        wire.Message(wire.INFER, 20 + k, tensors=["input"], frames=[frame]).to_frames(),
                        10000,
                    ).type
                    == wire.RESULT
                )
            s.close(0)
        finally:
            daemon.stop()
            t.join(15)


def test_a_second_process_on_a_live_ipc_path_is_refused_and_a_stale_one_is_reused(model, tmp_path):
    """libzmq binds over an existing socket file, and the process listening there goes on, deaf: the
    second is refused instead. A file left by a process that is gone is bound over, as it should be."""
    import socket as pysocket

    path = tmp_path / "s.sock"
    first = TailServer(ServerConfig(bind=f"ipc://{path}", plans_dir=model["plans"])).start()
    try:
        with pytest.raises(SplitPointError, match="another process listens there; choose another --bind"):
            TailServer(ServerConfig(bind=f"ipc://{path}", plans_dir=model["plans"])).start()
        with client(model, first) as c:  # the first still answers
            assert not c.infer(x(), timeout=30).fallback
    finally:
        first.stop()
    stale = tmp_path / "stale.sock"
    s = pysocket.socket(pysocket.AF_UNIX)
    s.bind(str(stale))  # a socket file nobody accepts on
    s.close()
    srv = TailServer(ServerConfig(bind=f"ipc://{stale}", plans_dir=model["plans"])).start()
    try:
        with client(model, srv) as c:
            assert not c.infer(x(), timeout=30).fallback
    finally:
        srv.stop()


def test_two_processes_under_one_device_id_are_shown_as_such(mosquitto):
    """Each one's status overwrites the other's: the fleet view says how many publish under the id, and
    that one still does when the other, stopping, has written 'offline' over it."""
    from splitpoint.app.console import device_state
    from splitpoint.core.telemetry import Telemetry

    a, b = Telemetry("twin", "edge", mosquitto), Telemetry("twin", "edge", mosquitto)
    try:
        assert a.connected.wait(5) and b.connected.wait(5)
        with FleetSubscriber(mosquitto) as sub:
            for t in (a, b):
                t.status("online")
                t.metrics({})
            time.sleep(0.5)
            assert device_state(sub.snapshot()["twin"]) == "online: 2 processes publish under this id"
            b.close()
            a.metrics({})
            time.sleep(0.5)
            assert device_state(sub.snapshot()["twin"]).startswith("offline? (another process")
    finally:
        a.close()
        b.close()


def test_latency_samples_past_the_rate_limit_are_not_counted_as_lost(mosquitto):
    """With a healthy broker, 162 of 205 requests read as "dropped" in `watch`: the samples the 20/s
    limit leaves out on purpose. They are counted apart; "dropped" is messages the broker never got."""
    from splitpoint.core.telemetry import Telemetry

    t = Telemetry("sampler", "edge", mosquitto)
    try:
        assert t.connected.wait(5)
        sent = sum(t.latency({"total_ms": 1.0}) for _ in range(50))  # far past 20/s
        assert 1 <= sent < 50 and t.sampled_out == 50 - sent and t.dropped == 0
        with FleetSubscriber(mosquitto) as sub:
            t.metrics({})
            deadline = time.monotonic() + 5
            # its retained status comes first: wait for the metrics themselves
            while "metrics" not in sub.snapshot().get("sampler", {}) and time.monotonic() < deadline:
                time.sleep(0.05)
            metrics = sub.snapshot()["sampler"]["metrics"]
        assert metrics["telemetry_dropped"] == 0 and metrics["latency_sampled_out"] == 50 - sent
    finally:
        t.close()


def test_deploy_to_several_targets_goes_on_past_one_that_fails(model, server):

    from .conftest import run_cli

    dead = f"tcp://127.0.0.1:{free_port()}"
    r = run_cli(
        "deploy", str(model["plans"] / "p-int8"), "--server", dead, "--server", server.endpoint,
        "--timeout", "2", timeout=120,
    )  # fmt: skip
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert f"{server.endpoint}: plan" in r.stdout and "acknowledged (server)" in r.stdout, r.stdout
    assert (
        f"{dead} (server): not deployed" in r.stderr and "1 of 2 deploys failed (1 acknowledged)" in r.stderr
    )


def test_a_deploy_under_way_when_the_server_stops_is_finished_and_acknowledged(model, tmp_path):
    """SIGTERM (stop) during a deploy: the plan is installed, and the operator hears so (before, the
    socket thread had stopped first and the acknowledgement was dropped)."""
    from concurrent.futures import ThreadPoolExecutor

    srv = TailServer(ServerConfig(bind="tcp://127.0.0.1:0", plans_dir=tmp_path / "plans")).start()
    installing = threading.Event()
    install = srv.registry.install

    def slow_install(files):
        installing.set()
        time.sleep(0.5)  # stop() comes while the plan is being written and loaded
        return install(files)

    srv.registry.install = slow_install  # type: ignore[method-assign]
    with ThreadPoolExecutor(1) as pool:
        acked = pool.submit(deploy, model["plans"] / "p-int8", srv.endpoint, 30, "server")
        assert installing.wait(30)
        srv.stop()
        plan_id = json.loads((model["plans"] / "p-int8" / "plan.json").read_text())["plan_id"]
        assert acked.result(30) == plan_id


def test_max_queue_counts_the_requests_waiting_not_those_the_workers_run(model):
    """--workers 2 --max-queue 1: two requests run and one waits; the fourth is busy. The running ones
    were counted as waiting: the second was refused while a worker sat idle."""
    srv = TailServer(
        ServerConfig(bind="tcp://127.0.0.1:0", plans_dir=model["plans"], workers=2, max_queue=1)
    ).start()
    result = srv._result

    def slow(req):  # every request arrives while the first two still run
        time.sleep(0.4)
        return result(req)

    try:
        with client(model, srv, fallback=False, window=4, timeout_s=30) as c:
            c.infer(x(), timeout=30)  # connected, plan loaded
            srv._result = slow  # type: ignore[method-assign]
            futures = [c.submit(x()) for _ in range(4)]
            outcomes = []
            for f in futures:
                try:
                    outcomes.append(f.result(30))
                except EdgeError as exc:
                    outcomes.append(exc)
    finally:
        srv.stop()
    busy = [o for o in outcomes if isinstance(o, EdgeError)]
    assert len(busy) == 1 and busy[0].code == "busy", outcomes
    assert "3 requests taken and not answered yet (the limit is 1 waiting beyond the 2" in str(busy[0])


@pytest.mark.parametrize("workers", [1, 2])
def test_a_stopping_server_answers_what_it_took_and_refuses_the_rest_at_once(model, workers):
    """SIGTERM with the server saturated: it exited in 0.27 s answering none of the 16 requests it held
    (and with workers, dropped results it had computed); each failed on the edge as a dropped
    connection. Now what it took is answered, and what comes meanwhile is refused unavailable."""
    srv = TailServer(
        ServerConfig(bind="tcp://127.0.0.1:0", plans_dir=model["plans"], workers=workers, drain_s=30)
    ).start()
    result = srv._result

    def slow(req):  # a tail of 30 ms: a window of 16 is a queue half a second long
        time.sleep(0.03)
        return result(req)

    srv._result = slow  # type: ignore[method-assign]
    outcomes: list = []
    with client(model, srv, fallback=False, window=16, timeout_s=30) as c:
        c.infer(x(), timeout=30)  # connected, plan loaded
        futures = [c.submit(x()) for _ in range(16)]
        deadline = time.monotonic() + 20
        while srv.stats.in_flight + sum(f.done() for f in futures) < 16 and time.monotonic() < deadline:
            time.sleep(0.005)  # every one taken by the server, most waiting for the tail
        held = srv.stats.in_flight
        stopper = threading.Thread(target=srv.stop)
        stopper.start()
        time.sleep(0.05)
        late = c.submit(x())  # after the stop: refused at once, not queued
        for f in [*futures, late]:
            try:
                outcomes.append(f.result(30))
            except EdgeError as exc:
                outcomes.append(exc)
        stopper.join(60)
    answered = [o for o in outcomes[:-1] if not isinstance(o, Exception)]
    failed = [str(o) for o in outcomes[:-1] if isinstance(o, Exception)]
    assert held >= 8 and len(answered) == 16, (held, failed)
    assert isinstance(outcomes[-1], EdgeError) and outcomes[-1].code == "unavailable", outcomes[-1]
    assert "stopping" in str(outcomes[-1])


@pytest.mark.parametrize("workers", [1, 2])
def test_what_a_stopping_server_cannot_finish_within_its_drain_is_answered_unavailable(model, workers):
    """With workers, the requests queued in the pool or running when --drain ended got nothing (their
    results dropped as the socket closed): every one is answered, a result or unavailable, never left
    to the edge's timeout or to a dropped connection."""
    srv = TailServer(
        ServerConfig(bind="tcp://127.0.0.1:0", plans_dir=model["plans"], workers=workers, drain_s=0.2)
    ).start()
    result = srv._result

    def slow(req):  # 100 ms a tail: 16 of them outlast a drain of 0.2 s
        time.sleep(0.1)
        return result(req)

    srv._result = slow  # type: ignore[method-assign]
    outcomes: list = []
    with client(model, srv, fallback=False, window=16, timeout_s=30) as c:
        c.infer(x(), timeout=30)
        futures = [c.submit(x()) for _ in range(16)]
        deadline = time.monotonic() + 20
        while srv.stats.in_flight + sum(f.done() for f in futures) < 16 and time.monotonic() < deadline:
            time.sleep(0.005)
        t0 = time.monotonic()
        srv.stop()
        for f in futures:
            try:
                outcomes.append(f.result(30))
            except EdgeError as exc:
                outcomes.append(exc)
        waited = time.monotonic() - t0
    refused = [str(o) for o in outcomes if isinstance(o, Exception)]
    assert refused and len(refused) < 16, refused  # some answered in the drain, the rest refused
    assert all("unavailable" in m or "stopped before answering" in m for m in refused), refused
    assert waited < 5, waited  # at the drain's end, not at the client's 30 s timeout


def test_a_local_request_that_named_a_plan_never_runs_on_another(model, server, tmp_path):
    """Requests naming plan A wait in the daemon's backlog while a deploy switches it to plan B: each is
    answered by A or refused unknown-plan, never by B's model (before, those that started after the
    switch came back as results of the other model)."""
    from splitpoint.core.plan import Plan

    start = tmp_path / "plans" / "start"
    shutil.copytree(model["plans"] / "p-f32", start)
    sock = f"ipc://{tmp_path}/edge.sock"
    cmd = [sys.executable, "-m", "splitpoint.app", "edge", "run", str(start), "--server", server.endpoint]
    proc = subprocess.Popen(
        [*cmd, "--listen", sock, "--window", "1", "--quiet"], stderr=subprocess.PIPE, text=True
    )
    old, new = Plan.load(start), Plan.load(model["plans"] / "p-int8")
    try:
        s = _raw(sock)
        assert _ask(s, wire.Message(wire.PING, 1).to_frames(), timeout=30000).type == wire.PONG
        payload = encode(x()["input"], "float32")
        for rid in range(100, 300):
            s.send_multipart(
                wire.Message(wire.INFER, rid, old.plan_id, ["input"], frames=[payload]).to_frames()
            )
        kinds = []
        for _ in range(5):  # some answered by A before the deploy
            assert s.poll(60000)
            reply = wire.parse(s.recv_multipart())
            assert reply.type == wire.RESULT and reply.plan == old.plan_id
            kinds.append(reply.type)
        d = model["plans"] / "p-int8"
        names = ["plan.json", *sorted(new.files_for("edge"))]
        header = wire.Message(wire.DEPLOY, 7, meta={"files": names}).header()
        deployer = _raw(sock)
        deployer.send_multipart([header, *[(d / n).read_bytes() for n in names]])
        assert deployer.poll(60000)
        assert wire.parse(deployer.recv_multipart()).type == wire.DEPLOYED
        deployer.close(0)
        for _ in range(195):
            assert s.poll(60000), kinds
            reply = wire.parse(s.recv_multipart())
            assert reply.type == wire.ERROR or reply.plan == old.plan_id, (reply.type, reply.plan[:12])
            kinds.append(reply.type if reply.type == wire.RESULT else reply.meta["code"])
        s.close(0)
    finally:
        proc.terminate()
        proc.wait(30)
    assert set(kinds) == {wire.RESULT, wire.E_UNKNOWN_PLAN}, kinds


def test_requests_on_a_connection_that_drops_fail_at_once_not_at_their_deadline(model, tmp_path):
    """libzmq sends nothing again on a new connection: a request in flight when the server's connection
    drops gets no reply. A relay killed with three in flight held them the whole --timeout though the
    client knew at once; now each fails (or falls back) when the drop is seen."""
    h = model["h"]
    write_plan(h, tmp_path / "p", cut=h.cuts()[19])
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    cfg = EdgeConfig(plan_dir=tmp_path / "p", server=f"tcp://127.0.0.1:{port}", fallback=False, timeout_s=60)
    try:
        with EdgeClient(cfg) as c:
            fut = c.submit({"input": np.zeros((1, 3, 64, 64), np.float32)})
            deadline = time.monotonic() + 20
            got = None
            while got is None and time.monotonic() < deadline:  # pings answered; the request is held
                if not router.poll(100):
                    continue
                ident, head, *_ = router.recv_multipart()
                msg = json.loads(head)
                if msg["type"] == "ping":
                    router.send_multipart(
                        [ident, json.dumps({"v": 1, "type": "pong", "id": msg["id"]}).encode()]
                    )
                else:
                    got = msg
            assert got is not None and got["type"] == "infer"
            t0 = time.monotonic()
            router.close(0)  # the server goes, the request with it
            with pytest.raises(EdgeError, match="dropped with it in flight") as exc:
                fut.result(timeout=50)
            assert exc.value.code == "unreachable" and time.monotonic() - t0 < 30  # not the 60 s timeout
    finally:
        router.close(0)


def test_an_edge_is_switched_only_after_its_server_and_uses_its_own_model_where_the_server_lacks_the_plan(
    model, tmp_path
):
    """A deploy whose server was down switched the edge anyway (and recorded it for restarts): every
    request was then refused `unknown-plan`, though the plan shipped the whole model. Now the edge is
    left as it was, and an edge given a plan its server lacks runs requests on its own model, and the
    deploy says so."""
    from splitpoint.core.plan import Plan

    from .conftest import run_cli

    served = tmp_path / "served"
    shutil.copytree(model["plans"] / "p-f32", served / "p-f32")  # the server has p-f32, not p-int8
    srv = TailServer(ServerConfig(bind="tcp://127.0.0.1:0", plans_dir=served)).start()
    start = tmp_path / "edge" / "start"
    shutil.copytree(model["plans"] / "p-f32", start)
    sock = f"ipc://{tmp_path}/edge.sock"
    cmd = [sys.executable, "-m", "splitpoint.app", "edge", "run", str(start), "--server", srv.endpoint]
    proc = subprocess.Popen(
        [*cmd, "--listen", sock], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    old, new = Plan.load(start), Plan.load(model["plans"] / "p-int8")
    try:
        s = _raw(sock)
        assert _ask(s, wire.Message(wire.PING, 1).to_frames(), timeout=30000).plan == old.plan_id
        dead = f"tcp://127.0.0.1:{free_port()}"
        r = run_cli(
            "deploy", str(model["plans"] / "p-int8"), "--server", dead, "--edge", sock, "--timeout", "2",
            timeout=120,
        )  # fmt: skip
        assert r.returncode != 0 and f"{sock} (edge): not deployed: {dead} (server) did not take" in r.stderr
        assert _ask(s, wire.Message(wire.PING, 2).to_frames()).plan == old.plan_id  # not switched
        assert not (tmp_path / "edge" / ".edge-deployed" / "deployed.json").exists()  # nor recorded
        # the edge's socket given as --server: told which option deploys to it, not "missing full.onnx"
        from splitpoint.app.orchestrator import deploy

        with pytest.raises(SplitPointError, match=r"deploy it here with `splitpoint deploy PLAN_DIR --edge"):
            deploy(model["plans"] / "p-int8", sock, 30, "server")
        r = run_cli("deploy", str(model["plans"] / "p-int8"), "--edge", sock, timeout=120)
        assert r.returncode == 0 and "acknowledged (edge)" in r.stdout, r.stderr
        said = " ".join(r.stderr.split())
        assert f"does not serve plan {new.plan_id[:16]}" in said and "(fallback)" in said, r.stderr
        f = x()
        ask = wire.Message(wire.INFER, 3, tensors=["input"], frames=[encode(f["input"], "float32")])
        got = _ask(s, ask.to_frames(), timeout=30000)
        assert got.type == wire.RESULT and got.meta["fallback"] is True, got.meta
        np.testing.assert_allclose(decode(got.frames[0]), model["full"].run(None, f)[0], atol=1e-5)
        s.close(0)
    finally:
        proc.terminate()
        proc.wait(30)
        srv.stop()


def test_a_deploy_removes_the_plans_pushed_earlier_that_no_daemon_runs(model, tmp_path):
    """Every plan pushed to a daemon stayed in .edge-deployed (a head and a full model each): a device
    deployed to daily filled its card. A deploy removes those no daemon runs, once they are older than a
    write in progress; it keeps another daemon's, one a process runs that no record names (a daemon
    started on the pushed folder itself), a fresh one, and folders it did not write."""
    import os

    from splitpoint.core.plan import LEFTOVER_AGE_S, Plan, hold_plan, release_plan
    from splitpoint.edge.daemon import DEPLOYED, EdgeDaemon

    plans = tmp_path / "plans"
    start = plans / "start"
    shutil.copytree(model["plans"] / "p-f32", start)
    deployed = plans / ".edge-deployed"
    old = time.time() - 2 * LEFTOVER_AGE_S
    for name in ("aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb", "cccccccccccccccc", "dddddddddddddddd", "notes"):
        shutil.copytree(model["plans"] / "p-f32", deployed / name)
        if name != "cccccccccccccccc":
            os.utime(deployed / name, (old, old))
    other = {"replaces": str(start.resolve()), "plan": "bbbbbbbbbbbbbbbb"}
    (deployed / DEPLOYED).write_text(json.dumps({"daemons": {"ipc://other": other}}))
    a = f"ipc://{tmp_path}/a.sock"
    running = hold_plan(deployed / "dddddddddddddddd")  # as an edge client running on it holds it
    assert running is not None
    daemon = EdgeDaemon(EdgeConfig(plan_dir=start, server="tcp://127.0.0.1:1", listen=a, connect_grace_s=0))
    names = ["plan.json", "head.onnx", "full.onnx"]

    def push(src):
        frames = [(src / n).read_bytes() for n in names]
        return daemon._deploy(wire.Message(wire.DEPLOY, 1, meta={"files": names}, frames=frames))[0]

    try:
        assert not (deployed / "aaaaaaaaaaaaaaaa").exists()  # at start: nobody runs it
        first = push(model["plans"] / "p-int8")
        kept = {"bbbbbbbbbbbbbbbb", "cccccccccccccccc", "dddddddddddddddd", "notes", first.plan_id[:16]}
        assert {d.name for d in deployed.iterdir() if d.is_dir()} == kept
        os.utime(deployed / first.plan_id[:16], (old, old))  # replaced after it has aged
        release_plan(running)  # that process is gone: the next deploy removes its plan
        running = None
        second = push(model["plans"] / "p-f32")
    finally:
        daemon.client.close(drain=False)
        release_plan(running)
    assert second.plan_id == Plan.load(start).plan_id
    kept = {"bbbbbbbbbbbbbbbb", "cccccccccccccccc", "notes", second.plan_id[:16]}
    assert {d.name for d in deployed.iterdir() if d.is_dir()} == kept
    records = json.loads((deployed / DEPLOYED).read_text())["daemons"]
    assert records[a]["plan"] == second.plan_id[:16] and records["ipc://other"] == other


def test_two_daemons_on_one_plan_keep_their_own_deploy_records(model, tmp_path):
    """Both daemons on one PLAN_DIR shared deployed.json: a deploy to one made the other, restarted, run
    that plan (with its own --listen, its requests failed against another server's stages)."""
    from splitpoint.core.plan import Plan
    from splitpoint.edge.daemon import DEPLOYED, EdgeDaemon, deployed_plan

    plans = tmp_path / "plans"
    start = plans / "start"
    shutil.copytree(model["plans"] / "p-f32", start)
    a, b = f"ipc://{tmp_path}/a.sock", f"ipc://{tmp_path}/b.sock"
    daemon = EdgeDaemon(EdgeConfig(plan_dir=start, server="tcp://127.0.0.1:1", listen=a, connect_grace_s=0))
    try:
        counts = daemon.client.counts
        src = model["plans"] / "p-int8"
        names = ["plan.json", "head.onnx", "full.onnx"]
        msg = wire.Message(
            wire.DEPLOY, 1, meta={"files": names}, frames=[(src / n).read_bytes() for n in names]
        )
        plan, _ = daemon._deploy(msg)
        assert daemon.client.counts is counts  # the process's counts go on across the switch
    finally:
        daemon.client.close(drain=False)
    deployed = plans / ".edge-deployed"
    pushed = deployed / Plan.load(src).plan_id[:16]
    assert plan.plan_id == Plan.load(src).plan_id
    assert deployed_plan(start, deployed, a) == pushed
    assert deployed_plan(start, deployed, b) == start  # the other daemon's plan is its command line's
    # a record from before records were per daemon still stands for whichever daemon restarts first
    (deployed / DEPLOYED).write_text(json.dumps({"replaces": str(start.resolve()), "plan": pushed.name}))
    assert deployed_plan(start, deployed, b) == pushed


def test_long_lists_say_how_many_they_leave_out_and_errors_without_words_say_what_they_are():
    """`status` showed 32 of a server's 45 plans and nothing more; a deploy refused for memory read
    "MemoryError: " and nothing after it."""
    from splitpoint.app.orchestrator import clean_value
    from splitpoint.core.errors import describe

    shown = clean_value([f"plan{i}" for i in range(45)])
    assert shown[:32] == [f"plan{i}" for i in range(32)] and shown[32:] == ["… and 13 more"]
    assert clean_value(list(range(32))) == list(range(32))
    assert describe(MemoryError()) == "out of memory (MemoryError): this process has no memory for it"
    assert describe(ValueError("bad")) == "ValueError: bad" and describe(KeyError()) == "KeyError"


def test_the_memory_an_edge_counts_on_is_its_own_limit_not_the_hosts():
    """An edge under `ulimit -v` took the host's free memory as its own, loaded its fallback model and
    died of std::bad_alloc at start."""
    import psutil

    script = "from splitpoint.core.runner import available_memory; print(available_memory())"
    limited = subprocess.run(
        ["bash", "-c", f"ulimit -v 1500000; exec {sys.executable} -c '{script}'"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert limited.returncode == 0, limited.stderr
    assert int(limited.stdout) < 1500000 * 1024 < psutil.virtual_memory().available


def test_an_edge_only_device_reports_no_server_down(model, mosquitto, tmp_path):
    """An edge-only plan talks to no server, yet its status and metrics said server_up false: a
    dashboard that alerted on a server down fired for every edge-only device."""
    write_plan(model["h"], tmp_path / "eo", kind="edge-only")
    seen: list[tuple] = []
    with FleetSubscriber(mosquitto, lambda d, k, p: seen.append((k, p)) if d == "t-eo" else None):
        cfg = EdgeConfig(
            plan_dir=tmp_path / "eo", server="tcp://127.0.0.1:1", mqtt=mosquitto, device_id="t-eo"
        )
        with EdgeClient(cfg) as c:
            assert c.telemetry is not None and c.telemetry.connected.wait(15)
            c.infer(x(), timeout=30)
        time.sleep(0.5)
    status = [p for k, p in seen if k == "status" and p.get("state") == "online"]
    metrics = [p for k, p in seen if k == "metrics"]
    assert status and metrics, seen
    assert all(p["server"] is None and p["server_up"] is None and p["edge_only"] for p in status)
    assert all(p["server_up"] is None for p in metrics) and metrics[-1]["ok"] == 1


def test_a_plan_written_over_the_daemon_s_folder_after_a_deploy_is_run_at_restart(model, tmp_path, caplog):
    """A restarted daemon ran the plan last deployed to it in place of PLAN_DIR even where the operator
    had since written a new plan into PLAN_DIR (plan -o PLAN_DIR --force): the newer choice is run."""
    import logging

    from splitpoint.core.plan import Plan
    from splitpoint.edge.daemon import DEPLOYED, deployed_plan

    plans = tmp_path / "plans"
    start, pushed = plans / "start", plans / "pushed"
    write_plan(model["h"], start, cut=model["h"].cuts()[19])
    write_plan(model["h"], pushed, cut=model["h"].cuts()[10])
    record = {"replaces": str(start.resolve()), "replaced_id": Plan.load(start).plan_id, "plan": "pushed"}
    (plans / DEPLOYED).write_text(json.dumps({"daemons": {"": record}}))
    assert deployed_plan(start, plans) == pushed  # a restart keeps the deployed plan
    write_plan(model["h"], start, cut=model["h"].cuts()[5], force=True)
    caplog.set_level(logging.WARNING, logger="splitpoint")
    assert deployed_plan(start, plans) == start
    assert any("written since plan pushed was deployed" in r.getMessage() for r in caplog.records)


@contextlib.contextmanager
def _served(plans: Path, plan_dir: Path):
    """A `splitpoint serve` process of ``plans`` and an edge client of ``plan_dir`` that never answers
    alone: every answer is the split's."""
    from splitpoint.app.process import stop

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    srv = start_server(endpoint, plans)
    try:
        with EdgeClient(
            EdgeConfig(plan_dir=plan_dir, server=endpoint, connect_grace_s=20, fallback=False)
        ) as c:
            yield c
    finally:
        stop(srv)


def test_a_served_float32_split_of_a_reduction_gives_the_whole_models_output_bit_for_bit(tmp_path):
    """The tail's ReduceSum sums the received tensor in an order that follows its address: fed a view of
    the ZeroMQ frame's body (8 bytes past a 16-byte boundary), it answered 1-2 ulp off the whole model
    while `fidelity` said max error 0. Decoded tensors lie at onnxruntime's own 64-byte alignment."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("ReduceSum", ["a", "axes"], ["s"], keepdims=0),
        helper.make_node("Neg", ["s"], ["y"]),
    ]
    axes = onnx.numpy_helper.from_array(np.array([2], np.int64), "axes")
    g = helper.make_graph(
        nodes,
        "align",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [axes],
    )
    path = tmp_path / "align.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    h = open_model(str(path))
    write_plan(h, tmp_path / "plans" / "p", cuts=[h.cuts()[0]], codecs=["float32"])
    rng = np.random.default_rng(0)
    xs = [(100 * rng.standard_normal((1, 64, 256))).astype(np.float32) for _ in range(4)]
    whole = make_session(str(path))
    with _served(tmp_path / "plans", tmp_path / "plans" / "p") as c:
        for x in xs:
            np.testing.assert_array_equal(c.infer({"x": x})["y"], whole.run(None, {"x": x})[0])


def test_a_server_only_plan_sends_only_the_inputs_the_model_reads(tmp_path):
    """An input no node reads (an export's leftover: an int64 [N, 3], a zero-size one) went over the link
    in every server-only request, its bytes counted as sent; the cut plans never sent it."""
    import onnx
    from onnx import TensorProto, helper

    from splitpoint.core.plan import SERVER_ONLY
    from splitpoint.partitioner.planner import input_types

    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["y"])],
        "leftover",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("u", TensorProto.INT64, ["N", 3]),
            helper.make_tensor_value_info("v", TensorProto.FLOAT, [0]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    path = tmp_path / "leftover.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    h = open_model(str(path))
    assert h.index.read_inputs() == ["x"] and input_types(h.index) == ["float32"]
    plan = write_plan(h, tmp_path / "plans" / "p", kind=SERVER_ONLY)
    assert [t.name for t in plan.stages[0].sends] == ["x"]
    tail = onnx.load(str(tmp_path / "plans" / "p" / plan.stages[1].file), load_external_data=False)
    assert [i.name for i in tail.graph.input] == ["x"]
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    feeds = {"x": x, "u": np.zeros((2, 3), np.int64), "v": np.zeros(0, np.float32)}
    with _served(tmp_path / "plans", tmp_path / "plans" / "p") as c:
        np.testing.assert_array_equal(c.infer(feeds)["y"], -np.maximum(x, 0))
