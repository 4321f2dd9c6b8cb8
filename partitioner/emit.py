"""From a chosen candidate to a deployable plan directory.

The CLI's ``plan``, the demo and the bench all deploy what the planner chose; they go through here so that
a candidate means the same files everywhere (an int8-head candidate gets its quantised head, a baseline
gets the whole model on its side).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from splitpoint.core.errors import PlanError
from splitpoint.core.graph import ModelHandle
from splitpoint.core.graph.cuts import cut_by_index
from splitpoint.core.graph.extract import extract
from splitpoint.core.plan import EDGE_ONLY, SPLIT, Plan, write_dir_atomically
from splitpoint.core.plandir import write_plan
from splitpoint.core.planset import PLANSET_FILE, PlanSet, SetMember
from splitpoint.core.quantize import quantize_head

from .costmodel import Candidate, Link, evaluate, member_facts
from .planset import Member


def write_candidate(
    handle: ModelHandle,
    cand: Candidate,
    out: str | Path,
    *,
    samples: list[dict[str, np.ndarray]] | None = None,
    include_full: bool = False,
    predicted: dict | None = None,
    front: list | None = None,
    force: bool = False,
) -> Plan:
    """Write ``cand`` as a plan. ``samples`` calibrate an int8 head; ``predicted`` defaults to the
    candidate's own figures; ``include_full``: ship the whole model for the edge to fall back on while
    the server is out of reach (an edge-only plan's head is that model already)."""
    i = cand.inp
    cut = cut_by_index(handle.index, i.cut, handle.cuts()) if i.kind == SPLIT and i.cut is not None else None
    head_model = None
    if i.head_weights == "int8":
        if not samples:
            raise PlanError("an int8-head plan needs calibration samples")
        if i.kind == EDGE_ONLY:
            base = handle.model
        else:
            assert cut is not None
            base = extract(handle.index, cut, check=False)[0]
        head_model = quantize_head(base, samples, "static")
    return write_plan(
        handle,
        out,
        kind=i.kind,
        cut=cut,
        codec=i.codec,
        head_model=head_model,
        head_weights=i.head_weights,
        include_full=include_full,
        predicted=predicted if predicted is not None else cand.to_dict(),
        front=front,
        force=force,
    )


def write_plan_set(
    handle: ModelHandle,
    members: list[Member],
    out: str | Path,
    *,
    network: str,
    rtt_ms: float,
    uplink_mbps: float | None = None,
    down_ratio: float = 1.0,
    policy: str = "adaptive",
    samples: list[dict[str, np.ndarray]] | None = None,
    include_full: bool = False,
    force: bool = False,
    rate_ips: float | None = None,
    fidelity: dict | None = None,
) -> PlanSet:
    """Write every member as a plan directory (``m0``, ``m1``, ... slowest link first) and
    ``planset.json``, all or nothing: one rename puts the whole set in place. ``fidelity``: what the
    members' fidelity was measured on (``fidelity_facts``), recorded in each member's prediction."""
    result: list[PlanSet] = []

    def write(tmp: Path) -> None:
        entries = []
        for k, mem in enumerate(members):
            bw = mem.inside_mbps
            cand = evaluate(mem.inp, Link(f"{bw:.3g} Mbit/s", bw, bw * down_ratio, rtt_ms))
            predicted = {**cand.to_dict(), **(fidelity or {})}
            plan = write_candidate(
                handle, cand, tmp / f"m{k}", samples=samples, predicted=predicted, include_full=include_full
            )
            entries.append(
                SetMember(
                    dir=f"m{k}",
                    plan_id=plan.plan_id,
                    label=cand.label,
                    lo_mbps=mem.lo_mbps,
                    hi_mbps=mem.hi_mbps if math.isfinite(mem.hi_mbps) else None,
                    facts=member_facts(mem.inp),
                )
            )
        s = PlanSet.model_validate(
            {
                "model_name": handle.name,
                "model_sha256": handle.sha256,
                "policy": policy,
                "network": network,
                "uplink_mbps": uplink_mbps,
                "rtt_ms": rtt_ms,
                "down_ratio": down_ratio,
                "rate_ips": rate_ips,
                "members": entries,
            }
        )
        (tmp / PLANSET_FILE).write_text(s.to_json(), encoding="utf-8")
        result.append(s)

    write_dir_atomically(out, write, force=force)
    return result[0]
