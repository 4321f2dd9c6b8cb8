"""Head and tail sub-models for a cut.

Written here rather than with ``onnx.utils.Extractor``, which accepts invalid boundaries by
silently pulling head nodes into the tail, and drops subgraph outer-scope references and
model-local functions.
"""

from __future__ import annotations

import onnx
from onnx import helper

from splitpoint.core.onnxio import check_model

from .cuts import Cut, head_positions
from .index import GraphIndex


def _with_constants(idx: GraphIndex, positions: set[int]) -> list[int]:
    """Add the constant nodes the given nodes read, transitively; each side gets its own copy."""
    need = set(positions)
    stack = [t for p in positions for t in idx.node_ins[p]]
    while stack:
        t = stack.pop()
        p = idx.producer.get(t)
        if p is not None and p in idx.const and p not in need:
            need.add(p)
            stack.extend(idx.node_ins[p])
    return sorted(need)


def _submodel(
    idx: GraphIndex, positions: list[int], inputs: list[str], outputs: list[str], name: str
) -> onnx.ModelProto:
    src = idx.model
    nodes = [idx.nodes[p] for p in positions]
    reads = {t for p in positions for t in idx.node_ins[p]}
    inits = [idx.initializers[t] for t in idx.initializers if t in reads]
    original_inputs = {i.name: i for i in src.graph.input}
    original_outputs = {o.name: o for o in src.graph.output}

    def vi(name: str) -> onnx.ValueInfoProto:
        if name in original_inputs:
            return original_inputs[name]
        if name in original_outputs:
            return original_outputs[name]
        return idx.tensor(name).value_info()

    internal = {o for n in nodes for o in n.output} - set(outputs)
    value_info = [v for v in src.graph.value_info if v.name in internal]
    graph = helper.make_graph(
        nodes, name, [vi(i) for i in inputs], [vi(o) for o in outputs], inits, value_info=value_info
    )
    model = helper.make_model(
        graph, opset_imports=list(src.opset_import), producer_name="splitpoint", functions=list(src.functions)
    )
    model.ir_version = src.ir_version
    return model


def extract(idx: GraphIndex, cut: Cut, check: bool = True) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    head = set(head_positions(idx, cut))
    tail = [p for p in idx.compute if p not in head]
    head_reads = {t for p in head for t in idx.node_ins[p]}
    head_inputs = [i for i in idx.inputs if i in head_reads]
    head_sent = [c.name for c in cut.crossing if c.source == "head"]
    head_outputs = list(dict.fromkeys(head_sent + cut.head_outputs))
    tail_outputs = [o for o in idx.outputs if o not in cut.head_outputs]
    h = _submodel(idx, _with_constants(idx, head), head_inputs, head_outputs, f"{idx.model.graph.name}_head")
    t = _submodel(
        idx,
        _with_constants(idx, set(tail)),
        [c.name for c in cut.crossing],
        tail_outputs,
        f"{idx.model.graph.name}_tail",
    )
    if check:
        check_model(h, where="extracted head", full=True)
        check_model(t, where="extracted tail", full=True)
    return h, t
