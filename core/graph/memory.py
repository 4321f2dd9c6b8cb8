"""Edge memory a head needs, derived from the graph: weights and the activations alive at once.

The profiler adds to them the session's own overhead, measured as RSS at its anchor cuts; the planner
uses the weight bytes to size int8 heads.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import onnx

from splitpoint.core.weights import nbytes

from .flops import constant_value, tensor_size
from .index import GraphIndex


def live_activation_peaks(idx: GraphIndex) -> list[int]:
    """For each prefix of the compute order, peak bytes of activations alive at once in the head
    (derived from shapes; per sample)."""
    return list(itertools.accumulate(live_activation_bytes(idx), max))


def segment_activation_peaks(idx: GraphIndex, positions: Sequence[int]) -> np.ndarray:
    """(m, m): peak bytes alive at once while the nodes from compute position ``positions[i]`` to
    ``positions[i']`` run (per sample; 0 where i' <= i). What passes over a segment to a later one is
    alive in it too: on a chain the device forwards it."""
    live = np.asarray(live_activation_bytes(idx), float)
    m = len(positions)
    out = np.zeros((m, m))
    for i, a in enumerate(positions):
        running = np.maximum.accumulate(live[a:]) if a < len(live) else np.zeros(0)
        for j in range(i + 1, m):
            b = positions[j]
            if b > a:
                out[i, j] = running[b - a - 1]
    return out


def live_activation_bytes(idx: GraphIndex) -> list[int]:
    """For each node of the compute order, the bytes of activations alive while it runs: its inputs and
    outputs and whatever a later node still needs (derived from shapes; per sample)."""
    order = idx.compute
    last_use: dict[str, int] = {}
    for r, p in enumerate(order):
        for t in idx.node_ins[p]:
            last_use[t] = r

    def size(t: str) -> int:
        info = idx.info.get(t)
        b = info.bytes_per_sample() if info is not None else None
        return b or 0

    live = {t: size(t) for t in idx.inputs}
    cur = sum(live.values())
    during = []
    for r, p in enumerate(order):
        for o in idx.nodes[p].output:
            if o:
                live[o] = size(o)
                cur += live[o]
        during.append(cur)
        for t in [t for t in live if last_use.get(t, -1) <= r and t not in idx.outputs]:
            cur -= live.pop(t)
    return during


def weight_bytes_by_prefix(idx: GraphIndex, only: int | None = None) -> list[int]:
    """Weight bytes the head needs, for each prefix of the compute order: the initializers its nodes read,
    and the constants they read (a Constant node's tensor; a weight computed from initializers, which
    onnxruntime folds into one of the computed size). ``only``: those of this element type alone (an
    ``onnx.TensorProto`` data type), counted where the weight is stored as such."""
    seen: set[str] = set()
    total = 0
    out = []
    for p in idx.compute:
        for t in idx.node_ins[p]:
            if t in seen:
                continue
            if t in idx.initializers:
                if only is None or idx.initializers[t].data_type == only:
                    total += nbytes(idx.initializers[t])
            elif idx.producer.get(t) in idx.const:
                total += _constant_bytes(idx, t, only)
            seen.add(t)
        out.append(total)
    return out


def _np_name(data_type: int) -> str:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).name


def _constant_bytes(idx: GraphIndex, name: str, only: int | None = None) -> int:
    """A constant's bytes: those of the weights it is computed from (an int8 weight a DequantizeLinear
    reads stays int8 in onnxruntime's fused kernels, a transposed weight is folded at its own size), or,
    where nothing but shapes and Constant nodes make it (a ConstantOfShape filling a weight's shape), its
    own size. ``only``: of the weights of that element type alone (an int8 weight behind a
    DequantizeLinear is no float32 weight, whatever the constant's own type)."""

    def counted(t: onnx.TensorProto) -> int:
        return nbytes(t) if only is None or t.data_type == only else 0

    value = constant_value(idx, name)
    if value is not None:
        return counted(value)
    sources, found, stack, seen = 0, False, [name], set()
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        init = idx.initializers.get(t)
        if init is not None:
            if init.dims and init.data_type != onnx.TensorProto.INT64:  # not a shape
                sources, found = sources + counted(init), True
            continue
        const = constant_value(idx, t)
        if const is not None and const.dims and const.data_type != onnx.TensorProto.INT64:
            sources, found = sources + counted(const), True
        src = idx.producer.get(t)
        if src is not None and src in idx.const:
            stack.extend(idx.node_ins[src])
    if found:
        return sources
    info = idx.info.get(name)
    if info is None or (only is not None and info.dtype != _np_name(only)):
        return 0
    return tensor_size(idx, name) * info.itemsize
