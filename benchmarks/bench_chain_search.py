"""The chain partitioner's search time: cuts and codecs for 2, 3 and 4 devices (K = 1, 2, 3 hops) over
the cut positions of real graphs (every cut `splitpoint cuts` lists for three zoo models) and of a graph
with 301 and one with 1,001 positions, five codecs, and the whole latency x throughput front.
Target: exact for K <= 3 on >= 300 cuts in under 5 s.
The costs are drawn at random per position (the search's work depends only on the sizes); exactness is
checked against brute force in tests/test_chain_planner.py.
Run: python benchmarks/bench_chain_search.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import arguments, write_results

from splitpoint.core.graph import open_model
from splitpoint.partitioner.chain import ChainCosts, chain_front, solve
from splitpoint.partitioner.costmodel import Link

CODECS = ("float32", "float16", "int8", "int8+zstd", "int4")
TARGET_S = 5.0
MAX_POINTS = 100_000  # the whole front, however many points it has


def costs_for(m: int, devices: int, seed: int = 0) -> ChainCosts:
    r = np.random.default_rng(seed)
    prefix = np.stack(
        [np.concatenate([[0], np.cumsum(r.uniform(0.1, 3, m - 1) * s)]) for s in (4, 4, 1, 1)[:devices]]
    )
    links = tuple(Link(f"hop{h}", 50.0, 50.0, 5.0) for h in range(devices - 1))
    return ChainCosts(
        tuple(f"d{j}" for j in range(devices)),
        links,
        CODECS,
        np.arange(m),
        prefix,
        r.uniform(0, 1, (devices, m, len(CODECS))),
        r.uniform(0, 1, (devices, m, len(CODECS))),
        r.uniform(1e3, 5e5, (m, len(CODECS))).astype(int),
        np.cumsum(r.uniform(0, 1e5, m)),
        r.uniform(0, 1e5, m),
        4000.0,
    )


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--out", type=Path, default=None, help="results directory (default: benchmarks/results)")
    args = ap.parse_args()
    sizes = {name: len(open_model(name).cuts()) + 2 for name in ("resnet18", "mobilenetv2", "resnet50")}
    sizes |= {"301 positions": 301, "1,001 positions": 1001}  # + "nothing before", "everything before"
    rows = []
    for graph, m in sizes.items():
        for devices in (2, 3, 4):
            times, fronts, solves = [], [], []
            for seed in range(3):
                t0 = time.perf_counter()
                solve(costs_for(m, devices, seed))
                solves.append(time.perf_counter() - t0)
                costs = costs_for(m, devices, seed)  # fresh: the front's time includes its tables
                t0 = time.perf_counter()
                fronts.append(len(chain_front(costs, max_points=MAX_POINTS)))
                times.append(time.perf_counter() - t0)
                if fronts[-1] >= MAX_POINTS:
                    raise SystemExit(f"{graph}, {devices} devices: the front reached {MAX_POINTS} points")
            rows.append(
                {
                    "graph": graph,
                    "devices": devices,
                    "hops": devices - 1,
                    "positions": m,
                    "codecs": len(CODECS),
                    "solve_s_median": statistics.median(solves),
                    "front_s_median": statistics.median(times),
                    "front_points_median": statistics.median(fronts),
                    "met": statistics.median(times) < TARGET_S,
                }
            )
    md = [
        "# Chain partitioner: search time",
        "",
        "`python benchmarks/bench_chain_search.py`. Median of 3 seeds; 5 codecs. Target: the whole front "
        "for K ≤ 3 on ≥ 300 cut positions in under 5 s.",
        "One solve: the lowest-latency plan; the front: every attainable bottleneck (latency × throughput), "
        "uncapped; each timed from fresh costs (its tables built inside the time).",
        "",
        "| graph | devices (hops K) | positions | one solve | whole front | front points | front < 5 s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        verdict = ("met" if r["met"] else "**MISSED**") if r["hops"] <= 3 else "–"
        md.append(
            f"| {r['graph']} | {r['devices']} ({r['hops']}) | {r['positions']} | "
            f"{r['solve_s_median']:.3f} s | {r['front_s_median']:.2f} s | "
            f"{r['front_points_median']:.0f} | {verdict} |"
        )
    write_results("chain_search", {"rows": rows, "target_s": TARGET_S}, "\n".join(md) + "\n", args.out)


if __name__ == "__main__":
    main()
