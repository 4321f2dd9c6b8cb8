"""Where SplitPoint keeps files between runs, and writing them so that none is ever half-written."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def cache_root() -> Path:
    """``$SPLITPOINT_CACHE``, else ``~/.cache/splitpoint``: built zoo models, codec speeds."""
    return Path(os.environ.get("SPLITPOINT_CACHE", Path.home() / ".cache" / "splitpoint"))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write beside the target and rename over it: a reader sees the old file or the new, never a part."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
