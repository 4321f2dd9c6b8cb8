"""Head weight quantisation with onnxruntime's own tools (not a hand-written quantiser).

Static QDQ with uint8 activations and int8 weights is the fast int8 path on x86 and Arm CPUs;
dynamic quantisation is offered for heads without representative inputs, though on these
CPUs it is usually slower than float32.
"""

from __future__ import annotations

import logging
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx

from splitpoint.core.errors import SplitPointError, first_line

MODES = ("static", "dynamic")


class _Reader:
    """Calibration reader over per-sample feeds (onnxruntime's CalibrationDataReader protocol)."""

    def __init__(self, samples: list[dict[str, np.ndarray]]):
        self._it = iter(samples)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # pragma: no cover - part of the protocol, unused by MinMax calibration
        pass


@contextmanager
def _quiet_root_logger():
    """onnxruntime's quantiser logs advisory warnings on the root logger, its calibration sessions log
    ("Removing initializer …", in colour) through onnxruntime's own logger, and its scale arithmetic warns
    through numpy on a tensor whose range is infinite (an attention mask's -inf, which it then handles):
    none of it is the user's to act on, so none reaches the CLI."""
    import onnxruntime as ort

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    ort.set_default_logger_severity(3)
    try:
        with np.errstate(all="ignore"):
            yield
    finally:
        ort.set_default_logger_severity(2)  # onnxruntime's default; nothing here sets another
        root.setLevel(level)


PER_CHANNEL_OPSET = 13  # DequantizeLinear's axis (per-channel weights) exists from opset 13
DYNAMIC_OPSET = 10  # onnxruntime's dynamic quantiser takes opset 10 and later as it is


def _at_least_opset(
    model: onnx.ModelProto, want: int, samples: list[dict[str, np.ndarray]], mode: str
) -> onnx.ModelProto:
    """The model converted up to opset ``want`` where it declares less: the static QDQ graph writes
    per-channel DequantizeLinear nodes, which an opset-11 model (torch's legacy exporter at
    opset_version=11) cannot hold; onnxruntime then refused SplitPoint's own graph, not the user's. The
    dynamic quantiser converts a model below opset 10 to 11 itself, where onnx has no adapter for an
    opset-7 Upsample by that route (to 13 it has). The converted model is run beside the original on a
    calibration sample: onnx's converter rewrites some ops into others that compute something else
    (Upsample(linear) into a Resize without Upsample's coordinates: 0.12 off at outputs of 0.31), and an
    int8 head measured so carried the converter's error as int8's."""
    have = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), want)
    if have >= want:
        return model
    from onnx import version_converter

    # ops ONNX no longer defines (ImageScaler, as tinyyolov2-8 starts with): the converter's words for them
    # are a format string it never filled ("Op '%s' has no registered schema")
    undefined = sorted(
        {n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx") and not onnx.defs.has(n.op_type)}
    )
    if undefined:
        raise SplitPointError(
            f"{mode} int8 quantisation runs at opset {want} or later here, and onnx cannot convert this "
            f"opset-{have} model's {', '.join(undefined)} (ONNX defines it no more) to opset {want}: a head "
            "holding it keeps its float weights (cut before it, or leave out --quantize-head-weights, "
            "--int8 and --int8-heads)"
        )
    try:
        converted = version_converter.convert_version(model, want)
    except Exception as exc:  # the converter's own errors are of many kinds
        raise SplitPointError(
            f"{mode} int8 quantisation runs at opset {want} or later here; this model is opset {have} and "
            f"onnx could not convert it ({type(exc).__name__}: {str(exc)[:200]}): export the model at opset "
            f"{want} or later"
        ) from exc
    _same_function(model, converted, samples[:2], have, want)
    return converted


def _same_function(
    before: onnx.ModelProto,
    after: onnx.ModelProto,
    samples: list[dict[str, np.ndarray]],
    have: int,
    want: int,
) -> None:
    """SplitPointError where the converted model's outputs differ from the original's on ``samples`` by
    more than float rounding (1e-3 of the output's largest value), naming what the converter rewrote."""
    from splitpoint.core.runner import make_session

    if not samples:
        return
    a, b = make_session(before, 1), make_session(after, 1)
    names = {i.name for i in a.get_inputs()}
    for sample in samples:
        feeds = {k: v for k, v in sample.items() if k in names}
        for o, x, y in zip(a.get_outputs(), a.run(None, feeds), b.run(None, feeds), strict=True):
            why = _differs(np.asarray(x), np.asarray(y))
            if why:
                gone = sorted({n.op_type for n in before.graph.node} - {n.op_type for n in after.graph.node})
                raise SplitPointError(
                    f"int8 weights need this head at opset {want}, and onnx's converter from opset {have} "
                    f"changes what it computes (output {o.name!r}: {why}"
                    + (f"; it rewrote {', '.join(gone)}" if gone else "")
                    + f"): export the model at opset {want} or later, cut before the op it rewrote, or keep "
                    "this head's weights float (leave out --quantize-head-weights, --int8 and --int8-heads)"
                )


def _differs(x: np.ndarray, y: np.ndarray) -> str | None:
    """How ``y`` differs from ``x`` beyond float rounding, in words; None where it does not."""
    if x.shape != y.shape or x.dtype != y.dtype:
        return f"{x.dtype} {list(x.shape)} became {y.dtype} {list(y.shape)}"
    if not np.issubdtype(x.dtype, np.floating):
        return None if np.array_equal(x, y) else "other values"
    if not x.size:
        return None
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    if not np.array_equal(np.isnan(x64), np.isnan(y64)):
        return "NaN elsewhere"
    scale = float(np.nanmax(np.abs(x64)))
    off = float(np.nanmax(np.abs(x64 - y64))) if np.isfinite(x64).any() else 0.0
    return (
        None
        if off <= 1e-3 * max(scale, 1e-6)
        else f"off by up to {off:.3g} where its values reach {scale:.3g}"
    )


def quantize_head(
    head: onnx.ModelProto,
    calibration: list[dict[str, np.ndarray]],
    mode: str = "static",
    timing: bool = False,
) -> onnx.ModelProto:
    """``timing``: the quantised model is only timed (the profiler's int8 model), and an old opset's
    conversion is not checked against the original: what the converter changes costs what it did, and each
    int8 head a plan measures is checked."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    if mode not in MODES:
        raise SplitPointError(f"unknown head quantisation mode {mode!r}; choose {', '.join(MODES)}")
    refuse_quantized(head, mode)
    not_float32 = _not_float32_weights(head)
    inputs = {i.name for i in head.graph.input}
    samples = [{k: v for k, v in s.items() if k in inputs} for s in calibration]
    # static: per-channel weights need opset 13; dynamic: onnxruntime's quantiser converts a model below
    # opset 10 to 11 itself, unchecked and by a route with no adapter for an opset-7 Upsample
    head = _at_least_opset(
        head, PER_CHANNEL_OPSET if mode == "static" else DYNAMIC_OPSET, [] if timing else samples, mode
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as d, _quiet_root_logger():
        raw, src, dst = Path(d) / "head.raw.onnx", Path(d) / "head.onnx", Path(d) / "head.int8.onnx"
        onnx.save_model(head, str(raw))
        if mode == "static" and not samples:
            raise SplitPointError("static quantisation needs calibration inputs")
        try:
            # the pre-processing onnxruntime recommends: shape inference and graph optimisation
            # (BatchNorm folded into Conv) so that quantisation sees the layers that will run
            quant_pre_process(str(raw), str(src), skip_symbolic_shape=True)
            if mode == "dynamic":
                quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
            else:
                reader = type("Reader", (_Reader, CalibrationDataReader), {})(samples)
                quantize_static(
                    str(src),
                    str(dst),
                    reader,
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                )
        except (RuntimeError, ValueError, KeyError, IndexError, TypeError, AssertionError) as exc:
            if not_float32:
                raise _left_as_they_are(not_float32, mode, exc) from exc
            # onnxruntime's quantiser (and the onnx version converter it calls) on a head it cannot
            # handle, e.g. an opset 7-9 Upsample there is no adapter for: the user's choice is the mode
            # or the model's opset, not a traceback
            opset = next((o.version for o in head.opset_import if o.domain in ("", "ai.onnx")), None)
            raise SplitPointError(
                f"onnxruntime's {mode} int8 quantiser failed on this head (opset {opset}): "
                f"{type(exc).__name__}: {first_line(exc)[:200]}; try the other "
                "--quantize-head-weights mode, a cut before the operator it names, or a model exported at "
                "opset 13 or later"
            ) from exc
        quantised = onnx.load(str(dst))
    integer = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    if not_float32 and not any(
        t.data_type in integer and len(t.dims) > 1 for t in quantised.graph.initializer
    ):
        raise _left_as_they_are(not_float32, mode)
    return quantised


QUANTIZED_OPS = frozenset(
    (
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "QLinearConv",
        "QLinearMatMul",
        "ConvInteger",
        "MatMulInteger",
        "MatMulNBits",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
        "QGemm",
        "QLinearAdd",
        "QLinearMul",
    )
)


def already_quantized(model: onnx.ModelProto) -> str | None:
    """The quantised operators a model holds, in words (None: none): onnxruntime's quantisers
    assume a float model and fail deep inside on one that is not (a KeyError for a scale, an
    "expected an initializer", or a copy with duplicate node names that onnxruntime refuses)."""
    ops = sorted({n.op_type for n in model.graph.node if n.op_type in QUANTIZED_OPS})
    return ", ".join(ops) if ops else None


def refuse_quantized(model: onnx.ModelProto, mode: str) -> None:
    done = already_quantized(model)
    if done:
        raise SplitPointError(
            f"the model is already quantised ({done}): its weights are quantised already, and "
            f"onnxruntime's {mode} quantiser does not apply to it; use it as it is (without --int8 or "
            "--quantize-head-weights)"
        )


def _not_float32_weights(model: onnx.ModelProto) -> list[str]:
    """The element types of a model's weights where none is float32 (float16, float64, ...): onnxruntime
    1.32's quantisers quantise float32 weights only and leave these as they are (static mode puts int8
    activations around them and the head is called int8; the dynamic quantiser dies on the cast it
    inserts for float16 weights), where 1.30's quantised float16 ones. Empty where any is float32."""
    kinds = {t.data_type for t in model.graph.initializer if t.dims and any(d > 1 for d in t.dims)}
    return (
        [] if onnx.TensorProto.FLOAT in kinds else sorted(_FLOAT_NAMES[k] for k in kinds if k in _FLOAT_NAMES)
    )


def _left_as_they_are(kinds: list[str], mode: str, failed: BaseException | None = None) -> SplitPointError:
    what = f"failed on them ({first_line(failed)[:200]})" if failed else "left them as they are"
    return SplitPointError(
        f"the model's weights are {' and '.join(kinds)}: onnxruntime's {mode} int8 quantiser {what}, which "
        "quantises float32 weights (an int8 head would hold the same bytes); leave out --int8, --int8-heads "
        "and --quantize-head-weights, or export the model in float32"
    )


_FLOAT_NAMES = {
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.DOUBLE: "float64",
}


def quantize_matmul_weights(model: onnx.ModelProto, bits: int = 4, block_size: int = 32) -> onnx.ModelProto:
    """A copy of ``model`` whose MatMul weights are ``bits``-bit blocks (onnxruntime's MatMulNBits: symmetric,
    ``block_size`` weights per scale, int8 accumulation where the CPU has it). Weight-only: activations
    stay float, so nothing needs calibrating. Embeddings (Gather) stay float."""
    import copy

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    work = copy.deepcopy(model)
    gemm_as_matmul(work.graph)
    q = MatMulNBitsQuantizer(work, bits=bits, block_size=block_size, is_symmetric=True, accuracy_level=4)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    q.process()
    out = q.model.model
    if _nbits(out) <= _nbits(model):
        # a plan that said int4 of weights left float (a Gemm export's) mispredicted memory and speed; one
        # of weights already 4-bit (onnxruntime-genai's int4 export) measured the same part twice
        raise SplitPointError(
            f"no MatMul or Gemm weight to quantise to {bits} bits in this part of the model (weights "
            "given as inputs, layers of other operators, or weights already quantised): keep its weights "
            "as they are"
        )
    return out


def _nbits(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "MatMulNBits" for n in model.graph.node)


def float_matmul_weights(model: onnx.ModelProto) -> bool:
    """Whether a MatMul or Gemm of ``model`` multiplies by a float initializer: what 4-bit weights take."""
    floats = {
        t.name
        for t in model.graph.initializer
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and len(t.dims) == 2
    }
    return any(
        n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in floats
        for n in model.graph.node
    )


def gemm_as_matmul(graph: onnx.GraphProto) -> int:
    """Rewrite each Gemm with a constant weight as MatMul (+ Add of its bias), in place; how many. The
    4-bit quantiser takes MatMul only, and exporters write Linear layers as Gemm (transformers' GPT-2
    Conv1D among them): their weights stayed float while the plan said int4. ``alpha`` and ``beta`` go
    into the constants; a transposed input A, or a bias that is no constant under a ``beta`` other
    than 1, leaves the node as it is."""
    from onnx import helper, numpy_helper

    consts = {t.name: t for t in graph.initializer}
    nodes, done = [], 0
    for n in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        bias = n.input[2] if len(n.input) > 2 and n.input[2] else None
        beta = float(attrs.get("beta", 1.0))
        if (
            n.op_type != "Gemm"
            or n.domain not in ("", "ai.onnx")
            or n.input[1] not in consts
            or attrs.get("transA", 0)
            or (bias is not None and beta != 1.0 and bias not in consts)
        ):
            nodes.append(n)
            continue
        w = numpy_helper.to_array(consts[n.input[1]])
        w = (w.T if attrs.get("transB", 0) else w) * np.asarray(attrs.get("alpha", 1.0), w.dtype)
        base = n.output[0]
        w_name = f"{base}__matmul_weight"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w), w_name))
        if bias is None:
            nodes.append(helper.make_node("MatMul", [n.input[0], w_name], [base], name=n.name or base))
        else:
            b_name = bias
            if beta != 1.0:
                b = numpy_helper.to_array(consts[bias]) * np.asarray(beta, w.dtype)
                b_name = f"{base}__matmul_bias"
                graph.initializer.append(numpy_helper.from_array(b, b_name))
            mid = f"{base}__matmul"
            # names from the output, which is unique: exporters leave node names empty, and two
            # "_matmul" nodes made a model onnxruntime refuses
            nodes.append(helper.make_node("MatMul", [n.input[0], w_name], [mid], name=mid))
            nodes.append(helper.make_node("Add", [mid, b_name], [base], name=n.name or base))
        done += 1
    if done:
        del graph.node[:]
        graph.node.extend(nodes)
    return done
