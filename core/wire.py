"""The wire format both sides speak over ZeroMQ (documented in docs/protocol.md).

A message is a multipart ZeroMQ message: frame 0 is a small JSON header, and each tensor
follows as its own frame (a codec payload, sent with ``copy=False``). JSON keeps the header
readable in captures; orjson builds and reads it in ~1 us where the standard library takes ~6
(on the request path that is four times per round trip); the payload frames carry the bulk.
Everything received is validated here before anything else looks at it, so a malformed or
hostile message becomes one ``WireError`` with a code the peer can put in its error reply:
sizes, frame counts and the header's nesting are bounded before anything is allocated for them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
import zmq
from zmq.backend import Socket as _RawSocket

from .plan import MAX_FILES  # files in one deploy, besides plan.json

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
MAX_HEADER_DEPTH = 16  # nesting of arrays/objects in a header; ours use 3
DEFAULT_MAX_MESSAGE_BYTES = 256 * 2**20
MAX_TENSORS = 512  # a model's outputs or a cut's tensors in one message (a 32-layer decoder has 65 outputs)
MAX_ID = 2**63 - 1

# message types
INFER, RESULT, ERROR, PING, PONG, DEPLOY, DEPLOYED = (
    "infer",
    "result",
    "error",
    "ping",
    "pong",
    "deploy",
    "deployed",
)
# decoder sessions: one step of a sequence (the new tokens' hidden state in, the next token out), its end
STEP, CLOSE, CLOSED = "step", "close", "closed"
TYPES = {INFER, RESULT, ERROR, PING, PONG, DEPLOY, DEPLOYED, STEP, CLOSE, CLOSED}
MAX_TOP_K = 64  # a step may ask for the top-k next-token ids and logits, k at most this

# error codes a peer may send back
E_BAD_MESSAGE = "bad-message"  # not a message of this protocol (header, fields, frame count)
E_VERSION = "bad-version"  # another protocol version
E_TOO_LARGE = "too-large"  # over the receiver's size limits
E_UNKNOWN_PLAN = "unknown-plan"  # no such plan here (or it runs entirely on the edge)
E_BAD_TENSOR = "bad-tensor"  # a payload that does not decode, or not the tensors the plan expects
E_INTERNAL = "internal"  # the receiver failed on a valid request; it keeps serving
E_BAD_PLAN = "bad-plan"  # a deploy that does not verify or does not load
E_BUSY = "busy"  # the receiver's queue is full: try again later (or fall back)
E_UNAUTHORIZED = "unauthorized"  # this peer may not do that (e.g. deploy without a deploy key)
E_UNAVAILABLE = "unavailable"  # a relay's next stage is not connected or did not answer in time
E_SESSION_LIMIT = (
    "session-limit"  # a decoder session past the server's limits (sessions, cache memory, length)
)
E_UNKNOWN_SESSION = "unknown-session"  # no such decoder session (never opened, closed, or expired)
E_BAD_POSITION = "bad-position"  # a step's position is not the length of the session's cache
ERROR_CODES = (
    E_BAD_MESSAGE,
    E_VERSION,
    E_TOO_LARGE,
    E_UNKNOWN_PLAN,
    E_BAD_TENSOR,
    E_INTERNAL,
    E_BAD_PLAN,
    E_BUSY,
    E_UNAUTHORIZED,
    E_UNAVAILABLE,
    E_SESSION_LIMIT,
    E_UNKNOWN_SESSION,
    E_BAD_POSITION,
)


class WireError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Message:
    type: str
    id: int = 0
    plan: str = ""
    tensors: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    frames: list = field(default_factory=list)  # payload frames (bytes, memoryview or zmq.Frame)

    def header(self) -> bytes:
        h: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": self.type, "id": self.id}
        if self.plan:
            h["plan"] = self.plan
        if self.tensors:
            h["tensors"] = self.tensors
        if self.meta:
            h["meta"] = self.meta
        return orjson.dumps(h)

    def to_frames(self) -> list:
        return [self.header(), *self.frames]


def error(id_: int, code: str, message: str, plan: str = "") -> Message:
    return Message(ERROR, id_, plan, meta={"code": code, "message": message[:1000]})


def deploy_files(msg: Message) -> dict[str, bytes]:
    """The files a deploy message carries, one frame each, named by ``meta.files``."""
    names = msg.meta.get("files")
    if (
        not isinstance(names, list)
        or len(names) != len(msg.frames)
        or not all(isinstance(n, str) for n in names)
    ):
        raise WireError(E_BAD_PLAN, "deploy needs meta.files naming each frame")
    if len(names) > MAX_FILES + 1:  # the limit protocol.md gives with the other sizes
        raise WireError(
            E_TOO_LARGE, f"a deploy carries plan.json and at most {MAX_FILES} files, not {len(names)}"
        )
    if len(set(names)) != len(names):
        raise WireError(E_BAD_PLAN, "deploy names a file twice")
    if any("/" in n or "\\" in n or n.startswith(".") or not n for n in names):
        raise WireError(E_BAD_PLAN, "file names must be plain names")
    return {n: bytes(buffer(f)) for n, f in zip(names, msg.frames, strict=True)}


def buffer_len(f: Any) -> int:
    """A frame's size in bytes (a memoryview's ``len`` counts items, not bytes)."""
    if type(f) is zmq.Frame or isinstance(f, bytes | bytearray):
        return len(f)
    return memoryview(f).nbytes


def buffer(f: Any) -> Any:
    """The bytes of a frame without copying (a zmq.Frame's buffer, or the object itself)."""
    return f.buffer if type(f) is zmq.Frame else f


def _depth(head: bytes, limit: int) -> int:
    """Deepest nesting of arrays and objects outside strings, stopping once past ``limit``."""
    depth = deepest = 0
    in_string = escaped = False
    for b in head:
        if in_string:
            if escaped:
                escaped = False
            elif b == 0x5C:  # backslash
                escaped = True
            elif b == 0x22:  # quote
                in_string = False
        elif b == 0x22:
            in_string = True
        elif b in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    return deepest
        elif b in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _too_deep(head: bytes) -> bool:
    # a cheap count first: only a header with many brackets needs the scan
    return (
        head.count(b"[") + head.count(b"{") > MAX_HEADER_DEPTH
        and _depth(head, MAX_HEADER_DEPTH) > MAX_HEADER_DEPTH
    )


_MAX_FRAMES = 1 + max(MAX_TENSORS, MAX_FILES + 1)
HEADER_ROOM = 8 * 1024  # what a header holds besides its tensor names: the fields, a result's timings


def names_unfit(names: list[str]) -> str | None:
    """Why a message naming these tensors would break the protocol's limits (None if it would not): a
    plan whose messages the peer must refuse is refused when it is written, not at its first request."""
    if len(names) > MAX_TENSORS:
        return f"{len(names)} tensors, where a message carries at most {MAX_TENSORS}"
    long = next((n for n in names if not 0 < len(n) < 1024), None)
    if long is not None:
        return f"a tensor name of {len(long)} characters, where the protocol takes 1 to 1023"
    size = len(orjson.dumps(names))
    if size > MAX_HEADER_BYTES - HEADER_ROOM:
        return (
            f"tensor names of {size} bytes in all, past a header's {MAX_HEADER_BYTES - HEADER_ROOM} for them"
        )
    return None


_NO_PAYLOAD = frozenset((PING, PONG, DEPLOYED, ERROR, CLOSE, CLOSED))
_WITH_TENSORS = frozenset((INFER, RESULT, STEP))


def parse(frames: list, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Message:
    """Validate and decode a received message (without the ROUTER identity frame). On the request path
    of every request, so the common case costs a few microseconds: type checks by ``type() is``."""
    if not frames:
        raise WireError(E_BAD_MESSAGE, "empty message")
    if len(frames) > _MAX_FRAMES:
        raise WireError(E_TOO_LARGE, f"{len(frames)} frames: more than any message of this protocol")
    total = 0
    for f in frames:
        total += buffer_len(f)
    if total > max_bytes:
        raise WireError(E_TOO_LARGE, f"message of {total} bytes exceeds the {max_bytes}-byte limit")
    first = frames[0]
    head = first.bytes if type(first) is zmq.Frame else bytes(first)
    if len(head) > MAX_HEADER_BYTES:
        raise WireError(E_TOO_LARGE, f"header of {len(head)} bytes exceeds {MAX_HEADER_BYTES}")
    if _too_deep(head):
        raise WireError(E_BAD_MESSAGE, f"header nests deeper than {MAX_HEADER_DEPTH} levels")
    try:
        h = orjson.loads(head)
    except (orjson.JSONDecodeError, RecursionError) as exc:
        try:  # on the error path only: a binary header (msgpack, UTF-16) is told so, not by a parser's detail
            head.decode("utf-8")
        except UnicodeDecodeError:
            raise WireError(E_BAD_MESSAGE, "header is not UTF-8 text: it must be a JSON object") from exc
        raise WireError(E_BAD_MESSAGE, f"header is not JSON: {str(exc)[:200]}") from exc
    if type(h) is not dict:
        raise WireError(E_BAD_MESSAGE, "header is not a JSON object")
    v = h.get("v")
    if v != PROTOCOL_VERSION or type(v) is not int:
        shown = "missing" if v is None else f"{str(v)[:20]!r} ({type(v).__name__})"
        said = f"protocol version {shown} not supported: this peer speaks the integer {PROTOCOL_VERSION}"
        if type(v) is int and v > PROTOCOL_VERSION:  # which side to upgrade, in a fleet upgraded in turns
            said += "; the peer runs a newer SplitPoint: upgrade the one that reports this"
        raise WireError(E_VERSION, said)
    t = h.get("type")
    if type(t) is not str or t not in TYPES:
        raise WireError(E_BAD_MESSAGE, f"unknown message type {str(t)[:40]!r}")
    id_ = h.get("id")
    id_ = 0 if id_ is None else id_  # null is absence, as for every field with a default
    if type(id_) is not int or not (0 <= id_ <= MAX_ID):
        raise WireError(E_BAD_MESSAGE, "field 'id' must be an integer in [0, 2^63)")
    plan = h.get("plan")
    plan = "" if plan is None else plan
    if type(plan) is not str or len(plan) > 128:
        raise WireError(E_BAD_MESSAGE, "field 'plan' must be a string of at most 128 characters")
    tensors = h.get("tensors") if t in _WITH_TENSORS else []  # read only where it names frames
    tensors = [] if tensors is None else tensors
    if type(tensors) is not list or not all(type(x) is str and 0 < len(x) < 1024 for x in tensors):
        raise WireError(E_BAD_MESSAGE, "field 'tensors' must be a list of names of 1 to 1023 characters")
    if len(tensors) > MAX_TENSORS:
        raise WireError(E_TOO_LARGE, f"{len(tensors)} tensors: at most {MAX_TENSORS} in one message")
    meta = h.get("meta")
    meta = {} if meta is None else meta
    if type(meta) is not dict:
        raise WireError(E_BAD_MESSAGE, "field 'meta' must be an object")
    payload = list(frames[1:])
    if t in _WITH_TENSORS:
        if len(payload) != len(tensors):
            raise WireError(
                E_BAD_MESSAGE, f"{len(tensors)} tensors named but {len(payload)} payload frames sent"
            )
        if len(tensors) > 1 and len(set(tensors)) != len(tensors):
            raise WireError(E_BAD_MESSAGE, "tensor names repeat")
    elif payload and t in _NO_PAYLOAD:
        raise WireError(E_BAD_MESSAGE, f"a {t} message carries no payload frames")
    return Message(t, id_, plan, tensors, meta, payload)


def step_fields(msg: Message) -> tuple[int, int, int]:
    """A step's or a close's ``meta``: (session, position, top_k), each an integer in its range."""
    meta = msg.meta
    session, position, top_k = meta.get("session"), meta.get("position"), meta.get("top_k")
    # the optional fields' null is their absence, as JSON writers put it (``top_k: null``)
    position, top_k = 0 if position is None else position, 0 if top_k is None else top_k
    if type(session) is not int or not 0 <= session <= MAX_ID:
        raise WireError(E_BAD_MESSAGE, "meta.session must be an integer in [0, 2^63)")
    if type(position) is not int or not 0 <= position <= MAX_ID:
        raise WireError(E_BAD_MESSAGE, "meta.position must be an integer in [0, 2^63)")
    if type(top_k) is not int or not 0 <= top_k <= MAX_TOP_K:
        raise WireError(E_BAD_MESSAGE, f"meta.top_k must be an integer from 0 to {MAX_TOP_K}")
    return session, position, top_k


# a header too large or too deep to parse may still open with its id and plan, as every client writes
# them: read at the top level, before any nested value, in its first 4 KiB
_LEADING_FIELD = re.compile(rb'"(id|plan)"\s*:\s*(\d{1,20}|"[0-9a-f]{1,128}")\s*[,}]')


def _best_effort_header(frames: list) -> dict:
    try:
        head = bytes(buffer(frames[0]))
        if len(head) > MAX_HEADER_BYTES or _too_deep(head):
            return _leading_fields(head)
        h = orjson.loads(head)
        return h if type(h) is dict else {}
    except Exception:  # anything unreadable names nothing
        return {}


def _leading_fields(head: bytes) -> dict:
    """``id`` and ``plan`` of a header refused unparsed, where they come before any nested object or
    array (protocol.md: an error carries the request's id wherever it can be read)."""
    start = head[:4096].lstrip()
    if not start.startswith(b"{"):
        return {}
    top = re.split(rb"[\[{]", start[1:], maxsplit=1)[0]
    out: dict = {}
    for key, value in _LEADING_FIELD.findall(top):
        out.setdefault(key.decode(), int(value) if value[:1] != b'"' else value[1:-1].decode())
    return out


def _header_id(h: dict) -> int:
    v = h.get("id", 0)
    return v if type(v) is int and 0 <= v <= MAX_ID else 0


def best_effort_id(frames: list) -> int:
    """The request id of a message that failed validation, when its header still names one (0 if not),
    so that the sender can match the error to its request."""
    return _header_id(_best_effort_header(frames))


def best_effort_error(frames: list, code: str, message: str) -> Message:
    """The error answering a message that failed validation: with its id, and the plan it named where its
    header still names one that could be a plan's (an error answering a request carries its plan)."""
    h = _best_effort_header(frames)
    plan = h.get("plan")
    return error(_header_id(h), code, message, plan if type(plan) is str and len(plan) <= 128 else "")


# -- the socket calls of the request path ------------------------------------------------------
# pyzmq's send_multipart/recv_multipart turn every flag into an enum (``SNDMORE | flags``) and look at
# the socket's options per frame: ~3.5 us per message pair, measured. These call the compiled socket
# methods with plain ints; the frames and their semantics are the same.
_EVENTS, _POLLIN, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)
_SNDMORE, _RCVMORE = int(zmq.SNDMORE), int(zmq.RCVMORE)
_send, _recv, _get = _RawSocket.send, _RawSocket.recv, _RawSocket.get
# Frames below this are copied into the message, larger ones are sent without a copy. pyzmq's
# zero-copy path tells its garbage-collector thread when libzmq lets go of a frame, which costs
# more than copying up to about this size (measured: 392 KiB takes 44 us zero-copy, 23 us copied;
# 1 MiB 26 us against 50 us); pyzmq's default threshold is 64 KiB.
COPY_THRESHOLD = 256 * 1024


_S = TypeVar("_S", bound=zmq.Socket)


def tune(sock: _S) -> _S:
    """Set the request path's socket options that both sides share."""
    sock.copy_threshold = COPY_THRESHOLD
    return sock


# a connection whose peer vanished without closing it (a phone that changed networks, a device that lost
# power) is probed after this long idle and dropped after KEEPALIVE_COUNT unanswered probes: its routing
# id, its decoder sessions and its file descriptor are freed in about 1 min, not TCP's default 2 h
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT = 30, 10, 3


def router(ctx: zmq.Context) -> zmq.Socket:
    """A ROUTER socket that serves clients (a server's, a relay's, the edge daemon's local one).

    No ``ZMQ_ROUTER_HANDOVER``: with it, a connection that took over another's routing id left that
    other's socket open for good once it sent again (libzmq issue 3238), one file descriptor per round, so
    any client could exhaust the server's; ZMTP heartbeats on such a socket abort the process in libzmq
    4.3.5. Without it a connection under an id an open one holds is not read (docs/protocol.md says so);
    TCP keepalive, which probes only an idle connection and so never drops a slow large transfer, frees
    the ids of peers that vanished."""
    sock = tune(ctx.socket(zmq.ROUTER))
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, KEEPALIVE_IDLE_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, KEEPALIVE_INTERVAL_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, KEEPALIVE_COUNT)
    return sock


def dealer(
    ctx: zmq.Context, max_message_bytes: int, heartbeat_s: float, timeout_s: float, ttl_s: float
) -> zmq.Socket:
    """A DEALER to the next hop (an edge's to its server, a relay's to the next stage): nothing queued
    towards a peer that is not connected (a request then fails at once, explicitly), redialled with
    backoff (0.1 s doubling to 2 s), messages past ``max_message_bytes`` refused, and ZMTP heartbeats: a
    ping every ``heartbeat_s``, the connection dropped after ``timeout_s`` without an answer, and the
    peer told to drop it after ``ttl_s`` without one from here."""
    s = tune(ctx.socket(zmq.DEALER))
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.IMMEDIATE, 1)
    s.setsockopt(zmq.RECONNECT_IVL, 100)
    s.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    s.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    s.setsockopt(zmq.HEARTBEAT_IVL, int(heartbeat_s * 1000))
    s.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(timeout_s * 1000))
    s.setsockopt(zmq.HEARTBEAT_TTL, int(ttl_s * 1000))
    return s


def send(sock: zmq.Socket, frames: list, flags: int = 0) -> None:
    """``sock.send_multipart(frames, flags, copy=False)``, without pyzmq's per-frame overhead. As there,
    a multipart message is queued whole or not at all (``zmq.Again`` only for the first frame)."""
    last = len(frames) - 1
    for i, f in enumerate(frames):
        _send(sock, f, flags | _SNDMORE if i < last else flags, False)


def recv(sock: zmq.Socket, flags: int = _NOBLOCK) -> list:
    """One multipart message as zmq.Frames (``recv_multipart(flags, copy=False)``)."""
    parts = [_recv(sock, flags, False)]
    while _get(sock, _RCVMORE):
        parts.append(_recv(sock, flags, False))
    return parts


def drain(sock: zmq.Socket, limit: int = 1_000_000) -> Iterator[list]:
    """Up to ``limit`` messages waiting on a socket, without blocking (one poll can cover several).
    Asks the socket whether a message waits rather than catching ``zmq.Again`` (an exception per call)."""
    for _ in range(limit):
        if not int(_get(sock, _EVENTS)) & _POLLIN:
            return
        try:
            yield recv(sock)
        except zmq.Again:
            return
