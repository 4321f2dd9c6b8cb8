"""Plans over a chain of devices: the format, the segments, relays over real sockets, a middle device
that dies, deploys that give each device its segment only, and format-1 plans that still load."""

from __future__ import annotations

import contextlib
import shutil
import time
from concurrent.futures import wait
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from splitpoint.app.broker import free_port
from splitpoint.app.orchestrator import deploy
from splitpoint.app.process import output, start_server, stop
from splitpoint.core.codecs import decode, encode
from splitpoint.core.errors import PlanError, SplitPointError
from splitpoint.core.graph import open_model
from splitpoint.core.plan import Plan
from splitpoint.core.plandir import write_plan
from splitpoint.core.runner import load_stages, make_session, run_chain
from splitpoint.edge.client import EdgeClient, EdgeConfig, EdgeError

from .conftest import run_cli

DATA = Path(__file__).parent / "data"
RNG = np.random.default_rng(3)


def x(n=1):
    return {"input": RNG.standard_normal((n, 3, 64, 64)).astype(np.float32)}


@pytest.fixture(scope="module")
def chain(tmp_path_factory, small_resnet18):
    """A three-stage plan of a small ResNet-18 (edge, relay, server) and the unsplit model."""
    d = tmp_path_factory.mktemp("chain")
    h = open_model(small_resnet18)
    cuts = h.cuts()
    c1, c2 = cuts[12], cuts[40]
    plans = d / "plans"
    plan = write_plan(
        h, plans / "c3", cuts=[c1, c2], codecs=["float32", "float32"], include_full=True, force=True
    )
    write_plan(h, plans / "c3-int8", cuts=[c1, c2], codecs=["int8", "float16"], include_full=True)
    return {"h": h, "plans": plans, "plan": plan, "full": make_session(small_resnet18), "d": d}


def test_a_chain_plan_describes_each_stage_and_runs_as_the_unsplit_model(chain):
    plan = chain["plan"]
    assert [s.file for s in plan.stages] == ["head.onnx", "stage1.onnx", "tail.onnx"]
    assert plan.hops == 2 and plan.kind == "split"
    for a, b in zip(plan.stages, plan.stages[1:], strict=False):
        assert [t.name for t in a.sends] == [t.name for t in b.receives] and a.sends
    # each device holds its own segment (the edge also the whole model, for fallback)
    assert plan.files_for("edge") == {"head.onnx", "full.onnx"}
    assert plan.files_for("stage-1") == {"stage1.onnx"}
    assert plan.files_for("server") == plan.files_for("stage-2") == {"tail.onnx"}
    with pytest.raises(PlanError, match="stages 0 to 2"):
        plan.files_for("stage-3")
    _, stages = load_stages(chain["plans"] / "c3")
    for _ in range(3):
        feeds = x()
        got = run_chain(stages, feeds)
        np.testing.assert_allclose(got[0], chain["full"].run(None, feeds)[0], atol=1e-5)


def test_a_tensor_that_skips_a_device_is_passed_through(tmp_path):
    """x -> a -> b -> c; y = c + a: cut after a and after b, and a must cross the middle device."""
    X = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Sigmoid", ["a"], ["b"]),
        helper.make_node("Neg", ["b"], ["mid_out"]),
        helper.make_node("Tanh", ["b"], ["c"]),
        helper.make_node("Add", ["c", "a"], ["y"]),
    ]
    g = helper.make_graph(
        nodes,
        "skip",
        [X],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8]),
            helper.make_tensor_value_info("mid_out", TensorProto.FLOAT, [1, 8]),
        ],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, tmp_path / "skip.onnx")
    h = open_model(tmp_path / "skip.onnx")
    cuts = {c.index: c for c in h.cuts()}
    plan = write_plan(h, tmp_path / "p", cuts=[cuts[1], cuts[3]], codecs=["float32", "float16"])
    mid = plan.stages[1]
    assert "a" in [t.name for t in mid.receives] and "a" in [t.name for t in mid.sends]
    assert "mid_out" in mid.produces  # an output computed in the middle goes back with the reply
    mid_model = onnx.load(tmp_path / "p" / "stage1.onnx")
    # the segment computes what it must; what it only forwards, the runner passes on as received
    assert [o.name for o in mid_model.graph.output] == ["b", "mid_out"]
    _, stages = load_stages(tmp_path / "p")
    feeds = {"x": RNG.standard_normal((1, 8)).astype(np.float32)}
    ref = make_session(tmp_path / "skip.onnx").run(None, feeds)
    got = run_chain(stages, feeds)
    for g_, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(g_, r, atol=1e-6)
    # each hop's codec applies to what that hop carries
    lossy = run_chain(
        stages, feeds, hop=lambda i, t: {k: decode(encode(v, plan.stages[i].codec)) for k, v in t.items()}
    )
    assert np.abs(lossy[0] - ref[0]).max() < 1e-2


def test_inputs_that_disagree_on_the_batch_are_refused_on_the_edge(tmp_path):
    """z skips the edge's segment: a request whose x and z have different batches ran its head, crossed
    the link and was refused at the relay as a bad tensor, not at the edge as the caller's bad input."""
    X, Z = (helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 8]) for n in ("x", "z"))
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Sigmoid", ["a"], ["b"]),
        helper.make_node("Add", ["b", "z"], ["y"]),
    ]
    Y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])
    m = helper.make_model(
        helper.make_graph(nodes, "twoin", [X, Z], [Y]), opset_imports=[helper.make_opsetid("", 17)]
    )
    m.ir_version = 8
    onnx.save(m, tmp_path / "twoin.onnx")
    h = open_model(tmp_path / "twoin.onnx")
    cuts = {c.index: c for c in h.cuts()}
    write_plan(h, tmp_path / "p", cuts=[cuts[1], cuts[2]], codecs=["float32", "float32"])
    _, stages = load_stages(tmp_path / "p")
    assert "z" not in stages[0].run_inputs  # it only passes through the edge
    ok = {
        "x": RNG.standard_normal((3, 8)).astype(np.float32),
        "z": RNG.standard_normal((3, 8)).astype(np.float32),
    }
    stages[0].check_inputs(ok)
    bad = {**ok, "z": RNG.standard_normal((2, 8)).astype(np.float32)}
    with pytest.raises(
        SplitPointError, match="model inputs disagree: dimension N is 3 in tensor x but 2 in tensor z"
    ):
        stages[0].check_inputs(bad)
    cfg = EdgeConfig(
        plan_dir=tmp_path / "p", server=f"tcp://127.0.0.1:{free_port()}", connect_grace_s=0, fallback=False
    )
    with EdgeClient(cfg) as c:
        with pytest.raises(EdgeError) as exc:
            c.infer(bad, timeout=10)
        assert exc.value.code == "bad-input" and "dimension N" in str(exc.value)


@pytest.mark.parametrize("kind", ["split", "server-only", "edge-only"])
def test_format_1_plans_load_keep_their_ids_and_run(kind, tmp_path):
    """Plans written before chains existed (tests/data/format1, written by that version)."""
    src = DATA / "format1" / kind
    plan = Plan.load(src)
    written = Plan.parse((src / "plan.json").read_bytes())
    assert plan.plan_id == written.plan_id and len(plan.plan_id) == 64
    assert plan.kind == kind and len(plan.stages) == (1 if kind == "edge-only" else 2)
    _, stages = load_stages(src)
    feeds = {"x": RNG.standard_normal((1, 4)).astype(np.float32)}
    ref = make_session(DATA / "format1" / "model.onnx").run(None, feeds)
    for g_, r in zip(run_chain(stages, feeds), ref, strict=True):
        np.testing.assert_allclose(g_, r, atol=1e-6)
    # an edited format-1 plan is refused like any other
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    (bad / "plan.json").write_text((src / "plan.json").read_text().replace('"v1model"', '"other"'))
    with pytest.raises(PlanError, match="plan_id does not match"):
        Plan.load(bad)


def test_a_format_1_plan_is_served_end_to_end(tmp_path):
    plans = tmp_path / "plans"
    shutil.copytree(DATA / "format1" / "split", plans / "p")
    ep = f"tcp://127.0.0.1:{free_port()}"
    srv = start_server(ep, plans)
    try:
        with EdgeClient(EdgeConfig(plan_dir=plans / "p", server=ep, connect_grace_s=20)) as c:
            feeds = {"x": RNG.standard_normal((1, 4)).astype(np.float32)}
            r = c.infer(feeds, timeout=30)
            ref = make_session(DATA / "format1" / "model.onnx").run(None, feeds)
            assert not r.fallback
            # the plan's codec is int8: close to the unsplit model, not equal
            for g_, want in zip(r.outputs, ref, strict=True):
                np.testing.assert_allclose(g_, want, atol=0.05)
    finally:
        stop(srv)


def _chain_processes(plans: Path, next_timeout: float = 10.0):
    """The server (last stage) and a relay for stage 1, each its own process."""
    ep_server, ep_relay = (f"tcp://127.0.0.1:{free_port()}" for _ in range(2))
    server = start_server(ep_server, plans)
    relay = start_server(
        ep_relay, plans, "--stage", "1", "--next", ep_server, "--next-timeout", str(next_timeout)
    )
    # both up, and the relay's connection to the server made (it answers "not connected" at once until
    # then): a loaded machine starts them in seconds, not the moment the first request goes
    for ep in (ep_server, ep_relay):
        _pong(ep)
    time.sleep(0.5)  # the relay reconnects every 100 ms
    return server, relay, ep_relay


def _runs_as_unsplit(chain, plan_dir: Path, endpoint: str) -> None:
    """One request of ``plan_dir`` through the devices at ``endpoint`` answers as the unsplit model."""
    with EdgeClient(EdgeConfig(plan_dir=plan_dir, server=endpoint, connect_grace_s=20, fallback=False)) as c:
        feeds = x()
        r = c.infer(feeds, timeout=60)
        np.testing.assert_allclose(r.outputs[0], chain["full"].run(None, feeds)[0], atol=1e-5)


def _pong(endpoint: str, within_s: float = 60.0) -> dict:
    import zmq

    from splitpoint.core import wire

    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    try:
        wire.send(s, wire.Message(wire.PING, 1).to_frames())
        assert s.poll(int(within_s * 1000)), f"{endpoint} did not answer a ping within {within_s} s"
        msg = wire.parse(wire.recv(s))
        assert msg.type == wire.PONG
        return msg.meta
    finally:
        s.close(0)


def test_a_request_crosses_three_processes_and_says_what_each_stage_did(chain):
    server, relay, ep = _chain_processes(chain["plans"])
    try:
        for name, tol in (("c3", 1e-5), ("c3-int8", None)):
            cfg = EdgeConfig(plan_dir=chain["plans"] / name, server=ep, connect_grace_s=20, fallback=False)
            with EdgeClient(cfg) as c:
                for _ in range(3):
                    feeds = x()
                    r = c.infer(feeds, timeout=60)
                    ref = chain["full"].run(None, feeds)[0]
                    if tol:
                        np.testing.assert_allclose(r.outputs[0], ref, atol=tol)
                    else:  # int8 then float16 on the way: close
                        assert np.abs(r.outputs[0] - ref).max() < 0.1 * np.abs(ref).max()
                    stages = r.breakdown["stages"]
                    assert [s["stage"] for s in stages] == [1, 2], stages
                    assert stages[0]["next_ms"] >= stages[1]["total_ms"] > 0
                    assert stages[0]["bytes_sent"] > 0 and stages[0]["tail_ms"] > 0
                    # the top-level tail is every stage's after the edge (it was the first relay's only,
                    # and the last stage's model time showed nowhere), and the parts add up
                    b = r.breakdown
                    assert b["tail_ms"] == pytest.approx(sum(s["tail_ms"] for s in stages))
                    parts = sum(b[k] for k in ("network_ms", "server_queue_ms", "server_decode_ms"))
                    parts += b["tail_ms"] + b["server_encode_ms"]
                    assert b["network_ms"] >= 0 and parts <= b["total_ms"] + 1e-6
    finally:
        stop(relay)
        stop(server)
        print(output(relay))


def test_an_output_the_model_lists_twice_crosses_a_relay(tmp_path):
    """The last stage sends each tensor once; the relay wanted ``y`` twice, as the plan lists the model's
    outputs, and refused every request as a repeated output."""
    X = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    Y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    nodes = [helper.make_node(op, [a], [b]) for op, a, b in (("Relu", "x", "a"), ("Sigmoid", "a", "b"))]
    nodes.append(helper.make_node("Tanh", ["b"], ["y"]))
    m = helper.make_model(
        helper.make_graph(nodes, "twice", [X], [Y, Y]), opset_imports=[helper.make_opsetid("", 17)]
    )
    m.ir_version = 8
    onnx.save(m, tmp_path / "twice.onnx")
    h = open_model(tmp_path / "twice.onnx")
    cuts = {c.index: c for c in h.cuts()}
    write_plan(h, tmp_path / "plans" / "p", cuts=[cuts[1], cuts[2]], codecs=["float32", "float32"])
    server, relay, ep = _chain_processes(tmp_path / "plans")
    try:
        cfg = EdgeConfig(plan_dir=tmp_path / "plans" / "p", server=ep, connect_grace_s=20, fallback=False)
        with EdgeClient(cfg) as c:
            feeds = {"x": RNG.standard_normal((1, 4)).astype(np.float32)}
            r = c.infer(feeds, timeout=60)
        ref = make_session(tmp_path / "twice.onnx").run(None, feeds)
        assert r.names == ["y", "y"]
        for got, want in zip(r.outputs, ref, strict=True):
            np.testing.assert_allclose(got, want, atol=1e-6)
    finally:
        stop(relay)
        stop(server)


def test_a_relay_without_its_next_stage_answers_unavailable_at_once(chain):
    ep_relay, nowhere = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    relay = start_server(ep_relay, chain["plans"], "--stage", "1", "--next", nowhere, "--next-grace", "0")
    try:
        cfg = EdgeConfig(
            plan_dir=chain["plans"] / "c3", server=ep_relay, connect_grace_s=20, fallback=False, timeout_s=30
        )
        with EdgeClient(cfg) as c:
            t0 = time.monotonic()
            with pytest.raises(EdgeError, match="unavailable: stage 2 .* is not connected") as exc:
                c.infer(x(), timeout=30)
            assert exc.value.code == "unavailable" and time.monotonic() - t0 < 5
    finally:
        stop(relay)


def test_a_relay_refused_by_its_next_stage_is_served_once_its_key_is_allowed(chain, tmp_path):
    """libzmq never dials again after a refused handshake: a relay whose key the server's --curve-allow
    lacked stayed unconnected after the server restarted with it allowed."""
    import zmq

    from splitpoint.core.curve import keygen
    from splitpoint.server.config import ServerConfig
    from splitpoint.server.tail_server import TailServer

    server_key, server_pub = keygen(tmp_path / "server")
    relay_key, relay_pub = keygen(tmp_path / "relay")
    ep_server, ep_relay = (f"tcp://127.0.0.1:{free_port()}" for _ in range(2))

    def server(allow):
        secret = server_key.read_bytes().strip()
        cfg = ServerConfig(
            bind=ep_server, plans_dir=chain["plans"], curve_secret_key=secret, curve_allow=allow
        )
        return TailServer(cfg).start()

    srv = server([zmq.curve_keypair()[0]])
    relay = start_server(
        ep_relay, chain["plans"], "--stage", "1", "--next", ep_server, "--next-grace", "0",
        "--curve-secret", str(relay_key), "--next-server-key", str(server_pub),
    )  # fmt: skip
    try:
        cfg = EdgeConfig(
            plan_dir=chain["plans"] / "c3",
            server=ep_relay,
            fallback=False,
            timeout_s=30,
            connect_grace_s=60,  # the relay process up (its key makes it a CurveZMQ server too)
            curve_server_key=relay_pub.read_bytes().strip(),
        )
        with EdgeClient(cfg) as c:
            assert c.server_up
            time.sleep(0.5)  # the relay refused by its next stage by then
            with pytest.raises(EdgeError, match="not connected"):
                c.infer(x(), timeout=30)
            srv.stop()
            srv = server([relay_pub.read_bytes().strip()])
            deadline, answer = time.monotonic() + 20, None  # dialled again 2 s after the refusal, then 4 s
            while time.monotonic() < deadline and answer is None:
                with contextlib.suppress(EdgeError):
                    answer = c.infer(feeds := x(), timeout=30)
                time.sleep(0.2)
            assert answer is not None and not answer.fallback, output(relay)
            np.testing.assert_allclose(answer.outputs[0], chain["full"].run(None, feeds)[0], atol=1e-4)
    finally:
        stop(relay)
        srv.stop()


def test_status_says_a_relay_cannot_reach_its_next_stage_and_when_it_can_again(chain, mosquitto):
    """A relay whose next stage is down answers every request unavailable; `status` showed it "online"
    as a healthy one. Its status now carries whether the next stage is connected, and the views say it."""
    from splitpoint.app.console import device_state
    from splitpoint.app.orchestrator import FleetSubscriber

    ep_relay, ep_next = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    args = ("--stage", "1", "--next", ep_next, "--mqtt", mosquitto, "--device-id", "relay-next-down")
    relay = start_server(ep_relay, chain["plans"], *args)
    server = None

    def state_when(sub, done) -> str:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            kinds = sub.snapshot().get("relay-next-down")
            if kinds and done(kinds.get("status", {})):
                return device_state(kinds)
            time.sleep(0.1)
        raise AssertionError(f"no such status: {sub.snapshot().get('relay-next-down')}")

    try:
        with FleetSubscriber(mosquitto) as sub:
            down = state_when(sub, lambda st: st.get("next_up") is False)
            assert down == "online (next stage not connected: requests fail)", down
            server = start_server(ep_next, chain["plans"])
            up = state_when(sub, lambda st: st.get("next_up") is True)
            assert up == "online", up
    finally:
        stop(relay)
        if server is not None:
            stop(server)


def test_a_plan_missing_behind_a_relay_is_said_once_naming_the_stage_and_how_to_deploy_it(
    chain, tmp_path, caplog
):
    """The relay lists the plan in its pongs; the last stage behind it refused it. The warning named
    the relay ("the server at <relay> does not serve plan"), told to deploy it there, and came again
    after every pong."""
    import logging

    other = tmp_path / "plans"
    shutil.copytree(chain["plans"] / "c3-int8", other / "c3-int8")  # the server lacks c3
    ep_server, ep_relay = (f"tcp://127.0.0.1:{free_port()}" for _ in range(2))
    server = start_server(ep_server, other)
    relay = start_server(ep_relay, chain["plans"], "--stage", "1", "--next", ep_server)
    try:
        for ep in (ep_server, ep_relay):
            _pong(ep)
        time.sleep(0.5)
        cfg = EdgeConfig(
            plan_dir=chain["plans"] / "c3",
            server=ep_relay,
            connect_grace_s=20,
            fallback=False,
            heartbeat_s=0.1,
        )
        with caplog.at_level(logging.WARNING, logger="splitpoint.edge"), EdgeClient(cfg) as c:
            for _ in range(3):
                with pytest.raises(EdgeError) as exc:
                    c.infer(x(), timeout=30)
                assert exc.value.code == "unknown-plan" and "stage 2" in str(exc.value)
                time.sleep(0.3)  # pongs from the relay, which lists the plan, between the requests
        said = [r.getMessage() for r in caplog.records if "does not serve plan" in r.getMessage()]
        assert len(said) == 1, said
        assert said[0].startswith(f"stage 2, behind the relay at {ep_relay},")
        assert "--server ENDPOINT" in said[0]  # stage 2 is the last: a server, not a relay
    finally:
        stop(relay)
        stop(server)
    # the relay itself lacks the plan: a chain's plan goes to it with --relay 1=, which it takes (it was
    # told --server, which a relay refuses)
    caplog.clear()
    ep_relay = f"tcp://127.0.0.1:{free_port()}"
    relay = start_server(ep_relay, other, "--stage", "1", "--next", f"tcp://127.0.0.1:{free_port()}")
    try:
        _pong(ep_relay)
        cfg = EdgeConfig(plan_dir=chain["plans"] / "c3", server=ep_relay, connect_grace_s=20, fallback=False)
        with (
            caplog.at_level(logging.WARNING, logger="splitpoint.edge"),
            EdgeClient(cfg) as c,
            pytest.raises(EdgeError),
        ):
            c.infer(x(), timeout=30)
        said = [r.getMessage() for r in caplog.records if "does not serve plan" in r.getMessage()]
        assert said and f"the relay at {ep_relay}" in said[0] and f"--relay 1={ep_relay}" in said[0], said
    finally:
        stop(relay)


def test_an_edge_only_plan_never_says_a_server_lacks_it(tmp_path, small_resnet18, caplog):
    """A server never serves an edge-only plan: its pongs do not list it, and that is no news."""
    import logging

    from splitpoint.core.plan import EDGE_ONLY

    plans = tmp_path / "plans"
    h = open_model(small_resnet18)
    edge = write_plan(h, plans / "edge", kind=EDGE_ONLY)
    split = write_plan(h, plans / "split", cut=h.cuts()[12])
    ep = f"tcp://127.0.0.1:{free_port()}"
    server = start_server(ep, plans)
    try:
        # the server holds both and answers requests of the split only: its pongs say so (they listed
        # both, and a request of the edge-only plan got unknown-plan)
        assert _pong(ep)["plans"] == [split.plan_id] and edge.plan_id != split.plan_id
        cfg = EdgeConfig(plan_dir=plans / "edge", server=ep, heartbeat_s=0.1)
        with caplog.at_level(logging.WARNING, logger="splitpoint.edge"), EdgeClient(cfg) as c:
            time.sleep(0.5)  # a few pongs
            assert c.infer(x(), timeout=30).outputs[0].shape[0] == 1
            assert c.plan_served is None
        assert not [r for r in caplog.records if "does not serve plan" in r.getMessage()]
    finally:
        stop(server)


def test_a_relay_started_before_its_next_stage_holds_the_first_request_until_it_connects(chain):
    """Started together, a relay is not yet connected onwards when the first request comes: within its
    grace after start it holds the request for the connection rather than refusing, and meanwhile answers
    others (its socket thread waited, and a ping took the rest of the grace). The grace is for the first
    connection only: once the next stage has come and gone, a request fails at once."""
    ep_server, ep_relay = (f"tcp://127.0.0.1:{free_port()}" for _ in range(2))
    relay = start_server(ep_relay, chain["plans"], "--stage", "1", "--next", ep_server, "--next-grace", "60")
    server = None
    try:
        _pong(ep_relay)
        cfg = EdgeConfig(
            plan_dir=chain["plans"] / "c3", server=ep_relay, connect_grace_s=20, fallback=False, timeout_s=60
        )
        with EdgeClient(cfg) as c:
            feeds = x()
            pending = c.submit(feeds)
            time.sleep(0.5)
            t0 = time.monotonic()
            _pong(ep_relay, within_s=10)
            assert time.monotonic() - t0 < 2  # answered while the request waits
            assert not pending.done()
            server = start_server(ep_server, chain["plans"])  # the next stage comes up after the request
            r = pending.result(timeout=60)
            np.testing.assert_allclose(r.outputs[0], chain["full"].run(None, feeds)[0], atol=1e-5)
            stop(server)
            server = None
            time.sleep(0.5)
            t0 = time.monotonic()
            with pytest.raises(EdgeError, match="unavailable") as exc:
                c.infer(x(), timeout=60)
            assert exc.value.code == "unavailable" and time.monotonic() - t0 < 3  # not the 60 s grace
    finally:
        stop(relay)
        if server is not None:
            stop(server)


@pytest.mark.parametrize("fallback", [False, True])
def test_killing_the_middle_device_loses_no_request(chain, fallback):
    """Pipelined requests along the chain; the relay is killed halfway: every request is answered,
    by the chain or by the edge's own model (fallback), or fails explicitly. None hangs, none is lost."""
    server, relay, ep = _chain_processes(chain["plans"])
    try:
        cfg = EdgeConfig(
            plan_dir=chain["plans"] / "c3",
            server=ep,
            connect_grace_s=20,
            fallback=fallback,
            timeout_s=3.0,
            window=8,
        )
        with EdgeClient(cfg) as c:
            # the chain answers once before the run: a cold first request (sessions' first runs on a
            # loaded CI machine) can take longer than timeout_s, and the kill must come mid-run, not
            # before anything got through
            for _ in range(10):
                try:
                    c.infer(x(), timeout=60)
                    break
                except EdgeError:
                    continue
            futures = [c.submit(x()) for _ in range(20)]
            wait(futures[:5], timeout=60)
            relay.kill()
            relay.wait()
            futures += [c.submit(x()) for _ in range(20)]
            done, pending = wait(futures, timeout=90)
            assert not pending, f"{len(pending)} requests never answered"
            answered = failed = local = 0
            for f in futures:
                try:
                    r = f.result()
                    answered += 1
                    local += r.fallback
                except EdgeError as exc:
                    assert exc.code in ("timeout", "unreachable", "unavailable"), exc
                    failed += 1
            assert answered + failed == 40 and answered >= 5
            if fallback:
                assert failed == 0 and local > 0
            else:
                assert failed > 0
    finally:
        stop(server)


def test_deploy_gives_each_device_its_segment_only(chain, tmp_path):
    relay_plans, server_plans = tmp_path / "relay", tmp_path / "server"
    relay_plans.mkdir()
    server_plans.mkdir()
    ep_server, ep_relay = (f"tcp://127.0.0.1:{free_port()}" for _ in range(2))
    server = start_server(ep_server, server_plans)
    relay = start_server(ep_relay, relay_plans, "--stage", "1", "--next", ep_server)
    try:
        src = chain["plans"] / "c3"
        pid = deploy(src, ep_server, 30, "server")
        assert deploy(src, ep_relay, 30, "stage-1") == pid
        (sdir,) = server_plans.iterdir()
        (rdir,) = relay_plans.iterdir()
        assert sorted(p.name for p in sdir.iterdir()) == ["plan.json", "tail.onnx"]
        assert sorted(p.name for p in rdir.iterdir()) == ["plan.json", "stage1.onnx"]
        _runs_as_unsplit(chain, src, ep_relay)
    finally:
        stop(relay)
        stop(server)


def test_a_plan_pushed_for_another_stage_is_refused_saying_which_stage_the_device_runs(chain, tmp_path):
    """Pushed to the wrong device (a relay's endpoint as --server, stage 2 to the relay of stage 1), a
    plan was refused with "pushed plan is missing stage1.onnx" and no word of what to do."""
    (tmp_path / "server").mkdir()
    (tmp_path / "relay").mkdir()
    ep_server, ep_relay = (f"tcp://127.0.0.1:{free_port()}" for _ in range(2))
    server = start_server(ep_server, tmp_path / "server")
    relay = start_server(ep_relay, tmp_path / "relay", "--stage", "1", "--next", ep_server)
    try:
        src = chain["plans"] / "c3"
        for ep, role, want in (
            (ep_relay, "stage-2", "deploy PLAN_DIR --relay 1=ENDPOINT"),
            (ep_relay, "server", "deploy PLAN_DIR --relay 1=ENDPOINT"),
            (ep_server, "stage-1", "deploy PLAN_DIR --server ENDPOINT"),
        ):
            with pytest.raises(SplitPointError) as exc:
                deploy(src, ep, 30, role)
            assert "which this device runs: the plan was pushed to it for another stage" in str(exc.value)
            assert want in str(exc.value), (role, str(exc.value))
        assert not any((tmp_path / "server").iterdir()) and not any((tmp_path / "relay").iterdir())
    finally:
        stop(relay)
        stop(server)


def test_a_relay_started_with_plans_takes_a_deploy_from_the_command_line(chain, tmp_path):
    """`splitpoint relay` had no --plans: a relay started as the README shows (on one plan directory)
    refused every `deploy --relay`, and one on an empty directory would not start."""
    import os
    import subprocess

    from splitpoint.app.process import splitpoint_command

    relay_plans, server_plans = tmp_path / "relay", tmp_path / "server"
    server_plans.mkdir()
    ep_server, ep_relay = (f"tcp://127.0.0.1:{free_port()}" for _ in range(2))
    server = start_server(ep_server, server_plans)
    cmd = ["relay", "--plans", str(relay_plans), "--stage", "1", "--listen", ep_relay, "--next", ep_server]
    log = (tmp_path / "relay.log").open("w")
    relay = subprocess.Popen(
        splitpoint_command(*cmd, "--quiet"), stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ)
    )
    try:
        for ep in (ep_server, ep_relay):
            _pong(ep)
        src = chain["plans"] / "c3"
        r = run_cli("deploy", str(src), "--server", ep_server, "--relay", f"1={ep_relay}", timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        (rdir,) = relay_plans.iterdir()
        assert sorted(p.name for p in rdir.iterdir()) == ["plan.json", "stage1.onnx"]
        time.sleep(0.5)
        _runs_as_unsplit(chain, src, ep_relay)
    finally:
        stop(relay)
        stop(server)
        log.close()


def test_a_relay_on_nothing_says_how_to_start_it():
    r = run_cli("relay", "--stage", "1", "--next", "tcp://127.0.0.1:1")
    assert r.returncode != 0 and "--plans DIR" in r.stdout + r.stderr


def test_deploy_to_a_stage_the_plan_lacks_is_refused_before_any_device_is_tried(chain):
    r = run_cli("deploy", str(chain["plans"] / "c3"), "--relay", "3=tcp://127.0.0.1:1")
    said = r.stdout + r.stderr
    assert r.returncode != 0 and "this plan has stages 0 (the edge's) to 2 (the server's)" in said
    assert "not deployed" not in said


def test_split_writes_a_chain_from_the_command_line(small_resnet18, tmp_path):
    out = tmp_path / "p"
    args = ["--cut", "10", "--cut", "30", "--codec", "int8", "--codec", "float16"]
    proc = run_cli("split", str(small_resnet18), *args, "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    plan = Plan.load(out)
    assert [s.end for s in plan.stages] == [10, 30, None]
    assert [s.codec for s in plan.stages[:2]] == ["int8", "float16"]
    assert "hop 2: cut 30" in proc.stdout and "(3 stages)" in proc.stdout
    bad = run_cli("split", str(small_resnet18), "--cut", "30", "--cut", "10", "-o", str(tmp_path / "q"))
    assert bad.returncode == 2 and "increasing order" in bad.stderr


def test_plan_ids_follow_the_documented_recipe_and_an_edge_that_falls_back_needs_its_full_model(
    tmp_path, small_resnet18
):
    """protocol.md: plan_id is the SHA-256 of plan.json without plan_id, keys sorted, no whitespace. A
    third party computing it over the file as written (even one holding "decoder": null) is believed; an
    edge that falls back locally refuses a push without the full model its plan lists."""
    import hashlib
    import json

    from splitpoint.core.plan import FULL_FILE, PLAN_FILE, verify_pushed

    h = open_model(small_resnet18)
    d = tmp_path / "p"
    write_plan(h, d, cut=h.cuts()[10], include_full=True)
    raw = json.loads((d / PLAN_FILE).read_text())
    assert "decoder" not in raw

    def recipe(obj: dict) -> str:
        body = {k: v for k, v in obj.items() if k != "plan_id"}
        return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    assert recipe(raw) == raw["plan_id"]
    edited = {**raw, "decoder": None, "predicted": {"note": 1}}
    edited["plan_id"] = recipe(edited)
    assert Plan.parse(json.dumps(edited)).plan_id == edited["plan_id"]
    with pytest.raises(PlanError, match="does not match"):
        Plan.parse(json.dumps({**edited, "predicted": {"note": 2}}))
    for version in (2.0, True, "2"):  # strictly an integer, even where it compares equal to one
        with pytest.raises(PlanError, match="unsupported plan format_version"):
            Plan.parse(json.dumps({**raw, "format_version": version}))
    from splitpoint.core.planset import PlanSet

    for version in (1.0, True):  # a plan set's too
        with pytest.raises(PlanError, match="unsupported plan set format_version"):
            PlanSet.parse(json.dumps({"format_version": version}))
    with pytest.raises(PlanError, match="malformed plan set"):  # 1 itself is read on
        PlanSet.parse(json.dumps({"format_version": 1}))
    files = {n: (d / n).read_bytes() for n in (PLAN_FILE, "head.onnx")}
    assert verify_pushed(files, "edge", fallback=False).plan_id == raw["plan_id"]
    with pytest.raises(PlanError, match=f"missing {FULL_FILE}"):
        verify_pushed(files, "edge", fallback=True)


def _first_hop(plan) -> tuple[list[str], list[bytes]]:
    """What the edge sends the relay for one request of batch 1: zeros of each cut tensor's shape."""
    sends = plan.stages[0].sends
    shapes = [[int(d) if d.isdigit() else 1 for d in t.shape.split("x")] for t in sends]
    return [t.name for t in sends], [bytes(encode(np.zeros(s, np.float32), "float32")) for s in shapes]


def test_a_relay_whose_next_hop_is_backed_up_answers_busy_and_holds_a_bounded_queue(chain):
    """The next stage accepts the connection and reads nothing (as a hop far slower than the requests
    would): once TCP's buffers and the relay's bounded queue towards it are full, each request is answered
    busy at once, naming the backed-up link, never 'not connected' (the connection is up)."""
    import zmq

    from splitpoint.core import wire

    ctx = zmq.Context.instance()
    deaf = ctx.socket(zmq.ROUTER)
    deaf.setsockopt(zmq.RCVHWM, 1)
    deaf.setsockopt(zmq.RCVBUF, 4096)
    deaf.setsockopt(zmq.LINGER, 0)
    hop = f"ipc://{chain['d']}/deaf.sock"  # a local socket's buffers are small: they fill in a second
    deaf.bind(hop)
    ep_relay = f"tcp://127.0.0.1:{free_port()}"
    relay = start_server(
        ep_relay, chain["plans"], "--stage", "1", "--next", hop, "--next-grace", "30",
        "--next-timeout", "0.2",
    )  # fmt: skip
    client = ctx.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    try:
        _pong(ep_relay)
        plan = chain["plan"]
        names, frames = _first_hop(plan)
        client.connect(ep_relay)
        # paced below the relay's own queue (256 waiting): its forwards time out after 0.2 s and leave
        # it, while their bytes stay queued towards the deaf stage
        codes: dict[str, int] = {}
        texts = set()
        sent, end = 0, time.monotonic() + 90
        while not any("backed up" in t for t in texts) and sent < 20000 and time.monotonic() < end:
            for _ in range(50):
                sent += 1
                client.send_multipart(
                    wire.Message(wire.INFER, sent, plan.plan_id, names, frames=frames).to_frames()
                )
            while client.poll(100):
                m = wire.parse(client.recv_multipart())
                code = m.meta.get("code", m.type)
                codes[code] = codes.get(code, 0) + 1
                texts.add(m.meta.get("message", ""))
        assert codes.get("busy", 0) > 0, (codes, texts)
        assert any("the link to it is backed up (more than 64 requests queued)" in t for t in texts), texts
        assert not any("not connected" in t for t in texts), texts
    finally:
        client.close(0)
        stop(relay)
        deaf.close(0)


def test_a_relay_holds_at_most_64_requests_its_next_stage_has_not_answered(chain):
    """A next stage that reads every request and answers none (stalled): ZeroMQ's send limit counted only
    what TCP had not taken, and a relay held 256 small requests where protocol.md says 64. The 65th
    and later are busy at once, naming the wait."""
    import zmq

    from splitpoint.core import wire

    ctx = zmq.Context.instance()
    stalled = ctx.socket(zmq.ROUTER)
    stalled.setsockopt(zmq.LINGER, 0)
    hop = f"tcp://127.0.0.1:{free_port()}"
    stalled.bind(hop)
    ep_relay = f"tcp://127.0.0.1:{free_port()}"
    relay = start_server(ep_relay, chain["plans"], "--stage", "1", "--next", hop, "--next-timeout", "60")
    client = ctx.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    read = 0
    try:
        _pong(ep_relay)
        plan = chain["plan"]
        names, frames = _first_hop(plan)
        client.connect(ep_relay)
        for i in range(1, 201):
            client.send_multipart(wire.Message(wire.INFER, i, plan.plan_id, names, frames=frames).to_frames())
        busy, texts, end = 0, set(), time.monotonic() + 60
        while busy < 136 and time.monotonic() < end:
            while stalled.poll(0):  # read, never answer
                stalled.recv_multipart()
                read += 1
            if client.poll(50):
                m = wire.parse(client.recv_multipart())
                assert m.meta.get("code") == "busy", m.meta
                busy += 1
                texts.add(m.meta.get("message", ""))
        while stalled.poll(200):
            stalled.recv_multipart()
            read += 1
        assert busy == 136 and read == 64, (busy, read)
        assert any("64 requests wait for its answer" in t for t in texts), texts
    finally:
        client.close(0)
        stop(relay)
        stalled.close(0)


@contextlib.contextmanager
def _relay_before(chain, answer):
    """A relay for stage 1 of the chain's plan whose next stage is a fake: ``answer(msg)`` gives the
    (tensor names, frames, meta) it answers each request with. Yields the relay's endpoint."""
    import threading

    import zmq

    from splitpoint.core import wire

    fake = zmq.Context.instance().socket(zmq.ROUTER)
    port = fake.bind_to_random_port("tcp://127.0.0.1")
    done = threading.Event()

    def next_stage() -> None:
        while not done.is_set():
            if not fake.poll(100):
                continue
            ident, *body = fake.recv_multipart()
            msg = wire.parse(body)
            if msg.type == wire.PING:
                fake.send_multipart([ident, *wire.Message(wire.PONG, msg.id).to_frames()])
                continue
            names, frames, meta = answer(msg)
            reply = wire.Message(wire.RESULT, msg.id, msg.plan, names, meta=meta, frames=frames)
            fake.send_multipart([ident, *reply.to_frames()])

    t = threading.Thread(target=next_stage, daemon=True)
    t.start()
    ep_relay = f"tcp://127.0.0.1:{free_port()}"
    relay = start_server(ep_relay, chain["plans"], "--stage", "1", "--next", f"tcp://127.0.0.1:{port}")
    try:
        yield ep_relay
    finally:
        done.set()
        t.join(2)
        fake.close(0)
        stop(relay)


def test_a_relay_passes_on_its_next_stage_s_timings_as_numbers_only(chain):
    """A next stage's result whose header is legal but fills it (64 KB of padding in its timings, or its
    timings nested 16 deep): the relay's own reply, which wraps them, stays one its client accepts, with
    the figures that are numbers kept."""
    from splitpoint.core import wire

    want = [n for st in chain["plan"].stages[2:] for n in st.produces]
    nested: dict = {"total_ms": 2.0}
    for _ in range(wire.MAX_HEADER_DEPTH - 3):  # the header, its meta and 14 levels: legal
        nested = {"deeper": nested, "tail_ms": 1.5}
    metas = iter([{"stages": [{"pad": "a" * 65_200, "tail_ms": 3.0}]}, {"server": nested}])

    def answer(msg):
        frames, meta = [encode(np.zeros((1, 1000), np.float32), "float32")], next(metas)
        sent = wire.Message(wire.RESULT, msg.id, msg.plan, want[:1], meta=meta, frames=frames)
        wire.parse(sent.to_frames())  # legal as sent
        return want[:1], frames, meta

    with _relay_before(chain, answer) as ep_relay:
        cfg = EdgeConfig(plan_dir=chain["plans"] / "c3", server=ep_relay, connect_grace_s=20, fallback=False)
        with EdgeClient(cfg) as c:
            for kept in ({"tail_ms": 3.0}, {"tail_ms": 1.5}):
                r = c.infer(x(), timeout=30)
                assert r.breakdown["stages"][1] == kept, r.breakdown["stages"]


def test_a_relay_checks_its_next_stage_s_result_before_passing_it_on(chain):
    """A hostile or broken next stage answers with a wrong shape, a garbage payload, a missing output,
    an extra one, or a batch of 5 for a request of 1: the relay answers `unavailable` saying why, instead
    of forwarding what it got."""
    plan = chain["plan"]
    want = [n for st in plan.stages[2:] for n in st.produces]
    assert want, plan.stages
    good = np.zeros((1, 10), np.float32)
    answers = iter(
        [
            ([want[0]], [encode(np.zeros((5, 5, 5), np.float32), "float32")], "shape"),
            ([want[0]], [b"garbage"], want[0]),
            ([], [], "missing"),
            ([want[0], "evil"], [encode(good, "float32")] * 2, "not the plan's"),
            ([want[0]], [encode(np.zeros((5, 1000), np.float32), "float32")], "is 1 in tensor"),
        ]
    )
    assert plan.outputs[0].shape.startswith("N"), plan.outputs  # the batch is free: 5 fits the plan

    def answer(msg):
        names, frames, _ = next(answers)
        return names, frames, {}

    with _relay_before(chain, answer) as ep_relay:
        cfg = EdgeConfig(plan_dir=chain["plans"] / "c3", server=ep_relay, connect_grace_s=20, fallback=False)
        with EdgeClient(cfg) as c:
            for why in ("shape", want[0], "missing", "not the plan's", "is 1 in tensor"):
                with pytest.raises(EdgeError, match="does not fit the plan") as exc:
                    c.infer(x(), timeout=30)
                assert exc.value.code == "unavailable" and why in str(exc.value), str(exc.value)


def test_an_edge_only_plan_asked_for_its_full_model_holds_one_copy(small_resnet18, tmp_path):
    """`plan-chain` asks for the full model (the edge's fallback) whatever it picks: an edge-only pick wrote
    head.onnx and full.onnx, the same 46.8 MB twice. Its head is the whole model: one file."""
    from splitpoint.core.plan import FULL_FILE, HEAD_FILE

    h = open_model(small_resnet18)
    plan = write_plan(h, tmp_path / "e", cuts=[], include_full=True)
    assert plan.kind == "edge-only" and sorted(plan.files) == [HEAD_FILE]
    assert not (tmp_path / "e" / FULL_FILE).exists()
    split = write_plan(h, tmp_path / "s", cut=h.cuts()[10], include_full=True)
    assert FULL_FILE in split.files  # a split's fallback stays


def test_a_folder_of_plans_given_as_one_names_a_plan_and_never_a_temporary(tmp_path):
    """`edge run plans/` said only "no plan.json in plans"; it names one of the plans in it. A writer's
    temporary (a hidden folder holding a plan.json) is no plan to suggest."""
    (tmp_path / ".a.tmp-1@host-x").mkdir()
    (tmp_path / ".a.tmp-1@host-x" / "plan.json").write_text("{}")
    with pytest.raises(PlanError, match=r"no plan\.json in"):
        Plan.load(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "plan.json").write_text("{}")
    with pytest.raises(
        PlanError, match=f"is a folder of plans, not one plan: give one of them, e.g. {tmp_path / 'mine'}"
    ):
        Plan.load(tmp_path)


def test_a_server_started_and_never_stopped_leaves_no_log_behind():
    """A server that exits at start (here an unknown option), whose starter waits on it itself and never
    calls stop(): its log stayed in the temp dir (about 200 empty ones after a day of test runs)."""
    import subprocess
    import sys

    code = (
        "from pathlib import Path\n"
        "from splitpoint.app.process import _logs, start_server\n"
        "p = start_server('tcp://127.0.0.1:1', Path('nowhere'), '--no-such-option')\n"
        "p.wait(60)\n"
        "print(_logs[p.pid])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    log = Path(done.stdout.strip())
    assert done.returncode == 0 and log.name.startswith("splitpoint-serve-"), done.stderr
    assert not log.exists()


def test_a_newer_format_or_protocol_says_which_side_to_upgrade():
    """A fleet upgrades one machine at a time: "unsupported format_version 3" left the user to guess
    whether the writer or the reader was behind."""
    import json

    from splitpoint.core import wire
    from splitpoint.core.codecs import CodecError, decode, encode
    from splitpoint.core.planset import PlanSet

    with pytest.raises(PlanError, match="a newer SplitPoint wrote it; upgrade the SplitPoint that reads it"):
        Plan.parse(json.dumps({"format_version": 3}))
    with pytest.raises(PlanError, match="a newer SplitPoint wrote it"):
        PlanSet.parse(json.dumps({"format_version": 2}))
    with pytest.raises(PlanError) as old:  # not newer: no advice to upgrade
        Plan.parse(json.dumps({"format_version": 0}))
    assert "upgrade" not in str(old.value)
    payload = bytearray(encode(np.zeros(4, np.float32), "float32"))
    payload[4] = 9  # the payload's version byte, after its 4-byte magic
    with pytest.raises(CodecError, match="version 9 .*a newer SplitPoint wrote it"):
        decode(bytes(payload))
    header = json.dumps({"v": 2, "type": "ping", "id": 1}).encode()
    with pytest.raises(wire.WireError, match="the peer runs a newer SplitPoint"):
        wire.parse([header])
