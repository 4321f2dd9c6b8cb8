"""An onnxruntime-genai export as a decoder split reads it.

onnxruntime-genai's model builder writes two things no other exporter does, and a split between layers
needs neither:
- the residual add of each layer fused with the next norm (com.microsoft SkipSimplifiedLayerNormalization,
  or SkipLayerNormalization): one node makes both the stream and its norm, so no single tensor separates the
  layers. Each becomes its add and its norm (onnxruntime's SimplifiedLayerNormalization or ONNX's
  LayerNormalization), which compute the same values: the sum is the boundary;
- the caches' head size as a symbol (``kv_cache_dim``), though the attention's weights fix it: it is read
  from them and declared.
"""

from __future__ import annotations

import onnx
from onnx import helper

from splitpoint.core.plan import PAST_RE

from .decodercut import PRESENT_RE

_SKIP_NORMS = {
    "SkipSimplifiedLayerNormalization": "SimplifiedLayerNormalization",
    "SkipLayerNormalization": "LayerNormalization",
}


def as_decoder(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its fused residual norms taken apart and its caches' head size declared (changed in
    place, and returned)."""
    _unfuse_skip_norms(model)
    _declare_head_size(model)
    return model


def _unfuse_skip_norms(model: onnx.ModelProto) -> None:
    g = model.graph
    read = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    out: list[onnx.NodeProto] = []
    for k, n in enumerate(g.node):
        norm = _SKIP_NORMS.get(n.op_type) if n.domain == "com.microsoft" else None
        # its mean and inverse deviation (outputs 1, 2) have no place in the two nodes: left fused if read
        if norm is None or any(o and o in read for o in list(n.output)[1:3]) or len(n.input) < 3:
            out.append(n)
            continue
        simplified = n.op_type == "SkipSimplifiedLayerNormalization"
        stem = n.name or f"{n.op_type}_{k}"
        bias = n.input[3] if simplified and len(n.input) > 3 else (n.input[4] if len(n.input) > 4 else "")
        total = n.output[3] if len(n.output) > 3 and n.output[3] else f"{stem}/input_skip_sum"
        first = f"{stem}/input_skip" if bias else total
        out.append(helper.make_node("Add", [n.input[0], n.input[1]], [first], name=f"{stem}/Add"))
        if bias:
            out.append(helper.make_node("Add", [first, bias], [total], name=f"{stem}/AddBias"))
        eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-12)  # onnxruntime's default
        ins = [total, n.input[2]] + ([] if simplified or len(n.input) < 4 or not n.input[3] else [n.input[3]])
        made = helper.make_node(norm, ins, [n.output[0]], name=f"{stem}/Norm", axis=-1, epsilon=eps)
        if simplified:
            made.attribute.append(helper.make_attribute("stash_type", 1))
        out.append(made)
    if len(out) != len(g.node):
        del g.node[:]
        g.node.extend(out)


def _declare_head_size(model: onnx.ModelProto) -> None:
    """The caches' symbolic head size, from the attention that reads layer 0's key cache."""
    g = model.graph
    caches = [v for v in [*g.input, *g.output] if PAST_RE.match(v.name) or PRESENT_RE.match(v.name)]
    symbols = {
        d.dim_param
        for v in caches
        for i, d in enumerate(v.type.tensor_type.shape.dim)
        if i == 3 and d.dim_param and not d.HasField("dim_value")
    }
    if len(symbols) != 1:
        return
    size = _head_size(model)
    if size is None:
        return
    (symbol,) = symbols
    for v in [*g.input, *g.output, *g.value_info]:
        if v.type.HasField("tensor_type"):
            for d in v.type.tensor_type.shape.dim:
                if d.dim_param == symbol:
                    d.dim_value = size  # clears the symbol: one field of a oneof


def _head_size(model: onnx.ModelProto) -> int | None:
    """Per head: the query's width over the heads (GroupQueryAttention packs query, key and value in one
    input where its key input is empty), the width read off the projection's weights."""
    g = model.graph
    node = next(
        (
            n
            for n in g.node
            if n.domain == "com.microsoft"
            and n.op_type in ("GroupQueryAttention", "MultiHeadAttention")
            and "past_key_values.0.key" in n.input
        ),
        None,
    )
    if node is None:
        return None
    attrs = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
    heads, kv_heads = attrs.get("num_heads", 0), attrs.get("kv_num_heads", attrs.get("num_heads", 0))
    width = _width(g, node.input[0])
    if not heads or width is None:
        return None
    packed = node.op_type == "GroupQueryAttention" and (len(node.input) < 2 or not node.input[1])
    parts = heads + 2 * kv_heads if packed else heads
    return width // parts if width % parts == 0 else None


def _width(g: onnx.GraphProto, name: str, depth: int = 0) -> int | None:
    """The last dimension of a projection's output: a MatMul's weight's columns, MatMulNBits' N, through
    a bias add."""
    producer = next((n for n in g.node if name in n.output), None)
    inits = {t.name: t for t in g.initializer}
    if producer is None or depth > 3:
        return None
    if producer.op_type == "MatMulNBits":
        return next((a.i for a in producer.attribute if a.name == "N"), None)
    if producer.op_type == "MatMul" and len(producer.input) > 1 and producer.input[1] in inits:
        dims = inits[producer.input[1]].dims
        return int(dims[-1]) if dims else None
    if producer.op_type == "Add":
        for i in producer.input:
            if i not in inits:
                return _width(g, i, depth + 1)
    return None
