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


def shareable(t: onnx.TensorProto) -> bool:
    """A weight worth sharing: floating point, inline (external files stay as they are), not tiny."""
    if t.data_location == onnx.TensorProto.EXTERNAL or not (t.raw_data or t.float_data):
        return False
    n = 1
    for d in t.dims:
        n *= d
    return t.data_type in WEIGHT_TYPES and n >= MIN_ELEMENTS


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
