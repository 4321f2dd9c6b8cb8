"""The server's plans: loaded from a directory or pushed by the orchestrator, keyed by plan id.

A pushed plan is verified completely before it is served: checksums against its own plan.json, then
every model it carries loaded into a session, all in a temporary directory that is renamed into place
only when everything passed. A bad push never replaces, half-writes or leaves behind anything, and a
plan directory that no longer loads at start-up is skipped with a logged error instead of keeping the
other plans (or the server) down.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from splitpoint.core import wire
from splitpoint.core.errors import PlanError, describe
from splitpoint.core.kvcache import DecoderSegment
from splitpoint.core.plan import PLAN_FILE, Plan, install_pushed, sweep_leftovers, verify_pushed
from splitpoint.core.planset import PlanSet, is_plan_set
from splitpoint.core.runner import StageRunner, check_fits, check_models_load, check_stage_chain, make_session

log = logging.getLogger("splitpoint.server")
# the most plans one server holds: a pong lists every id (67 bytes each), and past about 970 of them its
# header outgrew the protocol's 64 KiB, so that no client could read a pong of it again
MAX_PLANS = 512


def described(plan: Plan) -> str:
    """A plan's shape in a log line: its kind, and over more than two devices the chain's length (a
    chain whose edge forwards its inputs is, by the plan format, server-only)."""
    n = len(plan.stages)
    return plan.kind if n <= 2 else f"a chain of {n} stages, {plan.kind}"


def shown(text: str) -> str:
    """A name from a plan (a pushed one is anyone's) as a log line may hold it: control and format
    characters (NUL, a right-to-left override) escaped, so the line reads as what was sent."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@dataclass
class Entry:
    plan: Plan
    path: Path
    runner: StageRunner | None  # the stage this server runs; None when it runs none (an edge-only plan)
    segment: DecoderSegment | None = None  # a decoder plan's layers here: the names a step feeds and reads


class PlanRegistry:
    def __init__(
        self,
        plans_dir: str | Path | None = None,
        threads: int = 0,
        provider: str = "CPUExecutionProvider",
        stage: int | None = None,
    ):
        """``stage``: the stage of each plan this server runs (a relay's); None: the last (a server's)."""
        self.plans_dir = Path(plans_dir) if plans_dir else None
        self.threads, self.provider, self.stage = threads, provider, stage
        self.role = "server" if stage is None else f"stage-{stage}"
        self._entries: dict[str, Entry] = {}
        self._lock = threading.Lock()
        self.skipped: dict[str, str] = {}  # plan directory -> why it is not served
        if self.plans_dir and is_plan_set(self.plans_dir):
            # a set is checked as deploy checks it (its members, their ids, one model) before any of it
            # is served: its directory scanned as any other served a member of another model, or one
            # under a name the set does not give, that deploy refused
            PlanSet.load(self.plans_dir, role=self.role)
        if self.plans_dir and not self.plans_dir.exists():
            log.warning("%s does not exist: no plan is served until a deploy creates it", self.plans_dir)
        if self.plans_dir and self.plans_dir.is_dir():
            sweep_leftovers(self.plans_dir)
            for d in sorted(p for p in self.plans_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
                if not (d / PLAN_FILE).is_file():
                    if is_plan_set(d):
                        # a plan set among the plans (plan --set -o plans/NAME, then serve --plans plans):
                        # its members, checked as a set first, were skipped as folders without a plan.json
                        self._add_set(d)
                        continue
                    self.skipped[str(d)] = f"no {PLAN_FILE} file in it"
                    log.warning("skipping %s: no %s file in it", d, PLAN_FILE)
                    continue
                try:
                    self.add_dir(d)
                except Exception as exc:  # one bad plan directory must not keep the others from serving
                    self.skipped[str(d)] = describe(exc)
                    log.error("skipping the plan in %s: %s", d, self.skipped[str(d)])

    def _add_set(self, d: Path) -> None:
        """Every member of the plan set in ``d``; none where the set does not check out."""
        try:
            members = [d / m.dir for m in PlanSet.load(d, role=self.role)[0].members]
        except Exception as exc:
            self.skipped[str(d)] = describe(exc)
            log.error("skipping the plan set in %s: %s", d, self.skipped[str(d)])
            return
        for m in members:
            try:
                self.add_dir(m)
            except Exception as exc:
                self.skipped[str(m)] = describe(exc)
                log.error("skipping the plan in %s: %s", m, self.skipped[str(m)])

    def _entry(self, path: Path, plan: Plan) -> Entry:
        i = plan.stage_of(self.role)
        if i is None or (i == 0 and self.stage is None):
            return Entry(plan, path, None)  # an edge-only plan: nothing runs here
        if self.stage is not None and i == len(plan.stages) - 1:
            # a chain that uses fewer devices than it has (the bench's two-device plans on three) ends
            # here: this device answers, and --next is not used for this plan
            log.warning(
                "plan %s: stage %d is its last: this device answers its requests instead of forwarding them",
                plan.plan_id[:12],
                i,
            )
        file = plan.stages[i].file
        # a decoder's caches are kept past the run: out of the arena, their memory can be given back
        session = (
            make_session(path / file, self.threads, self.provider, arena=plan.decoder is None)
            if file
            else None
        )
        check_stage_chain(plan)
        if session is not None and file:  # as a deploy checks it (check_models_load)
            check_fits(plan, file, session)
        segment = None
        if session is not None and plan.decoder is not None:
            segment = DecoderSegment(session)
            _warm_up_decoder(segment, plan)
        return Entry(plan, path, StageRunner(plan, i, session), segment)

    def _room_for(self, plan_id: str) -> None:
        if plan_id not in self._entries and len(self._entries) >= MAX_PLANS:
            raise wire.WireError(
                wire.E_TOO_LARGE,
                f"this server holds {len(self._entries)} plans, the most it serves (each pong lists them "
                "all): remove plan directories it no longer needs from its --plans and restart it",
            )

    def add_dir(self, path: str | Path) -> Plan:
        path = Path(path)
        plan = Plan.load(path, role=self.role)
        same = self._entries.get(plan.plan_id)
        if same is not None:  # the user's directory and the copy a deploy pushed beside it: one plan
            log.info("%s holds plan %s, served already from %s", path, plan.plan_id[:12], same.path)
            return plan
        self._room_for(plan.plan_id)
        entry = self._entry(path, plan)
        with self._lock:
            self._entries[plan.plan_id] = entry
        if entry.runner is None:
            log.info(
                "plan %s (%s, %s) runs entirely on the edge: nothing of it runs here",
                plan.plan_id[:12],
                shown(plan.model_name),
                described(plan),
            )
        else:
            log.info("serving plan %s (%s, %s)", plan.plan_id[:12], shown(plan.model_name), described(plan))
        return plan

    def install(self, files: dict[str, bytes]) -> Plan:
        """Verify a pushed plan (plan.json plus the files it lists), load it, and make it servable."""
        plan = verify_pushed(files, self.role)
        existing = self.get(plan.plan_id)
        if existing is not None and self._intact(existing):
            return existing.plan
        self._room_for(plan.plan_id)
        if self.plans_dir is None:
            raise PlanError(
                "this server has no plans directory to install pushed plans into"
                + (
                    " (a relay started on one plan directory: start it with --plans DIR)"
                    if self.stage
                    else ""
                )
            )

        def load(tmp: Path, plan: Plan) -> Entry:
            check_models_load(tmp, plan)  # every model, not only the tail: a bad head fails here too
            return self._entry(tmp, plan)  # sessions hold their models: the rename does not disturb them

        plan, entry, path = install_pushed(files, self.plans_dir, load, self.role)
        entry.path = path
        with self._lock:
            self._entries[plan.plan_id] = entry
        log.info(
            "installed pushed plan %s (%s, %s)", plan.plan_id[:12], shown(plan.model_name), described(plan)
        )
        return plan

    def _intact(self, entry: Entry) -> bool:
        """Whether a served plan's files still verify on disk. A plan pushed again while its files were
        deleted or damaged was acknowledged and left so, and the next start skipped it: the deploy
        repairs them instead (the sessions already loaded keep serving meanwhile)."""
        try:
            Plan.load(entry.path, role=self.role)
        except Exception as exc:
            log.warning(
                "plan %s: its files in %s no longer verify (%s): installing it again",
                entry.plan.plan_id[:12],
                entry.path,
                exc,
            )
            return False
        return True

    def clear(self) -> None:
        """Let go of every plan's sessions (a stopped server's)."""
        with self._lock:
            self._entries.clear()

    def get(self, plan_id: str) -> Entry | None:
        with self._lock:
            return self._entries.get(plan_id)

    def ids(self) -> list[str]:
        """The plans this server answers requests of. An edge-only plan is held (a plan set deployed
        whole has one) but never served: listed, it told an edge in pongs and the fleet in its status
        that requests of it would be answered, and each got ``unknown-plan``."""
        with self._lock:
            return [k for k, e in self._entries.items() if e.runner is not None]


def _warm_up_decoder(segment: DecoderSegment, plan: Plan) -> None:
    """One step on a dummy token: a session's first run sets up onnxruntime's kernels and buffers (tens
    of ms), which would otherwise land on the first user's first token."""
    import numpy as np

    from splitpoint.core.codecs import decode, encode

    dec = plan.decoder
    assert dec is not None
    dtype = plan.cut_tensors[0].dtype
    segment.step(np.zeros((1, 1, dec.hidden), dtype), segment.empty_past())
    decode(encode(np.ones((1, 2, dec.hidden), dtype), plan.codec))  # the codec's first call, too
