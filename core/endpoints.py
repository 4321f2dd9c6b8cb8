"""ZeroMQ endpoints as users type them, checked before any socket sees them.

libzmq answers a malformed endpoint with EINVAL and no hint; a user who typed ``127.0.0.1:5555`` should
hear that the scheme is missing. ``Endpoint`` is the pydantic type every config uses for one.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import stat
import threading
from pathlib import Path
from typing import Annotated, Any

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


def _tcp_host(endpoint: str) -> str | None:
    """The host of a ``tcp://`` endpoint as written (``[::1]``, ``*``, a name); None for ipc and inproc."""
    return endpoint[len("tcp://") :].rsplit(":", 1)[0] if endpoint.startswith("tcp://") else None


def is_loopback(endpoint: str) -> bool:
    """Whether a bind endpoint is reachable only from this machine."""
    host = _tcp_host(endpoint)
    if host is None:
        return True  # ipc and inproc never leave the machine
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback  # 127.0.0.0/8, ::1 however it is written
    except ValueError:
        return False  # a host name or *


def _ipv6(endpoint: str) -> bool:
    """Whether a socket needs ZMQ_IPV6 for this endpoint. Without it libzmq resolves IPv4 only, and
    ``tcp://[::1]:5555`` failed with "No such device". An IPv6 literal needs it; a bind on ``*`` gets it so
    that the server listens on IPv6 as well as IPv4 (libzmq's dual-stack socket, IPv4 alone where the
    kernel has no IPv6). A host name stays IPv4: with the option on, libzmq resolves a name to its IPv6
    addresses alone, and a server bound to an IPv4 address behind a name with both would not be reached."""
    host = _tcp_host(endpoint)
    return host is not None and (host.startswith("[") or host == "*")


def bind(sock: Any, endpoint: str) -> None:
    """``sock.bind(endpoint)``, IPv6 included (see ``_ipv6``)."""
    sock.ipv6 = _ipv6(endpoint)
    sock.bind(endpoint)


def connect(sock: Any, endpoint: str) -> None:
    """``sock.connect(endpoint)``, IPv6 included (see ``_ipv6``)."""
    sock.ipv6 = _ipv6(endpoint)
    sock.connect(endpoint)


def name_problem(endpoint: str, timeout_s: float = 1.0) -> str | None:
    """Why a ``tcp://`` endpoint's host name leads nowhere, or None. libzmq resolves a name in its I/O
    thread and retries for ever without a word, so a mistyped --server read as a server that is not
    running. Called only once a connection is overdue: a resolver may take seconds to answer."""
    host = _tcp_host(endpoint)
    if host is None or host.startswith("[") or host == "*":
        return None
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    # asked on a thread of its own and waited for a second at most: a resolver that cannot be reached
    # takes 5 s per try and server, and a daemon's start or a deploy's answer would wait for it
    found: list[BaseException | None] = []

    def ask() -> None:
        try:
            socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
            found.append(None)
        except (OSError, UnicodeError) as exc:  # socket.gaierror is an OSError
            found.append(exc)

    t = threading.Thread(target=ask, name="splitpoint-resolve", daemon=True)
    t.start()
    t.join(timeout_s)
    exc = found[0] if found else None
    if exc is None:
        return None  # resolved, or no answer yet: nothing to say
    why = getattr(exc, "strerror", None) or str(exc)
    return (
        f"the host name {host!r} has no IPv4 address ({why}); check the name, or give an IPv6 address "
        "in brackets (tcp://[2001:db8::7]:5555)"
    )


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
