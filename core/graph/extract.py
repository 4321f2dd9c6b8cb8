"""Head and tail sub-models for a cut.

Written here rather than with ``onnx.utils.Extractor``, which accepts invalid boundaries by
silently pulling head nodes into the tail, and drops subgraph outer-scope references and
model-local functions.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from splitpoint.core.errors import ModelError
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

    def vi(name: str) -> onnx.ValueInfoProto:
        # the model's own inputs as given (their shapes fixed by --input-shape); everything else from the
        # index, whose shapes come from the graph, never from the exporter's value_info (often stale)
        return original_inputs[name] if name in original_inputs else idx.tensor(name).value_info()

    graph = helper.make_graph(nodes, name, [vi(i) for i in inputs], [vi(o) for o in outputs], inits)
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


def verify_split(
    head: onnx.ModelProto, tail: onnx.ModelProto, feeds: dict[str, np.ndarray], where: str = "the split"
) -> onnx.ModelProto:
    """Run the head once and the tail on what it produced. A cut tensor whose declared dimension the run
    contradicts is declared free instead (the tail returned is corrected); a split that still does not
    rejoin is refused with onnxruntime's reason, before any plan is written."""
    from splitpoint.core.runner import make_session

    try:
        hs = make_session(head.SerializeToString(), threads=1)
        produced = dict(
            zip(
                [o.name for o in hs.get_outputs()],
                hs.run(None, {i.name: feeds[i.name] for i in hs.get_inputs()}),
                strict=True,
            )
        )
    except Exception as exc:  # onnxruntime's own error types
        raise ModelError(f"{where}: the head does not run: {type(exc).__name__}: {str(exc)[:300]}") from exc
    fixed = onnx.ModelProto()
    fixed.CopyFrom(tail)
    for vi in fixed.graph.input:
        got = produced.get(vi.name, feeds.get(vi.name))
        if got is None or not vi.type.HasField("tensor_type"):
            continue
        dims = vi.type.tensor_type.shape.dim
        if len(dims) != got.ndim:
            vi.type.tensor_type.ClearField("shape")
            continue
        for k, d in enumerate(dims):
            if d.HasField("dim_value") and d.dim_value != got.shape[k]:
                d.Clear()
                d.dim_param = f"d{k}"
    try:
        ts = make_session(fixed.SerializeToString(), threads=1)
        ts.run(
            None,
            {i.name: (produced[i.name] if i.name in produced else feeds[i.name]) for i in ts.get_inputs()},
        )
    except Exception as exc:
        raise ModelError(
            f"{where}: the tail does not run on the head's output: {type(exc).__name__}: {str(exc)[:300]}"
        ) from exc
    return fixed
