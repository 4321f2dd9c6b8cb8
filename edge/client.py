"""The edge client: runs the head, ships the cut tensor, matches replies, falls back locally.

The request path has no hand-off between threads: the thread that calls ``infer`` runs the head,
encodes, sends on the socket and, while nobody else is receiving, receives its own reply
(``connection.py``). ``submit`` runs the head on a small pool so that several requests are in flight
at once (the window) and head compute, transfer and the server's tail overlap; the replies are picked
up by whichever thread holds the socket, usually the background thread. That thread also enforces
deadlines, tracks the server's liveness (ZeroMQ's heartbeats and connection events, plus a ping when
idle for the round-trip estimate) and publishes metrics.

Every request gets exactly one answer or one explicit error: a request id is resolved once, whoever
gets there first (the reply, the deadline, a malformed reply, or shutdown), and late replies are
ignored. A request answered at its deadline is still on the link, though: it keeps its place in the
window until its late reply comes (or its connection drops, or four timeouts pass and it is taken for
lost), so a link slower than the arrivals holds at most ``window`` requests, not ever more behind
ones already given up on. And a request that the link's queue would hold past its timeout is not
sent at all (``busy``, or a local run): a backed-up link keeps answering what it can in time instead
of nothing (a 5.8 Mbit/s LTE uplink given a camera's frames faster than it carried them answered none
after its first few seconds, on LTE and on the Wi-Fi after it).

While the server is unreachable, busy or silent and the plan ships the whole model, requests
run locally and say so (``fallback=True``) in the result and in telemetry. A failure of the background
thread fails every open request explicitly and makes the client refuse new ones (``fatal``).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from splitpoint.core import endpoints, wire
from splitpoint.core.codecs import CodecError, decode, encode
from splitpoint.core.curve import GAVE_UP, HANDSHAKE_FAILED, Redial, handshake_failed
from splitpoint.core.errors import PlanError, SplitPointError, describe
from splitpoint.core.plan import EDGE_ONLY, FULL_FILE, HEAD_FILE, Plan, hold_plan, release_plan
from splitpoint.core.runner import (
    HeadRunner,
    available_memory,
    check_fits,
    check_stage_chain,
    input_shapes,
    make_session,
    mismatch,
    output_expects,
    symbol_conflict,
)
from splitpoint.core.telemetry import Telemetry

from .config import EdgeConfig
from .connection import DOWN_EVENTS, UP_EVENTS, Connection
from .estimator import LinkEstimator

# a split answer's timed parts (ms); ``edge_wait_ms`` is the total less these: waiting on the edge (for a
# worker, for room in the window) and the runtime's own time there
SPLIT_PARTS = (
    "head_ms",
    "encode_ms",
    "network_ms",
    "server_queue_ms",
    "server_decode_ms",
    "tail_ms",
    "server_encode_ms",
    "decode_ms",
)

log = logging.getLogger("splitpoint.edge")
PING_BASE = 2**62  # ping ids live apart from request ids
# server errors that a local run can answer instead: busy, a later stage of a chain out of reach, or a
# server that does not serve the plan (a deploy that reached the edge and not it): to the device, each is a
# server it cannot use now
FALLBACK_CODES = {wire.E_BUSY, wire.E_UNAVAILABLE, wire.E_UNKNOWN_PLAN}


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
    future: Future | None  # submit()'s; infer() waits on ``done`` without one
    feeds: dict
    t_submit: float
    # when the caller asked (perf_counter): before any wait for room in the window, which total_ms and
    # edge_wait_ms count (they began after it, and a request that waited 400 ms for room said 48)
    t_called: float = 0.0
    t_sent: float = 0.0
    deadline: float = 0.0
    started: bool = False  # taken up by a worker (its head or local model running, or sent)
    head_ms: float = 0.0
    encode_ms: float = 0.0
    bytes_sent: int = 0
    early: dict = field(default_factory=dict)
    replied: bool = False  # its reply came: off the link, whatever answers the caller
    connection: int = 0  # the connection it went out on (the client's count of dropped ones then)
    done: bool = False
    result: EdgeResult | None = None
    error: Exception | None = None
    # a leg of a hedged request (AdaptiveClient): another member answers the caller too, so this one
    # never falls back to the local model (the edge runs it for the request already) and publishes no
    # latency sample (the set publishes the answer the caller got)
    fallback: bool = True
    report: bool = True


def refuse_decoder(plan: Plan) -> None:
    """A decoder's head reads the KV cache it keeps between steps, which a one-shot request does not carry:
    the daemon took such a plan and then failed every request with a KeyError from inside the head."""
    if plan.decoder is not None:
        raise PlanError(
            f"plan {plan.plan_id[:12]} splits a decoder: its edge side runs with `splitpoint generate "
            "PLAN_DIR --server …` (which keeps the edge's KV cache), not as a one-shot edge client or daemon"
        )


class EdgeClient:
    def __init__(
        self,
        config: EdgeConfig,
        telemetry: Telemetry | None = None,
        report: Callable[[], None] | None = None,
        ids: Iterator[int] | None = None,
    ):
        """``telemetry``: a publisher the caller owns and keeps across clients (the daemon's, which
        outlives a switch of plans); without one the client makes and closes its own. ``report``: an
        owner that publishes this client's status and metrics together with others' (a plan set's
        members are one device), called when this client's status changes. ``ids``: request ids from a
        counter the owner shares among its clients, so that one device's requests have one id each in
        results and telemetry (each member of a set counting from 1 gave half of them a twin)."""
        self.config = config
        self._held: int | None = None
        self.plan = Plan.load(config.plan_dir, role="edge")
        refuse_decoder(self.plan)
        d = Path(config.plan_dir)
        head = make_session(d / HEAD_FILE, config.threads) if HEAD_FILE in self.plan.files else None
        check_stage_chain(self.plan)
        if head is not None:  # as a deploy checks it: a head swapped for another model failed every request
            check_fits(self.plan, HEAD_FILE, head)
        self._head = HeadRunner(self.plan, head)
        self._order = [o.name for o in self.plan.outputs]  # the model's outputs, in its order
        self._out_expect = output_expects(self.plan)
        self._in_shapes = input_shapes(self.plan)  # a result's batch must be its request's
        self._out_shapes = {n: shape for n, (_, shape) in self._out_expect.items()}
        self.local_only = self.plan.kind == EDGE_ONLY
        self._full = None
        if config.fallback and FULL_FILE in self.plan.files and not (d / FULL_FILE).is_file():
            raise PlanError(
                f"{d}: the plan lists {FULL_FILE} (its model for falling back) but the file is missing: "
                "copy the whole plan directory, or run with --no-fallback"
            )
        if (config.fallback or self.local_only) and ((d / FULL_FILE).is_file() or self.local_only):
            path = d / (FULL_FILE if (d / FULL_FILE).is_file() else HEAD_FILE)
            # the file and its external data: full.onnx alone is a few KB where its weights are beside it
            mine = [n for n in self.plan.files if n == path.name or n.startswith(f"{path.name}.")]
            if path.name == HEAD_FILE and head is not None:
                self._full = head  # an edge-only plan's head is the whole model: loaded once, not twice
            elif available_memory() > 3 * sum((d / n).stat().st_size for n in mine if (d / n).is_file()):
                self._full = make_session(path, config.threads)
                check_fits(self.plan, path.name, self._full)
            else:
                log.warning("not enough free memory to keep the fallback model loaded")
        self._ids = ids if ids is not None else itertools.count(1)
        self._ping_ids = itertools.count(PING_BASE)
        self._pings: dict[int, float] = {}
        self._pending: dict[int, _Pending] = {}
        # answered at their deadline but still on the link: id -> (bytes sent, when to stop waiting)
        self._ghosts: dict[int, tuple[int, float]] = {}
        self._said_refused = False  # a refused handshake logged (once)
        self._dropped = 0  # connections to the server dropped so far: a request sent before one is gone
        self._lock = threading.Lock()  # the pending table (never held while taking the socket's lock)
        self._waiting = 0  # infer() callers receiving their own replies
        self._window = threading.BoundedSemaphore(config.window)
        self._pool = ThreadPoolExecutor(max_workers=config.head_workers, thread_name_prefix="splitpoint-head")
        self._stop = threading.Event()
        self._closing = False
        self._closed = False
        self.fatal: BaseException | None = None
        self.server_up = False
        self._last_heard = 0.0
        self.link = LinkEstimator()  # uplink and round trip, from this client's own requests and pings
        # an owner that publishes this client's health with its siblings' (a plan set): status changes
        # call it instead, and the client publishes no metrics of its own
        self.report = report
        # whether the server serves this plan: None until a pong (which lists them) or a refusal says
        self.plan_served: bool | None = None
        self._told_unserved: set[str] = set()  # where a refusal of the plan was logged: "" the server
        # answered by the split, by the local model, failed; and (the daemon's) refused before reaching
        # this client: a daemon hands the same counts to the client of each plan it switches to
        self.counts = {"ok": 0, "fallback": 0, "errors": 0, "rejected": 0}
        self._own_telemetry = telemetry is None
        self.telemetry = telemetry or (
            Telemetry(config.device_id, "edge", config.mqtt) if config.mqtt else None
        )
        self._conn = Connection(zmq.Context.instance(), config, self._on_message)
        # a socket pair, not a pipe: a wake-up sent after close() meets a closed socket object (an error),
        # where a closed pipe's number may already be another file's
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._pid = os.getpid()  # a forked child that uses this client would share the parent's sockets
        self._io = threading.Thread(target=self._io_loop, name="splitpoint-edge-io", daemon=True)
        self._io.start()
        # TCP connects asynchronously: without a short wait the first requests would find no
        # connected peer and fall back although the server is there
        end = time.monotonic() + (0 if self.local_only else config.connect_grace_s)
        while not self.server_up and time.monotonic() < end and self.fatal is None:
            time.sleep(0.005)
        # said, as "reachable" is (a plan set's member is lent a fallback later: its owner speaks for it)
        if (
            not self.local_only
            and not self.server_up
            and self.fatal is None
            and report is None
            and config.connect_grace_s > 0
        ):
            log.warning(
                "server %s has not answered yet (%.1f s%s): %s until it does",
                config.server,
                config.connect_grace_s,
                f"; {problem}" if (problem := endpoints.name_problem(config.server)) else "",
                "requests run on the local model"
                if self._full is not None
                else f"requests get an error ({self._why_no_fallback()})",
            )
        self._publish_status()
        # held while this client runs on it: a daemon's sweep of pushed plans passes it by
        self._held = hold_plan(config.plan_dir)

    # -- public API ----------------------------------------------------------------------------
    def submit(self, feeds: dict[str, np.ndarray], *, report: bool = True) -> Future:
        """Start one inference, waiting for room in the window; the future yields an EdgeResult or
        raises EdgeError. The wait is bounded as a reply is: once the server is taken for unreachable
        (the window then holds requests that will not be answered soon), or after ``timeout_s``, the
        request runs on the local model where there is one, else fails with ``timeout`` (a caller
        blocked here for as long as a stalled server kept the window full sent nothing meanwhile).
        The calling thread blocks while the window is full: an event loop calls ``try_submit``. A future
        cancelled before its request started is dropped; once started, ``cancel()`` returns False."""
        got = self._admit(feeds, True, None, report)
        assert got is not None, "without a timeout of the caller's, admission ends in a request or a future"
        if isinstance(got, Future):
            return got
        return self._launch(*got)

    def try_submit(
        self,
        feeds: dict[str, np.ndarray],
        block: bool = False,
        wait_s: float | None = None,
        *,
        fallback: bool = True,
        report: bool = True,
        called: float | None = None,
    ) -> Future | None:
        """``submit`` without waiting (or, with ``block``, waiting ``wait_s`` at most): None while the
        window is full (a socket loop that must keep answering holds the request itself and tries
        again). ``fallback=False``: an error, not the local model, where the server cannot answer;
        ``report=False``: no latency sample (both for a leg of a hedged request); ``called``: when the
        request came (``time.perf_counter()``), where it waited before this call: its total counts it."""
        called = time.perf_counter() if called is None else called  # a blocking call's wait counts too
        got = self._enqueue(feeds, Future(), block, wait_s, fallback=fallback, report=report, called=called)
        return None if got is None else self._launch(*got)

    def infer(
        self, feeds: dict[str, np.ndarray], timeout: float | None = None, *, report: bool = True
    ) -> EdgeResult:
        """One inference, blocking, entirely in the calling thread unless others are in flight.
        ``timeout`` bounds the wait (TimeoutError); the request's own deadline is ``timeout_s``;
        ``report=False``: no latency sample (a plan set publishes its own, naming the member). A full
        window is waited for as ``submit`` waits for it (then the local model answers, where there is one)."""
        end = time.monotonic() + (timeout if timeout is not None else float("inf"))
        got = self._admit(feeds, False, timeout, report)
        if got is None:
            raise FutureTimeout(
                f"no room among the {self.config.window} requests in flight within {timeout} s"
            )
        if isinstance(got, Future):  # answered locally, or failed, past a full window
            return got.result(None if timeout is None else max(0.0, end - time.monotonic()))
        rid, p = got
        counted = False
        try:
            with self._lock:
                # while every request in flight has a caller waiting, the background thread leaves the
                # socket alone: no second thread wakes (and fights for the GIL) per reply
                self._waiting += 1
                counted = True
            self._start(rid, p)
            while not p.done:
                left = end - time.monotonic()
                if left <= 0:
                    raise FutureTimeout(f"request {rid} not answered within {timeout} s")
                # alone, wait for the reply on the socket; with others in flight, in short turns
                turn = 0.05 if len(self._pending) <= 1 else 0.002
                self._conn.receive(min(left, turn))
        except BaseException as exc:
            # the caller stopped waiting (Ctrl-C in its thread): the request ends here, or one stopped
            # before it was sent (no deadline yet) held its place in the window for good and every later
            # call blocked. A timeout leaves it to its own deadline, as documented
            # and its place is given back at once: its reply may have been read and lost with the
            # interruption (Ctrl-C inside the socket's drain), and kept as still on the link it held a
            # window of 1 for 4 × timeout_s (10 s)
            if not isinstance(exc, FutureTimeout) and not p.done:
                why = EdgeError(f"request {rid}: its caller was interrupted", "interrupted")
                self._finish(rid, error=why, forget=True)
            raise
        finally:
            if counted:
                with self._lock:
                    self._waiting -= 1
                if not p.done or (p.t_sent and not p.replied):
                    # left to its deadline, or answered but still on the link: the background thread
                    # watches for its reply now (it was asleep while this caller watched), and reads what
                    # came meanwhile (a reply whose signal this thread took as it was interrupted)
                    self._wake()
        if p.error is not None:
            raise p.error
        assert p.result is not None
        return p.result

    def close(self, drain: bool = True, timeout: float = 10.0) -> None:
        """Stop taking requests; with ``drain``, let those in flight finish first (SIGTERM). Once: a second
        call (a ``with`` block's end after an explicit close) does nothing. The client's models are let go
        here, not when the garbage collector finds it: a process that made and closed clients one after
        another grew by a model each (100 MobileNetV2 clients: 890 MB against 150 MB)."""
        if os.getpid() != self._pid:
            # a forked child's copy: the sockets, threads and files are the parent's to close, and the
            # lock may have been held by a parent's thread at the fork (taken, it never returned)
            self._closed = self._closing = True
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._closing = True  # under the lock: a request admitted after this is refused, none is lost
        end = time.monotonic() + timeout
        while drain and self._pending and time.monotonic() < end and self.fatal is None:
            self._conn.receive(0.01)
        with self._lock:
            left = list(self._pending)
        for rid in left:
            self._finish(rid, error=EdgeError("client closed before the request finished", "closed"))
        self._drop_ghosts()
        self._stop.set()
        self._wake()
        self._io.join(5)
        self._pool.shutdown(wait=True)
        self._conn.close()
        self._wake_r.close()
        self._wake_w.close()
        self.publish_metrics()
        if self.telemetry and self._own_telemetry:
            self.telemetry.close()
        release_plan(self._held)
        self._held = None
        self._full = None
        self._head.session = None

    def __enter__(self) -> EdgeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- resolution: exactly once --------------------------------------------------------------
    def _enqueue(
        self,
        feeds: dict[str, np.ndarray],
        future: Future | None,
        block: bool,
        wait_s: float | None = None,
        *,
        fallback: bool = True,
        report: bool = True,
        called: float | None = None,
    ) -> tuple[int, _Pending] | None:
        if self.fatal is not None:
            raise EdgeError(f"the edge client stopped working: {self.fatal}", "internal")
        if self._closing:
            raise EdgeError("client is shutting down", "closed")
        if os.getpid() != self._pid:  # its sockets and threads are the parent's: the child spun for ever
            raise EdgeError(
                f"this client was made in process {self._pid}, before a fork: a forked process makes its "
                "own EdgeClient",
                "closed",
            )
        got = (
            self._window.acquire(True, wait_s)
            if block and wait_s is not None
            else self._window.acquire(block)
        )
        if not got:
            return None
        rid = -1
        try:  # the place taken is the request's from here: an interruption gives it back, once
            rid = next(self._ids)
            now = time.perf_counter()
            p = _Pending(
                future, feeds, now, now if called is None else called, fallback=fallback, report=report
            )
            with self._lock:
                # checked again under the lock close() takes its list with: a caller that waited for room
                # while close() ran got in after the list was taken, and its future never ended
                if self._closing:
                    raise EdgeError("client is shutting down", "closed")
                self._pending[rid] = p
        except BaseException:
            with self._lock:
                self._pending.pop(rid, None)
            self._window.release()
            raise
        return rid, p

    def _admit(
        self, feeds: dict[str, np.ndarray], with_future: bool, timeout: float | None, report: bool
    ) -> tuple[int, _Pending] | Future | None:
        """Room in the window for ``submit`` and ``infer``, waited for alike: the request once there is
        room; a future answered by the local model (or failed) once the server is taken for unreachable
        or ``timeout_s`` passed with the window full; None once the caller's ``timeout`` passed first."""
        t0, called = time.monotonic(), time.perf_counter()
        while True:
            turn = 0.05 if timeout is None else min(0.05, max(0.0, t0 + timeout - time.monotonic()))
            got = self._enqueue(
                feeds, Future() if with_future else None, True, turn, report=report, called=called
            )
            if got is not None:
                return got
            waited = time.monotonic() - t0
            if timeout is not None and waited >= timeout:
                return None
            if self.server_up and waited <= self.config.timeout_s:
                continue
            why = f"waited {waited:.1f} s for room among the {self.config.window} requests in flight" + (
                "" if self.server_up else " (server unreachable)"
            )
            try:
                local = self.fall_back(feeds, why, report=report)
            except SplitPointError as exc:  # as _start answers a bad input: in the future, not raised
                local = failed_future(EdgeError(str(exc), "bad-input"))
            if local is not None:
                return local
            if waited > self.config.timeout_s:
                return failed_future(EdgeError(why, "timeout"))

    def _launch(self, rid: int, p: _Pending) -> Future:
        """A submitted request to a head worker; its future."""
        assert p.future is not None
        try:
            self._pool.submit(self._start, rid, p)
        except RuntimeError:  # the pool shut down: close() ran since the request was admitted
            self._finish(rid, error=EdgeError("client closed before the request started", "closed"))
            return p.future
        self._wake()  # the background thread starts watching the socket for its reply
        return p.future

    def _wake(self) -> None:
        """Have the background thread look at the pending table and the socket again."""
        with contextlib.suppress(OSError):  # closed (the client shut down), or full (one is waiting)
            self._wake_w.send(b"w")

    def _finish(
        self,
        rid: int,
        result: EdgeResult | None = None,
        error: Exception | None = None,
        *,
        forget: bool = False,
    ) -> None:
        """``forget``: a request sent and not answered is not waited for (no ghost keeps its place)."""
        with self._lock:
            p = self._pending.pop(rid, None)
            if p is None:
                return  # already answered (a late reply after a timeout, say)
            unanswered = bool(p.t_sent) and not p.replied
            # answered, but still on the link; unless its connection dropped since: then it is gone with
            # it (a relay killed and restarted with four in flight kept the edge's window full for four
            # timeouts after it was back)
            gone = unanswered and (forget or p.connection != self._dropped)
            if unanswered and not gone:
                self._ghosts[rid] = (p.bytes_sent, p.t_sent + 4 * self.config.timeout_s)
        if gone:
            self.link.cleared(p.bytes_sent)
        if not p.t_sent or p.replied or gone:
            self._window.release()
        if p.future is not None and p.future.cancelled():  # its caller stopped waiting: nobody to tell
            p.error, p.done = error or EdgeError("cancelled by its caller", "cancelled"), True
            return
        if error is not None:
            self.counts["errors"] += 1
            p.error, p.done = error, True
            if p.future is not None:
                _settle(p.future, error=error)
            return
        assert result is not None, "a request finishes with a result or an error"
        self.counts["fallback" if result.fallback else "ok"] += 1
        b = result.breakdown
        b["total_ms"] = (time.perf_counter() - (p.t_called or p.t_submit)) * 1e3
        if "network_ms" in b:  # a split answer: what its timed parts leave is time spent on the edge
            b["edge_wait_ms"] = max(0.0, b["total_ms"] - sum(float(b.get(k) or 0.0) for k in SPLIT_PARTS))
        if self.telemetry and p.report:
            self.telemetry.latency({"request": rid, "fallback": result.fallback, **result.breakdown})
        p.result, p.done = result, True
        if p.future is not None:
            _settle(p.future, result)

    # -- the request path ----------------------------------------------------------------------
    def _start(self, rid: int, p: _Pending) -> None:
        """Head, encode and send, in the calling thread; or answer locally. Never raises."""
        with self._lock:
            if rid not in self._pending:
                return  # it waited for a worker past its deadline and was answered with an error
            # under the lock close() finishes requests with: settled there first, it is not pending here
            cancelled = p.future is not None and not p.future.set_running_or_notify_cancel()
            p.started = True
        if cancelled:
            self._finish(rid)  # cancelled before it started: nothing runs, its place is free again
            return
        try:
            self._head.check_inputs(p.feeds)
            if self.local_only or (not self.server_up and self._full is not None and self._last_heard > 0):
                self._run_local(rid, p, "server unreachable")
                return
            t0 = time.perf_counter()
            sent, early = self._head.run(p.feeds)
            t1 = time.perf_counter()
            names = list(sent)
            frames = [encode(sent[n], self.plan.codec) for n in names]
            t2 = time.perf_counter()
            nbytes = sum(len(f) for f in frames)
            p.head_ms, p.encode_ms, p.early = (t1 - t0) * 1e3, (t2 - t1) * 1e3, early
            if self._backed_up(rid, p, nbytes):
                return
            p.bytes_sent = nbytes
            msg = wire.Message(wire.INFER, rid, self.plan.plan_id, names, frames=frames)
            self.link.sent(nbytes)
            p.t_sent = time.perf_counter()
            p.deadline = p.t_sent + self.config.timeout_s
            p.connection = self._dropped
            if not self._conn.send(msg.to_frames()):  # no server connected: do not queue, degrade now
                self.link.cleared(nbytes)
                p.t_sent = 0.0
                self._set_up(False)
                self._run_local(rid, p, "server unreachable")
        except SplitPointError as exc:
            self._finish(rid, error=EdgeError(str(exc), "bad-input"))
        except Exception as exc:  # onnxruntime rejects wrong shapes/dtypes with its own errors
            self._finish(rid, error=EdgeError(f"head failed: {describe(exc)}", "bad-input"))

    def _backed_up(self, rid: int, p: _Pending, nbytes: int) -> bool:
        """Whether the request stays off a link whose queue would hold it past its timeout (answered
        locally, or ``busy``). Only behind other requests: a lone one is always sent, since only
        requests tell the estimate that the link got better."""
        if not self.link.in_pipe:
            return False
        wait = self.link.wait_s(nbytes)
        if wait is None or wait <= self.config.timeout_s:
            return False
        if self.config.fallback and self._full is not None:
            self._run_local(rid, p, "uplink backed up")
            return True
        up = self.link.uplink_mbps or 0.0
        why = (
            f"request {rid} not sent: {self.link.in_pipe / 1024:.0f} KiB of earlier requests are still on "
            f"the uplink (estimated {up:.3g} Mbit/s): an answer in about {wait:.1f} s, past the "
            f"{self.config.timeout_s} s timeout"
        )
        self._finish(rid, error=EdgeError(why, wire.E_BUSY))
        return True

    def _off_the_link(self, rid: int) -> None:
        """A late reply to a request already answered: its place in the window is free again."""
        with self._lock:
            ghost = self._ghosts.pop(rid, None)
        if ghost is not None:
            self.link.cleared(ghost[0])
            self._window.release()

    def _drop_ghosts(self, now: float | None = None) -> None:
        """Stop waiting for late replies: all (the connection dropped them), or those past their time."""
        with self._lock:
            gone = [r for r, (_, end) in self._ghosts.items() if now is None or now > end]
        for rid in gone:
            self._off_the_link(rid)

    def _why_no_fallback(self) -> str:
        if not self.config.fallback:
            return "local fallback is off (--no-fallback)"
        if (Path(self.config.plan_dir) / FULL_FILE).is_file():
            return "the plan's full model was not loaded for fallback (not enough free memory at start)"
        return "the plan ships no full model to fall back on (write it with `plan` or `split` --with-full)"

    def _run_local(self, rid: int, p: _Pending, why: str) -> None:
        if self._full is None or not (p.fallback or self.local_only):
            msg = f"{why}, and {self._why_no_fallback() if p.fallback else 'the request is hedged'}"
            self._finish(rid, error=EdgeError(msg, "unreachable" if "unreachable" in why else "timeout"))
            return
        try:
            self._finish(rid, self._local_result(rid, p.feeds, why))
        except EdgeError as exc:
            self._finish(rid, error=exc)

    def _local_result(self, rid: int, feeds: dict[str, np.ndarray], why: str) -> EdgeResult:
        """The whole model run here (``_full`` set), or EdgeError."""
        assert self._full is not None
        try:
            t0 = time.perf_counter()
            names = [o.name for o in self._full.get_outputs()]
            outs = self._full.run(names, {i.name: feeds[i.name] for i in self._full.get_inputs()})
            ms = (time.perf_counter() - t0) * 1e3
        except Exception as exc:
            raise EdgeError(f"local model failed: {describe(exc)}", "bad-input") from exc
        by = dict(zip(names, outs, strict=True))
        reason = "edge-only plan" if self.local_only else why
        breakdown = {"local_ms": ms, "reason": reason}
        return EdgeResult(rid, self._order, [by[n] for n in self._order], not self.local_only, breakdown)

    def fall_back(self, feeds: dict[str, np.ndarray], why: str, report: bool = True) -> Future | None:
        """Answer a request locally that could not be sent in time (it waited past ``timeout_s`` for room
        in the window), outside the window; None where there is no local model to fall back on."""
        if self._full is None or not self.config.fallback:
            return None
        self._head.check_inputs(feeds)
        fut: Future = Future()
        rid = next(self._ids)
        t0 = time.perf_counter()

        def run() -> None:
            if not fut.set_running_or_notify_cancel():
                return  # cancelled before it ran: not run, not counted
            try:
                result = self._local_result(rid, feeds, why)
            except EdgeError as exc:
                self.counts["errors"] += 1
                _settle(fut, error=exc)
                return
            self.counts["fallback"] += 1
            result.breakdown["total_ms"] = (time.perf_counter() - t0) * 1e3
            if self.telemetry and report:
                self.telemetry.latency({"request": rid, "fallback": True, **result.breakdown})
            _settle(fut, result)

        self._pool.submit(run)
        return fut

    # -- replies (called by whichever thread holds the socket) ---------------------------------
    def _on_message(self, frames: list) -> None:
        try:
            self._on_reply(frames)
        except Exception:  # one bad reply never stops the client: its request fails, nothing else
            log.exception("a reply could not be handled")
            self._finish(
                wire.best_effort_id(frames), error=EdgeError("a reply could not be handled", "bad-reply")
            )

    def _on_reply(self, frames: list) -> None:
        now = time.perf_counter()
        self._last_heard = now
        self._set_up(True)
        try:
            msg = wire.parse(frames, self.config.max_message_bytes)
        except wire.WireError as exc:
            rid = wire.best_effort_id(frames)
            log.warning("malformed reply (request %s): %s", rid or "?", exc)
            self._replied(rid)
            self._finish(rid, error=EdgeError(f"malformed reply from the server: {exc}", "bad-reply"))
            return
        if msg.type == wire.PONG:
            self._served(msg.meta.get("plans"))
            sent = self._pings.pop(msg.id, None)
            if sent is not None:
                self._pings.clear()  # answered: the background thread may stop watching the socket
                rtt = (now - sent) * 1e3
                self.link.observe_rtt(rtt)
            return
        self._replied(msg.id)
        with self._lock:
            p = self._pending.get(msg.id)
        if p is None:
            return
        if msg.type == wire.ERROR:
            code, text = str(msg.meta.get("code", "error"))[:40], str(msg.meta.get("message", ""))[:1000]
            if code not in wire.ERROR_CODES:  # a code the protocol does not have is no contract: passed on
                text, code = f"{code}: {text}", wire.E_INTERNAL  # as internal, as a relay does
            if code == wire.E_UNKNOWN_PLAN:
                self._set_served(False, text)
            if code in FALLBACK_CODES and self._full is not None and self.config.fallback:
                self._pool.submit(self._run_local, msg.id, p, f"server {code}")
            else:
                self._finish(
                    msg.id, error=EdgeError(f"server refused request {msg.id}: {code}: {text}", code)
                )
            return
        if msg.type != wire.RESULT:
            self._finish(
                msg.id, error=EdgeError(f"server answered {msg.type} to request {msg.id}", "bad-reply")
            )
            return
        try:
            result = self._result(msg, p, now)
        except EdgeError as exc:
            self._finish(msg.id, error=exc)
            return
        self._told_unserved.clear()  # served end to end: a later refusal is news again
        self._finish(msg.id, result)

    def _replied(self, rid: int) -> None:
        """Whatever the reply says, the request is off the link."""
        with self._lock:  # atomic with _finish's choice between freeing the slot and keeping a ghost
            p = self._pending.get(rid)
            first = p is not None and p.t_sent > 0 and not p.replied
            if p is not None:
                p.replied = True
        if first:
            assert p is not None
            self.link.cleared(p.bytes_sent)
        elif p is None:
            self._off_the_link(rid)

    def _result(self, msg: wire.Message, p: _Pending, now: float) -> EdgeResult:
        order = self._order
        try:
            t0 = time.perf_counter()
            late = {
                n: decode(wire.buffer(f), self.config.max_message_bytes)
                for n, f in zip(msg.tensors, msg.frames, strict=True)
            }
            dec_ms = (time.perf_counter() - t0) * 1e3
        except CodecError as exc:
            raise EdgeError(f"malformed result for request {msg.id}: {exc}", "bad-reply") from exc
        missing = [n for n in order if n not in p.early and n not in late]
        if missing:
            raise EdgeError(
                f"the server's result for request {msg.id} lacks the model's output(s) {missing[:8]}",
                "bad-reply",
            )
        outs = [p.early[n] if n in p.early else late[n] for n in order]
        for n, arr in late.items():  # what the application gets is what the plan says the model returns
            wrong = mismatch(n, arr, self._out_expect[n]) if n in self._out_expect else None
            if wrong is not None:
                raise EdgeError(
                    f"the server's result for request {msg.id} does not fit the plan: {wrong}", "bad-reply"
                )
        seen: dict[str, tuple[int, str]] = {}  # a result's batch must be its request's
        symbol_conflict(p.feeds, self._in_shapes, seen)
        other = symbol_conflict(late, self._out_shapes, seen)
        if other is not None:
            raise EdgeError(
                f"the server's result for request {msg.id} does not answer it: {other}", "bad-reply"
            )
        meta = msg.meta.get("server")
        server: dict[str, Any] = meta if isinstance(meta, dict) else {}
        total = server.get("total_ms")
        total = float(total) if isinstance(total, int | float) and 0 <= total < 1e9 else 0.0
        network = max(0.0, (now - p.t_sent) * 1e3 - total)
        if self.link.started:  # else no ping answered yet: the round trip inside ``network`` is unknown
            back = sum(wire.buffer_len(f) for f in msg.frames)
            self.link.observe(p.bytes_sent, network, sent_at=p.t_sent, reply_bytes=back)
        breakdown: dict[str, Any] = {
            "head_ms": p.head_ms,
            "encode_ms": p.encode_ms,
            "network_ms": network,
            "server_queue_ms": _ms(server.get("queue_ms")),
            "server_decode_ms": _ms(server.get("decode_ms")),
            "tail_ms": _ms(server.get("tail_ms")),
            "server_encode_ms": _ms(server.get("encode_ms")),
            "decode_ms": dec_ms,
            "bytes_sent": p.bytes_sent,
        }
        stages = msg.meta.get("stages")
        if isinstance(stages, list):  # a chain: each stage's own times, as its device measured them
            breakdown["stages"] = own = [s for s in stages[:16] if isinstance(s, dict)]
            # the top-level figures are the stages after the edge together, so that they add up to the
            # round trip: they were the first relay's, whose tail is a pass-through, and the last
            # stage's model time showed nowhere but in ``stages``
            for key, field in (
                ("server_queue_ms", "queue_ms"),
                ("server_decode_ms", "decode_ms"),
                ("tail_ms", "tail_ms"),
                ("server_encode_ms", "encode_ms"),
            ):
                breakdown[key] = sum(_ms(st.get(field)) or 0.0 for st in own)
            busy = sum(
                max(0.0, (_ms(st.get("total_ms")) or 0.0) - (_ms(st.get("next_ms")) or 0.0)) for st in own
            )
            breakdown["network_ms"] = max(0.0, (now - p.t_sent) * 1e3 - busy)  # every hop's
        return EdgeResult(msg.id, order, outs, fallback=False, breakdown=breakdown)

    @property
    def rtt_ms(self) -> float | None:
        """The round trip as this client's link estimate has it (pings' median)."""
        return self.link.rtt_ms

    @property
    def bandwidth_mbps(self) -> float | None:
        """The uplink as this client's link estimate has it (None until it has samples to tell)."""
        return self.link.uplink_mbps

    def _served(self, plans: object) -> None:
        """A pong's list of the plans the server serves (protocol.md): whether it has this one."""
        if isinstance(plans, list) and len(plans) <= 10_000:
            self._set_served(self.plan.plan_id in plans)

    def _set_served(self, served: bool, why: str = "") -> None:
        """``why``: the refusal's text; a relay's says which stage behind it refused ("stage 2: ...")."""
        if self.local_only or served == self.plan_served:
            return  # an edge-only plan is served by no server: nothing to tell
        self.plan_served = served
        behind = why.split(":", 1)[0] if re.match(r"stage \d+:", why) else ""
        if served or behind in self._told_unserved:
            # a relay lists the plan in its pongs whether or not the stages behind it serve it: said
            # once until a request is served end to end, not after each pong
            return
        self._told_unserved.add(behind)
        log.warning("%s", self.unserved_note(behind))

    def unserved_note(self, behind: str = "") -> str:
        """What a peer that does not serve this plan means here, and which deploy fixes it: said in the
        log and in a deploy's answer. ``behind``: the stage behind a relay that refused ("stage 2")."""
        if behind:
            where = f"{behind}, behind the relay at {self.config.server},"
            stage = int(behind.split()[-1])
            last = stage >= len(self.plan.stages) - 1
            how = "--server ENDPOINT" if last else f"--relay {stage}=ENDPOINT"
        elif len(self.plan.stages) > 2:  # the edge's peer is the relay that runs stage 1
            where, how = f"the relay at {self.config.server}", f"--relay 1={self.config.server}"
        else:
            where, how = f"the server at {self.config.server}", f"--server {self.config.server}"
        then = (
            "requests run on this device's whole model (fallback)"
            if self._full is not None and self.config.fallback
            else "every request over it is refused"
        )
        return (
            f"{where} does not serve plan {self.plan.plan_id[:16]}: deploy it there "
            f"(`splitpoint deploy PLAN_DIR {how}`); until then {then}"
        )

    def lend_fallback(self, other: EdgeClient) -> None:
        """Fall back on ``other``'s whole model where this plan ships none (a plan set's edge-only
        member serves every member; one session, loaded once)."""
        if self._full is None and self.config.fallback and not self.local_only and other._full is not None:
            self._full = other._full

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def _set_up(self, up: bool) -> None:
        if up != self.server_up:
            self.server_up = up
            if up:
                log.info("server reachable")
            else:
                log.info(
                    "server unreachable: %s",
                    "falling back to the local model"
                    if self._full is not None
                    else "each request gets an error (no local model to fall back on)",
                )
            self._publish_status()

    @property
    def cannot_fall_back(self) -> str | None:
        """Why this client, told to fall back, has no local model to do so (None: it has one, or it was
        not told to)."""
        if not self.config.fallback or self.local_only or self._full is not None:
            return None
        return self._why_no_fallback()

    @property
    def falling_back(self) -> bool:
        """Answering from the local model now (an edge without one fails its requests instead)."""
        return not self.server_up and self._full is not None and not self.local_only

    def _publish_status(self) -> None:
        if self.report is not None:
            self.report()
        elif self.telemetry:
            status = {
                "plan": self.plan.plan_id,
                # an edge-only plan talks to no server: none named, and none down (a dashboard that
                # alerted on server_up false fired for every edge-only device)
                "server": None if self.local_only else self.config.server,
                "server_up": None if self.local_only else self.server_up,
                "fallback": self.falling_back,
                "edge_only": self.local_only,  # no server by design: its being down fails nothing
            }
            self.telemetry.status("online", status)

    # -- the background thread -----------------------------------------------------------------
    def _io_loop(self) -> None:
        try:
            self._watch()
        except BaseException as exc:  # the client cannot keep its promises without this thread
            self.fatal = exc
            log.critical("the edge client's background thread died", exc_info=exc)
            with self._lock:
                left = list(self._pending)
            for rid in left:
                self._finish(rid, error=EdgeError(f"the edge client stopped working: {exc}", "internal"))

    def _watch(self) -> None:
        poller = zmq.Poller()
        poller.register(self._conn.monitor, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        watching = False
        next_ping = next_metrics = 0.0
        redial = Redial()  # a new socket after libzmq gave up on a refused handshake (GAVE_UP)
        while not self._stop.is_set():
            if redial.due(time.perf_counter()):
                old_monitor, old_fd = self._conn.monitor, self._conn.fd
                try:
                    self._conn.reopen()
                except zmq.ZMQError as exc:  # no socket to be had now (descriptors): the old one stays
                    log.warning("cannot open a new connection to the server yet: %s", exc)
                    redial.retry(time.perf_counter())
                else:
                    redial.dialled()
                    poller.unregister(old_monitor)
                    if watching:
                        poller.unregister(old_fd)
                        watching = False
                    poller.register(self._conn.monitor, zmq.POLLIN)
            with self._lock:  # replies nobody waits for: pipelined requests, late ones, or its own ping
                watch = len(self._pending) > self._waiting or bool(self._pings) or bool(self._ghosts)
            if watch != watching:
                if watch:
                    poller.register(self._conn.fd, zmq.POLLIN)
                    # ZMQ_FD signals new activity only: a reply that came while a caller held the socket
                    # and was interrupted before reading it would wait for the next message
                    self._conn.receive(lock_wait=0.05)
                else:
                    poller.unregister(self._conn.fd)
                watching = watch
            events = dict(poller.poll(20 if self._pending else int(self.config.heartbeat_s * 1000)))
            if self._wake_r in events:
                with contextlib.suppress(OSError):
                    self._wake_r.recv(4096)
            if self._conn.monitor in events:
                for ev in self._conn.monitor_events():
                    if ev & UP_EVENTS:
                        self._set_up(True)
                        self._last_heard = time.perf_counter()
                        redial.connected()
                        self._said_refused = False  # a refusal after this one is news again
                    elif ev & DOWN_EVENTS:
                        if ev & GAVE_UP:  # refused: libzmq will not dial again
                            redial.refused(time.perf_counter())
                        if ev & HANDSHAKE_FAILED and not self._said_refused:
                            self._said_refused = True  # once: the client dials again, 2 s to 30 s apart
                            curve = bool(self.config.curve_server_key)
                            # a plain connection's peer closing during the greeting (a server restarting)
                            # is no key to check: said, not warned about
                            log.log(
                                logging.WARNING if curve else logging.INFO,
                                "%s",
                                handshake_failed(self.config.server, curve),
                            )
                        # replies that came before the close are read first: a server that answered
                        # and then stopped (its drain) had its last answers failed as lost
                        self._conn.receive(lock_wait=0.05)
                        with self._lock:
                            self._dropped += 1
                        self._set_up(False)
                        self._drop_ghosts()  # what was on the dropped connection is gone with it
                        self._lost_with_connection()
            if self._conn.fd in events:
                self._conn.receive(lock_wait=0.05)
            now = time.perf_counter()
            # the link idle, or the server quiet: a ping refreshes the round-trip estimate and finds it
            # again. Idle is the link's (nothing sent and unanswered, by any client sharing it: a ping
            # queued behind payloads would read the queue as round trip), not this client's: requests
            # still in the head send nothing yet, and an edge that always has one there (a camera's
            # frames on a slow device) never pinged, so its round trip stayed that of an earlier link
            # (Wi-Fi's 9 ms through a 3G phase) and the uplink was judged from the wrong one
            idle = not self.link.in_pipe
            if now >= next_ping and (idle or not self.server_up):
                next_ping = now + self.config.heartbeat_s
                pid = next(self._ping_ids)
                self._pings = {k: t for k, t in self._pings.items() if now - t < self.config.dead_after_s}

                def stamp(pid: int = pid) -> None:
                    self._pings[pid] = time.perf_counter()

                self._conn.send(wire.Message(wire.PING, pid).to_frames(), before=stamp)
            self._check_deadlines(now)
            if self._ghosts:
                self._drop_ghosts(now)
            if now >= next_metrics:
                next_metrics = now + 2.0
                self.publish_metrics()

    def publish_metrics(self) -> None:
        """Counts since the process started, the link estimates, the host's figures (every 2 s, and
        once more as the client closes: a short run's requests were never reported)."""
        if self.telemetry and self.report is None:
            self.telemetry.metrics(
                {
                    "server_up": None if self.local_only else self.server_up,  # as in its status
                    "in_flight": len(self._pending),
                    "rtt_ms_est": self.rtt_ms,
                    "rtt_ms_est_age_s": self.link.rtt_age_s(),  # since the last ping: old on a busy link
                    "bandwidth_mbps_est": self.bandwidth_mbps,
                    **self.counts,
                }
            )

    def _lost_with_connection(self) -> None:
        """Requests sent on a connection that dropped get no reply (libzmq sends nothing again): each falls
        back or fails now, not at its deadline (a relay killed with three in flight held them the whole
        --timeout while the client already knew the server was gone)."""
        with self._lock:
            lost = [
                (rid, p)
                for rid, p in self._pending.items()
                if p.deadline and p.t_sent and not p.replied and p.connection < self._dropped
            ]
        for rid, p in lost:
            p.deadline = 0.0
            if self.config.fallback and self._full is not None:
                self._pool.submit(self._run_local, rid, p, "connection to the server dropped")
            else:
                why = f"request {rid}: the connection to the server dropped with it in flight"
                self._finish(rid, error=EdgeError(why, "unreachable"))

    def _check_deadlines(self, now: float) -> None:
        limit = self.config.timeout_s
        with self._lock:
            late = [(rid, p) for rid, p in self._pending.items() if p.deadline and now > p.deadline]
            # waiting for a worker (the head or the local model busy with earlier requests) as long
            # as a reply may take: the caller hears so now, not whenever a worker is free
            waiting = [rid for rid, p in self._pending.items() if not p.started]
            queued = [rid for rid in waiting if now - self._pending[rid].t_submit > limit]
        for rid in queued:
            why = f"request {rid}: not started within {limit} s: the edge is busy ({len(waiting)} waiting)"
            self._finish(rid, error=EdgeError(why, "timeout"))
        if late and self._full is not None:
            self._set_up(False)  # connected but silent: new requests run locally until it answers a ping
        for rid, p in late:
            p.deadline = 0.0
            if p.t_sent and not p.replied:  # the link's rate is at most its bytes over the wait
                self.link.unanswered(p.bytes_sent, (now - p.t_sent) * 1e3)
            if self.config.fallback and self._full is not None:
                self._pool.submit(self._run_local, rid, p, "server timed out")
            else:
                self._finish(
                    rid,
                    error=EdgeError(f"request {rid}: no reply within {self.config.timeout_s} s", "timeout"),
                )


def failed_future(error: Exception) -> Future:
    """A future that has failed already: an answer given before any work (a bad input, no room)."""
    fut: Future = Future()
    fut.set_exception(error)
    return fut


def _settle(future: Future, result: EdgeResult | None = None, error: Exception | None = None) -> None:
    """Resolve a request's future, unless its caller cancelled it (``asyncio.wait_for`` timing out on
    a wrapped future does): setting a cancelled one raised in the background thread and stopped the
    client for good."""
    if future.cancelled():
        return
    with contextlib.suppress(InvalidStateError):  # cancelled in between: nobody waits for it
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


def _ms(v: object) -> float | None:
    """A duration the server reported, if it is a plausible number of milliseconds."""
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < 1e9 else None
