"""The edge daemon: an EdgeClient behind a local socket, a folder of inputs, or both.

Local applications send raw model inputs over ZeroMQ (``--listen ipc://…``) in the same wire
format the server speaks (float32 codec payloads) and get the outputs back; the orchestrator
sends a new plan the same way (``deploy``). SIGTERM stops intake, drains what is in flight and
exits cleanly.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

import numpy as np
import zmq

from splitpoint.core import wire
from splitpoint.core.codecs import CodecError, decode, encode
from splitpoint.core.errors import PlanError, SplitPointError
from splitpoint.core.plan import Plan, verify_pushed, write_files_atomically
from splitpoint.core.signals import stop_on_signals

from .client import EdgeClient, EdgeError
from .config import EdgeConfig

log = logging.getLogger("splitpoint.edge")


class EdgeDaemon:
    def __init__(self, config: EdgeConfig, plans_dir: Path | None = None):
        self.config = config
        self.plans_dir = plans_dir or Path(config.plan_dir).parent
        self.client = EdgeClient(config)
        self._stop = threading.Event()
        self.endpoint: str | None = None

    def run(self, inputs: Path | None = None, outputs: Path | None = None) -> dict:
        """What ``splitpoint edge run`` does: the folder of inputs (if any), then the local socket (if
        configured) until SIGTERM/SIGINT, draining what is in flight. Returns the folder's summary."""
        summary = {"ok": 0, "fallback": 0, "errors": 0}
        with stop_on_signals(self.stop):
            try:
                if inputs is not None:
                    summary = self.run_folder(inputs, outputs)
                if self.config.listen:
                    self.serve_local()
            finally:
                self.client.close(drain=True)
        return summary

    def stop(self) -> None:
        self._stop.set()

    def run_folder(self, inputs: Path, outputs: Path | None) -> dict:
        """Every .npy file in ``inputs`` (one input tensor each), pipelined through the client."""
        files = sorted(inputs.glob("*.npy"))
        if not files:
            raise SplitPointError(f"no .npy files in {inputs}")
        name = self.client.plan.inputs[0].name
        if len(self.client.plan.inputs) != 1:
            raise SplitPointError("folder input feeds single-input models; use --listen for several inputs")
        futures = []
        for f in files:
            if self._stop.is_set():
                break
            arr = np.load(f)
            futures.append((f, self.client.submit({name: arr if arr.ndim == 4 else arr[None]})))
        summary = {"ok": 0, "fallback": 0, "errors": 0}
        for f, fut in futures:
            try:
                r = fut.result()
            except EdgeError as exc:
                summary["errors"] += 1
                log.error("%s: %s", f.name, exc)
                continue
            summary["fallback" if r.fallback else "ok"] += 1
            if outputs:
                outputs.mkdir(parents=True, exist_ok=True)
                np.savez(
                    outputs / f"{f.stem}.npz",
                    **dict(zip(r.names, r.outputs, strict=True)),
                    fallback=r.fallback,
                )
        return summary

    def serve_local(self) -> None:
        """Answer local inference requests and deploys until SIGTERM, then drain."""
        ctx: zmq.Context = zmq.Context.instance()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.config.listen)
        self.endpoint = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        pending: list[tuple] = []
        try:
            while not self._stop.is_set():
                if sock.poll(10):
                    frames = sock.recv_multipart(copy=False)
                    self._on_local(sock, frames, pending)
                still = []
                for ident, rid, fut in pending:
                    if fut.done():
                        sock.send_multipart([ident, *self._answer(rid, fut).to_frames()], copy=False)
                    else:
                        still.append((ident, rid, fut))
                pending = still
            for ident, rid, fut in pending:  # drain
                with contextlib.suppress(Exception):
                    fut.result(self.config.timeout_s * 2)
                sock.send_multipart([ident, *self._answer(rid, fut).to_frames()], copy=False)
        finally:
            sock.close(0)

    def _answer(self, rid: int, fut) -> wire.Message:
        try:
            r = fut.result(0)
        except EdgeError as exc:
            return wire.error(rid, exc.code, str(exc))
        except Exception as exc:
            return wire.error(rid, wire.E_INTERNAL, str(exc))
        return wire.Message(
            wire.RESULT,
            rid,
            self.client.plan.plan_id,
            r.names,
            meta={"fallback": r.fallback, "breakdown": {k: v for k, v in r.breakdown.items()}},
            frames=[encode(o, "float32") for o in r.outputs],
        )

    def _on_local(self, sock, frames, pending: list) -> None:
        ident, body = frames[0], frames[1:]
        try:
            msg = wire.parse(body, self.config.max_message_bytes)
            if msg.type == wire.INFER:
                feeds = {n: decode(wire._buffer(f)) for n, f in zip(msg.tensors, msg.frames, strict=True)}
                pending.append((ident, msg.id, self.client.submit(feeds)))
            elif msg.type == wire.DEPLOY:
                plan = self._deploy(msg)
                sock.send_multipart([ident, *wire.Message(wire.DEPLOYED, msg.id, plan.plan_id).to_frames()])
            elif msg.type == wire.PING:
                sock.send_multipart(
                    [
                        ident,
                        *wire.Message(
                            wire.PONG,
                            msg.id,
                            self.client.plan.plan_id,
                            meta={"server_up": self.client.server_up},
                        ).to_frames(),
                    ]
                )
            else:
                raise wire.WireError(wire.E_BAD_MESSAGE, f"the edge daemon does not accept {msg.type!r}")
        except (wire.WireError, CodecError, SplitPointError) as exc:
            code = (
                exc.code
                if isinstance(exc, wire.WireError)
                else wire.E_BAD_PLAN
                if isinstance(exc, PlanError)
                else wire.E_BAD_MESSAGE
            )
            sock.send_multipart([ident, *wire.error(0, code, str(exc)).to_frames()])
        except Exception as exc:  # the daemon never dies on one message
            log.exception("local request failed")
            sock.send_multipart(
                [ident, *wire.error(0, wire.E_INTERNAL, f"{type(exc).__name__}: {exc}").to_frames()]
            )

    def _deploy(self, msg: wire.Message) -> Plan:
        """Install a pushed plan next to the current one and switch to it, draining the old client."""
        files = wire.deploy_files(msg)
        plan = verify_pushed(files)
        target = write_files_atomically(self.plans_dir / plan.plan_id[:16], files)
        self.config = self.config.with_(plan_dir=target)
        old = self.client
        self.client = EdgeClient(self.config)
        old.close(drain=True)
        log.info("switched to plan %s", plan.plan_id[:12])
        return plan
