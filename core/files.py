"""Where SplitPoint keeps files between runs, and writing them so that none is ever half-written."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import ConfigError, OutputExistsError


def cache_root() -> Path:
    """``$SPLITPOINT_CACHE``, else ``~/.cache/splitpoint``: built zoo models, codec speeds. Set but empty
    counts as unset (an empty path is the working directory, which filled with the cache's files)."""
    return Path(os.environ.get("SPLITPOINT_CACHE") or Path.home() / ".cache" / "splitpoint")


def utf8_path(path: str | Path) -> str:
    """``path`` as onnxruntime and a plan's JSON take it: Unicode that encodes to UTF-8 (Python's own file
    calls keep the path as given, escaped or not). A name given in a C locale arrives with its UTF-8 bytes
    escaped (``modèle`` as ``mod\\udcc3\\udca8le``) and is recovered; a name whose bytes are not UTF-8
    (Latin-1's ``é``) is refused by name, where onnxruntime raised a TypeError and a plan's model name a
    validation error."""
    raw = os.fsencode(path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        shown = raw.decode("utf-8", "backslashreplace")
        raise ConfigError(
            f"the path '{shown}' is not valid UTF-8, which onnxruntime needs: rename it (e.g. convmv -f "
            "latin1 -t utf8)"
        ) from None


def current_umask() -> int:
    """The process's umask (read by setting it and back: there is no getter)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_in_the_way(path: str | Path) -> Path | None:
    """The first of ``path`` and the directories above it that exists and is not a directory: where a
    directory was wanted, the file that stops it being made (None: nothing in the way)."""
    p = Path(path)
    return next((q for q in (p, *p.parents) if q.exists() and not q.is_dir()), None)


def cannot_write_in(folder: str | Path) -> str | None:
    """Why no file can be written in ``folder`` (made where missing), in words, or None: checked before
    minutes of measurement, not after them. A file in the way, a read-only file system, or a folder this
    user may not write (the nearest that exists: a missing one is made in it)."""
    p = Path(folder)
    if (blocked := file_in_the_way(p)) is not None:
        return f"{blocked} is a file"
    near = next((q for q in (p, *p.parents) if q.exists()), Path("/"))
    try:
        if os.statvfs(near).f_flag & os.ST_RDONLY:
            return f"{near} is on a read-only file system"
    except OSError:
        pass
    if not os.access(near, os.W_OK | os.X_OK):
        return f"this user may not write in {near}"
    return None


# what atomic_write's temporary name adds to the target's: a dot before, a dot and mkstemp's 8 after
ATOMIC_EXTRA = 10


def name_too_long(path: str | Path, extra: int) -> str | None:
    """Why ``path``'s name cannot be written through a temporary name ``extra`` bytes longer beside it, in
    words, or None. A name of 250 bytes is legal, its temporary one is not: the write failed after the
    work, naming a hidden file the user never chose."""
    p = Path(path)
    near = next((q for q in p.parents if q.exists()), Path("/"))
    try:
        most = os.pathconf(near, "PC_NAME_MAX")
    except (OSError, ValueError):
        most = 255
    n = len(os.fsencode(p.name))
    if n + extra <= most:
        return None
    return (
        f"its name is {n} bytes, and at most {most - extra} fit here (it is written under a temporary "
        f"name {extra} bytes longer, then renamed; {near} takes names of {most} bytes)"
    )


def read_at_most(path: str | Path, limit: int) -> tuple[bytes, int]:
    """A file's bytes and its size, or no bytes where it is past ``limit``: a caller refuses such a file
    without holding it (a 3 GiB plan.json was read whole, to 3.2 GB of memory on an edge device, before its
    16 MiB limit was checked)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            return b"", size
        data = f.read(limit + 1)  # a file that grew meanwhile, or one whose size the system does not say
    return data, max(size, len(data))


# what fsync(2) answers on a file system that keeps nothing to sync or cannot (a pipe, some FUSE and
# network mounts): the write stands as made. Any other error (EIO, ENOSPC from delayed allocation) is the
# write's failure, reported as such.
_CANNOT_SYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EROFS, errno.EBADF}


def _fsync(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _CANNOT_SYNC:
            raise


def sync_dir(path: str | Path) -> None:
    """A directory's entries to disk: a rename is durable only once its directory is. Until then it lives
    in the page cache, and an edge device that loses power (a Raspberry Pi unplugged) can come back with
    the old name, the new one, or (for files whose data never reached the disk) an empty file."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # a directory that cannot be opened for reading: nothing to sync from here
    try:
        _fsync(fd)
    finally:
        os.close(fd)


def sync_tree(root: str | Path) -> None:
    """Every file under ``root``, and every directory's entries, to disk: what a plan written into a
    temporary directory needs before the rename that publishes it."""
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                _fsync(fd)
            finally:
                os.close(fd)
        sync_dir(folder)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object], durable: bool = True) -> None:
    """Write beside the target (``write`` fills the file) and rename over it: a reader sees the old file
    or the new, never a part, and an interrupted write leaves nothing behind. ``durable``: the data and
    the rename are synced to disk before returning, so a power cut just after leaves the old file or the
    new, not an empty one (off for outputs written at a request's rate, where a sync each would set it)."""
    p = Path(path)
    if not p.name or p.is_dir():
        raise OutputExistsError(f"output {str(p) or '(empty)'!r} is a directory: give a file name")
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    except OSError as exc:
        raise naming(exc, p, p.parent / f".{p.name}.") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if durable:
                f.flush()
                _fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's 0600 would keep it from all but its writer
        os.replace(tmp, p)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise naming(exc, p, tmp) from exc
        raise
    if durable:
        sync_dir(p.parent)


def naming(exc: OSError, target: str | Path, tmp: str | Path) -> OSError:
    """A write's failure as the user's path's: a full disk's error names no file (write(2) has none), and
    a read-only one names the temporary file or folder the write went to, which the user never chose."""
    if exc.filename is not None and not str(exc.filename).startswith(str(tmp)):
        return exc
    return OSError(exc.errno, exc.strerror or str(exc), str(target))  # the errno's own subclass


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


@contextlib.contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock for a read-change-write of ``path``, a file several processes share: each
    write is atomic, but without the lock the last of two writers erased the other's change (three
    profiles at once kept one codec-speed entry of three; two edge daemons on one plan directory lost each
    other's deploy records). The lock is the folder's own (``flock`` on it), so no lock file is left
    there; it holds among the processes of one host (on NFS too). Where the folder cannot be opened or
    locked the caller goes on unlocked, and its write says what is wrong."""
    try:
        fd = os.open(Path(path).parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):  # a file system without locks (ENOLCK): unlocked, as before
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # and the lock with it


def writer_tag() -> str:
    """Who writes a temporary file or directory: this process on this host (``1234@pi4``), in its name, so
    that a sweep on the same host can tell a dead writer's from a live one's whatever their age."""
    host = "".join(c for c in socket.gethostname() if c.isalnum())[:32] or "host"
    return f"{os.getpid()}@{host}"


def writer_gone(name: str) -> bool | None:
    """Whether the temporary file or directory ``name`` (``.….tmp-PID@HOST-…``, ``.….old-PID@HOST-…``) was
    left by a process of this host that is no more; None where its name does not say (another host's, on
    a shared file system, or an older name)."""
    m = re.search(r"\.(?:tmp|old)-(\d+)@([A-Za-z0-9]+)-", name)
    if m is None or m[2] != writer_tag().split("@", 1)[1]:
        return None
    try:
        os.kill(int(m[1]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):  # alive under another user; or no pid at all
        return False
    return False
