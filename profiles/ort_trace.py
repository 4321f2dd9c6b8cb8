"""Per-node times from onnxruntime's own profiler, mapped back to the original graph.

Under full optimisation onnxruntime fuses Conv+BN+activation(+Add) and renames the result
after its output tensor (``<tensor>_nchwc``). Such a kernel's time belongs to the heavy node
that heads the fused chain, so we walk back from the named tensor's producer to it.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from splitpoint.core.graph.index import GraphIndex

HEAVY = {
    "Conv",
    "ConvTranspose",
    "Gemm",
    "MatMul",
    "FusedConv",
    "FusedGemm",
    "FusedMatMul",
    "QLinearConv",
    "MatMulInteger",
    "ConvInteger",
}
SUFFIXES = ("_nchwc", "_token")


def _walk_to_heavy(idx: GraphIndex, pos: int, limit: int = 8) -> int:
    """From a fused kernel's last node back to the heavy node it started from."""
    p = pos
    for _ in range(limit):
        if idx.nodes[p].op_type in HEAVY:
            return p
        producers = [
            idx.producer[t] for t in idx.node_ins[p] if t in idx.producer and idx.producer[t] not in idx.const
        ]
        if not producers:
            return pos
        p = max(producers)  # the branch that was computed last is the one fused in
    return pos


def _map(idx: GraphIndex, ort_name: str, by_name: dict[str, int]) -> int | None:
    if ort_name in by_name:
        return by_name[ort_name]
    base = ort_name
    for s in SUFFIXES:
        if base.endswith(s):
            base = base[: -len(s)]
    if base in by_name:
        return by_name[base]
    return idx.producer.get(base)


def node_times(
    trace: str | Path | list, idx: GraphIndex, skip_runs: int
) -> tuple[dict[int, float], float, list[float]]:
    """Mean milliseconds per run for each original node position, time not attributable to
    any node (layout reorders and the like), and each kept run's model_run duration in ms."""
    events = json.loads(Path(trace).read_text()) if not isinstance(trace, list) else trace
    runs = sorted(
        (e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
        key=lambda e: e["ts"],
    )
    kept = runs[skip_runs:]
    if not kept:
        return {}, 0.0, []
    start = kept[0]["ts"]
    by_name = {n.name: p for p, n in enumerate(idx.nodes) if n.name}
    totals: dict[int, float] = defaultdict(float)
    unattributed = 0.0
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < start:
            continue
        ms = e["dur"] / 1000.0
        pos = _map(idx, e["name"][: -len("_kernel_time")], by_name)
        if pos is None:
            unattributed += ms
            continue
        op = e.get("args", {}).get("op_name", "")
        if op in HEAVY and idx.nodes[pos].op_type not in HEAVY:
            pos = _walk_to_heavy(idx, pos)
        totals[pos] += ms
    n = len(kept)
    return {p: t / n for p, t in totals.items()}, unattributed / n, [r["dur"] / 1000.0 for r in kept]
