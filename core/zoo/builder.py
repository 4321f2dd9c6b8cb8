"""A graph builder that writes ONNX nodes and, alongside, runs the same layers in numpy on a
calibration batch.

Seeded random weights alone make deep nets collapse or explode (activations shrink or grow
geometrically with depth). Running each layer numerically while building lets every
BatchNormalization carry the real statistics of its input, which is what a trained network's
BN folding does too: activations stay O(1) at every depth instead of vanishing or overflowing,
so a cut tensor has a range a codec can be measured on. How close the random models' cut tensors come
to a trained model's is measured on the trained zoo entries (``benchmarks/bench_trained.py``), not
assumed here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view
from onnx import TensorProto, helper, numpy_helper

from ..onnxio import BUILT_IR_VERSION

OPSET = 17


def _pad_nchw(x: np.ndarray, pads: tuple[int, int, int, int], value: float = 0.0) -> np.ndarray:
    top, left, bottom, right = pads
    if not any(pads):
        return x
    return np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=value)


def conv2d(x: np.ndarray, w: np.ndarray, stride: int, pad: int, groups: int) -> np.ndarray:
    """Reference NCHW convolution (im2col + matmul); only used while building models."""
    n, c, _, _ = x.shape
    o, cg, kh, kw = w.shape
    xp = _pad_nchw(x, (pad, pad, pad, pad))
    win = sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]  # N C Ho Wo kh kw
    ho, wo = win.shape[2], win.shape[3]
    if groups == 1:
        cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * kh * kw)
        out = cols @ w.reshape(o, -1).T
        return out.reshape(n, ho, wo, o).transpose(0, 3, 1, 2)
    if groups == c and cg == 1:
        mult = o // c
        wr = w.reshape(c, mult, kh, kw)
        out = np.einsum("nchwij,cmij->ncmhw", win, wr, optimize=True)
        return out.reshape(n, o, ho, wo)
    og = o // groups
    outs = [
        conv2d(x[:, g * cg : (g + 1) * cg], w[g * og : (g + 1) * og], stride, pad, 1) for g in range(groups)
    ]
    return np.concatenate(outs, axis=1)


def pool2d(x: np.ndarray, k: int, stride: int, pad: int, mode: str) -> np.ndarray:
    xp = _pad_nchw(x, (pad, pad, pad, pad), value=-np.inf if mode == "max" else 0.0)
    win = sliding_window_view(xp, (k, k), axis=(2, 3))[:, :, ::stride, ::stride]
    return win.max(axis=(4, 5)) if mode == "max" else win.mean(axis=(4, 5))


@dataclass
class ModelBuilder:
    """Accumulates nodes and initializers; ``values`` holds each tensor's calibration value."""

    name: str
    seed: int = 0
    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    values: dict = field(default_factory=dict)
    _count: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    # -- naming and registration -------------------------------------------------------------
    def fresh(self, prefix: str) -> str:
        k = self._count.get(prefix, 0)
        self._count[prefix] = k + 1
        return f"{prefix}_{k}"

    def init(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        self.values[name] = np.asarray(value)
        return name

    def node(self, op: str, ins: list[str], value: np.ndarray, prefix: str | None = None, **attrs) -> str:
        name = self.fresh(prefix or op.lower())
        self.nodes.append(helper.make_node(op, ins, [name], name=name, **attrs))
        self.values[name] = value.astype(np.float32, copy=False)
        return name

    def input(self, name: str, shape: tuple, calib: np.ndarray) -> str:
        dims = ["N", *shape]
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))
        self.values[name] = calib.astype(np.float32)
        return name

    def output(self, x: str) -> str:
        self.outputs.append((x, self.values[x].shape[1:]))
        return x

    # -- layers ------------------------------------------------------------------------------
    def conv(
        self,
        x: str,
        out_ch: int,
        k: int,
        stride: int = 1,
        pad: int | None = None,
        groups: int = 1,
        bias: bool = False,
        w: str | None = None,
    ) -> str:
        xv = self.values[x]
        in_ch = xv.shape[1]
        pad = k // 2 if pad is None else pad
        if w is None:
            fan_in = in_ch // groups * k * k
            wv = (self.rng.standard_normal((out_ch, in_ch // groups, k, k)) * np.sqrt(2.0 / fan_in)).astype(
                np.float32
            )
            w = self.init(self.fresh("W"), wv)
        wv = self.values[w]
        ins = [x, w]
        out = conv2d(xv, wv, stride, pad, groups)
        if bias:
            bv = (self.rng.standard_normal(out_ch) * 0.05).astype(np.float32)
            ins.append(self.init(self.fresh("B"), bv))
            out = out + bv[None, :, None, None]
        return self.node(
            "Conv",
            ins,
            out,
            prefix="conv",
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=[pad] * 4,
            group=groups,
        )

    def bn(self, x: str, gain: float = 1.0) -> str:
        """BatchNorm whose running statistics are the calibration batch's own."""
        xv = self.values[x]
        c = xv.shape[1]
        mean = xv.mean(axis=(0, 2, 3)).astype(np.float32)
        var = xv.var(axis=(0, 2, 3)).astype(np.float32)
        var = np.maximum(var, 1e-3 * float(var.mean()) + 1e-8)
        gamma = (gain * self.rng.uniform(0.8, 1.2, c)).astype(np.float32)
        beta = (self.rng.standard_normal(c) * 0.1 * gain).astype(np.float32)
        eps = 1e-5
        p = self.fresh("bn")
        ins = [
            x,
            self.init(p + "_scale", gamma),
            self.init(p + "_bias", beta),
            self.init(p + "_mean", mean),
            self.init(p + "_var", var),
        ]
        out = (xv - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + eps)
        out = out * gamma[None, :, None, None] + beta[None, :, None, None]
        return self.node("BatchNormalization", ins, out, prefix="bn", epsilon=eps)

    def relu(self, x: str) -> str:
        return self.node("Relu", [x], np.maximum(self.values[x], 0), prefix="relu")

    def relu6(self, x: str) -> str:
        lo = self._scalar("clip_min", 0.0)
        hi = self._scalar("clip_max", 6.0)
        return self.node("Clip", [x, lo, hi], np.clip(self.values[x], 0, 6), prefix="relu6")

    def _scalar(self, name: str, v: float) -> str:
        if name not in self.values:
            self.init(name, np.array(v, dtype=np.float32))
        return name

    def add(self, a: str, b: str) -> str:
        return self.node("Add", [a, b], self.values[a] + self.values[b], prefix="add")

    def maxpool(self, x: str, k: int, stride: int, pad: int = 0) -> str:
        out = pool2d(self.values[x], k, stride, pad, "max")
        return self.node(
            "MaxPool",
            [x],
            out,
            prefix="maxpool",
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=[pad] * 4,
        )

    def gap(self, x: str) -> str:
        out = self.values[x].mean(axis=(2, 3), keepdims=True)
        return self.node("GlobalAveragePool", [x], out, prefix="gap")

    def flatten(self, x: str) -> str:
        v = self.values[x]
        return self.node("Flatten", [x], v.reshape(v.shape[0], -1), prefix="flatten", axis=1)

    def concat(self, xs: list[str], axis: int = 1) -> str:
        return self.node(
            "Concat", xs, np.concatenate([self.values[x] for x in xs], axis=axis), prefix="concat", axis=axis
        )

    def gemm(self, x: str, out_f: int, target_std: float | None = None) -> str:
        """Fully connected layer. With ``target_std`` (a classifier) the bias centres each output
        on the calibration batch and the weights are rescaled to that standard deviation: logits
        of O(1) whose argmax depends on the input, as in a trained classifier, rather than one
        class winning for every input because of the features' shared mean."""
        xv = self.values[x]
        in_f = xv.shape[1]
        wv = (self.rng.standard_normal((out_f, in_f)) * np.sqrt(2.0 / in_f)).astype(np.float32)
        bv = (self.rng.standard_normal(out_f) * 0.01).astype(np.float32)
        out = xv @ wv.T + bv
        if target_std is not None:
            bv = -(xv @ wv.T).mean(axis=0).astype(np.float32)
            out = xv @ wv.T + bv
            s = target_std / max(float(out.std()), 1e-8)
            wv, bv = (wv * s).astype(np.float32), (bv * s).astype(np.float32)
            out = xv @ wv.T + bv
        ins = [x, self.init(self.fresh("fc_W"), wv), self.init(self.fresh("fc_B"), bv)]
        return self.node("Gemm", ins, out, prefix="fc", transB=1)

    # -- result ------------------------------------------------------------------------------
    def build(self, doc: str = "") -> onnx.ModelProto:
        outs = [
            helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", *shape]) for n, shape in self.outputs
        ]
        graph = helper.make_graph(self.nodes, self.name, self.inputs, outs, self.initializers)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="splitpoint.core.zoo",
            doc_string=doc,
        )
        model.ir_version = BUILT_IR_VERSION
        onnx.checker.check_model(model)
        return model
