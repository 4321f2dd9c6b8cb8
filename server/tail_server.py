"""The tail server: a ZeroMQ ROUTER that runs plan tails for many edge clients at once.

One thread owns the ROUTER socket (ZeroMQ sockets are not thread-safe). With one worker (the default,
right for a CPU server where onnxruntime's own threads parallelise each run) that thread also decodes,
runs the tail and encodes: no hand-off between threads on the request path. With more workers a pool
does that work and hands replies back over an inproc socket. Deploys are loaded on a thread of their
own, so a large model never holds up pings or requests.

Every message is handled under its own ``try``: a malformed or hostile one gets an error reply with a
code from ``docs/protocol.md`` and the loop goes on. Requests waiting for a tail are bounded
(``max_queue``); past it a request is answered ``busy``. If the socket thread dies anyway, ``run()``
raises, so ``splitpoint serve`` exits non-zero and its supervisor restarts it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from splitpoint.core import wire
from splitpoint.core.codecs import CodecError, decode, encode
from splitpoint.core.errors import PlanError, SplitPointError
from splitpoint.core.handoff import Handoff
from splitpoint.core.signals import stop_on_signals
from splitpoint.core.telemetry import Telemetry

from .config import ServerConfig
from .registry import Entry, PlanRegistry

log = logging.getLogger("splitpoint.server")
RCVHWM = 1000  # messages ZeroMQ queues per peer before TCP pushes back


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


@dataclass
class _Request:
    ident: Any
    msg: wire.Message
    entry: Entry
    t_recv: float


class TailServer:
    def __init__(self, config: ServerConfig, registry: PlanRegistry | None = None):
        self.config = config
        self.registry = registry or PlanRegistry(config.plans_dir, config.threads, config.provider)
        self.stats = Stats()
        self.endpoint: str | None = None
        self.fatal: BaseException | None = None
        self._stop = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
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
        self.telemetry = Telemetry(config.device_id, "server", config.mqtt) if config.mqtt else None

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> TailServer:
        """Bind (in the caller's thread, so a busy port or a bad endpoint fails here, at once) and serve."""
        router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes)  # per frame; parse() caps the total
        router.setsockopt(zmq.RCVHWM, RCVHWM)
        router.setsockopt(zmq.SNDHWM, RCVHWM)
        if self.config.curve:
            self._enable_curve(router)
        try:
            router.bind(self.config.bind)
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
        self.endpoint = router.getsockopt(zmq.LAST_ENDPOINT).decode()
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

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving. Requests still in the pool finish but their replies are dropped (the
        socket is gone); the edge's deadline turns them into a fallback or an explicit error."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout)
        if self._auth is not None:
            self._auth.stop()
        if self._pool:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._deployer.shutdown(wait=True, cancel_futures=True)
        if self.telemetry:
            self.telemetry.close()

    def _status(self) -> None:
        if self.telemetry:
            self.telemetry.status("online", {"endpoint": self.endpoint, "plans": self.registry.ids()})

    def _enable_curve(self, sock: zmq.Socket) -> None:
        """CurveZMQ encryption; with an allow-list only those client keys (and the deploy keys) connect."""
        from zmq.auth import CURVE_ALLOW_ANY
        from zmq.auth.thread import ThreadAuthenticator

        secret = self.config.curve_secret_key
        assert secret is not None
        self._auth = ThreadAuthenticator(self._ctx)
        self._auth.start()
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
            router.close(0)
            replies.close(0)
            self._done.set()

    def _serve(self, router: zmq.Socket, replies: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(replies, zmq.POLLIN)
        next_metrics = time.monotonic()
        while not self._stop.is_set():
            events = dict(poller.poll(0 if self._inline else 100))
            if replies in events:
                for frames in wire.drain(replies):
                    router.send_multipart(frames, copy=False)
            if router in events:
                # bounded, so that queued requests and replies are served between bursts
                for frames in wire.drain(router, limit=4 * RCVHWM):
                    self._on_message(router, frames)
            if self._inline:
                self._answer(router, self._work(self._inline.popleft()))
            if self.telemetry and time.monotonic() >= next_metrics:
                next_metrics = time.monotonic() + self.config.metrics_interval_s
                self.telemetry.metrics({**self.stats.snapshot(), "plans": len(self.registry.ids())})

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
            reply = wire.error(wire.best_effort_id(body), wire.E_INTERNAL, f"{type(exc).__name__}: {exc}")
            with contextlib.suppress(zmq.ZMQError):
                router.send_multipart([ident, *reply.to_frames()], copy=False)

    def _send(self, router: zmq.Socket, ident: Any, msg: wire.Message) -> None:
        router.send_multipart([ident, *msg.to_frames()], copy=False)

    def _handle(self, router: zmq.Socket, ident: Any, body: list) -> None:
        t_recv = time.perf_counter()
        try:
            msg = wire.parse(body, self.config.max_message_bytes)
        except wire.WireError as exc:
            self.stats.add(rejected=1)
            self._send(router, ident, wire.error(wire.best_effort_id(body), exc.code, str(exc)))
            return
        if msg.type == wire.PING:
            meta = {
                "plans": self.registry.ids(),
                "workers": self.config.workers,
                "in_flight": self.stats.in_flight,
            }
            self._send(router, ident, wire.Message(wire.PONG, msg.id, meta=meta))
        elif msg.type == wire.DEPLOY:
            if not self._may_deploy(body[0]):
                self.stats.add(rejected=1)
                why = "this key is not on the server's deploy allow-list (--deploy-allow)"
                self._send(router, ident, wire.error(msg.id, wire.E_UNAUTHORIZED, why))
                return
            self._deployer.submit(self._deploy, ident, msg)
        elif msg.type == wire.INFER:
            self._admit(router, ident, msg, t_recv)
        else:
            self.stats.add(rejected=1)
            self._send(
                router,
                ident,
                wire.error(msg.id, wire.E_BAD_MESSAGE, f"a server does not accept {msg.type!r}"),
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
        if entry is None or entry.tail is None:
            self.stats.add(rejected=1)
            why = "unknown plan" if entry is None else "plan runs entirely on the edge"
            err = wire.error(msg.id, wire.E_UNKNOWN_PLAN, f"{why}: {msg.plan[:16] or '(none)'}", msg.plan)
            self._send(router, ident, err)
            return
        if self.stats.in_flight >= self.config.max_queue:
            self.stats.add(rejected=1, busy=1)
            why = f"{self.stats.in_flight} requests are waiting (the limit is {self.config.max_queue})"
            self._send(router, ident, wire.error(msg.id, wire.E_BUSY, why, msg.plan))
            return
        self.stats.admitted()
        req = _Request(ident, msg, entry, t_recv)
        if self._pool is None:
            self._inline.append(req)
        else:
            self._pool.submit(self._pooled, req)

    # -- work: the socket thread itself (one worker) or the pool ------------------------------
    def _pooled(self, req: _Request) -> None:
        frames = self._work(req)
        # never block a worker: once the socket thread is gone (stop) a send would wait forever
        if not self._replies.send(frames, block=False):
            log.warning("server stopping: reply dropped")

    def _answer(self, router: zmq.Socket, frames: list) -> None:
        router.send_multipart(frames, copy=False)

    def _work(self, req: _Request) -> list:
        """Decode, run the tail, encode: the reply's frames (identity first). Never raises."""
        msg = req.msg
        try:
            reply = self._result(req)
            self.stats.answered(True)
        except (wire.WireError, CodecError) as exc:
            code = exc.code if isinstance(exc, wire.WireError) else wire.E_BAD_TENSOR
            reply = wire.error(msg.id, code, str(exc), msg.plan)
            self.stats.answered(False)
        except Exception as exc:  # a failing tail (or a bug) answers this request and no other
            log.exception("request %s failed", msg.id)
            reply = wire.error(msg.id, wire.E_INTERNAL, f"{type(exc).__name__}: {exc}", msg.plan)
            self.stats.answered(False)
        return [req.ident, *reply.to_frames()]

    def _result(self, req: _Request) -> wire.Message:
        t0 = time.perf_counter()
        feeds = self._decode(req.msg, req.entry)
        t1 = time.perf_counter()
        assert req.entry.tail is not None
        out = req.entry.tail.run(feeds)
        t2 = time.perf_counter()
        names = list(out)
        frames = [encode(out[n], self.config.reply_codec) for n in names]
        t3 = time.perf_counter()
        server = {
            "queue_ms": (t0 - req.t_recv) * 1e3,
            "decode_ms": (t1 - t0) * 1e3,
            "tail_ms": (t2 - t1) * 1e3,
            "encode_ms": (t3 - t2) * 1e3,
            "total_ms": (t3 - req.t_recv) * 1e3,
        }
        return wire.Message(
            wire.RESULT, req.msg.id, req.msg.plan, names, meta={"server": server}, frames=frames
        )

    def _decode(self, msg: wire.Message, entry: Entry) -> dict[str, np.ndarray]:
        tail = entry.tail
        assert tail is not None
        if len(msg.tensors) != len(tail.cut_names) or not tail.cut_names.issuperset(msg.tensors):
            raise wire.WireError(
                wire.E_BAD_TENSOR, f"plan expects tensors {sorted(tail.cut_names)}, got {msg.tensors}"
            )
        feeds = {}
        for name, frame in zip(msg.tensors, msg.frames, strict=True):
            arr = decode(wire.buffer(frame), self.config.max_message_bytes)
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
            reply = wire.error(msg.id, exc.code, str(exc))
        except (PlanError, SplitPointError) as exc:
            reply = wire.error(msg.id, wire.E_BAD_PLAN, str(exc))
        except Exception as exc:  # never lose the answer to a deploy
            log.exception("deploy failed")
            reply = wire.error(msg.id, wire.E_INTERNAL, f"{type(exc).__name__}: {exc}")
        if not self._replies.send([ident, *reply.to_frames()], block=False):
            log.warning("server stopping: deploy reply dropped")


class _AllowList:
    """pyzmq's ZAP handler asks ``callback(domain, key)`` with the client key z85-encoded."""

    def __init__(self, keys: Iterable[bytes]):
        from zmq.utils.z85 import encode as z85encode

        self.keys = {bytes(k) if len(k) == 40 else z85encode(bytes(k)) for k in keys}

    def callback(self, domain: str, key: bytes) -> bool:
        return bytes(key) in self.keys


def _check_tensor(name: str, arr: np.ndarray, expect: tuple[np.dtype | None, tuple]) -> None:
    """Refuse a tensor the tail session would choke on, with the plan's expectation spelled out."""
    want, shape = expect
    if want is not None and arr.dtype != want:
        raise wire.WireError(wire.E_BAD_TENSOR, f"tensor {name}: dtype {arr.dtype}, plan expects {want}")
    got = arr.shape
    if len(got) != len(shape) or any(d is not None and d != g for g, d in zip(got, shape, strict=True)):
        shown = [d if d is not None else "?" for d in shape]
        what = f"rank {arr.ndim}" if len(got) != len(shape) else f"shape {list(got)}"
        raise wire.WireError(wire.E_BAD_TENSOR, f"tensor {name}: {what}, plan expects shape {shown}")
