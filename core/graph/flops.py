"""Per-node multiply-accumulates and parameter counts, from inferred shapes.

MACs (not FLOPs) are what architecture papers tabulate as "FLOPs"; we report MACs and derive
FLOPs = 2 x MACs for the layers that dominate (Conv, Gemm, MatMul).
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import MutableMapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from ..subgraphs import is_constant
from .index import GraphIndex, TensorInfo

BN_STATS_INPUTS = (3, 4)  # running mean / var: buffers, not parameters


def _per_sample(t: TensorInfo | None) -> int:
    """Elements for one sample (0 where unknown): the batch's dim does not count, wherever it is."""
    if t is None or not t.dims:
        return 0
    if t.batch_axis is not None:
        return t.per_sample_elements() or 0
    lead = isinstance(t.dims[0], str)  # a symbolic leading dim is the batch, times its rows per sample
    rest = t.dims[1:] if lead else t.dims
    ints = [d for d in rest if isinstance(d, int)]
    return int(np.prod(ints, dtype=np.int64)) * (t.rows if lead else 1) if len(ints) == len(rest) else 0


# where each heavy op reads its weight (convolutions) or its left operand (matrix products): the
# quantised and fused forms cost what their float originals do, and an already-quantised model (QDQ
# fused by onnxruntime, QOperator, dynamic) must not read as a model of no work
CONV_WEIGHT = {
    "Conv": 1,
    "ConvTranspose": 1,
    "ConvInteger": 1,
    "QLinearConv": 3,
    "FusedConv": 1,
    "NhwcConv": 1,
}
MATMUL = (
    "Gemm",
    "MatMul",
    "MatMulInteger",
    "QLinearMatMul",
    "FusedGemm",
    "FusedMatMul",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "QGemm",
)
RECURRENT_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
# integer initializers that are a quantised model's learned weights (and int32 biases): the input
# positions per op; a DequantizeLinear's input 0 is its weight where it is an initializer
QUANT_PARAMS = {
    "QLinearConv": (3, 8),
    "QLinearMatMul": (3,),
    "ConvInteger": (1,),
    "MatMulInteger": (1,),
    "DequantizeLinear": (0,),
    "MatMulNBits": (1,),
    "DynamicQuantizeMatMul": (1,),
    "MatMulIntegerToFloat": (1,),
    "QGemm": (3, 6),
}
FLOAT_TYPES = (1, 10, 11, 16)  # float, float16, double, bfloat16


@dataclass
class _Body:
    """A control-flow body seen as node_macs sees a graph: its nodes, and the types of what they read
    (the body's own first, then the main graph's that it reads from outside)."""

    nodes: list
    info: MutableMapping
    body_info: dict
    initializers: dict


def _graph_macs(idx: GraphIndex | _Body, g: onnx.GraphProto) -> int:
    view = _Body(list(g.node), ChainMap(idx.body_info, idx.info), idx.body_info, idx.initializers)
    return sum(node_macs(view, p) for p in range(len(view.nodes)))


def _constant_int(idx: GraphIndex | _Body, name: str) -> int | None:
    t = idx.initializers.get(name)
    if t is None:
        return None
    v = numpy_helper.to_array(t)
    return int(v.reshape(-1)[0]) if v.size == 1 and v.dtype.kind in "iu" else None


def _control_macs(idx: GraphIndex | _Body, n) -> int:
    """A Loop's body times its trip count (where it is a constant; else once), the larger branch of an
    If, a Scan's body times the length of its first scanned input: the work is in the body, and a node
    counted as none made every cut before it look free of work (``splitpoint cuts``, and the profile's
    fallback when kernel times cannot be attributed)."""
    bodies = {a.name: a.g for a in n.attribute if a.type == onnx.AttributeProto.GRAPH}
    if n.op_type == "If":
        return max((_graph_macs(idx, g) for g in bodies.values()), default=0)
    body = bodies.get("body")
    if body is None:
        return 0
    times = 1
    if n.op_type == "Loop" and n.input and n.input[0]:
        times = max(1, _constant_int(idx, n.input[0]) or 1)
    elif n.op_type == "Scan":
        scans = next((a.i for a in n.attribute if a.name == "num_scan_inputs"), 0)
        axes = next((list(a.ints) for a in n.attribute if a.name == "scan_input_axes"), [])
        first = n.input[len(n.input) - scans] if 0 < scans <= len(n.input) else None
        info = idx.info.get(first) if first else None
        axis = axes[0] if axes else 0
        if info is not None and info.dims and -len(info.dims) <= axis < len(info.dims):
            d = info.dims[axis]
            times = d if isinstance(d, int) and d > 0 else 1
    return times * _graph_macs(idx, body)


def node_macs(idx: GraphIndex | _Body, pos: int) -> int:
    n = idx.nodes[pos]
    if n.op_type in ("Loop", "If", "Scan"):
        return _control_macs(idx, n)
    if not n.output or n.output[0] not in idx.info:
        return 0
    out_elems = _per_sample(idx.info[n.output[0]])
    wi = CONV_WEIGHT.get(n.op_type)
    if wi is not None and len(n.input) > wi and n.input[wi] in idx.info:
        w = idx.info[n.input[wi]].dims
        if w is None or len(w) < 2 or any(not isinstance(d, int) for d in w):
            return 0
        k = int(np.prod(w[2:], dtype=np.int64))
        if n.op_type != "ConvTranspose":
            return out_elems * w[1] * k
        x = idx.info.get(n.input[0])
        return _per_sample(x) * w[1] * k if x else 0
    if n.op_type in RECURRENT_GATES:
        return _recurrent_macs(idx, n)
    if n.op_type == "Attention" and n.domain == "com.microsoft":
        return _attention_macs(idx, n)
    if n.op_type in ("Attention", "GroupQueryAttention", "MultiHeadAttention"):
        return _scores_macs(idx, n)
    if n.op_type == "GridSample":  # each output element interpolates 2 (linear) or 4 (cubic) taps per axis
        mode = next((a.s.decode() for a in n.attribute if a.name == "mode"), "linear")
        out = idx.info[n.output[0]].dims or []
        taps = {"nearest": 0, "bicubic": 4, "cubic": 4}.get(mode, 2) ** max(len(out) - 2, 0)
        return out_elems * taps
    if n.op_type == "Einsum":  # a full contraction ("ij,ij->") has one element, not none
        return _einsum_macs(idx, n, out_elems or int(idx.info[n.output[0]].dims == []))
    if n.op_type in MATMUL and n.input[0] in idx.info:
        a = idx.info[n.input[0]].dims
        if not a or not isinstance(a[-1], int):
            return 0
        trans_a = any(at.name == "transA" and at.i for at in n.attribute)
        kdim = a[-2] if (trans_a and len(a) >= 2) else a[-1]
        return out_elems * int(kdim)
    return 0


def _einsum_macs(idx: GraphIndex | _Body, n, out_elems: int) -> int:
    """An Einsum per sample: each output element sums over the letters the output drops (a "bhqd,bhkd->bhqk"
    attention's d). Exports write attention and bilinear layers so; uncounted, their work read as none."""
    eq = next((a.s.decode() for a in n.attribute if a.name == "equation"), "").replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(n.input) or not out_elems:
        return 0
    letters = [c for t in terms for c in t.replace("...", "") if c.isalpha()]
    kept = set(rhs) if arrow else {c for c in letters if letters.count(c) == 1}
    sizes: dict[str, int] = {}
    for term, name in zip(terms, n.input, strict=True):
        t = idx.info.get(name)
        if t is None or t.dims is None:
            return 0
        # letters after an ellipsis count from the end, where the ellipsis stands for the leading dims
        head, _, tail = term.partition("...")
        dims = list(t.dims[: len(head)]) + (list(t.dims[len(t.dims) - len(tail) :]) if tail else [])
        for c, d in zip(head + tail, dims, strict=False):
            if isinstance(d, int):
                sizes[c] = d
    summed = {c for c in letters if c not in kept}
    if not summed or any(c not in sizes for c in summed):
        return 0  # nothing summed: a transpose, a diagonal or an elementwise product, as Transpose and Mul
    return out_elems * int(np.prod([sizes[c] for c in summed], dtype=np.int64))


def _attention_macs(idx: GraphIndex | _Body, n) -> int:
    """onnxruntime's fused attention (com.microsoft Attention, as its transformer optimiser writes a BERT's
    layers) per sample: the Q, K and V projections of the [batch, tokens, hidden] input by one [hidden,
    Q + K + V] weight, then the scores and their weighted sum over the tokens (a cache's past tokens not
    counted). Uncounted, a fused BERT's share of work read as its feed-forward layers' alone."""
    x = idx.info.get(n.input[0])
    w = idx.info.get(n.input[1]) if len(n.input) > 1 else None
    if x is None or w is None or not x.dims or not w.dims or len(x.dims) != 3 or len(w.dims) != 2:
        return 0
    tokens, hidden, width = x.dims[1], x.dims[2], w.dims[1]
    if not all(isinstance(d, int) for d in (tokens, hidden, width)):
        return 0
    sizes = next((list(a.ints) for a in n.attribute if a.name == "qkv_hidden_sizes"), [])
    q, _, v = sizes if len(sizes) == 3 else [width // 3] * 3
    return tokens * hidden * width + tokens * tokens * (q + v)


def _scores_macs(idx: GraphIndex | _Body, n) -> int:
    """Attention given its projections (ONNX's Attention from opset 23, onnxruntime's GroupQueryAttention and
    MultiHeadAttention) per sample: the scores (Q·Kᵀ) and their weighted sum of V, over every key position
    (the present cache's where its length is known, else the keys given). Counted as none, an opset-23
    export's attention read as no work beside the decomposed export's MatMuls."""
    out = idx.info.get(n.output[0]) if n.output else None
    present = idx.info.get(n.output[1]) if len(n.output) > 1 and n.output[1] else None
    key = idx.info.get(n.input[1]) if len(n.input) > 1 and n.input[1] else None
    if present is not None and present.dims and len(present.dims) == 4 and isinstance(present.dims[2], int):
        keys = present.dims[2]
    elif key is not None and key.dims and len(key.dims) in (3, 4):
        keys = key.dims[2] if len(key.dims) == 4 else key.dims[1]
    elif out is not None and out.dims and len(out.dims) == 3:
        keys = out.dims[1]  # packed Q, K and V with no cache length known: the new tokens' own
    else:
        return 0
    if not isinstance(keys, int) or out is None:
        return 0
    q = idx.info.get(n.input[0])
    if n.domain == "" and q is not None and _per_sample(q):
        return keys * (_per_sample(q) + _per_sample(out))  # Q·Kᵀ over Q's width, then A·V over the output's
    return 2 * keys * _per_sample(out)


def _recurrent_macs(idx: GraphIndex | _Body, n) -> int:
    """LSTM/GRU/RNN per sample: every step multiplies the input and the hidden state by each gate's
    weights, in each direction (W: [directions, gates x hidden, input], R: [.., .., hidden])."""
    x, w, r = (idx.info.get(n.input[i]) if len(n.input) > i else None for i in range(3))
    if x is None or w is None or r is None or not x.dims or len(x.dims) != 3:
        return 0
    layout = next((a.i for a in n.attribute if a.name == "layout"), 0)
    seq = x.dims[1] if layout else x.dims[0]
    dims = [*w.dims[:3], r.dims[2]] if w.dims and r.dims and len(w.dims) == 3 and len(r.dims) == 3 else []
    if not isinstance(seq, int) or len(dims) != 4 or any(not isinstance(d, int) for d in dims):
        return 0
    directions, gates_hidden, inputs, hidden = dims
    return seq * directions * gates_hidden * (inputs + hidden)


def constant_value(idx: GraphIndex, name: str) -> onnx.TensorProto | None:
    """The tensor a Constant node holds as ``name`` (its ``value``), where one makes it: older exporters
    wrote every weight so, and none of them counted as a parameter or as the head's memory (ResNet-50 as
    896 parameters, 20 MiB predicted for a head that took 243 MiB)."""
    src = idx.producer.get(name)
    if src is None or src not in idx.const:
        return None
    n = idx.nodes[src]
    if not is_constant(n):
        return None
    return next(
        (a.t for a in n.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None
    )


def param_tensors(idx: GraphIndex, pos: int, depth: int = 0) -> list[str]:
    """Initializers a node reads that are learned parameters (float, rank >= 1, not BN stats; and a
    quantised model's integer weights and biases)."""
    n = idx.nodes[pos]
    quant = QUANT_PARAMS.get(n.op_type, ())
    names = []
    for k, name in enumerate(idx.node_ins[pos]):
        t = idx.initializers.get(name)
        if t is None:
            t = constant_value(idx, name)
        if t is None:
            # a weight computed from initializers alone (a DequantizeLinear of int8 weights, a
            # transpose): the parameters are the initializers it was computed from
            src = idx.producer.get(name)
            if src is not None and src in idx.const and src != pos and depth < 4:
                made = param_tensors(idx, src, depth + 1)
                info = idx.info.get(name)
                stats = n.op_type == "BatchNormalization" and k in BN_STATS_INPUTS
                # made by constant nodes from no float initializer (a ConstantOfShape that fills a
                # weight's shape): the tensor itself is the parameter
                if (
                    not made
                    and not stats
                    and info is not None
                    and info.dims
                    and info.elem_type in FLOAT_TYPES
                ):
                    made = [name]
                names += made
            continue
        if not t.dims or (t.data_type not in FLOAT_TYPES and k not in quant):
            continue
        if n.op_type == "BatchNormalization" and k in BN_STATS_INPUTS:
            continue
        names.append(name)
    return names


def tensor_size(idx: GraphIndex, name: str) -> int:
    t = idx.initializers.get(name) or constant_value(idx, name)
    if t is not None:
        return int(np.prod(t.dims, dtype=np.int64))
    dims = idx.info[name].dims if name in idx.info else None
    return int(np.prod(dims, dtype=np.int64)) if dims and all(isinstance(d, int) for d in dims) else 0


def count_params(idx: GraphIndex) -> int:
    seen = {t for p in range(len(idx.nodes)) for t in param_tensors(idx, p)}
    return sum(tensor_size(idx, t) for t in seen)


def count_macs(idx: GraphIndex) -> int:
    return sum(node_macs(idx, p) for p in range(len(idx.nodes)))
