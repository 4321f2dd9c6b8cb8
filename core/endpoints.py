"""ZeroMQ endpoints as users type them, checked before any socket sees them.

libzmq answers a malformed endpoint with EINVAL and no hint; a user who typed ``127.0.0.1:5555`` should
hear that the scheme is missing. ``Endpoint`` is the pydantic type every config uses for one.
"""

from __future__ import annotations

import os
import re
import socket
import stat
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator

_TCP = re.compile(r"^tcp://(\*|\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.\-]+):(\*|\d{1,5})$")
_LOCAL = re.compile(r"^(ipc|inproc)://\S+$")


def check_endpoint(endpoint: str) -> str:
    """The endpoint unchanged if it is tcp://HOST:PORT, ipc://PATH or inproc://NAME, else ValueError."""
    if not endpoint:
        raise ValueError("empty endpoint")
    if "://" not in endpoint:
        if endpoint.startswith(("/", "./", "../", "~")) or endpoint.endswith(".sock"):  # a socket's path
            # ZeroMQ does not expand ~: the suggestion spells the home directory out
            path = os.path.expanduser(endpoint)
            raise ValueError(f"{endpoint!r} has no scheme; write ipc://{path} for a local socket")
        raise ValueError(
            f"{endpoint!r} has no scheme; write tcp://{endpoint} (or ipc://PATH for a local socket)"
        )
    m = _TCP.match(endpoint)
    if m:
        if m.group(2) != "*" and int(m.group(2)) > 65535:
            raise ValueError(f"port {m.group(2)} out of range in {endpoint!r}")
        return endpoint
    if _LOCAL.match(endpoint):
        return endpoint
    raise ValueError(f"{endpoint!r} is not tcp://HOST:PORT, ipc://PATH or inproc://NAME")


Endpoint = Annotated[str, AfterValidator(check_endpoint)]


def is_loopback(endpoint: str) -> bool:
    """Whether a bind endpoint is reachable only from this machine."""
    if not endpoint.startswith("tcp://"):
        return True  # ipc and inproc never leave the machine
    host = endpoint[len("tcp://") :].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def ipc_path(endpoint: str) -> Path | None:
    """The socket file an ``ipc://`` endpoint binds; None for any other endpoint and for Linux's abstract
    namespace (``ipc://@name``), which has no file."""
    if not endpoint.startswith("ipc://") or endpoint.startswith("ipc://@"):
        return None
    return Path(endpoint[len("ipc://") :])


def ipc_in_use(endpoint: str) -> bool:
    """Whether a live process accepts connections on an ``ipc://`` path. libzmq binds over an existing
    socket file without a word (it unlinks it), and the process listening there goes on running, deaf:
    a second daemon given the same --listen took the first one's requests and deploys."""
    path = ipc_path(endpoint)
    if path is None:
        return False  # tcp reports EADDRINUSE itself, and so does Linux's abstract namespace
    try:
        if not stat.S_ISSOCK(path.stat().st_mode):
            return False
    except OSError:
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(str(path))
    except OSError:
        return False  # a file left by a process that is gone: binding over it is right
    finally:
        probe.close()
    return True
