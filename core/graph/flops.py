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


def node_macs(idx: GraphIndex, pos: int) -> int:
    n = idx.nodes[pos]
    if not n.output or n.output[0] not in idx.info:
        return 0
    out = idx.info[n.output[0]].dims
    out_elems = _per_sample(out)
    if n.op_type in ("Conv", "ConvTranspose") and len(n.input) > 1 and n.input[1] in idx.info:
        w = idx.info[n.input[1]].dims
        if w is None or any(not isinstance(d, int) for d in w):
            return 0
        k = int(np.prod(w[2:], dtype=np.int64))
        if n.op_type == "Conv":
            return out_elems * w[1] * k
        x = idx.info.get(n.input[0])
        return _per_sample(x.dims) * w[1] * k if x else 0
    if n.op_type in ("Gemm", "MatMul") and n.input[0] in idx.info:
        a = idx.info[n.input[0]].dims
        if not a or not isinstance(a[-1], int):
            return 0
        trans_a = any(at.name == "transA" and at.i for at in n.attribute)
        kdim = a[-2] if (trans_a and len(a) >= 2) else a[-1]
        return out_elems * int(kdim)
    return 0


def param_tensors(idx: GraphIndex, pos: int) -> list[str]:
    """Initializers a node reads that are learned parameters (float, rank >= 1, not BN stats)."""
    n = idx.nodes[pos]
    names = []
    for k, name in enumerate(idx.node_ins[pos]):
        t = idx.initializers.get(name)
        if t is None or not t.dims or t.data_type not in (1, 10, 11, 16):
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
