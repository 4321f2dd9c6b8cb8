"""The tail server: a ZeroMQ ROUTER that runs plan tails for many edge clients at once, or, as a relay,
one middle stage of a chain of devices.

One thread owns the ROUTER socket (ZeroMQ sockets are not thread-safe). With one worker (the default,
right for a CPU server where onnxruntime's own threads parallelise each run) that thread also decodes,
runs the tail and encodes: no hand-off between threads on the request path. With more workers a pool
does that work and hands replies back over an inproc socket. Deploys are loaded on a thread of their
own, so a large model never holds up pings or requests.

A relay (``--stage I --next ENDPOINT``) runs its stage on the socket thread, sends what crosses the next
cut to the next stage over its own DEALER, and answers the request when the next stage answers, adding
the model outputs it computed and its own stage times. Requests it forwarded are bounded by
``max_queue`` like any others; each one is answered exactly once: with the next stage's result or error,
or ``unavailable`` when the next stage disconnects or stays silent past ``next_timeout_s``.

Every message is handled under its own ``try``: a malformed or hostile one gets an error reply with a
code from ``docs/protocol.md`` and the loop goes on. Requests waiting for a tail are bounded
(``max_queue``); past it a request is answered ``busy``. If the socket thread dies anyway, ``run()``
raises, so ``splitpoint serve`` exits non-zero and its supervisor restarts it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq
from zmq.utils.monitor import parse_monitor_message

from splitpoint.core import endpoints, wire
from splitpoint.core.codecs import CodecError, CodecTooLarge, decode, encode
from splitpoint.core.curve import GAVE_UP, HANDSHAKE_FAILED, Redial, handshake_refused
from splitpoint.core.endpoints import ipc_in_use
from splitpoint.core.errors import PlanError, SplitPointError, describe, os_reason
from splitpoint.core.handoff import Handoff
from splitpoint.core.runner import (
    Expect,
    StageRunner,
    input_shapes,
    mismatch,
    output_expects,
    stage_shapes,
    symbol_conflict,
)
from splitpoint.core.signals import stop_on_signals
from splitpoint.core.telemetry import Telemetry

from .config import ServerConfig
from .registry import Entry, PlanRegistry
from .sessions import STALLED_S, DecoderSessions, Key

log = logging.getLogger("splitpoint.server")
RCVHWM = 1000  # messages ZeroMQ queues per peer before TCP pushes back (replies, a relay's sends)
# requests libzmq holds per client before TCP pushes back on it: above any window a client keeps in flight
# (the planner's go to 32), and what bounds the memory a flooding client takes beside --max-queue's
PEER_RCVHWM = 64
MAX_HIDDEN_ITEMSIZE = 8  # a decoder step's hidden states decode to float32 (float64 at most)
# a relay's requests queued towards the next stage: over a slow hop each waits behind these, and a full
# queue answers busy. With 1000, a backed-up 2 MB/s hop held 400 MB of requests already answered as
# timed out, and refused every new one for two minutes after the load had gone
NEXT_SNDHWM = 64
# ... and what bounds it: requests forwarded and not yet answered. ZeroMQ's limit counts only what it has
# not handed to TCP: with small cut tensors the kernel's buffers took another 190, 256 held in all
MAX_FORWARDED = NEXT_SNDHWM


class ServerFailed(SplitPointError):
    """The socket thread died: the process must exit non-zero so that its supervisor restarts it."""

    exit_code = 1


@dataclass
class Stats:
    """Counters shared by the socket thread and the workers; change them only through ``add``."""

    requests: int = 0  # answered with a result
    errors: int = 0  # requests answered with an error
    rejected: int = 0  # messages refused before reaching a tail (malformed, unknown plan, busy)
    busy: int = 0
    in_flight: int = 0  # admitted, not yet answered
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for k, v in deltas.items():
                setattr(self, k, getattr(self, k) + v)

    # the request path's two changes, without add's keyword loop (a few microseconds per request)
    def admitted(self) -> None:
        with self._lock:
            self.in_flight += 1

    def answered(self, ok: bool) -> None:
        with self._lock:
            self.in_flight -= 1
            if ok:
                self.requests += 1
            else:
                self.errors += 1

    def snapshot(self) -> dict:
        with self._lock:
            return {k: getattr(self, k) for k in ("requests", "errors", "rejected", "busy", "in_flight")}


_CLOSE_FLUSH_S = 0.1


@dataclass
class _Request:
    ident: Any
    msg: wire.Message
    entry: Entry
    t_recv: float


@dataclass
class _Forward:
    """A request a relay sent on to the next stage: what it needs to answer upstream when that answers."""

    ident: Any
    id: int  # the upstream request's id
    plan: str
    stage: int
    t_recv: float
    t_sent: float
    deadline: float
    names: list[str]  # model outputs computed at this stage, returned with the reply
    frames: list  # their payloads
    timing: dict  # this stage's own times (ms)
    sizes: dict  # the request's symbolic dimensions (the batch N): their sizes, and the tensor that gave them


MAX_STAGES_META = 16  # stage timings a relay passes upstream (one per stage after the edge)
MAX_STAGE_KEYS = 16  # figures in each (a stage reports 8)
_NOBLOCK = int(zmq.NOBLOCK)
# how long the socket thread reads and handles requests before it passes on the workers' finished replies
_READ_PASS_S = 0.005


def _start_authenticator(ctx: zmq.Context) -> Any:
    """A ZAP authenticator on ``ctx``. Its handler binds one fixed inproc name per context, and
    libzmq releases a closed socket's inproc name a moment later (its reaper thread): a server that
    stops and another that starts at once on the same context would find the name still taken."""
    from zmq.auth.thread import ThreadAuthenticator

    end = time.monotonic() + 2.0
    while True:
        auth = ThreadAuthenticator(ctx)
        try:
            auth.start()
            return auth
        except zmq.ZMQError as exc:
            with contextlib.suppress(Exception):
                auth.stop()
            if exc.errno != zmq.EADDRINUSE or time.monotonic() > end:
                raise
            time.sleep(0.02)


def _stage_times(reported: dict) -> dict:
    """A later stage's timings as this relay passes them upstream: numbers under short names, a few of
    them. Passed as they came, a next stage's legal header (64 KiB of padding, 16 levels of nesting)
    made this relay's own reply one that no client may accept."""
    kept = {
        k: v
        for k, v in reported.items()
        if isinstance(k, str)
        and len(k) <= 32
        and isinstance(v, int | float)
        and not isinstance(v, bool)
        and math.isfinite(v)
    }
    return dict(list(kept.items())[:MAX_STAGE_KEYS])


class TailServer:
    def __init__(self, config: ServerConfig, registry: PlanRegistry | None = None):
        self.config = config
        self._own_registry = registry is None  # its models are let go at stop(); a caller's stay its own
        self.registry = registry or PlanRegistry(
            config.plans_dir, config.threads, config.provider, config.stage
        )
        self.stats = Stats()
        self.endpoint: str | None = None
        self.fatal: BaseException | None = None
        self._stop = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._ctx: zmq.Context = zmq.Context.instance()
        self._replies = Handoff(self._ctx, f"inproc://splitpoint-replies-{id(self)}")
        self._inline: deque[_Request] = deque()  # workers == 1: requests the socket thread runs itself
        self._pool = (
            ThreadPoolExecutor(config.workers, thread_name_prefix="splitpoint-tail")
            if config.workers > 1
            else None
        )
        self._deployer = ThreadPoolExecutor(1, thread_name_prefix="splitpoint-deploy")
        self._auth: Any = None
        self._next: zmq.Socket | None = None  # a relay's DEALER to the next stage
        self._next_grace_until = 0.0  # monotonic time until which a send may wait for its connection
        # forwards waiting for that first connection (id, frames): the socket thread never waits for it
        self._parked: list[tuple[int, list]] = []
        self._next_monitor: zmq.Socket | None = None
        self._next_up = False  # the relay's next stage: connected (its handshake done), as the monitor says
        self._fwd: dict[int, _Forward] = {}  # forwarded, by the id they carry to the next stage
        self._draining = False  # stopping: requests taken are answered, new ones refused
        self._said_refused = False  # the next stage's refusal of this relay's handshake, logged once
        self._redial = Redial()  # a new socket to the next stage after libzmq gave up on one (GAVE_UP)
        # given to the pool, reply not yet queued back (by id(request)): the drain waits for them, and
        # at its end answers those still there; a worker's result for one answered so is dropped
        self._in_pool: dict[int, tuple[_Request, Future]] = {}
        self._pool_lock = threading.Lock()
        self._fwd_ids = itertools.count(1)
        self.role = "relay" if config.next else "server"
        self.telemetry = Telemetry(config.device_id, self.role, config.mqtt) if config.mqtt else None
        self.sessions = DecoderSessions(
            config.max_sessions, int(config.max_cache_mb * 2**20), config.session_idle_s
        )
        # the routing ids that stepped a decoder session, by the file descriptor of their connection: a
        # connection's sessions go when it closes (no one else can take them over, and vanished clients
        # do not hold the server's session slots until they expire)
        self._session_peers: dict[int, set[bytes]] = {}
        self._router_events: zmq.Socket | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> TailServer:
        """Bind (in the caller's thread, so a busy port or a bad endpoint fails here, at once) and serve.
        Once per object: a stopped server's pools are gone (a second start returned, served nothing
        and said nothing), and a running one's reply socket is taken."""
        if self._thread is not None or self._stopped:
            state = "stopped" if self._stopped else "running"
            raise SplitPointError(
                f"this server was started already and is {state}: a new TailServer serves again"
            )
        router = wire.router(self._ctx)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes)  # per frame; parse() caps the total
        router.setsockopt(zmq.RCVHWM, PEER_RCVHWM)
        router.setsockopt(zmq.SNDHWM, self.config.max_unread_replies)
        if self.config.curve:
            self._enable_curve(router)
        try:
            if ipc_in_use(self.config.bind):  # libzmq would bind over it, leaving that process deaf
                raise zmq.ZMQError(zmq.EADDRINUSE)
            endpoints.bind(router, self.config.bind)
        except zmq.ZMQError as exc:
            router.close(0)
            if self._auth is not None:
                self._auth.stop()
            hint = (
                " (another process listens there; choose another --bind)"
                if exc.errno == zmq.EADDRINUSE
                else ""
            )
            raise SplitPointError(f"cannot bind {self.config.bind}: {exc.strerror}{hint}") from exc
        replies = self._replies.bind()
        self._router_events = router.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        if self.config.next is not None:
            self._connect_next()
        self.endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._thread = threading.Thread(
            target=self._loop, args=(router, replies), name="splitpoint-server", daemon=True
        )
        self._thread.start()
        self._status()
        return self

    def run(self) -> None:
        """Serve until SIGTERM or SIGINT, then stop: what ``splitpoint serve`` and a supervisor run.
        Raises ServerFailed if the socket thread died."""
        with stop_on_signals(self._stop.set):
            self.start()
            log.info("serving %d plan(s) on %s", len(self.registry.ids()), self.endpoint)
            while not self._done.wait(0.5):
                pass
        self.stop()
        if self.fatal is not None:
            raise ServerFailed(f"the server's socket thread died: {type(self.fatal).__name__}: {self.fatal}")
        log.info("stopped")

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving: new requests are refused (unavailable) while those taken are answered, for up
        to ``drain_s``; any still held then are answered unavailable. ``timeout``: how much longer than
        the drain to wait for the socket thread."""
        # a deploy under way finishes (and its acknowledgement is sent) before the socket thread stops:
        # stopped first, the server installed the plan and left the operator told it did not answer
        self._stopped = True
        self._deployer.shutdown(wait=True, cancel_futures=True)
        self._stop.set()
        if self._thread:
            self._thread.join(timeout + self.config.drain_s)
        if self._auth is not None:
            self._auth.stop()
        if self._pool:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._deployer.shutdown(wait=True, cancel_futures=True)
        if self.telemetry:
            self._publish_metrics()  # the last counts: a short run's were never reported
            self.telemetry.close()
        if self._thread is None or not self._thread.is_alive():
            # the models and KV caches go now: an application that keeps the stopped server (an
            # attribute) kept a model per restart (18 MB each for MobileNetV2)
            self.sessions.clear()
            if self._own_registry:
                self.registry.clear()

    def _send_next(self, fid: int, frames: list, runner: StageRunner) -> bool:
        """Send onwards without queueing; False when parked. Just after start (within
        ``next_connect_grace_s``), before the first connection to the next stage, a request is parked and
        goes when that connection comes (``_flush_parked``), or fails at the grace's end: the socket thread
        never waits, so pings and other plans are answered meanwhile. Once the stage has been connected, a
        request fails at once when it is not: a stage that is gone must not hold requests (each gets an
        explicit ``unavailable``)."""
        assert self._next is not None
        if not self._next_up and time.monotonic() < self._next_grace_until:
            self._parked.append((fid, frames))
            return False
        try:
            wire.send(self._next, frames, _NOBLOCK)
        except zmq.Again:
            if self._next_up:  # connected, its queue full: the hop is slower than the requests
                raise wire.WireError(
                    wire.E_BUSY,
                    f"stage {runner.index + 1} ({self.config.next}): the link to it is backed up "
                    f"(more than {NEXT_SNDHWM} requests queued); retry later",
                ) from None
            raise wire.WireError(
                wire.E_UNAVAILABLE, f"stage {runner.index + 1} ({self.config.next}) is not connected"
            ) from None
        return True

    def _flush_parked(self, router: zmq.Socket) -> None:
        """Send the parked forwards once the next stage is connected, each with its full ``--next-timeout``
        from then; at the grace's end without a connection, fail them."""
        now = time.monotonic()
        if not self._next_up and now < self._next_grace_until:
            return
        parked, self._parked = self._parked, []
        for fid, frames in parked:
            fwd = self._fwd.pop(fid, None)
            if fwd is None:  # expired meanwhile, and answered
                continue
            if not self._next_up or self._next is None:
                self._fail_forwarded(router, fwd, "is not connected")
                continue
            try:
                wire.send(self._next, frames, _NOBLOCK)
            except zmq.Again:
                self._fail_forwarded(router, fwd, "is not connected")
                continue
            sent = time.perf_counter()  # re-entered last: deadlines stay in the order _expire reads them
            fwd.t_sent, fwd.deadline = sent, sent + self.config.next_timeout_s
            self._fwd[fid] = fwd

    def _connect_next(self) -> None:
        """The relay's DEALER to the next stage: no queueing towards a stage that is not connected
        (a request then fails at once, explicitly), ZMTP heartbeats, and a monitor for disconnects."""
        c = self.config
        s = wire.dealer(self._ctx, c.max_message_bytes, c.heartbeat_s, c.dead_after_s, c.dead_after_s)
        # one above the forwarded limit, which is the one that binds: libzmq's own count refused the 64th
        # large request (63 taken behind a stalled stage), whose busy reply then said 64
        s.setsockopt(zmq.SNDHWM, NEXT_SNDHWM + 1)
        if c.next_curve_server_key:
            secret = c.curve_secret_key
            public, secret = (zmq.curve_public(secret), secret) if secret else zmq.curve_keypair()
            s.curve_serverkey, s.curve_publickey, s.curve_secretkey = c.next_curve_server_key, public, secret
        monitor = s.get_monitor_socket(
            zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | HANDSHAKE_FAILED
        )
        assert c.next is not None
        endpoints.connect(s, c.next)
        self._next, self._next_monitor = s, monitor
        self._next_grace_until = time.monotonic() + c.next_connect_grace_s

    def _status(self) -> None:
        if self.telemetry:
            status: dict[str, Any] = {"endpoint": self.endpoint, "plans": self.registry.ids()}
            if self.config.next:  # a relay: whether it can forward at all, which "online" alone hid
                status |= {"next": self.config.next, "next_up": self._next_up}
            self.telemetry.status("online", status)

    def _enable_curve(self, sock: zmq.Socket) -> None:
        """CurveZMQ encryption; with an allow-list only those client keys (and the deploy keys) connect."""
        from zmq.auth import CURVE_ALLOW_ANY

        secret = self.config.curve_secret_key
        assert secret is not None
        self._auth = _start_authenticator(self._ctx)
        if self.config.curve_allow:
            allowed = _AllowList([*self.config.curve_allow, *self.config.deploy_allow])
            self._auth.configure_curve_callback(domain="*", credentials_provider=allowed)
        else:
            self._auth.configure_curve(domain="*", location=CURVE_ALLOW_ANY)
        sock.curve_secretkey = secret
        sock.curve_publickey = zmq.curve_public(secret)
        sock.curve_server = True

    # -- the socket thread ---------------------------------------------------------------------
    def _loop(self, router: zmq.Socket, replies: zmq.Socket) -> None:
        try:
            self._serve(router, replies)
        except BaseException as exc:  # recorded: run() turns it into a non-zero exit
            self.fatal = exc
            log.critical("the server's socket thread died", exc_info=exc)
        finally:
            if self._router_events is not None:
                router.disable_monitor()
                self._router_events.close(0)
            # replies made while stopping (a deploy's acknowledgement) go out: up to a second to send them
            with contextlib.suppress(zmq.ZMQError):
                for frames in wire.drain(replies):
                    wire.send(router, frames, _NOBLOCK)
                # and what came in as the loop ended is refused, not left for the client's timeout
                for frames in wire.drain(router, limit=4 * RCVHWM):
                    self._refuse_late(router, frames)
            if self._draining and self.fatal is None:
                # a ROUTER closed right after its last sends lost the last of them despite its linger
                # (the final answer of a drain, one run in three): a moment for the I/O thread first
                time.sleep(_CLOSE_FLUSH_S)
            router.close(1000 if self.fatal is None else 0)
            replies.close(0)
            self._close_next()
            self._done.set()

    def _close_next(self) -> None:
        self._close_sockets(self._next, self._next_monitor)
        self._next = self._next_monitor = None

    @staticmethod
    def _close_sockets(nxt: zmq.Socket | None, monitor: zmq.Socket | None) -> None:
        if nxt is not None:
            with contextlib.suppress(zmq.ZMQError):
                nxt.disable_monitor()
            nxt.close(0)
        if monitor is not None:
            monitor.close(0)

    def _serve(self, router: zmq.Socket, replies: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(replies, zmq.POLLIN)
        if self._router_events is not None:  # drained as events come, so none is read long after it
            poller.register(self._router_events, zmq.POLLIN)
        nxt, monitor = self._next, self._next_monitor
        if nxt is not None and monitor is not None:
            poller.register(nxt, zmq.POLLIN)
            poller.register(monitor, zmq.POLLIN)
        next_metrics = time.monotonic()
        drain_until: float | None = None
        ran = (time.monotonic(), time.process_time())  # the loop's last turn: wall clock, CPU spent
        while True:
            if self._stop.is_set():
                # stopping: what was taken is answered (new requests are refused meanwhile, as
                # unavailable), for up to --drain; what is left then is told so, not dropped unanswered
                now = time.monotonic()
                if drain_until is None:
                    drain_until = now + self.config.drain_s
                    self._draining = True
                    if self.stats.in_flight:
                        log.info("stopping: answering the %d request(s) taken", self.stats.in_flight)
                    else:
                        log.info("stopping: nothing in flight")
                held = self.stats.in_flight or self._in_pool or self._inline or self._fwd or self._parked
                if not held or now >= drain_until:
                    self._refuse_held(router)
                    break
            events = dict(poller.poll(0 if self._inline else 50 if self._fwd or self._draining else 100))
            if replies in events:
                for frames in wire.drain(replies):
                    wire.send(router, frames)
            if nxt is not None and nxt in events:
                for frames in wire.drain(nxt, limit=4 * RCVHWM):
                    self._on_next(router, frames)
            if monitor is not None and monitor in events:
                self._on_next_events(router, monitor)
            if self._redial.due(time.monotonic()):
                try:  # the new socket first: where none can be had now, the old one stays
                    self._connect_next()
                except zmq.ZMQError as exc:
                    log.warning("cannot open a new connection to the next stage yet: %s", exc)
                    self._redial.retry(time.monotonic())
                else:
                    self._redial.dialled()
                    poller.unregister(nxt)
                    poller.unregister(monitor)
                    self._close_sockets(nxt, monitor)
                    self._next_grace_until = 0.0  # the grace was the first connection's
                    nxt, monitor = self._next, self._next_monitor
                    poller.register(nxt, zmq.POLLIN)
                    poller.register(monitor, zmq.POLLIN)
            if self._session_peers or self._router_events in events:
                # before any message: a connection's close is reported before its descriptor can be
                # reused, so a new connection on the same descriptor never loses its sessions to it
                self._on_router_events()
            if router in events:
                # bounded in count and in time, so that queued requests and the workers' replies are
                # served between bursts: a decoder step runs here, and 300 queued prefill steps (37 ms
                # each) held a finished reply 4 s
                until = time.perf_counter() + _READ_PASS_S
                for frames in wire.drain(router, limit=4 * RCVHWM):
                    self._on_message(router, frames)
                    if time.perf_counter() > until:
                        break
            if self._inline:
                reply = self._work(self._inline.popleft())
                if reply is not None:
                    self._answer(router, reply)
            if self._parked:
                self._flush_parked(router)
            if self._fwd:
                self._expire(router, time.perf_counter())
            # a turn far longer than its wait for messages (0.1 s at most) and the CPU it spent: the process
            # did not run (SIGSTOP, a suspended machine), which is no decoder session's idleness, while
            # work however long is. Looked at before the sweep, after a resumed client's step was read
            now, cpu = time.monotonic(), time.process_time()
            if (stopped := (now - ran[0]) - (cpu - ran[1]) - 0.1) > STALLED_S and len(self.sessions):
                self.sessions.stalled(stopped)
            ran = (now, cpu)
            if self.sessions.due:
                self.sessions.sweep()
            if self.telemetry and time.monotonic() >= next_metrics:
                next_metrics = time.monotonic() + self.config.metrics_interval_s
                self._publish_metrics()

    def _publish_metrics(self) -> None:
        if self.telemetry:
            self.telemetry.metrics(
                {
                    **self.stats.snapshot(),
                    "plans": len(self.registry.ids()),
                    "decoder_sessions": len(self.sessions),
                    "decoder_cache_mib": self.sessions.cache_bytes / 2**20,
                    "decoder_sessions_expired": self.sessions.expired,
                }
            )

    def _refuse_late(self, router: zmq.Socket, frames: list) -> None:
        if len(frames) < 2:
            return
        err = wire.best_effort_error(frames[1:], wire.E_UNAVAILABLE, "the server is stopping")
        wire.send(router, [frames[0], *err.to_frames()], _NOBLOCK)

    def _refuse_held(self, router: zmq.Socket) -> None:
        """At the drain's end: the requests still held are answered unavailable (a client then falls
        back or fails at once), not left to its timeout."""
        # (request, whether its count ends here): a request a worker is running is counted by it
        held = [(req, True) for req in self._inline]
        self._inline.clear()
        with self._pool_lock:  # the pool's: a queued one is cancelled, a running one's result dropped
            pooled, self._in_pool = list(self._in_pool.values()), {}
        held += [(req, fut.cancel()) for req, fut in pooled]
        lost = list(self._fwd.values())
        self._fwd, self._parked = {}, []
        if held or lost:
            log.warning("stopping: %d request(s) not answered within --drain", len(held) + len(lost))
        for req, counted_here in held:
            if counted_here:
                self.stats.answered(False)
            err = wire.error(
                req.msg.id, wire.E_UNAVAILABLE, f"the {self.role} stopped before answering it", req.msg.plan
            )
            with contextlib.suppress(zmq.ZMQError):
                self._send(router, req.ident, err)
        for fwd in lost:
            with contextlib.suppress(zmq.ZMQError):
                self._fail_forwarded(router, fwd, "the relay stopped before it answered")

    def _on_router_events(self) -> None:
        """Free the decoder sessions of connections that closed."""
        assert self._router_events is not None
        for ev in wire.drain(self._router_events):
            try:
                fd = int(parse_monitor_message([bytes(wire.buffer(f)) for f in ev])["value"])
            except Exception:  # a monitor message of another shape: nothing to free
                continue
            for peer in self._session_peers.pop(fd, ()):
                n = self.sessions.drop_peer(peer, fd)
                if n:
                    log.debug("freed %d decoder session(s) of a closed connection", n)

    def _on_message(self, router: zmq.Socket, frames: list) -> None:
        """Never raises: whatever a message does, the loop goes on."""
        if len(frames) < 2:
            self.stats.add(rejected=1)
            return  # nothing to answer: no identity and message
        ident, body = frames[0], frames[1:]
        try:
            self._handle(router, ident, body)
        except Exception as exc:  # a bug met by one message: answer it, log it, keep serving
            log.exception("failed to handle a message")
            self.stats.add(rejected=1)
            reply = wire.best_effort_error(body, wire.E_INTERNAL, describe(exc))
            with contextlib.suppress(zmq.ZMQError):
                router.send_multipart([ident, *reply.to_frames()], copy=False)

    def _send(self, router: zmq.Socket, ident: Any, msg: wire.Message) -> None:
        wire.send(router, [ident, *msg.to_frames()])

    def _deliver(self, router: zmq.Socket, ident: Any, msg: wire.Message) -> bool:
        """Send, and say whether the sender's connection is still there to take it: False only when
        libzmq knows no peer under that routing id (``ZMQ_ROUTER_MANDATORY``, on for this send alone). A
        full queue towards a peer that does not read drops the reply as every other send does."""
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        try:
            wire.send(router, [ident, *msg.to_frames()], _NOBLOCK)
        except zmq.Again:
            pass
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                return False
            raise
        finally:
            router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        return True

    def _handle(self, router: zmq.Socket, ident: Any, body: list) -> None:
        t_recv = time.perf_counter()
        try:
            msg = wire.parse(body, self.config.max_message_bytes)
        except wire.WireError as exc:
            self.stats.add(rejected=1)
            self._send(router, ident, wire.best_effort_error(body, exc.code, str(exc)))
            return
        if msg.type == wire.PING:
            meta = {
                "plans": self.registry.ids(),
                "workers": self.config.workers,
                "in_flight": self.stats.in_flight,
                "role": self.role,
                "stage": self.config.stage,
            }
            self._send(router, ident, wire.Message(wire.PONG, msg.id, meta=meta))
        elif msg.type == wire.DEPLOY:
            if not self._may_deploy(body[0]):
                self.stats.add(rejected=1)
                why = f"this key is not on the {self.role}'s deploy allow-list (--deploy-allow)"
                log.warning("refused a deploy of plan %s: %s", msg.plan[:12] or "?", why)
                self._send(router, ident, wire.error(msg.id, wire.E_UNAUTHORIZED, why, msg.plan))
                return
            try:
                self._deployer.submit(self._deploy, ident, msg)
            except RuntimeError:  # stopping: the deploy thread takes no more
                self._send(router, ident, wire.error(msg.id, wire.E_BUSY, "the server is stopping", msg.plan))
        elif msg.type == wire.INFER:
            self._admit(router, ident, msg, t_recv)
        elif msg.type in (wire.STEP, wire.CLOSE):
            reply, key = self._session_message(ident, msg, t_recv)
            if not self._deliver(router, ident, reply) and key is not None:
                # its connection closed before the step was read (libzmq still hands over what it had
                # received): nobody can continue the session, which would otherwise hold its place and
                # cache until --session-idle, one per such client
                peer, fd = key[0], key[1]
                if self.sessions.close(key):
                    self.sessions.dropped += 1
                    log.debug("freed the decoder session of a step whose connection had closed")
                held = self._session_peers.get(fd) if fd is not None else None
                if fd is not None and held is not None and not self.sessions.holds(peer, fd):
                    held.discard(peer)  # its close was seen before this step: nothing is left to free
                    if not held:
                        del self._session_peers[fd]
        else:
            self.stats.add(rejected=1)
            self._send(
                router,
                ident,
                wire.error(msg.id, wire.E_BAD_MESSAGE, f"a server does not accept {msg.type!r}", msg.plan),
            )

    def _may_deploy(self, header: Any) -> bool:
        """Without CurveZMQ the bind is loopback or the operator chose --insecure; with it, only the
        keys of the deploy allow-list may deploy (ZAP sets each frame's User-Id to the client's key)."""
        if not self.config.curve:
            return True
        try:
            user = header.get("User-Id")
        except (zmq.ZMQError, AttributeError):
            return False
        allowed = {
            k.decode() if isinstance(k, bytes) else k for k in _AllowList(self.config.deploy_allow).keys
        }
        return user in allowed

    def _admit(self, router: zmq.Socket, ident: Any, msg: wire.Message, t_recv: float) -> None:
        entry = self.registry.get(msg.plan)
        if entry is None or entry.runner is None:
            self.stats.add(rejected=1)
            why = "unknown plan" if entry is None else "plan runs entirely on the edge"
            err = wire.error(msg.id, wire.E_UNKNOWN_PLAN, f"{why}: {msg.plan[:16] or '(none)'}", msg.plan)
            self._send(router, ident, err)
            return
        if entry.plan.decoder is not None:
            self.stats.add(rejected=1)
            why = f"plan {msg.plan[:16]} is a decoder: its requests are step messages of a session"
            self._send(router, ident, wire.error(msg.id, wire.E_BAD_MESSAGE, why, msg.plan))
            return
        if not entry.runner.last and self._next is None:
            self.stats.add(rejected=1)
            i = entry.runner.index
            why = f"this server runs stage {i} of plan {msg.plan[:16]}, which goes on to stage {i + 1}: "
            why += "it has no --next"
            self._send(router, ident, wire.error(msg.id, wire.E_UNAVAILABLE, why, msg.plan))
            return
        if self._draining:  # an explicit answer at once: the client falls back (or fails) now
            self.stats.add(rejected=1)
            err = wire.error(msg.id, wire.E_UNAVAILABLE, "the server is stopping", msg.plan)
            self._send(router, ident, err)
            return
        # --max-queue bounds the requests waiting for a tail: those the workers run are not waiting (counted
        # among them, --workers 2 --max-queue 1 ran one request and left a worker idle)
        if self.stats.in_flight >= self.config.max_queue + self.config.workers:
            self.stats.add(rejected=1, busy=1)
            why = (
                f"{self.stats.in_flight} requests taken and not answered yet (the limit is "
                f"{self.config.max_queue} waiting beyond the {self.config.workers} the workers run)"
            )
            self._send(router, ident, wire.error(msg.id, wire.E_BUSY, why, msg.plan))
            return
        self.stats.admitted()
        req = _Request(ident, msg, entry, t_recv)
        if self._pool is None:
            self._inline.append(req)
        else:
            with self._pool_lock:  # held until recorded: a worker done at once waits for it to look
                self._in_pool[id(req)] = (req, self._pool.submit(self._pooled, req))

    # -- decoder sessions: on the socket thread, so each session's steps run in order ----------
    def _session_message(
        self, ident: Any, msg: wire.Message, t_recv: float
    ) -> tuple[wire.Message, Key | None]:
        """The reply to a step or a close, and the session a step that was answered holds (None for a
        close or a refusal): never raises. A step that reached its session counts as a request
        (answered, or an error); one refused before it as rejected."""
        admitted = False
        try:
            session, position, top_k = wire.step_fields(msg)
            entry = self.registry.get(msg.plan)
            if entry is None or entry.runner is None or entry.plan.decoder is None:
                code = wire.E_UNKNOWN_PLAN if entry is None or entry.runner is None else wire.E_BAD_MESSAGE
                why = "unknown plan" if entry is None else "not a decoder plan"
                raise wire.WireError(code, f"{why}: {msg.plan[:16] or '(none)'}")
            peer = bytes(wire.buffer(ident))
            fd = None
            with contextlib.suppress(
                zmq.ZMQError, AttributeError, TypeError
            ):  # a frame that knows its socket
                fd = int(ident.get(zmq.SRCFD))
                self._session_peers.setdefault(fd, set()).add(peer)
            # the connection is part of the key: a later connection that gets a routing id an earlier
            # one used (once that one closed) reaches none of the sessions the earlier one left
            key = (peer, fd, msg.plan, session)
            if msg.type == wire.CLOSE:
                known = self.sessions.close(key)
                closed = wire.Message(wire.CLOSED, msg.id, msg.plan, meta={"session": session, "held": known})
                return closed, None
            if self._draining and key not in self.sessions:  # a generation under way goes on; none begins
                raise wire.WireError(wire.E_UNAVAILABLE, "the server is stopping: it starts no new session")
            self.stats.admitted()
            admitted = True
            reply = self._step(entry, key, msg, position, top_k, t_recv)
            self.stats.answered(True)
            return reply, key
        except (wire.WireError, CodecError) as exc:
            reply = wire.error(msg.id, exc.code, str(exc), msg.plan)
        except Exception as exc:  # a failing tail (or a bug) answers this step and no other
            log.exception("step %s failed", msg.id)
            reply = wire.error(msg.id, wire.E_INTERNAL, describe(exc), msg.plan)
        if admitted:
            self.stats.answered(False)
        else:
            self.stats.add(rejected=1)
        return reply, None

    def _step(
        self, entry: Entry, key: tuple, msg: wire.Message, position: int, top_k: int, t_recv: float
    ) -> wire.Message:
        dec, seg = entry.plan.decoder, entry.segment
        assert dec is not None and seg is not None
        t0 = time.perf_counter()
        # the session first: a step for one the server does not hold is unknown-session, whatever its
        # position (a step past the model's positions for an expired session read as session-limit, and
        # a client following the error table shortened its sequence instead of starting again)
        s = self.sessions.begin(key, position, seg.empty_past())
        if position >= dec.max_len:
            raise wire.WireError(
                wire.E_SESSION_LIMIT, f"position {position} is past the model's {dec.max_len} positions"
            )
        # a step holds at most the positions left: its header's claim is checked against that before a
        # byte is decompressed (the message cap, 256 MiB, let a 52 KB zstd step cost 0.8 s and 0.5 GB)
        room = (dec.max_len - position) * dec.hidden * MAX_HIDDEN_ITEMSIZE
        cap = self.config.max_message_bytes
        try:
            # and never more than --max-message-mb, which caps every tensor decoded (a decoder's steps
            # were held only to the positions left, past the operator's chosen limit)
            (hidden,) = self._decode(msg, entry, min(room, cap)).values()
        except CodecTooLarge as exc:
            if cap < room:
                raise wire.WireError(wire.E_TOO_LARGE, str(exc)) from None
            raise wire.WireError(
                wire.E_SESSION_LIMIT,
                f"a step at position {position} carries at most {dec.max_len - position} token(s) of "
                f"{dec.hidden} values: {exc}",
            ) from exc
        if hidden.shape[0] != 1 or hidden.shape[1] < 1:
            raise wire.WireError(wire.E_BAD_TENSOR, f"a step carries [1, new tokens >= 1, {dec.hidden}]")
        if not np.isfinite(hidden).all():  # no decoder's hidden state holds one: the cache would keep it
            raise wire.WireError(wire.E_BAD_TENSOR, "a step's hidden states hold NaN or infinity")
        new = int(hidden.shape[1])
        if position + new > dec.max_len:
            raise wire.WireError(
                wire.E_SESSION_LIMIT,
                f"position {position} + {new} new token(s) passes the model's {dec.max_len} positions",
            )
        t1 = time.perf_counter()
        out = dict(zip(seg.outputs, seg.sess.run(seg.outputs, seg.feeds(hidden, s.past)), strict=True))
        t2 = time.perf_counter()
        last = out[seg.main_out][0, -1]
        if not np.isfinite(last).all():  # argmax of NaN scores is token 0, sent as if it were chosen
            raise wire.WireError(
                wire.E_INTERNAL,
                f"the model's next-token scores at position {position + new - 1} are not finite (NaN or "
                "infinity); the step is not kept",
            )
        self.sessions.commit(key, s, {k: v for k, v in out.items() if k.startswith("present.")}, new)
        names, frames = ["next_token"], [encode(np.array([int(last.argmax())], np.int64), "float32")]
        if top_k:
            ids = np.argsort(-last, kind="stable")[:top_k].astype(np.int64)
            names += ["top_k_ids", "top_k_logits"]
            frames += [encode(ids, "float32"), encode(last[ids].astype(np.float32), "float32")]
        t3 = time.perf_counter()
        server = {
            "stage": entry.runner.index if entry.runner else 0,
            "queue_ms": 0.0,
            "decode_ms": (t1 - t0) * 1e3,
            "tail_ms": (t2 - t1) * 1e3,
            "encode_ms": (t3 - t2) * 1e3,
            "total_ms": (t3 - t_recv) * 1e3,
        }
        meta = {"server": server, "session": key[-1], "position": s.length}
        return wire.Message(wire.RESULT, msg.id, msg.plan, names, meta=meta, frames=frames)

    # -- work: the socket thread itself (one worker) or the pool ------------------------------
    def _pooled(self, req: _Request) -> None:
        frames = None
        try:
            frames = self._work(req)  # never None: a relay runs inline (workers 1)
        finally:
            with self._pool_lock:
                # answered unavailable already (the drain ended): this result goes nowhere
                mine = self._in_pool.get(id(req), (None,))[0] is req
                # never block a worker: once the socket thread is gone (stop) a send would wait forever
                if mine and frames is not None and not self._replies.send(frames, block=False):
                    log.warning("server stopping: reply dropped")
                self._in_pool.pop(id(req), None)  # its reply is queued for the socket thread

    def _answer(self, router: zmq.Socket, frames: list) -> None:
        wire.send(router, frames)

    def _work(self, req: _Request) -> list | None:
        """Decode, run the stage, encode: the reply's frames (identity first), or None when the request
        went on to the next stage (the reply comes when that answers). Never raises."""
        msg = req.msg
        try:
            runner = req.entry.runner
            assert runner is not None
            if not runner.last:
                self._forward(req, runner)
                return None
            reply = self._result(req)
            self.stats.answered(True)
        except (wire.WireError, CodecError) as exc:
            reply = wire.error(msg.id, exc.code, str(exc), msg.plan)
            self.stats.answered(False)
        except Exception as exc:  # a failing tail (or a bug) answers this request and no other
            log.exception("request %s failed", msg.id)
            reply = wire.error(msg.id, wire.E_INTERNAL, describe(exc), msg.plan)
            self.stats.answered(False)
        return [req.ident, *reply.to_frames()]

    def _result(self, req: _Request) -> wire.Message:
        t0 = time.perf_counter()
        feeds = self._decode(req.msg, req.entry)
        t1 = time.perf_counter()
        runner = req.entry.runner
        assert runner is not None
        _, out = _run_stage(runner, feeds)
        t2 = time.perf_counter()
        names = list(out)
        frames = [encode(out[n], self.config.reply_codec) for n in names]
        t3 = time.perf_counter()
        server = {
            "stage": runner.index,
            "queue_ms": (t0 - req.t_recv) * 1e3,
            "decode_ms": (t1 - t0) * 1e3,
            "tail_ms": (t2 - t1) * 1e3,
            "encode_ms": (t3 - t2) * 1e3,
            "total_ms": (t3 - req.t_recv) * 1e3,
        }
        return wire.Message(
            wire.RESULT, req.msg.id, req.msg.plan, names, meta={"server": server}, frames=frames
        )

    # -- a relay: on to the next stage, and back ----------------------------------------------
    def _forward(self, req: _Request, runner: StageRunner) -> None:
        """Run this stage and send what crosses the next cut on; raises WireError if it cannot go."""
        assert self._next is not None
        if self._next_up and len(self._fwd) >= MAX_FORWARDED:  # before this stage's work is spent on it
            raise wire.WireError(
                wire.E_BUSY,
                f"stage {runner.index + 1} ({self.config.next}): {len(self._fwd)} requests wait for its "
                "answer; retry later",
            )
        t0 = time.perf_counter()
        feeds = self._decode(req.msg, req.entry)
        t1 = time.perf_counter()
        sends, outs = _run_stage(runner, feeds)
        t2 = time.perf_counter()
        sizes: dict[str, tuple[int, str]] = {}  # the next stage's answer must keep the request's batch
        symbol_conflict(feeds, stage_shapes(req.entry.plan, runner.index), sizes)
        names = list(sends)
        frames = [encode(sends[n], runner.stage.codec) for n in names]
        own = list(outs)
        own_frames = [encode(outs[n], self.config.reply_codec) for n in own]
        t3 = time.perf_counter()
        fid = next(self._fwd_ids)
        # Clocked before the send: a thread preempted right after it would otherwise report the
        # next stage as faster than that stage's own clock says.
        t_sent = time.perf_counter()
        out = wire.Message(wire.INFER, fid, req.msg.plan, names, frames=frames).to_frames()
        sent = self._send_next(fid, out, runner)
        # parked: its deadline counts from the grace's end at the latest (reset when it is sent)
        wait = 0.0 if sent else max(0.0, self._next_grace_until - time.monotonic())
        timing = {
            "queue_ms": (t0 - req.t_recv) * 1e3,
            "decode_ms": (t1 - t0) * 1e3,
            "tail_ms": (t2 - t1) * 1e3,
            "encode_ms": (t3 - t2) * 1e3,
            "bytes_sent": sum(len(f) for f in frames),
        }
        self._fwd[fid] = _Forward(
            req.ident,
            req.msg.id,
            req.msg.plan,
            runner.index,
            req.t_recv,
            t_sent,
            t_sent + wait + self.config.next_timeout_s,
            own,
            own_frames,
            timing,
            sizes,
        )

    def _on_next(self, router: zmq.Socket, frames: list) -> None:
        """A message from the next stage: the answer to a forwarded request goes upstream. Never raises."""
        try:
            self._answer_forwarded(router, frames)
        except Exception:  # one bad reply fails its request only
            log.exception("a reply from the next stage could not be handled")
            fwd = self._fwd.pop(wire.best_effort_id(frames), None)
            if fwd is not None:
                self._fail_forwarded(router, fwd, "its reply could not be handled")

    def _answer_forwarded(self, router: zmq.Socket, frames: list) -> None:
        try:
            msg = wire.parse(frames, self.config.max_message_bytes)
        except wire.WireError as exc:
            fwd = self._fwd.pop(wire.best_effort_id(frames), None)
            if fwd is not None:
                self._fail_forwarded(router, fwd, f"it answered with a malformed message: {exc}")
            return
        if msg.type == wire.PONG:
            return
        fwd = self._fwd.pop(msg.id, None)
        if fwd is None:
            return  # answered already (it timed out)
        if msg.type == wire.ERROR:
            code = str(msg.meta.get("code", wire.E_INTERNAL))
            code = code if code in wire.ERROR_CODES else wire.E_INTERNAL
            text = f"stage {fwd.stage + 1}: {str(msg.meta.get('message', ''))[:900]}"
            self.stats.answered(False)
            self._send(router, fwd.ident, wire.error(fwd.id, code, text, fwd.plan))
            return
        if msg.type != wire.RESULT or set(msg.tensors) & set(fwd.names):
            self._fail_forwarded(router, fwd, f"it answered {msg.type} with tensors {msg.tensors[:8]}")
            return
        wrong = self._misfit(fwd, msg)
        if wrong is not None:
            self._fail_forwarded(router, fwd, f"its result does not fit the plan: {wrong}")
            return
        now = time.perf_counter()
        own = {**fwd.timing, "stage": fwd.stage, "next_ms": (now - fwd.t_sent) * 1e3}
        own["total_ms"] = (now - fwd.t_recv) * 1e3
        after = msg.meta.get("stages")
        if not isinstance(after, list):
            server = msg.meta.get("server")
            after = [server] if isinstance(server, dict) else []
        stages = [own, *[_stage_times(s) for s in after if isinstance(s, dict)][: MAX_STAGES_META - 1]]
        reply = wire.Message(
            wire.RESULT,
            fwd.id,
            fwd.plan,
            fwd.names + msg.tensors,
            meta={"server": own, "stages": stages},
            frames=fwd.frames + msg.frames,
        )
        self.stats.answered(True)
        self._send(router, fwd.ident, reply)

    def _misfit(self, fwd: _Forward, msg: wire.Message) -> str | None:
        """How the next stage's result differs from what the plan says the stages after this one return
        (their outputs, each with its dtype and shape); None where it fits. A relay passes its next
        stage's answer upstream: unchecked, a hostile or broken next stage put anything in a result."""
        entry = self.registry.get(fwd.plan)
        if entry is None:
            return "the plan is no longer served here"
        plan = entry.plan
        # each tensor once, as a stage sends it: a model that lists an output twice has it twice in
        # ``produces``, and every request over a relay to its last stage was refused as "repeated"
        want = list(dict.fromkeys(n for st in plan.stages[fwd.stage + 1 :] for n in st.produces))
        if sorted(msg.tensors) != sorted(want):
            missing = sorted(set(want) - set(msg.tensors))
            extra = sorted(set(msg.tensors) - set(want))[:8]
            return f"outputs {msg.tensors[:8]}, the plan's after stage {fwd.stage}: {want[:8]}" + (
                f" (missing {missing[:8]}, not the plan's {extra})" if missing or extra else " (repeated)"
            )
        expects = output_expects(plan)
        got = {}
        for n, f in zip(msg.tensors, msg.frames, strict=True):
            try:
                arr = decode(wire.buffer(f), self.config.max_message_bytes)
            except CodecError as exc:
                return f"{n}: {exc}"
            bad = mismatch(n, arr, expects[n]) if n in expects else None
            if bad is not None:
                return bad
            got[n] = arr
        # each fits the plan, but as an answer to another request (a batch of 5 for a request of 1)
        shapes = {n: shape for n, (_, shape) in expects.items() if shape}
        return symbol_conflict(got, shapes, dict(fwd.sizes))

    def _fail_forwarded(self, router: zmq.Socket, fwd: _Forward, why: str) -> None:
        self.stats.answered(False)
        err = wire.error(
            fwd.id, wire.E_UNAVAILABLE, f"stage {fwd.stage + 1} ({self.config.next}): {why}", fwd.plan
        )
        with contextlib.suppress(zmq.ZMQError):
            self._send(router, fwd.ident, err)

    def _expire(self, router: zmq.Socket, now: float) -> None:
        """Forwarded requests past their deadline (all share one timeout: the oldest come first)."""
        while self._fwd:
            fid, fwd = next(iter(self._fwd.items()))
            if fwd.deadline > now:
                return
            del self._fwd[fid]
            self._fail_forwarded(router, fwd, f"no answer within {self.config.next_timeout_s:g} s")

    def _on_next_events(self, router: zmq.Socket, monitor: zmq.Socket) -> None:
        """The next stage disconnected: what it held will never be answered, so fail it now."""
        from zmq.utils.monitor import recv_monitor_message

        gone, was_up = False, self._next_up
        for _ in range(1000):
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                break
            if event & GAVE_UP:  # refused: libzmq will not dial again
                self._redial.refused(time.monotonic())
            if event & HANDSHAKE_FAILED:
                if not self._said_refused:  # once: the relay dials again, 2 s to 30 s apart
                    self._said_refused = True
                    log.warning("%s", handshake_refused(str(self.config.next), "--next-server-key"))
            elif event & zmq.EVENT_DISCONNECTED:
                gone, self._next_up = True, False
            elif event & zmq.EVENT_HANDSHAKE_SUCCEEDED:
                # the grace is for the first connection: once one was made, a stage not connected fails
                # a request at once (a wait after a lost connection held each request 5 s)
                self._next_up, self._next_grace_until = True, 0.0
                self._redial.connected()
                self._said_refused = False  # a refusal after this one is news again
        if self._next_up != was_up:
            self._status()
        if gone and self._fwd:
            lost, self._fwd = list(self._fwd.values()), {}
            log.warning("the next stage disconnected: failing %d forwarded request(s)", len(lost))
            for fwd in lost:
                self._fail_forwarded(router, fwd, "disconnected")

    def _decode(self, msg: wire.Message, entry: Entry, max_bytes: int | None = None) -> dict[str, np.ndarray]:
        """``max_bytes``: what one tensor may decode to (default: the message cap)."""
        tail = entry.runner
        assert tail is not None
        if len(msg.tensors) != len(tail.cut_names) or not tail.cut_names.issuperset(msg.tensors):
            raise wire.WireError(
                wire.E_BAD_TENSOR, f"plan expects tensors {sorted(tail.cut_names)}, got {msg.tensors}"
            )
        feeds: dict[str, np.ndarray] = {}
        for name, frame in zip(msg.tensors, msg.frames, strict=True):
            # a view of the frame: the session reads it, nothing keeps it past the request
            arr = decode(wire.buffer(frame), max_bytes or self.config.max_message_bytes, copy=False)
            _check_tensor(name, arr, tail.expect[name])
            feeds[name] = arr
        return feeds

    def _deploy(self, ident: Any, msg: wire.Message) -> None:
        """On the deploy thread: verify and load the pushed plan, then answer through the socket thread."""
        try:
            plan = self.registry.install(wire.deploy_files(msg))
            reply = wire.Message(wire.DEPLOYED, msg.id, plan.plan_id)
            self._status()
        except wire.WireError as exc:
            log.warning("refused a deploy of plan %s: %s", msg.plan[:12] or "?", exc)
            reply = wire.error(msg.id, exc.code, str(exc), msg.plan)
        except (PlanError, SplitPointError) as exc:  # said here as well as to the deployer
            log.warning("refused a deploy of plan %s: %s", msg.plan[:12] or "?", exc)
            reply = wire.error(msg.id, wire.E_BAD_PLAN, str(exc), msg.plan)
        except OSError as exc:  # this machine's: a read-only or full plans directory, not the plan's fault
            why = f"the server cannot store the plan ({os_reason(exc)})"
            log.error("deploy of plan %s failed: %s", msg.plan[:12], why)
            reply = wire.error(msg.id, wire.E_INTERNAL, why, msg.plan)
        except Exception as exc:  # never lose the answer to a deploy
            log.exception("deploy failed")
            reply = wire.error(msg.id, wire.E_INTERNAL, describe(exc), msg.plan)
        if not self._replies.send([ident, *reply.to_frames()], block=False):
            log.warning("server stopping: deploy reply dropped")


class _AllowList:
    """pyzmq's ZAP handler asks ``callback(domain, key)`` with the client key z85-encoded."""

    def __init__(self, keys: Iterable[bytes]):
        from zmq.utils.z85 import encode as z85encode

        self.keys = {bytes(k) if len(k) == 40 else z85encode(bytes(k)) for k in keys}
        self._said: dict[bytes, float] = {}  # refused keys, when last logged
        self._minute = (0.0, 0, 0)  # this minute's start, lines logged in it, refusals left unsaid

    def callback(self, domain: str, key: bytes) -> bool:
        allowed = bytes(key) in self.keys
        if not allowed:
            self._say_refused(bytes(key), time.monotonic())
        return allowed

    def _say_refused(self, key: bytes, now: float) -> None:
        """A refused key in the log: once a minute per key, and at most REFUSED_LINES a minute in all
        (a client making a new key per connection wrote a line per attempt), the rest counted."""
        start, lines, unsaid = self._minute
        if now - start >= 60:
            if unsaid:
                log.warning(
                    "%d more connection(s) refused in the last minute (keys not on --curve-allow)", unsaid
                )
            start, lines, unsaid = now, 0, 0
        if now - self._said.get(key, -1e9) < 60 or lines >= REFUSED_LINES:
            self._minute = (start, lines, unsaid + 1)
            return
        if len(self._said) > 1000:
            self._said.clear()
        self._said[key] = now
        self._minute = (start, lines + 1, unsaid)
        log.warning(
            "refused a connection: its key %s is not on --curve-allow (a device whose .pub is not listed)",
            key.decode(errors="replace"),
        )


REFUSED_LINES = 10


def _check_tensor(name: str, arr: np.ndarray, expect: Expect) -> None:
    """Refuse a tensor the tail session would choke on, with the plan's expectation spelled out."""
    wrong = mismatch(name, arr, expect)
    if wrong is not None:
        raise wire.WireError(wire.E_BAD_TENSOR, f"tensor {wrong}")


def _run_stage(runner: StageRunner, feeds: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """Run the stage on tensors that agree on every symbolic dimension they share (the batch of two cut
    tensors): two sizes for one are the sender's ``bad-tensor``, refused before the run, since onnxruntime
    broadcasts a size of 1 against any other and would answer wrongly rather than fail. The symbols a
    stage's inputs share are those its plan's trial run found to hold (``verify_segments``)."""
    conflict = runner.symbol_conflict(feeds)
    if conflict is not None:
        raise wire.WireError(wire.E_BAD_TENSOR, f"{conflict}: the tensors sent must agree on it")
    try:
        return runner.run(feeds)
    except Exception as exc:
        # onnxruntime refusing what it was fed (InvalidArgument), or failing in a node on a tensor some of
        # whose sizes the plan could not know (behind a Resize to scales the input gave: 5 channels where
        # the tail's Conv takes 8), is the sender's tensor, not a failure of the server: ``bad-tensor``.
        # A symbol of the model's inputs (the batch) is checked before the run, unlike one shape inference
        # invented (unk__3) for a size it could not follow; a scalar's size is known (its shape is ());
        # memory running out is the server's
        said = " ".join(str(exc).split())
        if type(exc).__module__.startswith("onnxruntime") and "alloc" not in said.lower():
            known = stage_shapes(runner.plan, runner.index)
            named = {d for shape in input_shapes(runner.plan).values() for d in shape if isinstance(d, str)}
            loose = sorted(
                n
                for n in feeds
                if n not in known
                or any(d is None or (isinstance(d, str) and d not in named) for d in known[n])
            )
            if type(exc).__name__ == "InvalidArgument" or loose:
                where = f" (the plan does not know every size of {', '.join(loose)})" if loose else ""
                raise wire.WireError(
                    wire.E_BAD_TENSOR,
                    f"stage {runner.index} cannot run on the tensors sent{where}: {said[:300]}",
                ) from exc
        raise
