"""The edge's half of a decoder split: the embedding and the first layers with their KV cache here, the
rest in a server session; one round trip per generated token.

Generation is sequential by nature (each token is the next step's input), so the client keeps one step in
flight on its own DEALER socket and waits for it: no background thread. The prefill sends the whole
prompt's hidden state in one step; every decode step then sends one token's. Each step names the session
and the position the edge's cache has reached, so the server can refuse a step that does not follow
(docs/protocol.md, "Decoder sessions").

``ttft_ms`` is the time to the first token (prefill: head over the prompt, encode, round trip, server's
layers); ``tpot_ms`` the median time per later token. Both are measured here, on the edge's clock.
"""

from __future__ import annotations

import contextlib
import itertools
import secrets
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zmq

from splitpoint.core import endpoints, wire
from splitpoint.core.codecs import decode, encode
from splitpoint.core.curve import HANDSHAKE_FAILED, handshake_failed
from splitpoint.core.errors import PlanError, SplitPointError
from splitpoint.core.kvcache import CachedSegment
from splitpoint.core.plan import FULL_FILE, HEAD_FILE, TAIL_FILE, Plan
from splitpoint.core.runner import check_fits


class GenerationError(SplitPointError):
    """The server refused or did not answer a step; ``code`` is the protocol's error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Generation:
    tokens: list[int]
    ttft_ms: float  # measured: request of the prefill to its token
    tpot_ms: float | None  # measured: median per later token (None with one token)
    step_ms: list[float] = field(default_factory=list)  # every step, the prefill first
    head_ms: list[float] = field(default_factory=list)
    server_ms: list[float] = field(default_factory=list)  # the server's own total per step
    bytes_sent: list[int] = field(default_factory=list)  # payload bytes per step

    def to_dict(self) -> dict:
        split = {"breakdown": self.breakdown()} if self.server_ms else {}  # a local run has no parts
        return {
            "tokens": self.tokens,
            "ttft_ms": self.ttft_ms,
            "tpot_ms": self.tpot_ms,
            "bytes_per_prefill": self.bytes_sent[0] if self.bytes_sent else None,
            "bytes_per_token": statistics.median(self.bytes_sent[1:]) if len(self.bytes_sent) > 1 else None,
            **split,
            "labels": {
                "ttft_ms": "measured",
                "tpot_ms": "measured (median)",
                **(
                    {
                        "breakdown": "measured: the prefill's, then the median of later tokens' (each part "
                        "its own median: the parts need not add up to tpot_ms)"
                    }
                    if split
                    else {}
                ),
            },
        }

    def breakdown(self) -> dict[str, float | None]:
        """Where the time of a token goes: the edge's head, the server's own time (its clock, in its reply)
        and what is left: the codec, the link and both runtimes. A prediction that misses shows here which
        part."""
        later = len(self.step_ms) > 1

        def split(xs: list[float]) -> tuple[float | None, float | None]:
            if not xs:
                return None, None
            return xs[0], (statistics.median(xs[1:]) if later else None)

        link = [s - h - v for s, h, v in zip(self.step_ms, self.head_ms, self.server_ms, strict=True)]
        out: dict[str, float | None] = {}
        for name, xs in (("edge", self.head_ms), ("server", self.server_ms), ("link_and_runtime", link)):
            out[f"{name}_prefill_ms"], out[f"{name}_step_ms"] = split(xs)
        return out


def _check_prompt(plan: Plan, prompt: np.ndarray, max_new_tokens: int) -> np.ndarray:
    assert plan.decoder is not None
    ids = np.asarray(prompt, np.int64).reshape(1, -1)
    if ids.shape[1] < 1:
        raise SplitPointError("the prompt needs at least one token")
    if ids.min() < 0 or ids.max() >= plan.decoder.vocab:
        raise SplitPointError(f"token ids must be 0 to {plan.decoder.vocab - 1}")
    if max_new_tokens < 1 or ids.shape[1] + max_new_tokens > plan.decoder.max_len:
        raise SplitPointError(
            f"{ids.shape[1]} prompt tokens + {max_new_tokens} new must be within the model's "
            f"{plan.decoder.max_len} positions (and at least one new token)"
        )
    return ids


def load_decoder_plan(plan_dir: str | Path, role: str | None = "edge") -> Plan:
    """A decoder plan, checked for ``role``'s files (None: all of them, as a local run needs)."""
    plan = Plan.load(plan_dir, role=role)
    if plan.decoder is None:
        raise PlanError(f"{plan_dir} is not a decoder plan (see `splitpoint split-decoder`)")
    return plan


def generate_local(
    plan_dir: str | Path, prompt: np.ndarray, max_new_tokens: int, threads: int = 0
) -> Generation:
    """The same generation without the network: the whole model (``full.onnx``) when the plan carries it,
    else head and tail here, one after the other."""
    plan_dir = Path(plan_dir)
    plan = load_decoder_plan(plan_dir, role=None)
    ids = _check_prompt(plan, prompt, max_new_tokens)
    full = plan_dir / FULL_FILE
    names = [FULL_FILE] if full.is_file() else [HEAD_FILE, TAIL_FILE]
    parts = [CachedSegment(plan_dir / n, threads) for n in names]
    for n, part in zip(names, parts, strict=True):
        check_fits(plan, n, part.sess)
    tokens, steps = [], []
    x = ids
    for _ in range(max_new_tokens):
        t0 = time.perf_counter()
        y = x
        for p in parts:
            y = p(y)
        tokens.append(int(y[0, -1].argmax()))
        steps.append((time.perf_counter() - t0) * 1e3)
        x = np.array([[tokens[-1]]], np.int64)
    return Generation(tokens, steps[0], statistics.median(steps[1:]) if len(steps) > 1 else None, steps)


class DecoderClient:
    """Generates with a decoder plan: the head here, the tail in a session on ``server``. One generation
    at a time: the head's KV cache is the client's, so a second thread's ``generate`` waits for the
    first (two at once dropped each other's answers as late ones and both timed out). ``close`` from
    another thread ends a generation under way within 0.1 s with ``GenerationError("closed")``."""

    def __init__(
        self,
        plan_dir: str | Path,
        server: str,
        *,
        timeout_s: float = 10.0,
        threads: int = 0,
        curve_server_key: bytes | None = None,
        curve_keypair: tuple[bytes, bytes] | None = None,
        max_message_bytes: int = wire.DEFAULT_MAX_MESSAGE_BYTES,
    ):
        """``curve_keypair`` (public, secret): this device's own key, for a server with --curve-allow;
        without it a fresh pair, which only a server that allows any key accepts."""
        self.plan = load_decoder_plan(plan_dir)
        self.head = CachedSegment(Path(plan_dir) / HEAD_FILE, threads)
        check_fits(self.plan, HEAD_FILE, self.head.sess)
        self.codec = self.plan.codec
        self.cut = self.plan.cut_tensors[0].name
        self.timeout_s = timeout_s
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # the socket and the head's cache: one generation at a time
        self._closed = False
        self._ctx: zmq.Context = zmq.Context.instance()
        s = wire.tune(self._ctx.socket(zmq.DEALER))
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        if curve_server_key:
            s.curve_serverkey = curve_server_key
            s.curve_publickey, s.curve_secretkey = curve_keypair or zmq.curve_keypair()
        # a refused handshake retries silently: watched, so that a timeout can say why
        self._monitor = s.get_monitor_socket(HANDSHAKE_FAILED)
        self._server = server
        self._curve = bool(curve_server_key)
        endpoints.connect(s, server)
        self._sock = s
        try:
            self.warm_up()
        except BaseException:
            self.close()
            raise

    def warm_up(self) -> None:
        """Run the head once and wait for the server's pong: the first generation's TTFT then holds
        neither onnxruntime's first-run set-up nor the connection's handshake, as in a long-running
        client."""
        hidden = self.head(np.zeros((1, 2), np.int64))
        decode(encode(hidden, self.codec))  # a codec's first call pays numpy's lazy set-up (~10 ms)
        self.head.reset()
        reply = self._request(wire.Message(wire.PING, next(self._ids)))
        if reply.type != wire.PONG:
            raise GenerationError(wire.E_BAD_MESSAGE, f"the server answered a ping with {reply.type}")

    def close(self) -> None:
        """Close the connection; a generation under way in another thread closes it as it ends (a socket
        closed under a thread polling it gave that thread a raw "Socket operation on non-socket")."""
        self._closed = True
        if self._lock.acquire(blocking=False):
            try:
                self._close_sockets()
            finally:
                self._lock.release()

    def _close_sockets(self) -> None:
        if self._sock.closed:
            return
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disable_monitor()
        self._monitor.close(0)
        self._sock.close(0)

    def __enter__(self) -> DecoderClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unanswered(self, why: str) -> GenerationError:
        if self._monitor.poll(0):  # the handshake failed: no step will ever be answered
            why += f": {handshake_failed(self._server, self._curve)}"
        elif problem := endpoints.name_problem(self._server):
            why += f": {problem}"
        return GenerationError(wire.E_UNAVAILABLE, why)

    def _request(self, msg: wire.Message) -> wire.Message:
        if self._closed:
            raise GenerationError("closed", "the decoder client is closed")
        try:
            # not blocking: a socket whose handshake the server refused has nothing to queue on, for good
            # (curve.GAVE_UP), and a blocking send waited for ever
            wire.send(self._sock, msg.to_frames(), zmq.NOBLOCK)
        except zmq.Again:
            raise self._unanswered("the connection to the server is closed") from None
        deadline = time.monotonic() + self.timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._unanswered(f"no answer from the server within {self.timeout_s:g} s")
            if not self._sock.poll(int(min(left, 0.1) * 1000) + 1):  # in turns: close() is looked at
                if self._closed:
                    raise GenerationError("closed", "the decoder client was closed during the generation")
                continue
            reply = wire.parse(wire.recv(self._sock))
            if reply.id != msg.id:
                continue  # the late answer to an earlier step that timed out
            if reply.type == wire.ERROR:
                code = str(reply.meta.get("code", wire.E_INTERNAL))
                raise GenerationError(code, f"server: {code}: {str(reply.meta.get('message', ''))[:1000]}")
            return reply

    def step(
        self, session: int, position: int, hidden: np.ndarray, top_k: int = 0
    ) -> tuple[int, wire.Message, int]:
        """One step of a session: the next token id, the reply (its meta has the server's times) and the
        payload bytes sent."""
        payload = encode(hidden, self.codec)
        meta = {"session": session, "position": position}
        if top_k:
            meta["top_k"] = top_k
        msg = wire.Message(
            wire.STEP, next(self._ids), self.plan.plan_id, [self.cut], meta=meta, frames=[payload]
        )
        reply = self._request(msg)
        if reply.type != wire.RESULT or "next_token" not in reply.tensors:
            raise GenerationError(wire.E_BAD_MESSAGE, f"the server answered a step with {reply.type}")
        token = decode(wire.buffer(reply.frames[reply.tensors.index("next_token")]))
        vocab = self.plan.decoder.vocab if self.plan.decoder else 0
        if token.shape != (1,) or token.dtype != np.int64 or not 0 <= int(token[0]) < vocab:
            raise GenerationError(
                wire.E_BAD_TENSOR, f"the server's next_token is not one token id: {token!r:.80}"
            )
        return int(token[0]), reply, len(payload)

    def end(self, session: int, wait: bool = True) -> None:
        """Free the server's half of the session (it would expire anyway). Without ``wait`` the close is
        only sent: after a step that went unanswered, waiting for its answer too took a second timeout
        before the error came out."""
        msg = wire.Message(wire.CLOSE, next(self._ids), self.plan.plan_id, meta={"session": session})
        if wait:
            self._request(msg)
            return
        with contextlib.suppress(zmq.ZMQError):  # a full queue to a dead server: it expires there
            wire.send(self._sock, msg.to_frames(), zmq.NOBLOCK)

    def generate(self, prompt: np.ndarray, max_new_tokens: int) -> Generation:
        try:
            with self._lock:
                return self._generate(prompt, max_new_tokens)
        finally:
            # closed meanwhile (another thread, a signal handler in this one): close() found the lock
            # taken and left the sockets to whoever holds it; read after letting go, so a close() that
            # came between the last look and the release is not missed
            if self._closed and self._lock.acquire(blocking=False):
                try:
                    self._close_sockets()
                finally:
                    self._lock.release()

    def _generate(self, prompt: np.ndarray, max_new_tokens: int) -> Generation:
        ids = _check_prompt(self.plan, prompt, max_new_tokens)
        session = secrets.randbits(62)
        self.head.reset()
        gen = Generation([], 0.0, None)
        x, position = ids, 0
        failed = True
        try:
            for _ in range(max_new_tokens):
                t0 = time.perf_counter()
                hidden = self.head(x)
                t1 = time.perf_counter()
                token, reply, nbytes = self.step(session, position, hidden)
                t2 = time.perf_counter()
                gen.tokens.append(token)
                gen.step_ms.append((t2 - t0) * 1e3)
                gen.head_ms.append((t1 - t0) * 1e3)
                server = reply.meta.get("server", {})
                gen.server_ms.append(float(server.get("total_ms", 0.0)) if isinstance(server, dict) else 0.0)
                gen.bytes_sent.append(nbytes)
                position += x.shape[1]
                x = np.array([[token]], np.int64)
            failed = False
        finally:
            with contextlib.suppress(GenerationError):  # else it expires on the server by itself
                self.end(session, wait=not failed)
        gen.ttft_ms = gen.step_ms[0]
        gen.tpot_ms = statistics.median(gen.step_ms[1:]) if len(gen.step_ms) > 1 else None
        return gen
