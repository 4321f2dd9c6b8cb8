"""The orchestrator: push plans to servers and edge daemons, and read the fleet's telemetry."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import zmq

from splitpoint.core import wire
from splitpoint.core.errors import SplitPointError
from splitpoint.core.plan import PLAN_FILE, Plan
from splitpoint.core.telemetry import TOPIC_ROOT, BrokerURL


def deploy(plan_dir: str | Path, endpoint: str, timeout_s: float = 30.0) -> str:
    """Send a plan (plan.json and the files it lists) and wait for the peer to acknowledge it."""
    plan = Plan.load(plan_dir)
    d = Path(plan_dir)
    names = [PLAN_FILE, *plan.files]
    frames = [(d / n).read_bytes() for n in names]
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
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


def collect(url: str, seconds: float = 1.5, on_message=None) -> dict[str, dict]:
    """Subscribe to every device's topics for ``seconds``; latest payload per device and kind."""
    import paho.mqtt.client as mqtt

    b = BrokerURL.parse(url)
    fleet: dict[str, dict] = {}
    lock = threading.Lock()
    connected = threading.Event()

    def on_msg(client, userdata, m) -> None:
        parts = m.topic.split("/")
        if len(parts) != 3:
            return
        try:
            payload = json.loads(m.payload)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return
        with lock:
            fleet.setdefault(parts[1], {})[parts[2]] = payload
        if on_message:
            on_message(parts[1], parts[2], payload)

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"splitpoint-watch-{id(fleet):x}")
    b.apply(c)
    c.on_connect = lambda *a: (c.subscribe(f"{TOPIC_ROOT}/+/+"), connected.set())
    c.on_message = on_msg
    try:
        c.connect(b.host, b.port, keepalive=10)
    except OSError as exc:
        raise SplitPointError(f"cannot reach the MQTT broker at {url}: {exc}") from exc
    c.loop_start()
    try:
        connected.wait(5)
        time.sleep(seconds)
    finally:
        c.loop_stop()
        c.disconnect()
    return fleet
