"""The orchestrator: push plans to servers and edge daemons, and read the fleet's telemetry."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import zmq

from splitpoint.core import wire
from splitpoint.core.endpoints import check_endpoint
from splitpoint.core.errors import ConfigError, SplitPointError
from splitpoint.core.plan import PLAN_FILE, Plan
from splitpoint.core.telemetry import TOPIC_ROOT, BrokerURL


def deploy(
    plan_dir: str | Path,
    endpoint: str,
    timeout_s: float = 30.0,
    role: str = "server",
    curve_server_key: bytes | None = None,
    curve_keypair: tuple[bytes, bytes] | None = None,
) -> str:
    """Send a plan (plan.json and the files ``role`` holds: a server its tail, an edge its head and the
    whole model for fallback, if the plan carries it) and wait for the peer to acknowledge it.
    Against a CurveZMQ server, ``curve_keypair`` must be a key on its deploy allow-list."""
    try:
        check_endpoint(endpoint)
    except ValueError as exc:
        raise ConfigError(f"--server/--edge: {exc}") from exc
    plan = Plan.load(plan_dir)
    d = Path(plan_dir)
    names = [PLAN_FILE, *sorted(plan.files_for(role))]
    frames = [(d / n).read_bytes() for n in names]
    ctx: zmq.Context = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if curve_server_key:
        public, secret = curve_keypair or zmq.curve_keypair()
        s.curve_serverkey, s.curve_publickey, s.curve_secretkey = curve_server_key, public, secret
    try:
        s.connect(endpoint)
        s.send_multipart(
            wire.Message(wire.DEPLOY, 1, plan.plan_id, meta={"files": names}, frames=frames).to_frames()
        )
        if not s.poll(int(timeout_s * 1000)):
            raise SplitPointError(
                f"{endpoint} did not acknowledge plan {plan.plan_id[:12]} within {timeout_s:g} s"
            )
        reply = wire.parse(s.recv_multipart())
    finally:
        s.close(0)
    if reply.type == wire.ERROR:
        raise SplitPointError(f"{endpoint} refused plan {plan.plan_id[:12]}: {reply.meta.get('message')}")
    if reply.type != wire.DEPLOYED or reply.plan != plan.plan_id:
        raise SplitPointError(f"{endpoint} answered {reply.type} for plan {reply.plan[:12] or '?'}")
    return plan.plan_id


INSTANCE_TTL_S = 10.0  # devices publish metrics every 2 s: a process not heard for this long is gone


class FleetSubscriber:
    """Every device's telemetry topics, latest payload per device and kind, kept while inside ``with``.

    Connecting happens on entry and fails there, with one clear error, when the broker cannot be reached."""

    def __init__(self, url: str, on_message: Callable[[str, str, dict], None] | None = None):
        import paho.mqtt.client as mqtt

        self.url = BrokerURL.parse(url)
        self._fleet: dict[str, dict] = {}
        self._instances: dict[str, dict[str, float]] = {}  # per device: process -> when last heard
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._on_message = on_message
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"splitpoint-watch-{id(self):x}")
        self.url.apply(c)
        c.connect_timeout = 3.0  # an unreachable host fails within seconds, not the OS's minutes
        c.on_connect = self._on_connect
        c.on_message = self._on_msg
        self._client = c

    def _on_connect(self, client, userdata, flags, reason, properties=None) -> None:
        client.subscribe(f"{TOPIC_ROOT}/+/+")
        self._connected.set()

    def _on_msg(self, client, userdata, m) -> None:
        parts = m.topic.split("/")
        if len(parts) != 3:
            return
        try:
            payload = json.loads(m.payload)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return
        if not isinstance(payload, dict):
            return
        inst = payload.get("instance")
        with self._lock:
            self._fleet.setdefault(parts[1], {})[parts[2]] = payload
            if isinstance(inst, str):
                live = self._instances.setdefault(parts[1], {})
                if parts[2] == "status" and payload.get("state") == "offline":
                    live.pop(inst, None)
                else:
                    live[inst] = time.monotonic()
        if self._on_message:
            self._on_message(parts[1], parts[2], payload)

    def __enter__(self) -> FleetSubscriber:
        try:
            self._client.connect(self.url.host, self.url.port, keepalive=10)
        except (OSError, ValueError) as exc:
            raise SplitPointError(
                f"cannot reach the MQTT broker at {self.url.host}:{self.url.port} ({exc}); "
                "check --mqtt and that the broker is running"
            ) from exc
        self._client.loop_start()
        if not self._connected.wait(5):
            self.__exit__()
            raise SplitPointError(
                f"the MQTT broker at {self.url.host}:{self.url.port} did not accept the connection"
            )
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.loop_stop()
        self._client.disconnect()

    def snapshot(self) -> dict[str, dict]:
        """Latest payload per device and kind, and ``instances``: how many processes published under the
        device's id in the last INSTANCE_TTL_S (more than one: two devices were given the same id, and
        each one's status overwrites the other's)."""
        now = time.monotonic()
        with self._lock:
            out = {dev: dict(kinds) for dev, kinds in self._fleet.items()}
            for dev, live in self._instances.items():
                out.setdefault(dev, {})["instances"] = sum(now - t < INSTANCE_TTL_S for t in live.values())
            return out


def collect(url: str, seconds: float = 1.5) -> dict[str, dict]:
    """What the fleet reports within ``seconds`` (retained status arrives at once)."""
    with FleetSubscriber(url) as sub:
        time.sleep(seconds)
        return sub.snapshot()


def watch(url: str, show: Callable[[dict[str, dict]], None], seconds: float = 0, every: float = 0.25) -> None:
    """Call ``show`` with the fleet every ``every`` seconds, for ``seconds`` (0 = until interrupted)."""
    end = time.monotonic() + (seconds or float("inf"))
    with FleetSubscriber(url) as sub:
        while time.monotonic() < end:
            show(sub.snapshot())
            time.sleep(every)
        show(sub.snapshot())
