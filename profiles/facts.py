"""Facts about the machine a profile is measured on, so a profile says where it came from."""

from __future__ import annotations

import os
import platform
import socket
from pathlib import Path

import psutil


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def board_model() -> str | None:
    """Raspberry Pi / Jetson boards name themselves in the device tree."""
    for p in ("/proc/device-tree/model", "/sys/firmware/devicetree/base/model"):
        try:
            return Path(p).read_bytes().rstrip(b"\0").decode(errors="replace")
        except OSError:
            continue
    return None


def temperature_c() -> float | None:
    """Highest readable CPU/SoC temperature, or None where the machine exposes none."""
    temps: list[float] = []
    try:
        for entries in (psutil.sensors_temperatures() or {}).values():
            temps.extend(e.current for e in entries if e.current is not None)
    except (AttributeError, OSError):
        pass
    if not temps:
        for zone in Path("/sys/class/thermal").glob("thermal_zone*/temp"):
            try:
                temps.append(int(zone.read_text().strip()) / 1000)
            except (OSError, ValueError):
                continue
    return max(temps) if temps else None


def throttled() -> str | None:
    """Raspberry Pi firmware throttle flags, where vcgencmd exists."""
    import shutil
    import subprocess

    if not shutil.which("vcgencmd"):
        return None
    try:
        return subprocess.run(
            ["vcgencmd", "get_throttled"], capture_output=True, text=True, timeout=2
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def device_facts() -> dict:
    import onnxruntime

    freq = psutil.cpu_freq()
    return {
        "hostname": socket.gethostname(),
        "architecture": platform.machine(),
        "cpu_model": cpu_model(),
        "cores_logical": psutil.cpu_count(logical=True),
        "cores_physical": psutil.cpu_count(logical=False),
        "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_freq_mhz": round(freq.current, 1) if freq else None,
        "cpu_freq_max_mhz": round(freq.max, 1) if freq and freq.max else None,
        "memory_total_bytes": psutil.virtual_memory().total,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "board": board_model(),
        "onnxruntime": onnxruntime.__version__,
        "providers_available": onnxruntime.get_available_providers(),
    }
