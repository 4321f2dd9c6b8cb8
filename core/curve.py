"""CurveZMQ keys: generated, read and checked in one place for the server and the edge."""

from __future__ import annotations

import os
from pathlib import Path

import zmq

from .errors import ConfigError


def read_key(path: Path, what: str) -> bytes:
    """A z85 key (40 characters) from a file, or a ConfigError that says which file and why."""
    try:
        key = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    if len(key) != 40:
        raise ConfigError(f"{path}: not a z85 CurveZMQ key (expected 40 characters, found {len(key)})")
    return key


def keypair_from_secret(path: Path) -> tuple[bytes, bytes]:
    """(public, secret) for a secret-key file: the public key is derived, not stored beside it."""
    secret = read_key(path, "secret key")
    try:
        return zmq.curve_public(secret), secret
    except (ValueError, zmq.ZMQError) as exc:
        raise ConfigError(f"{path}: not a z85 CurveZMQ secret key ({exc})") from exc


def keygen(out: Path) -> tuple[Path, Path]:
    """Write OUT.key (secret, mode 600) and OUT.pub; never overwrites a key."""
    key, pub = Path(out).with_suffix(".key"), Path(out).with_suffix(".pub")
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
