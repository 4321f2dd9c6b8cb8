"""What a node reads, its control-flow subgraphs included: the one rule both the graph index (which
cuts) and model loading (which puts nodes in order) follow, kept below both so neither imports the other.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx


def subgraph_outer_refs(graph: onnx.GraphProto) -> set[str]:
    """Names a (sub)graph reads but does not define: its outer-scope dependencies."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.values.name for t in graph.sparse_initializer}  # a sparse tensor's name is its values'
    used: set[str] = set()
    for n in graph.node:
        used.update(i for i in node_inputs(n) if i)
        defined.update(n.output)
    used.update(o.name for o in graph.output)
    return used - defined


def is_constant(node: onnx.NodeProto) -> bool:
    """A standard Constant node (its value an attribute): onnxruntime makes it an initializer."""
    return node.op_type == "Constant" and node.domain in ("", "ai.onnx")


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """Explicit inputs plus outer-scope names read by the node's subgraphs (recursively)."""
    ins = [i for i in node.input if i]
    for attr in node.attribute:
        subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in subs:
            ins.extend(sorted(subgraph_outer_refs(g)))
    return ins


def iter_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node, those of subgraphs (If, Loop, Scan bodies) included."""
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from iter_nodes(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from iter_nodes(g)
