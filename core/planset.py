"""A plan set: a few complete plans of one model, each the fastest over some range of uplink
bandwidth, in one directory, so that an edge can switch between them as its link changes.

The set's directory holds ``planset.json`` and one ordinary plan directory per member. Every member is
a whole plan with its own id; a request names the plan it uses, so the server, which loads every
member, needs no word from the edge when the edge switches. Each member also carries the measured
facts the planner judged it by (``facts``), so that the edge re-judges the members with the same
cost model at its own estimate of the link. The set is checked as strictly as a plan: ranges in
order and without gaps, every member's directory present and its plan id the one recorded.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Final, Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from .config import MAX_BYTES, MAX_MS, explain_fields
from .errors import PlanError, unsupported_version
from .plan import _FILE_NAME, _SHA256, Plan, _Strict, json_object, read_plan_file

PLANSET_FILE: Final = "planset.json"
PLANSET_FORMAT: Final = 1
MAX_MEMBERS: Final = 6
POLICIES = ("adaptive", "bits-only")


_MS = Field(ge=0, le=MAX_MS)


class MemberFacts(_Strict):
    """What the planner judged a member by (its ``CandidateInput``), checked as a pushed file is: the edge
    re-judges the members with these at run time, and a set whose facts were ``{"head_ms": "fast"}``
    was acknowledged, then its client died with a TypeError."""

    model_config = ConfigDict(extra="forbid", strict=False, defer_build=True)
    kind: Literal["split", "edge-only", "server-only"]
    cut: int | None = Field(ge=0)
    codec: str = Field(min_length=1, max_length=64)
    head_weights: str = Field(min_length=1, max_length=32)
    head_ms: float = _MS
    tail_ms: float = _MS
    encode_ms: float = _MS
    decode_ms: float = _MS
    up_bytes: int = Field(ge=0, le=MAX_BYTES)
    down_bytes: int = Field(ge=0, le=MAX_BYTES)
    edge_memory_bytes: int = Field(ge=0, le=MAX_BYTES)
    fidelity: float | None = Field(ge=-1, le=1)  # a cosine may be below 0
    edge_runtime_ms: float = Field(0.0, ge=0, le=MAX_MS)
    server_runtime_ms: float = Field(0.0, ge=0, le=MAX_MS)


class SetMember(_Strict):
    """One member: its plan directory (inside the set's), its plan id, and the uplink range in Mbit/s
    where the planner predicted it fastest (``hi_mbps`` None: no upper end)."""

    dir: str
    plan_id: str
    label: str = Field(max_length=256)
    lo_mbps: float = Field(ge=0)
    hi_mbps: float | None = Field(default=None, gt=0)
    facts: dict = Field(default_factory=dict)  # the planner's CandidateInput, as measured

    @field_validator("dir")
    @classmethod
    def _dir(cls, v: str) -> str:
        if not _FILE_NAME.match(v):
            raise ValueError(f"member directory {v[:80]!r} is not a plain name")
        return v

    @field_validator("facts")
    @classmethod
    def _facts(cls, v: dict) -> dict:
        MemberFacts(**v)  # the dict is kept as written: the set's id covers it
        return v

    @field_validator("plan_id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not _SHA256.match(v):
            raise ValueError("plan_id is not a sha256 hex digest")
        return v

    @property
    def hi(self) -> float:
        return math.inf if self.hi_mbps is None else self.hi_mbps


class PlanSet(_Strict):
    format_version: Literal[1] = PLANSET_FORMAT
    kind: Literal["splitpoint-planset"] = "splitpoint-planset"
    model_name: str = Field(max_length=256)
    model_sha256: str
    policy: Literal["adaptive", "bits-only"] = "adaptive"
    network: str = Field(default="", max_length=256)  # the profile the ranges were computed around
    uplink_mbps: float | None = Field(default=None, gt=0)  # the profile's uplink: where an edge starts
    rtt_ms: float = Field(ge=0)  # the round trip the ranges assume (the edge uses its own estimate)
    down_ratio: float = Field(default=1.0, gt=0)  # downlink / uplink bandwidth the ranges assume
    # the arrival rate (requests/s) the members were chosen to keep up with; None: one at a time
    rate_ips: float | None = Field(default=None, gt=0)
    members: list[SetMember] = Field(min_length=1, max_length=MAX_MEMBERS)

    @model_validator(mode="after")
    def _ranges(self) -> PlanSet:
        ms = self.members
        if ms[0].lo_mbps != 0:
            raise ValueError("the first member's range must start at 0 Mbit/s")
        if ms[-1].hi_mbps is not None:
            raise ValueError("the last member's range must have no upper end (hi_mbps null)")
        for a, b in zip(ms, ms[1:], strict=False):
            if a.hi_mbps is None or not math.isclose(a.hi_mbps, b.lo_mbps) or b.lo_mbps <= a.lo_mbps:
                raise ValueError(f"member ranges must follow on without gaps: {a.dir} then {b.dir}")
        if len({m.dir for m in ms}) != len(ms) or len({m.plan_id for m in ms}) != len(ms):
            raise ValueError("members must have distinct directories and plans")
        return self

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"

    def index_for(self, uplink_mbps: float) -> int:
        """The member whose range holds this uplink."""
        for i, m in enumerate(self.members):
            if uplink_mbps < m.hi:
                return i
        return len(self.members) - 1

    @classmethod
    def parse(cls, data: bytes | str, where: str = PLANSET_FILE) -> PlanSet:
        raw = json_object(data, where, "plan set")
        if type(raw.get("format_version")) is not int or raw.get("format_version") != PLANSET_FORMAT:
            found = raw.get("format_version")
            raise PlanError(
                f"{where}: {unsupported_version('plan set format_version', found, (PLANSET_FORMAT,))}"
            )
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise PlanError(f"{where}: malformed plan set: {explain_fields(exc)}") from exc

    @classmethod
    def load(cls, set_dir: str | Path, role: str | None = None) -> tuple[PlanSet, list[Plan]]:
        """planset.json and every member's plan, checked (files for ``role``, ids, one model)."""
        p = Path(set_dir) / PLANSET_FILE
        if not p.is_file():
            raise PlanError(f"no {PLANSET_FILE} in {set_dir}")
        s = cls.parse(read_plan_file(p, "plan set"), where=str(p))
        plans = []
        for m in s.members:
            plan = Plan.load(Path(set_dir) / m.dir, role=role)
            if plan.plan_id != m.plan_id:
                raise PlanError(
                    f"{p}: member {m.dir} holds plan {plan.plan_id[:12]}, the set names {m.plan_id[:12]}"
                )
            if plan.model_sha256 != s.model_sha256:
                raise PlanError(f"{p}: member {m.dir} is a plan of another model")
            plans.append(plan)
        return s, plans


def is_plan_set(path: str | Path) -> bool:
    return (Path(path) / PLANSET_FILE).is_file()
