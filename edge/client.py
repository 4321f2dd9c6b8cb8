"""The edge client: runs the head, ships the cut tensor, matches replies, falls back locally.

Threads: head workers run the head and encode (compute), one I/O thread owns the DEALER socket
(ZeroMQ sockets are not thread-safe) and wakes on an inproc socket, so several requests are in
flight at once (the window) and head compute, transfer and the server's tail overlap.

Every request gets exactly one answer or one explicit error: a request id is resolved once,
whoever gets there first (the reply, the timeout, or shutdown), and late replies are ignored.
While the server is unreachable and the plan ships the whole model, requests run locally and
say so (``fallback=True``) in the result and in telemetry.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import zmq

from splitpoint.core import wire
from splitpoint.core.codecs import CodecError, decode, encode
from splitpoint.core.errors import SplitPointError
from splitpoint.core.handoff import Handoff
from splitpoint.core.plan import EDGE_ONLY, FULL_FILE, HEAD_FILE, Plan
from splitpoint.core.runner import HeadRunner, make_session
from splitpoint.core.telemetry import Telemetry

from .config import EdgeConfig

log = logging.getLogger("splitpoint.edge")


class EdgeError(SplitPointError):
    """A request that could not be answered: the reason is in the message (and ``code``)."""

    def __init__(self, message: str, code: str = "error"):
        super().__init__(message)
        self.code = code


@dataclass
class EdgeResult:
    id: int
    names: list[str]
    outputs: list[np.ndarray]
    fallback: bool
    breakdown: dict = field(default_factory=dict)  # milliseconds, all measured on one clock each

    def __getitem__(self, name: str) -> np.ndarray:
        return self.outputs[self.names.index(name)]


@dataclass
class _Pending:
    future: Future
    feeds: dict
    t_submit: float
    t_sent: float = 0.0
    deadline: float = 0.0
    head_ms: float = 0.0
    encode_ms: float = 0.0
    bytes_sent: int = 0
    early: dict = field(default_factory=dict)


class EdgeClient:
    def __init__(self, config: EdgeConfig):
        self.config = config
        self.plan = Plan.load(config.plan_dir)
        d = Path(config.plan_dir)
        self._head = HeadRunner(
            self.plan,
            make_session(d / HEAD_FILE, config.threads) if HEAD_FILE in self.plan.files else None,
        )
        self.local_only = self.plan.kind == EDGE_ONLY
        self._full = None
        if (config.fallback or self.local_only) and (FULL_FILE in self.plan.files or self.local_only):
            path = d / (FULL_FILE if FULL_FILE in self.plan.files else HEAD_FILE)
            if psutil.virtual_memory().available > 3 * path.stat().st_size:
                self._full = make_session(path, config.threads)
            else:
                log.warning("not enough free memory to keep the fallback model loaded")
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._lock = threading.Lock()
        self._window = threading.BoundedSemaphore(max(1, config.window))
        self._pool = ThreadPoolExecutor(
            max_workers=max(1, config.head_workers), thread_name_prefix="splitpoint-head"
        )
        self._ctx: zmq.Context = zmq.Context.instance()
        self._outbox = Handoff(self._ctx, f"inproc://splitpoint-edge-{id(self)}")
        self._stop = threading.Event()
        self._closing = False
        self.server_up = False
        self._last_heard = 0.0
        self.rtt_ms: float | None = None
        self.bandwidth_mbps: float | None = None
        self.counts = {"ok": 0, "fallback": 0, "errors": 0}
        self.telemetry = Telemetry(config.device_id, "edge", config.mqtt) if config.mqtt else None
        self._ready = threading.Event()
        self._io = threading.Thread(target=self._io_loop, name="splitpoint-edge-io", daemon=True)
        self._io.start()
        self._ready.wait(5)
        # TCP connects asynchronously: without a short wait the first requests would find no
        # connected peer and fall back although the server is there
        end = time.monotonic() + (0 if self.local_only else config.connect_grace_s)
        while not self.server_up and time.monotonic() < end:
            time.sleep(0.005)
        if self.telemetry:
            self.telemetry.status(
                "online", {"plan": self.plan.plan_id, "server": config.server, "fallback": False}
            )

    # -- public API ----------------------------------------------------------------------------
    def submit(self, feeds: dict[str, np.ndarray]) -> Future:
        """Start one inference; the future yields an EdgeResult or raises EdgeError."""
        rid, fut = self._enqueue(feeds)
        self._pool.submit(self._head_task, rid)
        return fut

    def infer(self, feeds: dict[str, np.ndarray], timeout: float | None = None) -> EdgeResult:
        """One inference, blocking. The head runs in the calling thread, which would only wait
        otherwise: one thread hand-off less per request than ``submit``."""
        rid, fut = self._enqueue(feeds)
        self._head_task(rid)
        return fut.result(timeout)

    def _enqueue(self, feeds: dict[str, np.ndarray]) -> tuple[int, Future]:
        if self._closing:
            raise EdgeError("client is shutting down", "closed")
        self._window.acquire()
        fut: Future = Future()
        rid = next(self._ids)
        with self._lock:
            self._pending[rid] = _Pending(fut, feeds, time.perf_counter())
        return rid, fut

    def close(self, drain: bool = True, timeout: float = 10.0) -> None:
        """Stop taking requests; with ``drain``, let those in flight finish first (SIGTERM)."""
        self._closing = True
        end = time.monotonic() + timeout
        while drain and self._pending and time.monotonic() < end:
            time.sleep(0.01)
        with self._lock:
            left = list(self._pending)
        for rid in left:
            self._finish(rid, error=EdgeError("client closed before the request finished", "closed"))
        self._stop.set()
        self._io.join(2)
        self._pool.shutdown(wait=True)
        if self.telemetry:
            self.telemetry.close()

    def __enter__(self) -> EdgeClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- resolution: exactly once --------------------------------------------------------------
    def _finish(self, rid: int, result: EdgeResult | None = None, error: Exception | None = None) -> None:
        with self._lock:
            p = self._pending.pop(rid, None)
        if p is None:
            return  # already answered (a late reply after a timeout, say)
        self._window.release()
        if error is not None:
            self.counts["errors"] += 1
            p.future.set_exception(error)
            return
        assert result is not None, "a request finishes with a result or an error"
        self.counts["fallback" if result.fallback else "ok"] += 1
        result.breakdown["total_ms"] = (time.perf_counter() - p.t_submit) * 1e3
        if self.telemetry:
            self.telemetry.latency({"request": rid, "fallback": result.fallback, **result.breakdown})
        p.future.set_result(result)

    # -- compute side --------------------------------------------------------------------------
    def _head_task(self, rid: int) -> None:
        with self._lock:
            p = self._pending.get(rid)
        if p is None:
            return
        try:
            if self.local_only or (not self.server_up and self._full is not None and self._last_heard > 0):
                self._run_local(rid, p)
                return
            t0 = time.perf_counter()
            sent, early = self._head.run(p.feeds)
            t1 = time.perf_counter()
            names = list(sent)
            frames = [encode(sent[n], self.plan.codec) for n in names]
            t2 = time.perf_counter()
            p.head_ms, p.encode_ms, p.early = (t1 - t0) * 1e3, (t2 - t1) * 1e3, early
            p.bytes_sent = sum(len(f) for f in frames)
            msg = wire.Message(wire.INFER, rid, self.plan.plan_id, names, frames=frames)
            self._outbox.send([str(rid).encode(), *msg.to_frames()])
        except SplitPointError as exc:
            self._finish(rid, error=EdgeError(str(exc), "bad-input"))
        except Exception as exc:  # onnxruntime rejects wrong shapes/dtypes with its own errors
            self._finish(rid, error=EdgeError(f"head failed: {type(exc).__name__}: {exc}", "bad-input"))

    def _run_local(self, rid: int, p: _Pending, why: str = "server unreachable") -> None:
        if self._full is None:
            self._finish(
                rid, error=EdgeError(f"{why} and the plan ships no full model to fall back on", "unreachable")
            )
            return
        try:
            t0 = time.perf_counter()
            names = [o.name for o in self._full.get_outputs()]
            outs = self._full.run(names, {i.name: p.feeds[i.name] for i in self._full.get_inputs()})
            ms = (time.perf_counter() - t0) * 1e3
        except Exception as exc:
            self._finish(
                rid, error=EdgeError(f"local model failed: {type(exc).__name__}: {exc}", "bad-input")
            )
            return
        order = [o.name for o in self.plan.outputs]
        by = dict(zip(names, outs, strict=True))
        self._finish(
            rid,
            EdgeResult(
                rid,
                order,
                [by[n] for n in order],
                fallback=not self.local_only,
                breakdown={"local_ms": ms, "reason": why if not self.local_only else "edge-only plan"},
            ),
        )

    # -- I/O side ------------------------------------------------------------------------------
    def _dealer(self):
        s = self._ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.IMMEDIATE, 1)  # no queueing towards a server that is not connected
        s.setsockopt(zmq.RECONNECT_IVL, 100)  # reconnect with backoff: 0.1 s doubling to 2 s
        s.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        s.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes + wire.MAX_HEADER_BYTES)
        if self.config.curve_server_key:
            pub, sec = self.config.curve_keypair or zmq.curve_keypair()
            s.curve_serverkey, s.curve_publickey, s.curve_secretkey = self.config.curve_server_key, pub, sec
        s.connect(self.config.server)
        return s

    def _io_loop(self) -> None:
        inbox = self._outbox.bind()
        dealer = self._dealer()
        poller = zmq.Poller()
        poller.register(inbox, zmq.POLLIN)
        poller.register(dealer, zmq.POLLIN)
        self._ready.set()
        ping_ids = itertools.count(2**62)
        pings: dict[int, float] = {}
        next_ping = 0.0
        next_metrics = time.monotonic() + 2.0
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(20))
                now = time.perf_counter()
                if inbox in events:
                    for frames in wire.drain(inbox):
                        self._send(dealer, int(bytes(frames[0].buffer)), frames[1:])
                if dealer in events:
                    for frames in wire.drain(dealer):
                        self._on_reply(frames, pings)
                if now >= next_ping:
                    next_ping = now + self.config.heartbeat_s
                    pid = next(ping_ids)
                    pings[pid] = now
                    with contextlib.suppress(zmq.Again):
                        dealer.send_multipart(wire.Message(wire.PING, pid).to_frames(), zmq.NOBLOCK)
                    for old in [k for k, t in pings.items() if now - t > 10]:
                        pings.pop(old)
                self._check_deadlines(now)
                if self.telemetry and time.monotonic() >= next_metrics:
                    next_metrics = time.monotonic() + 2.0
                    self.telemetry.metrics(
                        {
                            "server_up": self.server_up,
                            "fallback": not self.server_up,
                            "in_flight": len(self._pending),
                            "rtt_ms_est": self.rtt_ms,
                            "bandwidth_mbps_est": self.bandwidth_mbps,
                            **self.counts,
                        }
                    )
        finally:
            dealer.close(0)
            inbox.close(0)

    def _send(self, dealer, rid: int, frames) -> None:
        with self._lock:
            p = self._pending.get(rid)
        if p is None:
            return
        p.t_sent = time.perf_counter()
        p.deadline = p.t_sent + self.config.timeout_s
        try:
            dealer.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:  # no server connected (IMMEDIATE): do not queue, degrade now
            self._set_up(False)
            self._pool.submit(self._run_local, rid, p, "server unreachable")

    def _set_up(self, up: bool) -> None:
        if up != self.server_up:
            self.server_up = up
            log.info("server %s", "reachable" if up else "unreachable: falling back to the local model")
            if self.telemetry:
                self.telemetry.status(
                    "online", {"plan": self.plan.plan_id, "server": self.config.server, "fallback": not up}
                )

    def _on_reply(self, frames, pings: dict[int, float]) -> None:
        now = time.perf_counter()
        self._last_heard = now
        self._set_up(True)
        try:
            msg = wire.parse(frames, self.config.max_message_bytes)
        except wire.WireError as exc:
            log.warning("dropping malformed reply: %s", exc)
            return
        if msg.type == wire.PONG:
            sent = pings.pop(msg.id, None)
            if sent is not None:
                rtt = (now - sent) * 1e3
                self.rtt_ms = rtt if self.rtt_ms is None else 0.8 * self.rtt_ms + 0.2 * rtt
            return
        with self._lock:
            p = self._pending.get(msg.id)
        if p is None:
            return
        if msg.type == wire.ERROR:
            code, text = msg.meta.get("code", "error"), msg.meta.get("message", "")
            self._finish(msg.id, error=EdgeError(f"server refused request {msg.id}: {code}: {text}", code))
            return
        if msg.type != wire.RESULT:
            return
        try:
            t0 = time.perf_counter()
            late = {
                n: decode(wire._buffer(f), self.config.max_message_bytes)
                for n, f in zip(msg.tensors, msg.frames, strict=True)
            }
            dec_ms = (time.perf_counter() - t0) * 1e3
            order = [o.name for o in self.plan.outputs]
            outs = [p.early[n] if n in p.early else late[n] for n in order]
        except (CodecError, KeyError) as exc:
            self._finish(
                msg.id, error=EdgeError(f"malformed result for request {msg.id}: {exc}", "bad-reply")
            )
            return
        server = msg.meta.get("server", {}) if isinstance(msg.meta.get("server"), dict) else {}
        round_trip = (now - p.t_sent) * 1e3
        network = max(0.0, round_trip - float(server.get("total_ms", 0.0)))
        if network > 0 and p.bytes_sent > 0 and self.rtt_ms is not None and network > self.rtt_ms:
            mbps = 8e-3 * p.bytes_sent / (network - self.rtt_ms) if network - self.rtt_ms > 0.05 else None
            if mbps:
                self.bandwidth_mbps = (
                    mbps if self.bandwidth_mbps is None else 0.8 * self.bandwidth_mbps + 0.2 * mbps
                )
        self._finish(
            msg.id,
            EdgeResult(
                msg.id,
                order,
                outs,
                fallback=False,
                breakdown={
                    "head_ms": p.head_ms,
                    "encode_ms": p.encode_ms,
                    "network_ms": network,
                    "server_queue_ms": server.get("queue_ms"),
                    "server_decode_ms": server.get("decode_ms"),
                    "tail_ms": server.get("tail_ms"),
                    "server_encode_ms": server.get("encode_ms"),
                    "decode_ms": dec_ms,
                    "server_batch": server.get("batch", 1),
                    "bytes_sent": p.bytes_sent,
                },
            ),
        )

    def _check_deadlines(self, now: float) -> None:
        if self.server_up and self._last_heard and now - self._last_heard > self.config.dead_after_s:
            self._set_up(False)
        with self._lock:
            late = [(rid, p) for rid, p in self._pending.items() if p.deadline and now > p.deadline]
        for rid, p in late:
            p.deadline = 0.0
            if self.config.fallback and self._full is not None:
                self._pool.submit(self._run_local, rid, p, "server timed out")
            else:
                self._finish(
                    rid,
                    error=EdgeError(f"request {rid}: no reply within {self.config.timeout_s} s", "timeout"),
                )
