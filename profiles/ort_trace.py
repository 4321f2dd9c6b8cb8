"""Per-node times from onnxruntime's own profiler, mapped back to the original graph.

Under full optimisation onnxruntime fuses Conv+BN+activation(+Add) and renames the result
after its output tensor (``<tensor>_nchwc``). Such a kernel's time belongs to the heavy node
that heads the fused chain, so we walk back from the named tensor's producer to it.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

from splitpoint.core.graph.flops import CONV_WEIGHT, MATMUL, node_macs
from splitpoint.core.graph.index import GraphIndex
from splitpoint.core.subgraphs import is_constant

HEAVY = frozenset(CONV_WEIGHT) | frozenset(MATMUL)  # what a fused kernel starts from
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


# onnxruntime's renames: a float16 model's kernels run in float32 behind inserted casts
# (``InsertedPrecisionFreeCast_<tensor>_nchwc``), a fused QDQ group is named ``<node>_token_<n>``, and a
# Gemm/MatMul with its activation fused in (a Linear -> ReLU as exporters write it) ``fused <node>``
PREFIXES = ("InsertedPrecisionFreeCast_", "fused ")
_TOKEN = re.compile(r"_token_\d+$")
# a node a fusion rewrote keeps its name with the fusion's appended, once per fusion
# (``<node>/MatMulAddFusion``, ``<node>/MatMulScaleFusion//MatmulTransposeFusion/``): a transformer exported
# by torch had 54 % of its kernel time under such names, and every derived cut fell back to MACs
# (each repetition starts at its own slashes: a trailing ``/*`` inside it backtracked exponentially on a
# name of many ``/Fusion//`` that does not end in one)
_FUSIONS = re.compile(r"(?:/+[A-Za-z0-9]*Fusion(?:_token_\d+)?)+/*$")


def _map(idx: GraphIndex, ort_name: str, by_name: dict[str, int]) -> int | None:
    if ort_name in by_name:
        return by_name[ort_name]
    base = _FUSIONS.sub("", _TOKEN.sub("", ort_name))
    for s in SUFFIXES:
        if base.endswith(s):
            base = base[: -len(s)]
    for s in PREFIXES:
        if base.startswith(s):
            base = base[len(s) :]
    if base in by_name:
        return by_name[base]
    return idx.producer.get(base)


CONTROL_FLOW = ("Loop", "If", "Scan")


def _names(idx: GraphIndex) -> dict[str, int]:
    """onnxruntime's name for each node: its own, or for an unnamed one (models built with
    ``onnx.helper``, bodies of inlined functions) its op type and place in the model the session was
    given, as onnxruntime names it (``MatMul_0``), where Constant nodes have no place: onnxruntime makes
    them initializers first, and every unnamed node after one was named one place earlier than counted
    (its time went to no node, or to another of its type). The session's model has the nodes in the
    order of ``idx.model`` (``ModelHandle.runnable``: the file only where that order is the file's)."""
    by_name = {n.name: p for p, n in enumerate(idx.nodes) if n.name}
    kept = [n for n in idx.model.graph.node if not is_constant(n)]
    place = {id(n): k for k, n in enumerate(kept)}
    for p, n in enumerate(idx.nodes):
        if not n.name and id(n) in place:
            by_name.setdefault(f"{n.op_type}_{place[id(n)]}", p)
    return by_name


def _inside(bodies: list[tuple[float, float]], e: dict) -> bool:
    """Whether an event ran within a control-flow node's (and is not that node's own)."""
    t0, t1 = e["ts"], e["ts"] + e["dur"]
    return any(a <= t0 and t1 <= b and (a, b) != (t0, t1) for a, b in bodies)


def cost_curve(
    idx: GraphIndex, per_node: dict[int, float], unattributed_ms: float, min_attributed: float = 0.5
) -> tuple[list[float], str]:
    """Each compute node's share of the model's time, in compute order, and where it comes from.

    onnxruntime's kernel times where they account for most of a run; else (kernels named after
    nothing in the graph: a future fusion's naming) the nodes' multiply-accumulates, which rank a
    network's layers as their kernels would. A curve of zeros would put every derived cut's head at
    0 ms and let the planner ship a head that holds the whole model."""
    attributed = sum(per_node.get(p, 0.0) for p in idx.compute)
    if attributed > 0 and attributed >= min_attributed * (attributed + unattributed_ms):
        return [per_node.get(p, 0.0) for p in idx.compute], "per-node kernel times"
    share = attributed / (attributed + unattributed_ms) if attributed + unattributed_ms > 0 else 0.0
    why = f"onnxruntime's kernel times could not be attributed to the model's nodes ({share:.0%} were)"
    macs = [float(node_macs(idx, p)) for p in idx.compute]
    if sum(macs) > 0:
        # every node costs a little beyond its MACs (a launch, a pass over its output)
        floor = 1e-3 * sum(macs) / len(macs)
        return [m + floor for m in macs], f"multiply-accumulates: {why}"
    return [1.0] * len(idx.compute), f"one unit per node: {why}, and the model counts no MACs"


def node_times(
    trace: str | Path | list, idx: GraphIndex, skip_runs: int
) -> tuple[dict[int, float], float, list[float]]:
    """Mean milliseconds per run for each original node position, time not attributable to
    any node (layout reorders and the like), and each kept run's model_run duration in ms."""
    events = json.loads(Path(trace).read_text(encoding="utf-8")) if not isinstance(trace, list) else trace
    runs = sorted(
        (e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
        key=lambda e: e["ts"],
    )
    kept = runs[skip_runs:]
    if not kept:
        return {}, 0.0, []
    start = kept[0]["ts"]
    by_name = _names(idx)
    kernels = [
        e
        for e in events
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= start
    ]
    # a Loop's, If's or Scan's kernel time holds its body's, whose nodes are logged too, under names of
    # their own graph (an unnamed body's MatMul_0 is also the main graph's): the body's events are skipped
    bodies = sorted(
        (e["ts"], e["ts"] + e["dur"])
        for e in kernels
        if e.get("args", {}).get("op_name") in CONTROL_FLOW
        and _map(idx, e["name"][: -len("_kernel_time")], by_name) is not None
    )
    totals: dict[int, float] = defaultdict(float)
    unattributed = 0.0
    for e in kernels:
        if _inside(bodies, e):
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
