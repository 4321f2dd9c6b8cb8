"""The wire format both sides speak over ZeroMQ (documented in docs/protocol.md).

A message is a multipart ZeroMQ message: frame 0 is a small JSON header, and each tensor
follows as its own frame (a codec payload, sent with ``copy=False``). JSON keeps the header
readable in captures and costs ~10 us at these sizes; the payload frames carry the bulk.
Everything received is validated here before anything else looks at it, so a malformed or
hostile message becomes one ``WireError`` with a code the server can put in its error reply.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
DEFAULT_MAX_MESSAGE_BYTES = 256 * 2**20
MAX_TENSORS = 64

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
TYPES = {INFER, RESULT, ERROR, PING, PONG, DEPLOY, DEPLOYED}

# error codes a peer may send back
E_BAD_MESSAGE, E_VERSION, E_TOO_LARGE, E_UNKNOWN_PLAN, E_BAD_TENSOR, E_INTERNAL, E_BAD_PLAN = (
    "bad-message",
    "bad-version",
    "too-large",
    "unknown-plan",
    "bad-tensor",
    "internal",
    "bad-plan",
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
        h = {"v": PROTOCOL_VERSION, "type": self.type, "id": self.id}
        if self.plan:
            h["plan"] = self.plan
        if self.tensors:
            h["tensors"] = self.tensors
        if self.meta:
            h["meta"] = self.meta
        return json.dumps(h, separators=(",", ":")).encode()

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
    if any("/" in n or n.startswith(".") for n in names):
        raise WireError(E_BAD_PLAN, "file names must be plain names")
    return {n: bytes(_buffer(f)) for n, f in zip(names, msg.frames, strict=True)}


def _buffer_len(f) -> int:
    if isinstance(f, (bytes, bytearray)):
        return len(f)
    if isinstance(f, memoryview):
        return f.nbytes
    return len(f.buffer) if hasattr(f, "buffer") else len(f)


def _buffer(f):
    return f.buffer if hasattr(f, "buffer") else f


def parse(frames: list, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Message:
    """Validate and decode a received message (without the ROUTER identity frame)."""
    if not frames:
        raise WireError(E_BAD_MESSAGE, "empty message")
    total = sum(_buffer_len(f) for f in frames)
    if total > max_bytes:
        raise WireError(E_TOO_LARGE, f"message of {total} bytes exceeds the {max_bytes}-byte limit")
    head = bytes(_buffer(frames[0]))
    if len(head) > MAX_HEADER_BYTES:
        raise WireError(E_TOO_LARGE, f"header of {len(head)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        h = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(E_BAD_MESSAGE, f"header is not JSON: {exc}") from exc
    if not isinstance(h, dict):
        raise WireError(E_BAD_MESSAGE, "header is not a JSON object")
    v = h.get("v")
    if v != PROTOCOL_VERSION:
        raise WireError(
            E_VERSION, f"protocol version {v!r} not supported (this peer speaks {PROTOCOL_VERSION})"
        )
    t = h.get("type")
    if t not in TYPES:
        raise WireError(E_BAD_MESSAGE, f"unknown message type {t!r}")
    id_ = h.get("id", 0)
    if not isinstance(id_, int) or isinstance(id_, bool) or not (0 <= id_ < 2**63):
        raise WireError(E_BAD_MESSAGE, "field 'id' must be a non-negative integer")
    plan = h.get("plan", "")
    if not isinstance(plan, str) or len(plan) > 128:
        raise WireError(E_BAD_MESSAGE, "field 'plan' must be a string")
    tensors = h.get("tensors", [])
    if (
        not isinstance(tensors, list)
        or len(tensors) > MAX_TENSORS
        or not all(isinstance(x, str) and len(x) < 1024 for x in tensors)
    ):
        raise WireError(E_BAD_MESSAGE, "field 'tensors' must be a list of names")
    meta = h.get("meta", {})
    if not isinstance(meta, dict):
        raise WireError(E_BAD_MESSAGE, "field 'meta' must be an object")
    payload = list(frames[1:])
    if t in (INFER, RESULT) and len(payload) != len(tensors):
        raise WireError(E_BAD_MESSAGE, f"{len(tensors)} tensors named but {len(payload)} payload frames sent")
    if t in (INFER, RESULT) and len(set(tensors)) != len(tensors):
        raise WireError(E_BAD_MESSAGE, "tensor names repeat")
    return Message(t, id_, plan, tensors, meta, payload)


def drain(sock):
    """Every message waiting on a socket, without blocking (one poll can cover several)."""
    import zmq

    while True:
        try:
            yield sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
