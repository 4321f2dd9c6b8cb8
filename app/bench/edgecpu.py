"""Calibrating the emulated edge CPU: the CPU share at which a reference model's measured
latency here matches the device profile's published figure (e.g. MobileNetV2 at ~33 ms on a
Raspberry Pi 4). One calibration then stands in for that device class for every model; how
well it transfers to other models is what the device's other figures, where given, check.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from splitpoint.app.process import run_child
from splitpoint.core.errors import SplitPointError
from splitpoint.profiles.cpulimit import MIN_CPUS, cpu_limit
from splitpoint.profiles.profiler import time_runs
from splitpoint.profiles.schema import DeviceSpec


@dataclass
class Calibration:
    device: str
    reference_model: str
    target_ms: float  # the device profile's figure (published, with its source in the YAML)
    full_speed_ms: float  # measured here, 1 thread, no limit
    cpus: float  # the limit that was settled on
    measured_ms: float  # measured here under that limit
    mechanism: str
    note: str = ""
    # the most CPU (ms) one run that starts after idle time gets at this machine's full speed under the
    # limit (measured: a CFS quota lets a short run through whole, more than one period's quota on some
    # kernels); None where there is no quota, or for results from before it was measured
    burst_ms: float | None = None
    # the quota and its period (µs) the limit ran with; None for results from before they were recorded
    quota_us: int | None = None
    period_us: int | None = None

    @property
    def limit(self) -> float | None:
        """The CPU share to apply, or None where the edge runs unlimited."""
        return self.cpus if self.cpus < 1 else None

    def to_dict(self) -> dict:
        return asdict(self)


CALIBRATION_AIM = (
    0.05  # the share is settled when the reference model runs within this of the device's figure
)


def calibration_verdict(cal: dict) -> str:
    """How far the calibrated edge ran from the device's figure, judged against the aim: said in every
    report beside the figures (a run 21 % off read as calibrated)."""
    target, measured = cal.get("target_ms"), cal.get("measured_ms")
    if not target or measured is None or cal.get("mechanism") == "none":
        return ""
    off = abs(measured - target) / target
    verdict = "met" if off < CALIBRATION_AIM else "**MISSED**"
    return f" ({100 * off:.0f} % off; the calibration aims within {100 * CALIBRATION_AIM:.0f} %: {verdict})"


def _reference(name: str):
    """(zoo model, precision) for a device figure's key: ``mobilenetv2`` runs the float32 model,
    ``mobilenetv2-int8`` the same model with int8 weights and activations (onnxruntime's static QDQ), so
    that a published int8 figure is matched by an int8 run, not by a float32 one."""
    from splitpoint.core import zoo

    base, _, precision = name.partition("-int8")
    if name in zoo.ZOO:
        return name, "float32"
    if precision == "" and name.endswith("-int8") and base in zoo.ZOO:
        return base, "int8"
    return None


def calibrate(device: DeviceSpec, runs: int = 30, rounds: int = 5) -> Calibration:
    """The CPU share under which the device's reference model runs as long here as on the device.

    Under a quota the time of one run depends on where it falls in the quota's period (14-48 ms at one
    share here) and the machine's state drifts (a throttled process's pages are reclaimed as cold), so
    time is not a smooth function of the share: two measurements at 0.10 and 0.12 CPU read 70 and 57 ms,
    then 51 and 57. Stepping the share by the ratio of measured to wanted from the last point alone
    (three tries) went 0.11 -> 0.125 -> 0.18 and once ended 26 % fast. Each try is a median of ``runs``
    runs; the next share is interpolated between the closest tries either side of the target (log time
    against log share) once there are such, and the try nearest the target is the one returned, with its
    own measurement."""
    from splitpoint.core.graph import open_model
    from splitpoint.core.quantize import quantize_head
    from splitpoint.core.runner import make_session
    from splitpoint.core.samples import sample_feeds

    usable = [
        (k, v, ref) for k, v in device.reference_latency_ms.items() if (ref := _reference(k)) is not None
    ]
    if not usable:
        raise SplitPointError(
            f"device profile {device.name!r} has no reference latency for a zoo model, float32 or -int8 "
            f"(has: {', '.join(device.reference_latency_ms) or 'none'}); cannot calibrate"
        )
    name, target, (model, precision) = usable[0]
    h = open_model(model)
    feeds = sample_feeds(h.model)
    if precision == "int8":
        calib = [sample_feeds(h.model, 1, 100 + k) for k in range(8)]
        sess = make_session(quantize_head(h.model, calib, "static", timing=True), 1)
    else:
        sess = h.whole_session(1)

    def run() -> None:
        sess.run(None, feeds)

    full = statistics.median(time_runs(run, 3, runs))
    if full >= target:
        return Calibration(
            device.name,
            name,
            target,
            full,
            1.0,
            full,
            "none",
            "this machine is not faster than the device on one core: edge runs unlimited at 1 thread",
        )
    cpus = max(MIN_CPUS, full / target)
    tries: list[tuple[float, float, str, tuple[int | None, int | None]]] = []
    for _ in range(rounds + 1):
        with cpu_limit(cpus) as em:
            tries.append(
                (cpus, statistics.median(time_runs(run, 2, runs)), em.mechanism, (em.quota_us, em.period_us))
            )
        if abs(tries[-1][1] - target) / target < CALIBRATION_AIM:
            break
        nxt = next_share(target, [(c, m) for c, m, *_ in tries])
        if nxt == cpus:
            break  # clamped: nothing else to try
        cpus = nxt
    cpus, measured, mech, quota = min(tries, key=lambda t: abs(t[1] - target))
    note = "" if cpus > MIN_CPUS else f"clamped at the smallest usable share ({MIN_CPUS} CPU)"
    burst = measure_burst(cpus) if mech.startswith("cgroup") else None
    return Calibration(device.name, name, target, full, round(cpus, 4), measured, mech, note, burst, *quota)


def next_share(target: float, tries: list[tuple[float, float]]) -> float:
    """The share to try after ``tries`` ((share, ms), the last one latest): between the closest tries
    either side of ``target`` where there are such (run time taken as a power of the share between
    them), else the last share scaled by how far its time was off; within the shares a limit can set."""
    slow = [t for t in tries if t[1] > target]  # too little CPU
    fast = [t for t in tries if t[1] < target]
    if slow and fast:
        (c0, m0), (c1, m1) = max(slow), min(fast)
        if c0 < c1 and m0 > m1:
            f = math.log(m0 / target) / math.log(m0 / m1)
            return round(math.exp(math.log(c0) + f * math.log(c1 / c0)), 4)
        return round((c0 + c1) / 2, 4)  # the times cross over (noise): halve the gap
    cpus, measured = tries[-1]
    return round(min(1.0, max(MIN_CPUS, cpus * measured / target)), 4)


BURST_SIZES_MS = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)


def measure_burst(cpus: float, idle_s: float = 0.06, repeats: int = 5) -> float:
    """The most CPU (ms) a run after ``idle_s`` of idle time may get at full speed under the limit: one
    run of that size in ``repeats`` takes no more than 1.5x its CPU time in wall time (whether it does
    varies from run to run, and a median over such runs mixes two speeds). A request whose edge work is
    below it is measured at this machine's speed, not the device's, and the bench does not judge it (it
    judged everything above one period's quota, 1 ms, and a 2.75 ms edge run measured 2.6 ms against
    24 ms predicted on a kernel that let 3 ms through)."""
    import time

    def spin(ms: float) -> float:
        t0, c0 = time.perf_counter(), time.process_time()
        while (time.process_time() - c0) * 1e3 < ms:
            pass
        return (time.perf_counter() - t0) * 1e3

    burst = 0.0
    with cpu_limit(cpus):
        for ms in BURST_SIZES_MS:
            walls = []
            for _ in range(repeats):
                time.sleep(idle_s)
                walls.append(spin(ms))
            if min(walls) > 1.5 * ms:
                break
            burst = ms
    return burst


def calibrate_apart(device: DeviceSpec) -> Calibration:
    """``calibrate`` in a process of its own. A CPU limit covers every thread of the process it is
    applied to: in the bench's process the progress display and other threads would spend the same
    quota, the reference model would run slower than it does alone, and the share settled on would be
    too large (as it made profiles 5-17 % slow, see ``run.profile_apart``)."""
    with tempfile.TemporaryDirectory(prefix="splitpoint-calibrate-") as tmp:
        spec, out = Path(tmp) / "device.yaml", Path(tmp) / "calibration.json"
        spec.write_text(json.dumps(device.model_dump(mode="json")), encoding="utf-8")
        cmd = [sys.executable, "-m", "splitpoint.app.bench.edgecpu", str(spec), str(out)]
        r = run_child(cmd)
        if r.returncode:
            lines = r.stderr.strip().splitlines() or ["(no output)"]  # a traceback's last line says why
            raise SplitPointError(f"calibrating {device.name} failed: {lines[-1][-400:]}")
        return Calibration(**json.loads(out.read_text(encoding="utf-8")))


def main(argv: list[str] | None = None) -> None:
    """``python -m splitpoint.app.bench.edgecpu DEVICE.yaml OUT.json``: one calibration, as JSON."""
    from splitpoint.profiles.schema import load_device

    spec, out = argv if argv is not None else sys.argv[1:]
    Path(out).write_text(json.dumps(calibrate(load_device(spec)).to_dict()), encoding="utf-8")


if __name__ == "__main__":
    main()
