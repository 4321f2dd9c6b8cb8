"""Per-node multiply-accumulates and parameter counts, from inferred shapes.

MACs (not FLOPs) are what architecture papers tabulate as "FLOPs"; we report MACs and derive
FLOPs = 2 x MACs for the layers that dominate (Conv, Gemm, MatMul).
"""

from __future__ import annotations

import numpy as np

from .index import GraphIndex

BN_STATS_INPUTS = (3, 4)  # running mean / var: buffers, not parameters


def _per_sample(dims) -> int:
    if not dims or any(not isinstance(d, int) for d in dims[1:]):
        return 0
    return (
        int(np.prod(dims[1:], dtype=np.int64))
        if isinstance(dims[0], str)
        else int(np.prod(dims, dtype=np.int64))
    )


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
}
FLOAT_TYPES = (1, 10, 11, 16)  # float, float16, double, bfloat16


def node_macs(idx: GraphIndex, pos: int) -> int:
    n = idx.nodes[pos]
    if not n.output or n.output[0] not in idx.info:
        return 0
    out = idx.info[n.output[0]].dims
    out_elems = _per_sample(out)
    wi = CONV_WEIGHT.get(n.op_type)
    if wi is not None and len(n.input) > wi and n.input[wi] in idx.info:
        w = idx.info[n.input[wi]].dims
        if w is None or len(w) < 2 or any(not isinstance(d, int) for d in w):
            return 0
        k = int(np.prod(w[2:], dtype=np.int64))
        if n.op_type != "ConvTranspose":
            return out_elems * w[1] * k
        x = idx.info.get(n.input[0])
        return _per_sample(x.dims) * w[1] * k if x else 0
    if n.op_type in RECURRENT_GATES:
        return _recurrent_macs(idx, n)
    if n.op_type in MATMUL and n.input[0] in idx.info:
        a = idx.info[n.input[0]].dims
        if not a or not isinstance(a[-1], int):
            return 0
        trans_a = any(at.name == "transA" and at.i for at in n.attribute)
        kdim = a[-2] if (trans_a and len(a) >= 2) else a[-1]
        return out_elems * int(kdim)
    return 0


def _recurrent_macs(idx: GraphIndex, n) -> int:
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


def param_tensors(idx: GraphIndex, pos: int, depth: int = 0) -> list[str]:
    """Initializers a node reads that are learned parameters (float, rank >= 1, not BN stats; and a
    quantised model's integer weights and biases)."""
    n = idx.nodes[pos]
    quant = QUANT_PARAMS.get(n.op_type, ())
    names = []
    for k, name in enumerate(idx.node_ins[pos]):
        t = idx.initializers.get(name)
        if t is None:
            # a weight computed from initializers alone (a DequantizeLinear of int8 weights, a
            # transpose): the parameters are the initializers it was computed from
            src = idx.producer.get(name)
            if src is not None and src in idx.const and src != pos and depth < 4:
                names += param_tensors(idx, src, depth + 1)
            continue
        if not t.dims or (t.data_type not in FLOAT_TYPES and k not in quant):
            continue
        if n.op_type == "BatchNormalization" and k in BN_STATS_INPUTS:
            continue
        names.append(name)
    return names


def tensor_size(idx: GraphIndex, name: str) -> int:
    return int(np.prod(idx.initializers[name].dims, dtype=np.int64))


def count_params(idx: GraphIndex) -> int:
    seen = {t for p in range(len(idx.nodes)) for t in param_tensors(idx, p)}
    return sum(tensor_size(idx, t) for t in seen)


def count_macs(idx: GraphIndex) -> int:
    return sum(node_macs(idx, p) for p in range(len(idx.nodes)))
