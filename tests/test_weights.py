"""Large weights left out of the work that needs only a graph's structure: stubbed copies for shape
inference and shared-weight sessions, weights as inputs for the checker. The copies must leave the
model intact and must not hide a broken graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from splitpoint.core import onnxio
from splitpoint.core.errors import ModelError
from splitpoint.core.onnxio import check_model, load_model, save_and_hash, sha256_file
from splitpoint.core.weights import is_stub, weights_as_inputs, with_stubs


def _matmul(k_in: int, k_w: int) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((k_w, 64), np.float32), "w")
    shape = numpy_helper.from_array(np.array([1, -1], np.int64), "shape")  # small: stays inline
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Reshape", ["y", "shape"], ["z"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k_in])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 64])],
        [w, shape],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_copies_leave_the_weights_out_and_the_model_intact():
    m = _matmul(64, 64)
    before = m.SerializeToString()
    stubbed, as_inputs = with_stubs(m), weights_as_inputs(m)
    assert m.SerializeToString() == before
    w = {t.name: t for t in stubbed.graph.initializer}
    assert is_stub(w["w"]) and not w["w"].raw_data and list(w["w"].dims) == [64, 64]
    assert not is_stub(w["shape"])  # shape data stays: inference reads it
    assert [i.name for i in as_inputs.graph.input] == ["x", "w"]
    assert [t.name for t in as_inputs.graph.initializer] == ["shape"]
    assert stubbed.ByteSize() < len(before) / 10 and as_inputs.ByteSize() < len(before) / 10
    inferred = onnx.shape_inference.infer_shapes(stubbed, strict_mode=True, data_prop=True)
    y = next(v for v in inferred.graph.value_info if v.name == "y")
    assert [d.dim_value for d in y.type.tensor_type.shape.dim] == [1, 64]


def test_the_checker_without_weights_still_finds_a_broken_graph():
    check_model(_matmul(64, 64), full=True, weights=False)
    with pytest.raises(ModelError, match="checker"):
        check_model(_matmul(32, 64), full=True, weights=False)  # [1, 32] x [64, 64]


def test_the_checker_with_weights_finds_a_truncated_one():
    m = _matmul(64, 64)
    m.graph.initializer[0].raw_data = m.graph.initializer[0].raw_data[:100]
    with pytest.raises(ModelError, match="raw_data size"):
        check_model(m)


def _weights_of(m: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_a_stubbed_model_saved_with_its_arrays_loads_as_the_inline_model(tmp_path, dtype):
    m = _matmul(64, 64)
    rng = np.random.default_rng(0)
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(rng.standard_normal((64, 64)).astype(dtype), "w"))
    arrays = _weights_of(m)
    stubbed = with_stubs(m)
    files = save_and_hash({"part.onnx": stubbed, "whole.onnx": m}, tmp_path, arrays.__getitem__)
    assert files == {f: sha256_file(tmp_path / f) for f in ("part.onnx", "whole.onnx")}
    back = load_model(tmp_path / "part.onnx")  # parsed and through the checker, as a plan's part is
    assert not any(is_stub(t) for t in back.graph.initializer)
    got = _weights_of(back)
    assert got.keys() == arrays.keys()
    for name, a in arrays.items():
        assert got[name].dtype == a.dtype and np.array_equal(got[name], a), name
    assert list(back.graph.node) == list(m.graph.node) and back.graph.input == m.graph.input


def test_a_stubbed_model_is_not_saved_without_its_arrays_or_with_the_wrong_ones(tmp_path):
    with pytest.raises(ModelError, match="no arrays"):
        save_and_hash({"part.onnx": with_stubs(_matmul(64, 64))}, tmp_path)
    wrong = {"w": np.ones((32, 64), np.float32)}
    with pytest.raises(ModelError, match="does not match its stub"):
        save_and_hash({"part.onnx": with_stubs(_matmul(64, 64))}, tmp_path, wrong.__getitem__)


def test_a_stubbed_model_past_protobufs_limit_is_saved_with_external_data(tmp_path, monkeypatch):
    m = _matmul(64, 64)
    monkeypatch.setattr(onnxio, "_PROTOBUF_LIMIT", 4096)  # 16 KiB of weights: "over the limit"
    monkeypatch.setattr(onnxio, "_MARGIN", 0)
    files = save_and_hash({"part.onnx": with_stubs(m)}, tmp_path, _weights_of(m).__getitem__)
    assert set(files) == {"part.onnx", "part.onnx.data"}
    assert files["part.onnx.data"] == sha256_file(tmp_path / "part.onnx.data")
    # readable by whoever may read the model (onnx makes the data file 0600: a service's user could not)
    modes = {(tmp_path / n).stat().st_mode & 0o777 for n in files}
    assert len(modes) == 1, modes
    back = load_model(tmp_path / "part.onnx", check=False)
    assert np.array_equal(_weights_of(back)["w"], np.ones((64, 64), np.float32))


@pytest.mark.skipif(
    __import__("psutil").virtual_memory().available < 5 * 2**30,
    reason="needs 2 GiB for a model past the limit",
)
def test_a_model_past_protobufs_limit_is_sized_without_serialising_it():
    """protobuf (upb) cannot serialise a message past 2 GiB even to count its bytes: every command on a
    model with 2.25 GiB of weights died in ``ByteSize`` with an EncodeError traceback."""
    n = (onnxio._PROTOBUF_LIMIT + 2**20) // 4
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [n])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [n])
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "big", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    # added in place: make_graph copies an initializer by serialising it, which fails past the limit too
    w = model.graph.initializer.add(name="w", data_type=onnx.TensorProto.FLOAT, dims=[n])
    w.raw_data = bytes(n * 4)
    over = onnxio._over_protobuf_limit(model)
    onnxio.check_model(model)  # left to the saved file's check, not a traceback
    del model, w  # 2 GiB: not kept for pytest's report
    assert over
