"""CurveZMQ keys: generated, read and checked in one place for the server and the edge."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.utils import z85

from .errors import ConfigError

Z85 = frozenset(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#")


def read_key(path: Path, what: str) -> bytes:
    """A z85 key (40 characters) from a file, or a ConfigError that says which file and why."""
    try:
        key = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    if len(key) != 40:
        raise ConfigError(f"{path}: not a z85 CurveZMQ key (expected 40 characters, found {len(key)})")
    bad = next((i for i, c in enumerate(key) if c not in Z85), None)
    if bad is not None:  # libzmq answered these with a bare "Invalid argument", or not at all
        raise ConfigError(f"{path}: not a z85 CurveZMQ key (character {bad + 1} is not one z85 uses)")
    try:  # z85's characters in an order no key has (a typo): a traceback from libzmq, or a silent mismatch
        z85.decode(key)
    except (ValueError, OverflowError, struct.error) as exc:
        raise ConfigError(
            f"{path}: not a z85 CurveZMQ key (it does not decode: a character mistyped?)"
        ) from exc
    return key


def read_public(path: Path, what: str = "public key") -> bytes:
    """A public key. ``keygen`` writes NAME.key (secret) beside NAME.pub: a .key file here is the
    secret one, which would be accepted as a key nobody holds the secret of, and leak where it is sent."""
    if Path(path).suffix == ".key":
        raise ConfigError(
            f"{path}: a .key file is a secret key (`splitpoint keygen` writes NAME.key secret, NAME.pub "
            f"public): give the {what}, {Path(path).with_suffix('.pub').name}"
        )
    return read_key(path, what)


def read_secret(path: Path) -> bytes:
    """A secret key, refused where others can read it (as ssh refuses an unprotected private key) or
    where it is a public one: a server given its own .pub as its secret ran with a key anyone could
    derive its identity from."""
    p = Path(path)
    if p.suffix == ".pub":
        raise ConfigError(
            f"{p}: a .pub file is a public key (`splitpoint keygen` writes NAME.key secret, NAME.pub "
            f"public): give the secret key, {p.with_suffix('.key').name}"
        )
    try:
        mode = p.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"cannot read secret key {p}: {exc.strerror or exc}") from exc
    if p.is_dir():
        raise ConfigError(
            f"{p} is a directory: give the secret key's file (NAME.key from `splitpoint keygen`)"
        )
    if mode & 0o077:
        raise ConfigError(
            f"{p}: a secret key readable by other users (mode {mode & 0o777:o}): `chmod 600 {p}`"
        )
    return read_key(p, "secret key")


def keypair_from_secret(path: Path) -> tuple[bytes, bytes]:
    """(public, secret) for a secret-key file: the public key is derived, not stored beside it."""
    secret = read_secret(path)
    try:
        return zmq.curve_public(secret), secret
    except (ValueError, zmq.ZMQError) as exc:
        raise ConfigError(f"{path}: not a z85 CurveZMQ secret key ({exc})") from exc


def keygen(out: Path) -> tuple[Path, Path]:
    """Write OUT.key (secret, mode 600) and OUT.pub; never overwrites a key."""
    # the name as given, dots and all (pi.kitchen → pi.kitchen.key, not pi.key); a .key or .pub typed
    # with it is the pair's own suffix, not part of the name
    name = str(out)
    for suffix in (".key", ".pub"):
        name = name.removesuffix(suffix)
    key, pub = Path(f"{name}.key"), Path(f"{name}.pub")
    if not key.parent.is_dir():
        if key.parent.exists():
            raise ConfigError(f"{key.parent} is a file, not a directory: give a path in a directory")
        raise ConfigError(f"directory {key.parent} does not exist; create it first")
    if key.exists() or pub.exists():
        raise ConfigError(f"{key} or {pub} exists; not overwriting a key")
    public, secret = zmq.curve_keypair()
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret + b"\n")
    pub.write_bytes(public + b"\n")
    return key, pub


HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


# libzmq gives up on a connection whose handshake the peer refused (a key not on its --curve-allow: AUTH) or
# could not speak (CurveZMQ against a plain server: PROTOCOL): the socket never dials again, and with
# nothing to queue on a blocking send waits for ever. A client that must outlive the refusal (an operator
# adds the key and restarts the server) opens a new socket after REDIAL_FIRST_S, doubling to REDIAL_MAX_S.
GAVE_UP = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
REDIAL_FIRST_S, REDIAL_MAX_S = 2.0, 30.0


@dataclass
class Redial:
    """When a client opens a new socket after libzmq gave up on one (``GAVE_UP``): REDIAL_FIRST_S after
    the first refusal, doubling to REDIAL_MAX_S while refusals go on, from the start once a handshake
    succeeds. Times are the caller's clock."""

    at: float | None = None  # when the next new socket is due; None: none is
    wait: float | None = None  # the last wait; None: no refusal since the last success

    def refused(self, now: float) -> None:
        if self.at is None:
            self.retry(now)

    def retry(self, now: float) -> None:
        """Due again later: a new socket could not be had now, or the connection was refused."""
        self.wait = REDIAL_FIRST_S if self.wait is None else min(2 * self.wait, REDIAL_MAX_S)
        self.at = now + self.wait

    def due(self, now: float) -> bool:
        return self.at is not None and now >= self.at

    def dialled(self) -> None:
        self.at = None

    def connected(self) -> None:
        self.wait = None


def handshake_refused(endpoint: str, server_key_option: str = "--curve-server-key") -> str:
    """What an operator reads when a peer refuses this side's handshake: a refused key otherwise showed only
    as "unreachable" or a local fallback."""
    return (
        f"{endpoint} refused the connection's handshake: check that {server_key_option} is its public key "
        "and that this side's public key is on its --curve-allow (or that it uses CurveZMQ at all)"
    )


def handshake_failed(endpoint: str, curve: bool, server_key_option: str = "--curve-server-key") -> str:
    """Why a connection's handshake failed, as far as this side can tell: with CurveZMQ, a key the peer
    refuses; without it (a plain client told to check keys it never gave), a peer that closed the connection
    during ZeroMQ's greeting, or one that asks for CurveZMQ."""
    if curve:
        return handshake_refused(endpoint, server_key_option)
    return (
        f"{endpoint} failed the connection's handshake: it closed the connection during ZeroMQ's greeting "
        f"(stopping or restarting), or it asks for CurveZMQ ({server_key_option}), or it speaks another "
        "protocol"
    )
