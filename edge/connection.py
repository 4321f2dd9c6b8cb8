"""The edge's one DEALER socket to the server, usable from any thread that holds its lock.

ZeroMQ sockets are not thread-safe, but a socket may be used by one thread after another when a lock
orders them. So a thread that wants to send takes the lock and sends itself (no hand-off to another
thread), and a thread waiting for its own reply may receive it itself. Between requests, the client's
background thread waits on the socket's file descriptor (``ZMQ_FD``, plain ``poll`` on it touches no
libzmq state) and takes the lock only when something arrived.

``ZMQ_FD`` is edge-triggered: it only signals new activity. Whoever holds the lock therefore drains
every message waiting before letting go (``_drain_locked``), so no reply is left behind unsignalled.

Liveness comes from ZeroMQ itself: ZMTP heartbeats (``ZMQ_HEARTBEAT_IVL``/``_TIMEOUT``) drop a dead
connection, and a monitor socket reports handshakes and disconnects to the background thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

from splitpoint.core import endpoints, wire
from splitpoint.core.curve import HANDSHAKE_FAILED

from .config import EdgeConfig

_POLLIN, _NOBLOCK = int(zmq.POLLIN), int(zmq.NOBLOCK)  # plain ints: pyzmq's enums cost microseconds
UP_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED
DOWN_EVENTS = zmq.EVENT_DISCONNECTED | HANDSHAKE_FAILED


class Connection:
    def __init__(self, ctx: zmq.Context, config: EdgeConfig, on_message: Callable[[list], None]):
        self._ctx, self._config = ctx, config
        self._sock, self.monitor, self.fd = self._open()
        self.lock = threading.Lock()
        self._on_message = on_message
        self.closed = False

    def _open(self) -> tuple[zmq.Socket, zmq.Socket, int]:
        """A new DEALER to the server, its monitor socket and its ``ZMQ_FD``."""
        config = self._config
        # silence after a ping drops the connection, but not before a request could be answered: on a slow
        # uplink the ping waits behind the payloads queued there (bounded by --timeout, past which the
        # client sends none), and at dead_after_s alone a queue of two 49 KB requests on a link of a few
        # hundred kbit/s dropped a live connection with both in flight
        s = wire.dealer(
            self._ctx,
            config.max_message_bytes,
            config.heartbeat_s,
            max(config.dead_after_s, config.timeout_s),
            config.dead_after_s,
        )
        if config.curve_server_key:
            public, secret = config.curve_keypair or zmq.curve_keypair()
            s.curve_serverkey, s.curve_publickey, s.curve_secretkey = config.curve_server_key, public, secret
        monitor = s.get_monitor_socket(UP_EVENTS | DOWN_EVENTS)
        endpoints.connect(s, config.server)
        return s, monitor, int(s.getsockopt(zmq.FD))

    def reopen(self) -> None:
        """Dial again on a new socket: libzmq never does after a refused handshake (``curve.GAVE_UP``).
        The caller registers the new ``monitor`` and ``fd`` wherever it watched the old ones. The new one
        is made before the old one goes: where it cannot be (no file descriptor left), ZMQError, and the
        connection stays as it was, to be tried again."""
        with self.lock:
            if self.closed:
                return
            opened = self._open()
            self._close_locked()
            self._sock, self.monitor, self.fd = opened

    def send(self, frames: list, before: Callable[[], None] | None = None) -> bool:
        """Send now, from this thread; False when no server is connected (nothing is queued then).
        ``before`` runs holding the socket, just before the send: a ping's clock starts there, not
        while another thread holds the socket waiting for its own reply."""
        with self.lock:
            if self.closed:
                return False
            if before is not None:
                before()
            try:
                wire.send(self._sock, frames, _NOBLOCK)
                sent = True
            except zmq.Again:
                sent = False
            self._drain_locked()
        return sent

    def receive(self, wait_s: float = 0.0, lock_wait: float | None = None) -> None:
        """Take the lock (waiting at most ``lock_wait``, default ``wait_s``), wait up to ``wait_s`` for a
        message, and hand every waiting message to ``on_message``. A thread that wants its reply calls
        this instead of idling."""
        if not self.lock.acquire(timeout=max(wait_s if lock_wait is None else lock_wait, 0.0)):
            return
        try:
            if self.closed:
                return
            if wait_s > 0:
                zmq.zmq_poll([(self._sock, _POLLIN)], int(wait_s * 1000))
            self._drain_locked()
        finally:
            self.lock.release()

    def _drain_locked(self) -> None:
        for frames in wire.drain(self._sock):
            self._on_message(frames)

    def monitor_events(self) -> list[int]:
        """Connection events since the last call (the background thread's, which owns the monitor)."""
        events = []
        for _ in range(1000):
            try:
                events.append(recv_monitor_message(self.monitor, zmq.NOBLOCK)["event"])
            except zmq.Again:
                break
        return events

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self._close_locked()
            self._on_message = _ignore  # the owner's bound method: no cycle keeps a closed client alive

    def _close_locked(self) -> None:
        self._sock.disable_monitor()
        self.monitor.close(0)
        self._sock.close(0)


def _ignore(frames: list) -> None:
    """What a closed connection does with a message (it reads none)."""
