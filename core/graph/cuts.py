"""Candidate cuts of a DAG and their validation.

A cut is a downward-closed set of compute nodes (the head); everything it produces that the
rest still reads crosses the network. Every prefix of a topological order is downward closed,
so sweeping the order once yields every candidate with its crossing set in near-linear time.
A cut named by tensors is checked the other way round: the head is the ancestry of those
tensors, and any other tensor the tail would still need from the head is an error.
"""

from __future__ import annotations

import difflib
import itertools
from dataclasses import asdict, dataclass, field

import onnx

from splitpoint.core.codecs import CARRIED_DTYPES
from splitpoint.core.errors import CutError
from splitpoint.core.subgraphs import iter_nodes

from .flops import node_macs, param_tensors, tensor_size
from .index import GraphIndex


@dataclass(frozen=True)
class CrossingTensor:
    name: str
    shape: str
    dtype: str
    bytes_per_sample: int | None
    source: str  # "head": produced by the head; "input": a raw graph input the tail reads


@dataclass
class Cut:
    """One head/tail boundary. ``index`` is the number of compute nodes in the head when the
    cut is a prefix of the topological order (None for a tensor-named cut that is not one)."""

    index: int | None
    head: frozenset  # positions into GraphIndex.nodes of the head's compute nodes
    crossing: list[CrossingTensor]
    head_outputs: list[str]  # graph outputs produced inside the head
    head_macs: int
    total_macs: int
    head_params: int
    total_params: int
    last_node: str = ""
    raw_input_crossing: bool = field(default=False)

    @property
    def bytes_per_sample(self) -> int | None:
        sizes = [c.bytes_per_sample for c in self.crossing]
        return None if any(x is None for x in sizes) else sum(x for x in sizes if x is not None)

    @property
    def k(self) -> int:
        """The prefix index; every enumerated cut has one (only a tensor-named cut may lack it)."""
        if self.index is None:
            raise CutError("this cut is not a prefix of the topological order, so it has no index")
        return self.index

    @property
    def head_macs_share(self) -> float | None:
        """None where no node's MACs could be counted (no sizes known, or no Conv/MatMul/recurrent
        node): a share of 0.0 % read as a cut that leaves all the work to the server."""
        return self.head_macs / self.total_macs if self.total_macs else None

    @property
    def head_params_share(self) -> float | None:
        return self.head_params / self.total_params if self.total_params else None

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "last_node": self.last_node,
            "crossing": [asdict(c) for c in self.crossing],
            "bytes_per_sample": self.bytes_per_sample,
            "head_outputs": self.head_outputs,
            "head_macs": self.head_macs,
            "head_macs_share": _rounded(self.head_macs_share),
            "head_params": self.head_params,
            "head_params_share": _rounded(self.head_params_share),
            "raw_input_crossing": self.raw_input_crossing,
        }


def _rounded(share: float | None) -> float | None:
    return None if share is None else round(share, 6)


def _crossing(idx: GraphIndex, name: str, source: str) -> CrossingTensor:
    t = idx.tensor(name)
    return CrossingTensor(name, t.shape_str(), t.dtype, t.bytes_per_sample(), source)


def enumerate_cuts(idx: GraphIndex) -> list[Cut]:
    """All prefix cuts 1..M-1 of the compute order (M compute nodes), in one sweep, but those where a
    sequence, a map or a tensor of a type no codec carries (bfloat16, strings) would cross: their
    indices are skipped, not renumbered."""
    order = idx.compute
    m = len(order)
    # last rank at which each dynamic tensor is read; constants never cross
    last_use: dict[str, int] = {}
    for r, p in enumerate(order):
        for t in idx.node_ins[p]:
            last_use[t] = r
    produced_rank = {}
    for t in idx.inputs:
        produced_rank[t] = -1
    for r, p in enumerate(order):
        for o in idx.nodes[p].output:
            if o:
                produced_rank[o] = r
    outputs_by_rank: dict[int, list[str]] = {}
    for o in idx.outputs:
        outputs_by_rank.setdefault(produced_rank.get(o, m), []).append(o)

    param_first_rank: dict[str, int] = {}
    param_last_rank: dict[str, int] = {}
    for r, p in enumerate(order):
        for t in param_tensors(idx, p):
            param_first_rank.setdefault(t, r)
            param_last_rank[t] = r
    total_params = sum(tensor_size(idx, t) for t in param_first_rank)
    params_entering = [0] * (m + 1)
    for t, r in param_first_rank.items():
        params_entering[r] += tensor_size(idx, t)

    live: dict[str, str] = {t: "input" for t in idx.inputs if last_use.get(t, -1) >= 1}
    head_outputs: list[str] = list(outputs_by_rank.get(-1, []))
    params = 0
    cuts: list[Cut] = []
    for k in range(1, m):
        r = k - 1
        p = order[r]
        params += params_entering[r]
        for o in idx.nodes[p].output:
            if o and last_use.get(o, -1) >= k:
                live[o] = "head"
        for t in [t for t in live if last_use.get(t, -1) < k]:
            del live[t]
        head_outputs.extend(outputs_by_rank.get(r, []))
        if not all(idx.carried(t) for t in live):
            continue
        crossing = [
            _crossing(idx, t, s) for t, s in sorted(live.items(), key=lambda kv: produced_rank[kv[0]])
        ]
        cuts.append(
            Cut(
                index=k,
                head=frozenset(),
                crossing=crossing,
                head_outputs=list(head_outputs),
                head_macs=0,
                total_macs=0,
                head_params=params,
                total_params=total_params,
                last_node=idx.nodes[p].name or f"{idx.nodes[p].op_type}#{p}",
                raw_input_crossing=any(s == "input" for s in live.values()),
            )
        )
    # MACs last: a cut's tensor that inference could not type makes the sweep measure the shapes with
    # a trial run, and MACs counted before that (the total, the first heads) would miss what it typed
    macs = [node_macs(idx, p) for p in range(len(idx.nodes))]
    prefix = [0, *itertools.accumulate(macs[p] for p in order)]
    total_macs = sum(macs)
    for c in cuts:
        c.head_macs, c.total_macs = prefix[c.k], total_macs
    return cuts


def head_positions(idx: GraphIndex, cut: Cut) -> frozenset:
    """The head's compute-node positions (materialised lazily: prefix cuts store only k)."""
    if cut.head:
        return cut.head
    return frozenset(idx.compute[: cut.index])


def cut_by_index(idx: GraphIndex, k: int, cuts: list[Cut] | None = None) -> Cut:
    m = len(idx.compute)
    if m < 2:
        raise CutError("the model has fewer than two compute nodes: there is nothing to cut")
    if not 1 <= k <= m - 1:
        raise CutError(
            f"cut index {k} does not exist: cuts are numbered 1..{m - 1} "
            "(`splitpoint cuts` lists the valid ones)"
        )
    cuts = cuts if cuts is not None else enumerate_cuts(idx)
    cut = (
        cuts[k - 1]
        if len(cuts) >= k and cuts[k - 1].index == k
        else next((c for c in cuts if c.index == k), None)
    )
    if cut is None:
        try:  # the tensors and their types, as a cut named by its tensors is refused (an int4 or float8 one)
            cut_from_head(idx, frozenset(idx.compute[:k]))
        except CutError as exc:
            raise CutError(f"cut {k}: {exc}; choose another cut (`splitpoint cuts`)") from exc
        raise CutError(
            f"cut {k} would send a value no codec carries across the network (a sequence, a map, or a "
            f"tensor that is not {', '.join(sorted(CARRIED_DTYPES))}): choose another cut (`splitpoint cuts`)"
        )
    return cut


def _holder_of(idx: GraphIndex, name: str) -> str | None:
    """The main-graph node (op and name) whose control-flow body (If, Loop, Scan) computes ``name``."""
    for node in idx.nodes:
        for a in node.attribute:
            if a.type != onnx.AttributeProto.GRAPH:
                continue
            inner = {i.name for i in a.g.input} | {o for n in iter_nodes(a.g) for o in n.output}
            if name in inner:
                return f"{node.op_type} node {node.name!r}" if node.name else f"a {node.op_type} node"
    return None


def cut_by_tensors(idx: GraphIndex, names: list[str]) -> Cut:
    """Head = every compute node the named tensors depend on, or where the tail would then need more from
    the head, the first cut `cuts` lists whose computed crossing tensors are exactly these. Otherwise
    refused, naming what else the tail needs."""
    all_names = set(idx.producer) | set(idx.inputs) | set(idx.initializers)
    for n in names:
        if n not in all_names:
            holder = _holder_of(idx, n)
            if holder is not None:
                raise CutError(
                    f"tensor {n!r} is inside the body of {holder}: a cut runs between the main graph's "
                    "nodes, before or after that node (`splitpoint cuts` lists them)"
                )
            near = difflib.get_close_matches(n, list(idx.producer), n=3)
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise CutError(f"no tensor named {n!r} in the graph{hint}")
        if n in idx.initializers or (n not in idx.inputs and idx.producer[n] in idx.const):
            raise CutError(f"tensor {n!r} is a constant: it cannot be a cut boundary")
    # a raw input crosses wherever the tail reads it, named or not: `split` lists it among what crosses,
    # and that list given back as --cut was refused for it
    computed = [n for n in names if n not in idx.inputs]
    if not computed:
        raise CutError(
            f"{', '.join(map(repr, names))} {'is a graph input' if len(names) == 1 else 'are graph inputs'}: "
            "name tensors the head computes (`splitpoint cuts` lists them)"
        )
    names = computed
    head: set[int] = set()
    stack = [idx.producer[n] for n in names]
    while stack:
        p = stack.pop()
        if p in head or p in idx.const:
            continue
        head.add(p)
        stack.extend(idx.producer[t] for t in idx.node_ins[p] if t in idx.producer)
    if len(head) == len(idx.compute):
        raise CutError(f"cutting at {names} leaves nothing for the tail")
    try:
        return cut_from_head(idx, frozenset(head), expected=set(names))
    except CutError:
        # the named tensors may be exactly what crosses at a cut `cuts` lists, whose head also holds nodes
        # they do not depend on (a branch ending in a model output): that listed cut, the first such
        listed = next(
            (
                c
                for c in enumerate_cuts(idx)
                if {t.name for t in c.crossing if t.source == "head"} == set(names)
            ),
            None,
        )
        if listed is None:
            raise
        return listed


def _what(idx: GraphIndex, t: str) -> str:
    """A value's kind as a user names it: its element type ("string", where numpy says "object"), or
    what it is when it is no tensor."""
    if not idx.is_tensor(t):
        if t not in idx.non_tensor:
            return "its type unknown: shape inference cannot tell, and no trial run measured it"
        return "a sequence, a map or an optional value"
    dtype = idx.tensor(t).dtype
    return "string" if dtype == "object" else dtype


def cut_from_head(idx: GraphIndex, head: frozenset, expected: set[str] | None = None) -> Cut:
    tail = [p for p in idx.compute if p not in head]
    tail_reads = {t for p in tail for t in idx.node_ins[p]}
    produced_in_head = {o for p in head for o in idx.nodes[p].output if o}
    crossing_names = [t for t in idx.inputs if t in tail_reads]
    from_head = [o for p in sorted(head) for o in idx.nodes[p].output if o and o in tail_reads]
    if expected is not None:
        extra = [t for t in from_head if t not in expected]
        if extra:
            # a cut at them all is suggested only where it could be one: no sequence or string crosses
            uncarried = [t for t in [*sorted(expected), *extra] if not (idx.is_tensor(t) and idx.carried(t))]
            way_out = (
                f"; cut at {','.join([*sorted(expected), *extra])} instead"
                if not uncarried
                else f", and no codec carries {', '.join(f'{t} ({_what(idx, t)})' for t in uncarried)}: "
                "cut elsewhere" + (f" (the trial run failed: {idx.trial_error})" if idx.trial_error else "")
            )
            raise CutError(
                f"invalid cut: the tail also needs {', '.join(extra)} from the head "
                f"(e.g. a residual connection){way_out}"
            )
        unused = [t for t in expected if t not in from_head]
        if unused:
            raise CutError(f"tensor(s) {', '.join(unused)} are not read by the tail: not a boundary")
    others = [t for t in crossing_names + from_head if not idx.is_tensor(t)]
    unknown = [t for t in others if t not in idx.non_tensor]
    if unknown:  # not typed: inference could not tell, and the trial run that measures it failed
        raise CutError(
            f"invalid cut: the type of {', '.join(unknown)} is unknown: shape inference cannot tell"
            + (
                f", and onnxruntime could not run the model to measure it ({idx.trial_error})"
                if idx.trial_error
                else ", and a trial run of the model did not return it"
            )
        )
    if others:
        raise CutError(
            f"invalid cut: {', '.join(others)} would cross as a sequence, a map or an optional value, which "
            "no codec carries"
        )
    typed = [f"{t} ({_what(idx, t)})" for t in crossing_names + from_head if not idx.carried(t)]
    if typed:
        raise CutError(
            f"invalid cut: {', '.join(typed)} would cross, and no codec carries that type "
            f"(carried: {', '.join(sorted(CARRIED_DTYPES))})"
        )
    crossing = [_crossing(idx, t, "input") for t in crossing_names] + [
        _crossing(idx, t, "head") for t in from_head
    ]
    macs = sum(node_macs(idx, p) for p in head)
    head_params = {t for p in head for t in param_tensors(idx, p)}
    all_params = {t for p in range(len(idx.nodes)) for t in param_tensors(idx, p)}
    ordered = sorted(head)
    prefix = ordered == sorted(idx.compute[: len(head)])
    return Cut(
        index=len(head) if prefix else None,
        head=head,
        crossing=crossing,
        # a model input that is also a model output is the head's to give back: the edge holds it
        head_outputs=[o for o in idx.outputs if o in produced_in_head or o in idx.inputs],
        head_macs=macs,
        total_macs=sum(node_macs(idx, p) for p in range(len(idx.nodes))),
        head_params=sum(tensor_size(idx, t) for t in head_params),
        total_params=sum(tensor_size(idx, t) for t in all_params),
        last_node=idx.nodes[ordered[-1]].name,
        raw_input_crossing=bool(crossing_names),
    )


def resolve_cut(idx: GraphIndex, spec: str | int) -> Cut:
    """``spec`` is a cut index or comma-separated tensor names; a name that itself holds a comma (or
    spaces at its ends) is taken whole when the graph has a tensor of exactly that name."""
    s = str(spec).strip()
    if not s.strip(", "):
        raise CutError("--cut is empty: give a cut index (see `splitpoint cuts MODEL`) or tensor names")
    if s.lstrip("-").isdigit():
        return cut_by_index(idx, int(s))
    if str(spec) in idx.producer:
        return cut_by_tensors(idx, [str(spec)])
    return cut_by_tensors(idx, [x.strip() for x in s.split(",") if x.strip()])
