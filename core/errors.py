"""Error types. Every failure a user can cause maps to one of these, so the CLI can print a
specific message and exit non-zero instead of a traceback."""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (or its type where it has none): what a one-line
    error quotes of another library's report."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def clipped(text: str, limit: int = 300) -> str:
    """``text`` of at most about ``limit`` characters: its start and its end, where it is longer.
    onnxruntime's report of a failure inside nested Ifs names each node on the way and the cause last
    ("... LSTM node ... Input X must have 3 dimensions"): cut at its start, the cause was lost."""
    if len(text) <= limit:
        return text
    head = limit // 3
    return f"{text[:head]} … {text[-(limit - head) :]}"


def os_reason(exc: OSError) -> str:
    """A file system's refusal in words, with the path it names: "Read-only file system: /plans"."""
    where = f": {exc.filename}" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


def describe(exc: BaseException) -> str:
    """An unexpected exception as an error reply or log says it: its type and its words. A MemoryError
    has no words (a deploy refused for memory read "MemoryError: " and nothing more)."""
    said = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return (
        f"out of memory ({said}): this process has no memory for it" if isinstance(exc, MemoryError) else said
    )


def unsupported_version(what: str, found: object, reads: tuple[int, ...]) -> str:
    """Why a version is refused, and which side to upgrade: a fleet upgrades one machine at a time, and
    a newer peer's plan, payload or message read as "unsupported" left the user to guess which."""
    shown = f"{str(found)[:20]!r}" if type(found) is not int else str(found)
    said = f"unsupported {what} {shown} (this SplitPoint reads {', '.join(map(str, reads))})"
    if type(found) is int and found > max(reads):
        said += ": a newer SplitPoint wrote it; upgrade the SplitPoint that reads it"
    return said


class SplitPointError(Exception):
    """Base for errors caused by input (files, arguments, frames), not by bugs."""

    exit_code = 2


class ModelError(SplitPointError):
    """The model file is missing, unreadable, not ONNX, corrupt, or fails the checker."""


class CutError(SplitPointError):
    """A requested cut does not exist or is not a valid head/tail boundary."""


class PlanError(SplitPointError):
    """A plan directory is incomplete, inconsistent, or its checksums do not match."""


class OutputExistsError(SplitPointError):
    """Refusing to overwrite a non-empty output directory without --force."""


class ProfileError(SplitPointError):
    """A device, network or measured profile is malformed or belongs to another model."""


class ConfigError(SplitPointError):
    """An option or configuration value is out of range, malformed, or contradicts another."""
