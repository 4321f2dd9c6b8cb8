"""What else the host ran while a benchmark ran: its figures are this machine's with that load on it, and
a reader comparing two runs needs to know whether one of them shared the cores.

Measured from the kernel's counters: the whole host's busy CPU time less the benchmark's own (its
process, the children it waited for, the children still running), and the time the hypervisor took
(steal), each as a share of every core's time over the run.
"""

from __future__ import annotations

import os
import time

import psutil

BUSY_SHARE = 0.10  # other processes' share of the cores above which a report calls the host busy


def _own_cpu_s() -> float:
    me = psutil.Process()
    t = me.cpu_times()
    own = t.user + t.system + t.children_user + t.children_system
    for child in me.children(recursive=True):
        try:
            c = child.cpu_times()
        except psutil.Error:  # ended between the listing and the reading
            continue
        own += c.user + c.system + c.children_user + c.children_system
    return own


def _busy_s(t) -> tuple[float, float]:  # noqa: ANN001 (psutil's scputimes differs per platform)
    busy = sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq"))
    return busy, getattr(t, "steal", 0.0)


class HostLoad:
    """Started when the benchmark starts; ``measured()`` at its end."""

    def __init__(self) -> None:
        self._t0 = time.monotonic()
        self._busy0, self._steal0 = _busy_s(psutil.cpu_times())
        self._own0 = _own_cpu_s()

    def measured(self) -> dict:
        wall = max(time.monotonic() - self._t0, 1e-9)
        cores = psutil.cpu_count() or 1
        busy, steal = _busy_s(psutil.cpu_times())
        own = _own_cpu_s() - self._own0
        other = max(0.0, (busy - self._busy0) - own)
        return {
            "source": "measured: the host's busy CPU time less the benchmark's own processes'",
            "cores": cores,
            "seconds": wall,
            "own_cpu_share": own / (wall * cores),
            "other_cpu_share": other / (wall * cores),
            "steal_share": max(0.0, steal - self._steal0) / (wall * cores),
            "loadavg_1m_end": os.getloadavg()[0],
        }


def sentence(load: dict | None) -> str:
    """The report's sentence on the host's load, after the one on its run ('' for results from before it
    was measured)."""
    if not load:
        return ""
    said = (
        f" Host load (measured over the run): other processes used {100 * load['other_cpu_share']:.0f} % of "
        f"the {load['cores']} cores' time, the hypervisor {100 * load['steal_share']:.0f} % (steal); the "
        f"benchmark itself {100 * load['own_cpu_share']:.0f} %."
    )
    if load["other_cpu_share"] + load["steal_share"] > BUSY_SHARE:
        said += " **A busy host:** its times carry that load."
    return said
