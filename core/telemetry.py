"""MQTT telemetry for both sides: status (retained, last will ``offline``), metrics, latency.

Telemetry must never slow inference: paho's network loop runs in its own thread, connecting
is asynchronous (a dead broker only means dropped messages), the outgoing queue is bounded and
every drop is counted, and per-request latency is rate-limited. paho-mqtt does not set
TCP_NODELAY, which stalls small QoS-0 messages by ~40 ms (Nagle + delayed ACK): we set it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import urlparse

import psutil
from pydantic import AfterValidator

from splitpoint.core.textfiles import dumps_strict

log = logging.getLogger("splitpoint.core.telemetry")

TOPIC_ROOT = "splitpoint"
# the broker password of a URL that names a user and no password (a systemd EnvironmentFile, mode 600)
PASSWORD_ENV = "SPLITPOINT_MQTT_PASSWORD"


@dataclass(frozen=True)
class BrokerURL:
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca: str | None = None  # mqtts: the CA that signed the broker's certificate (else the system's CAs)
    cert: str | None = None  # mqtts: this client's certificate and key, for a broker that asks for one
    key: str | None = None

    @classmethod
    def parse(cls, url: str) -> BrokerURL:
        """``mqtt[s]://[user[:password]@]host[:port][?ca=FILE&cert=FILE&key=FILE]``; a user or password
        holding ``@ : / # ?`` is written percent-encoded (``p%40ss``), as in any URL. A user without a
        password takes it from ``$SPLITPOINT_MQTT_PASSWORD``, where ``ps`` does not show it. ``ca``: a
        fleet's broker is most often signed by the fleet's own CA, which no system trusts; ``cert`` and
        ``key``: a broker that asks clients for certificates. Errors show the URL with its password hidden:
        they reach logs and the journal."""
        from urllib.parse import unquote

        from .errors import SplitPointError

        shown = redact_url(url)
        full = url if "://" in url else f"mqtt://{url}"
        base, query = _split_query(full)
        try:
            u = urlparse(base)
        except ValueError as exc:  # an unclosed [ of an IPv6 host
            raise SplitPointError(f"MQTT URL {shown!r}: not a URL (an IPv6 host is written [::1])") from exc
        if u.scheme not in ("mqtt", "mqtts", "tcp"):
            raise SplitPointError(f"MQTT URL must be mqtt://host:port or mqtts://host:port, got {shown!r}")
        if "@" in u.path + u.query + u.fragment:  # a password's / # ? cut the URL short before its host
            raise SplitPointError(
                f"MQTT URL {shown!r}: a user or password holding '/', '#' or '?' is written percent-encoded "
                "(%2F, %23, %3F)"
            )
        if u.query or u.fragment or u.path.strip("/"):
            raise SplitPointError(
                f"MQTT URL {shown!r}: after the host and port it takes only ?ca=FILE&cert=FILE&key=FILE"
            )
        tls = u.scheme == "mqtts"
        files = _tls_files(query, tls, shown)
        try:
            port = u.port  # urllib raises here for a port out of range or not a number
        except ValueError as exc:  # its words quote what follows the ':', which may be the password
            raise SplitPointError(f"MQTT URL {shown!r}: the port must be a number from 0 to 65535") from exc
        user = unquote(u.username) if u.username is not None else None
        password = unquote(u.password) if u.password is not None else None
        if user and password is None:  # kept off the command line, which every user of the machine reads
            password = os.environ.get(PASSWORD_ENV)
        return cls(u.hostname or "127.0.0.1", port or (8883 if tls else 1883), user, password, tls, **files)

    def closed_hint(self) -> str:
        """Why a broker may close a connection before accepting it, for what this URL gives."""
        if self.tls and self.cert is None:
            return " (a broker that asks clients for certificates takes &cert=FILE&key=FILE)"
        if not self.tls:
            return " (a TLS listener takes mqtts://)"
        return ""

    def apply(self, client) -> None:
        """Credentials and TLS on a paho client: publishers and subscribers connect alike."""
        if self.username:
            client.username_pw_set(self.username, self.password)
        if self.tls:
            client.tls_set(
                ca_certs=self.ca, certfile=self.cert, keyfile=self.key, cert_reqs=ssl.CERT_REQUIRED
            )


def _split_query(url: str) -> tuple[str, str | None]:
    """The URL before its ``?ca=...`` query, and the query (None: none). The query starts at the first
    ``?ca=``, ``?cert=`` or ``?key=``: a path in it may hold an ``@`` (``ca=/home/u@corp/ca.pem``), which
    URL parsing took for the credentials' end; any other ``?`` (a password's unencoded one, ``pa?x=1@host``)
    is no query's start, so the password stays hidden, and is refused by the caller."""
    m = re.search(r"\?(?=(?:ca|cert|key)=)", url)
    return (url, None) if m is None else (url[: m.start()], url[m.end() :])


def _tls_files(query: str | None, tls: bool, shown: str) -> dict[str, str]:
    """The ``ca``, ``cert`` and ``key`` of a broker URL's query, each loaded here as TLS will load it: paho
    loads them when the client is made, where a file that is no certificate, a key that is not the
    certificate's, or one with a passphrase (which it asks for on the terminal) stopped the command with
    OpenSSL's words alone. A path is percent-decoded (``%26`` for ``&``, ``%23`` for ``#``, ``%25`` for
    ``%``); ``+`` is a plus, not a space."""
    from urllib.parse import unquote

    from .errors import SplitPointError

    files: dict[str, str] = {}
    for pair in (query or "").split("&"):
        if not pair:
            continue  # an empty query (host?) or a trailing &
        name, eq, value = pair.partition("=")
        if not eq:
            raise SplitPointError(f"MQTT URL {shown!r}: its query is not name=value pairs joined by &")
        if name not in ("ca", "cert", "key"):
            raise SplitPointError(f"MQTT URL {shown!r}: unknown option {name!r} (it takes ca, cert and key)")
        if not tls:
            raise SplitPointError(f"MQTT URL {shown!r}: {name}= is for TLS; write mqtts://")
        if not value or name in files:
            raise SplitPointError(f"MQTT URL {shown!r}: give {name}= one file")
        path = unquote(value)
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise SplitPointError(f"MQTT URL {shown!r}: {name} file {path!r}: {exc.strerror}") from exc
        files[name] = path
    if ("cert" in files) != ("key" in files):
        raise SplitPointError(f"MQTT URL {shown!r}: a client certificate takes both cert= and key=")
    _load_tls_files(files, shown)
    return files


class _Passphrase(Exception):
    pass


def _no_passphrase() -> bytes:
    raise _Passphrase  # asked for: the key is encrypted (OpenSSL would ask on the terminal)


def _load_tls_files(files: dict[str, str], shown: str) -> None:
    """Each file loaded as TLS will load it, or SplitPointError naming the file and what is wrong."""
    from .errors import SplitPointError

    try:
        ctx = ssl.create_default_context(cafile=files.get("ca"))
    except ssl.SSLError as exc:
        raise SplitPointError(
            f"MQTT URL {shown!r}: ca file {files['ca']!r} holds no PEM certificate OpenSSL reads ({exc})"
        ) from exc
    if "cert" not in files:
        return
    cert, key = files["cert"], files["key"]
    try:
        ctx.load_cert_chain(cert, key, password=_no_passphrase)
    except _Passphrase:
        raise SplitPointError(
            f"MQTT URL {shown!r}: key file {key!r} is encrypted, and a daemon has no one to type its "
            "passphrase: give the key unencrypted (openssl pkey -in KEY -out KEY2), readable by its user "
            "alone"
        ) from None
    except ssl.SSLError as exc:
        why = (
            "the key is not this certificate's"
            if exc.reason == "KEY_VALUES_MISMATCH"
            else "a PEM certificate and its PEM private key are expected"
        )
        raise SplitPointError(f"MQTT URL {shown!r}: cert {cert!r} and key {key!r}: {why} ({exc})") from exc


def redact_url(url: str) -> str:
    """The URL with its password as ``***``: what may be printed."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    rest, query = _split_query(rest)  # a file's path there may hold an @
    tail = "" if query is None else f"?{query}"
    creds, at, host = rest.rpartition("@")
    if not at:
        return url
    # a password's / # ? ends urllib's host early, but never the credentials here: all before the last @
    user = creds.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}{tail}" if ":" in creds else url


def check_broker_url(url: str) -> str:
    """The URL unchanged if ``BrokerURL.parse`` takes it, else ValueError (a config names the option)."""
    from .errors import SplitPointError

    try:
        BrokerURL.parse(url)
    except SplitPointError as exc:
        raise ValueError(str(exc)) from exc
    return url


BrokerUrl = Annotated[str, AfterValidator(check_broker_url)]


STATUS_EVERY_S = 10.0  # a device's status is published again, unchanged, this often (with its metrics)
METRIC_UNITS = {  # what a metrics message's figures are, named in its ``units``
    "cpu_percent": "% of the host's cores, every process (measured; null where no clock tick passed)",
    "process_cpu_percent": "% of one core, this process (measured)",
    "memory_used_bytes": "B, the host's (measured)",
    "memory_total_bytes": "B, the host's",
    "process_rss_bytes": "B, this process (measured)",
    "temperature_c": "degC, the hottest sensor (measured; null without one)",
    "bandwidth_mbps_est": "Mbit/s, the uplink (derived from this edge's own requests)",
    "rtt_ms_est": "ms, the round trip (derived: the median of recent pings)",
    "rtt_ms_est_age_s": "s since the ping the round trip comes from",
    "decoder_cache_mib": "MiB, the decoder sessions' KV caches",
}
# latency figures that are the rest of the total, not timed themselves: named in the message's ``derived``
LATENCY_DERIVED = {
    "edge_wait_ms": "total_ms less every other part: waiting on the edge and its runtime",
    "network_ms": "the edge's round trip less the server's own total: the link both ways and the sockets",
}
# a latency message's figures that are not milliseconds
LATENCY_UNITS = {"bytes_sent": "B"}


def topic(device_id: str, kind: str) -> str:
    return f"{TOPIC_ROOT}/{device_id}/{kind}"


def busy_percent(before: Any, after: Any) -> float | None:
    """The share of the host's CPU time that was busy between two readings, as psutil counts it (guest
    time is inside user time; idle and I/O wait are idle); None where no clock tick passed between them,
    where psutil answers 0.0."""
    delta = {f: max(0.0, getattr(after, f) - getattr(before, f)) for f in after._fields}
    total = sum(v for f, v in delta.items() if f not in ("guest", "guest_nice"))
    if total <= 0:
        return None
    idle = delta.get("idle", 0.0) + delta.get("iowait", 0.0)
    return round(100.0 * max(0.0, total - idle) / total, 1)


class CpuMeter:
    """The host's and this process's CPU over one publisher's own periods, from its start to its first
    message and then between messages. psutil's ``cpu_percent(interval=None)`` keeps its last reading per
    calling thread (7.x) or per process (5.x): a publisher primed on its creator's thread and sending
    from its socket thread measured 0.0 in its first message, and two publishers in one process
    measured each other's periods. So each keeps its own readings."""

    def __init__(self) -> None:
        self._proc = psutil.Process()
        self._proc.cpu_percent(interval=None)  # the first call measures nothing: this one is the start
        self._last = psutil.cpu_times()

    def read(self) -> dict:
        now = psutil.cpu_times()
        system, self._last = busy_percent(self._last, now), now
        return {"cpu_percent": system, "process_cpu_percent": self._proc.cpu_percent(interval=None)}

    def rss(self) -> int:
        return int(self._proc.memory_info().rss)


def host_metrics(cpu: CpuMeter) -> dict:
    """CPU, memory and temperature of this machine, and this process's CPU and RSS, measured now (the
    CPU figures over the time since ``cpu``'s last reading)."""
    vm = psutil.virtual_memory()
    temp = None
    try:
        temps = [e.current for v in (psutil.sensors_temperatures() or {}).values() for e in v if e.current]
        temp = max(temps) if temps else None
    except (AttributeError, OSError):
        pass
    return {
        **cpu.read(),
        "memory_used_bytes": vm.used,
        "memory_total_bytes": vm.total,
        "process_rss_bytes": cpu.rss(),
        "temperature_c": temp,
    }


class Telemetry:
    """One device's publisher. Methods return immediately whether or not a broker is reachable."""

    def __init__(
        self,
        device_id: str,
        role: str,
        url: str,
        max_queued: int = 1000,
        latency_per_s: float = 20.0,
        status_every_s: float = STATUS_EVERY_S,
    ):
        import paho.mqtt.client as mqtt

        self.device_id, self.role = device_id, role
        # which process speaks: two devices started with one --device-id share every topic, and a
        # subscriber tells them apart (and that they collide) by this
        self.instance = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        self.url = BrokerURL.parse(url)
        self.dropped = 0  # messages that could not be handed to the broker (none connected, a full queue)
        self.sampled_out = 0  # latency samples past the rate limit, left out on purpose (not lost)
        self.sent = 0
        self._latency_gap = 1.0 / latency_per_s if latency_per_s > 0 else 0.0
        self._last_latency = 0.0
        self._lock = threading.Lock()
        self.connected = threading.Event()
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"splitpoint-{role}-{device_id}-{id(self):x}"
        )
        c.max_queued_messages_set(max_queued)
        c.will_set(
            topic(device_id, "status"),
            json.dumps(self._envelope(state="offline")),
            qos=1,
            retain=True,
        )
        self.url.apply(c)
        c.on_socket_open = self._nodelay
        c.on_connect = lambda *a: self._on_connect(*a)
        c.on_disconnect = lambda *a: self._on_disconnect()
        c.on_connect_fail = lambda *a: self._connect_failed()
        self._warned: str | None = None  # why, once per outage and reason, not once per retry
        self._answered = False  # the broker answered this connection's CONNECT
        self._closing = False
        c.reconnect_delay_set(1, 5)
        self._client = c
        self._status: tuple[str, dict] | None = None
        self._status_every_s, self._status_at = status_every_s, 0.0
        self._status_lock = threading.Lock()
        c.connect_async(self.url.host, self.url.port, keepalive=10)
        c.loop_start()
        self._cpu = CpuMeter()  # the first metrics message measures the CPU since now

    @staticmethod
    def _nodelay(client, userdata, sock) -> None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _connect_failed(self) -> None:
        """paho calls this inside its ``except``, and passes no error: read from there, a certificate
        refused says so, and how to trust it, not that the broker is unreachable."""
        exc = sys.exc_info()[1]
        if isinstance(exc, ssl.SSLCertVerificationError):
            why = f"has a certificate this client does not trust ({exc.verify_message})"
            self._unreachable(why + ("" if self.url.ca else ": give its CA, mqtts://HOST:PORT?ca=FILE"))
        elif isinstance(exc, ssl.SSLError):
            self._unreachable(f"failed the TLS handshake ({exc.reason})")
        else:
            self._unreachable("is unreachable")

    def _unreachable(self, why: str) -> None:
        if why != self._warned:  # a new reason is news (a broker back up that now refuses this client)
            self._warned = why
            log.warning(
                "telemetry: the MQTT broker at %s:%s %s; inference goes on, its telemetry is dropped "
                "until the broker answers",
                self.url.host,
                self.url.port,
                why,
            )

    def _on_disconnect(self) -> None:
        if self.connected.is_set() and not self._closing:
            self.connected.clear()
            self._unreachable("dropped the connection")
        elif not self._closing and not self._answered:  # closed with no answer to CONNECT: no CONNACK
            self._unreachable("closed the connection before accepting it" + self.url.closed_hint())
        self._answered = False

    def _on_connect(self, client, userdata, flags, reason, properties=None) -> None:
        self._answered = True  # the broker answered (accepted or refused): its answer is the news
        if getattr(reason, "is_failure", False):
            self._unreachable(f"refused the connection ({reason})")
            return
        if self._warned:
            log.warning("telemetry: the MQTT broker at %s:%s answers again", self.url.host, self.url.port)
        self._warned = None
        self.connected.set()
        self._status_again(due_only=False)  # re-assert the retained status after a reconnect

    def _envelope(self, **fields: object) -> dict:
        """What every message from this device carries: who sent it (device, role, the process) and
        ``fields``."""
        return {"device": self.device_id, "role": self.role, "instance": self.instance, **fields}

    def _publish(self, kind: str, payload: dict, qos: int = 0, retain: bool = False) -> bool:
        import paho.mqtt.client as mqtt

        try:
            body = dumps_strict(self._envelope(ts=time.time(), **payload), default=_jsonable)
        except (ValueError, TypeError, RecursionError):  # what JSON cannot hold: lost, counted, not raised
            with self._lock:
                self.dropped += 1
            return False
        try:
            info = self._client.publish(topic(self.device_id, kind), body, qos=qos, retain=retain)
        except (ValueError, RuntimeError, OSError):
            info = None
        with self._lock:
            if info is None or info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                self.dropped += 1
                return False
            # not connected: paho keeps a QoS 1 message and sends it on connecting (counted as dropped, the
            # broker had it); one of QoS 0 is gone
            if info.rc == mqtt.MQTT_ERR_NO_CONN and not self.connected.is_set() and qos == 0:
                self.dropped += 1
                return False
            self.sent += 1
        return True

    def status(self, state: str, extra: dict | None = None) -> None:
        with self._status_lock:  # stored and sent as one: a re-send of the old one cannot land after it
            self._status = (state, extra or {})
            self._send_status()

    def _status_again(self, due_only: bool) -> None:
        """The latest status sent again (``due_only``: if ``status_every_s`` has passed since it was)."""
        with self._status_lock:
            if self._status and (not due_only or time.monotonic() - self._status_at >= self._status_every_s):
                self._send_status()

    def _send_status(self) -> None:
        """The stored status, retained (the caller holds ``_status_lock``)."""
        assert self._status is not None
        if not self.connected.is_set():
            # kept, and sent on connecting (``_on_connect``): queued in paho, it went out after the newer
            # one sent there, and the broker retained the older state
            return
        self._status_at = time.monotonic()
        state, extra = self._status
        self._publish("status", {"state": state, **extra}, qos=1, retain=True)

    def metrics(self, extra: dict | None = None) -> None:
        """The metrics message; and every ``status_every_s`` the status again, unchanged: a view that let
        this device's id go (a flood of forged ids) or missed its status gets it back within that time,
        where a status sent only on change left the device's state unknown for as long as it held."""
        payload = {**host_metrics(self._cpu), **(extra or {})}
        self._publish(
            "metrics",
            {
                **payload,
                "telemetry_dropped": self.dropped,
                "latency_sampled_out": self.sampled_out,
                "units": {k: u for k, u in METRIC_UNITS.items() if k in payload},
            },
        )
        self._status_again(due_only=True)

    def switch(self, event: dict) -> bool:
        """An edge moved to another member of its plan set (from, to, the estimate that moved it)."""
        return self._publish("switch", event, qos=1)

    def latency(self, breakdown: dict) -> bool:
        """One request's breakdown (ms, measured); rate-limited, the excess counted apart from messages
        lost (``sampled_out``: a healthy broker read 162 of 205 requests as "dropped")."""
        now = time.monotonic()
        with self._lock:
            if now - self._last_latency < self._latency_gap:
                self.sampled_out += 1
                return False
            self._last_latency = now
        derived = {k: v for k, v in LATENCY_DERIVED.items() if k in breakdown}
        return self._publish(
            "latency",
            {
                "unit": "ms",
                "units": {k: u for k, u in LATENCY_UNITS.items() if k in breakdown},
                "measured": True,
                **breakdown,
                **({"derived": derived} if derived else {}),
            },
        )

    def close(self, timeout: float = 1.0) -> None:
        self._closing = True  # the disconnect below is ours: not an outage to warn about
        try:
            if self.connected.is_set():
                info = self._client.publish(
                    topic(self.device_id, "status"),
                    json.dumps(self._envelope(state="offline", ts=time.time())),
                    qos=1,
                    retain=True,
                )
                info.wait_for_publish(timeout)
        except (ValueError, RuntimeError, OSError):
            pass
        self._client.disconnect()
        self._client.loop_stop()


def _jsonable(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:
        pass
    return str(o)
