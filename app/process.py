"""Child processes (servers, link proxies) started and stopped the same way everywhere."""

from __future__ import annotations

import atexit
import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM (a server drains and says goodbye), then SIGKILL if it has not exited in
    ``timeout``: a child never outlives its parent's clean-up."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    log = _logs.pop(proc.pid, None)
    if log is not None:
        log.unlink(missing_ok=True)


def run_child(cmd: Sequence[str]) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd)``, its output captured as text, except that an interruption of this process
    (Ctrl-C, SIGTERM to it alone) stops the child with ``stop``: ``subprocess.run`` SIGKILLs it, and a
    profile under a CPU limit then left its cgroup behind."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, errs = proc.communicate()
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):  # a terminal's Ctrl-C reached the child too: let it undo
            with contextlib.suppress(subprocess.TimeoutExpired):  # its CPU limit before it is told again
                proc.communicate(timeout=3.0)
        stop(proc, timeout=5.0)
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, errs)


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
    insecure: bool = False,
) -> subprocess.Popen:
    """A ``splitpoint serve`` process, quiet, unbuffered. Its output goes to a log file (``output(proc)``
    reads it) unless ``capture`` is off: a pipe that nobody reads would fill up and stop the server at
    its next log line. ``insecure``: a bind beyond loopback without keys, for servers inside this
    machine's own network namespaces (the bench), which nothing outside can reach."""
    if insecure:
        extra = ("--insecure", *extra)
    cmd = splitpoint_command(
        "serve",
        "--bind",
        bind,
        "--plans",
        str(plans),
        "--workers",
        str(workers),
        "--threads",
        str(threads),
        "--quiet",
        *extra,
        prefix=prefix,
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not capture:
        return subprocess.Popen(cmd, env=env)
    with tempfile.NamedTemporaryFile("w", prefix="splitpoint-serve-", suffix=".log", delete=False) as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    _logs[proc.pid] = Path(log.name)
    return proc


_logs: dict[int, Path] = {}


@atexit.register
def _remove_logs() -> None:
    """The logs of servers this process started and never stopped (one that exited at start, a caller that
    waited on it itself): none is left in the temp dir."""
    for log in _logs.values():
        log.unlink(missing_ok=True)
    _logs.clear()


def check_started(procs: Sequence[subprocess.Popen], within_s: float = 1.5) -> None:
    """Raise, with its own words, if a server exits in its first moments (a busy port, a bad option),
    rather than let the clients time out against nothing."""
    import time

    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        check_running(procs, "at start")
        time.sleep(0.05)


def check_running(procs: Sequence[subprocess.Popen], when: str = "") -> None:
    """Raise, with its own words, if a server has exited. Asked once a run is over (and when it fails),
    instead of ``check_started``'s wait before it: the bench paid that 1.5 s on every network of every
    model, and a server that dies at start fails the run it was started for all the same."""
    from splitpoint.core.errors import SplitPointError

    for proc in procs:
        if proc.poll() is not None:
            said = output(proc).strip() or "(nothing)"
            where = f" {when}" if when else ""
            raise SplitPointError(f"server exited with status {proc.returncode}{where}: {said[-600:]}")


def output(proc: subprocess.Popen, tail: int = 4000) -> str:
    """The end of what a process from ``start_server`` wrote."""
    path = _logs.get(proc.pid)
    if path is None or not path.exists():
        return ""
    return path.read_text(errors="replace")[-tail:]
