"""What this process may run on: read where a count of cores decides a default or a share."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The cores this process may run on (its affinity), else the machine's: a container or a pinned
    service gets fewer than ``os.cpu_count()`` says."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1
