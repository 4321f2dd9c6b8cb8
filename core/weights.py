"""Large weights held once as arrays and shared by every onnxruntime session built from a model's parts.

The profiler and the fidelity runs build a head and a tail session per cut. With the weights inline,
each build copied them into the extracted sub-model, again into its serialised bytes, and once more
into onnxruntime: as much time as the session build itself, per segment. Instead a sub-model carries
a *stub* for each large weight (its name, type and shape, marked as external data at a location no
file has) and the session gets the arrays through ``SessionOptions.add_external_initializers``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np
import onnx

from .errors import ModelError

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


def nbytes(t: onnx.TensorProto) -> int:
    """The bytes of data ``t``'s type and shape declare (wherever the data is, or none)."""
    return elements(t) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


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
        if not (shareable(t) or is_stub(t)):
            m.graph.initializer.append(t)
        elif t.name not in declared:
            m.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return m


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(message: type, name: str) -> bytes:
    """The key of a length-delimited field of ``message`` (wire type 2)."""
    return _varint(message.DESCRIPTOR.fields_by_name[name].number << 3 | 2)  # type: ignore[attr-defined]


def serialized_with_weights(
    model: onnx.ModelProto, weights: Callable[[str], np.ndarray]
) -> list[bytes | memoryview]:
    """The bytes of ``model`` with its stubs filled from ``weights``, in pieces that are written or
    hashed one after the other: the model without its stubs, then each weight as a record of its own
    whose data is the shared array's memory, never copied.

    Protobuf merges a message field that occurs more than once, so every record ``graph { initializer {
    ... } }`` after the model adds one initializer to the same graph: the file parses as the model with
    its weights inline. Filling the stubs and serialising costs two copies of the weights, 0.7 s of a 2 s
    split plan on AlexNet's 244 MB."""
    if sys.byteorder != "little":  # raw_data is little-endian; the arrays are the machine's order
        return [with_weights(model, weights).SerializeToString()]
    light = _without_initializers(model)
    light.graph.initializer.extend(t for t in model.graph.initializer if not is_stub(t))
    pieces: list[bytes | memoryview] = [light.SerializeToString()]
    graph_key = _field(onnx.ModelProto, "graph")
    init_key = _field(onnx.GraphProto, "initializer")
    raw_key = _field(onnx.TensorProto, "raw_data")
    for t in model.graph.initializer:
        if not is_stub(t):
            continue
        array = np.ascontiguousarray(weights(t.name))
        data = memoryview(array.reshape(-1).view(np.uint8).data)
        if len(data) != nbytes(t):
            raise ModelError(f"the array for weight {t.name!r} does not match its stub's type and shape")
        head = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=list(t.dims)).SerializeToString()
        tensor = head + raw_key + _varint(len(data))
        tensor_len = len(tensor) + len(data)
        graph = init_key + _varint(tensor_len) + tensor
        pieces.append(graph_key + _varint(len(graph) + len(data)) + graph)
        pieces.append(data)
    return pieces


def with_weights(model: onnx.ModelProto, weights: Callable[[str], np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` with its stubs replaced by the weights themselves, inline."""
    from onnx import numpy_helper

    m = _without_initializers(model)
    m.graph.initializer.extend(
        numpy_helper.from_array(weights(t.name), t.name) if is_stub(t) else t for t in model.graph.initializer
    )
    return m


def stubbed_bytes(model: onnx.ModelProto) -> int:
    """The bytes of the weights ``model`` holds as stubs."""
    return sum(nbytes(t) for t in model.graph.initializer if is_stub(t))
