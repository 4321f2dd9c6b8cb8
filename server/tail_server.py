"""The tail server: a ZeroMQ ROUTER that runs plan tails for many edge clients at once.

One thread owns the ROUTER socket (ZeroMQ sockets are not thread-safe); a worker pool decodes,
runs the tail and encodes the reply, and hands the reply back over an inproc socket. A slow
request therefore occupies one worker, not the server. Every message is validated first; a bad
one gets an error reply and the loop carries on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import zmq

from splitpoint.core import wire
from splitpoint.core.codecs import CodecError, decode, encode
from splitpoint.core.errors import SplitPointError
from splitpoint.core.handoff import Handoff
from splitpoint.core.signals import stop_on_signals
from splitpoint.core.telemetry import Telemetry

from .config import ServerConfig
from .registry import PlanRegistry

log = logging.getLogger("splitpoint.server")


@dataclass
class Stats:
    """Counters shared by the socket thread and the workers; change them only through ``add``."""

    requests: int = 0
    errors: int = 0
    rejected: int = 0
    in_flight: int = 0
    batches: int = 0
    tail_ms_total: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: float) -> None:
        with self._lock:
            for k, v in deltas.items():
                setattr(self, k, getattr(self, k) + v)

    def snapshot(self) -> dict:
        with self._lock:
            return {k: getattr(self, k) for k in ("requests", "errors", "rejected", "in_flight", "batches")}


class TailServer:
    def __init__(self, config: ServerConfig, registry: PlanRegistry | None = None):
        self.config = config
        self.registry = registry or PlanRegistry(config.plans_dir, config.threads, config.provider)
        self.stats = Stats()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._ctx: zmq.Context = zmq.Context.instance()
        self._replies = Handoff(self._ctx, f"inproc://splitpoint-results-{id(self)}")
        self._queues: dict[str, deque] = {}
        self._qlock = threading.Lock()
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, config.workers), thread_name_prefix="splitpoint-tail"
        )
        self.endpoint: str | None = None
        self.telemetry = Telemetry(config.device_id, "server", config.mqtt) if config.mqtt else None

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> TailServer:
        self._thread = threading.Thread(target=self.serve_forever, name="splitpoint-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise SplitPointError(f"server did not start on {self.config.bind}")
        return self

    def run(self) -> None:
        """Serve until SIGTERM or SIGINT, then stop: what ``splitpoint serve`` and a supervisor run."""
        done = threading.Event()
        with stop_on_signals(done.set):
            self.start()
            log.info("serving %d plan(s) on %s", len(self.registry.ids()), self.endpoint)
            done.wait()
        self.stop()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving. Requests still in the pool finish but their replies are dropped (the
        socket is gone); the edge's deadline turns them into a fallback or an explicit error."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout)
        if getattr(self, "_auth", None):
            self._auth.stop()
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self.telemetry:
            self.telemetry.close()

    def serve_forever(self) -> None:
        router = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes + wire.MAX_HEADER_BYTES)
        if self.config.curve_secret_key:
            self._enable_curve(router)
        try:
            router.bind(self.config.bind)
        except zmq.ZMQError as exc:
            log.error("cannot bind %s: %s", self.config.bind, exc)
            raise SplitPointError(f"cannot bind {self.config.bind}: {exc}") from exc
        results = self._replies.bind()
        self.endpoint = router.getsockopt(zmq.LAST_ENDPOINT).decode()
        if self.telemetry:
            self.telemetry.status("online", {"endpoint": self.endpoint, "plans": self.registry.ids()})
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(results, zmq.POLLIN)
        self._ready.set()
        next_metrics = time.monotonic()
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(100))
                if results in events:
                    for frames in wire.drain(results):
                        router.send_multipart(frames, copy=False)
                if router in events:
                    for frames in wire.drain(router):
                        self._on_message(router, frames)
                if self.telemetry and time.monotonic() >= next_metrics:
                    next_metrics = time.monotonic() + self.config.metrics_interval_s
                    self.telemetry.metrics({**self.stats.snapshot(), "plans": len(self.registry.ids())})
        finally:
            router.close(0)
            results.close(0)

    def _enable_curve(self, sock) -> None:
        """CurveZMQ encryption; with an allow-list only those client keys may connect."""
        from zmq.auth import CURVE_ALLOW_ANY
        from zmq.auth.thread import ThreadAuthenticator

        secret = self.config.curve_secret_key
        assert secret is not None
        public = zmq.curve_public(secret)
        self._auth = ThreadAuthenticator(self._ctx)
        self._auth.start()
        if self.config.curve_allow:
            self._auth.configure_curve_callback(
                domain="*", credentials_provider=_AllowList(self.config.curve_allow)
            )
        else:
            self._auth.configure_curve(domain="*", location=CURVE_ALLOW_ANY)
        sock.curve_secretkey = secret
        sock.curve_publickey = public
        sock.curve_server = True

    # -- messages ------------------------------------------------------------------------------
    def _reply(self, router, ident, msg: wire.Message) -> None:
        router.send_multipart([ident, *msg.to_frames()], copy=False)

    def _on_message(self, router, frames) -> None:
        t_recv = time.perf_counter()
        if len(frames) < 2:
            self.stats.add(rejected=1)
            return  # nothing to answer: no identity and message
        ident, body = frames[0], frames[1:]
        try:
            msg = wire.parse(body, self.config.max_message_bytes)
        except wire.WireError as exc:
            self.stats.add(rejected=1)
            self._reply(router, ident, wire.error(_best_effort_id(body), exc.code, str(exc)))
            return
        if msg.type == wire.PING:
            self._reply(
                router,
                ident,
                wire.Message(
                    wire.PONG,
                    msg.id,
                    meta={
                        "plans": self.registry.ids(),
                        "workers": self.config.workers,
                        "in_flight": self.stats.in_flight,
                        "max_batch": self.config.max_batch,
                    },
                ),
            )
        elif msg.type == wire.DEPLOY:
            self._deploy(router, ident, msg)
        elif msg.type == wire.INFER:
            entry = self.registry.get(msg.plan)
            if entry is None or entry.tail is None:
                self.stats.add(rejected=1)
                why = "unknown plan" if entry is None else "plan runs entirely on the edge"
                self._reply(
                    router,
                    ident,
                    wire.error(msg.id, wire.E_UNKNOWN_PLAN, f"{why}: {msg.plan[:16] or '(none)'}", msg.plan),
                )
                return
            self.stats.add(in_flight=1)
            with self._qlock:
                self._queues.setdefault(msg.plan, deque()).append((ident, msg, entry, t_recv))
            self._pool.submit(self._work, msg.plan)
        else:
            self.stats.add(rejected=1)
            self._reply(
                router,
                ident,
                wire.error(msg.id, wire.E_BAD_MESSAGE, f"a server does not accept {msg.type!r}"),
            )

    def _deploy(self, router, ident, msg: wire.Message) -> None:
        try:
            plan = self.registry.install(wire.deploy_files(msg))
        except wire.WireError as exc:
            self._reply(router, ident, wire.error(msg.id, exc.code, str(exc)))
            return
        except SplitPointError as exc:
            self._reply(router, ident, wire.error(msg.id, wire.E_BAD_PLAN, str(exc)))
            return
        if self.telemetry:
            self.telemetry.status("online", {"endpoint": self.endpoint, "plans": self.registry.ids()})
        self._reply(router, ident, wire.Message(wire.DEPLOYED, msg.id, plan.plan_id))

    def _work(self, plan_id: str) -> None:
        """Serve up to ``max_batch`` queued requests of one plan (each message queued one task, so
        nothing is left behind); with micro-batching they share one tail run."""
        with self._qlock:
            q = self._queues.get(plan_id)
            batch = [q.popleft() for _ in range(min(len(q), max(1, self.config.max_batch)))] if q else []
        if not batch:
            return
        entry = batch[0][2]
        t0 = time.perf_counter()
        ready = []
        for ident, msg, _, t_recv in batch:
            t_dec = time.perf_counter()
            try:
                ready.append(
                    (ident, msg, t_recv, self._decode(msg, entry), (time.perf_counter() - t_dec) * 1e3)
                )
            except (wire.WireError, CodecError) as exc:
                code = exc.code if isinstance(exc, wire.WireError) else wire.E_BAD_TENSOR
                self._answer(ident, wire.error(msg.id, code, str(exc), msg.plan), error=True)
        if not ready:
            return
        t1 = time.perf_counter()
        outs = None
        if len(ready) > 1:
            # one bad request must not fail its batch mates: on failure they run one by one below
            with contextlib.suppress(Exception):
                outs = entry.tail.run_batch([r[3] for r in ready])
        t2 = time.perf_counter()
        if outs is None:
            outs = []
            for _, msg, _, feeds, _ in ready:
                try:
                    outs.append(entry.tail.run(feeds))
                except Exception as exc:  # a failing tail must not take the server down
                    log.exception("tail failed for request %s", msg.id)
                    outs.append(exc)
            t2 = time.perf_counter()
        self.stats.add(batches=1, tail_ms_total=(t2 - t1) * 1e3)
        for (ident, msg, t_recv, _, dec_ms), out in zip(ready, outs, strict=True):
            if isinstance(out, Exception):
                self._answer(
                    ident,
                    wire.error(msg.id, wire.E_INTERNAL, f"{type(out).__name__}: {out}", msg.plan),
                    error=True,
                )
                continue
            t3 = time.perf_counter()
            names = list(out)
            frames = [encode(out[n], self.config.reply_codec) for n in names]
            enc_ms = (time.perf_counter() - t3) * 1e3
            self._answer(
                ident,
                wire.Message(
                    wire.RESULT,
                    msg.id,
                    msg.plan,
                    names,
                    meta={
                        "server": {
                            "queue_ms": (t0 - t_recv) * 1e3,
                            "decode_ms": dec_ms,
                            "tail_ms": (t2 - t1) * 1e3,
                            "encode_ms": enc_ms,
                            "batch": len(ready),
                            "total_ms": (time.perf_counter() - t_recv) * 1e3,
                        }
                    },
                    frames=frames,
                ),
            )

    def _decode(self, msg: wire.Message, entry) -> dict[str, np.ndarray]:
        expected = {t.name: t for t in entry.plan.cut_tensors}
        if set(msg.tensors) != set(expected):
            raise wire.WireError(
                wire.E_BAD_TENSOR, f"plan expects tensors {sorted(expected)}, got {msg.tensors}"
            )
        feeds = {}
        for name, frame in zip(msg.tensors, msg.frames, strict=True):
            arr = decode(wire._buffer(frame), self.config.max_message_bytes)
            _check_tensor(name, arr, entry.tail.inputs[name])
            feeds[name] = arr
        return feeds

    def _answer(self, ident, reply: wire.Message, error: bool = False) -> None:
        self.stats.add(in_flight=-1, **({"errors": 1} if error else {"requests": 1}))
        # never block a worker: once the socket thread is gone (stop) a send would wait forever
        if not self._replies.send([ident, *reply.to_frames()], block=False):
            log.warning("server stopping: reply dropped")


class _AllowList:
    """pyzmq's ZAP handler asks ``callback(domain, key)`` with the client key z85-encoded."""

    def __init__(self, keys: Iterable[bytes]):
        from zmq.utils.z85 import encode as z85encode

        self.keys = {bytes(k) if len(k) == 40 else z85encode(bytes(k)) for k in keys}

    def callback(self, domain: str, key: bytes) -> bool:
        return bytes(key) in self.keys


def _check_tensor(name: str, arr: np.ndarray, spec) -> None:
    """Refuse a tensor the tail session would choke on, with the plan's expectation spelled out."""
    want_dtype = {
        "tensor(float)": np.float32,
        "tensor(float16)": np.float16,
        "tensor(int64)": np.int64,
        "tensor(int32)": np.int32,
        "tensor(bool)": np.bool_,
        "tensor(double)": np.float64,
        "tensor(uint8)": np.uint8,
        "tensor(int8)": np.int8,
    }.get(spec.type)
    if want_dtype is not None and arr.dtype != want_dtype:
        raise wire.WireError(
            wire.E_BAD_TENSOR, f"tensor {name}: dtype {arr.dtype}, plan expects {np.dtype(want_dtype)}"
        )
    if len(arr.shape) != len(spec.shape):
        raise wire.WireError(
            wire.E_BAD_TENSOR, f"tensor {name}: rank {arr.ndim}, plan expects shape {spec.shape}"
        )
    for got, want in zip(arr.shape, spec.shape, strict=True):
        if isinstance(want, int) and want != got:
            raise wire.WireError(
                wire.E_BAD_TENSOR, f"tensor {name}: shape {list(arr.shape)}, plan expects {spec.shape}"
            )


def _best_effort_id(body) -> int:
    try:
        import json

        v = json.loads(bytes(wire._buffer(body[0]))).get("id", 0)
        return v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63 else 0
    except Exception:
        return 0


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))
