"""Large weights held once as arrays and shared by every onnxruntime session built from a model's parts.

The profiler and the fidelity runs build a head and a tail session per cut. With the weights inline,
each build copied them into the extracted sub-model, again into its serialised bytes, and once more
into onnxruntime: as much time as the session build itself, per segment. Instead a sub-model carries
a *stub* for each large weight (its name, type and shape, marked as external data at a location no
file has) and the session gets the arrays through ``SessionOptions.add_external_initializers``.
"""

from __future__ import annotations

import onnx

SHARED_LOCATION = "splitpoint-shared"  # never read from disk: the session builder supplies the arrays
WEIGHT_TYPES = frozenset(
    (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
)
MIN_ELEMENTS = 1024  # shapes, indices and small constants stay inline: onnxruntime reads them for shapes


def elements(t: onnx.TensorProto) -> int:
    """The number of elements ``t``'s shape declares."""
    n = 1
    for d in t.dims:
        n *= d
    return n


def shareable(t: onnx.TensorProto) -> bool:
    """A weight worth sharing: floating point, inline (external files stay as they are), not tiny.
    ``HasField``, not ``t.raw_data``: reading the field copies the weight's bytes (~0.14 s per 200 MB)."""
    if t.data_location == onnx.TensorProto.EXTERNAL or not (t.HasField("raw_data") or len(t.float_data)):
        return False
    return t.data_type in WEIGHT_TYPES and elements(t) >= MIN_ELEMENTS


def stub(t: onnx.TensorProto) -> onnx.TensorProto:
    """``t`` without its data: a reference to the shared array of the same name."""
    s = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=list(t.dims))
    s.data_location = onnx.TensorProto.EXTERNAL
    entry = s.external_data.add()
    entry.key, entry.value = "location", SHARED_LOCATION
    return s


def is_stub(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL and any(
        e.key == "location" and e.value == SHARED_LOCATION for e in t.external_data
    )


def _copy_fields(src: object, dst: object, skip: str) -> None:
    for f, v in src.ListFields():  # type: ignore[attr-defined]
        if f.name == skip:
            continue
        # protobuf 6+ names it is_repeated (``label`` is gone from the upb backend)
        if f.is_repeated if hasattr(f, "is_repeated") else f.label == f.LABEL_REPEATED:
            getattr(dst, f.name).extend(v)
        elif f.message_type is not None:
            getattr(dst, f.name).CopyFrom(v)
        else:
            setattr(dst, f.name, v)


def _without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of everything in ``model`` but its graph's initializers."""
    m = onnx.ModelProto()
    _copy_fields(model, m, "graph")
    _copy_fields(model.graph, m.graph, "initializer")
    return m


def with_stubs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose large weights are stubs, made without copying the weights: for work
    that reads a graph's structure and types only (shape inference takes ~1 s on AlexNet's 244 MB of
    weights, serialising them twice, and a few ms without them)."""
    m = _without_initializers(model)
    m.graph.initializer.extend(stub(t) if shareable(t) else t for t in model.graph.initializer)
    return m


def weights_as_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose large weights are graph inputs of the same type and shape, made without copying
    them: the ONNX checker checks a graph's structure and (full) shapes on it alike, without
    serialising the weights (seconds for a few hundred MB)."""
    m = _without_initializers(model)
    declared = {i.name for i in m.graph.input}  # models before IR 4 list their initializers as inputs
    for t in model.graph.initializer:
        if not shareable(t):
            m.graph.initializer.append(t)
        elif t.name not in declared:
            m.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return m
