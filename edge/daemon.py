"""The edge daemon: an EdgeClient behind a local socket, a folder of inputs, or both.

Local applications send raw model inputs over ZeroMQ (``--listen ipc://…``) in the same wire format the
server speaks (float32 codec payloads) and get the outputs back; the orchestrator sends a new plan the
same way (``deploy``), which is verified and loaded before it replaces the running one. Every local
message is handled under its own ``try``, so one bad message never stops the daemon, and every error
reply carries the id of the request it answers. SIGTERM stops intake, drains what is in flight and
exits cleanly.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import shutil
import threading
import time
import zipfile
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import zmq

from splitpoint.core import endpoints, wire
from splitpoint.core.codecs import CodecError, decode, encode
from splitpoint.core.endpoints import ipc_in_use, ipc_path
from splitpoint.core.errors import PlanError, SplitPointError, describe, os_reason
from splitpoint.core.files import atomic_write, atomic_write_text, file_in_the_way, locked
from splitpoint.core.plan import (
    LEFTOVER_AGE_S,
    PLAN_FILE,
    PUSHED_NAME,
    Plan,
    install_pushed,
    sweep_leftovers,
    unused_plan,
)
from splitpoint.core.runner import check_models_load
from splitpoint.core.samples import only_input, read_sample
from splitpoint.core.signals import stop_on_signals
from splitpoint.core.telemetry import Telemetry
from splitpoint.core.textfiles import load_json

from .client import EdgeClient, EdgeError, failed_future, refuse_decoder
from .config import EdgeConfig

log = logging.getLogger("splitpoint.edge")
MAX_LOCAL_PENDING = 1024  # local requests in flight; past it new ones are answered busy
# the inputs of the local requests held (in flight and waiting) together: 1,024 requests of 3.1 MB each held
# 3.4 GB, and a tensor may be 256 MiB; past it new ones are answered busy (one alone is always taken)
MAX_LOCAL_BYTES = 512 * 2**20
CLOSING_GRACE_S = 0.2  # on SIGTERM, local requests are answered `closed` until the socket is this quiet


class DaemonFailed(SplitPointError):
    """The client behind the daemon stopped working: exit non-zero so that a supervisor restarts it."""

    exit_code = 1


DEPLOYED = "deployed.json"  # in the plans folder: the plan last pushed, and the command-line plan it replaces
# where plans pushed to the daemon go by default: beside PLAN_DIR, in a hidden folder. Beside PLAN_DIR
# itself, a server on the same machine sharing that folder as its --plans had its copy of a plan (with
# tail.onnx) replaced by the edge's (head and full model) under the same id; a server skips hidden folders
EDGE_DEPLOYS = ".edge-deployed"


def _records(path: Path) -> dict[str, dict]:
    """``deployed.json``'s records by the daemon's --listen; one written before records were kept per
    daemon (``{"replaces", "plan"}``) stands for any daemon, under ``""``."""
    data = load_json(path.read_text(encoding="utf-8"))  # nested past the recursion limit: ValueError
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    if "daemons" not in data:
        return {"": data}
    daemons = data["daemons"]
    if not isinstance(daemons, dict) or not all(isinstance(r, dict) for r in daemons.values()):
        raise ValueError("'daemons' is not an object of records")
    return daemons


def _plan_id(plan_dir: Path) -> str | None:
    """The id of the plan in a folder, or None where it has none that reads."""
    try:
        return Plan.load(plan_dir, verify=False).plan_id
    except (SplitPointError, OSError):
        return None


def deployed_plan(plan_dir: Path, plans_dir: Path, listen: str | None = None) -> Path:
    """The plan to run for ``edge run PLAN_DIR --listen L``: the one last pushed to the daemon on L in
    place of that same PLAN_DIR, if any, so a restart (a crash under systemd, a reboot) does not roll the
    device back to the plan it started with; else PLAN_DIR. A record naming another PLAN_DIR is the
    operator's old choice, and the command line wins; another daemon's record (two daemons started on
    one PLAN_DIR) is that daemon's."""
    path = plans_dir / DEPLOYED
    try:
        records = _records(path)
        record = records.get(listen or "") or records.get("")
        if record is None:
            return plan_dir
        replaces, name = str(record["replaces"]), str(record["plan"])
    except FileNotFoundError:
        return plan_dir
    except (OSError, ValueError, KeyError, TypeError) as exc:  # said, not silently rolled back
        log.warning("%s is unreadable (%s): running %s, not the plan last deployed", path, exc, plan_dir)
        return plan_dir
    target = plans_dir / name
    if replaces != str(plan_dir.resolve()):
        return plan_dir
    was, now = record.get("replaced_id"), _plan_id(plan_dir)
    if was and now and was != now:  # PLAN_DIR written again since (plan -o PLAN_DIR --force): the newer one
        log.warning(
            "%s holds plan %s, written since plan %s was deployed here in place of its %s: running it",
            plan_dir,
            now[:12],
            name[:12],
            str(was)[:12],
        )
        return plan_dir
    if Path(name).name != name or not (target / PLAN_FILE).is_file():
        log.warning("%s names plan %r, which is not in %s: running %s", path, name[:80], plans_dir, plan_dir)
        return plan_dir
    log.info("running %s, the plan last deployed here in place of %s (%s)", target, plan_dir, DEPLOYED)
    return target


def prune_deployed(plans_dir: Path, running: Path, now: float | None = None) -> list[str]:
    """Remove the plans pushed here earlier that no daemon runs now; the names removed. A device
    that took a deploy a day kept every one (each with its head and full model) until its card was full.
    Kept: the one ``running``, any a process runs (every edge client holds its plan: ``hold_plan``;
    whichever record, or none, started it), every plan ``deployed.json`` names (a daemon's next start),
    and any written in the last LEFTOVER_AGE_S (one another daemon has installed and not yet started).
    Nothing is removed while the records cannot be read, nor anything not named as a pushed plan is."""
    try:
        keep = {str(r.get("plan")) for r in _records(plans_dir / DEPLOYED).values()}
    except (OSError, ValueError):
        return []
    keep.add(running.name)
    now = time.time() if now is None else now
    removed = []
    for d in sorted(plans_dir.iterdir()) if plans_dir.is_dir() else []:
        if d.name in keep or not PUSHED_NAME.fullmatch(d.name) or d.is_symlink() or not d.is_dir():
            continue
        try:
            if now - d.stat().st_mtime < LEFTOVER_AGE_S:
                continue
            # no plan.json (not a plan), or held by a process: unused is False. Held until it is gone: a
            # client starting on it waits
            with unused_plan(d) as unused:
                if not unused:
                    continue
                shutil.rmtree(d)
        except OSError as exc:  # another's files, a read-only card: the deploy stands
            log.warning("could not remove %s, a plan no daemon runs: %s", d, os_reason(exc))
            continue
        removed.append(d.name)
    if removed:
        log.info(
            "removed %d plan(s) pushed earlier that no daemon runs: %s", len(removed), ", ".join(removed)
        )
    return removed


class EdgeDaemon:
    def __init__(self, config: EdgeConfig, plans_dir: Path | None = None):
        beside = Path(config.plan_dir).parent
        self.plans_dir = plans_dir or beside / EDGE_DEPLOYS
        self.started_with = Path(config.plan_dir).resolve()  # the command line's plan
        sweep_leftovers(self.plans_dir)
        listen = str(config.listen) if config.listen else None
        running = deployed_plan(Path(config.plan_dir), self.plans_dir, listen)
        if plans_dir is None and running == Path(config.plan_dir):  # pushed before the hidden folder was
            running = deployed_plan(Path(config.plan_dir), beside, listen)
        self.config = config if running == Path(config.plan_dir) else config.with_(plan_dir=running)
        prune_deployed(self.plans_dir, running)
        # one publisher for the daemon's life: a plan switch must not announce the device offline
        self.telemetry = Telemetry(config.device_id, "edge", config.mqtt) if config.mqtt else None
        self._ids = itertools.count(1)  # request ids go on across deploys: telemetry's stay one each
        self.client = EdgeClient(self.config, self.telemetry, ids=self._ids)
        self._say_without_fallback(lost=False)
        self._stop = threading.Event()
        self._ran = False
        self.endpoint: str | None = None
        # local requests waiting for room in the client's window: (identity, request id, feeds, since, the
        # plan id the request named: "" where it named none, the bytes of its inputs)
        self._backlog: deque[tuple[Any, int, dict[str, np.ndarray], float, str, int]] = deque()
        self._wake_w: int | None = None  # the socket loop's wake-up pipe, while it runs

    def run(self, inputs: Path | None = None, outputs: Path | None = None) -> dict:
        """What ``splitpoint edge run`` does: the folder of inputs (if any), then the local socket (if
        configured) until SIGTERM/SIGINT, draining what is in flight. Returns the folder's summary:
        ``ok`` (split), ``local`` (an edge-only plan's answers), ``fallback`` (answered locally when the
        split failed), ``errors``, ``inputs`` and ``signal`` (the one that stopped the folder's run)."""
        if self._ran:  # its client closed as the first run ended: a second one answered nothing, silently
            raise SplitPointError("this edge daemon has run or been closed already: a new EdgeDaemon runs")
        self._ran = True
        summary: dict[str, Any] = {"ok": 0, "local": 0, "fallback": 0, "errors": 0, "inputs": 0}
        with stop_on_signals(self.stop) as caught:
            try:
                if inputs is not None:
                    summary = self.run_folder(inputs, outputs)
                    summary["signal"] = caught[0] if caught else None  # stopped before the folder's end
                if self.config.listen:
                    self.serve_local()
            finally:  # the local socket drained already (timeout_s twice over): what is left is told so
                self.client.close(drain=True, timeout=self.config.timeout_s)
                if self.telemetry:
                    self.telemetry.close()
                log.info("stopped")
        if self.client.fatal is not None:
            raise DaemonFailed(f"the edge client stopped working: {self.client.fatal}")
        return summary

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        """Let go of a daemon that will not run: its client (a thread, a connection, the models) and its
        telemetry. ``run`` closes them itself as it ends, and a running daemon is ended with ``stop``:
        on one that ran or runs, this does nothing."""
        if self._ran:
            return
        self._ran = True
        self.client.close(drain=False)
        if self.telemetry:
            self.telemetry.close()

    def run_folder(self, inputs: Path, outputs: Path | None) -> dict:
        """Every ``.npy`` (a single-input model's sample) or ``.npz`` (an array per input, named as the
        inputs) in ``inputs``, one sample each with or without its batch dimension, pipelined through the
        client. A file that cannot be read is that sample's error, not the run's."""
        if not inputs.is_dir():
            raise SplitPointError(f"--inputs {inputs} is not a folder of .npy/.npz files")
        files = sorted(p for p in inputs.iterdir() if p.suffix.lower() in (".npy", ".npz"))
        if not files:
            raise SplitPointError(f"no .npy or .npz files in {inputs}")
        ranks = {
            t.name: (len(t.shape.split("x")) if t.shape not in ("", "?") else None)
            for t in self.client.plan.inputs
        }
        if any(f.suffix.lower() == ".npy" for f in files):  # the whole folder is wrong: say so once
            only_input(next(f for f in files if f.suffix.lower() == ".npy"), list(ranks))
        stems: dict[str, Path] = {}
        for f in files:  # x.npy and x.npz would both answer to x.npz, the second over the first
            if outputs and f.stem in stems:
                raise SplitPointError(
                    f"{stems[f.stem].name} and {f.name} would both be answered in {f.stem}.npz: rename one"
                )
            stems[f.stem] = f
        if outputs:
            if (blocked := file_in_the_way(outputs)) is not None:
                raise SplitPointError(
                    f"--outputs {outputs}: {blocked} is a file; give a folder for the answers"
                )
            outputs.mkdir(parents=True, exist_ok=True)
        summary: dict[str, Any] = {"ok": 0, "local": 0, "fallback": 0, "errors": 0, "inputs": len(files)}
        summary["breakdowns"] = []  # each answer's measured times, for the run's medians
        t0 = time.perf_counter()
        # each answer is written as it comes (memory bounded by the window, and what was answered is kept
        # if the run is stopped), not once every input has been sent
        waiting: list[tuple[Path, Future]] = []
        for f in files:
            if self._stop.is_set():
                break
            try:
                feeds = read_sample(f, ranks)
            except SplitPointError as exc:
                waiting.append((f, failed_future(EdgeError(str(exc), "bad-input"))))
            else:
                waiting.append((f, self.client.submit(feeds)))
            waiting = self._write_done(waiting, outputs, summary)
        for _, fut in waiting:
            with contextlib.suppress(Exception):
                fut.result()
        self._write_done(waiting, outputs, summary)
        summary["wall_s"] = time.perf_counter() - t0
        return summary

    def _write_done(self, waiting: list, outputs: Path | None, summary: dict) -> list:
        """Write the answers that have come (each file whole or not at all); the rest still wait."""
        still = []
        for f, fut in waiting:
            if not fut.done():
                still.append((f, fut))
                continue
            try:
                r = fut.result()
            except EdgeError as exc:
                summary["errors"] += 1
                log.error("%s: %s", f.name, exc)
                continue
            local = self.client.local_only
            summary["local" if local else "fallback" if r.fallback else "ok"] += 1
            summary["breakdowns"].append({"fallback": r.fallback, **r.breakdown})
            if outputs:
                write_answer(
                    outputs / f"{f.stem}.npz", dict(zip(r.names, r.outputs, strict=True)), r.fallback
                )
        return still

    def serve_local(self) -> None:
        """Answer local inference requests and deploys until SIGTERM, then drain."""
        ctx: zmq.Context = zmq.Context.instance()
        sock = wire.router(ctx)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes)
        try:
            listen = str(self.config.listen)  # serve_local runs only with --listen
            if ipc_in_use(listen):  # libzmq would bind over it
                raise zmq.ZMQError(zmq.EADDRINUSE)
            endpoints.bind(sock, listen)
        except zmq.ZMQError as exc:
            sock.close(0)
            hint = (
                "; another process listens there; choose another --listen"
                if exc.errno == zmq.EADDRINUSE
                else ""
            )
            raise SplitPointError(f"cannot listen on {self.config.listen}: {exc.strerror}{hint}") from exc
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        # identity, id, answer, the plan it runs on, the bytes of its inputs
        pending: list[tuple[Any, int, Future, str, int]] = []
        self._backlog.clear()
        # an answer that is done wakes the loop at once: it polled 10 ms at a time and added up to that
        # to every local request (11.3 ms median against the client's own 1.0 ms)
        wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(wake_r, zmq.POLLIN)
        try:
            while not self._stop.is_set() and self.client.fatal is None:
                # waiting requests are re-judged against --timeout every 10 ms; else only stop is checked
                events = dict(poller.poll(10 if self._backlog else 100))
                if wake_r in events:
                    os.read(wake_r, 4096)
                if sock in events:
                    for frames in wire.drain(sock, limit=MAX_LOCAL_PENDING):
                        self._on_local(sock, frames, pending)
                self._start_backlog(sock, pending)
                pending = self._answer_done(sock, pending)
            if self._stop.is_set():
                log.info(
                    "stopping: answering the %d local request(s) in flight, %d waiting told `closed`",
                    len(pending),
                    len(self._backlog),
                )
            for ident, rid, _, _, named, _ in self._backlog:  # never started: nothing to drain
                self._refuse(sock, ident, rid, "closed", "the edge daemon is shutting down", named)
            self._backlog.clear()
            end = time.monotonic() + self.config.timeout_s * 2
            # drain; what arrives meanwhile is told so, and for a moment after the last answer: requests
            # already on their way (sent as SIGTERM came) were dropped unanswered with the socket
            quiet_until = time.monotonic() + CLOSING_GRACE_S
            while (pending or time.monotonic() < quiet_until) and time.monotonic() < end:
                if sock.poll(5):
                    for frames in wire.drain(sock, limit=MAX_LOCAL_PENDING):
                        if len(frames) >= 2:
                            why = "the edge daemon is shutting down"
                            self._refuse_message(sock, frames[0], frames[1:], "closed", why)
                    quiet_until = time.monotonic() + CLOSING_GRACE_S
                pending = self._answer_done(sock, pending)
            for ident, rid, _, plan_id, _ in pending:
                why = "the edge daemon stopped before the request finished"
                self._refuse(sock, ident, rid, "closed", why, plan_id)
        finally:
            sock.close(linger=1000)  # the last answers (and the `closed` ones) reach their clients
            if (socket_file := ipc_path(listen)) is not None:
                # libzmq leaves its socket file behind: a stale file in the way of the next start's bind
                # check, and in /run
                with contextlib.suppress(OSError):
                    socket_file.unlink()
            w, self._wake_w = self._wake_w, None
            os.close(wake_r)
            if w is not None:
                os.close(w)

    def _wake(self, _fut: Future) -> None:
        """A local request's answer is done (on the client's threads): wake the socket loop."""
        w = self._wake_w
        if w is not None:
            with contextlib.suppress(OSError):  # full (the loop is behind and will look anyway) or closed
                os.write(w, b"x")

    def _refuse(self, sock: zmq.Socket, ident: Any, rid: int, code: str, why: str, plan: str = "") -> None:
        """``plan``: the one the request named (an error answering a request carries it). Counted in the
        telemetry's ``rejected``: refused before the client took it."""
        self.client.counts["rejected"] += 1
        sock.send_multipart([ident, *wire.error(rid, code, why, plan).to_frames()])

    def _start_backlog(self, sock: zmq.Socket, pending: list) -> None:
        """Start the local requests that wait for room in the client's window, oldest first; the socket
        loop never blocks on the window, so it keeps answering (and hears SIGTERM) while they wait."""
        while self._backlog:
            ident, rid, feeds, since, pinned, size = self._backlog[0]
            if pinned and pinned != self.client.plan.plan_id:  # a deploy switched plans meanwhile
                self._backlog.popleft()
                self._refuse(
                    sock,
                    ident,
                    rid,
                    wire.E_UNKNOWN_PLAN,
                    f"this daemon switched to plan {self.client.plan.plan_id[:12]}… before the request "
                    f"(which named {pinned[:16]!r}) started",
                    pinned,
                )
                continue
            waited = time.perf_counter() - since
            if waited > self.config.timeout_s:  # --timeout bounds the wait for the window too
                self._backlog.popleft()
                why = f"waited {waited:.1f} s for room among the {self.config.window} requests in flight"
                try:
                    local = self.client.fall_back(feeds, why)
                except SplitPointError as exc:
                    self._refuse(sock, ident, rid, "bad-input", str(exc), pinned)
                    continue
                if local is not None:  # as a request the server did not answer in time
                    local.add_done_callback(self._wake)
                    pending.append((ident, rid, local, self.client.plan.plan_id, size))
                else:
                    self._refuse(sock, ident, rid, "timeout", why, pinned)
                continue
            try:
                fut = self.client.try_submit(feeds, called=since)  # its total counts the wait here
            except EdgeError as exc:
                self._backlog.popleft()
                self._refuse(sock, ident, rid, exc.code, str(exc), pinned)
                continue
            if fut is None:
                return
            self._backlog.popleft()
            fut.add_done_callback(self._wake)
            pending.append((ident, rid, fut, self.client.plan.plan_id, size))

    def _answer_done(self, sock: zmq.Socket, pending: list) -> list:
        still = []
        for entry in pending:
            ident, rid, fut, plan_id, _ = entry
            if fut.done():
                sock.send_multipart([ident, *self._answer(rid, fut, plan_id).to_frames()], copy=False)
            else:
                still.append(entry)
        return still

    def _answer(self, rid: int, fut: Future, plan_id: str) -> wire.Message:
        try:
            r = fut.result(0)
        except EdgeError as exc:
            return wire.error(rid, exc.code, str(exc), plan_id)
        except Exception as exc:
            return wire.error(rid, wire.E_INTERNAL, describe(exc), plan_id)
        meta = {"fallback": r.fallback, "breakdown": dict(r.breakdown)}
        frames = [encode(o, "float32") for o in r.outputs]
        # the plan that answered, not the one running now: a deploy may have switched since it started
        return wire.Message(wire.RESULT, rid, plan_id, r.names, meta=meta, frames=frames)

    def _on_local(self, sock: zmq.Socket, frames: list, pending: list) -> None:
        """Never raises: every message gets its answer or its error, under its own request id."""
        if len(frames) < 2:
            return  # no identity and message: nothing to answer
        ident, body = frames[0], frames[1:]
        try:
            msg = wire.parse(body, self.config.max_message_bytes)
            if msg.type == wire.INFER:
                if msg.plan and msg.plan != self.client.plan.plan_id:
                    raise wire.WireError(
                        wire.E_UNKNOWN_PLAN,
                        f"this daemon runs plan {self.client.plan.plan_id[:12]}…, not {msg.plan[:16]!r}",
                    )
                held = len(pending) + len(self._backlog)
                if held >= MAX_LOCAL_PENDING:
                    raise wire.WireError(wire.E_BUSY, f"{held} local requests are in flight or waiting")
                feeds = self._feeds(msg)
                size = sum(int(v.nbytes) for v in feeds.values())
                # the bytes held, from what holds them (in flight: each pending's last field; waiting: each
                # backlog entry's), so that no path that answers a request can leave them counted
                held_bytes = sum(p[4] for p in pending) + sum(b[5] for b in self._backlog)
                if held_bytes and held_bytes + size > MAX_LOCAL_BYTES:
                    raise wire.WireError(
                        wire.E_BUSY,
                        f"the {held} local requests in flight or waiting hold {held_bytes / 2**20:.0f} "
                        f"MiB of inputs (the limit is {MAX_LOCAL_BYTES // 2**20} MiB)",
                    )
                self._backlog.append((ident, msg.id, feeds, time.perf_counter(), msg.plan or "", size))
            elif msg.type == wire.DEPLOY:
                try:
                    plan, warnings = self._deploy(msg)
                except OSError as exc:  # this machine's (a read-only or full plans directory): one line
                    why = f"the edge daemon cannot store the plan ({os_reason(exc)})"
                    log.error("%s", why)
                    raise wire.WireError(wire.E_INTERNAL, why) from exc
                said = {"warnings": warnings} if warnings else {}
                reply = wire.Message(wire.DEPLOYED, msg.id, plan.plan_id, meta=said)
                sock.send_multipart([ident, *reply.to_frames()])
            elif msg.type == wire.PING:
                meta = {"server_up": self.client.server_up}
                reply = wire.Message(wire.PONG, msg.id, self.client.plan.plan_id, meta=meta)
                sock.send_multipart([ident, *reply.to_frames()])
            else:
                raise wire.WireError(wire.E_BAD_MESSAGE, f"the edge daemon does not accept {msg.type!r}")
        except (wire.WireError, CodecError, EdgeError) as exc:
            self._refuse_message(sock, ident, body, exc.code, str(exc))
        except PlanError as exc:
            self._refuse_message(sock, ident, body, wire.E_BAD_PLAN, str(exc))
        except Exception as exc:  # the daemon never dies on one message
            log.exception("local request failed")
            self._refuse_message(sock, ident, body, wire.E_INTERNAL, describe(exc))

    def _refuse_message(self, sock: zmq.Socket, ident: Any, body: list, code: str, why: str) -> None:
        """An error for a message as its header reads, well-formed or not: its id and the plan it named."""
        self.client.counts["rejected"] += 1
        sock.send_multipart([ident, *wire.best_effort_error(body, code, why).to_frames()])

    def _feeds(self, msg: wire.Message) -> dict[str, np.ndarray]:
        """The model inputs of a local request: exactly the plan's inputs, each a valid payload."""
        wanted = {t.name for t in self.client.plan.inputs}
        if set(msg.tensors) != wanted:
            raise wire.WireError(
                wire.E_BAD_TENSOR, f"the plan's inputs are {sorted(wanted)}, got {msg.tensors}"
            )
        return {
            n: decode(wire.buffer(f), self.config.max_message_bytes)
            for n, f in zip(msg.tensors, msg.frames, strict=True)
        }

    def _deploy(self, msg: wire.Message) -> tuple[Plan, list[str]]:
        """Install a pushed plan next to the current one (verified and loaded first), then switch to it,
        draining the old client. Returns the plan and what the deployer should hear of it: a fallback it
        takes away, a server that does not serve it."""
        files = wire.deploy_files(msg)

        def load(d: Path, plan: Plan) -> None:
            refuse_decoder(plan)  # before it is installed: a deploy refused leaves nothing behind
            check_models_load(d, plan)

        before = {d.name for d in self.plans_dir.iterdir()} if self.plans_dir.is_dir() else set()
        plan, _, target = install_pushed(files, self.plans_dir, load, "edge", self.config.fallback)
        config = self.config.with_(plan_dir=target)
        client = EdgeClient(config, self.telemetry, ids=self._ids)  # announces the new plan
        try:  # recorded before the switch: one no record keeps would be undone by the next start, unsaid
            self._record_deployed(target)
        except OSError:
            client.close(drain=False)
            if target.name not in before:  # this deploy's alone: no record or other daemon names it
                with unused_plan(target) as unused:
                    if unused:
                        shutil.rmtree(target, ignore_errors=True)
            raise
        old = self.client
        self.config, self.client = config, client
        self.client.counts = old.counts  # the process's counts go on across plans, as telemetry says
        warnings = [w for w in (self._say_without_fallback(lost=old.cannot_fall_back is None),) if w]
        old.close(drain=True)
        log.info("switched to plan %s", plan.plan_id[:12])
        prune_deployed(self.plans_dir, target)
        if self._served_now() is False:  # the log said so as the pong came; the deployer hears it too
            warnings.append(self.client.unserved_note())
        return plan, warnings

    def _served_now(self, within_s: float = 1.0) -> bool | None:
        """Whether the server serves the plan just switched to, as its first pong says (None: no answer
        within ``within_s``, or an edge-only plan). A deploy that reached the edge and not its server
        left every request refused while `deploy` said the edge had it."""
        end = time.monotonic() + within_s
        while not self.client.local_only and self.client.plan_served is None and time.monotonic() < end:
            time.sleep(0.01)
        return self.client.plan_served

    def _say_without_fallback(self, lost: bool) -> str | None:
        """A plan with no full model runs, but while the server is out of reach its requests fail rather
        than run here: said at start and at each deploy, not first at a failed request; a warning where a
        deploy took away the fallback the daemon had (returned, for the deploy's answer)."""
        why = self.client.cannot_fall_back
        if why:
            pid = self.client.plan.plan_id[:12]
            if lost:
                log.warning("plan %s takes away this daemon's local fallback: %s", pid, why)
                return f"plan {pid} takes away this daemon's local fallback: {why}"
            log.info("plan %s: no local fallback: %s", pid, why)
        return None

    def _record_deployed(self, target: Path) -> None:
        """Remember the plan about to run for this daemon's next start (by its --listen: another daemon on
        the same PLAN_DIR keeps its own record); OSError where it cannot, and the deploy is refused."""
        path = self.plans_dir / DEPLOYED
        with locked(path):  # another daemon on this PLAN_DIR may be writing its own record
            try:
                records = _records(path)
            except (OSError, ValueError):  # none yet, or unreadable (said at start): this one starts it over
                records = {}
            records.pop("", None)  # a record from before they were kept per daemon: whose it was is unknown
            records[str(self.config.listen or "")] = {
                "replaces": str(self.started_with),
                # what PLAN_DIR held then: a plan written there since is the operator's newer choice
                "replaced_id": _plan_id(self.started_with),
                "plan": target.name,
            }
            atomic_write_text(path, json.dumps({"daemons": records}))


def write_answer(path: Path, outputs: dict[str, Any], fallback: bool) -> None:
    """One answer as ``.npz``: an array per model output and ``fallback`` (whether the device answered
    alone), written beside the target and renamed over it, so a stopped run leaves no half-written file.
    Written entry by entry: ``np.savez`` takes names as keyword arguments, and a model output named
    ``file`` or ``fallback`` clashed with its own (a traceback that wrote nothing). The flag takes the
    first of ``fallback``, ``splitpoint_fallback``, ``splitpoint_fallback_2``, ... that no output has (an
    output named ``splitpoint_fallback`` was overwritten by it)."""
    flag, k = "fallback", 1
    while flag in outputs:
        k += 1
        flag = "splitpoint_fallback" if k == 2 else f"splitpoint_fallback_{k}"
    entries = {**outputs, flag: np.array(fallback)}

    def write(fh: BinaryIO) -> None:
        with zipfile.ZipFile(fh, "w") as z:
            for name, arr in entries.items():
                with z.open(f"{name}.npy", "w", force_zip64=True) as e:
                    np.lib.format.write_array(e, np.asanyarray(arr), allow_pickle=False)

    atomic_write(path, write, durable=False)  # one per answer: a sync each would set the run's pace
