"""A decoder split over a real server: the float32 split generates exactly the unsplit model's tokens, the
server keeps one KV-cache session per sequence within its limits, and every bad step is one clear error."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zmq

from splitpoint.app.broker import free_port
from splitpoint.app.process import start_server, stop
from splitpoint.core import wire
from splitpoint.core.codecs import encode
from splitpoint.core.decoders import ZooDecoder
from splitpoint.core.graph.model import open_model
from splitpoint.core.plan import Plan
from splitpoint.core.plandir import write_decoder_plan, write_plan
from splitpoint.core.runner import HeadRunner, make_session
from splitpoint.core.zoo.decoder import DECODER_TINY, hidden_name
from splitpoint.edge.decoder import DecoderClient, GenerationError, generate_local
from splitpoint.server.config import ServerConfig
from splitpoint.server.tail_server import TailServer

SPEC = DECODER_TINY


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    d = tmp_path_factory.mktemp("decoder-plans")
    for codec in ("float32", "int8-ol"):
        write_decoder_plan(
            ZooDecoder("decoder-tiny"), d / codec, edge_layers=2, codec=codec, include_full=True
        )
    return d


def _generate(plan_dir, endpoint: str) -> list[str]:
    """`splitpoint generate PLAN --server ENDPOINT` as a subprocess's command."""
    return [sys.executable, "-m", "splitpoint.app", "generate", str(plan_dir), "--server", endpoint]


def _prompt(n=16, seed=0):
    return np.random.default_rng(seed).integers(0, SPEC.vocab, (1, n))


def test_a_float32_split_generates_the_unsplit_models_256_tokens(plans):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = start_server(endpoint, plans)
    try:
        unsplit = generate_local(plans / "float32", _prompt(), 256)  # full.onnx: the whole model
        with DecoderClient(plans / "float32", endpoint, timeout_s=30) as client:
            split = client.generate(_prompt(), 256)
        assert split.tokens == unsplit.tokens
        assert len(set(split.tokens)) > 50  # a real sequence, not one token repeated
        assert split.bytes_sent[0] > split.bytes_sent[1]  # the prefill carries the whole prompt
        assert split.ttft_ms > 0 and split.tpot_ms is not None and split.tpot_ms > 0
        with DecoderClient(plans / "int8-ol", endpoint, timeout_s=30) as client:
            compressed = client.generate(_prompt(), 64)
        assert compressed.bytes_sent[1] < split.bytes_sent[1] / 2
        assert sum(a == b for a, b in zip(compressed.tokens, unsplit.tokens[:64], strict=True)) >= 60
    finally:
        stop(proc)


def test_generate_prints_one_json_object_split_and_local(plans):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = start_server(endpoint, plans)
    try:
        outs = []
        for extra in ([], ["--local"]):
            cmd = [
                *_generate(plans / "float32", endpoint),
                "--prompt-tokens",
                "8",
                "--max-new-tokens",
                "12",
                *extra,
            ]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr
            outs.append(json.loads(r.stdout))
        split, local = outs
        assert split["tokens"] == local["tokens"] and len(split["tokens"]) == 12
        assert split["mode"] == "split" and local["mode"] == "local"
        assert (
            split["ttft_ms"] > 0
            and split["tpot_ms"] > 0
            and split["bytes_per_token"] == 4 * SPEC.d_model + 55
        )
        # where a token's time went, measured: the parts add up to the whole on the edge's clock
        parts = split["breakdown"]
        assert split["labels"]["breakdown"].startswith("measured") and "breakdown" not in local
        assert parts["edge_prefill_ms"] > 0 and parts["server_prefill_ms"] > 0
        assert parts["link_and_runtime_prefill_ms"] > 0
        # the server's own time (its clock, from its reply) fits inside the round trip on the edge's
        assert parts["edge_prefill_ms"] + parts["server_prefill_ms"] < split["ttft_ms"]
        assert all(parts[f"{p}_step_ms"] > 0 for p in ("edge", "server", "link_and_runtime"))
        assert parts["edge_step_ms"] + parts["server_step_ms"] < split["tpot_ms"] * 1.5  # medians apart
    finally:
        stop(proc)


def test_generate_runs_on_a_server_that_admits_listed_keys_only(plans, tmp_path):
    """generate had no key options and made a fresh key each run: no allow-list could admit it, so a
    decoder on a server reachable from the network needed --insecure (anyone may deploy)."""
    from splitpoint.core.curve import keygen

    server_key, server_pub = keygen(tmp_path / "server")
    edge_key, edge_pub = keygen(tmp_path / "pi.kitchen")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    args = ("--curve-secret", str(server_key), "--curve-allow", str(edge_pub))
    proc = start_server(endpoint, plans, *args)
    try:
        cmd = [*_generate(plans / "float32", endpoint), "--prompt-tokens", "8", "--max-new-tokens", "6"]
        cmd += ["--timeout", "5"]
        r = subprocess.run(
            [*cmd, "--curve-server-key", str(server_pub), "--curve-secret", str(edge_key)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
        local = generate_local(plans / "float32", _prompt(8), 6)
        assert json.loads(r.stdout)["tokens"] == local.tokens
        unlisted = subprocess.run(  # a key of its own, not on the list: not served
            [*cmd, "--curve-server-key", str(server_pub)], capture_output=True, text=True, timeout=120
        )
        assert unlisted.returncode != 0 and "Traceback" not in unlisted.stderr, unlisted.stderr
        assert "refused the connection's handshake" in unlisted.stderr, unlisted.stderr  # not a bare timeout
    finally:
        stop(proc)


def test_a_refusal_before_the_first_step_is_an_error_not_a_hang(plans, tmp_path, monkeypatch):
    """libzmq closes a refused connection for good: a request sent after the refusal had nothing to
    queue on, and a blocking send waited for ever (generate hung on a loaded machine, where the head's
    first run took longer than the handshake)."""
    import zmq

    server_pub, server_sec = zmq.curve_keypair()
    listed_pub, _ = zmq.curve_keypair()
    srv = TailServer(
        ServerConfig.of(
            bind="tcp://127.0.0.1:0", plans_dir=plans, curve_secret_key=server_sec, curve_allow=[listed_pub]
        )
    ).start()
    warm_up = DecoderClient.warm_up

    def late(self):  # the refusal comes first
        deadline = time.monotonic() + 10
        while not self._monitor.poll(0) and time.monotonic() < deadline:
            time.sleep(0.01)
        # libzmq closes the connection's queue just after it reports the refusal: a DEALER can send
        # without blocking (POLLOUT) while it has one
        while self._sock.getsockopt(zmq.EVENTS) & zmq.POLLOUT and time.monotonic() < deadline:
            time.sleep(0.01)
        closed.append(not self._sock.getsockopt(zmq.EVENTS) & zmq.POLLOUT)
        sent.append(time.monotonic())
        warm_up(self)

    sent: list[float] = []
    closed: list[bool] = []
    monkeypatch.setattr(DecoderClient, "warm_up", late)
    try:
        done: list[tuple[BaseException, float]] = []

        def connect():
            try:
                DecoderClient(plans / "float32", str(srv.endpoint), timeout_s=30, curve_server_key=server_pub)
            except BaseException as exc:
                done.append((exc, time.monotonic()))

        t = threading.Thread(target=connect, daemon=True)
        t.start()
        t.join(60)
        assert done, "the client hung on its first request"
        if not closed[0]:
            pytest.skip("this libzmq kept the refused connection's queue within 10 s: no send could block")
        exc, when = done[0]
        assert isinstance(exc, GenerationError), exc
        assert "refused the connection's handshake" in str(exc)
        assert when - sent[0] < 15, "said at the request's timeout, not when it could not be sent"
    finally:
        srv.stop()


def test_a_stopping_server_starts_no_session_and_lets_one_under_way_go_on(plans):
    """A draining server refused new one-shot requests but took the first step of a new generation, and
    cut it off at the drain's end."""
    srv = TailServer(ServerConfig.of(bind="tcp://127.0.0.1:0", plans_dir=plans)).start()
    try:
        with DecoderClient(plans / "float32", str(srv.endpoint), timeout_s=30) as going:
            session, pos = 1, 0
            hidden = going.head(_prompt(4))
            token, _, _ = going.step(session, pos, hidden)
            srv._draining = True  # as stop() sets it while it answers what it holds
            # the generation under way takes its next step
            token2, _, _ = going.step(session, pos + 4, going.head(np.array([[token]])))
            assert isinstance(token2, int)
            with pytest.raises(GenerationError, match="starts no new session") as exc:
                going.step(2, 0, going.head.__class__(plans / "float32" / "head.onnx")(_prompt(4)))
            assert exc.value.code == "unavailable"
    finally:
        srv._draining = False
        srv.stop()


@pytest.fixture
def server(plans, request):
    cfg = {"bind": "tcp://127.0.0.1:0", "plans_dir": plans, **getattr(request, "param", {})}
    srv = TailServer(ServerConfig.of(**cfg)).start()
    yield srv
    srv.stop()


def _client(plans, srv, codec="float32"):
    return DecoderClient(plans / codec, srv.endpoint, timeout_s=10)


@pytest.mark.parametrize("server", [{"max_sessions": 1}], indirect=True)
def test_a_session_past_the_limit_is_refused_explicitly(plans, server):
    with _client(plans, server) as a, _client(plans, server) as b:
        head = a.head(_prompt())
        a.step(1, 0, head)  # a holds the only session
        with pytest.raises(GenerationError, match="1 decoder sessions are open") as e:
            b.step(2, 0, head)
        assert e.value.code == wire.E_SESSION_LIMIT
        a.end(1)
        b.step(2, 0, head)  # freed: now there is room
        assert len(server.sessions) == 1


@pytest.mark.parametrize("server", [{"max_cache_mb": 0.025}], indirect=True)
def test_the_cache_memory_limit_refuses_a_step_and_keeps_the_session(plans, server):
    with _client(plans, server) as c:
        c.head.reset()
        x = c.head(_prompt(8))
        c.step(7, 0, x)  # 8 tokens: 2 layers x (key, value) x 4 heads x 8 x 32 x 4 bytes = 16 KiB
        # 16 tokens: 32 KiB, more than the limit for all sessions (25.6 KiB): no retry can help, said so
        with pytest.raises(
            GenerationError, match=r"alone would hold 32,768 bytes, more than .* \(26,214"
        ) as e:
            c.step(7, 8, c.head(_prompt(8, 1)))
        assert e.value.code == wire.E_SESSION_LIMIT
        assert server.sessions.cache_bytes == 16 * 1024  # as it was
        c.step(7, 8, x[:, :1])  # the session still continues from 8 tokens
        # starting it over with 16 tokens is refused too, and the 9-token session is still there
        with pytest.raises(GenerationError, match=r"alone would hold 32,768 bytes") as e:
            c.step(7, 0, np.concatenate([x, x], axis=1))
        assert e.value.code == wire.E_SESSION_LIMIT
        assert server.sessions.cache_bytes == 18 * 1024
        c.step(7, 9, x[:, :1])
        # a second session that fits alone but not beside the first: another may free room
        with pytest.raises(
            GenerationError, match=r"would hold 36,864 bytes \(the limit is 26,214\): close"
        ) as e:
            c.step(8, 0, x)
        assert e.value.code == wire.E_SESSION_LIMIT


@pytest.mark.parametrize("server", [{"session_idle_s": 0.3}], indirect=True)
def test_an_idle_session_is_freed_and_then_unknown(plans, server):
    with _client(plans, server) as c:
        c.step(5, 0, c.head(_prompt()))
        assert len(server.sessions) == 1
        deadline = time.monotonic() + 5
        while len(server.sessions) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(server.sessions) == 0 and server.sessions.expired == 1
        with pytest.raises(GenerationError, match="never opened, closed, or idle longer than 0.3 s") as e:
            c.step(5, 16, c.head(_prompt(1)))
        assert e.value.code == wire.E_UNKNOWN_SESSION


@pytest.mark.parametrize("ending", ["expired", "ended"])
@pytest.mark.parametrize("server", [{"session_idle_s": 3.0, "max_sessions": 10_000}], indirect=True)
def test_the_memory_of_finished_sessions_goes_back_to_the_system(plans, server, ending):
    """onnxruntime's arena kept the caches' memory at its peak after their sessions expired: 500 sessions
    took a server from 126 to 531 MiB, and it stayed there. Out of the arena, and the heap trimmed once
    enough was freed, most of it goes back, whether the sessions expired or their client ended them (the
    trim ran only while sessions were left to sweep)."""
    import psutil

    from splitpoint.core.machine import trim_heap

    if not trim_heap():
        pytest.skip("no glibc: no malloc_trim to give the memory back")
    me = psutil.Process()
    with _client(plans, server) as c:
        x = c.head(_prompt(SPEC.n_ctx // 2))
        before = me.memory_info().rss
        for k in range(250):
            c.step(k, 0, x)
        held, peak = server.sessions.cache_bytes, me.memory_info().rss
        assert held >= 64 << 20 and peak - before >= held // 2
        if ending == "ended":
            for k in range(250):
                c.end(k)
        deadline = time.monotonic() + 10
        while len(server.sessions) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(server.sessions) == 0
        time.sleep(1.5)  # the next sweep trims
        assert peak - me.memory_info().rss >= held // 2, (
            before >> 20,
            peak >> 20,
            me.memory_info().rss >> 20,
        )


def test_a_step_out_of_order_is_refused_and_changes_nothing(plans, server):
    with _client(plans, server) as c:
        c.step(9, 0, c.head(_prompt()))
        with pytest.raises(GenerationError, match="position 3, but session 9 holds 16 tokens") as e:
            c.step(9, 3, c.head(_prompt(1)))
        assert e.value.code == wire.E_BAD_POSITION
        with pytest.raises(GenerationError, match="passes the model's 512 positions"):
            c.step(9, 16, np.zeros((1, 500, SPEC.d_model), np.float32))
        c.step(9, 16, c.head(_prompt(1)))


def _dealer(endpoint: str) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    return s


def _ask(sock, frames) -> wire.Message:
    wire.send(sock, frames)
    assert sock.poll(10_000)
    return wire.parse(wire.recv(sock))


def test_hostile_steps_get_one_clear_error_each(plans, server):
    plan = Plan.load(plans / "float32")
    s = _dealer(server.endpoint)
    good = encode(np.zeros((1, 2, SPEC.d_model), np.float32), "float32")
    nan = np.zeros((1, 2, SPEC.d_model), np.float32)
    nan[0, 1, 3] = np.nan
    huge = np.full((1, 2, SPEC.d_model), 3e38, np.float32)
    huge[..., -1] *= -1  # their sum overflows to inf, less the last: inf - inf in the layers' norm
    name = hidden_name(1)

    def step(meta, tensors=(name,), frames=(good,), plan_id=plan.plan_id, type_=wire.STEP):
        return _ask(
            s, wire.Message(type_, 3, plan_id, list(tensors), meta=meta, frames=list(frames)).to_frames()
        )

    cases = [
        (step({"session": "x"}), wire.E_BAD_MESSAGE, "meta.session"),
        (step({"session": 1, "position": -1}), wire.E_BAD_MESSAGE, "meta.position"),
        (step({"session": 1, "top_k": 1000}), wire.E_BAD_MESSAGE, "meta.top_k"),
        (step({"session": 1}, tensors=("nope",)), wire.E_BAD_TENSOR, "plan expects tensors"),
        (
            step({"session": 1}, frames=(encode(np.zeros((1, 2, 7), np.float32), "float32"),)),
            wire.E_BAD_TENSOR,
            "plan expects shape",
        ),
        (step({"session": 1}, frames=(b"garbage",)), wire.E_BAD_TENSOR, "payload"),
        # NaN hidden states are refused before they reach the cache; finite ones too large for the model
        # give scores whose argmax (token 0) would be sent as if chosen: neither step is kept
        (step({"session": 1}, frames=(encode(nan, "float32"),)), wire.E_BAD_TENSOR, "NaN or infinity"),
        (step({"session": 1}, frames=(encode(huge, "float32"),)), wire.E_INTERNAL, "are not finite"),
        (step({"session": 1}, plan_id="0" * 64), wire.E_UNKNOWN_PLAN, "unknown plan"),
        (step({"session": 1, "position": 4}), wire.E_UNKNOWN_SESSION, "no session 1"),
        # a session the server does not hold is unknown whatever the position: past the model's 512 it
        # read session-limit, which tells a client to shorten its sequence, not to start again
        (step({"session": 1, "position": 600}), wire.E_UNKNOWN_SESSION, "no session 1"),
        (step({"session": 1, "position": 511}), wire.E_UNKNOWN_SESSION, "no session 1"),
        (step({"session": 1}, tensors=(), frames=(), type_=wire.CLOSE), None, None),
    ]
    for reply, code, words in cases:
        if code is None:
            assert reply.type == wire.CLOSED and reply.meta == {"session": 1, "held": False}
            continue
        assert reply.type == wire.ERROR and reply.meta["code"] == code, reply.meta
        assert words in reply.meta["message"]
    infer = _ask(s, wire.Message(wire.INFER, 4, plan.plan_id, [name], frames=[good]).to_frames())
    assert infer.meta["code"] == wire.E_BAD_MESSAGE and "is a decoder" in infer.meta["message"]
    nulls = step({"session": 1, "position": None, "top_k": None})  # null: the optional field's absence
    assert nulls.type == wire.RESULT and nulls.tensors == ["next_token"], nulls.meta
    ok = step({"session": 1, "top_k": 5})
    assert ok.type == wire.RESULT and ok.tensors == ["next_token", "top_k_ids", "top_k_logits"]
    assert ok.meta["position"] == 2 and len(server.sessions) == 1
    s.close(0)


def _named_dealer(server, identity: bytes) -> zmq.Socket:
    """A client that names its own routing identity (ZMQ_IDENTITY)."""
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.IDENTITY, identity)
    s.connect(server.endpoint)
    return s


def _step3(plans, s, session: int, position: int) -> wire.Message:
    """A step of three tokens' hidden states (zeros) at ``position``."""
    plan = Plan.load(plans / "float32")
    good = encode(np.zeros((1, 3, SPEC.d_model), np.float32), "float32")
    meta = {"session": session, "position": position}
    msg = wire.Message(wire.STEP, 1, plan.plan_id, [hidden_name(1)], meta=meta, frames=[good])
    return _ask(s, msg.to_frames())


def test_a_connections_sessions_go_with_it_and_its_identity_cannot_take_them_over(plans, server):
    """A client that names its own routing identity and disconnects: a new connection under that name finds
    nothing of its sessions, and the slots they held are free at once, not after --session-idle."""
    a = _named_dealer(server, b"victim-client")
    assert _step3(plans, a, 4242, 0).type == wire.RESULT and len(server.sessions) == 1
    a.close(0)
    deadline = time.monotonic() + 5
    while len(server.sessions) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(server.sessions) == 0 and server.sessions.dropped == 1 and server.sessions.expired == 0
    b = _named_dealer(server, b"victim-client")
    reply = _step3(plans, b, 4242, 3)
    assert reply.type == wire.ERROR and reply.meta["code"] == wire.E_UNKNOWN_SESSION
    assert _step3(plans, b, 4242, 0).type == wire.RESULT  # its own, from the start
    b.close(0)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, small_resnet18):
    """A plans folder with a decoder plan and a CNN's, and an infer request of the CNN's (a batch of 128,
    which keeps a server's thread busy some milliseconds)."""
    plans = tmp_path_factory.mktemp("mixed") / "plans"
    write_decoder_plan(ZooDecoder("decoder-tiny"), plans / "dec", edge_layers=2, codec="float32")
    h = open_model(small_resnet18)
    write_plan(h, plans / "cnn", cut=next(c for c in h.cuts()[10:] if len(c.crossing) == 1))
    cnn = Plan.load(plans / "cnn")
    sent, _ = HeadRunner(cnn, make_session(plans / "cnn" / "head.onnx")).run(
        {"input": np.zeros((128, 3, 64, 64), np.float32)}
    )
    name = cnn.cut_tensors[0].name
    infer = [wire.Message(wire.INFER, 0, cnn.plan_id, [name]).header(), encode(sent[name], "float32")]
    return plans, Plan.load(plans / "dec"), infer


def test_a_step_read_after_its_connection_closed_leaves_no_session(mixed):
    """Clients that send a step and close at once while the server is busy with another client's requests:
    it hears of each close before it reads the step, which libzmq still hands over. The session that step
    opens is freed as its answer finds nobody, not held until --session-idle: 64 such clients locked
    every later user out for 5 minutes."""
    plans, dec, infer = mixed
    step = encode(np.zeros((1, 3, SPEC.d_model), np.float32), "float32")
    limit = 32
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = start_server(endpoint, plans, "--max-sessions", str(limit))
    ctx = zmq.Context.instance()
    fresh, busy = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    for s in (fresh, busy):
        s.setsockopt(zmq.LINGER, 0)
        s.connect(endpoint)
    stop_busy = threading.Event()

    def keep_busy() -> None:  # its requests run on the server's socket thread (one worker)
        owed = 0
        while not stop_busy.is_set():
            while owed < 4:
                busy.send_multipart(infer)
                owed += 1
            if busy.poll(1000):
                busy.recv_multipart()
                owed -= 1
        while owed and busy.poll(5000):
            busy.recv_multipart()
            owed -= 1

    loader = threading.Thread(target=keep_busy)
    try:
        assert _ask(fresh, wire.Message(wire.PING, 1).to_frames()).type == wire.PONG
        clients = []  # all open at once: none takes over another's file descriptor
        for _ in range(limit):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 2000)  # the step leaves before the socket closes
            s.connect(endpoint)
            clients.append(s)
        time.sleep(0.5)
        loader.start()
        time.sleep(0.3)
        for k, s in enumerate(clients):
            meta = {"session": k, "position": 0}
            msg = wire.Message(wire.STEP, 1, dec.plan_id, [hidden_name(1)], meta=meta, frames=[step])
            s.send_multipart(msg.to_frames())
            s.close()  # never reads its answer
        time.sleep(1.0)
        stop_busy.set()
        loader.join()
        refused = []
        for k in range(limit):  # a client that came later has every place
            meta = {"session": k, "position": 0}
            msg = wire.Message(wire.STEP, 1, dec.plan_id, [hidden_name(1)], meta=meta, frames=[step])
            reply = _ask(fresh, msg.to_frames())
            if reply.type != wire.RESULT:
                refused.append(reply.meta.get("message"))
        assert not refused, f"{len(refused)} of {limit} sessions refused: {refused[0]}"
    finally:
        stop_busy.set()
        if loader.is_alive():
            loader.join()
        fresh.close(0)
        busy.close(0)
        stop(proc)


def test_an_answer_a_worker_finished_is_not_held_behind_queued_decoder_steps(mixed):
    """Steps run on the server's socket thread, in order; requests run on its workers. A request's answer
    goes out between steps, not after every step queued when it came: 300 queued prefills held a finished
    answer 4 s (its own total_ms said 0.6), and its client took the 4 s for the network's."""
    plans, dec, infer = mixed
    long = encode(np.zeros((1, SPEC.n_ctx - 1, SPEC.d_model), np.float32), "float32")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = start_server(endpoint, plans, workers=2)
    ctx = zmq.Context.instance()
    a, b = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    for s in (a, b):
        s.setsockopt(zmq.LINGER, 0)
        s.connect(endpoint)
    steps = 40
    try:
        assert _ask(b, wire.Message(wire.PING, 1).to_frames()).type == wire.PONG
        for i in range(steps):  # each starts session 1 again: a whole prefill every time
            meta = {"session": 1, "position": 0}
            msg = wire.Message(wire.STEP, i, dec.plan_id, [hidden_name(1)], meta=meta, frames=[long])
            a.send_multipart(msg.to_frames())
        time.sleep(0.05)
        b.send_multipart(infer)
        poller = zmq.Poller()
        poller.register(a, zmq.POLLIN)
        poller.register(b, zmq.POLLIN)
        stepped, answered_after = 0, None
        while stepped < steps or answered_after is None:
            events = dict(poller.poll(30_000))
            assert events, (
                f"{stepped} of {steps} steps answered, the request {'not ' * (answered_after is None)}"
            )
            if a in events:
                assert wire.parse(a.recv_multipart()).type == wire.RESULT
                stepped += 1
            if b in events:
                assert wire.parse(b.recv_multipart()).type == wire.RESULT
                answered_after = stepped
        # between steps it came after 1 to 5 of them; held, after all 40
        assert answered_after < steps // 2, (
            f"the request's answer came after {answered_after} of {steps} steps"
        )
    finally:
        a.close(0)
        b.close(0)
        stop(proc)


def test_a_second_connection_under_a_live_clients_identity_reaches_none_of_its_sessions(plans, server):
    """Routing ids are not handed over (ROUTER_HANDOVER leaked sockets, libzmq issue 3238): a newcomer
    under a live client's identity is not read, so it cannot step (read) that client's sequence, and the
    client's session goes on. Once the client has closed, the identity finds none of its sessions."""
    victim = _named_dealer(server, b"app-client-1")
    assert _step3(plans, victim, 7, 0).type == wire.RESULT
    thief = _named_dealer(server, b"app-client-1")
    plan = Plan.load(plans / "float32")
    three = encode(np.zeros((1, 3, SPEC.d_model), np.float32), "float32")
    meta = {"session": 7, "position": 3}
    thief.send_multipart(
        wire.Message(wire.STEP, 1, plan.plan_id, [hidden_name(1)], meta=meta, frames=[three]).to_frames()
    )
    assert not thief.poll(300)  # not read: no reply at all, and the session is untouched
    assert _step3(plans, victim, 7, 3).type == wire.RESULT and len(server.sessions) == 1
    thief.close(0)
    victim.close(0)  # frees its session
    deadline = time.monotonic() + 5
    while len(server.sessions) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(server.sessions) == 0
    later = _named_dealer(server, b"app-client-1")
    reply = _step3(plans, later, 7, 6)
    assert reply.type == wire.ERROR and reply.meta["code"] == wire.E_UNKNOWN_SESSION, reply.meta
    later.close(0)


def test_a_small_compressed_step_claiming_more_tokens_than_the_model_has_is_refused_undecompressed(
    plans, server
):
    """52 KB of zstd that decompresses to 266 MB (within the message cap) cost the socket thread 0.8 s
    and half a GB before the step's length was checked; its header's claim is checked first now."""
    import resource

    plan = Plan.load(plans / "float32")
    s = _dealer(server.endpoint)
    bomb = encode(np.zeros((1, 100_000, SPEC.d_model), np.float32), "float32+zstd")
    assert len(bomb) < 2_000_000
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    meta = {"session": 5, "position": 0}
    msg = wire.Message(wire.STEP, 9, plan.plan_id, [hidden_name(1)], meta=meta, frames=[bomb])
    reply = _ask(s, msg.to_frames())
    assert reply.type == wire.ERROR and reply.meta["code"] == wire.E_SESSION_LIMIT, reply.meta
    assert f"at most {SPEC.n_ctx} token(s)" in reply.meta["message"]
    assert time.perf_counter() - t0 < 0.5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 100_000  # KiB: nothing decoded
    full = encode(np.zeros((1, SPEC.n_ctx, SPEC.d_model), np.float32), "float32")
    meta = {"session": 6, "position": 0}
    fill = wire.Message(wire.STEP, 10, plan.plan_id, [hidden_name(1)], meta=meta, frames=[full])
    assert _ask(s, fill.to_frames()).type == wire.RESULT  # a session holding every position
    one = encode(np.zeros((1, 1, SPEC.d_model), np.float32), "float32")
    meta = {"session": 6, "position": SPEC.n_ctx}
    late = wire.Message(wire.STEP, 11, plan.plan_id, [hidden_name(1)], meta=meta, frames=[one])
    reply = _ask(s, late.to_frames())
    assert reply.meta["code"] == wire.E_SESSION_LIMIT and "past the model's" in reply.meta["message"]
    s.close(0)


@pytest.mark.parametrize("server", [{"max_message_bytes": 100_000}], indirect=True)
def test_a_step_is_held_to_the_servers_decoded_size_limit_too(plans, server):
    """--max-message-mb caps every tensor decoded; a step was held only to the positions the model has
    left (512 x 128 floats here), so a 115-byte zstd step decoding to 256 KiB passed a 100 KB limit."""
    plan = Plan.load(plans / "float32")
    s = _dealer(server.endpoint)
    big = encode(np.zeros((1, 500, SPEC.d_model), np.float32), "float32+zstd")
    assert len(big) < 1000
    meta = {"session": 1, "position": 0}
    reply = _ask(
        s, wire.Message(wire.STEP, 1, plan.plan_id, [hidden_name(1)], meta=meta, frames=[big]).to_frames()
    )
    assert reply.type == wire.ERROR and reply.meta["code"] == wire.E_TOO_LARGE, reply.meta
    assert "above the 100000-byte cap" in reply.meta["message"]
    small = encode(np.zeros((1, 4, SPEC.d_model), np.float32), "float32")
    ok = wire.Message(wire.STEP, 2, plan.plan_id, [hidden_name(1)], meta=meta, frames=[small])
    assert _ask(s, ok.to_frames()).type == wire.RESULT  # the session was not spoiled by the refusal
    s.close(0)


def test_int4_edge_weights_shrink_the_head_and_keep_the_tokens(plans, server, tmp_path):
    import onnx

    p = write_decoder_plan(ZooDecoder("decoder-tiny"), tmp_path / "q4", edge_layers=2, head_weights="int4")
    assert p.stages[0].weights == "int4"
    head = onnx.load(tmp_path / "q4" / "head.onnx")
    assert {n.op_type for n in head.graph.node} >= {"MatMulNBits"}
    assert (tmp_path / "q4" / "head.onnx").stat().st_size < (plans / "float32" / "head.onnx").stat().st_size
    server.registry.add_dir(tmp_path / "q4")
    unsplit = generate_local(plans / "float32", _prompt(), 32)
    with DecoderClient(tmp_path / "q4", server.endpoint) as c:
        got = c.generate(_prompt(), 32)
    assert sum(a == b for a, b in zip(got.tokens, unsplit.tokens, strict=True)) >= 28


@pytest.mark.parametrize(
    "args,words",
    [
        (
            ["--local", "--prompt-tokens", "100000000000"],
            "100000000000 prompt tokens + 32 new must be within",
        ),
        (["--local", "--seed", "-1"], "--seed must be 0 or more"),
        (["--server", "bogus"], "--server: 'bogus' has no scheme"),
    ],
)
def test_generate_refuses_what_it_cannot_do_in_one_line_before_any_work(plans, args, words):
    r = subprocess.run(
        [sys.executable, "-m", "splitpoint.app", "generate", str(plans / "float32"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_step_that_goes_unanswered_fails_at_its_timeout_not_twice_that(plans):
    """A server that answers the client's ping and then no step: generate fails after one timeout.
    Before, the session's close waited a full timeout of its own before the error came out."""
    import threading

    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    stop_flag = threading.Event()
    seen: list[str] = []

    def silent() -> None:
        while not stop_flag.is_set():
            if not router.poll(50):
                continue
            ident, *frames = router.recv_multipart()
            msg = wire.parse(frames)
            seen.append(msg.type)
            if msg.type == wire.PING:
                router.send_multipart([ident, *wire.Message(wire.PONG, msg.id).to_frames()])

    t = threading.Thread(target=silent, daemon=True)
    t.start()
    try:
        with DecoderClient(plans / "float32", f"tcp://127.0.0.1:{port}", timeout_s=2.0) as c:
            t0 = time.monotonic()
            with pytest.raises(GenerationError, match="no answer from the server within 2 s"):
                c.generate(_prompt(), 4)
            waited = time.monotonic() - t0
            deadline = time.monotonic() + 5
            while wire.CLOSE not in seen and time.monotonic() < deadline:
                time.sleep(0.02)
    finally:
        stop_flag.set()
        t.join(5)
        router.close(0)
    assert waited < 3.5, waited  # one timeout (2 s) and the head's run; it was over 4 s
    assert seen == [wire.PING, wire.STEP, wire.CLOSE]  # the close still goes out, unwaited


def test_linear_layers_exported_as_gemm_get_4_bit_weights_too():
    """transformers' GPT-2 writes its layers as Gemm, which the 4-bit quantiser does not take: the head
    stayed float while the plan said int4. Gemm with a constant weight becomes MatMul (+ Add) first,
    alpha, beta and transB folded into the constants; a part with no such weight is refused."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from splitpoint.core.errors import SplitPointError
    from splitpoint.core.quantize import float_matmul_weights, gemm_as_matmul, quantize_matmul_weights
    from splitpoint.core.runner import make_session

    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 64)).astype(np.float32)  # transB: [out, in]
    b = rng.standard_normal(96).astype(np.float32)
    w2 = rng.standard_normal((96, 96)).astype(np.float32)
    g = helper.make_graph(  # unnamed nodes, as exporters leave them: the rewrite names its own uniquely
        [
            helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1, alpha=0.5, beta=2.0),
            helper.make_node("Gemm", ["h", "w2", "b"], ["y"]),
        ],
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 96])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = {"x": rng.standard_normal((4, 64)).astype(np.float32)}
    want = make_session(model.SerializeToString()).run(None, x)[0]
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    assert gemm_as_matmul(rewritten.graph) == 2
    assert [n.op_type for n in rewritten.graph.node] == ["MatMul", "Add", "MatMul", "Add"]
    assert len({n.name for n in rewritten.graph.node}) == 4
    np.testing.assert_allclose(
        make_session(rewritten.SerializeToString()).run(None, x)[0], want, rtol=1e-5, atol=1e-5
    )
    q = quantize_matmul_weights(model)
    assert [n.op_type for n in q.graph.node].count("MatMulNBits") == 2
    got = make_session(q.SerializeToString()).run(None, x)[0]
    assert np.linalg.norm(got - want) < 0.15 * np.linalg.norm(want)  # 4-bit weights: close, not equal
    relu = helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])],
            "relu",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 64])],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=8,
    )
    with pytest.raises(SplitPointError, match="no MatMul or Gemm weight to quantise"):
        quantize_matmul_weights(relu)
    # weights already 4-bit (onnxruntime-genai's int4 export) are not quantised "again" as a new candidate
    assert float_matmul_weights(model) and not float_matmul_weights(q)
    with pytest.raises(SplitPointError, match="weights already quantised"):
        quantize_matmul_weights(q)


def _edited(src, dst, decoder=None, head_from=None):
    """A copy of a decoder plan with its decoder block edited (or head.onnx replaced), its checksums and
    plan id made honest for the edit: only the fit check can tell."""
    import hashlib
    import shutil

    shutil.copytree(src, dst)
    plan = json.loads((dst / "plan.json").read_text())
    plan["decoder"].update(decoder or {})
    if head_from:
        data = (dst / head_from).read_bytes()
        (dst / "head.onnx").write_bytes(data)
        plan["files"]["head.onnx"] = hashlib.sha256(data).hexdigest()
    plan.pop("plan_id")
    plan["plan_id"] = hashlib.sha256(
        json.dumps(plan, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    (dst / "plan.json").write_text(json.dumps(plan))
    return dst


@pytest.mark.parametrize(
    "edit, words",
    [
        ({"decoder": {"heads": 8}}, r"past_key_values.0.key has 4 heads, plan.json says 8"),
        ({"decoder": {"head_dim": 16}}, r"has 32 head_dim, plan.json says 16"),
        (
            {"decoder": {"layers": 6}},
            r"(tail|full).onnx does not fit the plan: it keeps the KV cache of layers (2|0)..3, "
            r"where plan.json gives it layers (2|0)..5 \(of 6\)",
        ),
        ({"decoder": {"vocab": 2}}, r"its output logits is 8192 wide, plan.json's vocab is 2"),
        ({"decoder": {"hidden": 64}}, r"hidden_states.1 is 128 wide, plan.json's hidden is 64"),
        (
            {"head_from": "tail.onnx"},
            r"head.onnx does not fit the plan: it keeps the KV cache of layers 2..3",
        ),
    ],
)
def test_a_decoder_block_its_models_contradict_is_refused(plans, tmp_path, edit, words):
    """plan.json's decoder block said 8 heads or 6 layers and was deployed and ignored; a head.onnx that
    was the tail's failed inside onnxruntime at the first prompt. A deploy checks it, and so do the
    edge's generate and a local run."""
    from splitpoint.core.errors import PlanError
    from splitpoint.core.runner import check_models_load

    d = _edited(plans / "float32", tmp_path / "p", **edit)
    plan = Plan.load(d)
    with pytest.raises(PlanError, match=words):
        check_models_load(d, plan)
    if "head_from" in edit or "hidden" in edit.get("decoder", {}):
        with pytest.raises(PlanError, match=words):
            DecoderClient(d, "tcp://127.0.0.1:1")
    (d / "full.onnx").unlink()
    plan = json.loads((d / "plan.json").read_text())
    del plan["files"]["full.onnx"]
    (d / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(PlanError, match="does not fit the plan"):  # head and tail here, one after the other
        generate_local(_edited(d, tmp_path / "q"), np.zeros((1, 4), np.int64), 2)


def test_one_client_serves_generations_from_several_threads_in_turn(plans, server):
    """Two threads generating on one client dropped each other's answers as late ones, and both failed
    after the timeout saying the server had not answered."""
    with _client(plans, server) as c:
        want = c.generate(_prompt(), 24).tokens
        got: list = []
        threads = [
            threading.Thread(target=lambda: got.append(c.generate(_prompt(), 24).tokens)) for _ in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert got == [want] * 3


def test_close_from_another_thread_ends_a_generation_with_a_clear_error(plans, server):
    """The socket was closed under the generating thread's poll: it died with a raw "Socket operation on
    non-socket", and a generate after close() with another raw zmq error."""
    c = _client(plans, server)
    failed: list = []

    def long_generation() -> None:
        try:
            while True:  # generations back to back: close() lands in one
                c.generate(_prompt(), 400)
        except GenerationError as exc:
            failed.append(exc)

    t = threading.Thread(target=long_generation)
    t.start()
    time.sleep(0.3)  # under way: the head and the server's steps alternate
    t0 = time.monotonic()
    c.close()
    t.join(10)
    assert not t.is_alive() and time.monotonic() - t0 < 2
    assert [e.code for e in failed] == ["closed"], failed
    with pytest.raises(GenerationError, match="closed") as e:
        c.generate(_prompt(), 4)
    assert e.value.code == "closed"
    end = time.monotonic() + 10
    while len(server.sessions) and time.monotonic() < end:  # its session was closed on the server too
        time.sleep(0.05)
    assert len(server.sessions) == 0


def test_time_the_server_did_not_run_is_no_session_s_idleness(plans):
    """A server stopped (SIGSTOP, a suspended machine) past --session-idle: on its resume, whether a
    session its client went on using survived was a race between the client's step and the first sweep.
    A wait for messages that ends far later than it was to is not counted as idle; the time the loop
    spends working is (a server whose steps take seconds still frees idle sessions)."""
    import signal

    from splitpoint.server.sessions import DecoderSessions

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = start_server(endpoint, plans, "--session-idle", "3")
    try:
        with DecoderClient(plans / "float32", endpoint, timeout_s=20) as c:
            prompt = _prompt()
            c.step(1, 0, c.head(prompt))
            proc.send_signal(signal.SIGSTOP)
            time.sleep(5)  # past the idle limit, stopped
            proc.send_signal(signal.SIGCONT)
            time.sleep(1.5)  # its first sweeps run before the step below: the session outlived them
            c.step(1, prompt.shape[1], c.head(_prompt(1)))
    finally:
        proc.send_signal(signal.SIGCONT)
        stop(proc)
    # the loop's own work between two looks is idle time as ever: long steps do not keep sessions alive
    busy = DecoderSessions(max_sessions=4, max_cache_bytes=1 << 20, idle_s=5.0)
    key = (b"peer", None, "plan", 1)
    busy.commit(key, busy.begin(key, 0, {}), {"k": np.zeros(4, np.float32)}, 2)
    t0 = busy._s[key].last_used
    assert [busy.sweep(now=t0 + 2.5 * k) for k in range(1, 4)] == [0, 0, 1]
