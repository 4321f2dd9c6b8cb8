"""When a benchmark ran and on which code: results without them cannot be matched to a fix."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path


def provenance() -> dict:
    """The run's UTC start and the source's git commit (``+dirty`` with uncommitted changes), or the
    installed version where the package is not a git checkout."""
    src = Path(__file__).resolve().parents[2]
    commit = None
    try:
        head = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "--show-toplevel", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        top, _, short = head.stdout.strip().partition("\n")
        # installed (site-packages/splitpoint), git finds whatever repository holds the environment: a
        # user's own project, whose commit a report then gave as SplitPoint's
        if head.returncode == 0 and Path(top).resolve() == src:
            dirty = subprocess.run(
                ["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=5,
            )
            commit = short + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    if commit is None:
        try:
            commit = f"splitpoint {metadata.version('splitpoint')}"
        except metadata.PackageNotFoundError:
            commit = "unknown"
    return {"when": datetime.now(UTC).isoformat(timespec="seconds"), "commit": commit}


def line(machine: dict) -> str:
    """'2026-12-05T02:00:00+00:00, commit abc123': what a report says of its run (older results: '')."""
    parts = [p for p in (machine.get("when"), machine.get("commit") and f"commit {machine['commit']}") if p]
    return ", ".join(parts)


def sentence_end(machine: dict) -> str:
    """'; <line>.' closing a report's sentence about its run, or '.' for results that predate it."""
    said = line(machine)
    return f"; {said}." if said else "."
