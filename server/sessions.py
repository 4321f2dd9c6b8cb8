"""Decoder sessions: the server's half of each sequence's KV cache, with the limits that keep many edges
from exhausting it.

A session is keyed by the client's connection (its routing identity and the server's socket for it), the
plan and the session number the client chose, so clients cannot reach each other's sequences, and it is
freed when that connection closes (``drop_peer``): a client that sets its own routing identity cannot take
over the sessions of an earlier connection with the same one (while that one is open, libzmq does not read
the newer one at all; once it has closed, its sessions are gone). A step at position 0 opens the session
(or starts it again); every later step must name the position the cache has reached, so a lost or
repeated step is refused (``bad-position``) instead of silently corrupting the sequence. Limits: the number
of sessions, the bytes of all caches together, and the model's positions; a session idle past
``idle_s`` is freed. A step that would pass a limit is refused and leaves the session as it was.

Only the socket thread touches this: no locks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from splitpoint.core import wire
from splitpoint.core.kvcache import as_past
from splitpoint.core.machine import trim_heap

# freed cache bytes past which the heap's free pages go back to the system: a server that held many
# sessions for a while otherwise keeps their memory at its peak for good
TRIM_AFTER_BYTES = 64 << 20

# a turn of the server's loop this much longer than it waited for messages and computed: the server
# itself did not run meanwhile
STALLED_S = 2.0

# (the client's routing identity, the server's file descriptor for its connection or None where libzmq does
# not say, plan id, session number)
Key = tuple[bytes, int | None, str, int]


@dataclass
class Session:
    past: dict[str, np.ndarray]
    length: int = 0  # tokens in the cache
    nbytes: int = 0
    last_used: float = field(default_factory=time.monotonic)


class SessionError(wire.WireError):
    pass


class DecoderSessions:
    def __init__(self, max_sessions: int, max_cache_bytes: int, idle_s: float):
        self.max_sessions, self.max_cache_bytes, self.idle_s = max_sessions, max_cache_bytes, idle_s
        self._s: dict[Key, Session] = {}
        self.cache_bytes = 0
        self.expired = 0
        self.dropped = 0  # freed because their connection closed
        self._next_sweep = 0.0
        self._freed = 0  # cache bytes freed since the heap was last trimmed

    def __len__(self) -> int:
        return len(self._s)

    def __contains__(self, key: Key) -> bool:
        return key in self._s

    def holds(self, peer: bytes, fd: int | None) -> bool:
        """Whether any session belongs to this connection."""
        return any(k[0] == peer and k[1] == fd for k in self._s)

    def begin(self, key: Key, position: int, empty: dict[str, np.ndarray]) -> Session:
        """The session a step at ``position`` continues, or SessionError. At position 0 it is a new one,
        held aside until ``commit``: a start (or a start over) that is refused, or whose step fails,
        leaves any session under the same key as it was."""
        s = self._s.get(key)
        if position == 0:
            if s is None and len(self._s) >= self.max_sessions:
                raise SessionError(
                    wire.E_SESSION_LIMIT,
                    f"{len(self._s)} decoder sessions are open (the limit is {self.max_sessions}): "
                    "close one or retry later",
                )
            return Session(past=empty)
        if s is None:
            raise SessionError(
                wire.E_UNKNOWN_SESSION,
                f"no session {key[-1]} here (never opened, closed, or idle longer than {self.idle_s:g} s): "
                "start again at position 0",
            )
        if position != s.length:
            raise SessionError(
                wire.E_BAD_POSITION,
                f"step at position {position}, but session {key[-1]} holds {s.length} tokens",
            )
        return s

    def commit(self, key: Key, s: Session, presents: dict[str, np.ndarray], new_tokens: int) -> None:
        """The step's presents become the session's past (a new session's replacing any under its key),
        unless that passes the cache-memory limit: then every session stays as it was and SessionError
        says why."""
        held = self._s.get(key)
        freed = held.nbytes if held is not None else 0  # what this step's session replaces or grows from
        nbytes = sum(v.nbytes for v in presents.values())
        if nbytes > self.max_cache_bytes:  # no retry can help: said so, not "retry later"
            raise SessionError(
                wire.E_SESSION_LIMIT,
                f"this session's cache alone would hold {nbytes:,} bytes, more than the server's limit for "
                f"all of them ({self.max_cache_bytes:,}, --max-cache-mb): shorten the sequence or raise it",
            )
        if self.cache_bytes - freed + nbytes > self.max_cache_bytes:
            raise SessionError(
                wire.E_SESSION_LIMIT,
                f"the decoder caches would hold {self.cache_bytes - freed + nbytes:,} bytes "
                f"(the limit is {self.max_cache_bytes:,}): close sessions or retry later",
            )
        s.past = as_past(presents)
        self.cache_bytes += nbytes - freed
        s.nbytes, s.length, s.last_used = nbytes, s.length + new_tokens, time.monotonic()
        self._s[key] = s

    def close(self, key: Key) -> bool:
        s = self._s.pop(key, None)
        if s is not None:
            self.cache_bytes -= s.nbytes
            self._freed += s.nbytes
        return s is not None

    def clear(self) -> None:
        """Free every session (a stopped server's)."""
        for key in list(self._s):
            self.close(key)

    def drop_peer(self, peer: bytes, fd: int | None = None) -> int:
        """Free every session of one connection (it closed): its routing identity and its socket, so a
        newer connection that took the identity over keeps its own; how many there were."""
        gone = [k for k in self._s if k[0] == peer and k[1] == fd]
        for k in gone:
            self.close(k)
        self.dropped += len(gone)
        return len(gone)

    def stalled(self, seconds: float) -> None:
        """The server did not run for ``seconds`` (its process stopped or suspended, a machine asleep):
        that time is no client's idleness. After a resume, whether a session its client went on using
        outlived it was a race between the client's step and the first sweep."""
        for s in self._s.values():
            s.last_used += seconds

    @property
    def due(self) -> bool:
        """Whether ``sweep`` has work: sessions that may expire, or freed caches' memory to hand back
        (sessions ended or dropped with their connection, and none left to sweep)."""
        return bool(self._s) or self._freed >= TRIM_AFTER_BYTES

    def sweep(self, now: float | None = None) -> int:
        """Free the sessions idle longer than ``idle_s`` (at most once a second); how many were freed."""
        now = time.monotonic() if now is None else now
        if now < self._next_sweep:
            return 0
        self._next_sweep = now + min(1.0, self.idle_s / 2)
        stale = [k for k, s in self._s.items() if now - s.last_used > self.idle_s]
        for k in stale:
            self.close(k)
        self.expired += len(stale)
        if self._freed >= TRIM_AFTER_BYTES:  # at most once a sweep: a trim walks the heap (a few ms)
            self._freed = 0
            trim_heap()
        return len(stale)
