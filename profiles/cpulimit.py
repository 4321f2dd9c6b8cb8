"""Real CPU limits that stand in for a slower edge device.

A CFS quota with a short period (10 ms) gives a smooth slowdown; the default 100 ms period
makes latency bimodal (a run either fits in the quota or waits for the next period).
cgroup v1 is tried first because it works on these machines, then cgroup v2 ``cpu.max``,
then plain CPU affinity (whole cores only). The result says which one took effect.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager, suppress
from pathlib import Path

from splitpoint.core.errors import SplitPointError

from .schema import Emulation

PERIOD_US = 10_000
MIN_QUOTA_US = 1_000  # below 1 ms per period the quota's granularity dominates
MIN_CPUS = MIN_QUOTA_US / PERIOD_US
V1_ROOT = Path("/sys/fs/cgroup/cpu")
V2_ROOT = Path("/sys/fs/cgroup")


class CpuLimitError(SplitPointError):
    pass


def _write(path: Path, value: str) -> None:
    path.write_text(value)


def _quota_us(cpus: float) -> int:
    return max(MIN_QUOTA_US, int(round(cpus * PERIOD_US)))


def _quota_emulation(mechanism: str, quota: int, group: Path) -> Emulation:
    return Emulation(
        mechanism=mechanism, cpus=quota / PERIOD_US, period_us=PERIOD_US, quota_us=quota, detail=str(group)
    )


def _v1(cpus: float, pid: int) -> tuple[Emulation, Callable[[], None]]:
    if not (V1_ROOT / "cpu.cfs_quota_us").exists():
        raise OSError("no cgroup v1 cpu controller")
    group = V1_ROOT / f"splitpoint-{pid}"
    group.mkdir(exist_ok=True)
    quota = _quota_us(cpus)
    _write(group / "cpu.cfs_period_us", str(PERIOD_US))
    _write(group / "cpu.cfs_quota_us", str(quota))
    for tid in os.listdir(f"/proc/{pid}/task"):
        _write(group / "tasks", tid)

    def undo() -> None:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:  # the limited process has exited: nothing to move back
            tids = []
        for tid in tids:
            with suppress(OSError):
                _write(V1_ROOT / "tasks", tid)
        with suppress(OSError):
            group.rmdir()

    return _quota_emulation("cgroup-v1 cfs quota", quota, group), undo


def _v2(cpus: float, pid: int) -> tuple[Emulation, Callable[[], None]]:
    if (
        not (V2_ROOT / "cgroup.controllers").exists()
        or "cpu" not in (V2_ROOT / "cgroup.controllers").read_text()
    ):
        raise OSError("no cgroup v2 cpu controller")
    group = V2_ROOT / f"splitpoint-{pid}"
    group.mkdir(exist_ok=True)
    quota = _quota_us(cpus)
    _write(group / "cpu.max", f"{quota} {PERIOD_US}")
    _write(group / "cgroup.procs", str(pid))

    def undo() -> None:
        try:
            _write(V2_ROOT / "cgroup.procs", str(pid))
            group.rmdir()
        except OSError:
            pass

    return _quota_emulation("cgroup-v2 cpu.max", quota, group), undo


def _affinity(cpus: float, pid: int) -> tuple[Emulation, Callable[[], None]]:
    if not hasattr(os, "sched_setaffinity"):
        raise OSError("no sched_setaffinity")
    before = sorted(os.sched_getaffinity(pid))
    n = max(1, int(cpus))
    if n >= len(before):
        raise OSError("affinity cannot limit below one whole core")
    cores = before[:n]
    os.sched_setaffinity(pid, cores)
    return Emulation(
        mechanism="cpu affinity",
        cpus=float(n),
        cores=cores,
        detail="fractional CPU shares need a cgroup; rounded to whole cores",
    ), (lambda: os.sched_setaffinity(pid, before))


@contextmanager
def cpu_limit(cpus: float | None, pid: int | None = None):
    """Limit this process (all its threads, present and future) to ``cpus`` CPUs.

    Yields the Emulation record, or None when no limit was asked for. Undone on exit,
    exceptions and Ctrl-C included.
    """
    if cpus is None:
        yield None
        return
    if cpus <= 0:
        raise CpuLimitError(f"--cpus must be positive, got {cpus}")
    pid = pid or os.getpid()
    errors = []
    for mech in (_v1, _v2, _affinity):
        try:
            emulation, undo = mech(cpus, pid)
            break
        except OSError as exc:
            errors.append(f"{mech.__name__.strip('_')}: {exc}")
    else:
        raise CpuLimitError(
            "no CPU-limit mechanism works here (" + "; ".join(errors) + "); run as root on Linux"
        )
    try:
        yield emulation
    finally:
        undo()
