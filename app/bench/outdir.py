"""A bench's output directory, claimed before the minutes of measuring, not found wanting after them.

A bench writes its report at the end. Named as a file, under a file, or somewhere this user may not
write, the whole run was measured and then lost to one errno line; two benches given one directory
both reported success while the second's results replaced the first's. The directory is checked and
locked (an advisory lock on a file inside it, released by the kernel if the process dies) for the
run, and removed again if the run made it and left nothing in it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from splitpoint.core.errors import OutputExistsError, SplitPointError
from splitpoint.core.files import file_in_the_way, naming

LOCK = ".splitpoint-bench.lock"


@contextlib.contextmanager
def claimed_output(out: Path) -> Iterator[Path]:
    if (blocked := file_in_the_way(out)) is not None:
        where = "" if blocked == out else f": {blocked} is a file"
        raise OutputExistsError(f"-o {out}: not a directory{where}; give a directory for the results")
    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SplitPointError(f"-o {out}: cannot create it ({exc.strerror})") from exc
    if not os.access(out, os.W_OK | os.X_OK):
        raise SplitPointError(f"-o {out}: this user may not write there")
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 32).decode(errors="replace").strip() or "?"
            raise OutputExistsError(
                f"-o {out}: another bench (pid {other}) is writing its results there; give another "
                "directory, or wait for it"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        try:
            yield out
        finally:
            with contextlib.suppress(OSError):
                (out / LOCK).unlink()
            if made:
                with contextlib.suppress(OSError):
                    out.rmdir()  # only if empty: a run that failed before writing anything
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A hidden folder in ``out`` that a report's files are written to; once all are, each moves into
    ``out`` by a rename, which needs no space. A failure moves none and removes the folder: a full disk
    left a run's new plots beside the last run's results and report, and a truncated results.json.tmp."""
    out.mkdir(parents=True, exist_ok=True)
    for left in out.glob(".report-*"):  # a killed run's (the bench holds ``out``: no other is writing)
        shutil.rmtree(left, ignore_errors=True)
    stage = Path(tempfile.mkdtemp(prefix=".report-", dir=out))
    try:
        yield stage
        for f in sorted(stage.iterdir()):
            os.replace(f, out / f.name)
    except OSError as exc:
        raise naming(exc, out, stage) from exc
    finally:
        shutil.rmtree(stage, ignore_errors=True)
