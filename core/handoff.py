"""Handing frames from worker threads to the thread that owns a ZeroMQ socket.

ZeroMQ sockets are not thread-safe: one I/O thread owns each, and other threads pass it frames over
inproc PUSH sockets, one per sending thread (a PUSH socket is itself not thread-safe either).
"""

from __future__ import annotations

import threading

import zmq


class Handoff:
    def __init__(self, ctx: zmq.Context, endpoint: str):
        self.ctx, self.endpoint = ctx, endpoint
        self._local = threading.local()

    def bind(self) -> zmq.Socket:
        """The owner's end (a PULL socket); call from the owning thread before anyone sends."""
        pull = self.ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        pull.bind(self.endpoint)
        return pull

    def send(self, frames: list, block: bool = True) -> bool:
        """Pass ``frames`` to the owner; with ``block=False`` a full or closed owner returns False
        instead of waiting (a worker must never hang on a socket thread that has stopped)."""
        sock = getattr(self._local, "push", None)
        if sock is None:
            sock = self._local.push = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.endpoint)
        try:
            sock.send_multipart(frames, 0 if block else zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        return True
