"""Codec throughput is a fact of the device, not of the model: measured once, reused by later profiles.

Measuring all codecs takes about 0.15 s here, which is 20 inferences of a MobileNetV2 and so most of a
small model's profiling budget. As TensorRT keeps a timing cache, a profile reuses the speeds measured
on the same machine, under the same CPU limit and with the same codec libraries, for a day; the profile
says when they were measured. ``splitpoint profile --fresh-codecs`` measures them again. A missing,
unreadable or foreign cache file is measured over, never an error: the cache only saves time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from splitpoint.core.files import atomic_write_text, cache_root, locked
from splitpoint.core.textfiles import load_json

from .facts import cpu_model
from .schema import CodecSpeed, Emulation

MAX_AGE_S = 24 * 3600
_LIBRARIES = ("splitpoint", "numpy", "zstandard", "lz4", "onnxruntime")


def cache_path() -> Path:
    return cache_root() / "codec-speeds.json"


def cache_key(emulation: Emulation | None, min_total_ms: float) -> str:
    """What the speeds depend on: the CPU and how much of it the process may use, and the code."""
    versions = []
    for lib in _LIBRARIES:
        try:
            versions.append(f"{lib}={metadata.version(lib)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{lib}=-")
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    facts = {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "affinity": affinity,
        "emulation": emulation.model_dump(exclude={"detail"}) if emulation else None,
        "min_total_ms": round(min_total_ms, 3),
        "libraries": versions,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:32]


def _read(path: Path) -> dict:
    try:
        data = load_json(path.read_text(encoding="utf-8"))  # nested past the recursion limit: ValueError
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def cached_codec_speeds(
    measure: Callable[[], dict[str, CodecSpeed]],
    emulation: Emulation | None,
    min_total_ms: float,
    fresh: bool = False,
    now: float | None = None,
) -> tuple[dict[str, CodecSpeed], str]:
    """The codec speeds and where they come from: measured now, or when the cache entry was."""
    now = time.time() if now is None else now
    path, key = cache_path(), cache_key(emulation, min_total_ms)
    # locked from the read to the write: a profile started beside another waits for its measurement and
    # reuses it, instead of measuring while that one does and writing over its entry
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path):
        return _cached(path, key, measure, fresh, now)


def _cached(
    path: Path, key: str, measure: Callable[[], dict[str, CodecSpeed]], fresh: bool, now: float
) -> tuple[dict[str, CodecSpeed], str]:
    entries = _read(path)
    entry = entries.get(key)
    if not fresh and isinstance(entry, dict):
        try:
            age = now - float(entry["measured_at"])
            speeds = {k: CodecSpeed.model_validate(v) for k, v in entry["codecs"].items()}
        except (KeyError, TypeError, ValueError):
            speeds, age = {}, MAX_AGE_S + 1
        if speeds and 0 <= age <= MAX_AGE_S:
            when = datetime.fromtimestamp(float(entry["measured_at"]), UTC)
            return speeds, f"measured on this device at {when.isoformat(timespec='seconds')} ({path})"
    speeds = measure()
    fresh_entries = {  # expired entries go; the others (other CPU limits) stay
        k: v
        for k, v in entries.items()
        if isinstance(v, dict)
        and isinstance(v.get("measured_at"), int | float)
        and now - v["measured_at"] <= MAX_AGE_S
    }
    fresh_entries[key] = {"measured_at": now, "codecs": {k: v.model_dump() for k, v in speeds.items()}}
    with contextlib.suppress(OSError):  # a read-only home: the speeds are measured, only not kept
        atomic_write_text(path, json.dumps(fresh_entries, indent=1))
    return speeds, "measured now"
