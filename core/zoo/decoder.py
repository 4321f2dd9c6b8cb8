"""Decoder-only transformers (GPT-2 layout) built with ``onnx.helper``, with a KV cache as graph inputs and
outputs, so that autoregressive models can be profiled, cut between layers and decoded step by step.

Names follow onnxruntime-genai, so a real decoder exported with the same names loads alike:
``input_ids`` [batch, sequence] int64, ``past_key_values.{i}.key`` / ``.value`` [batch, heads, past,
head_dim] in, ``logits`` [batch, sequence, vocab] and ``present.{i}.key`` / ``.value`` [batch, heads,
past + sequence, head_dim] out. A model derives the positions of its new tokens and the causal mask from
the past length it is given (the third dimension of the first layer's past key), so a prefill is a call
with an empty past and a decode step is a call with one token.

Random weights are made to behave like a trained LLM where that matters to a cut-tensor codec:

- a few residual-stream channels (``outliers``, default 4) carry activations of large magnitude
  (``outlier_scale``, default 60× the other channels' standard deviation in the embedding, one sign per
  channel), as the outlier features of real decoders do (LLM.int8() reports magnitudes up to ~20× and
  more); the LayerNorm gains on those channels are 1/``outlier_scale`` inside the layers and 0 in the
  final one, so the outliers ride the residual stream without deciding each layer's input or the next
  token. Per-token int8/int4 of a hidden state with such channels loses most of the other channels'
  resolution, which is what keeping the outlier channels exact fixes.
- the output head is the token embedding with its rows permuted, times one scale: it behaves as an
  untied head (a token does not predict itself, as a tied head on random weights would) while the model
  keeps GPT-2's parameter count (124,439,808 for ``gpt2``); the scale is measured at build time so that
  the mean top-1 next-token probability on a random prompt is ``top1`` (default 0.5): a distribution as
  peaked as a trained model's often is, so greedy decoding is not decided by rounding noise.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..onnxio import BUILT_IR_VERSION

OPSET = 17  # LayerNormalization; GELU written out (tanh form, as GPT-2 uses), opset 20's Gelu not needed


@dataclass(frozen=True)
class DecoderSpec:
    """The architecture; ``gpt2`` is GPT-2 small (Radford et al. 2019, Hugging Face ``gpt2``)."""

    layers: int
    d_model: int
    heads: int
    vocab: int
    n_ctx: int
    d_ff: int
    outliers: int = 4
    outlier_scale: float = 60.0
    top1: float = 0.5  # the head's scale is set so that the mean next-token top-1 probability is this

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    def params(self) -> int:
        """Parameters as GPT-2 counts them (tied head: the embedding counted once)."""
        d, f = self.d_model, self.d_ff
        per_layer = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + (d * f + f) + (f * d + d)
        return self.vocab * d + self.n_ctx * d + self.layers * per_layer + 2 * d


GPT2 = DecoderSpec(layers=12, d_model=768, heads=12, vocab=50257, n_ctx=1024, d_ff=3072)
DECODER_TINY = DecoderSpec(layers=4, d_model=128, heads=4, vocab=8192, n_ctx=512, d_ff=512)
DECODERS = {"gpt2": GPT2, "decoder-tiny": DECODER_TINY}


def past_name(i: int, kind: str) -> str:
    return f"past_key_values.{i}.{kind}"


def present_name(i: int, kind: str) -> str:
    return f"present.{i}.{kind}"


class _Graph:
    """Nodes and initializers with unique names; the decoder's layers are written through it."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        self._n += 1
        out = out or f"{op.lower()}_{self._n}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{op}_{self._n}", **attrs))
        return out


@functools.lru_cache(maxsize=2)  # GPT-2's take ~3 s to draw; every segment of one model shares them
def _weights(spec: DecoderSpec, seed: int) -> dict[str, np.ndarray]:
    """GPT-2's initialisation (normal, std 0.02; residual projections scaled by 1/sqrt(2·layers))."""
    rng = np.random.default_rng(seed)
    d, f = spec.d_model, spec.d_ff
    std, proj_std = 0.02, 0.02 / np.sqrt(2 * spec.layers)

    def normal(shape, s=std):
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(s)

    w: dict[str, np.ndarray] = {"wte": normal((spec.vocab, d)), "wpe": normal((spec.n_ctx, d), 0.01)}
    out_ch = outlier_channels(spec, seed)
    # the embedding writes the outlier channels (one sign per channel, as real massive activations do),
    # outlier_scale times the other channels' standard deviation, varying 5 % from token to token
    sign = np.where(rng.random(len(out_ch)) < 0.5, -1.0, 1.0).astype(np.float32)
    big = np.float32(spec.outlier_scale * std) * sign * (1 + 0.05 * normal((spec.vocab, len(out_ch)), 1))
    w["wte"][:, out_ch] = big
    ln_gain = np.ones(d, np.float32)
    ln_gain[out_ch] = 1.0 / spec.outlier_scale
    final_gain = ln_gain.copy()
    final_gain[out_ch] = 0.0  # the head reads the other channels: the outliers do not decide the token
    for i in range(spec.layers):
        w[f"h{i}.ln1.g"], w[f"h{i}.ln1.b"] = ln_gain.copy(), np.zeros(d, np.float32)
        w[f"h{i}.attn.w"], w[f"h{i}.attn.b"] = normal((d, 3 * d)), np.zeros(3 * d, np.float32)
        w[f"h{i}.proj.w"], w[f"h{i}.proj.b"] = normal((d, d), proj_std), np.zeros(d, np.float32)
        w[f"h{i}.ln2.g"], w[f"h{i}.ln2.b"] = ln_gain.copy(), np.zeros(d, np.float32)
        w[f"h{i}.fc.w"], w[f"h{i}.fc.b"] = normal((d, f)), np.zeros(f, np.float32)
        w[f"h{i}.fc2.w"], w[f"h{i}.fc2.b"] = normal((f, d), proj_std), np.zeros(d, np.float32)
    w["lnf.g"], w["lnf.b"] = final_gain, np.zeros(d, np.float32)
    return w


def outlier_channels(spec: DecoderSpec, seed: int = 0) -> np.ndarray:
    """The residual-stream channels that carry the large activations (sorted)."""
    rng = np.random.default_rng(seed + 2)
    return np.sort(rng.choice(spec.d_model, size=min(spec.outliers, spec.d_model), replace=False))


def _head_rows(spec: DecoderSpec, seed: int) -> np.ndarray:
    """The permutation that unties the head from the embedding (no token maps to itself)."""
    perm = np.random.default_rng(seed + 1).permutation(spec.vocab)
    fixed = np.flatnonzero(perm == np.arange(spec.vocab))
    if len(fixed):  # a derangement: rotate the fixed points among themselves (or swap with a neighbour)
        perm[fixed] = perm[np.roll(fixed, 1)] if len(fixed) > 1 else perm[(fixed + 1) % spec.vocab]
        if len(fixed) == 1:
            perm[(fixed + 1) % spec.vocab] = fixed
    return perm.astype(np.int64)


def hidden_name(i: int) -> str:
    """The residual stream after layer ``i``: the tensor a cut between layers ``i`` and ``i + 1`` sends."""
    return f"hidden_states.{i}"


def build_decoder(
    spec: DecoderSpec, name: str = "decoder", seed: int = 0, layers: tuple[int, int] | None = None
) -> onnx.ModelProto:
    """The decoder, or the segment of its ``layers`` [first, last) with the same weights.

    The whole model takes ``input_ids`` and gives ``logits``; a segment that starts later takes
    ``hidden_states.{first-1}`` and one that ends earlier gives ``hidden_states.{last-1}``, so a head and
    a tail meet on the tensor a cut of the whole graph there would send. Each takes and gives the KV cache
    of its own layers only, and derives the causal mask (and, with the embedding, the positions) from its
    first layer's past length."""
    first, last = layers or (0, spec.layers)
    if not 0 <= first < last <= spec.layers:
        raise ValueError(f"layers {first}..{last} are not a segment of a {spec.layers}-layer decoder")
    g = _Graph()
    w = _weights(spec, seed)
    d, h, hd = spec.d_model, spec.heads, spec.head_dim
    keep = {f"h{i}" for i in range(first, last)}
    keep |= {"wte"} if first == 0 or last == spec.layers else set()  # the embedding, and the head's rows
    keep |= {"wpe"} if first == 0 else set()
    keep |= {"lnf"} if last == spec.layers else set()
    for wname, value in w.items():
        if wname.split(".")[0] in keep:
            g.const(wname, value)
    if last == spec.layers:
        g.const("head_rows", _head_rows(spec, seed))
        g.const("head_scale", np.array(head_scale(spec, seed) if layers else 1.0, np.float32))
    for cname, val in _CONSTS.items():
        g.const(cname, val)
    g.const("inv_sqrt_hd", np.array(1.0 / np.sqrt(hd), np.float32))
    g.const("shape_bshd", np.array([0, 0, h, hd], np.int64))
    g.const("split_qkv", np.array([d, d, d], np.int64))
    g.const("shape_bsd", np.array([0, 0, d], np.int64))

    x = "input_ids" if first == 0 else hidden_name(first - 1)
    # positions past .. past+seq-1 and the causal mask [seq, past+seq], from the past the caller gives
    past_len = g.op("Gather", [g.op("Shape", [past_name(first, "key")]), "c2"], axis=0)  # [1]
    seq_len = g.op("Gather", [g.op("Shape", [x]), "c1"], axis=0)
    tot0 = g.op("Squeeze", [g.op("Add", [past_len, seq_len]), "c0"])
    pos = g.op("Range", [g.op("Squeeze", [past_len, "c0"]), tot0, "s1"])  # [seq]
    kpos = g.op("Range", ["s0", tot0, "s1"])  # [total]
    future = g.op("Greater", [g.op("Unsqueeze", [kpos, "c0"]), g.op("Unsqueeze", [pos, "c1"])])
    mask = g.op("Where", [future, "neg", "zero"])  # [seq, total], broadcast over batch and heads
    if first == 0:
        x = g.op("Add", [g.op("Gather", ["wte", x], axis=0), g.op("Gather", ["wpe", pos], axis=0)])

    def layer_norm(t: str, p: str) -> str:
        return g.op("LayerNormalization", [t, f"{p}.g", f"{p}.b"], axis=-1, epsilon=1e-5)

    def linear(t: str, p: str) -> str:
        return g.op("Add", [g.op("MatMul", [t, f"{p}.w"]), f"{p}.b"])

    def split_heads(t: str) -> str:  # [b, s, d] -> [b, h, s, hd]
        return g.op("Transpose", [g.op("Reshape", [t, "shape_bshd"])], perm=[0, 2, 1, 3])

    for i in range(first, last):
        qkv = linear(layer_norm(x, f"h{i}.ln1"), f"h{i}.attn")
        q, k, v = (f"h{i}.{n}" for n in "qkv")
        g.nodes.append(helper.make_node("Split", [qkv, "split_qkv"], [q, k, v], name=f"Split_h{i}", axis=-1))
        k_all = g.op("Concat", [past_name(i, "key"), split_heads(k)], present_name(i, "key"), axis=2)
        v_all = g.op("Concat", [past_name(i, "value"), split_heads(v)], present_name(i, "value"), axis=2)
        scores = g.op("MatMul", [split_heads(q), g.op("Transpose", [k_all], perm=[0, 1, 3, 2])])
        scores = g.op("Add", [g.op("Mul", [scores, "inv_sqrt_hd"]), mask])
        ctx = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v_all])  # [b, h, s, hd]
        ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), "shape_bsd"])
        x = g.op("Add", [x, linear(ctx, f"h{i}.proj")], f"h{i}.attn_out")
        a = linear(layer_norm(x, f"h{i}.ln2"), f"h{i}.fc")
        cube = g.op("Mul", [g.op("Mul", [a, a]), a])
        inner = g.op("Mul", [g.op("Add", [a, g.op("Mul", [cube, "gelu_b"])]), "gelu_a"])
        gelu = g.op("Mul", [g.op("Mul", [a, "half"]), g.op("Add", [g.op("Tanh", [inner]), "one"])])
        x = g.op("Add", [x, linear(gelu, f"h{i}.fc2")], hidden_name(i))

    hidden: list[str | int] = ["batch", "sequence", d]
    if first == 0:
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])]
    else:
        inputs = [helper.make_tensor_value_info(hidden_name(first - 1), TensorProto.FLOAT, hidden)]
    if last == spec.layers:
        head = g.op("Mul", [g.op("Transpose", [g.op("Gather", ["wte", "head_rows"], axis=0)]), "head_scale"])
        g.op("MatMul", [layer_norm(x, "lnf"), head], "logits")
        outputs = [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", spec.vocab])
        ]
    else:
        outputs = [helper.make_tensor_value_info(hidden_name(last - 1), TensorProto.FLOAT, hidden)]
    for i in range(first, last):
        for kind in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(
                    past_name(i, kind), TensorProto.FLOAT, ["batch", h, "past_sequence", hd]
                )
            )
            outputs.append(
                helper.make_tensor_value_info(
                    present_name(i, kind), TensorProto.FLOAT, ["batch", h, "total_sequence", hd]
                )
            )
    graph = helper.make_graph(g.nodes, name, inputs, outputs, g.inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="splitpoint"
    )
    model.ir_version = BUILT_IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    if last == spec.layers and not layers:
        _set_head_scale(model, _measure_head_scale(model, spec, seed))
    return model


_CONSTS: dict[str, np.ndarray] = {
    "c0": np.array([0], np.int64),
    "c1": np.array([1], np.int64),
    "c2": np.array([2], np.int64),
    "s0": np.array(0, np.int64),
    "s1": np.array(1, np.int64),
    "neg": np.array(-1e9, np.float32),  # the mask's "minus infinity", finite: softmax stays NaN-free
    "zero": np.array(0.0, np.float32),
    "gelu_a": np.array(np.sqrt(2.0 / np.pi), np.float32),
    "gelu_b": np.array(0.044715, np.float32),
    "half": np.array(0.5, np.float32),
    "one": np.array(1.0, np.float32),
}


@functools.lru_cache(maxsize=8)
def head_scale(spec: DecoderSpec, seed: int = 0) -> float:
    """The whole model's measured head scale, which every segment that ends with the head uses too."""
    return _head_scale_of(build_decoder(spec, seed=seed))


def _head_scale_of(model: onnx.ModelProto) -> float:
    return float(next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "head_scale"))


def _set_head_scale(model: onnx.ModelProto, scale: float) -> None:
    for t in model.graph.initializer:
        if t.name == "head_scale":
            t.CopyFrom(numpy_helper.from_array(np.array(scale, np.float32), "head_scale"))


def _measure_head_scale(model: onnx.ModelProto, spec: DecoderSpec, seed: int) -> float:
    """The head scale that makes a random 32-token prompt's mean next-token top-1 probability
    ``spec.top1`` (measured on the built model, found by bisection on its logits)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(seed + 3).integers(0, spec.vocab, (1, 32))
    z = sess.run(["logits"], {"input_ids": ids, **empty_past(spec)})[0][0].astype(np.float64)
    z -= z.mean(axis=-1, keepdims=True)

    def top1(scale: float) -> float:
        e = np.exp(scale * z - (scale * z).max(axis=-1, keepdims=True))
        return float((e.max(axis=-1) / e.sum(axis=-1)).mean())

    lo, hi = 0.0, 1.0
    while top1(hi) < spec.top1 and hi < 1e9:
        lo, hi = hi, hi * 2
    for _ in range(50):
        lo, hi = (lo, (lo + hi) / 2) if top1((lo + hi) / 2) >= spec.top1 else ((lo + hi) / 2, hi)
    return hi


def empty_past(
    spec: DecoderSpec, batch: int = 1, layers: tuple[int, int] | None = None
) -> dict[str, np.ndarray]:
    """The past of a sequence that has not started: each layer's key and value with length 0."""
    first, last = layers or (0, spec.layers)
    z = np.zeros((batch, spec.heads, 0, spec.head_dim), np.float32)
    return {past_name(i, k): z for i in range(first, last) for k in ("key", "value")}
