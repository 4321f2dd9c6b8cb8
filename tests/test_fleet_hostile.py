"""The orchestrator's side of the fleet against devices that send junk or lie, and peers that are not
SplitPoint: a real mosquitto broker and real ZeroMQ sockets. One bad message must not stop `watch` or
`status`, nor reach the operator's terminal as escapes or markup, nor stop a deploy to other targets."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import threading
import time

import paho.mqtt.client as mqtt
import pytest
import zmq
from rich.console import Console

from splitpoint.app.console import heard_s_ago, status_table, watch_table
from splitpoint.app.orchestrator import collect, deploy
from splitpoint.core.errors import SplitPointError

from .conftest import make_certificates, run_cli, running_mosquitto

JUNK = {
    "metrics": {
        "bandwidth_mbps_est": "fast",
        "cpu_percent": {"a": 1},
        "process_rss_bytes": [1],
        "rtt_ms_est": 10**400,
        "requests": "5\x1b[1A\x1b[2Kfake line",
    },
    "latency": {"total_ms": "12", "head_ms": True},
    "status": {
        "state": "online\x1b]0;TITLE\x07\x1b[2J[/]",
        "role": "[bold red]server",
        "plan": 123,
        "plans": [1, 2],
        "server": "tcp://a\rOVERWRITE\u202e",
    },
}


def _publish(url: str, messages: list[tuple[str, str | bytes, bool]]) -> None:
    host, port = url.removeprefix("mqtt://").split(":")
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    c.connect(host, int(port))
    c.loop_start()
    for topic, payload, retain in messages:
        c.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)
    c.loop_stop()
    c.disconnect()


def _render(table) -> str:
    out = io.StringIO()
    Console(file=out, width=400, color_system=None).print(table)
    return out.getvalue()


def test_junk_telemetry_is_shown_as_junk_and_stops_nothing(mosquitto):
    dev = "junk-dev[i]"
    msgs = [(f"splitpoint/{dev}/{kind}", json.dumps(p), True) for kind, p in JUNK.items()]
    msgs += [
        ("splitpoint/junk-dev/status", b"\xff\xfe", True),
        ("splitpoint/deep/status", "[" * 100_000, True),
        # an integer past Python's 4,300-digit limit is a ValueError, not a JSONDecodeError
        ("splitpoint/huge/status", '{"state": ' + "9" * 5000 + "}", True),
    ]
    _publish(mosquitto, msgs)
    try:
        fleet = collect(mosquitto, 1.0)
        assert dev in fleet
        for text in (_render(status_table(fleet)), _render(watch_table(fleet, lost_since=time.time() - 5))):
            assert "\x1b" not in text and "\r" not in text and "\u202e" not in text
            assert "\\x1b" in text and "[/]" in text and "[bold red]server" in text
        shown = _render(watch_table(fleet))
        assert "?" in shown  # a figure that is not a number
        assert "broker lost" not in shown
        assert "connection to the MQTT broker lost 5 s ago" in _render(watch_table(fleet, time.time() - 5))
        r = run_cli("status", "--mqtt", mosquitto, "--seconds", "1", timeout=60)
        assert r.returncode == 0 and "Traceback" not in r.stderr and "junk-dev[i]" in r.stdout, r.stderr
    finally:
        _publish(mosquitto, [(t, b"", True) for t, _, _ in msgs])


def test_a_device_clock_ahead_is_heard_by_when_it_arrived(mosquitto):
    """A device whose clock runs an hour ahead, silent since: 'heard s ago' grows on this machine's clock."""
    _publish(mosquitto, [("splitpoint/skewed/metrics", json.dumps({"ts": time.time() + 3600}), False)])
    from splitpoint.app.orchestrator import FleetSubscriber

    with FleetSubscriber(mosquitto) as sub:
        before = time.time()
        _publish(mosquitto, [("splitpoint/skewed/metrics", json.dumps({"ts": time.time() + 3600}), False)])
        time.sleep(0.5)
        kinds = sub.snapshot()["skewed"]
    assert before <= kinds["metrics"]["received"] <= time.time()
    assert heard_s_ago(kinds, now=kinds["metrics"]["received"] + 2) == pytest.approx(2.0)


def test_forged_processes_under_one_id_cost_bounded_memory(mosquitto):
    from splitpoint.app.orchestrator import FleetSubscriber

    with FleetSubscriber(mosquitto) as sub:
        _publish(
            mosquitto,
            [("splitpoint/one/metrics", json.dumps({"instance": f"p{i}"}), False) for i in range(300)],
        )
        time.sleep(0.5)
        assert len(sub._instances["one"]) <= 65


def test_a_broker_that_refuses_the_connection_is_an_error_not_an_empty_fleet(tmp_path):
    with running_mosquitto(tmp_path, anonymous=False) as url:
        with pytest.raises(SplitPointError, match="refused the connection"):
            collect(url, 0.5)
        r = run_cli("status", "--mqtt", url, "--seconds", "1", timeout=60)
        assert r.returncode == 2 and "refused the connection" in r.stderr and "no devices" not in r.stdout


def test_a_broker_password_may_come_from_the_environment_off_the_command_line(tmp_path):
    """A password in --mqtt is on the command line, which ``ps`` shows every user of the machine: a URL
    naming a user and no password takes it from $SPLITPOINT_MQTT_PASSWORD."""
    with running_mosquitto(tmp_path, anonymous=False, users={"tele": "pw-from-env"}) as url:
        user_url = url.replace("mqtt://", "mqtt://tele@")
        env = {"SPLITPOINT_MQTT_PASSWORD": "pw-from-env"}
        r = run_cli("status", "--mqtt", user_url, "--seconds", "0.5", timeout=60, env=env)
        assert r.returncode == 0 and "refused" not in r.stderr, r.stderr
        env["SPLITPOINT_MQTT_PASSWORD"] = "wrong"
        r = run_cli("status", "--mqtt", user_url, "--seconds", "0.5", timeout=60, env=env)
        assert r.returncode == 2 and "refused the connection" in r.stderr and "wrong" not in r.stderr
        # a password in the URL is the one used
        r = run_cli(
            "status",
            "--mqtt",
            url.replace("mqtt://", "mqtt://tele:pw-from-env@"),
            "--seconds",
            "0.5",
            timeout=60,
            env=env,
        )
        assert r.returncode == 0, r.stderr


def test_telemetry_over_tls_to_a_broker_the_fleets_own_ca_signed(tmp_path, caplog):
    """A fleet's broker is signed by the fleet's CA, which no system trusts: mqtts:// took the system's CAs
    alone, so TLS telemetry could not reach it. ``?ca=`` names the CA, ``cert=``/``key=`` the client's own
    certificate for a broker that asks for one; without them each side says what to give."""
    import logging

    from splitpoint.core.telemetry import Telemetry

    certs = make_certificates(tmp_path / "certs")
    ca = f"ca={certs / 'ca.pem'}"
    with running_mosquitto(tmp_path, tls=certs) as url:
        tele = Telemetry("tls-edge", "edge", f"{url}?{ca}")
        try:
            assert tele.connected.wait(10)
            tele.status("online")
            fleet = collect(f"{url}?{ca}", 1.0)
            assert fleet["tls-edge"]["status"]["state"] == "online", fleet
        finally:
            tele.close()
        # the system's CAs alone: refused, and the error says how to trust the broker
        r = run_cli("status", "--mqtt", url, "--seconds", "0.5", timeout=60)
        assert r.returncode == 2 and "certificate verify failed" in r.stderr, r.stderr
        assert "give the CA that signed its certificate: mqtts://HOST:PORT?ca=FILE" in r.stderr, r.stderr
        with caplog.at_level(logging.WARNING, logger="splitpoint.core.telemetry"):
            untrusting = Telemetry("tls-edge-2", "edge", url)
            try:
                assert not untrusting.connected.wait(2)
            finally:
                untrusting.close()
        assert "has a certificate this client does not trust" in caplog.text, caplog.text
        assert "give its CA, mqtts://HOST:PORT?ca=FILE" in caplog.text
        # plain MQTT at a TLS listener is told the scheme
        r = run_cli("status", "--mqtt", url.replace("mqtts://", "mqtt://"), "--seconds", "0.5", timeout=60)
        assert r.returncode == 2 and "(a TLS listener takes mqtts://)" in r.stderr, r.stderr
    with running_mosquitto(tmp_path, tls=certs, client_certificates=True) as url:
        mine = f"{url}?{ca}&cert={certs / 'client.pem'}&key={certs / 'client.key'}"
        assert run_cli("status", "--mqtt", mine, "--seconds", "0.5", timeout=60).returncode == 0
        # no certificate of its own: the broker closes the connection after the handshake, which said
        # nothing in a daemon's log and "did not accept" alone in status
        r = run_cli("status", "--mqtt", f"{url}?{ca}", "--seconds", "0.5", timeout=60)
        assert r.returncode == 2, r.stderr
        assert "(a broker that asks clients for certificates takes &cert=FILE&key=FILE)" in r.stderr, r.stderr
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="splitpoint.core.telemetry"):
            certless = Telemetry("tls-edge-3", "edge", f"{url}?{ca}")
            try:
                deadline = time.monotonic() + 10
                while "closed the connection before accepting it" not in caplog.text:
                    assert time.monotonic() < deadline, caplog.text
                    time.sleep(0.1)
            finally:
                certless.close()
        assert "takes &cert=FILE&key=FILE" in caplog.text, caplog.text


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    d = make_certificates(tmp_path_factory.mktemp("certs"))
    (d / "junk.pem").write_text("not a certificate\n")
    subprocess.run(
        ["openssl", "pkey", "-in", "client.key", "-aes128", "-passout", "pass:pw", "-out", "locked.key"],
        cwd=d,
        check=True,
        capture_output=True,
    )
    return d


@pytest.mark.parametrize(
    "query, said",
    [
        ("mqtt://h:1883?ca={d}/ca.pem", "ca= is for TLS; write mqtts://"),
        ("mqtts://h?cafile={d}/ca.pem", "after the host and port it takes only ?ca=FILE&cert=FILE&key=FILE"),
        ("mqtts://h?ca={d}/ca.pem&cafile=x", "unknown option 'cafile' (it takes ca, cert and key)"),
        ("mqtts://h?ca={d}/nope.pem", "ca file '{d}/nope.pem': No such file or directory"),
        ("mqtts://h?ca={d}/ca.pem&cert={d}/client.pem", "a client certificate takes both cert= and key="),
        ("mqtts://h?ca=", "give ca= one file"),
        ("mqtts://h?ca={d}/ca.pem&ca={d}/ca.pem", "give ca= one file"),
        (
            "mqtts://h/topic?ca={d}/ca.pem",
            "after the host and port it takes only ?ca=FILE&cert=FILE&key=FILE",
        ),
        # loaded as TLS will load them: paho stopped the command with OpenSSL's words alone, naming no file,
        # and asked for an encrypted key's passphrase on the terminal
        ("mqtts://h?ca={d}/junk.pem", "ca file '{d}/junk.pem' holds no PEM certificate OpenSSL reads"),
        ("mqtts://h?cert={d}/client.pem&key={d}/server.key", "the key is not this certificate's"),
        ("mqtts://h?cert={d}/client.pem&key={d}/locked.key", "key file '{d}/locked.key' is encrypted"),
        ("mqtts://h?cert={d}/junk.pem&key={d}/client.key", "a PEM certificate and its PEM private key"),
    ],
)
def test_a_broker_urls_tls_files_are_checked_where_the_url_is_read(certificates, query, said):
    from splitpoint.core.telemetry import BrokerURL

    with pytest.raises(SplitPointError) as err:
        BrokerURL.parse(query.format(d=certificates))
    assert said.format(d=certificates) in str(err.value)


def test_a_tls_files_path_is_read_as_written(certificates, tmp_path):
    """A path with an @ was taken for the credentials' end (refused as a password needing escapes, and a
    password beside it printed the host away); a + was read as a space."""
    from splitpoint.core.telemetry import BrokerURL, redact_url

    odd = tmp_path / "u@corp" / "ca+fleet.pem"
    odd.parent.mkdir()
    odd.write_bytes((certificates / "ca.pem").read_bytes())
    url = f"mqtts://tele:secret@broker:8883?ca={odd}&"  # a trailing & too
    b = BrokerURL.parse(url)
    assert (b.host, b.port, b.username, b.password, b.ca) == ("broker", 8883, "tele", "secret", str(odd))
    assert redact_url(url) == f"mqtts://tele:***@broker:8883?ca={odd}&"
    # a password's own ? is still no query's start, and is refused as ever, the password hidden
    for password in ("pa?ss", "pa?x=1"):
        with pytest.raises(SplitPointError) as err:
            BrokerURL.parse(f"mqtts://tele:{password}@broker")
        assert "written percent-encoded" in str(err.value) and password not in str(err.value), err.value


@pytest.fixture
def junk_peer():
    """A ZeroMQ ROUTER that answers every message with what the test sets: not SplitPoint's protocol."""
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.ROUTER)
    port = s.bind_to_random_port("tcp://127.0.0.1")
    reply: dict = {"frames": [b"not json"]}
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            if s.poll(50):
                ident, *_ = s.recv_multipart()
                s.send_multipart([ident, *reply["frames"]])

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield f"tcp://127.0.0.1:{port}", reply
    stop.set()
    t.join(2)
    s.close(0)


def test_a_deploy_to_a_peer_that_is_not_splitpoint_fails_that_target_in_words(
    junk_peer, tmp_path, small_resnet18
):
    endpoint, reply = junk_peer
    plan = tmp_path / "plan"
    r = run_cli("split", str(small_resnet18), "--cut", "10", "-o", str(plan), timeout=120)
    assert r.returncode == 0, r.stderr
    with pytest.raises(SplitPointError, match="not SplitPoint's protocol"):
        deploy(plan, endpoint, timeout_s=5)
    message = "\x1b[2J" + "A" * 60_000
    header = {"v": 1, "type": "error", "id": 1, "meta": {"code": "bad", "message": message}}
    reply["frames"] = [json.dumps(header).encode()]
    with pytest.raises(SplitPointError) as caught:
        deploy(plan, endpoint, timeout_s=5)
    assert "\x1b" not in str(caught.value) and len(str(caught.value)) < 700


def test_a_deploy_fails_at_once_when_nothing_listens_or_the_peer_goes_with_the_plan(
    tmp_path, small_resnet18, monkeypatch
):
    """Both waited out the whole --timeout (30 s) and ended in one message guessing at every cause,
    "then it installs it all the same" among them for a peer that had died with the plan."""
    from splitpoint.app import orchestrator

    plan = tmp_path / "plan"
    r = run_cli("split", str(small_resnet18), "--cut", "10", "-o", str(plan), timeout=120)
    assert r.returncode == 0, r.stderr
    monkeypatch.setattr(orchestrator, "CONNECT_WITHIN_S", 1.0)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    nobody = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    probe.close()
    t0 = time.monotonic()
    with pytest.raises(SplitPointError, match="no ZeroMQ connection within 1 s"):
        deploy(plan, nobody, timeout_s=30)
    assert time.monotonic() - t0 < 5

    ctx = zmq.Context.instance()
    peer = ctx.socket(zmq.ROUTER)
    port = peer.bind_to_random_port("tcp://127.0.0.1")

    def take_and_die():  # a server killed with the plan received, before it answers
        if peer.poll(20_000):
            peer.recv_multipart()
        peer.close(0)

    t = threading.Thread(target=take_and_die, daemon=True)
    t.start()
    t0 = time.monotonic()
    with pytest.raises(SplitPointError, match="closed the connection before acknowledging plan"):
        deploy(plan, f"tcp://127.0.0.1:{port}", timeout_s=30)
    assert time.monotonic() - t0 < 10
    t.join(5)
    # a server whose message limit a plan file passes drops the connection too: said as a cause
    from splitpoint.server.config import ServerConfig
    from splitpoint.server.tail_server import TailServer

    srv = TailServer(
        ServerConfig(bind="tcp://127.0.0.1:0", plans_dir=tmp_path / "srv", max_message_bytes=65536)
    )
    srv.start()
    try:
        with pytest.raises(SplitPointError, match=r"or takes no file this large \(the largest is [\d.]+ MiB"):
            deploy(plan, str(srv.endpoint), timeout_s=30)
    finally:
        srv.stop()


def test_the_fleet_view_gives_up_whole_columns_on_a_narrow_terminal_not_names():
    """At 80 columns every cell read '…', device names and states included; now the least needed
    columns give way, named in the caption, and what is shown is shown whole."""
    now = time.time()
    dev = {
        "metrics": {"ts": now, "cpu_percent": 5.0, "process_rss_bytes": 123456789, "requests": 1234},
        "latency": {"ts": now, "total_ms": 40.0},
        "status": {"state": "online", "role": "edge"},
    }
    fleet = {"pi-kitchen": dev, "pi-kids": dev}
    narrow, wide = watch_table(fleet, width=80), watch_table(fleet, width=400)
    for t, w in ((narrow, 80), (wide, 400)):
        out = io.StringIO()
        Console(file=out, width=w, color_system=None).print(t)
        text = out.getvalue()
        assert "…" not in text.split("\n\n")[0] and "pi-kitchen" in text and "pi-kids" in text
        assert max(len(line) for line in text.splitlines()) <= w
    assert len(narrow.columns) < len(wide.columns) == 18
    assert "left out for the terminal's width" in str(narrow.caption) and wide.caption is None
    old = {**dev, "metrics": {**dev["metrics"], "ts": now - 600}, "latency": {"ts": now - 600}}
    fleet = {f"d{i:05d}": old for i in range(3000)} | {"zz-live": dev}
    many = watch_table(fleet, width=400)
    assert len(many.rows) == 200 and "2801 more devices not shown, the least lately heard" in str(
        many.caption
    )
    shown = _render(many)
    assert "zz-live" in shown  # heard lately: not pushed off the screen by 3,000 names before it


def test_wrong_types_and_impossible_figures_show_as_unknown_not_as_sent(mosquitto):
    """A role of ['x'], a plan of {'a': [1, 2]} (which the cleaning made {'a': None}, a value nobody
    sent), a fallback of 'yes', a negative count, latency or bandwidth and a CPU of a million per cent
    were all shown as if a device had reported them."""
    dev = "liar"
    msgs = [
        (
            f"splitpoint/{dev}/status",
            json.dumps({"role": ["x"], "state": 123, "plan": {"a": [1, 2]}, "fallback": "yes"}),
            True,
        ),
        (
            f"splitpoint/{dev}/metrics",
            json.dumps(
                {
                    "errors": -5,
                    "requests": 1.5,
                    "bandwidth_mbps_est": -3.0,
                    "cpu_percent": 1e6,
                    "member": {"a": 1},
                }
            ),
            True,
        ),
        (f"splitpoint/{dev}/latency", json.dumps({"total_ms": -5.0, "head_ms": -1e9, "tail_ms": 2.5}), True),
        ("splitpoint/ghost/unknown", json.dumps({"state": "online"}), True),  # no topic devices publish
    ]
    _publish(mosquitto, msgs)
    try:
        fleet = collect(mosquitto, 1.0)
        assert "ghost" not in fleet
        status = _render(status_table(fleet))
        row = next(line for line in status.splitlines() if "liar" in line)
        assert "['x']" not in row and "None" not in row and "yes" not in row and "123" not in row, row
        assert row.count("?") >= 4, row  # role, state, plan, fallback
        watched = _render(watch_table(fleet, width=400))
        row = next(line for line in watched.splitlines() if "liar" in line)
        for junk in ("-5", "-3.0", "1000000", "1.5", "{'a'", "-1000000000"):
            assert junk not in row, (junk, row)
        assert "2.5" in row, row  # a figure in range is shown as sent
    finally:
        _publish(mosquitto, [(t, b"", True) for t, _, _ in msgs])


def test_an_edge_online_without_its_server_is_not_shown_healthy():
    """An edge whose server is unreachable fails every request (or answers locally): "online" alone,
    and a fallback column of False, read as a healthy device."""
    from splitpoint.app.console import device_state

    def state(**status) -> str:
        return device_state({"status": {"state": "online", **status}})

    assert state(server_up=True, fallback=False) == "online"
    assert state(server_up=False, fallback=False) == "online (server unreachable: requests fail)"
    assert state(server_up=False, fallback=True) == "online (server unreachable: answering locally)"
    assert state(server_up="no") == "online"  # not a bool: nothing said either way
    assert device_state({"status": {"state": "offline", "server_up": False}}) == "offline"
    # an edge-only plan has no server: none being reachable fails nothing
    assert state(server_up=False, fallback=False, edge_only=True) == "online (edge-only plan)"
    # a plan set on its edge-only member answers here, and still says its server is gone
    assert (
        state(server_up=False, fallback=False, local=True) == "online (server unreachable: answering locally)"
    )
    assert state(server_up=True, fallback=False, local=True) == "online"


def test_past_the_ids_kept_the_least_lately_heard_go_and_the_views_say_so(mosquitto, monkeypatch):
    """A flood of ids kept the first 10,000 for good: a real device that published after it was missing
    from both views, and nothing said so. Now the least lately heard id goes, and the views count them."""
    from splitpoint.app import orchestrator
    from splitpoint.app.orchestrator import FleetSubscriber

    monkeypatch.setattr(orchestrator, "MAX_DEVICES", 50)
    with FleetSubscriber(mosquitto) as sub:
        time.sleep(0.5)  # what earlier tests left retained on this broker arrives first
        before = len(sub.snapshot())
        _publish(
            mosquitto,
            [(f"splitpoint/fake{i:03d}/status", json.dumps({"state": "online"}), False) for i in range(80)],
        )
        _publish(
            mosquitto, [("splitpoint/real/status", json.dumps({"state": "online", "role": "server"}), False)]
        )
        deadline = time.monotonic() + 5
        while "real" not in sub.snapshot() and time.monotonic() < deadline:
            time.sleep(0.05)
        fleet = sub.snapshot()
    gone = before + 81 - 50
    assert "real" in fleet and len(fleet) == 50 and fleet.forgotten == gone
    assert "fake000" not in fleet and "fake079" in fleet  # the first heard went first
    for view in (status_table(fleet), watch_table(fleet, width=400)):
        assert f"{gone} device ids forgotten past the 50 kept" in str(view.caption), view.caption


def test_a_device_let_go_in_a_flood_of_ids_gets_its_state_back(mosquitto, monkeypatch):
    """A flood of forged ids pushed a real device out of the views; its metrics brought it back, but its
    status was sent only on change, and the views showed its state as '?' for as long as it ran. A
    device sends its status again with its metrics now and then (every 10 s; 0.3 s here)."""
    from splitpoint.app import orchestrator
    from splitpoint.app.console import device_state
    from splitpoint.app.orchestrator import FleetSubscriber
    from splitpoint.core.telemetry import Telemetry

    monkeypatch.setattr(orchestrator, "MAX_DEVICES", 20)
    tele = Telemetry("flooded-edge", "edge", mosquitto, status_every_s=0.3)
    try:
        assert tele.connected.wait(5)
        tele.status("online", {"plan": "0123456789abcdef", "server_up": True})
        with FleetSubscriber(mosquitto) as sub:
            time.sleep(0.5)
            assert sub.snapshot()["flooded-edge"]["status"]["state"] == "online"
            fakes = [
                (f"splitpoint/forged{i:03d}/status", json.dumps({"state": "online"}), False)
                for i in range(40)
            ]
            _publish(mosquitto, fakes)
            deadline = time.monotonic() + 5
            while "flooded-edge" in sub.snapshot() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert "flooded-edge" not in sub.snapshot()  # let go
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                tele.metrics({"server_up": True})
                time.sleep(0.35)
                kinds = sub.snapshot().get("flooded-edge", {})
                if "status" in kinds:
                    break
        assert device_state(kinds) == "online" and kinds["status"]["plan"] == "0123456789abcdef", kinds
    finally:
        tele.close()
        _publish(mosquitto, [("splitpoint/flooded-edge/status", b"", True)])


def test_messages_the_views_leave_unread_are_counted_and_said(mosquitto):
    """Junk was dropped without a word, and a retained 200 MiB status was parsed whole (887 MB for each
    view). Past 256 KiB a message is left unread, and the views say how many they skipped and why."""
    msgs = [
        ("splitpoint/big-dev/status", json.dumps({"state": "online", "plan": "x" * 300_000}), True),
        ("splitpoint/text-dev/status", b"not json at all", True),
        ("splitpoint/list-dev/status", json.dumps([1, 2, 3]), True),
    ]
    _publish(mosquitto, msgs)
    try:
        fleet = collect(mosquitto, 1.0)
        assert not {"big-dev", "text-dev", "list-dev"} & set(fleet)
        whys = ("larger than 256 KiB", "not JSON", "not a JSON object")
        assert all(fleet.skipped.get(why, 0) >= 1 for why in whys), fleet.skipped
        for view in (status_table(fleet), watch_table(fleet, width=400)):
            said = str(view.caption)
            assert "messages on device topics left unread" in said and all(w in said for w in whys), said
    finally:
        _publish(mosquitto, [(t, b"", True) for t, _, _ in msgs])
