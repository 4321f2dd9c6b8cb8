"""Pareto front and constrained pick. Pure functions; numpy does the pairwise comparisons so
1,000 candidates x 8 links take milliseconds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from splitpoint.core.errors import SplitPointError

from .costmodel import Candidate

OBJECTIVE_NAMES = ("latency_ms", "throughput_ips", "edge_memory_bytes", "bytes_per_inference", "fidelity")


def non_dominated(points: np.ndarray) -> np.ndarray:
    """Indices of rows not dominated by any other row (all columns minimised). A row dominates
    another if it is no worse everywhere and better somewhere; equal rows keep each other."""
    pts = np.asarray(points, dtype=float)
    n = len(pts)
    if n == 0:
        return np.zeros(0, dtype=int)
    keep = np.ones(n, dtype=bool)
    order = np.lexsort(pts.T[::-1])  # a dominator always sorts before what it dominates
    pts_sorted = pts[order]
    for r in range(n):
        i = order[r]
        if not keep[i]:
            continue
        rest = pts_sorted[r + 1 :]
        dominated = np.all(pts_sorted[r] <= rest, axis=1) & np.any(pts_sorted[r] < rest, axis=1)
        keep[order[r + 1 :][dominated]] = False
    return np.flatnonzero(keep)


def front(cands: list[Candidate], objectives: tuple[int, ...] | None = None) -> list[Candidate]:
    """The candidates no other beats on every one of ``objectives`` (indices into ``OBJECTIVE_NAMES``;
    None: all five), fastest first."""
    if not cands:
        return []
    pts = np.array([c.objectives() for c in cands])
    idx = non_dominated(pts if objectives is None else pts[:, list(objectives)])
    return sorted((cands[i] for i in idx), key=lambda c: c.latency_ms)


@dataclass(frozen=True)
class Constraints:
    max_latency_ms: float | None = None
    min_fidelity: float | None = None
    max_edge_memory_bytes: int | None = None
    max_bytes: int | None = None
    min_throughput_ips: float | None = None
    objective: str = "latency"  # latency | throughput | bytes | edge-memory | fidelity

    def violations(self, c: Candidate) -> dict[str, float]:
        """Relative amount by which each constraint is missed (0 = met)."""
        v = {}
        if self.max_latency_ms is not None and c.latency_ms > self.max_latency_ms:
            v["latency"] = c.latency_ms / self.max_latency_ms - 1
        if self.min_fidelity is not None and (c.inp.fidelity or 0.0) < self.min_fidelity:
            v["fidelity"] = self.min_fidelity - (c.inp.fidelity or 0.0)
        if self.max_edge_memory_bytes is not None and c.inp.edge_memory_bytes > self.max_edge_memory_bytes:
            v["edge memory"] = c.inp.edge_memory_bytes / self.max_edge_memory_bytes - 1
        if self.max_bytes is not None and c.bytes_per_inference > self.max_bytes:
            v["bytes"] = c.bytes_per_inference / max(self.max_bytes, 1) - 1
        if self.min_throughput_ips is not None and c.throughput_ips < self.min_throughput_ips:
            v["throughput"] = 1 - c.throughput_ips / self.min_throughput_ips
        return v

    def misses(self, c: Candidate) -> list[str]:
        """Each missed constraint as a user reads it: the candidate's figure against the limit."""
        mib = 2**20
        text = {
            "latency": lambda: f"latency {c.latency_ms:.1f} ms > {self.max_latency_ms:g} ms",
            "fidelity": lambda: f"fidelity {c.inp.fidelity or 0.0:.3f} < {self.min_fidelity:g}",
            "edge memory": lambda: (
                # four digits: at one decimal, 0.82 MiB against a
                # 0.75 MiB limit read "0.8 MiB > 0.8 MiB"
                f"edge memory {c.inp.edge_memory_bytes / mib:.4g} MiB > "
                f"{(self.max_edge_memory_bytes or 0) / mib:.4g} MiB"
            ),
            "bytes": lambda: f"{c.bytes_per_inference} bytes > {self.max_bytes}",
            "throughput": lambda: f"throughput {c.throughput_ips:.1f}/s < {self.min_throughput_ips:g}/s",
        }
        return [text[k]() for k in self.violations(c)]

    def objectives(self) -> tuple[int, ...]:
        """The objectives the search weighs (indices into ``OBJECTIVE_NAMES``): latency and bytes always;
        fidelity where no floor is given (with a floor it is a constraint: the front is of the candidates
        that meet it); throughput and edge memory only where a constraint or the objective names them.
        With all five, nearly every cut of a large CNN is on the front (memory grows with depth while the
        cut tensor shrinks; a measured fidelity a hair below 1 leaves every unmeasured candidate, counted
        lossless until measured, undominated), and each one's fidelity costs a run of the tail over every
        sample and codec."""
        out = [0, 3]
        if self.min_fidelity is None or self.objective == "fidelity":
            out.append(4)
        if self.min_throughput_ips is not None or self.objective == "throughput":
            out.append(1)
        if self.max_edge_memory_bytes is not None or self.objective == "edge-memory":
            out.append(2)
        return tuple(sorted(out))

    def without_fidelity(self) -> Constraints:
        """The constraints that hold without measuring fidelity: checked before it is measured."""
        return replace(self, min_fidelity=None)


class InfeasibleError(SplitPointError):
    def __init__(self, message: str, closest: list[tuple[Candidate, dict]]):
        super().__init__(message)
        self.closest = closest


_KEYS = {
    "latency": lambda c: (c.latency_ms, -c.throughput_ips),
    "throughput": lambda c: (-c.throughput_ips, c.latency_ms),
    "bytes": lambda c: (c.bytes_per_inference, c.latency_ms),
    "edge-memory": lambda c: (c.inp.edge_memory_bytes, c.latency_ms),
    "fidelity": lambda c: (-(c.inp.fidelity or 0.0), c.latency_ms),
}


def objective_key(constraints: Constraints) -> Callable[[Candidate], tuple]:
    """The sort key of the constraints' objective (best first)."""
    if constraints.objective not in _KEYS:
        raise SplitPointError(f"unknown objective {constraints.objective!r}; choose from {', '.join(_KEYS)}")
    return _KEYS[constraints.objective]


def optimistic_key(constraints: Constraints) -> Callable[[Candidate], tuple]:
    """The objective's key with an unmeasured candidate counted as lossless: what may yet be the best
    (counted as fidelity 0, none was ever measured when fidelity itself was sought, and the pick came
    from whatever else had been)."""
    if constraints.objective == "fidelity":
        return lambda c: (-(c.inp.fidelity if c.inp.fidelity is not None else 1.0), c.latency_ms)
    return objective_key(constraints)


def pick(cands: list[Candidate], constraints: Constraints) -> Candidate:
    """The best feasible candidate for the objective; the best is always on the front."""
    key = objective_key(constraints)
    feasible = [c for c in cands if not constraints.violations(c) and c.inp.fidelity is not None]
    if feasible:
        return min(feasible, key=key)
    raise infeasible([c for c in cands if c.inp.fidelity is not None], constraints)


def infeasible(cands: list[Candidate], constraints: Constraints) -> InfeasibleError:
    """The error for constraints nothing meets, naming the three closest candidates and what each misses."""
    scored = sorted(((c, constraints.violations(c)) for c in cands), key=lambda cv: sum(cv[1].values()))
    closest = scored[:3]
    parts = [f"{c.label} ({', '.join(constraints.misses(c))})" for c, _ in closest]
    return InfeasibleError("no candidate meets the constraints; the closest: " + "; ".join(parts), closest)
