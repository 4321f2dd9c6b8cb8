"""Real CPU limits that stand in for a slower edge device.

A CFS quota with the shortest period the kernel allows for the share (its quota at least 1 ms:
2.7 ms for 0.37 CPU) gives one speed. With a longer period the emulated device has two: a run that
starts after idle time goes at the host's full speed until the period's quota is spent (MobileNetV2's
first 93 nodes: 16.5 ms after idle against 27.8 ms back to back with a 10 ms period; 26.6 against
29.2 ms with 2.7 ms), so a device that is kept busy (a pipeline) would be slower than one
measured between requests, which a real device is not: a chain bench run with 5 ms quotas measured
34 of 40 requests faster than their profiles predicted (median -9 %), against 18 of 40 (+1 %) with
1 ms. The default 100 ms period is worse still. Even the shortest period leaves a burst for runs of a
few ms after idle time (ResNet-18's head at cut 4 under 0.25 CPU: 3.8 ms after idle, 8.4 ms back to
back), which is why profiles time runs back to back over several periods (``sample_span_ms``).
The price of a short quota: below the kernel's CFS bandwidth slice (5 ms) the kernel over-enforces it,
and the device is slower than the share says (ResNet-18 at 0.5 CPU, 1 ms in 2 ms: 2.3-2.6x slower, where
5 ms in 10 ms gives 2.1x). A profile therefore records the slowdown it measured against this machine
(``Emulation.measured_slowdown``), and the bench calibrates its share against a device's published figure.
cgroup v1 is tried first because it works on these machines, then cgroup v2 ``cpu.max``,
then plain CPU affinity (whole cores only). The result says which one took effect.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from contextlib import contextmanager, suppress
from pathlib import Path

from splitpoint.core.errors import SplitPointError

from .schema import Emulation

MIN_PERIOD_US, MAX_PERIOD_US = 1_000, 100_000  # the kernel's bounds on cfs_period_us
MIN_QUOTA_US = 1_000  # the kernel's least cfs_quota_us
MIN_CPUS = MIN_QUOTA_US / MAX_PERIOD_US
V1_ROOT = Path("/sys/fs/cgroup/cpu")
V2_ROOT = Path("/sys/fs/cgroup")


class CpuLimitError(SplitPointError):
    pass


def _write(path: Path, value: str) -> None:
    path.write_text(value)


_ROUNDS = 50  # listings of a v1 group's threads before moving in or out gives up


def _tasks(group: Path) -> set[str]:
    return set((group / "tasks").read_text().split())


def _v1_remove(group: Path) -> None:
    """Move every thread of ``group`` back to the root and remove it. A thread started meanwhile inside
    the group, or one still exiting, keeps it busy: list again and retry (one rmdir, tried once, left
    the group behind now and then with a thread pool churning)."""
    for _ in range(_ROUNDS):
        try:
            tids = _tasks(group)
        except FileNotFoundError:
            return
        for tid in tids:  # each on its own: a thread that exits meanwhile stops no other
            with suppress(OSError):
                _write(V1_ROOT / "tasks", tid)
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:  # busy: a thread still in it
            time.sleep(0.001)


def _move(pid: int, group: Path, v1: bool) -> None:
    """Put ``pid`` (every thread of it) into a cgroup: a v1 group takes threads one by one."""
    if v1:
        # a thread started meanwhile by one not yet moved stays outside: list again until none is left
        for _ in range(_ROUNDS):
            outside = set(os.listdir(f"/proc/{pid}/task")) - _tasks(group)
            if not outside:
                return
            for tid in outside:
                # a thread that exits between the listing and its move needs none (a pool's worker ending
                # as the limit was set made the whole limit fall back to whole-core affinity, silently)
                with suppress(ProcessLookupError):
                    _write(group / "tasks", tid)
    else:
        _write(group / "cgroup.procs", str(pid))


def period_and_quota(cpus: float) -> tuple[int, int]:
    """The shortest period whose quota for ``cpus`` is at least the kernel's least quota (µs)."""
    period = min(MAX_PERIOD_US, max(MIN_PERIOD_US, math.ceil(MIN_QUOTA_US / cpus)))
    return period, max(MIN_QUOTA_US, int(round(cpus * period)))


def sample_span_ms(emulation: Emulation | None) -> float:
    """How long one timing sample must last under ``emulation``: three quota periods, so that a run
    shorter than one period's quota cannot go at the host's full speed (0: no quota, any length)."""
    if emulation is None or not (emulation.quota_us and emulation.period_us):
        return 0.0
    return 3 * emulation.period_us / 1e3


def _quota_emulation(mechanism: str, period: int, quota: int, group: Path) -> Emulation:
    return Emulation(
        mechanism=mechanism, cpus=quota / period, period_us=period, quota_us=quota, detail=str(group)
    )


def _sweep(root: Path) -> None:
    """Remove the groups of processes that are gone: one killed outright (SIGKILL, the OOM killer) left
    its group for good. A group still holding a thread is busy and stays."""
    for group in root.glob("splitpoint-*"):
        pid = group.name.removeprefix("splitpoint-")
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            with suppress(OSError):
                group.rmdir()


def _v1(cpus: float, pid: int) -> tuple[Emulation, Callable[[], None]]:
    if not (V1_ROOT / "cpu.cfs_quota_us").exists():
        raise OSError("no cgroup v1 cpu controller")
    _sweep(V1_ROOT)
    group = V1_ROOT / f"splitpoint-{pid}"
    group.mkdir(exist_ok=True)
    period, quota = period_and_quota(cpus)
    _write(group / "cpu.cfs_quota_us", "-1")  # a new period below the old quota is refused
    _write(group / "cpu.cfs_period_us", str(period))
    _write(group / "cpu.cfs_quota_us", str(quota))

    def undo() -> None:
        _v1_remove(group)

    try:
        _move(pid, group, v1=True)
    except OSError:
        undo()  # the next mechanism is tried: no thread left under this quota, no group left behind
        raise
    return _quota_emulation("cgroup-v1 cfs quota", period, quota, group), undo


def _v2(cpus: float, pid: int) -> tuple[Emulation, Callable[[], None]]:
    if (
        not (V2_ROOT / "cgroup.controllers").exists()
        or "cpu" not in (V2_ROOT / "cgroup.controllers").read_text()
    ):
        raise OSError("no cgroup v2 cpu controller")
    _sweep(V2_ROOT)
    group = V2_ROOT / f"splitpoint-{pid}"
    group.mkdir(exist_ok=True)
    period, quota = period_and_quota(cpus)
    _write(group / "cpu.max", f"{quota} {period}")

    def undo() -> None:
        try:
            _move(pid, V2_ROOT, v1=False)
            group.rmdir()
        except OSError:
            pass

    try:
        _move(pid, group, v1=False)
    except OSError:
        undo()
        raise
    return _quota_emulation("cgroup-v2 cpu.max", period, quota, group), undo


def _affinity(cpus: float, pid: int) -> tuple[Emulation, Callable[[], None]]:
    if not hasattr(os, "sched_setaffinity"):
        raise OSError("no sched_setaffinity")
    before = sorted(os.sched_getaffinity(pid))
    if abs(cpus - round(cpus)) > 0.02 * cpus:  # 0.25 CPU pinned to one core emulated nothing, silently
        raise OSError(f"affinity gives whole cores only, and {cpus:g} CPUs is not a whole number")
    n = max(1, round(cpus))
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
def lifted(emulation: Emulation | None, pid: int | None = None):
    """Run the block at the host's full speed, out of the quota ``emulation`` put this process under,
    and put it back after. For what is a proportion, not a time: a CFS quota lets work shorter than
    one period's quota (1 ms at least) run at full speed and stalls the rest at the period's end, so
    onnxruntime's per-node times under it are host times for most nodes and a whole period's stall for
    the few the quota ran out on (a 20x slower ViT's head looked as fast as the server's for 42 cuts,
    then 20 ms slower at once). A uniformly slower device spends its time in the host's proportions."""
    if emulation is None or not (emulation.quota_us and emulation.detail):
        yield
        return
    pid = pid or os.getpid()
    group = Path(emulation.detail)
    v1 = emulation.mechanism.startswith("cgroup-v1")
    try:
        _move(pid, V1_ROOT if v1 else V2_ROOT, v1)
    except OSError:  # the limit stays: the block runs under it, as before
        yield
        return
    try:
        yield
    finally:
        with suppress(OSError):
            _move(pid, group, v1)


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
