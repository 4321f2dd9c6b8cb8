"""The server's plans: loaded from a directory or pushed by the orchestrator, keyed by plan id.

A pushed plan is checked against its own checksums before anything is written, then written
atomically, so a bad push never replaces or half-writes a plan.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from splitpoint.core.errors import PlanError, SplitPointError
from splitpoint.core.plan import PLAN_FILE, TAIL_FILE, Plan, verify_pushed, write_files_atomically
from splitpoint.core.runner import TailRunner, make_session

log = logging.getLogger("splitpoint.server")


@dataclass
class Entry:
    plan: Plan
    path: Path
    tail: TailRunner | None  # None for an edge-only plan: nothing runs here


class PlanRegistry:
    def __init__(
        self, plans_dir: str | Path | None = None, threads: int = 0, provider: str = "CPUExecutionProvider"
    ):
        self.plans_dir = Path(plans_dir) if plans_dir else None
        self.threads, self.provider = threads, provider
        self._entries: dict[str, Entry] = {}
        self._lock = threading.Lock()
        if self.plans_dir and self.plans_dir.is_dir():
            for d in sorted(p for p in self.plans_dir.iterdir() if (p / PLAN_FILE).is_file()):
                try:
                    self.add_dir(d)
                except SplitPointError as exc:  # one bad plan directory must not keep the others from serving
                    log.error("skipping plan in %s: %s", d, exc)

    def add_dir(self, path: str | Path) -> Plan:
        path = Path(path)
        plan = Plan.load(path)
        tail = None
        if TAIL_FILE in plan.files:
            tail = TailRunner(plan, make_session(path / TAIL_FILE, self.threads, self.provider))
        with self._lock:
            self._entries[plan.plan_id] = Entry(plan, path, tail)
        log.info("serving plan %s (%s, %s)", plan.plan_id[:12], plan.model_name, plan.kind)
        return plan

    def install(self, files: dict[str, bytes], force: bool = False) -> Plan:
        """Verify a pushed plan (plan.json plus the files it lists) and make it servable."""
        plan = verify_pushed(files)
        existing = self.get(plan.plan_id)
        if existing is not None:
            return existing.plan
        if self.plans_dir is None:
            raise PlanError("this server has no --plans directory to install pushed plans into")
        target = self.plans_dir / plan.plan_id[:16]
        write_files_atomically(target, files)
        return self.add_dir(target)

    def get(self, plan_id: str) -> Entry | None:
        with self._lock:
            return self._entries.get(plan_id)

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._entries)
