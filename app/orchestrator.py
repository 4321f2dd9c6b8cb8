"""The orchestrator: push plans to servers and edge daemons, and read the fleet's telemetry."""

from __future__ import annotations

import json
import math
import ssl
import threading
import time
import unicodedata
from collections.abc import Callable
from pathlib import Path

import zmq

from splitpoint.core import endpoints, wire
from splitpoint.core.curve import HANDSHAKE_FAILED
from splitpoint.core.endpoints import check_endpoint
from splitpoint.core.errors import ConfigError, PlanError, SplitPointError
from splitpoint.core.plan import PLAN_FILE, Plan
from splitpoint.core.telemetry import TOPIC_ROOT, BrokerURL


def files_to_push(plan_dir: str | Path, role: str) -> tuple[Plan, list[str]]:
    """The plan and the files a target in ``role`` is sent (plan.json first), each present and matching
    its checksum: only what that target holds (a server needs no head.onnx), the edge's whole model for
    falling back included where the plan lists it. Checked for every target before any is pushed."""
    plan = Plan.load(plan_dir, role=role)
    d = Path(plan_dir)
    names = [PLAN_FILE, *sorted(plan.files_for(role))]
    missing = [n for n in names if not (d / n).is_file()]
    if missing:
        raise PlanError(f"{d}: {', '.join(missing)} missing (the plan lists it; the {role} is sent it)")
    return plan, names


def deploy(
    plan_dir: str | Path,
    endpoint: str,
    timeout_s: float = 30.0,
    role: str = "server",
    curve_server_key: bytes | None = None,
    curve_keypair: tuple[bytes, bytes] | None = None,
    notes: list[str] | None = None,
) -> str:
    """Send a plan (plan.json and the files ``role`` holds: a server its tail, an edge its head and the
    whole model for fallback, if the plan carries it) and wait for the peer to acknowledge it.
    Against a CurveZMQ server, ``curve_keypair`` must be a key on its deploy allow-list. ``notes`` gets
    what the peer warned of as it took the plan (an edge: a fallback it lost, a server that lacks it)."""
    try:
        check_endpoint(endpoint)
    except ValueError as exc:
        raise ConfigError(f"--server/--edge: {exc}") from exc
    plan, names = files_to_push(plan_dir, role)
    d = Path(plan_dir)
    frames = [(d / n).read_bytes() for n in names]
    ctx: zmq.Context = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.MAXMSGSIZE, MAX_REPLY_BYTES)  # an acknowledgement is small: a peer's 1 GiB is not read
    if curve_server_key:
        public, secret = curve_keypair or zmq.curve_keypair()
        s.curve_serverkey, s.curve_publickey, s.curve_secretkey = curve_server_key, public, secret
    monitor = s.get_monitor_socket(_DEPLOY_EVENTS)
    try:
        endpoints.connect(s, endpoint)
        s.send_multipart(
            wire.Message(wire.DEPLOY, 1, plan.plan_id, meta={"files": names}, frames=frames).to_frames()
        )
        _await_reply(s, monitor, endpoint, plan.plan_id[:12], timeout_s, max(map(len, frames), default=0))
        try:
            reply = wire.parse(s.recv_multipart(), MAX_REPLY_BYTES)
        except wire.WireError as exc:  # not a SplitPoint peer, or a broken one: this target fails, not all
            raise SplitPointError(
                f"{endpoint} sent a reply that is not SplitPoint's protocol: {exc}"
            ) from exc
    finally:
        s.disable_monitor()
        monitor.close(0)
        s.close(0)
    if reply.type == wire.ERROR:
        why = clean_text(str(reply.meta.get("message")), 500)
        raise SplitPointError(f"{endpoint} refused plan {plan.plan_id[:12]}: {why}")
    if reply.type != wire.DEPLOYED or reply.plan != plan.plan_id:
        raise SplitPointError(
            f"{endpoint} answered {reply.type} for plan {clean_text(reply.plan[:12], 12) or '?'}"
        )
    said = reply.meta.get("warnings")
    if notes is not None and isinstance(said, list):
        notes.extend(clean_text(str(w), 500) for w in said[:8])
    return plan.plan_id


MAX_REPLY_BYTES = 1 << 20
# a peer that takes no connection in this long is not there (deploy said so only at --timeout)
CONNECT_WITHIN_S = 10.0
_DEPLOY_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | HANDSHAKE_FAILED


def _await_reply(
    s: zmq.Socket, monitor: zmq.Socket, endpoint: str, plan: str, timeout_s: float, largest: int = 0
) -> None:
    """Wait for the deploy's answer, failing as soon as the connection says it will not come: nothing
    listening (no connection within CONNECT_WITHIN_S), a handshake refused (a CurveZMQ key, a peer that
    is not ZeroMQ), or the connection dropped with the plan sent (the peer stopped). Each waited out the
    whole --timeout and ended in one message that guessed at all of them."""
    from zmq.utils.monitor import recv_monitor_message

    start = time.monotonic()
    deadline, connect_by = start + timeout_s, start + min(timeout_s, CONNECT_WITHIN_S)
    connected = False
    poller = zmq.Poller()
    poller.register(s, zmq.POLLIN)
    poller.register(monitor, zmq.POLLIN)
    while True:
        now = time.monotonic()
        until = deadline if connected else min(deadline, connect_by)
        if now >= until:
            break
        events = dict(poller.poll(max(1, int((until - now) * 1000))))
        if s in events:
            return
        while monitor.poll(0):
            event = recv_monitor_message(monitor)["event"]
            if event & zmq.EVENT_HANDSHAKE_SUCCEEDED:
                connected = True
            elif event & HANDSHAKE_FAILED:
                raise SplitPointError(
                    f"cannot deploy plan {plan} to {endpoint}: the connection's handshake failed (a CurveZMQ "
                    "key it does not accept, or not a ZeroMQ peer)"
                )
            elif event & zmq.EVENT_DISCONNECTED and connected:
                if s.poll(0):  # the answer came before the close
                    return
                # ZeroMQ drops a connection that sends a frame past the peer's limit: a plan file larger
                # than its --max-message-mb reads as this, every time
                raise SplitPointError(
                    f"{endpoint} closed the connection before acknowledging plan {plan}: it stopped or "
                    f"restarted, or takes no file this large (the largest is {largest / 2**20:.1f} MiB: "
                    "its --max-message-mb); it is installed only if `status` lists it"
                )
    if not connected:
        why = endpoints.name_problem(endpoint) or "is it running, and is this its --bind or --listen?"
        raise SplitPointError(
            f"cannot deploy plan {plan} to {endpoint}: no ZeroMQ connection within "
            f"{min(timeout_s, CONNECT_WITHIN_S):g} s ({why})"
        )
    raise SplitPointError(
        f"{endpoint} did not acknowledge plan {plan} within {timeout_s:g} s (connected: still loading a "
        "large plan, which it then installs all the same, as `status` will show; push again with a longer "
        "--timeout to know)"
    )


INSTANCE_TTL_S = 10.0  # devices publish metrics every 2 s: a process not heard for this long is gone
MAX_DEVICES = 10_000  # ids kept at most: a forger inventing ids costs bounded memory
KINDS = frozenset({"status", "metrics", "latency", "switch"})  # what devices publish (docs/deployment.md)


class Fleet(dict):
    """The latest payload per device and kind, and how many ids were let go past the ones kept
    (``forgotten``, of ``kept`` at most): the views say so, where a fleet cut short read as whole."""

    forgotten: int = 0
    kept: int = MAX_DEVICES
    skipped: dict[str, int] = {}  # messages on a device topic left unread, by why


MAX_PAYLOAD = 256 * 1024  # bytes of one message read at most: a device's largest is a few KiB


MAX_TEXT = 200  # characters of any text a device sends that are kept
_NUMBER_LIMIT = 1e15  # beyond this a figure is junk (and formats as 400 digits, or overflows)


def clean_text(v: str, limit: int = MAX_TEXT) -> str:
    """A device's (or a peer's) text as safe to print: control and format characters (terminal escapes,
    right-to-left overrides) shown as escapes, and at most ``limit`` characters. Rich markup is escaped
    where it is printed."""
    out = "".join(
        c if c.isprintable() and unicodedata.category(c) != "Cf" else repr(c)[1:-1] for c in v[: limit + 1]
    )
    return out if len(out) <= limit else out[: limit - 1] + "…"


def clean_value(v: object, depth: int = 0) -> object:
    """One telemetry value as the tables may show it: a finite number of sane size, a bool, cleaned
    text, or a short list or object of those; anything else is dropped (None). A device is not
    trusted: one retained message of a wrong type would otherwise stop every later ``watch``."""
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, int | float):  # an int is compared as one: 400 digits overflow a float
        return v if abs(v) < _NUMBER_LIMIT and (isinstance(v, int) or math.isfinite(v)) else None
    if isinstance(v, str):
        return clean_text(v)
    if depth >= 2:
        return None
    if isinstance(v, list):  # a long one is cut, and says so: a server holds up to 512 plans
        more = [f"… and {len(v) - 32} more"] if len(v) > 32 else []
        return [clean_value(x, depth + 1) for x in v[:32]] + more
    if isinstance(v, dict):
        return {clean_text(str(k), 64): clean_value(x, depth + 1) for k, x in list(v.items())[:64]}
    return None


class FleetSubscriber:
    """Every device's telemetry topics, latest payload per device and kind, kept while inside ``with``.

    Connecting happens on entry and fails there, with one clear error, when the broker cannot be reached."""

    def __init__(self, url: str, on_message: Callable[[str, str, dict], None] | None = None):
        import paho.mqtt.client as mqtt

        self.url = BrokerURL.parse(url)
        self._fleet: dict[str, dict] = {}  # in the order last heard: the first is the one let go next
        self.forgotten = 0  # ids let go past MAX_DEVICES
        self.skipped: dict[str, int] = {}  # messages on a device topic left unread, by why
        self._instances: dict[str, dict[str, float]] = {}  # per device: process -> when last heard
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._refused: str | None = None  # the broker's reason for refusing the connection
        self.lost_since: float | None = None  # wall-clock time the broker connection dropped, if it did
        self._on_message = on_message
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"splitpoint-watch-{id(self):x}")
        self.url.apply(c)
        c.connect_timeout = 3.0  # an unreachable host fails within seconds, not the OS's minutes
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_msg
        self._client = c

    def _on_connect(self, client, userdata, flags, reason, properties=None) -> None:
        if getattr(reason, "is_failure", False):  # e.g. not authorised: not an empty fleet
            self._refused = (
                f"refused the connection: {reason} "
                "(check the user and password in --mqtt, mqtt://user:password@host:port)"
            )
            self._connected.set()
            return
        self.lost_since = None
        client.subscribe(f"{TOPIC_ROOT}/+/+")

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties=None) -> None:
        """Entry waits for the broker's acknowledgement of the subscription, not only of the connection:
        a message published between the two was never delivered (a device's metrics sent just after a
        `with FleetSubscriber(...)` began were missed, now and then, on a loaded machine). A broker whose
        access list refuses the topic says so here, and that is an error, not an empty fleet."""
        failed = [r for r in reason_codes or [] if getattr(r, "is_failure", False)]
        if failed:
            self._refused = (
                f"refused the subscription to {TOPIC_ROOT}/+/+: {failed[0]} "
                "(check the broker's access list for this user)"
            )
        self._connected.set()

    def _on_disconnect(self, *args: object) -> None:
        if self.lost_since is None:
            self.lost_since = time.time()

    def _on_msg(self, client, userdata, m) -> None:
        parts = m.topic.split("/")
        if len(parts) != 3 or parts[2] not in KINDS:  # another topic makes no device of its sender
            return
        if len(m.payload) > MAX_PAYLOAD:  # parsed, a retained 200 MiB status took 887 MB per view
            self._skip(f"larger than {MAX_PAYLOAD // 1024} KiB")
            return
        try:
            payload = json.loads(m.payload)
        except (ValueError, RecursionError):  # not JSON, not UTF-8, or an integer of 5,000 digits
            self._skip("not JSON")
            return
        if not isinstance(payload, dict):
            self._skip("not a JSON object")
            return
        payload = clean_value(payload)
        assert isinstance(payload, dict)
        if not m.retain:  # heard now, on this machine's clock (a device's own may be ahead)
            payload["received"] = time.time()
        dev, kind = clean_text(parts[1], 64), clean_text(parts[2], 32)
        inst = payload.get("instance")
        now = time.monotonic()
        with self._lock:
            # the least lately heard id goes to make room: a real device publishing every 2 s is kept
            # through a flood of ids that each spoke once (first come, first kept hid it for good)
            kinds = self._fleet.pop(dev, None)
            if kinds is None and len(self._fleet) >= MAX_DEVICES:
                gone = next(iter(self._fleet))
                del self._fleet[gone]
                self._instances.pop(gone, None)
                self.forgotten += 1
            self._fleet[dev] = kinds = kinds or {}
            kinds[kind] = payload
            if isinstance(inst, str):
                live = self._instances.setdefault(dev, {})
                if kind == "status" and payload.get("state") == "offline":
                    live.pop(inst, None)
                else:
                    live[inst] = now
                if len(live) > 64:  # a process per message (forged): keep those heard lately
                    stale = [k for k, t in live.items() if now - t >= INSTANCE_TTL_S]
                    for k in stale or sorted(live, key=lambda k: live[k])[:-64]:
                        del live[k]
        if self._on_message:
            self._on_message(dev, kind, payload)

    def _skip(self, why: str) -> None:
        with self._lock:
            self.skipped[why] = self.skipped.get(why, 0) + 1

    def __enter__(self) -> FleetSubscriber:
        try:
            self._client.connect(self.url.host, self.url.port, keepalive=10)
        except (OSError, ValueError) as exc:
            # a broker signed by the fleet's own CA is the usual case, and the system's CAs refuse it
            why = "check --mqtt and that the broker is running"
            if isinstance(exc, ssl.SSLCertVerificationError):
                why = (
                    "give the CA that signed its certificate: mqtts://HOST:PORT?ca=FILE"
                    if self.url.ca is None
                    else f"its certificate must be signed by the CA in {self.url.ca!r} and name the host "
                    "the URL gives"
                )
            raise SplitPointError(
                f"cannot reach the MQTT broker at {self.url.host}:{self.url.port} ({exc}); {why}"
            ) from exc
        self._client.loop_start()
        if not self._connected.wait(5):
            self.__exit__()
            raise SplitPointError(
                f"the MQTT broker at {self.url.host}:{self.url.port} did not accept the connection "
                "and subscription within 5 s" + self.url.closed_hint()
            )
        if self._refused is not None:
            self.__exit__()
            raise SplitPointError(f"the MQTT broker at {self.url.host}:{self.url.port} {self._refused}")
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.loop_stop()
        self._client.disconnect()

    def snapshot(self) -> Fleet:
        """Latest payload per device and kind, and ``instances``: how many processes published under the
        device's id in the last INSTANCE_TTL_S (more than one: two devices were given the same id, and
        each one's status overwrites the other's)."""
        now = time.monotonic()
        with self._lock:
            out = Fleet({dev: dict(kinds) for dev, kinds in self._fleet.items()})
            out.forgotten, out.kept, out.skipped = self.forgotten, MAX_DEVICES, dict(self.skipped)
            for dev, live in self._instances.items():
                if dev in out:
                    out[dev]["instances"] = sum(now - t < INSTANCE_TTL_S for t in live.values())
            return out


def collect(url: str, seconds: float = 2.5) -> Fleet:
    """What the fleet reports within ``seconds`` (retained status arrives at once)."""
    with FleetSubscriber(url) as sub:
        time.sleep(seconds)
        return sub.snapshot()


def watch(
    url: str, show: Callable[[dict[str, dict], float | None], None], seconds: float = 0, every: float = 0.25
) -> None:
    """Call ``show`` with the fleet and when the broker connection was lost (None: connected) every
    ``every`` seconds, for ``seconds`` (0 = until interrupted)."""
    end = time.monotonic() + (seconds or float("inf"))
    with FleetSubscriber(url) as sub:
        while time.monotonic() < end:
            show(sub.snapshot(), sub.lost_since)
            time.sleep(every)
        show(sub.snapshot(), sub.lost_since)
