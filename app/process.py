"""Child processes (servers, link proxies) stopped the same way everywhere."""

from __future__ import annotations

import subprocess


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
