"""From a chosen candidate to a deployable plan directory.

The CLI's ``plan``, the demo and the bench all deploy what the planner chose; they go through here so that
a candidate means the same files everywhere (an int8-head candidate gets its quantised head, a baseline
gets the whole model on its side).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from splitpoint.core.errors import PlanError
from splitpoint.core.graph import ModelHandle
from splitpoint.core.graph.extract import extract
from splitpoint.core.plan import EDGE_ONLY, SPLIT, Plan
from splitpoint.core.plandir import write_plan
from splitpoint.core.quantize import quantize_head

from .costmodel import Candidate


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
    candidate's own figures."""
    i = cand.inp
    cut = handle.cuts()[i.cut - 1] if i.kind == SPLIT and i.cut is not None else None
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
