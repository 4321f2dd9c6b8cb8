"""Where SplitPoint keeps files between runs, and writing them so that none is ever half-written."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import OutputExistsError


def cache_root() -> Path:
    """``$SPLITPOINT_CACHE``, else ``~/.cache/splitpoint``: built zoo models, codec speeds."""
    return Path(os.environ.get("SPLITPOINT_CACHE", Path.home() / ".cache" / "splitpoint"))


def current_umask() -> int:
    """The process's umask (read by setting it and back: there is no getter)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write beside the target and rename over it: a reader sees the old file or the new, never a part."""
    p = Path(path)
    if not p.name or p.is_dir():
        raise OutputExistsError(f"output {str(p) or '(empty)'!r} is a directory: give a file name")
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's 0600 would keep it from all but its writer
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
