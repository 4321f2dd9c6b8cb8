"""Child processes (servers, link proxies) started and stopped the same way everywhere."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM (a server drains and says goodbye), then SIGKILL if it has not exited in
    ``timeout``: a child never outlives its parent's clean-up."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def splitpoint_command(*args: str, prefix: Sequence[str] = ()) -> list[str]:
    """``splitpoint ARGS`` as a child process of this interpreter (``prefix``: e.g. ``ip netns exec NS``)."""
    return [*prefix, sys.executable, "-m", "splitpoint.app", *args]


def start_server(
    bind: str,
    plans: Path,
    *extra: str,
    prefix: Sequence[str] = (),
    workers: int = 1,
    threads: int = 1,
    capture: bool = True,
) -> subprocess.Popen:
    """A ``splitpoint serve`` process, quiet, unbuffered, its output captured unless ``capture`` is off."""
    cmd = splitpoint_command(
        "serve", "--bind", bind, "--plans", str(plans), "--workers", str(workers), "--threads", str(threads),
        "--quiet", *extra, prefix=prefix,
    )  # fmt: skip
    out = subprocess.PIPE if capture else None
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        cmd, stdout=out, stderr=subprocess.STDOUT if capture else None, text=True, env=env
    )
