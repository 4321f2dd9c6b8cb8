"""Small hand-written graphs for the structures the zoo does not cover."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _model(nodes, inputs, outputs, inits=(), functions=(), extra_opsets=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = helper.make_model(
        g, opset_imports=[helper.make_opsetid("", 17), *extra_opsets], functions=list(functions)
    )
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def control_flow_model() -> onnx.ModelProto:
    """If and Loop whose bodies read tensors and an initializer from the outer scope."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    w = numpy_helper.from_array(np.linspace(-1, 1, 4, dtype=np.float32), "w")
    zero = numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero")
    trip = numpy_helper.from_array(np.array(3, dtype=np.int64), "trip")
    then_g = helper.make_graph(
        [helper.make_node("Add", ["r", "w"], ["t_out"])],
        "then",
        [],
        [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, ["N", 4])],
    )
    else_g = helper.make_graph(
        [helper.make_node("Mul", ["r", "s"], ["e_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, ["N", 4])],
    )
    body = helper.make_graph(
        [
            helper.make_node("Add", ["acc_in", "r"], ["acc_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, ["N", 4]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, ["N", 4]),
        ],
    )
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Sigmoid", ["x"], ["s"], name="sig"),
        helper.make_node("ReduceSum", ["x"], ["sum"], name="sum", keepdims=0),
        helper.make_node("Greater", ["sum", "zero"], ["cond"], name="gt"),
        helper.make_node("If", ["cond"], ["iff"], name="if", then_branch=then_g, else_branch=else_g),
        helper.make_node("Loop", ["trip", "cond", "iff"], ["looped"], name="loop", body=body),
        helper.make_node("Tanh", ["looped"], ["y"], name="tanh"),
    ]
    return _model(nodes, [x], [y], [w, zero, trip])


def local_function_model() -> onnx.ModelProto:
    """A model-local function (custom domain) called twice."""
    fn = helper.make_function(
        "local",
        "ScaledRelu",
        ["X", "S"],
        ["Y"],
        [helper.make_node("Relu", ["X"], ["r"]), helper.make_node("Mul", ["r", "S"], ["Y"])],
        opset_imports=[helper.make_opsetid("", 17)],
    )
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])
    s = numpy_helper.from_array(np.full(8, 0.5, dtype=np.float32), "s")
    nodes = [
        helper.make_node("ScaledRelu", ["x", "s"], ["a"], name="f1", domain="local"),
        helper.make_node("Neg", ["a"], ["b"], name="neg"),
        helper.make_node("ScaledRelu", ["b", "s"], ["y"], name="f2", domain="local"),
    ]
    return _model(nodes, [x], [y], [s], functions=[fn], extra_opsets=[helper.make_opsetid("local", 1)])


def outputs_without_compute_model() -> onnx.ModelProto:
    """Model outputs that no computing node makes: a Constant node's (a version tag), a weight (a label
    table) and a model input handed back as it came (the image a detector returns with its boxes)."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((8, 8, 3, 3)).astype(np.float32), "w2")
    labels = numpy_helper.from_array(np.arange(8, dtype=np.int64), "labels")
    version = helper.make_tensor("v", TensorProto.INT64, [1], [3])
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
        helper.make_node("Flatten", ["p"], ["y"]),
        helper.make_node("Constant", [], ["version"], value=version),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])
    outputs = [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8]),
        helper.make_tensor_value_info("version", TensorProto.INT64, [1]),
        helper.make_tensor_value_info("labels", TensorProto.INT64, [8]),
        x,
    ]
    return _model(nodes, [x], outputs, [w1, w2, labels])


def ir3_weights_as_inputs_model() -> onnx.ModelProto:
    """An IR 3, opset 8 model as the old model zoo ships them: every weight is also a graph input (IR 3
    requires it), with a BatchNormalization and a Reshape by a shape weight."""
    rng = np.random.default_rng(0)
    arrays = {
        "w1": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
        "b1": np.zeros(8, np.float32),
        "scale": np.ones(8, np.float32),
        "bias": np.full(8, 0.1, np.float32),
        "mean": np.zeros(8, np.float32),
        "var": np.ones(8, np.float32),
        "w2": rng.standard_normal((5, 8, 1, 1)).astype(np.float32),
        "shape": np.array([-1, 5], np.int64),
    }
    nodes = [
        helper.make_node("Conv", ["data", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "scale", "bias", "mean", "var"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["mp"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["mp", "w2"], ["c2"]),
        helper.make_node("GlobalAveragePool", ["c2"], ["gp"]),
        helper.make_node("Reshape", ["gp", "shape"], ["flat"]),
        helper.make_node("Softmax", ["flat"], ["prob"]),
    ]
    data = helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 16, 16])
    weights = [
        helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
        for k, v in arrays.items()
    ]
    g = helper.make_graph(
        nodes,
        "old",
        [data, *weights],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 5])],
        [numpy_helper.from_array(v, k) for k, v in arrays.items()],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 8)])
    m.ir_version = 3
    onnx.checker.check_model(m, full_check=True)
    return m


def resized_by_input_model(
    channels: int, tail=(), tail_inits=(), out_channels: int | None = None
) -> onnx.ModelProto:
    """x[1, C, 8, 8] resized to ``up`` by spatial scales of 1 + |s| (s an input of 2: whatever a sample
    holds, random values too, sets a size no shape declares), then ``tail`` from ``up`` to ``y`` (an
    Identity where none is given)."""
    one = numpy_helper.from_array(np.ones(2, np.float32), "one")
    nodes = [
        helper.make_node("Abs", ["s"], ["abs"]),
        helper.make_node("Add", ["abs", "one"], ["hw"]),
        helper.make_node("Concat", ["one", "hw"], ["scales"], axis=0),
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Resize", ["r", "", "scales"], ["up"], mode="nearest"),
        *(tail or [helper.make_node("Identity", ["up"], ["y"])]),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 8, 8]),
        helper.make_tensor_value_info("s", TensorProto.FLOAT, [2]),
    ]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out_channels or channels, "H", "W"])
    return _model(nodes, inputs, [y], [one, *tail_inits])
