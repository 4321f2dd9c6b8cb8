"""Models a user may bring that the zoo does not look like: outputs whose shape follows the data, rank-0
boolean inputs. Each must split, serve and be measured, not only load."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from splitpoint.core.graph.cuts import enumerate_cuts
from splitpoint.core.graph.extract import extract
from splitpoint.core.graph.model import open_model
from splitpoint.core.plan import Plan
from splitpoint.core.plandir import write_plan
from splitpoint.core.runner import Ragged, join, make_session
from splitpoint.core.samples import sample_feeds
from splitpoint.partitioner.fidelity import compare, measure

from .conftest import run_cli
from .test_split_equivalence import run_split


def _save(model: onnx.ModelProto, path) -> str:
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return str(path)


def data_dependent_model() -> onnx.ModelProto:
    """A detector's tail in miniature: the positions above a threshold (NonZero: their count follows the
    data) and the values there, beside a fixed-size TopK."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w")
    t = numpy_helper.from_array(np.array(0.8, np.float32), "t")
    k = numpy_helper.from_array(np.array([3], np.int64), "k")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("Relu", ["m"], ["r"]),
        helper.make_node("Greater", ["r", "t"], ["above"]),
        helper.make_node("NonZero", ["above"], ["where"]),
        helper.make_node("Transpose", ["where"], ["where_t"]),
        helper.make_node("GatherND", ["r", "where_t"], ["picked"]),
        helper.make_node("TopK", ["r", "k"], ["topv", "topi"]),
    ]
    # two rows of 16: int4 quantises per row (a [1, 16] tensor would be 16 channels of one value: exact)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 16])
    outs = [
        helper.make_tensor_value_info("picked", TensorProto.FLOAT, ["count"]),
        helper.make_tensor_value_info("where", TensorProto.INT64, [3, "count"]),
        helper.make_tensor_value_info("topv", TensorProto.FLOAT, [1, 2, 3]),
    ]
    g = helper.make_graph(nodes, "dd", [x], outs, [w, t, k])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_outputs_whose_shape_follows_the_data_are_compared_sample_by_sample(tmp_path):
    h = open_model(_save(data_dependent_model(), tmp_path / "dd.onnx"))
    samples = [sample_feeds(h.model, 1, seed) for seed in range(32)]
    full = make_session(h.path)
    counts = {full.run(["picked"], s)[0].shape[0] for s in samples}
    assert len(counts) > 1  # the samples' NonZero counts differ: the float outputs do not join
    mismatched = 0
    for cut in h.cuts():
        reports = measure(h, cut, ["float32", "int4"], samples)
        exact = {o.name: o for o in reports["float32"].outputs}
        assert all(
            o.primary == 1.0 and o.max_abs_error == 0 and o.shape_mismatches == 0 for o in exact.values()
        )
        assert exact["where"].cosine is None and exact["where"].exact_agreement == 1.0  # int64 positions
        lossy = {o.name: o for o in reports["int4"].outputs}
        # the positions and the values there come from one NonZero: their shapes go wrong together, and a
        # sample gone wrong costs its share of the mean cosine
        assert lossy["picked"].shape_mismatches == lossy["where"].shape_mismatches
        assert lossy["where"].primary <= 1 - lossy["where"].shape_mismatches / 32 + 1e-9
        mismatched += lossy["where"].shape_mismatches
    assert mismatched > 0  # int4 moves some value across the threshold somewhere: the ragged path ran


def test_an_answer_of_zeros_against_one_that_is_not_has_cosine_0():
    """A static int8 head re-quantised a thousand-class softmax at 1/255 and answered all zeros: its cosine
    read as 1 (a zero norm made it so) and the plan picked it at fidelity 1.000."""
    ref = np.full((8, 1000), 0.001, np.float32)
    o = compare("prob", ref, np.zeros_like(ref), 8)
    assert o.cosine == 0.0 and o.primary == 0.0
    assert compare("prob", np.zeros_like(ref), np.zeros_like(ref), 8).cosine == 1.0  # zeros in both agree
    # a float row of zeros (a ReLU output on one sample) against rounding noise agrees; against signal not
    feats = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    feats[3] = 0
    noisy = feats.copy()
    noisy[3] = 1e-4
    assert compare("f", feats, noisy, 8, scores=False).cosine == 1.0
    noisy[3] = 1.0
    assert compare("f", feats, noisy, 8, scores=False).cosine == pytest.approx(7 / 8)


def test_infinities_in_an_output_measure_as_what_they_are_and_warn_nothing():
    """A split that made an infinity or NaN measured 300 dB (``min`` with a NaN gave the cap), with numpy's
    warnings printed into the plan's output; equal infinities in both (a mask's -inf) made the cosine NaN."""
    import warnings

    ref = np.random.default_rng(1).standard_normal((4, 16))
    broken = ref.copy()
    broken[1, 3], broken[2, 5] = np.inf, np.nan
    masked = ref.copy()
    masked[:, 0] = -np.inf
    near = masked + 1e-3 * np.isfinite(masked)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bad = compare("y", ref, broken, 4, scores=False)
        fine = compare("y", masked, near, 4, scores=False)
        # per sample (an output whose shape follows the data): the same measures
        ragged = compare("y", Ragged([masked[:1], masked[1:]]), Ragged([near[:1], near[1:]]), 2, scores=False)
    assert ragged.snr_db == pytest.approx(fine.snr_db) and ragged.cosine == pytest.approx(1.0)
    assert bad.snr_db == -300.0 and bad.max_abs_error == np.inf and bad.cosine == pytest.approx(0.5)
    assert (
        fine.cosine == pytest.approx(1.0)
        and 40 < fine.snr_db < 100
        and fine.max_abs_error == pytest.approx(1e-3)
    )


def test_weights_made_by_constant_nodes_count_as_parameters_and_edge_memory(tmp_path):
    """Older exporters wrote weights as Constant nodes; onnx's light zoo models fill them with
    ConstantOfShape. Neither counted: ResNet-50 had 896 parameters and a 20 MiB edge where its session
    took 243 MiB."""
    from splitpoint.core.graph.flops import count_params
    from splitpoint.core.graph.memory import weight_bytes_by_prefix

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w1_value")
    nodes = [
        helper.make_node("Constant", [], ["w1"], value=w1),
        helper.make_node(
            "ConstantOfShape", ["w2_shape"], ["w2"], value=helper.make_tensor("v", 1, [1], [0.01])
        ),
        helper.make_node("MatMul", ["x", "w1"], ["a"]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    shape = numpy_helper.from_array(np.array([32, 8], np.int64), "w2_shape")
    h = open_model(_save(_tiny(nodes, [_vi("x", [1, 16])], [_vi("y", [1, 8])], [shape]), tmp_path / "c.onnx"))
    assert count_params(h.index) == 16 * 32 + 32 * 8
    assert weight_bytes_by_prefix(h.index)[-1] == 4 * (16 * 32 + 32 * 8)
    first = next(c for c in h.cuts() if [t.name for t in c.crossing] == ["a"])
    assert first.head_params == 16 * 32


def test_a_model_onnxruntime_has_no_kernel_for_is_refused_as_the_models_not_the_cuts(tmp_path):
    """Opset 6's Add has no onnxruntime kernel: `split` said the tail "does not run on what the stages
    before it produced", blaming the cut; `profile` and `fidelity` named the model."""
    from splitpoint.core.errors import ModelError

    b = numpy_helper.from_array(np.ones((1, 8), np.float32), "b")
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Add", ["r", "b"], ["a"]),
        helper.make_node("Sigmoid", ["a"], ["y"]),
    ]
    g = helper.make_graph(nodes, "op6", [_vi("x", [1, 8])], [_vi("y", [1, 8])], [b])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 6)])
    m.ir_version = 3
    path = str(tmp_path / "op6.onnx")
    onnx.save(m, path)
    h = open_model(path)
    assert h.cuts()
    for cut in h.cuts():
        with pytest.raises(ModelError, match=r"onnxruntime could not run the model: .*Add\(6\)"):
            write_plan(h, tmp_path / f"p{cut.index}", cut=cut)


def test_a_model_onnxruntime_will_not_load_is_not_sent_to_input_shapes(tmp_path):
    """A type onnxruntime's checker rejects (Range of float16) is the model's fault at any shape: `split`
    said it could not run "at these input shapes (see --input-shape)"."""
    from splitpoint.core.errors import ModelError

    half = TensorProto.FLOAT16
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("ReduceMax", ["r"], ["top"], keepdims=0),
        helper.make_node("Range", ["zero", "top", "one"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.array(v, np.float16), n) for n, v in (("zero", 0), ("one", 1))]
    g = helper.make_graph(nodes, "range16", [_vi("x", [1, 8], half)], [_vi("y", ["n"], half)], inits)
    path = str(tmp_path / "range16.onnx")
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    h = open_model(path)
    cut = h.cuts()[0]
    with pytest.raises(ModelError, match=r"could not run the model: .*INVALID_GRAPH.*Range") as e:
        write_plan(h, tmp_path / "p", cut=cut)
    assert "--input-shape" not in str(e.value)


def test_the_batch_moved_inside_by_a_permute_after_a_computed_reshape_is_the_batch(tmp_path):
    """torch's dynamo export of a ViT permutes qkv to [3, batch, heads, tokens, size] after a reshape to a
    computed shape: inference invents a symbol there, which the cut list showed (3xunk__1x...) with its
    bytes per sample unknown. Two trial runs show the dim following the batch: it is the batch."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Concat", ["n", "rest"], ["computed"], axis=0),
        helper.make_node("Div", ["computed", "one"], ["shape"]),  # past what inference can follow
        helper.make_node("Reshape", ["x", "shape"], ["r"]),
        helper.make_node("Transpose", ["r"], ["t"], perm=[2, 0, 1, 3]),
        helper.make_node("Relu", ["t"], ["u"]),
        helper.make_node("Sigmoid", ["u"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([4, 2, 3], np.int64), "rest"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
    ]
    model = _tiny(nodes, [_vi("x", ["N", 4, 6])], [_vi("y", [2, "N", 4, 3])], inits, name="perm")
    h = open_model(_save(model, tmp_path / "perm.onnx"))
    cut = next(c for c in h.cuts() if [t.name for t in c.crossing] == ["u"])
    (u,) = cut.crossing
    assert u.shape == "2xNx4x3" and u.bytes_per_sample == 2 * 4 * 3 * 4


def test_a_part_strict_inference_refuses_where_the_whole_model_passes_is_checked_as_the_model_was(tmp_path):
    """An audio front end (whisper's log-mel, as onnx-asr ships it) pads the waveform to a computed length,
    then runs an STFT on the 2-D signal: the whole model passes strict inference (the padded length is
    unknown there), but a tail that receives the padded waveform at its now known length fails it, and
    those listed cuts were refused. onnxruntime runs them, exactly."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    a = numpy_helper.from_array
    inits = [
        a(np.array(1600, np.int64), "total"),
        a(np.array([0, 0, 0, 1], np.int64), "sel"),
        a(np.array([0, 20, 0, 20], np.int64), "refl"),
        a(np.array(16, np.int64), "hop"),
        a(np.hanning(40).astype(np.float32), "win"),
        a(np.array([0], np.int64), "s0"),
        a(np.array([-1], np.int64), "e1"),
        a(np.array([1], np.int64), "a1"),
        a(rng.standard_normal((21, 8)).astype(np.float32), "mel"),
    ]
    nodes = [
        helper.make_node("Shape", ["x"], ["len"], start=1, end=2),
        helper.make_node("Sub", ["total", "len"], ["short"]),
        helper.make_node("Mul", ["sel", "short"], ["pads"]),
        helper.make_node("Pad", ["x", "pads"], ["xp"]),
        helper.make_node("Pad", ["xp", "refl"], ["xr"], mode="reflect"),
        helper.make_node("STFT", ["xr", "hop", "win"], ["spec"]),
        helper.make_node("Slice", ["spec", "s0", "e1", "a1", "a1"], ["image"]),
        helper.make_node("ReduceSumSquare", ["image"], ["power"], axes=[-1], keepdims=0),
        helper.make_node("MatMul", ["power", "mel"], ["y"]),
    ]
    model = _tiny(nodes, [_vi("x", [1, "N"])], [_vi("y", [1, None, 8])], inits, name="logmel")
    path = _save(model, tmp_path / "logmel.onnx")
    h = open_model(path, input_shapes={"x": [1, 1000]})
    x = rng.standard_normal((1, 1000)).astype(np.float32)
    full = ort.InferenceSession(path).run(None, {"x": x})[0]
    padded = [c for c in h.cuts() if [t.name for t in c.crossing] in (["xp"], ["xr"])]
    assert len(padded) == 2
    for cut in h.cuts():
        np.testing.assert_array_equal(run_split(*extract(h.index, cut), cut, {"x": x})["y"], full)
    write_plan(h, tmp_path / "plan", cut=padded[0])


def test_a_split_of_a_model_that_does_not_run_at_these_shapes_says_so_not_that_the_cut_failed(tmp_path):
    """A hummingbird export traced at batch 5 reshapes to [5, ...]: at batch 1 the whole model fails.
    `split` said the tail "does not run on what the stages before it produced", blaming the cut; it says
    what `profile` says, and points at --input-shape."""
    from splitpoint.core.errors import ModelError

    shape = numpy_helper.from_array(np.array([5, 4], np.int64), "five")
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Reshape", ["r", "five"], ["f"]),
        helper.make_node("Sigmoid", ["f"], ["y"]),
    ]
    path = _save(
        _tiny(nodes, [_vi("x", ["N", 4])], [_vi("y", [5, 4])], [shape], name="hb"), tmp_path / "hb.onnx"
    )
    h = open_model(path)
    cut = next(c for c in h.cuts() if [t.name for t in c.crossing] == ["r"])
    with pytest.raises(
        ModelError, match=r"could not run the model at these input shapes \(see --input-shape\)"
    ):
        write_plan(h, tmp_path / "p", cut=cut)
    assert not (tmp_path / "p").exists()
    at5 = open_model(path, input_shapes={"x": [5, 4]})
    write_plan(at5, tmp_path / "p5", cut=next(c for c in at5.cuts() if [t.name for t in c.crossing] == ["r"]))


def test_a_reference_the_same_on_every_sample_is_said_to_say_little(caplog):
    """An audio front end whose random lengths masked every frame answered zeros on every sample: every
    split then scored perfect, silently."""
    import logging

    from splitpoint.partitioner.fidelity import warn_if_constant

    zeros = [np.zeros((4, 80), np.float32), np.zeros((4,), np.int64)]
    with caplog.at_level(logging.WARNING, logger="splitpoint.fidelity"):
        assert warn_if_constant(zeros, 4)
    assert "same outputs on all 4 samples" in caplog.text and "--inputs" in caplog.text
    varied = [np.arange(8, dtype=np.float32).reshape(4, 2)]
    assert not warn_if_constant(varied, 4) and not warn_if_constant(zeros, 1)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="splitpoint.fidelity"):
        assert warn_if_constant(zeros, 4, given=True)  # the user's own samples: no --inputs to suggest
    assert "samples given are alike" in caplog.text and "--inputs" not in caplog.text


def test_an_integer_output_has_no_cosine_to_read_as_perfect():
    """A class index per sample (an argmax output) with one of four wrong: its cosine per row is 1 whatever
    the ids, so the report gives none and its agreement is the share of equal ids."""
    ref = np.array([3, 1, 4, 1], np.int64)
    got = np.array([3, 1, 4, 2], np.int64)
    o = compare("cls", ref, got, 4)
    assert o.cosine is None and o.exact_agreement == 0.75 and o.primary == 0.75
    assert compare("cls", ref, ref, 4).primary == 1.0


def test_a_sample_of_another_shape_counts_as_wholly_wrong():
    ref = join([[np.arange(3.0)], [np.arange(5.0)], [np.ones(2)]])[0]
    assert isinstance(ref, Ragged) and [a.shape for a in ref] == [(3,), (5,), (2,)]
    got = Ragged([np.arange(3.0), np.arange(4.0), np.ones(2) * 1.5])
    o = compare("boxes", ref, got, 3)
    assert o.shape_mismatches == 1 and o.max_abs_error == 0.5
    assert abs(o.cosine - 2 / 3) < 1e-9  # two samples line up (cosine 1), one does not (0)
    same = compare("boxes", ref, ref, 3)
    assert same.cosine == 1.0 and same.shape_mismatches == 0 and same.snr_db == 300.0
    # a joined reference against a split of another total length: still sample by sample
    o2 = compare("scores", np.ones((2, 4)), Ragged([np.ones((1, 4)), np.ones((1, 5))]), 2)
    assert o2.shape_mismatches == 1 and o2.top1_agreement == 0.5


def bool_scalar_model() -> onnx.ModelProto:
    """A rank-0 boolean input choosing a branch (an If), as a flag a user passes beside the data."""
    then_g = helper.make_graph(
        [helper.make_node("Relu", ["a"], ["o1"])],
        "then",
        [],
        [helper.make_tensor_value_info("o1", TensorProto.FLOAT, [1, 8])],
    )
    else_g = helper.make_graph(
        [helper.make_node("Neg", ["a"], ["o2"])],
        "else",
        [],
        [helper.make_tensor_value_info("o2", TensorProto.FLOAT, [1, 8])],
    )
    nodes = [
        helper.make_node("Sigmoid", ["x"], ["a"]),
        helper.make_node("If", ["flag"], ["b"], then_branch=then_g, else_branch=else_g),
        helper.make_node("ReduceSum", ["b"], ["y"], keepdims=1),
    ]
    g = helper.make_graph(
        nodes,
        "flagged",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]),
            helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_a_rank_0_boolean_input_splits_and_is_sampled_as_an_array(tmp_path):
    model = bool_scalar_model()
    feeds = sample_feeds(model, 1, 3)
    assert isinstance(feeds["flag"], np.ndarray) and feeds["flag"].shape == () and feeds["flag"].dtype == bool
    h = open_model(_save(model, tmp_path / "flag.onnx"))
    cuts = enumerate_cuts(h.index)
    assert cuts
    import onnxruntime as ort

    for value in (True, False):
        one = {"x": feeds["x"], "flag": np.array(value)}
        full = ort.InferenceSession(model.SerializeToString()).run(None, one)[0]
        for cut in cuts:
            np.testing.assert_allclose(run_split(*extract(h.index, cut), cut, one)["y"], full, rtol=1e-6)
    for cut in cuts:  # a plan's trial run samples the flag too
        write_plan(h, tmp_path / f"p{cut.index}", cut=cut)


def test_samples_are_cast_to_the_input_s_type_only_where_their_values_survive(tmp_path):
    """--inputs of float32 for a float16 input are taken as float16 (a float64 .npy as float32, an image's
    bytes as floats), but a value the type cannot hold is refused by file, not made infinite or cut to a
    whole number: 70,000 became inf as float16 and fidelity was measured on it in silence."""
    from splitpoint.core.errors import SplitPointError
    from splitpoint.core.samples import load_inputs

    half = _tiny(
        [helper.make_node("Relu", ["x"], ["y"])],
        [_vi("x", [1, 4], TensorProto.FLOAT16)],
        [_vi("y", [1, 4], TensorProto.FLOAT16)],
    )
    ids = _tiny(
        [helper.make_node("Neg", ["t"], ["y"])],
        [_vi("t", [1, 4], TensorProto.INT64)],
        [_vi("y", [1, 4], TensorProto.INT64)],
    )
    d = tmp_path / "in"
    d.mkdir()
    np.save(d / "a.npy", np.array([[1, 2, 3, 65504]], np.float64))
    assert load_inputs(half, d)[0]["x"].dtype == np.float16 and load_inputs(ids, d)[0]["t"].dtype == np.int64
    np.save(d / "b.npy", np.array([[1, 2, 3, 70000]], np.float32))
    with pytest.raises(
        SplitPointError, match=r"b.npy: input x takes float16; .* \(65504\) would be infinite"
    ):
        load_inputs(half, d)
    np.save(d / "b.npy", np.array([[1, 2.5, 3, 4]], np.float32))
    with pytest.raises(
        SplitPointError, match=r"b.npy: input t takes int64; this file holds float32, .*change"
    ):
        load_inputs(ids, d)
    single = _tiny([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", [1, 4])], [_vi("y", [1, 4])])
    np.save(d / "b.npy", np.array([[1, 2, 3, 2**40 + 1]], np.int64))  # an id float32 cannot hold
    with pytest.raises(SplitPointError, match=r"b.npy: input x takes float32; this file holds int64"):
        load_inputs(single, d)
    np.save(d / "b.npy", np.array([[1, 2, 3, 1j]], np.complex64))
    with pytest.raises(SplitPointError, match=r"complex values would lose their imaginary part"):
        load_inputs(single, d)


def test_samples_of_a_single_scalar_input_are_read_from_npy_files(tmp_path):
    """A model whose one input is a rank-0 value takes `--inputs` of 0-d .npy files, one sample each (the
    reader took the first dimension as the batch of every file and failed with an IndexError)."""
    from splitpoint.core.errors import SplitPointError
    from splitpoint.core.samples import load_inputs

    nodes = [helper.make_node("Exp", ["t"], ["a"]), helper.make_node("Add", ["a", "t"], ["y"])]
    model = _tiny(nodes, [_vi("t", [])], [_vi("y", [])], name="scalar")
    (tmp_path / "in").mkdir()
    for k, v in enumerate((0.7, -1.5)):
        np.save(tmp_path / "in" / f"s{k}.npy", np.array(v, np.float32))
    samples = load_inputs(model, tmp_path / "in")
    assert [s["t"].shape for s in samples] == [(), ()] and float(samples[1]["t"]) == -1.5
    np.save(tmp_path / "in" / "s2.npy", np.ones(3, np.float32))
    with pytest.raises(SplitPointError, match=r"s2.npy: shape \(3,\); input t is a scalar"):
        load_inputs(model, tmp_path / "in")
    (tmp_path / "in" / "s2.npy").unlink()
    path = _save(model, tmp_path / "scalar.onnx")
    r = run_cli("fidelity", path, "--cut", "1", "--codec", "float32", "--inputs", str(tmp_path / "in"))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "measured on 2 inputs from" in " ".join(r.stdout.split()), r.stdout


def test_a_time_major_rnn_with_its_lengths_is_measured_sample_by_sample(tmp_path):
    """x[T, N, F] beside sequence_lens[N]: every input's first axis is free, but x's is time. Samples joined
    along it gave onnxruntime 8 samples' steps against 8 samples' lengths, and fidelity and plan failed
    (blaming --input-shape) on a model each sample runs alone."""
    from splitpoint.core.runner import run_samples

    rng = np.random.default_rng(4)
    hid, feat = 4, 3
    inits = [
        numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, name)
        for name, shape in (("W", (1, 4 * hid, feat)), ("R", (1, 4 * hid, hid)), ("B", (1, 8 * hid)))
    ]
    nodes = [
        helper.make_node("Tanh", ["x"], ["xt"]),
        helper.make_node("LSTM", ["xt", "W", "R", "B", "lens"], ["Y", "Yh"], hidden_size=hid),
        helper.make_node("Relu", ["Yh"], ["out"]),
    ]
    model = _tiny(
        nodes,
        [_vi("x", ["T", "N", feat]), _vi("lens", ["N"], TensorProto.INT32)],
        [_vi("out", [1, "N", hid])],
        inits,
        name="time_major",
    )
    path = _save(model, tmp_path / "tm.onnx")
    samples = [
        {"x": rng.standard_normal((6, 2, feat)).astype(np.float32), "lens": np.array([k + 1, 6], np.int32)}
        for k in range(3)
    ]
    sess = make_session(path, threads=1)
    got = run_samples(sess, samples)
    for s, outs in zip(samples, got, strict=True):
        np.testing.assert_array_equal(outs[0], sess.run(None, s)[0])
    (tmp_path / "in").mkdir()
    for k, s in enumerate(samples):
        np.savez(tmp_path / "in" / f"s{k}.npz", **s)
    r = run_cli(
        "fidelity",
        path,
        "--input-shape",
        "x:6x2x3",
        "--cut",
        "1",
        "--codec",
        "int8",
        "--inputs",
        tmp_path / "in",
    )
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "measured on 3 inputs from" in " ".join(r.stdout.split()), r.stdout


def test_big_endian_sample_files_are_read_in_this_machines_byte_order(tmp_path):
    """``np.save`` keeps a big-endian array's byte order, and onnxruntime reads such an array's bytes in
    its own order without a word: a valid '>f4' file became NaN and noise. Files are converted on reading;
    an array handed to the API in the other order is refused, saying how to convert it."""
    from splitpoint.core.runner import mismatch
    from splitpoint.core.samples import read_sample

    x = np.random.default_rng(0).standard_normal((1, 8)).astype(np.float32)
    np.save(tmp_path / "a.npy", x.astype(">f4"))
    np.savez(tmp_path / "b.npz", x=x.astype(">f4"), n=np.arange(3, dtype=">i8"))
    a = read_sample(tmp_path / "a.npy", {"x": 2})["x"]
    b = read_sample(tmp_path / "b.npz", {"x": 2, "n": 1})
    for arr, want in ((a, x), (b["x"], x), (b["n"], np.arange(3))):
        assert arr.dtype.isnative and arr.dtype == want.dtype
        np.testing.assert_array_equal(arr, want)
    said = mismatch("x", x.astype(">f4"), (np.dtype(np.float32), ("N", 8)))
    assert said is not None and "other byte order" in said and ".astype('float32')" in said


def _old_upsampler(tmp_path, opset: int, mode: str, first: list | None = None) -> tuple[str, int]:
    """An old Model Zoo style file: Conv, Upsample (``mode``), Relu, Sigmoid at ``opset``, IR 3 (the weight
    listed as an input), ``first`` nodes before the Conv; its path and the cut before the Sigmoid."""
    w = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((4, 2, 3, 3)).astype(np.float32), "w"
    )
    scales = [1.0, 1.0, 2.0, 2.0]
    up = (
        helper.make_node("Upsample", ["c"], ["u"], scales=scales, mode=mode)
        if opset < 9
        else helper.make_node("Upsample", ["c", "s"], ["u"], mode=mode)
    )
    inits = [w] + ([numpy_helper.from_array(np.array(scales, np.float32), "s")] if opset >= 9 else [])
    nodes = [
        *(first or []),
        helper.make_node("Conv", ["x0" if first else "x", "w"], ["c"], pads=[1, 1, 1, 1]),
        up,
        helper.make_node("Relu", ["u"], ["r"]),
        helper.make_node("Sigmoid", ["r"], ["y"]),
    ]
    inputs = [_vi("x", [1, 2, 4, 4]), _vi("w", [4, 2, 3, 3])] + ([_vi("s", [4])] if opset >= 9 else [])
    g = helper.make_graph(nodes, "old", inputs, [_vi("y", [1, 4, 8, 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 3
    path = _save(m, tmp_path / f"old{opset}-{mode}.onnx")
    cut = next(c for c in open_model(path).cuts() if [t.name for t in c.crossing] == ["r"])
    return path, cut.index


def test_an_old_opset_head_is_quantised_at_an_opset_the_quantiser_takes(tmp_path):
    """An opset-8 Upsample in the head: onnxruntime's dynamic quantiser converted it to opset 11 itself, by
    a route onnx has no adapter for, and failed; converted to opset 10 first (checked to compute the same),
    it quantises, dynamically and statically."""
    path, cut = _old_upsampler(tmp_path, 8, "nearest")
    for mode in ("dynamic", "static"):
        args = ("fidelity", path, "--cut", str(cut), "--codec", "float32", "--random", "2", "--json")
        r = run_cli(*args, "--quantize-head-weights", mode)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["outputs"][0]["cosine"] > 0.99, r.stdout


def test_a_head_the_converter_changes_is_refused_not_measured_as_int8s_error(tmp_path):
    """onnx's converter turns an opset-9 Upsample(linear) into a Resize that computes something else (its
    coordinates differ): static int8 (which needs opset 13) measured the converter's error as int8's. The
    converted head is run beside the original first, and a difference is refused in words naming the op;
    dynamic int8 (opset 10, where Upsample stays) quantises it."""
    path, cut = _old_upsampler(tmp_path, 9, "linear")
    args = ("fidelity", path, "--cut", str(cut), "--codec", "float32", "--random", "2")
    r = run_cli(*args, "--quantize-head-weights", "static")
    said = " ".join(r.stderr.split())
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "onnx's converter from opset 9 changes what it computes (output 'r': off by up to" in said, said
    assert (
        "it rewrote Upsample" in said and "leave out --quantize-head-weights, --int8 and --int8-heads" in said
    )
    assert run_cli(*args, "--quantize-head-weights", "dynamic").returncode == 0
    # an op ONNX defines no more (tinyyolov2-8's ImageScaler) is named, not onnx's unfilled "Op '%s'"
    scaler = [helper.make_node("ImageScaler", ["x"], ["x0"], scale=0.5, bias=[0.1, 0.2])]
    path, cut = _old_upsampler(tmp_path, 8, "nearest", first=scaler)
    r = run_cli("fidelity", path, "--cut", str(cut), "--random", "2", "--quantize-head-weights", "dynamic")
    said = " ".join(r.stderr.split())
    assert r.returncode == 2 and "this opset-8 model's ImageScaler (ONNX defines it no more)" in said, said
    assert "%s" not in said


def test_ir3_files_whose_weights_the_checker_refuses_still_split_exactly(tmp_path):
    """Two IR 3 files onnxruntime runs: a weight listed as an input with no shape (older converters),
    and an initializer not listed (onnx.version_converter adds one and keeps IR 3). Both were refused as
    failing the checker; both split, and the split equals the whole model."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("Relu", ["m"], ["r"]),
        helper.make_node("Add", ["r", "b"], ["y"]),
    ]
    no_shape = onnx.ValueInfoProto(name="w")  # listed, typed by nothing
    for name, inputs in (
        ("noshape", [_vi("x", [1, 8]), no_shape, _vi("b", [8])]),
        ("unlisted", [_vi("x", [1, 8])]),
    ):
        g = helper.make_graph(nodes, name, inputs, [_vi("y", [1, 8])], [w, b])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 9)])
        m.ir_version = 3
        path = tmp_path / f"{name}.onnx"
        onnx.save(m, str(path))
        with pytest.raises(onnx.checker.ValidationError):
            onnx.checker.check_model(str(path))
        x = rng.standard_normal((1, 8)).astype(np.float32)
        full = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
        h = open_model(path)
        assert [i.name for i in h.model.graph.input] == ["x"]
        for cut in h.cuts():
            got = run_split(*extract(h.index, cut), cut, {"x": x})["y"]
            np.testing.assert_array_equal(got, full)


def test_a_model_strict_shape_inference_refuses_is_split_as_checked_when_loaded(tmp_path):
    """Opset 8's Constant allows only floats; exporters wrote int64 shapes with it and onnxruntime runs
    them. Every cut listed used to fail when written (its part failed the strict checker on that node);
    the parts get the check the model passed."""
    import onnxruntime as ort

    shape = helper.make_tensor("s", TensorProto.INT64, [2], [1, 16])
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Constant", [], ["shape"], value=shape),
        helper.make_node("Reshape", ["r", "shape"], ["f"]),
        helper.make_node("Sigmoid", ["f"], ["y"]),
    ]
    g = helper.make_graph(nodes, "op8", [_vi("x", [1, 4, 4])], [_vi("y", [1, 16])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 8)])
    m.ir_version = 4
    onnx.checker.check_model(m)
    with pytest.raises(onnx.shape_inference.InferenceError):
        onnx.checker.check_model(m, full_check=True)
    path = str(tmp_path / "op8.onnx")
    onnx.save(m, path)
    h = open_model(path)
    assert not h.index.strict_checks
    x = np.random.default_rng(0).standard_normal((1, 4, 4)).astype(np.float32)
    full = ort.InferenceSession(path).run(None, {"x": x})[0]
    assert h.cuts()
    for cut in h.cuts():
        np.testing.assert_array_equal(run_split(*extract(h.index, cut), cut, {"x": x})["y"], full)
        write_plan(h, tmp_path / f"p{cut.index}", cut=cut)


def _ml_model(nodes, inputs, outputs) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "ml", inputs, outputs)
    m = helper.make_model(
        g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)]
    )
    m.ir_version = 8
    return m


def test_inputs_and_outputs_no_codec_carries_are_refused_by_name(tmp_path):
    """A classifier converted with string labels or a ZipMap: every plan sends inputs or outputs, so the
    model is refused at once, naming the value and the conversion that fixes it."""
    import pytest

    from splitpoint.core.errors import ModelError

    x = helper.make_tensor_value_info("x", TensorProto.INT64, [1])
    labels = _ml_model(
        [
            helper.make_node(
                "LabelEncoder",
                ["x"],
                ["label"],
                domain="ai.onnx.ml",
                keys_int64s=[0, 1],
                values_strings=["cat", "dog"],
            )
        ],
        [x],
        [helper.make_tensor_value_info("label", TensorProto.STRING, [1])],
    )
    with pytest.raises(
        ModelError, match=r"output 'label' is a string tensor \(a classifier's labels as strings"
    ):
        open_model(_save(labels, tmp_path / "labels.onnx"))
    words = _ml_model(
        [
            helper.make_node(
                "LabelEncoder",
                ["w"],
                ["id"],
                domain="ai.onnx.ml",
                keys_strings=["a", "b"],
                values_int64s=[0, 1],
            )
        ],
        [helper.make_tensor_value_info("w", TensorProto.STRING, [1])],
        [helper.make_tensor_value_info("id", TensorProto.INT64, [1])],
    )
    with pytest.raises(ModelError, match=r"input 'w' is a string tensor \(categories as strings"):
        open_model(_save(words, tmp_path / "words.onnx"))
    probs = helper.make_tensor_value_info("p", TensorProto.FLOAT, [1, 2])
    zipped = _ml_model(
        [helper.make_node("ZipMap", ["p"], ["z"], domain="ai.onnx.ml", classlabels_int64s=[0, 1])],
        [probs],
        [
            helper.make_value_info(
                "z",
                helper.make_sequence_type_proto(
                    helper.make_map_type_proto(
                        TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [])
                    )
                ),
            )
        ],
    )
    with pytest.raises(
        ModelError, match=r"output 'z' is a sequence \(ZipMap's: convert the model without it"
    ):
        open_model(_save(zipped, tmp_path / "zipped.onnx"))


def test_a_bfloat16_tensor_never_crosses_a_cut(tmp_path):
    """onnxruntime hands no bfloat16 array to Python and no payload carries one: the cuts where it
    would cross are left out, and naming it as a cut says why."""
    import pytest

    from splitpoint.core.errors import CutError
    from splitpoint.core.graph.cuts import cut_by_index, cut_by_tensors

    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Cast", ["r"], ["b"], to=TensorProto.BFLOAT16),
        helper.make_node("Identity", ["b"], ["b2"]),
        helper.make_node("Cast", ["b2"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Neg", ["f"], ["y"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])
    g = helper.make_graph(nodes, "bf", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    h = open_model(_save(m, tmp_path / "bf.onnx"))
    assert [c.index for c in h.cuts()] == [1, 4]
    for cut in h.cuts():
        write_plan(h, tmp_path / f"p{cut.index}", cut=cut)
    # by index as by name: the tensor and its type (the index alone said "a value no codec carries")
    with pytest.raises(
        CutError, match=r"cut 2: invalid cut: b \(bfloat16\) would cross, and no codec carries"
    ):
        cut_by_index(h.index, 2)
    with pytest.raises(CutError, match=r"b \(bfloat16\) would cross, and no codec carries that type"):
        cut_by_tensors(h.index, ["b"])


def test_a_symbol_given_for_one_input_fixes_it_in_the_others():
    """An LSTM's initial states share the data's batch: --input-shape for the data is enough."""
    from splitpoint.core.graph.shapes import apply_input_shapes

    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Identity", ["h"], ["y"]),
    ]
    g = helper.make_graph(
        nodes,
        "rnn",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 4]),
            helper.make_tensor_value_info("h", TensorProto.FLOAT, [2, "batch", 3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, "batch", 3])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    fixed = apply_input_shapes(m, {"x": [1, 12, 4]})
    dims = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in fixed.graph.input}
    assert dims == {"x": [1, 12, 4], "h": [2, 1, 3]}
    # the batch is h's second dimension, so it cannot stay free: N for x is not offered, and kept free
    # beside a size for h (accepted, it planned cuts that failed at the batch it sampled) is refused
    from splitpoint.core.errors import ModelError
    from splitpoint.core.graph.shapes import KEEP

    with pytest.raises(ModelError, match=r"--input-shape x:\?x\?x4 "):
        apply_input_shapes(m, {})
    with pytest.raises(ModelError, match="'batch' is the first dimension of x, kept free, and a later one"):
        apply_input_shapes(m, {"x": [KEEP, 12, 4]})
    with pytest.raises(ModelError, match="x keeps dimension 'batch' free, but --input-shape h gives it 2"):
        apply_input_shapes(m, {"x": [KEEP, 12, 4], "h": [2, 2, 3]})
    # a sequence length left free (x:?x?x4 as the hint shows it, ? kept): that case, not the first one,
    # which named 'seq' x's first dimension and a later one of another input
    with pytest.raises(ModelError) as refused:
        apply_input_shapes(m, {"x": [1, KEEP, 4], "h": [2, 1, 3]})
    said = str(refused.value)
    assert "left a dimension past the batch unknown" in said and "is the first dimension" not in said, said


def test_every_input_missing_a_size_is_named_in_one_error(tmp_path):
    """A BERT-like export: ids and token types share a free sequence length, the mask has its own. One
    run of the command names all three and gives the options needed, once per symbol, so the user
    fixes them in one go."""
    g = helper.make_graph(
        [helper.make_node("Add", ["ids", "types"], ["s"]), helper.make_node("Add", ["s", "mask"], ["y"])],
        "bert-ish",
        [
            helper.make_tensor_value_info("ids", TensorProto.FLOAT, ["batch", "seq"]),
            helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", "seq_m"]),
            helper.make_tensor_value_info("types", TensorProto.FLOAT, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq"])],
    )
    path = tmp_path / "three.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    r = run_cli("cuts", str(path))
    assert r.returncode != 0
    msg = r.stderr.strip()
    assert "Traceback" not in r.stderr and len(msg.splitlines()) == 1, msg
    assert "3 inputs have unknown dimensions: 'ids' (seq); 'mask' (seq_m); 'types' (seq)" in msg, msg
    assert "give --input-shape ids:Nx? --input-shape mask:Nx? (which fixes them in 'types' too)" in msg, msg
    # and the options it gives are enough
    assert run_cli("cuts", str(path), "--input-shape", "ids:1x8", "--input-shape", "mask:1x8").returncode == 0
    # an N past the batch leaves that dimension free, and the error says why it still asks for it
    r = run_cli("cuts", str(path), "--input-shape", "ids:1xN", "--input-shape", "mask:1x8")
    assert r.returncode != 0 and "'ids' (seq); 'types' (seq)" in r.stderr, r.stderr
    assert "N, ? or -1 in --input-shape ids left a dimension past the batch unknown" in r.stderr, r.stderr


def test_a_decoder_given_to_a_one_shot_command_is_sent_to_the_decoder_commands(tmp_path):
    """An exported decoder's cache has no size to give (it grows a token per step): the error that asks
    for the sizes also names the commands that split a decoder between its layers."""
    from splitpoint.core.zoo import write

    ((path, _),) = write(["decoder-tiny"], tmp_path)
    r = run_cli("cuts", str(path))
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "'past_key_values.0.key' (past_sequence)" in r.stderr, r.stderr
    assert "inputs named past_key_values.* are a decoder's KV cache: `splitpoint split-decoder`" in r.stderr


def test_a_missing_input_is_refused_by_name_on_every_kind_of_plan(tmp_path):
    """A text model's ids and mask, the mask left out: refused by name, as a bad input, whether the plan
    runs a head (split) or the whole model on the edge (edge-only), which ran it to a KeyError."""
    from splitpoint.core.plan import EDGE_ONLY
    from splitpoint.edge.client import EdgeClient, EdgeError
    from splitpoint.edge.config import EdgeConfig

    g = helper.make_graph(
        [helper.make_node("Mul", ["ids", "mask"], ["m"]), helper.make_node("Relu", ["m"], ["y"])],
        "two",
        [
            helper.make_tensor_value_info("ids", TensorProto.FLOAT, [1, 8]),
            helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 8]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
    )
    path = tmp_path / "two.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    h = open_model(path)
    write_plan(h, tmp_path / "local", kind=EDGE_ONLY)
    write_plan(h, tmp_path / "split", cut=enumerate_cuts(h.index)[0])
    ids = np.ones((1, 8), np.float32)
    for plan in ("local", "split"):
        cfg = EdgeConfig(plan_dir=tmp_path / plan, server="tcp://127.0.0.1:1", fallback=False, timeout_s=1)
        with EdgeClient(cfg) as c:
            with pytest.raises(
                EdgeError, match=r"missing model input\(s\): mask \(this plan's inputs: ids, mask\)"
            ) as e:
                c.infer({"ids": ids}, timeout=10)
            assert e.value.code == "bad-input", plan
            if plan == "local":
                assert c.infer({"ids": ids, "mask": ids}, timeout=10)["y"].tolist() == ids.tolist()


def test_weights_listed_as_inputs_run_as_constants_in_the_profile_as_in_every_plan(tmp_path):
    """An opset-9 export with ``keep_initializers_as_inputs`` (IR 4) lists every weight as a graph
    input too. onnxruntime then treats them as overridable and folds nothing (no Conv+BatchNorm fusion);
    every plan's segments hold them as constants. The whole model is profiled, and its reference outputs
    taken, as the plans run it, not as the file would (an opset-9 ResNet-18 export: 55 % slower)."""
    from splitpoint.core.runner import make_session
    from splitpoint.profiles.profiler import ProfileSettings, profile_model

    rng = np.random.default_rng(0)
    arrays = {
        "W": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
        "scale": rng.random(8).astype(np.float32) + 0.5,
        "B": rng.standard_normal(8).astype(np.float32),
        "mean": rng.standard_normal(8).astype(np.float32),
        "var": rng.random(8).astype(np.float32) + 0.5,
    }
    inits = [numpy_helper.from_array(a, k) for k, a in arrays.items()]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "scale", "B", "mean", "var"], ["b"]),
        helper.make_node("Relu", ["b"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["y"]),
    ]
    weights_as_inputs = [_vi(k, list(a.shape)) for k, a in arrays.items()]
    g = helper.make_graph(
        nodes, "ir4", [_vi("x", [1, 3, 16, 16]), *weights_as_inputs], [_vi("y", [1, 8, 1, 1])], inits
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 9)])
    m.ir_version = 4
    path = _save(m, tmp_path / "ir4.onnx")
    assert {i.name for i in make_session(path).get_overridable_initializers()} == set(arrays)

    h = open_model(path)
    assert not h.file_runs_as_planned and [i.name for i in h.model.graph.input] == ["x"]
    whole = make_session(h.runnable, weights=h.index.weight_array)
    assert whole.get_overridable_initializers() == [] and [i.name for i in whole.get_inputs()] == ["x"]
    x = rng.standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(
        whole.run(None, {"x": x})[0], make_session(path).run(None, {"x": x})[0], rtol=1e-5
    )
    # the profiler's whole-model session is that one: its per-node trace shows the fused Conv (no
    # BatchNormalization node left to time), as the plans' segments run
    prof = profile_model(h, ProfileSettings(threads=1, budget=8))
    timed = {n.op_type for n in prof.nodes if n.median_ms > 0}
    assert "BatchNormalization" not in timed, timed
    # a model that lists no weight as an input runs from its file, as it always did
    assert open_model("resnet18").file_runs_as_planned


def test_a_tensor_whose_name_holds_a_comma_is_a_cut_by_that_name():
    from splitpoint.core.graph.cuts import resolve_cut
    from splitpoint.core.graph.index import GraphIndex

    nodes = [helper.make_node("Relu", ["x"], ["a,b"]), helper.make_node("Neg", ["a,b"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    g = helper.make_graph(nodes, "c", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    idx = GraphIndex.build(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    assert [c.name for c in resolve_cut(idx, "a,b").crossing] == ["a,b"]


def test_an_int16_audio_input_is_split_and_served(tmp_path):
    """16-bit PCM samples in (a keyword spotter's input), cast inside the model: a server-only plan sends
    them exact, and the served answer is the model's."""
    from splitpoint.core.runner import make_session
    from splitpoint.edge.client import EdgeClient
    from splitpoint.edge.config import EdgeConfig
    from splitpoint.server.config import ServerConfig
    from splitpoint.server.tail_server import TailServer

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((160, 8)) / 3e4).astype(np.float32), "w")
    nodes = [
        helper.make_node("Cast", ["pcm"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["f", "frames"], ["r"]),
        helper.make_node("MatMul", ["r", "w"], ["m"]),
        helper.make_node("ReduceMean", ["m"], ["y"], axes=[1], keepdims=0),
    ]
    frames = numpy_helper.from_array(np.array([1, 10, 160], np.int64), "frames")
    g = helper.make_graph(
        nodes,
        "kws",
        [helper.make_tensor_value_info("pcm", TensorProto.INT16, [1, 1600])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [w, frames],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    h = open_model(_save(m, tmp_path / "kws.onnx"))
    write_plan(h, tmp_path / "plans" / "server", kind="server-only", codec="int8+zstd")
    write_plan(h, tmp_path / "plans" / "split", cut=h.cuts()[0], codec="float16")
    pcm = {"pcm": rng.integers(-(2**15), 2**15, (1, 1600)).astype(np.int16)}
    want = make_session(h.path).run(None, pcm)[0]
    srv = TailServer(ServerConfig(bind="tcp://127.0.0.1:0", plans_dir=tmp_path / "plans")).start()
    try:
        for name, tol in (("server", 1e-6), ("split", 1e-2)):
            cfg = EdgeConfig(plan_dir=tmp_path / "plans" / name, server=srv.endpoint, fallback=False)
            with EdgeClient(cfg) as c:
                got = c.infer(pcm, timeout=30)["y"]
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
        # the server holds the input to its dtype: the same samples as int32 are the sender's error
        import zmq

        from splitpoint.core import wire
        from splitpoint.core.codecs import encode

        plan_id = Plan.load(tmp_path / "plans" / "server").plan_id
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(srv.endpoint)
        try:
            wide = [encode(pcm["pcm"].astype(np.int32), "float32")]
            s.send_multipart(wire.Message(wire.INFER, 1, plan_id, ["pcm"], frames=wide).to_frames())
            assert s.poll(10000)
            reply = wire.parse(s.recv_multipart())
            assert reply.type == wire.ERROR and reply.meta["code"] == wire.E_BAD_TENSOR, reply.meta
            assert "int16" in reply.meta["message"]
        finally:
            s.close(0)
    finally:
        srv.stop()


def _tiny(nodes, inputs, outputs, inits=(), name="tiny", domains=()) -> onnx.ModelProto:
    g = helper.make_graph(nodes, name, inputs, outputs, list(inits))
    m = helper.make_model(
        g, opset_imports=[helper.make_opsetid("", 17), *(helper.make_opsetid(d, 1) for d in domains)]
    )
    m.ir_version = 8
    return m


def _vi(name, dims, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, dims)


def test_a_tensor_name_past_the_plan_format_is_refused_in_words_before_anything_is_written(tmp_path):
    long = "n" * 1500
    m = _tiny(
        [helper.make_node("Relu", ["x"], [long]), helper.make_node("Neg", [long], ["y"])],
        [_vi("x", [1, 4])],
        [_vi("y", [1, 4])],
    )
    path = _save(m, tmp_path / "long.onnx")
    r = run_cli("split", path, "--cut", "1", "-o", str(tmp_path / "p"))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "(1500 characters)' cannot go into a plan" in r.stderr and "rename it in the model" in r.stderr
    assert not (tmp_path / "p").exists()


def test_a_model_with_no_cut_is_planned_all_on_the_edge_or_all_on_the_server(tmp_path):
    """One compute node: nothing to cut, but the model still runs on one side or the other."""
    m = _tiny([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", [1, 8])], [_vi("y", [1, 8])])
    path = _save(m, tmp_path / "one.onnx")
    for role in ("edge", "server"):
        run_cli("profile", path, "--role", role, "--quiet", "-o", str(tmp_path / f"{role}.json"), check=True)
    r = run_cli(
        "plan", path, "--edge-profile", str(tmp_path / "edge.json"), "--server-profile",
        str(tmp_path / "server.json"), "--network", "lte", "-o", str(tmp_path / "plan"), check=True,
    )  # fmt: skip
    plan = Plan.load(tmp_path / "plan")
    assert plan.kind in ("edge-only", "server-only"), r.stdout


def test_an_always_empty_output_compares_as_identical():
    empty = np.zeros((1, 0), np.float32)
    f = compare("empty", empty, empty.copy())
    assert f.cosine == 1.0 and f.max_abs_error == 0.0 and f.top1_agreement is None


def test_missing_or_escaping_external_data_is_one_clear_error(tmp_path):
    from splitpoint.core.errors import ModelError

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    m = _tiny(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        [_vi("x", [1, 4])],
        [_vi("y", [1, 4])],
        [w],
    )
    d = tmp_path / "m"
    (d / "sub").mkdir(parents=True)
    onnx.save(m, d / "model.onnx", save_as_external_data=True, location="sub/w.bin", size_threshold=0)
    (d / "sub" / "w.bin").unlink()
    with pytest.raises(ModelError, match="cannot load the model's external data next to .*not regular file"):
        open_model(d / "model.onnx")
    onnx.save(m, d / "model.onnx", save_as_external_data=True, location="w.bin", size_threshold=0)
    escaping = onnx.load(d / "model.onnx", load_external_data=False)
    (entry,) = [e for e in escaping.graph.initializer[0].external_data if e.key == "location"]
    entry.value = "../w.bin"  # onnx.save itself refuses to write such a model
    (d / "model.onnx").write_bytes(escaping.SerializeToString())
    with pytest.raises(ModelError, match="cannot load the model's external data next to .*outside"):
        open_model(d / "model.onnx")


def test_a_model_onnxruntime_cannot_run_says_why_it_has_no_cut(tmp_path):
    """NhwcConv is a com.microsoft op the CPU provider lacks: shape inference cannot type what it makes,
    and the trial run that would measure it fails. Both the listing and a named cut say so."""
    from splitpoint.core.errors import ModelError
    from splitpoint.core.graph.cuts import CutError, resolve_cut

    w = numpy_helper.from_array(np.ones((4, 4, 3, 3), np.float32), "w")
    m = _tiny(
        [
            helper.make_node("NhwcConv", ["x", "w"], ["c1"], domain="com.microsoft", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c1"], ["r"]),
            helper.make_node("Neg", ["r"], ["y"]),
        ],
        [_vi("x", [1, 8, 8, 4])],
        [_vi("y", [1, 8, 8, 4])],
        [w],
        domains=("com.microsoft",),
    )
    path = tmp_path / "nhwc.onnx"
    onnx.save(m, path)
    h = open_model(path)
    with pytest.raises(
        ModelError, match="no candidate cut: .*onnxruntime could not run the model .*NhwcConv"
    ):
        h.cuts()
    with pytest.raises(CutError, match="the type of c1 is unknown: .*NhwcConv"):
        resolve_cut(open_model(path).index, "c1")


def test_a_static_zero_size_dimension_is_a_known_size(tmp_path):
    from splitpoint.core.graph.shapes import parse_input_shapes

    m = _tiny(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Sigmoid", ["r"], ["y"])],
        [_vi("x", [1, 0, 4])],
        [_vi("y", [1, 0, 4])],
    )
    h = open_model(_save(m, tmp_path / "z.onnx"))
    assert [c.crossing[0].shape for c in h.cuts()] == ["1x0x4"]
    assert parse_input_shapes(["x:1x0x4"]) == {"x": [1, 0, 4]}


def test_a_value_for_a_model_input_with_a_default_is_refused_by_name_not_dropped(tmp_path):
    """``scale`` is an input that also has an initializer (a default): a split keeps the default as a
    constant, so a value given for it would change nothing; it is refused by name, on the API and in a
    sample file, as onnxruntime refuses an input it does not have."""
    from splitpoint.core.errors import SplitPointError
    from splitpoint.core.runner import HeadRunner
    from splitpoint.core.samples import read_npz

    scale = numpy_helper.from_array(np.array([2.0], np.float32), "scale")
    m = _tiny(
        [helper.make_node("Mul", ["x", "scale"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        [_vi("x", [1, 4]), _vi("scale", [1])],
        [_vi("y", [1, 4])],
        [scale],
    )
    h = open_model(_save(m, tmp_path / "d.onnx"))
    write_plan(h, tmp_path / "p", cut=h.cuts()[0])
    plan = Plan.load(tmp_path / "p")
    assert [t.name for t in plan.inputs] == ["x"]
    head = HeadRunner(plan, None)
    x = np.ones((1, 4), np.float32)
    head.check_inputs({"x": x})
    with pytest.raises(
        SplitPointError, match=r"not an input of this plan: 'scale' \(its inputs: x; .*default"
    ):
        head.check_inputs({"x": x, "scale": np.array([5.0], np.float32)})
    np.savez(tmp_path / "s.npz", x=x, scale=np.array([5.0], np.float32))
    with pytest.raises(SplitPointError, match=r"s.npz holds 'scale', which feeds no input \(the inputs: x"):
        read_npz(tmp_path / "s.npz", {"x": 2})


def _convnet(dtype=np.float32, elem=TensorProto.FLOAT, layers=3, fc="MatMul") -> onnx.ModelProto:
    """Conv+Relu layers, then a pooled MatMul (or Gemm with a bias): enough work per layer for
    onnxruntime's profiler to time."""
    rng = np.random.default_rng(0)
    inits, nodes, prev, cin = [], [], "x", 3
    for i, co in enumerate([16, 32, 32][:layers]):
        w = (rng.standard_normal((co, cin, 3, 3)) * (2 / (9 * cin)) ** 0.5).astype(dtype)
        inits.append(numpy_helper.from_array(w, f"W{i}"))
        nodes += [
            helper.make_node("Conv", [prev, f"W{i}"], [f"c{i}"], pads=[1, 1, 1, 1], name=f"conv{i}"),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"),
        ]
        prev, cin = f"r{i}", co
    inits.append(numpy_helper.from_array((rng.standard_normal((cin, 10)) * 0.1).astype(dtype), "Wf"))
    nodes += [
        helper.make_node("GlobalAveragePool", [prev], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node(fc, ["f", "Wf"] + (["bf"] if fc == "Gemm" else []), ["y"], name="fc"),
    ]
    if fc == "Gemm":
        inits.append(numpy_helper.from_array((rng.standard_normal(10) * 0.1).astype(dtype), "bf"))
    m = _tiny(nodes, [_vi("x", ["N", 3, 32, 32], elem)], [_vi("y", ["N", 10], elem)], inits, "convnet")
    return m


def _quantized(tmp_path, fmt: str, fc: str = "MatMul") -> str:
    """The float convnet through onnxruntime's static quantiser (QDQ or QOperator format)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    src = _save(_convnet(fc=fc), tmp_path / "f32.onnx")
    rng = np.random.default_rng(1)
    samples = iter([{"x": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)} for _ in range(4)])

    class Reader(CalibrationDataReader):
        def get_next(self):
            return next(samples, None)

    out = str(tmp_path / f"{fmt}.onnx")
    quantize_static(src, out, Reader(), quant_format=getattr(QuantFormat, fmt))
    return out


@pytest.mark.parametrize("fmt", ["QDQ", "QOperator"])
def test_an_already_quantised_model_counts_its_work_and_weights_and_is_not_quantised_again(tmp_path, fmt):
    """Its convolutions and integer weights count as a float model's do (not 0 % of the work at every
    cut), and asking to quantise it again is one line naming why, before any time is spent."""
    from splitpoint.core.graph.flops import count_macs, count_params

    path = _quantized(tmp_path, fmt)
    h = open_model(path)
    float_model = open_model(_save(_convnet(), tmp_path / "ref.onnx"))
    # all but what follows a contrib op shape inference cannot type (QLinearGlobalAveragePool's MatMul)
    assert count_macs(h.index) == pytest.approx(count_macs(float_model.index), rel=1e-3)
    last = h.cuts()[-1]
    assert last.head_macs_share == pytest.approx(1.0) and last.head_params_share > 0.99
    assert 0 < h.cuts()[len(h.cuts()) // 2].head_macs_share < 1
    assert count_params(h.index) >= count_params(float_model.index) - 100  # biases may fold into int32
    # its weights stay int8 in onnxruntime's fused kernels: about a byte each, not a float's 4 bytes
    from splitpoint.core.graph.memory import weight_bytes_by_prefix

    assert weight_bytes_by_prefix(h.index)[-1] < 1.2 * count_params(h.index)
    for args in (
        ("profile", path, "--role", "edge", "--int8", "-o", str(tmp_path / "p.json")),
        ("fidelity", path, "--cut", "2", "--quantize-head-weights", "dynamic", "--random", "2"),
    ):
        r = run_cli(*args)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        assert "already quantised" in r.stderr and "QuantizeLinear" in r.stderr + r.stdout
    assert not (tmp_path / "p.json").exists()


def test_a_quantised_gemm_counts_its_work_and_weights(tmp_path):
    """QOperator turns a Gemm into com.microsoft's QGemm: its multiply-adds and int8 weights count as the
    float Gemm's did (`cuts` showed 100 % of the parameters on the edge while the layer was on the server)."""
    from splitpoint.core.graph.flops import count_macs, count_params

    path = _quantized(tmp_path, "QOperator", fc="Gemm")
    h = open_model(path)
    assert "QGemm" in {n.op_type for n in h.model.graph.node}
    float_model = open_model(_save(_convnet(fc="Gemm"), tmp_path / "ref.onnx"))
    assert count_macs(h.index) == pytest.approx(count_macs(float_model.index), rel=1e-3)
    assert count_params(h.index) == count_params(float_model.index)
    flat = next(c for c in h.cuts() if [t.name for t in c.crossing] == ["f_quantized"])
    assert flat.head_params == count_params(h.index) - 32 * 10 - 10  # the fc's weights and bias wait


def test_an_lstm_counts_its_gates_over_every_step(tmp_path):
    from splitpoint.core.graph.flops import count_macs

    seq, inp, hidden = 5, 8, 16
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((1, 4 * hidden, inp)).astype(np.float32), "W")
    r = numpy_helper.from_array(rng.standard_normal((1, 4 * hidden, hidden)).astype(np.float32), "R")
    m = _tiny(
        [
            helper.make_node("LSTM", ["x", "W", "R"], ["y", "yh"], hidden_size=hidden),
            helper.make_node("Neg", ["yh"], ["z"]),
        ],
        [_vi("x", [seq, 1, inp])],
        [_vi("z", [1, 1, hidden])],
        [w, r],
    )
    h = open_model(_save(m, tmp_path / "lstm.onnx"))
    assert count_macs(h.index) == seq * 4 * hidden * (inp + hidden)


def test_a_free_batch_inside_a_recurrent_layer_counts_its_bytes_and_work(tmp_path):
    """torch exports a batch-first LSTM as a Transpose to [seq, batch, input] and ONNX's LSTM, whose
    output is [seq, directions, batch, hidden]. With the batch free (``N``) those tensors counted 0 bytes
    and 0 work ('?' on 10 of 16 cuts, the edge's memory understated): the batch's symbol is skipped
    wherever it stands, and every figure is the one a batch of 1 gives."""
    from splitpoint.core.graph.flops import count_macs
    from splitpoint.core.graph.memory import live_activation_bytes

    seq, inp, hidden = 5, 8, 16
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((1, 4 * hidden, inp)).astype(np.float32), "W")
    r = numpy_helper.from_array(rng.standard_normal((1, 4 * hidden, hidden)).astype(np.float32), "R")
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
        helper.make_node("LSTM", ["xt", "W", "R"], ["y", "yh"], hidden_size=hidden),
        helper.make_node("Relu", ["y"], ["ry"]),
        helper.make_node("Transpose", ["ry"], ["z"], perm=[2, 0, 1, 3]),
    ]
    figures = []
    for batch in ("N", 1):
        m = _tiny(nodes, [_vi("x", [batch, seq, inp])], [_vi("z", [batch, seq, 1, hidden])], [w, r])
        h = open_model(_save(m, tmp_path / f"lstm-{batch}.onnx"))
        figures.append(
            (
                count_macs(h.index),
                max(live_activation_bytes(h.index)),
                {c.k: c.bytes_per_sample for c in h.cuts()},
            )
        )
    assert figures[0] == figures[1]
    assert None not in figures[0][2].values() and figures[0][2][2] == seq * hidden * 4  # y: [5, 1, N, 16]


def test_a_batch_times_tokens_reshape_counts_its_work_for_every_row(tmp_path):
    """A transformer's Linear as torch exports it: [batch, tokens, hidden] reshaped to [batch·tokens,
    hidden] by a shape computed at run time, which inference names with a symbol of its own. A trial run
    finds 16 rows per sample; the work counted 1 of them with the batch free (a token model's head share
    read 0.101 against 0.092 at a batch of 1)."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w")
    flat = numpy_helper.from_array(np.array([-1, 64], np.int64), "flat")
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Reshape", ["x", "flat"], ["x2"]),
        helper.make_node("MatMul", ["x2", "w"], ["m"]),
        helper.make_node("Relu", ["m"], ["r"]),
        helper.make_node("Reshape", ["r", "s"], ["y"]),
    ]
    macs = []
    for batch in ("N", 1):
        m = _tiny(nodes, [_vi("x", [batch, 16, 64])], [_vi("y", [batch, 16, 64])], [w, flat])
        h = open_model(_save(m, tmp_path / f"flat-{batch}.onnx"))
        macs.append(h.cuts()[0].total_macs)
    assert macs[0] == macs[1] == 16 * 64 * 64


def _ort_trace(path: str, runs: int):
    """The model's handle and onnxruntime's profiler trace of ``runs`` runs (a file the caller reads)."""
    h = open_model(path)
    sess = make_session(path, 1, enable_profiling=True)
    feeds = sample_feeds(h.model, 1)
    for _ in range(runs):
        sess.run(None, feeds)
    return h, sess.end_profiling()


def test_a_float16_model_is_profiled_node_by_node(tmp_path):
    """onnxruntime runs a float16 Conv as a float32 kernel behind inserted casts, named after the
    tensor (``InsertedPrecisionFreeCast_<tensor>_nchwc``): those times belong to the convolutions, or
    every derived cut's head reads 0 ms and the planner ships the whole model as a free head."""
    from splitpoint.profiles.ort_trace import cost_curve, node_times

    path = _save(_convnet(np.float16, TensorProto.FLOAT16), tmp_path / "f16.onnx")
    h, trace = _ort_trace(path, 4)
    per_node, unattributed, _ = node_times(trace, h.index, skip_runs=1)
    convs = [p for p in h.index.compute if h.index.nodes[p].op_type == "Conv"]
    assert all(per_node.get(p, 0) > 0 for p in convs)
    assert sum(per_node.values()) > unattributed
    curve, source = cost_curve(h.index, per_node, unattributed)
    assert source == "per-node kernel times" and len(curve) == len(h.index.compute)
    # kernels named after nothing in the graph: the curve follows the MACs, never all zeros
    curve, source = cost_curve(h.index, {}, 10.0)
    assert source.startswith("multiply-accumulates") and "0% were" in source
    assert curve[h.index.compute.index(convs[-1])] > 100 * curve[h.index.compute.index(convs[-1]) + 1]


def test_fused_gemm_activation_kernels_are_mapped_to_their_nodes(tmp_path):
    """onnxruntime fuses a Gemm and the Relu after it into one kernel named ``fused <Gemm's name>``: its
    time belongs to the Gemm, or a Linear -> ReLU stack (an MLP as torch exports it) had 10 % of its time
    attributed and its derived cuts fell back to multiply-accumulates."""
    from splitpoint.profiles.ort_trace import cost_curve, node_times

    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for k in range(3):
        w = numpy_helper.from_array(rng.standard_normal((256, 256)).astype(np.float32), f"w{k}")
        b = numpy_helper.from_array(np.zeros(256, np.float32), f"b{k}")
        inits += [w, b]
        nodes.append(helper.make_node("Gemm", [prev, f"w{k}", f"b{k}"], [f"g{k}"], name=f"/l{k}/Gemm"))
        nodes.append(helper.make_node("Relu", [f"g{k}"], [f"r{k}"], name=f"/Relu_{k}"))
        prev = f"r{k}"
    g = helper.make_graph(nodes, "mlp", [_vi("x", [1, 256])], [_vi(prev, [1, 256])], inits)
    path = _save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "mlp.onnx")
    h, trace = _ort_trace(path, 6)
    names = {e["name"] for e in json.loads(Path(trace).read_text()) if e.get("cat") == "Node"}
    assert any(n.startswith("fused /l0/Gemm") for n in names), names  # the rename this maps back
    per_node, unattributed, _ = node_times(trace, h.index, skip_runs=1)
    Path(trace).unlink()
    gemms = [p for p in h.index.compute if h.index.nodes[p].op_type == "Gemm"]
    assert all(per_node.get(p, 0) > 0 for p in gemms)
    _, source = cost_curve(h.index, per_node, unattributed)
    assert source == "per-node kernel times"


def test_unnamed_nodes_after_a_constant_or_out_of_order_are_timed_as_themselves(tmp_path):
    """onnxruntime names an unnamed node by its op type and place in the model it runs, Constant nodes
    made initializers first: every unnamed node after a Constant was looked up one place too late (its
    time went to no node, or to another of its type), and a file with its nodes out of order had 18 % of
    its time attributed (the profile read the model in order, the session ran the file)."""
    from splitpoint.profiles.ort_trace import node_times

    k = numpy_helper.from_array(np.array(0.5, np.float32))
    steps = [
        ("Sigmoid", "x", "a"),
        ("Add", "a", "b"),
        ("Tanh", "b", "c"),
        ("Sigmoid", "c", "d"),
        ("Tanh", "d", "y"),
    ]
    nodes = [helper.make_node(op, [i, "k"] if op == "Add" else [i], [o]) for op, i, o in steps]
    nodes.insert(1, helper.make_node("Constant", [], ["k"], value=k))
    for order in ("in order", "reversed"):
        g = helper.make_graph(
            nodes if order == "in order" else nodes[::-1],
            "g",
            [_vi("x", [1, 1 << 16])],
            [_vi("y", [1, 1 << 16])],
        )
        path = tmp_path / "m.onnx"
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
        h = open_model(path)
        sess = h.whole_session(1, enable_profiling=True)
        feeds = sample_feeds(h.model, 1)
        for _ in range(6):
            sess.run(None, feeds)
        trace = sess.end_profiling()
        per_node, unattributed, _ = node_times(trace, h.index, skip_runs=1)
        Path(trace).unlink()
        timed = [h.index.nodes[p].op_type for p in h.index.compute if per_node.get(p, 0) > 0]
        assert timed == [op for op, _, _ in steps], (order, timed, unattributed)
        assert unattributed == 0, order


def test_an_operator_onnxruntime_has_no_kernel_for_is_named_at_load(tmp_path):
    """A custom domain's operator (with its output typed, as an exporter that knows it writes): the
    listing and the split refuse it by name, not with the checker's complaint about a cut tensor."""
    from splitpoint.core.errors import ModelError

    m = _tiny(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("MyOp", ["r"], ["m"], domain="com.acme"),
            helper.make_node("Neg", ["m"], ["y"]),
        ],
        [_vi("x", ["N", 4])],
        [_vi("y", ["N", 4])],
        domains=("com.acme",),
    )
    m.graph.value_info.append(_vi("m", ["N", 4]))
    path = tmp_path / "custom.onnx"
    onnx.save(m, path)
    with pytest.raises(ModelError, match="com.acme:MyOp is an operator onnxruntime has no kernel for"):
        open_model(path)
    for args in (("cuts", str(path)), ("split", str(path), "--cut", "1", "-o", str(tmp_path / "out"))):
        r = run_cli(*args)
        assert r.returncode != 0 and "com.acme:MyOp" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_an_opset_newer_than_onnx_and_onnxruntime_run_is_named_in_one_line(tmp_path):
    """``cuts`` listed cuts of an opset-30 model, and ``split`` cut onnxruntime's paragraph off after the
    C++ signature, before its reason."""
    from splitpoint.core.errors import ModelError

    m = _tiny(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["r"], ["y"])],
        [_vi("x", [1, 4])],
        [_vi("y", [1, 4])],
    )
    m.opset_import[0].version = onnx.defs.onnx_opset_version() + 2
    path = tmp_path / "new.onnx"
    onnx.save(m, path)
    newest = f"knows (up to {onnx.defs.onnx_opset_version()})"
    with pytest.raises(ModelError, match=re.escape(newest)):
        open_model(path)
    for args in (("cuts", str(path)), ("split", str(path), "--cut", "1", "-o", str(tmp_path / "out"))):
        r = run_cli(*args)
        assert r.returncode != 0 and newest in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out").exists()
    # where onnx knows it and onnxruntime does not (an onnx newer than onnxruntime), the session says so
    m.opset_import[0].version = 99
    with pytest.raises(
        ModelError, match=r"stamped with opset 99 of ai.onnx, and onnxruntime \S+ runs up to opset \d+"
    ):
        make_session(m.SerializeToString())


def test_a_graph_out_of_order_is_put_in_order_and_splits_exactly(tmp_path):
    """The checker refuses nodes out of dependency order; onnxruntime runs them, and so must we."""
    from splitpoint.core.graph.extract import extract

    m = _convnet()
    nodes = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend([nodes[2], nodes[0], *reversed(nodes[3:]), nodes[1]])
    path = tmp_path / "unsorted.onnx"
    onnx.save(m, path)
    h = open_model(path)
    feeds = sample_feeds(h.model, 1)
    whole = make_session(_save(_convnet(), tmp_path / "sorted.onnx")).run(None, feeds)[0]
    cuts = h.cuts()
    assert len(cuts) == len(nodes) - 1
    for cut in cuts[::2]:
        head, tail = extract(h.index, cut)
        np.testing.assert_allclose(run_split(head, tail, cut, feeds)["y"], whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("coordinates", [False, True], ids=["linear-indices", "coordinate-indices"])
def test_sparse_initializers_are_weights_like_any_other(tmp_path, coordinates):
    """A weight stored sparse (ONNX's sparse_initializer, indices linear or as coordinates), used on both
    sides of a cut: it was read by a field it lacks (a traceback on every command), then left out of
    every segment that used it. Dense at load, it is counted and carried as the others are."""
    rng = np.random.default_rng(0)
    dense = np.zeros((8, 8), np.float32)
    dense[0, 1], dense[3, 3], dense[7, 0] = 2.0, -1.0, 0.5
    at = np.argwhere(dense) if coordinates else np.flatnonzero(dense)
    sparse = helper.make_sparse_tensor(
        numpy_helper.from_array(dense[dense != 0], "W"),
        numpy_helper.from_array(at.astype(np.int64), "W_at"),
        [8, 8],
    )
    w2 = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "W2")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["a"]),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("MatMul", ["b", "W2"], ["c"]),
        helper.make_node("MatMul", ["c", "W"], ["y"]),
    ]
    g = helper.make_graph(
        nodes, "sparse", [_vi("x", [1, 8])], [_vi("y", [1, 8])], [w2], sparse_initializer=[sparse]
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)  # valid; the full check's shape inference does not type sparse weights
    path = str(tmp_path / "sparse.onnx")
    onnx.save(m, path)
    feeds = {"x": rng.standard_normal((1, 8)).astype(np.float32)}
    whole = make_session(path).run(None, feeds)[0]
    h = open_model(path)
    assert not h.model.graph.sparse_initializer
    cuts = h.cuts()
    assert len(cuts) == 3
    for cut in cuts:
        head, tail = extract(h.index, cut)
        np.testing.assert_allclose(run_split(head, tail, cut, feeds)["y"], whole, rtol=1e-6, atol=1e-7)
    shown = run_cli("cuts", path, "--json")
    assert shown.returncode == 0, shown.stderr
    params = [c["head_params_share"] for c in json.loads(shown.stdout)["cuts"]]
    assert params[0] == pytest.approx(64 / 128) and params[-1] == pytest.approx(1.0), params


def test_cuts_of_a_model_without_countable_work_show_no_share_rather_than_zero(tmp_path):
    """A model of element-wise nodes only has no MACs or parameters to share out: its cuts said
    "head MACs 0.0 %", read as a cut that leaves all the work to the server."""
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Sigmoid", ["a"], ["y"])]
    g = helper.make_graph(nodes, "plain", [_vi("x", [1, 8])], [_vi("y", [1, 8])])
    path = _save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "plain.onnx")
    shown = run_cli("cuts", path, "--json")
    assert shown.returncode == 0, shown.stderr
    cuts = json.loads(shown.stdout)["cuts"]
    assert cuts and all(c["head_macs_share"] is None and c["head_params_share"] is None for c in cuts)
    table = run_cli("cuts", path)
    assert table.returncode == 0, table.stderr
    assert "0.0%" not in table.stdout and "–" in table.stdout, table.stdout


def _integers_with_meaning(tmp_path):
    """An index into an activation (one of 4 rows, the size shape inference gives) and a Reshape's
    target shape: values a seeded random sample of 0..9 breaks, which real inputs never would."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "W")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["a"]),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("Gather", ["b", "idx"], ["g"], axis=0),
        helper.make_node("Reshape", ["g", "shape"], ["r"]),
        helper.make_node("Tanh", ["r"], ["y"]),
    ]
    inputs = [_vi("x", [4, 8]), _vi("idx", [1], TensorProto.INT64), _vi("shape", [2], TensorProto.INT64)]
    path = _save(_tiny(nodes, inputs, [_vi("y", [2, 4])], [w]), tmp_path / "meaning.onnx")
    folder = tmp_path / "samples"
    folder.mkdir()
    feeds = {
        "x": rng.standard_normal((4, 8)).astype(np.float32),
        "idx": np.array([3], np.int64),
        "shape": np.array([2, 4], np.int64),
    }
    np.savez(folder / "s0.npz", **feeds)
    return path, folder, feeds


def test_integer_inputs_that_must_hold_real_values_are_bounded_or_taken_from_the_users_samples(tmp_path):
    """An index into an activation is drawn within its size; a shape cannot be drawn at all: split and
    profile then say which input's random values may be to blame and take --inputs, as plan and fidelity
    do (they blamed the cut or the input shapes, and offered no way round)."""
    from splitpoint.core.samples import index_bounds

    path, folder, feeds = _integers_with_meaning(tmp_path)
    assert index_bounds(onnx.load(path)) == {"idx": 4}
    refused = run_cli("split", path, "--cut", "2", "-o", str(tmp_path / "p"))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert "integers 0..9 in 'shape'" in refused.stderr and "give --inputs DIR" in refused.stderr
    assert "'idx'" not in refused.stderr  # bounded by the 4 rows it indexes: not to blame
    assert not (tmp_path / "p").exists()
    refused = run_cli("profile", path, "-o", str(tmp_path / "e.json"), "-q")
    assert refused.returncode == 2 and "integers 0..9 in 'shape'" in refused.stderr, refused.stderr
    plans = tmp_path / "plans"
    made = run_cli("split", path, "--cut", "2", "--inputs", str(folder), "-o", str(plans / "p"))
    assert made.returncode == 0, made.stderr
    made = run_cli("profile", path, "--inputs", str(folder), "-o", str(tmp_path / "e.json"), "-q")
    assert made.returncode == 0 and (tmp_path / "e.json").is_file(), made.stderr
    # and the split answers as the whole model does
    from splitpoint.core.runner import load_split

    plan, head, tail = load_split(plans / "p")
    sent, early = head.run(feeds)
    whole = make_session(path).run(None, feeds)[0]
    np.testing.assert_allclose({**early, **tail.run(sent)}["y"], whole, rtol=1e-6)


def test_integer_outputs_are_compared_element_by_element_and_no_output_is_hidden():
    """A model returning token ids (int64 [1, 16]) beside class scores and a regression output: ids are
    scored by the share equal (their 'top-1', the position of the largest id, read 1.0 with 2 of 16 ids
    wrong), and the score is the worst output's, so a perfect classifier no longer hides the rest."""
    from splitpoint.partitioner.fidelity import FidelityReport, compare

    ids = np.arange(16, dtype=np.int64).reshape(1, 16) * 7
    wrong = ids.copy()
    wrong[0, 3] += 1
    wrong[0, 9] -= 2
    o_ids = compare("nxt", ids, wrong)
    assert o_ids.exact_agreement == 14 / 16 and o_ids.top1_agreement is None and o_ids.primary == 14 / 16
    scores = np.eye(4, dtype=np.float32)
    o_cls = compare("cls", scores, scores + 0.01, 4)  # four samples' scores
    assert o_cls.top1_agreement == 1.0 and o_cls.exact_agreement is None
    rng = np.random.default_rng(0)
    y = rng.standard_normal((1, 16, 4)).astype(np.float32)
    o_reg = compare("y", y, y + rng.standard_normal(y.shape).astype(np.float32) * 0.6)
    assert o_reg.top1_agreement is None and o_reg.cosine < 0.95
    report = FidelityReport(cut=2, codec="int4", head_weights="float32", samples=1, outputs=[o_cls, o_reg])
    assert report.score == o_reg.cosine  # before: 1.0, the classifier's top-1 alone
    report.outputs.append(o_ids)
    assert report.score == min(o_reg.cosine, 14 / 16)
    mask = compare("m", np.array([[True, False, True, True]]), np.array([[True, True, True, True]]))
    assert mask.exact_agreement == 0.75


def test_static_int8_on_an_opset_11_model_converts_it_first():
    """torch's legacy exporter at opset_version=11: the static QDQ graph's per-channel DequantizeLinear
    needs opset 13, and onnxruntime refused SplitPoint's own quantised graph as the model's fault."""
    import onnxruntime as ort

    from splitpoint.core.quantize import quantize_head

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.standard_normal((4, 8, 3, 3)).astype(np.float32), "w2")
    g = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c1"], ["r1"]),
            helper.make_node("Conv", ["r1", "w2"], ["y"], pads=[1, 1, 1, 1]),
        ],
        "op11",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])],
        [w1, b1, w2],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)])
    calib = [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(4)]
    q = quantize_head(model, calib, "static")
    assert any(n.op_type == "DequantizeLinear" for n in q.graph.node)
    sess = ort.InferenceSession(q.SerializeToString())
    ref = ort.InferenceSession(model.SerializeToString()).run(None, calib[0])[0]
    got = sess.run(None, calib[0])[0]
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()


def test_a_model_whose_rows_depend_on_each_other_is_run_sample_by_sample(tmp_path):
    """Fidelity joins samples into one batch where the batch is free. A model whose rows are not
    independent (here every row scaled by the sum over the whole batch; a user's If on such a sum) answers
    a batch otherwise than each sample alone, as the edge sends them: a lossless float32 split measured
    1.29 max error. Such a model is run sample by sample."""
    from splitpoint.core.runner import run_samples

    m = _tiny(
        [
            helper.make_node("ReduceSum", ["x"], ["s"], keepdims=1),
            helper.make_node("Mul", ["x", "s"], ["y"]),
        ],
        [_vi("x", ["N", 4])],
        [_vi("y", ["N", 4])],
    )
    sess = make_session(_save(m, tmp_path / "rows.onnx"), 1)
    rng = np.random.default_rng(0)
    samples = [{"x": rng.standard_normal((1, 4)).astype(np.float32)} for _ in range(5)]
    got = run_samples(sess, samples)
    for s, (y,) in zip(samples, got, strict=True):
        np.testing.assert_allclose(y, sess.run(None, s)[0], rtol=1e-6)


def test_an_input_that_is_also_an_output_keeps_its_shape_and_its_consumer_s_work(tmp_path):
    """A graph input echoed as a graph output: its shapeless output entry replaced the input's shape,
    every shape downstream was lost, and the MatMul reading it counted no work."""
    from splitpoint.core.graph.flops import count_macs

    w = numpy_helper.from_array(np.ones((8, 8), np.float32), "w")
    m = _tiny(
        [helper.make_node("MatMul", ["x", "w"], ["a"]), helper.make_node("Relu", ["a"], ["y"])],
        [_vi("x", ["N", 8])],
        [_vi("y", ["N", 8]), _vi("x", ["N", 8])],
        [w],
    )
    h = open_model(_save(m, tmp_path / "echo.onnx"))
    assert h.index.info["x"].dims == ["N", 8] and h.index.info["a"].dims == ["N", 8]
    assert count_macs(h.index) == 64
    assert [c.head_macs for c in enumerate_cuts(h.index)] == [64]


def test_two_sizes_for_one_shared_symbol_are_refused_by_name():
    from splitpoint.core.errors import ModelError
    from splitpoint.core.graph.shapes import apply_input_shapes

    m = _tiny(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        [_vi("a", ["N", "L", 16]), _vi("b", ["N", "L", 16])],
        [_vi("y", ["N", "L", 16])],
    )
    with pytest.raises(ModelError, match="dimension 'L' two sizes, 10 and 12"):
        apply_input_shapes(m, {"a": [1, 10, 16], "b": [1, 12, 16]})
    fixed = apply_input_shapes(m, {"a": [1, 10, 16], "b": [1, 10, 16]})
    assert [d.dim_value for d in fixed.graph.input[1].type.tensor_type.shape.dim] == [1, 10, 16]


@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize(
    ("dtype", "np_dtype"), [(TensorProto.FLOAT16, np.float16), (TensorProto.DOUBLE, np.float64)]
)
def test_int8_heads_of_weights_that_are_not_float32_are_one_clear_refusal(tmp_path, mode, dtype, np_dtype):
    """onnxruntime's quantisers quantise float32 weights only: a float16 head came back from static mode
    with its weights as they were and int8 activations around them, a float64 one unchanged, both called
    int8 (a plan claimed the head 30 % smaller), and dynamic mode died on a float16 one."""
    from splitpoint.core.errors import SplitPointError
    from splitpoint.core.quantize import quantize_head

    w = numpy_helper.from_array(np.ones((8, 8), np_dtype), "w")
    m = _tiny(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [_vi("x", [1, 8], dtype)],
        [_vi("y", [1, 8], dtype)],
        [w],
    )
    calibration = [{"x": np.ones((1, 8), np_dtype)}]
    name = "float16" if dtype == TensorProto.FLOAT16 else "float64"
    integer = (TensorProto.INT8, TensorProto.UINT8)

    def quantised(q: onnx.ModelProto) -> set[str]:
        return {t.name for t in q.graph.initializer if t.data_type in integer and len(t.dims) > 1}

    # never an "int8" head whose weights stayed as they were: onnxruntime 1.32 leaves float16 and float64
    # weights (refused, saying so), 1.30 quantises float16 ones (taken)
    try:
        q = quantize_head(m, calibration, mode)
    except SplitPointError as exc:
        assert re.search(f"weights are {name}: .*quantises float32 weights", str(exc)), exc
    else:
        assert quantised(q), [t.name for t in q.graph.initializer]
    # a float32 weight beside them is quantised: the head is not refused
    m.graph.initializer.append(numpy_helper.from_array(np.ones((8, 8), np.float32), "w32"))
    m.graph.node.extend([helper.make_node("MatMul", ["x32", "w32"], ["y32"])])
    m.graph.input.append(_vi("x32", [1, 8]))
    m.graph.output.append(_vi("y32", [1, 8]))
    calibration[0]["x32"] = np.ones((1, 8), np.float32)
    assert "w32_quantized" in quantised(quantize_head(m, calibration, mode))


def test_the_work_inside_a_loop_body_is_profiled_as_the_loop_s(tmp_path):
    """An unnamed model (onnx.helper's) with its heavy work in a Loop body reading an outer weight:
    onnxruntime logs the body's nodes under their own graph's names (its MatMul_0 is also the main
    graph's) and the Loop's time holds theirs. Before, no kernel was attributed (0 %), the time was
    spread over the nodes, and the cut after the Loop was predicted a 1 ms tail for a Relu."""
    from splitpoint.profiles.profiler import ProfileSettings, profile_model

    rng = np.random.default_rng(0)
    d = 256
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["y_in", "w_big"], ["l1"]),
            helper.make_node("Tanh", ["l1"], ["y_out"]),
            helper.make_node("Identity", ["c_in"], ["c_out"]),
        ],
        "body",
        [_vi("i", [], TensorProto.INT64), _vi("c_in", [], TensorProto.BOOL), _vi("y_in", [64, d])],
        [_vi("c_out", [], TensorProto.BOOL), _vi("y_out", [64, d])],
    )
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w_small"),
        numpy_helper.from_array((rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32), "w_big"),
        numpy_helper.from_array(np.array([64, d // 8], np.int64), "reps"),
        numpy_helper.from_array(np.array(100, np.int64), "trip"),
        numpy_helper.from_array(np.array(True), "true"),
    ]
    m = _tiny(
        [
            helper.make_node("MatMul", ["x", "w_small"], ["a"]),
            helper.make_node("Relu", ["a"], ["a1"]),
            helper.make_node("Tile", ["a1", "reps"], ["a2"]),
            helper.make_node("Loop", ["trip", "true", "a2"], ["lo"], body=body),
            helper.make_node("Relu", ["lo"], ["out"]),
        ],
        [_vi("x", [1, 8])],
        [_vi("out", [64, d])],
        inits,
    )
    h = open_model(_save(m, tmp_path / "loop.onnx"))
    # its work counted too: 100 trips of a 256x256 MatMul per row, where the Loop counted none and every
    # cut before it showed a head with all of the model's work (100, ~6 ms: a segment run costs ~0.2 ms
    # of its own, and at 20 trips the tail was 6x the head's, not 10x, on a loaded machine)
    shares = [c.head_macs_share for c in enumerate_cuts(h.index)]
    assert shares[2] < 0.01 and shares[3] == 1.0, shares
    prof = profile_model(h, ProfileSettings(role="edge", threads=1, budget=5))
    loop = next(n for n in prof.nodes if n.op_type == "Loop")
    assert loop.median_ms > 0.8 * sum(n.median_ms for n in prof.nodes), prof.nodes
    before, after = prof.cuts[2], prof.cuts[3]  # the Tile's cut (the Loop in the tail), the Loop's
    assert before.tail_ms > 10 * before.head_ms and after.head_ms > 10 * after.tail_ms, prof.cuts


def _served(plans, name: str, feeds: dict):
    """The answer to one request of plan ``name`` in ``plans``, served by a real server over a socket
    (never the edge's local model)."""
    from splitpoint.edge.client import EdgeClient
    from splitpoint.edge.config import EdgeConfig
    from splitpoint.server.config import ServerConfig
    from splitpoint.server.tail_server import TailServer

    srv = TailServer(ServerConfig(bind="tcp://127.0.0.1:0", plans_dir=plans)).start()
    try:
        cfg = EdgeConfig(plan_dir=plans / name, server=srv.endpoint, fallback=False)
        with EdgeClient(cfg) as c:
            got = c.infer(feeds, timeout=30)
    finally:
        srv.stop()
    assert not got.fallback
    return got


def test_anonymous_dimensions_are_each_their_own_size(tmp_path):
    """paddle2onnx declares an image input [-1, 3, ?, ?] and intermediates alike: each ? is any size of
    its own, not one shared symbol, so a 48x192 text line is taken, split and served (it was refused as
    "dimension '?' given two sizes")."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    m = _tiny(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("ReduceMean", ["r"], ["y"], axes=[2, 3], keepdims=0),
        ],
        [_vi("x", [-1, 3, "?", "?"])],
        [_vi("y", [-1, 4])],
        [w],
    )
    m.graph.value_info.extend([_vi("c", ["?", 4, "?", "?"]), _vi("r", ["?", 4, "?", "?"])])
    path = _save(m, tmp_path / "cls.onnx")
    r = run_cli("cuts", str(path))
    assert r.returncode != 0 and "input 'x' has unknown dimensions dim 2, dim 3" in r.stderr, r.stderr
    h = open_model(path, {"x": [1, 3, 48, 192]})
    cut = next(c for c in h.cuts() if [t.name for t in c.crossing] == ["r"])
    write_plan(h, tmp_path / "plans" / "split", cut=cut)
    x = {"x": rng.standard_normal((1, 3, 48, 192)).astype(np.float32)}
    want = make_session(h.path).run(None, x)[0]
    got = _served(tmp_path / "plans", "split", x)
    np.testing.assert_allclose(got["y"], want, rtol=1e-5, atol=1e-6)


def test_inputs_and_outputs_declared_without_a_shape_are_completed(tmp_path):
    """onnxruntime runs a file whose interface declares no shapes (``make_tensor_value_info(name, type,
    None)``, or no type at all), which the ONNX checker refuses. The outputs' types and shapes come from
    shape inference; an input's rank only the user knows: one line asks for --input-shape, and with it
    the model is split and served."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    x = onnx.ValueInfoProto(name="x")
    x.type.tensor_type.elem_type = TensorProto.FLOAT  # no shape
    m = _tiny(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("ReduceMean", ["r"], ["y"], axes=[2, 3], keepdims=0),
            helper.make_node("Sigmoid", ["y"], ["z"]),
        ],
        [x],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None), onnx.ValueInfoProto(name="z")],
        [w],
    )
    path = tmp_path / "bare.onnx"
    onnx.save(m, str(path))  # as it is: the checker refuses it
    r = run_cli("cuts", str(path))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "input 'x' declares no shape" in r.stderr and "--input-shape x:" in r.stderr, r.stderr
    h = open_model(path, {"x": [1, 3, 16, 24]})
    outs = {
        o.name: [d.dim_value or d.dim_param for d in o.type.tensor_type.shape.dim]
        for o in h.model.graph.output
    }
    assert outs == {"y": ["N", 4], "z": ["N", 4]}  # the batch as free as the input's was
    assert all(o.type.tensor_type.elem_type == TensorProto.FLOAT for o in h.model.graph.output)
    cut = next(c for c in h.cuts() if [t.name for t in c.crossing] == ["r"])
    write_plan(h, tmp_path / "plans" / "split", cut=cut)
    feeds = {"x": rng.standard_normal((1, 3, 16, 24)).astype(np.float32)}
    want = dict(zip(["y", "z"], make_session(path).run(None, feeds), strict=True))
    got = _served(tmp_path / "plans", "split", feeds)
    for k, ref in want.items():
        np.testing.assert_allclose(got[k], ref, rtol=1e-5, atol=1e-6)


def _many_outputs(n: int) -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", ["x"], ["r"])]
    nodes += [helper.make_node("Mul", ["r", f"k{i}"], [f"o{i}"]) for i in range(n)]
    return _tiny(
        nodes,
        [_vi("x", [1, 16])],
        [_vi(f"o{i}", [1, 16]) for i in range(n)],
        [numpy_helper.from_array(np.array(i + 1, np.float32), f"k{i}") for i in range(n)],
    )


def test_a_model_with_more_outputs_than_the_old_wire_limit_is_split_and_served(tmp_path):
    """70 outputs, all made in the tail: the server's reply names 70 tensors (a 32-layer decoder's
    outputs are 65), which the edge refused as a malformed reply while a message carried at most 64.
    A plan whose messages the protocol cannot carry is refused when it is written, by its cut."""
    h = open_model(_save(_many_outputs(70), tmp_path / "many.onnx"))
    write_plan(h, tmp_path / "plans" / "split", cut=h.cuts()[0])
    x = {"x": np.random.default_rng(0).standard_normal((1, 16)).astype(np.float32)}
    want = make_session(h.path).run(None, x)
    got = _served(tmp_path / "plans", "split", x)
    for i, ref in enumerate(want):
        np.testing.assert_allclose(got[f"o{i}"], ref, rtol=1e-6)
    big = _save(_many_outputs(600), tmp_path / "big.onnx")
    out = tmp_path / "big-plan"
    r = run_cli("split", big, "--cut", "1", "-o", str(out))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "outputs cannot go over the wire in one answer: 600 tensors" in r.stderr, r.stderr
    assert not out.exists()


def test_one_input_shape_list_for_several_models_skips_inputs_a_model_fixes(tmp_path):
    """The bench takes one --input-shape list for all its models: a GRU's `x:1x20x8` stopped the bench at
    a CNN whose `x` the file fixes at 1x3x4x4 ("input 'x' has rank 4; --input-shape gives 3 dimensions").
    Shapes for such an input are for other models; a single model's command still refuses them."""
    from splitpoint.core.errors import ModelError

    relu = [helper.make_node("Relu", ["x"], ["y"])]
    fixed = _save(_tiny(relu, [_vi("x", [1, 3, 4, 4])], [_vi("y", [1, 3, 4, 4])]), tmp_path / "cnn.onnx")
    free = _save(_tiny(relu, [_vi("x", ["N", "T", 8])], [_vi("y", ["N", "T", 8])]), tmp_path / "gru.onnx")
    shapes = {"x": [1, 20, 8]}
    assert open_model(fixed, shapes, only_present=True).input_shapes == {}
    assert open_model(free, shapes, only_present=True).input_shapes == {"x": [1, 20, 8]}
    with pytest.raises(ModelError, match="rank 4"):
        open_model(fixed, shapes)


def test_a_dropout_left_in_training_mode_runs_as_onnxruntime_runs_the_whole_model(tmp_path, caplog):
    """A model exported without ``model.eval()`` keeps Dropout(training_mode=True). onnxruntime's optimiser
    drops it from the whole model; a tail whose input is the Dropout's kept it and zeroed random elements.
    Every cut now answers as the whole model does, and loading says what was changed and the fix."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((32, 64)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal((64, 10)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array(0.5, np.float32), "ratio"),
        numpy_helper.from_array(np.array(True), "training"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m"]),
        helper.make_node("Relu", ["m"], ["r"]),
        helper.make_node("Dropout", ["r", "ratio", "training"], ["d"], name="drop"),
        helper.make_node("MatMul", ["d", "w2"], ["y"]),
    ]
    g = helper.make_graph(nodes, "drop", [_vi("x", [1, 32])], [_vi("y", [1, 10])], inits)
    path = _save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    with caplog.at_level("WARNING", logger="splitpoint.model"):
        h = open_model(path)
    assert "1 Dropout node(s) in training mode (drop)" in caplog.text and "model.eval()" in caplog.text
    feeds = {"x": rng.standard_normal((1, 32)).astype(np.float32)}
    whole = make_session(path).run(None, feeds)[0]  # the file as onnxruntime runs it, unchanged
    for cut in h.cuts():
        head, tail = extract(h.index, cut)
        got = run_split(head, tail, cut, feeds)["y"]
        np.testing.assert_allclose(got, whole, rtol=1e-5, err_msg=f"cut {cut.k}")


def test_kernels_renamed_by_a_fusion_are_mapped_to_their_nodes(tmp_path):
    """onnxruntime names a node a fusion rewrote ``<node>/MatMulAddFusion`` (a transformer's Linear on
    [batch, tokens, features]: MatMul + Add become one Gemm): its time is the node's, or a ViT exported by
    torch had 54 % of its kernel time unattributed and its derived cuts fell back to multiply-accumulates."""
    from splitpoint.profiles.ort_trace import cost_curve, node_times

    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for k in range(3):
        inits += [
            numpy_helper.from_array(rng.standard_normal((128, 128)).astype(np.float32), f"w{k}"),
            numpy_helper.from_array(np.zeros(128, np.float32), f"b{k}"),
        ]
        nodes.append(helper.make_node("MatMul", [prev, f"w{k}"], [f"m{k}"], name=f"/l{k}/MatMul"))
        nodes.append(helper.make_node("Add", [f"m{k}", f"b{k}"], [f"a{k}"], name=f"/l{k}/Add"))
        nodes.append(helper.make_node("Relu", [f"a{k}"], [f"r{k}"], name=f"/l{k}/Relu"))
        prev = f"r{k}"
    g = helper.make_graph(nodes, "tok", [_vi("x", [1, 64, 128])], [_vi(prev, [1, 64, 128])], inits)
    # IR 8: what every onnxruntime this project supports reads (onnx's default follows the newest)
    path = _save(
        helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "tok.onnx"
    )
    h, trace = _ort_trace(path, 6)
    names = {e["name"] for e in json.loads(Path(trace).read_text()) if e.get("cat") == "Node"}
    assert any("/l0/MatMul/MatMulAddFusion" in n for n in names), names  # the rename this maps back
    per_node, unattributed, _ = node_times(trace, h.index, skip_runs=1)
    Path(trace).unlink()
    matmuls = [p for p in h.index.compute if h.index.nodes[p].op_type == "MatMul"]
    assert all(per_node.get(p, 0) > 0 for p in matmuls), per_node
    _, source = cost_curve(h.index, per_node, unattributed)
    assert source == "per-node kernel times"


def test_a_node_name_of_many_fusions_maps_back_and_a_hostile_one_costs_nothing(tmp_path):
    """A node several fusions rewrote maps back to its node; a name that repeats ``/Fusion//`` and ends in
    something else maps to nothing at once. The first pattern backtracked exponentially on it (over 60 s
    at 18 repetitions, and a model's node names are whatever its file says)."""
    from splitpoint.profiles.ort_trace import _map, _names

    nodes = [helper.make_node("Relu", ["x"], ["r"], name="/l0/Relu"), helper.make_node("Neg", ["r"], ["y"])]
    h = open_model(_save(_tiny(nodes, [_vi("x", [1, 4])], [_vi("y", [1, 4])]), tmp_path / "m.onnx"))
    by_name = _names(h.index)
    relu = by_name["/l0/Relu"]
    assert _map(h.index, "/l0/Relu/MatMulScaleFusion//MatmulTransposeFusion/", by_name) == relu
    assert _map(h.index, "/l0/Relu/GeluFusion_token_3", by_name) == relu
    assert _map(h.index, "/l0/Relu" + "/Fusion//" * 40 + "x", by_name) is None


def test_a_dropout_in_training_mode_inside_a_loop_body_or_fed_by_a_constant_node_runs_as_inference():
    """torch keeps ``training_mode`` wherever the Dropout is: in a Scan/Loop body (an RNN cell's), where it
    reads a body's initializer, and at top level from a Constant node rather than an initializer."""
    from splitpoint.core.graph.model import dropout_to_inference
    from splitpoint.core.subgraphs import iter_nodes

    body = helper.make_graph(
        [
            helper.make_node("Add", ["s_in", "x_t"], ["a"]),
            helper.make_node("Dropout", ["a", "r", "t"], ["s_out"], name="inner"),
            helper.make_node("Identity", ["s_out"], ["y_t"]),
        ],
        "cell",
        [_vi("s_in", [4]), _vi("x_t", [4])],
        [_vi("s_out", [4]), _vi("y_t", [4])],
        [
            numpy_helper.from_array(np.array(0.5, np.float32), "r"),
            numpy_helper.from_array(np.array(True), "t"),
        ],
    )
    nodes = [
        helper.make_node("Constant", [], ["on"], value=numpy_helper.from_array(np.array(True), "on")),
        helper.make_node("Constant", [], ["half"], value_float=0.5),
        helper.make_node("Dropout", ["x", "half", "on"], ["d"], name="outer"),
        helper.make_node("Scan", ["s0", "d"], ["s", "ys"], body=body, num_scan_inputs=1),
    ]
    g = helper.make_graph(
        nodes,
        "scan",
        [_vi("x", [6, 4]), _vi("s0", [4])],
        [_vi("s", [4]), _vi("ys", [6, 4])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    assert sorted(dropout_to_inference(m)) == ["inner", "outer"]
    drops = [n for n in iter_nodes(m.graph) if n.op_type == "Dropout"]
    assert len(drops) == 2 and all(len(n.input) == 2 for n in drops)
    onnx.checker.check_model(m)
    x, s0 = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32), np.zeros(4, np.float32)
    sess = make_session(m.SerializeToString())
    s, ys = sess.run(None, {"x": x, "s0": s0})
    np.testing.assert_allclose(ys, np.cumsum(x, axis=0), rtol=1e-5)  # nothing zeroed, nothing scaled
    np.testing.assert_allclose(s, x.sum(axis=0), rtol=1e-5)


def test_images_feed_channels_last_inputs_and_a_sequence_input_is_told_to_take_arrays(tmp_path):
    """An image folder given to a channels-last [N, H, W, 3] model fills it as [N, H, W, C] (it failed as
    'not a readable .npy array: cannot reshape'); given to a sequence model, the error says an image does
    not feed that input and what does."""
    from PIL import Image

    from splitpoint.core.errors import SplitPointError
    from splitpoint.core.samples import load_inputs

    pics = tmp_path / "pics"
    pics.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(
        pics / "a.png"
    )
    nhwc = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "nhwc",
        [_vi("x", [1, 32, 32, 3])],
        [_vi("y", [1, 32, 32, 3])],
    )
    nchw = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "nchw",
        [_vi("x", [1, 3, 32, 32])],
        [_vi("y", [1, 3, 32, 32])],
    )
    a = load_inputs(helper.make_model(nhwc), pics)[0]["x"]
    b = load_inputs(helper.make_model(nchw), pics)[0]["x"]
    assert a.shape == (1, 32, 32, 3) and b.shape == (1, 3, 32, 32)
    np.testing.assert_array_equal(a, b.transpose(0, 2, 3, 1))  # the same pixels, laid out as asked
    seq = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "seq", [_vi("x", [1, 10, 16])], [_vi("y", [1, 10, 16])]
    )
    with pytest.raises(SplitPointError, match=r"a\.png: an image feeds an input of \[N, C, H, W\].*\.npy"):
        load_inputs(helper.make_model(seq), pics)


def test_outputs_named_as_scores_are_compared_by_their_top_1_at_every_position():
    """A language model's [batch, tokens, vocab] logits: cosine hid int4's changed tokens (0.997 with 15 %
    of them changed). Named with --scores, the share of positions whose largest score is the same one."""
    ref = np.zeros((2, 3, 4), np.float32)
    ref[..., 1] = 1.0  # every position's top-1 is class 1
    got = ref.copy()
    got[1, 2, 3] = 1.01  # one position of six now says class 3, by a hair
    plain = compare("logits", ref, got, 2)
    assert plain.top1_agreement is None and plain.primary == plain.cosine > 0.9  # cosine hides it
    named = compare("logits", ref, got, 2, axis=-1)
    assert named.top1_agreement == pytest.approx(5 / 6) and named.primary == named.top1_agreement
    ragged = compare("logits", Ragged([ref[:1], ref[1:]]), Ragged([got[:1], got[1:]]), 2, axis=-1)
    assert ragged.top1_agreement == pytest.approx((1 + 2 / 3) / 2)  # sample by sample, as the data's shapes


def test_features_and_detections_are_not_compared_by_their_largest_element(tmp_path):
    """Two outputs the [batch, N] rule took for class scores: BERT's tanh pooler (an embedding: its
    largest element means nothing) and an NMS's boxes, whose rows follow the data ([N, 4]: the argmax
    picked a coordinate, 0.928 for a float16 split). Both now by cosine; a linear layer's logits beside
    them keep top-1, and --scores still names any output's."""
    from splitpoint.partitioner.fidelity import compare_outputs, feature_outputs, set_score_axes

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w")
    g = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["m"]),
            helper.make_node("Tanh", ["m"], ["t"]),
            helper.make_node("Flatten", ["t"], ["pooled"]),
            helper.make_node("MatMul", ["t", "w"], ["logits"]),
        ],
        "pool",
        [_vi("x", ["N", 16])],
        [_vi("pooled", ["N", 16]), _vi("logits", ["N", 16])],
        [w],
    )
    path = _save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "p.onnx")
    h = open_model(path)
    assert feature_outputs(h.index) == {"pooled"}
    ref = rng.standard_normal((4, 16)).astype(np.float32)
    got = ref + 0.05 * rng.standard_normal((4, 16)).astype(np.float32)
    pooled, logits = compare_outputs(h, [ref, ref], [got, got], 4)
    assert pooled.top1_agreement is None and pooled.primary == pooled.cosine
    assert logits.top1_agreement is not None and logits.primary == logits.top1_agreement
    set_score_axes(h, ["pooled"])
    assert compare_outputs(h, [ref, ref], [got, got], 4)[0].top1_agreement is not None
    boxes = Ragged([rng.random((3, 4)).astype(np.float32), rng.random((5, 4)).astype(np.float32)])
    moved = Ragged([b + 0.01 for b in boxes])
    det = compare("boxes", boxes, moved, 2)
    assert det.top1_agreement is None and det.primary == det.cosine > 0.9
    # as many boxes on every sample (NMS at its cap): joined, 3 rows a sample are not samples
    even = rng.random((6, 4)).astype(np.float32)
    assert compare("boxes", even, even + 0.01, 2).top1_agreement is None
    # a fixed batch of 3: its rows are the samples' own, and keep top-1
    assert compare("scores", even, even + 0.01, 2, rows_per_sample=3).top1_agreement is not None
    # a classifier that averages frame logits ends in a mean: still scores
    frames = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["avg"], axes=[1], keepdims=0)],
        "kws",
        [_vi("x", ["N", 10, 16])],
        [_vi("avg", ["N", 16])],
    )
    kws = _save(helper.make_model(frames, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "k.onnx")
    assert feature_outputs(open_model(kws).index) == set()


def test_top1_is_not_scored_against_a_model_that_answers_one_class_for_every_sample():
    """A random-weight EfficientNet-B0 from tf2onnx answered class 8 for every input: an int4 split at
    3 dB SNR (cosine 0.78) kept that top-1, scored 1.000, and `plan` picked it. Where the float model's
    top-1 is one class on every sample, agreeing with it says nothing: the cosine is the figure."""
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((8, 10)).astype(np.float32)
    ref[:, 3] += 40  # class 3 on every sample
    got = ref + 3 * rng.standard_normal((8, 10)).astype(np.float32)
    assert (got.argmax(1) == 3).all()
    one_class = compare("logits", ref, got, 8)
    assert one_class.top1_agreement is None and one_class.primary == one_class.cosine < 0.999
    # a few samples (one, four): one class is chance there, and whether top-1 moved still says something
    assert compare("logits", ref[:1], got[:1], 1).top1_agreement == 1.0
    assert compare("logits", ref[:4], got[:4], 4).top1_agreement == 1.0
    # equal outputs: a cosine of exactly 1
    assert compare("logits", ref, ref.copy(), 8).primary == 1.0
    # a user's own samples, all of one class (eight cats): whether a prediction changed is their question
    assert compare("logits", ref, got, 8, random_inputs=False).top1_agreement == 1.0
    # samples of several classes keep top-1
    varied = rng.standard_normal((8, 10)).astype(np.float32)
    assert compare("logits", varied, varied + 0.01, 8).top1_agreement == 1.0


def test_scores_name_an_output_and_an_axis_beside_the_batch_or_stop_before_any_work(tmp_path):
    rng = np.random.default_rng(0)
    emb = numpy_helper.from_array(rng.standard_normal((64, 16)).astype(np.float32), "emb")
    w = numpy_helper.from_array(rng.standard_normal((16, 64)).astype(np.float32), "w")
    g = helper.make_graph(
        [
            helper.make_node("Gather", ["emb", "ids"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w"], ["logits"]),
        ],
        "lm",
        [_vi("ids", ["N", 8], TensorProto.INT64)],
        [_vi("logits", ["N", 8, 64])],
        [emb, w],
    )
    path = _save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "lm.onnx")
    for spec, words in (
        ("nope", "the model has no output 'nope' (its outputs: logits)"),
        ("logits:0", "axis 0 is the batch's; name the class axis, e.g. logits:-1"),
        ("logits:3", "the class axis is one of 1 to 2 (or -1 for the last), not the batch's"),
        ("logits:x", "the axis must be an integer"),
    ):
        r = run_cli("fidelity", path, "--cut", "2", "--codec", "int4", "--scores", spec, "--json")
        assert r.returncode != 0 and words in r.stderr and "Traceback" not in r.stderr, r.stderr
    base = ["fidelity", path, "--cut", "2", "--codec", "int4", "--json", "--random", "16"]
    plain = json.loads(run_cli(*base, check=True).stdout)
    named = json.loads(run_cli(*base, "--scores", "logits", check=True).stdout)
    out = named["outputs"][0]
    assert plain["outputs"][0]["top1_agreement"] is None and plain["score"] == plain["outputs"][0]["cosine"]
    assert out["cosine"] == plain["outputs"][0]["cosine"] and named["score"] == out["top1_agreement"]
    assert out["top1_agreement"] < out["cosine"]  # the tokens int4 changed, which cosine hid


def test_scores_take_an_output_whose_name_holds_a_colon(tmp_path):
    """tf2onnx names outputs ``logits:0``: ``--scores logits:0`` is that output (class axis the last), and
    ``logits:0:1`` names its axis 1."""
    from splitpoint.partitioner.fidelity import set_score_axes

    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["logits:0"])],
        "tf",
        [_vi("x", ["N", 4, 8])],
        [_vi("logits:0", ["N", 4, 8])],
    )
    h = open_model(
        _save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "tf.onnx")
    )
    set_score_axes(h, ["logits:0"])
    assert h.score_axes == {"logits:0": -1}
    set_score_axes(h, ["logits:0:1"])
    assert h.score_axes == {"logits:0": 1}


def test_a_sparse_initializer_inside_a_branch_loads_and_splits(tmp_path):
    """An If branch holding a sparse initializer (which onnxruntime runs): loading read a name off the
    SparseTensorProto, which has none (its values' tensor has), and died with AttributeError. It loads and
    its cuts are listed; onnx's strict inference cannot go through a sparse operand, so the model fails
    it, and its parts get the check the model passed: the split runs and equals the model (it was refused
    as failing the checker)."""
    import onnxruntime as ort

    values = numpy_helper.from_array(np.array([2.0], np.float32), "sp")
    sparse = helper.make_sparse_tensor(values, numpy_helper.from_array(np.array([1], np.int64), "i"), [4])
    then = helper.make_graph(
        [helper.make_node("Add", ["x", "sp"], ["o"])],
        "then",
        [],
        [_vi("o", [4])],
        sparse_initializer=[sparse],
    )
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["o2"])], "else", [], [_vi("o2", [4])])
    g = helper.make_graph(
        [
            helper.make_node("Relu", ["x0"], ["x"]),
            helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other),
        ],
        "g",
        [_vi("x0", [4]), _vi("c", [], TensorProto.BOOL)],
        [_vi("y", [4])],
    )
    path = (
        tmp_path / "sp.onnx"
    )  # onnx's full check cannot infer through a sparse operand; onnxruntime runs it
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    h = open_model(str(path))
    (cut,) = h.cuts()
    assert sorted(c.name for c in cut.crossing) == ["c", "x"]
    assert not h.index.strict_checks
    for c in (True, False):
        feeds = {"x0": np.array([1, -2, 3, 4], np.float32), "c": np.array(c)}
        full = ort.InferenceSession(str(path)).run(None, feeds)[0]
        np.testing.assert_array_equal(run_split(*extract(h.index, cut), cut, feeds)["y"], full)


def _fuzz_model(nodes, inputs, outputs, inits=(), value_info=()) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits), value_info=list(value_info))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _every_cut_equals_the_model(h, feeds) -> int:
    full = dict(zip(h.index.outputs, make_session(h.path).run(None, feeds), strict=True))
    for cut in h.cuts():
        head, tail = extract(h.index, cut)
        got = run_split(head, tail, cut, feeds)
        assert set(got) == set(full)
        for k, ref in full.items():
            assert got[k].shape == ref.shape and np.allclose(got[k], ref, atol=1e-6), (cut.index, k)
    return len(h.cuts())


def test_nodes_whose_results_no_output_uses_are_left_out(tmp_path):
    """Dead code is valid ONNX and runs; a cut whose tail (or head) held only such nodes was listed, then
    `split` failed with onnxruntime's "At least one output should be requested"."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    dead_last = _fuzz_model(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Neg", ["r"], ["y"]),
            helper.make_node("Sigmoid", ["x"], ["dead"]),
            helper.make_node("Abs", ["dead"], ["dead2"]),
        ],
        [x],
        [y],
    )
    dead_first = _fuzz_model(
        [
            helper.make_node("Sigmoid", ["x"], ["dead"]),
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Neg", ["r"], ["y"]),
        ],
        [x],
        [y],
    )
    for name, model in (("last", dead_last), ("first", dead_first)):
        h = open_model(_save(model, tmp_path / f"{name}.onnx"))
        assert [n.op_type for n in h.model.graph.node] == ["Relu", "Neg"]
        assert not h.file_runs_as_planned  # the file's dead nodes would run (and be timed) in its session
        assert _every_cut_equals_the_model(h, sample_feeds(h.model, 2, 0)) == 1
        out = tmp_path / f"plan-{name}"
        proc = run_cli("split", str(h.path), "--cut", "1", "-o", str(out))
        assert proc.returncode == 0, proc.stderr


def test_a_weight_only_dead_nodes_read_goes_with_them_and_the_whole_model_still_runs(tmp_path):
    """A dead MatMul's weight, left behind, was handed to onnxruntime with the live ones, which had
    dropped it as unread: "Failed to find existing initializer". So was an unread weight in the file
    itself, once the whole model ran from memory (any file with value_info)."""
    rng = np.random.default_rng(0)
    v, w, spare = (
        numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32), k)
        for k in ("v", "w", "spare")
    )
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])
    model = _fuzz_model(
        [
            helper.make_node("MatMul", ["x", "v"], ["m"]),
            helper.make_node("Relu", ["m"], ["y"]),
            helper.make_node("MatMul", ["x", "w"], ["dead"]),
        ],
        [x],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])],
        [v, w, spare],
        [helper.make_tensor_value_info("m", TensorProto.FLOAT, ["N", 32])],
    )
    # a session of a model in memory, whatever loaded it (split-decoder's path does not prune)
    kept = make_session(model, weights=None)
    assert [i.name for i in kept.get_inputs()] == ["x"]
    h = open_model(_save(model, tmp_path / "w.onnx"))
    assert [t.name for t in h.model.graph.initializer] == ["v"]
    feeds = {"x": rng.standard_normal((2, 32)).astype(np.float32)}
    want = np.maximum(feeds["x"] @ onnx.numpy_helper.to_array(v), 0)
    np.testing.assert_allclose(h.whole_session().run(None, feeds)[0], want, rtol=1e-5, atol=1e-5)


def test_a_stale_declared_shape_does_not_hide_a_tensor_or_change_the_reference(tmp_path):
    """An exporter's value_info traced at another input ([3, 2, 5] for what is [N, 2, 4]) where inference
    cannot follow (a Reshape to a computed shape): the trial run that measures such tensors kept the stale
    entry, onnxruntime failed in the Reshape after it, and the tensor stayed unknown (`split` then failed the
    checker). onnxruntime running the file trusts such entries, so the whole model's reference is taken from
    the graph without them, as every plan's parts run."""
    ints = {"i0": [0], "four": [4], "two": [2], "rest": [-1], "halves": [2, 2]}
    inits = [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in ints.items()]
    model = _fuzz_model(
        [
            helper.make_node("Shape", ["x"], ["s"]),
            helper.make_node("Gather", ["s", "i0"], ["b"], axis=0),
            helper.make_node("Concat", ["b", "four", "rest"], ["shape"], axis=0),
            helper.make_node("Reshape", ["x", "shape"], ["t10"]),
            helper.make_node("Split", ["t10", "halves"], ["t15", "t16"], axis=1),
            helper.make_node("Shape", ["t16"], ["s2"]),
            helper.make_node("Gather", ["s2", "i0"], ["b2"], axis=0),
            helper.make_node("Concat", ["b2", "two", "rest"], ["shape2"], axis=0),
            helper.make_node("Reshape", ["t16", "shape2"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 2, 2])],
        [
            helper.make_tensor_value_info("t10", TensorProto.FLOAT, ["N", 4, 4]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "a", "b"]),
        ],
        inits,
        [helper.make_tensor_value_info("t16", TensorProto.FLOAT, [3, 2, 5])],
    )
    onnx.checker.check_model(model)  # valid ONNX: only a full check's inference sees the entry is wrong
    onnx.save(model, tmp_path / "stale.onnx")
    h = open_model(tmp_path / "stale.onnx")
    assert h.index.tensor("t16").dims == ["N", 2, 4] and h.index.trial_error is None
    assert not h.model.graph.value_info and not h.file_runs_as_planned
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 4, 2, 2)).astype(np.float32)}
    assert [a.shape for a in h.whole_session().run(None, feeds)] == [(2, 4, 4), (2, 2, 4)]
    assert _every_cut_equals_the_model(h, feeds) == len(h.index.compute) - 1


def test_a_cut_named_by_what_cuts_lists_as_crossing_is_that_cut(tmp_path):
    """`cuts` lists cut 3 as crossing n (and the raw input x, which a later branch reads; the head also
    returns u, a model output from a branch n does not need); `--cut n` was refused as needing t from the
    head, and the way out it named sent twice the bytes."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    model = _fuzz_model(
        [
            helper.make_node("Sigmoid", ["x"], ["t"]),
            helper.make_node("Relu", ["t"], ["u"]),
            helper.make_node("Neg", ["t"], ["n"]),
            helper.make_node("Abs", ["n"], ["y"]),
            # a branch of its own after them: the listed cut leaves it to the tail, and so does the name
            helper.make_node("Exp", ["x"], ["b1"]),
            helper.make_node("Tanh", ["b1"], ["y2"]),
        ],
        [x],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["N", 4]) for o in ("u", "y", "y2")],
    )
    path = _save(model, tmp_path / "branch.onnx")
    h = open_model(path)
    listed = next(c for c in h.cuts() if [t.name for t in c.crossing] == ["x", "n"])
    from splitpoint.core.graph.cuts import resolve_cut

    for spec in ("n", "x,n"):
        named = resolve_cut(h.index, spec)
        assert named.index == listed.index == 3 and [t.name for t in named.crossing] == ["x", "n"]
        assert named.head_outputs == ["u"]
    proc = run_cli("split", path, "--cut", "n", "-o", str(tmp_path / "plan"))
    assert proc.returncode == 0 and "cut 3 crosses x, n" in proc.stdout + proc.stderr, proc.stdout


def test_a_model_whose_external_data_holds_a_shape_input_is_measured_from_memory(tmp_path):
    """Saved with size_threshold=0, an Unsqueeze's axes live in the external file: onnxruntime cannot load
    that file ("Cannot parse data from external tensors"), so `profile` and `fidelity` were refused,
    blaming --input-shape, while `split` (whose parts carry the data inline) worked."""
    from splitpoint.profiles.profiler import ProfileSettings, profile_model

    ax = numpy_helper.from_array(np.array([1], np.int64), "ax")
    w = numpy_helper.from_array(np.full((1, 1, 3), 2.0, np.float32), "w")
    model = _fuzz_model(
        [
            helper.make_node("Unsqueeze", ["x", "ax"], ["u"]),
            helper.make_node("Relu", ["u"], ["r"]),
            helper.make_node("Mul", ["r", "w"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 3])],
        [ax, w],
    )
    path = tmp_path / "ext.onnx"
    (tmp_path / "sub").mkdir()
    onnx.save(
        model,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="sub/w.bin",
        size_threshold=0,
    )
    h = open_model(path)
    feeds = {"x": np.array([[-1.0, 0.5, 2.0]], np.float32)}
    np.testing.assert_allclose(h.whole_session().run(None, feeds)[0], [[[0.0, 1.0, 4.0]]])
    assert not h.file_runs_as_planned  # every later session of it too
    prof = profile_model(h, ProfileSettings(budget=4, anchors=1))
    assert prof.whole.median_ms > 0 and len(prof.cuts) == 2


def test_samples_that_contradict_the_model_s_fixed_sizes_are_named_before_any_run(tmp_path):
    """ids [2, 9] beside a mask [2, 7], where --input-shape ids:Nx9 fixes their shared sequence at 9: the
    split ran the head and refused in the tail ("the tail does not run ... BroadcastIterator")."""
    emb = numpy_helper.from_array(np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32), "emb")
    model = _fuzz_model(
        [
            helper.make_node("Gather", ["emb", "ids"], ["e"]),
            helper.make_node("Unsqueeze", ["mask", "ax"], ["m"]),
            helper.make_node("Mul", ["e", "m"], ["y"]),
        ],
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 4])],
        [emb, numpy_helper.from_array(np.array([2], np.int64), "ax")],
    )
    path = _save(model, tmp_path / "tok.onnx")
    folder = tmp_path / "samples"
    folder.mkdir()
    np.savez(folder / "s0.npz", ids=np.zeros((2, 9), np.int64), mask=np.ones((2, 7), np.float32))
    proc = run_cli(
        "split",
        path,
        "--cut",
        "1",
        "-o",
        str(tmp_path / "p"),
        "--inputs",
        str(folder),
        "--input-shape",
        "ids:Nx9",
    )
    assert (
        proc.returncode == 2 and "s0.npz: mask has shape [2, 7]; the model takes ['batch', 9]" in proc.stderr
    ), proc.stderr
    from splitpoint.core.errors import SplitPointError
    from splitpoint.core.samples import load_inputs

    # both free: the sizes a shared symbol gets must agree
    with pytest.raises(SplitPointError, match="share dimension 'seq', which is 9 in ids and 7 in mask"):
        load_inputs(onnx.load(path), folder)
    # a leading "any size" is N in every input, and need not agree: a node-feature matrix's rows and an
    # index list's length (samples run one at a time)
    rows = _fuzz_model(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Gather", ["r", "idx"], ["y"], axis=0)],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["?", 4]),
            helper.make_tensor_value_info("idx", TensorProto.INT64, ["?"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["?", 4])],
    )
    graph_folder = tmp_path / "graph"
    graph_folder.mkdir()
    np.savez(graph_folder / "a.npz", x=np.ones((5, 4), np.float32), idx=np.array([0, 4, 2], np.int64))
    h = open_model(_save(rows, tmp_path / "rows.onnx"))
    assert [a.shape for a in load_inputs(h.model, graph_folder)[0].values()] == [(5, 4), (3,)]


def test_sample_files_of_strings_or_with_a_lying_header_are_refused_by_name(tmp_path):
    """A .npy of strings or bytes raised a traceback from the cast to the input's type (plan, profile,
    split, fidelity --inputs); one whose header declares 3.5 PiB made numpy allocate it first: "not enough
    memory", the file unnamed, and the edge's whole run ended on that one input."""
    import struct

    from splitpoint.core.errors import SplitPointError
    from splitpoint.core.samples import load_inputs, read_sample

    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])], "g", [_vi("x", [1, 4])], [_vi("y", [1, 4])]
        )
    )
    cases = {
        "strs.npy": lambda p: np.save(p, np.array(["a", "b", "c", "d"])),
        "bytes.npy": lambda p: np.save(p, np.array([b"ab", b"cd"])),
        "strs.npz": lambda p: np.savez(p, x=np.array(["a", "b", "c", "d"])),
    }
    expect = {"strs.npy": "<U1 values, not numbers", "bytes.npy": "|S2 values, not numbers"}
    expect["strs.npz"] = "array 'x' holds <U1 values, not numbers"
    for name, make in cases.items():
        folder = tmp_path / name.replace(".", "_")
        folder.mkdir()
        make(folder / name)
        with pytest.raises(SplitPointError, match=f"{name}: .*{re.escape(expect[name])}"):
            load_inputs(model, folder)
        with pytest.raises(SplitPointError, match=f"{name}: .*{re.escape(expect[name])}"):
            read_sample(folder / name, {"x": 2})
    # a header declaring a shape of 2**48 float32 values, and 16 bytes of data
    liar = tmp_path / "liar"
    liar.mkdir()
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (1, 281474976710656), }"
    header += b" " * (64 - 10 - len(header) % 64 - 1) + b"\n"
    (liar / "x.npy").write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + b"\0" * 16)
    for read in (lambda: load_inputs(model, liar), lambda: read_sample(liar / "x.npy", {"x": 2})):
        with pytest.raises(
            SplitPointError,
            match=r"x.npy: not a readable .npy array \(its header declares .* the file holds 16\)",
        ):
            read()


def test_rows_the_data_keeps_behind_an_op_inference_cannot_follow_are_left_free_in_the_plan(tmp_path):
    """Behind an op shape inference does not know (com.microsoft Gelu), a Compress's kept rows were sized
    by two trial runs on random inputs: both kept none, the plan fixed the cut tensor at 0 rows, and the
    server refused every request that kept one ("shape [1, 16], the plan expects shape [0, 16]")."""
    from splitpoint.edge.client import EdgeClient, EdgeConfig
    from splitpoint.server.tail_server import ServerConfig, TailServer

    rng = np.random.default_rng(0)

    def w(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a1"]),
        helper.make_node("Gelu", ["a1"], ["g"], domain="com.microsoft"),
        helper.make_node("ReduceMax", ["x"], ["score"], axes=[1], keepdims=0),
        helper.make_node("Greater", ["score", "thr"], ["keep"]),
        helper.make_node("Compress", ["g", "keep"], ["kept"], axis=0),  # the rows over 3.0: random keeps none
        helper.make_node("Relu", ["kept"], ["kr"]),
        helper.make_node("MatMul", ["kr", "w2"], ["dets"]),
        helper.make_node("Sigmoid", ["score"], ["conf"]),
    ]
    graph = helper.make_graph(
        nodes,
        "filter",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [
            helper.make_tensor_value_info("dets", TensorProto.FLOAT, ["D", 4]),
            helper.make_tensor_value_info("conf", TensorProto.FLOAT, ["N"]),
        ],
        [w("w1", 16, 16), w("w2", 16, 4), numpy_helper.from_array(np.array(3.0, np.float32), "thr")],
    )
    m = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)]
    )
    m.ir_version = 8
    path = tmp_path / "filter.onnx"
    onnx.save(m, path)
    plans = tmp_path / "plans"
    r = run_cli("split", str(path), "--cut", "6", "-o", str(plans / "p"), timeout=120)
    assert r.returncode == 0, r.stderr
    plan = Plan.load(plans / "p")
    kr = next(t for t in plan.stages[1].receives if t.name == "kr")
    assert kr.shape.split("x")[0] == "?", kr.shape  # not the 0 rows two random trials kept
    whole = make_session(str(path))
    none_kept = rng.standard_normal((5, 16)).astype(np.float32)
    none_kept[np.abs(none_kept) > 2.9] = 0.0
    one_kept = none_kept.copy()
    one_kept[2, 5] = 4.0
    many = np.abs(rng.standard_normal((300, 16))).astype(np.float32) * 1.6
    srv = TailServer(ServerConfig(bind="tcp://127.0.0.1:0", plans_dir=plans)).start()
    try:
        with EdgeClient(
            EdgeConfig(plan_dir=plans / "p", server=srv.endpoint, fallback=False, timeout_s=10)
        ) as c:
            for x in (none_kept, one_kept, many, none_kept):
                got = c.infer({"x": x}, timeout=30)
                assert not got.fallback
                for out, ref in zip(got.outputs, whole.run(None, {"x": x}), strict=True):
                    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
                assert got.outputs[0].shape == (int((x.max(axis=1) > 3.0).sum()), 4)
    finally:
        srv.stop()


def test_a_leading_dimension_named_for_a_length_is_said_to_be_taken_as_the_batch(tmp_path, caplog):
    """Every symbolic leading dimension is the batch, sized 1 in the samples: an attention over x[L, 64]
    was costed at L = 1 (its cuts ranked upside down), and nothing said so."""
    import logging

    def model(lead: str) -> str:
        nodes = [helper.make_node("Relu", ["x"], ["y"])]
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [lead, 64])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [lead, 64])
        return _save(_tiny(nodes, [x], [y], name=lead), tmp_path / f"{lead}.onnx")

    with caplog.at_level(logging.WARNING, logger="splitpoint.model"):
        for lead in ("L", "seq_len", "num_boxes", "batch", "N", "batch_size"):
            open_model(model(lead))
        said = [r.getMessage() for r in caplog.records if "taken as the batch" in r.getMessage()]
        assert len(said) == 3 and all("--input-shape x:200x64" in m for m in said), said
        assert [m.split("dimension '")[1].split("'")[0] for m in said] == ["L", "seq_len", "num_boxes"]
        open_model(model("L"))  # once per model and input, not at every load
        assert len([r for r in caplog.records if "taken as the batch" in r.getMessage()]) == 3
        caplog.clear()
        open_model(model("L"), {"x": (200, 64)})  # a size given: nothing to say
    assert not caplog.records


def test_what_follows_a_branch_keeps_the_batch_and_sizes_trial_runs_measure(tmp_path):
    """A branch's outputs keep the shapes its bodies give: after an If and an op inference cannot follow
    (com.microsoft Gelu), a tensor two trials measure at [1, 16] and [2, 16] is Nx16 (64 bytes a sample),
    not of unknown size, which left it out of MACs, memory and the server's shape checks."""
    w = numpy_helper.from_array(np.ones((16, 16), np.float32) * 0.1, "w")
    then_g = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", 1, None)],
    )
    else_g = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["e"])], "else", [], [helper.make_tensor_value_info("e", 1, None)]
    )
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "z"], ["c"]),
        helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g),
        helper.make_node("MatMul", ["y", "w"], ["a"]),
        helper.make_node("Gelu", ["a"], ["g"], domain="com.microsoft"),
        helper.make_node("MatMul", ["g", "w"], ["o"]),
    ]
    g = helper.make_graph(
        nodes,
        "branch",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, ["N", 16])],
        [w, numpy_helper.from_array(np.array(0, np.float32), "z")],
    )
    m = helper.make_model(
        g, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)]
    )
    m.ir_version = 8
    onnx.save(m, tmp_path / "branch.onnx")
    h = open_model(tmp_path / "branch.onnx")
    after_gelu = next(c for c in h.cuts() if [t.name for t in c.crossing] == ["g"])
    assert (after_gelu.crossing[0].shape, after_gelu.crossing[0].bytes_per_sample) == ("Nx16", 64)
    assert after_gelu.head_macs == 256 and after_gelu.total_macs == 512


@pytest.mark.parametrize("shape", [(48,), (48, 1)])
def test_one_value_per_sample_is_compared_over_the_samples(shape):
    """A voice detector's speech probability, one value per sample: a cosine per row of one value is 1
    whatever the error but a sign (int4 at 21.5 dB SNR read 1.00000). Over the samples, it follows the
    error as a vector output's cosine does, and equal outputs stay exactly 1."""
    rng = np.random.default_rng(0)
    ref = (1 + rng.random(shape)).astype(np.float32)  # no error below changes a sign
    small = compare("p", ref, ref + np.float32(1e-4) * rng.standard_normal(shape).astype(np.float32), 48)
    big = compare("p", ref, (ref + 0.4 * rng.uniform(-1, 1, shape)).astype(np.float32), 48)
    assert compare("p", ref, ref.copy(), 48).cosine == 1.0
    assert small.cosine > 0.99999
    assert big.cosine < 0.99
    one_inf = ref.copy()
    one_inf[3] = np.inf  # one sample the split made infinite agrees with nothing, the rest still count
    assert compare("p", ref, one_inf, 48).cosine == pytest.approx(47 / 48)
    nan_in_both = ref.copy()
    nan_in_both[5] = np.nan  # the float model's own NaN, reproduced by the split: agreement, not a miss
    assert compare("p", nan_in_both, nan_in_both.copy(), 48).cosine == 1.0
    assert compare("p", nan_in_both, one_inf, 48).cosine < 47 / 48


def test_a_branch_the_inputs_never_take_need_not_type_check_at_their_sizes(tmp_path):
    """onnxruntime type-checks both branches of an If at the sizes the graph declares: once --input-shape
    fixed x at 1x512, an else branch that squeezes x's second dimension (silero-vad's 8 kHz branch, for a
    16 kHz input) failed to load, and no command ran the model, though the file runs at that size. The
    sessions leave such sizes to the run; the plan still checks them."""
    from splitpoint.core.errors import SplitPointError
    from splitpoint.core.graph.shapes import parse_input_shapes
    from splitpoint.core.plandir import write_plan
    from splitpoint.core.runner import assemble, load_split, make_session

    axes = helper.make_tensor("ax", TensorProto.INT64, [1], [1])
    then_g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["t_out"])], "then", [], [_vi("t_out", ["a", "b"])]
    )
    else_g = helper.make_graph(
        [
            helper.make_node("Constant", [], ["axes"], value=axes),
            helper.make_node("Squeeze", ["x", "axes"], ["sq"]),
            helper.make_node("Unsqueeze", ["sq", "axes"], ["e_out"]),
        ],
        "else",
        [],
        [_vi("e_out", ["a", "b"])],
    )
    nodes = [
        helper.make_node("If", ["c"], ["i"], then_branch=then_g, else_branch=else_g),
        helper.make_node("Neg", ["i"], ["y"]),
    ]
    m = _tiny(nodes, [_vi("x", ["N", "L"]), _vi("c", [], TensorProto.BOOL)], [_vi("y", ["N", "L"])])
    path = _save(m, tmp_path / "branches.onnx")
    h = open_model(path, parse_input_shapes(["x:1x512"]))
    feeds = {"x": np.linspace(-1, 1, 512, dtype=np.float32)[None], "c": np.array(True)}
    want = make_session(path).run(None, feeds)[0]
    np.testing.assert_array_equal(h.whole_session().run(None, feeds)[0], want)
    (tmp_path / "in").mkdir()
    np.savez(tmp_path / "in" / "s.npz", **feeds)
    h.fidelity_samples(1, tmp_path / "in")
    cut = next(c for c in h.cuts() if [t.name for t in c.crossing] == ["i"])
    write_plan(h, tmp_path / "p", cut=cut)
    plan, head, tail = load_split(tmp_path / "p")  # the head.onnx file, as an edge loads it
    sent, early = head.run(feeds)
    np.testing.assert_array_equal(assemble(plan, early, tail.run(sent))[0], want)
    assert [t.shape for t in plan.inputs if t.name == "x"] == ["1x512"]
    with pytest.raises(SplitPointError, match=r"shape \[1, 256\], the plan expects shape \[1, 512\]"):
        head.check_inputs({"x": np.ones((1, 256), np.float32), "c": np.array(True)})  # as an edge does
    # the server's check of what arrives: the plan's sizes, not the session's open ones
    assert not any("__size" in str(d) for _, shape in tail.expect.values() for d in shape), tail.expect


def test_a_long_onnxruntime_report_keeps_its_cause():
    """onnxruntime names every If on the way to a failure and the cause last: cut at 300 characters, the
    error read "... running LSTM node. Na" and the reason was gone."""
    from splitpoint.core.errors import clipped

    report = "Non-zero status code returned while running If node. " * 10 + "Input X must have 3 dimensions"
    short = clipped(report)
    assert short.endswith("Input X must have 3 dimensions") and short.startswith("Non-zero status")
    assert len(short) <= 303 and clipped("brief") == "brief"


def test_a_rank_that_follows_the_batch_beside_an_input_of_fixed_size(tmp_path):
    """x[N, 4] beside a fixed-size input (a [1] bias, an LSTM's [25] state): the trial ran at batch 1 only,
    took an axes-less Squeeze's [N] for a scalar, and the plan refused every batch of 2 ("rank 1, the plan
    expects shape []"). The runs are at batch 2 too: an output keeps the [N] its file declares, and a cut
    tensor whose rank follows the batch is refused by name, not written as a scalar."""
    from splitpoint.core.errors import PlanError
    from splitpoint.core.plan import Plan
    from splitpoint.core.plandir import write_plan
    from splitpoint.core.runner import assemble, load_split, mismatch, output_expects

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 1)).astype(np.float32), "W")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["m"]),
        helper.make_node("Relu", ["m"], ["r"]),
        helper.make_node("Squeeze", ["r"], ["s"]),
        helper.make_node("Add", ["s", "bias"], ["y"]),
    ]
    m = _tiny(nodes, [_vi("x", ["N", 4]), _vi("bias", [1])], [_vi("y", ["N"])], [w])
    h = open_model(_save(m, tmp_path / "squeeze.onnx"))
    assert h.index.tensor("y").dims == ["N"]
    assert h.index.tensor("s").dims is None  # a scalar at batch 1, [N] at batch 2
    by_crossing = {tuple(t.name for t in c.crossing): c for c in h.cuts()}
    write_plan(h, tmp_path / "p", cut=by_crossing[("bias", "r")])
    assert [o.shape for o in Plan.load(tmp_path / "p").outputs] == ["N"]
    with pytest.raises(PlanError, match=r"the rank of 's' is not known .* --input-shape"):
        write_plan(h, tmp_path / "q", cut=by_crossing[("bias", "s")])
    # such an output: its file says [N], which batch 1 does not give (a scalar): no shape, any rank taken
    nodes = [helper.make_node("MatMul", ["x", "W"], ["c"]), helper.make_node("Squeeze", ["c"], ["out"])]
    h = open_model(_save(_tiny(nodes, [_vi("x", ["N", 4])], [_vi("out", ["N"])], [w]), tmp_path / "sq.onnx"))
    assert h.index.tensor("out").dims is None
    write_plan(h, tmp_path / "r", cut=h.cuts()[0])
    plan, head, tail = load_split(tmp_path / "r")
    assert [o.shape for o in plan.outputs] == ["?"]
    for n in (1, 2):  # what the edge checks of the reply (a scalar at batch 1) holds at either batch
        sent, early = head.run({"x": np.ones((n, 4), np.float32)})
        out = assemble(plan, early, tail.run(sent))[0]
        assert out.shape == (() if n == 1 else (n,))
        assert mismatch("out", out, output_expects(plan)["out"]) is None


def _fused_bert_embedding(tmp_path):
    """onnxruntime's transformer optimiser fuses a BERT's three lookups into com.microsoft's
    EmbedLayerNormalization: its 2 token types, 12 positions and 30 words are rows of tables it reads, not
    of a Gather's, and shape inference cannot type what it makes."""
    rng = np.random.default_rng(0)
    tables = {
        "word": rng.standard_normal((30, 8)),
        "pos": rng.standard_normal((12, 8)),
        "seg": rng.standard_normal((2, 8)),
        "gamma": np.ones(8),
        "beta": np.zeros(8),
    }
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in tables.items()]
    nodes = [
        helper.make_node(
            "EmbedLayerNormalization",
            ["input_ids", "token_type_ids", "word", "pos", "seg", "gamma", "beta"],
            ["emb", "mask_index"],
            domain="com.microsoft",
            epsilon=1e-5,
        ),
        helper.make_node("Relu", ["emb"], ["r"]),
        helper.make_node("Sigmoid", ["r"], ["y"]),
    ]
    ids = [_vi("input_ids", [1, 6], TensorProto.INT32), _vi("token_type_ids", [1, 6], TensorProto.INT32)]
    g = helper.make_graph(nodes, "fused", ids, [_vi("y", [1, 6, 8])], inits)
    return _with_contrib_ops(g, tmp_path / "fused.onnx")


def _with_contrib_ops(g: onnx.GraphProto, path: Path) -> Path:
    """Saved with onnxruntime's com.microsoft domain imported (no ONNX checker: it knows none of its ops)."""
    m = helper.make_model(
        g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    onnx.save(m, path)
    return path


def test_a_fused_embeddings_token_types_stay_within_its_table_and_its_cuts_are_offered(tmp_path):
    """Random token types 0..9 against a fused embedding's 2 rows failed the trial run that types what
    the fused op makes: every cut after it went missing without a word, and a cut named there was said to
    cross "a sequence, a map or an optional value"."""
    from splitpoint.core.samples import index_bounds, sample_feeds

    path = _fused_bert_embedding(tmp_path)
    model = onnx.load(path)
    assert index_bounds(model) == {"input_ids": 30, "token_type_ids": 2}
    feeds = sample_feeds(model, 1, 0)
    assert feeds["token_type_ids"].max() < 2 and feeds["input_ids"].max() < 30
    h = open_model(path)
    crossing = [[t.name for t in c.crossing] for c in h.cuts()]
    assert ["r"] in crossing, crossing
    split = run_cli("split", str(path), "--cut", "emb", "-o", str(tmp_path / "p"))
    assert split.returncode == 0, split.stderr


def _untyped_after_a_failing_trial(tmp_path):
    """Behind com.microsoft's Gelu (untyped by inference) a Reshape to an input's shape: the trial run on
    random 0..9 fails, and the tensors after the Gelu stay of unknown type."""
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Gelu", ["a"], ["b"], domain="com.microsoft"),
        helper.make_node("Reshape", ["b", "shape"], ["c"]),
        helper.make_node("Sigmoid", ["c"], ["y"]),
    ]
    g = helper.make_graph(
        nodes, "gated", [_vi("x", [1, 16]), _vi("shape", [2], TensorProto.INT64)], [_vi("y", [4, 4])]
    )
    return _with_contrib_ops(g, tmp_path / "gated.onnx")


def test_cuts_a_failed_trial_run_leaves_out_are_said_with_the_reason(tmp_path):
    path = _untyped_after_a_failing_trial(tmp_path)
    shown = run_cli("cuts", str(path))
    assert shown.returncode == 0, shown.stderr
    err = " ".join(shown.stderr.split())
    assert "have no known type (b, c)" in err and "the cuts that cross them are not offered" in err, err
    assert "Reshape" in err and "integers 0..9 in 'shape'" in err, err
    named = run_cli("split", str(path), "--cut", "b", "-o", str(tmp_path / "p"))
    assert named.returncode != 0
    said = " ".join(named.stderr.split())
    assert "type of b is unknown" in said and "could not run the model" in said and "sequence" not in said, (
        said
    )
    assert not (tmp_path / "p").exists()


def test_plan_and_fidelity_name_the_random_integers_onnxruntime_refused(tmp_path):
    """A model that reads an integer input as a shape fails on random 0..9: profile and split said so and
    named --inputs; fidelity (and plan, measuring on the same samples) gave onnxruntime's words alone."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"]),
        helper.make_node("Reshape", ["a", "shape"], ["c"]),
        helper.make_node("Sigmoid", ["c"], ["y"]),
    ]
    g = helper.make_graph(
        nodes, "rs", [_vi("x", [1, 16]), _vi("shape", [2], TensorProto.INT64)], [_vi("y", [4, 4])], [w]
    )
    path = _save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "rs.onnx")
    said = run_cli("fidelity", path, "--cut", "1", "--codec", "int8")
    assert said.returncode == 2, said.stderr
    err = " ".join(said.stderr.split())
    assert "integers 0..9 in 'shape'" in err and "give --inputs DIR" in err, err
    (tmp_path / "in").mkdir()
    np.savez(tmp_path / "in" / "a.npz", x=np.ones((1, 16), np.float32), shape=np.array([4, 4], np.int64))
    ok = run_cli("fidelity", path, "--cut", "1", "--codec", "int8", "--inputs", str(tmp_path / "in"))
    assert ok.returncode == 0, ok.stderr


def test_fused_attention_counts_its_projections_and_scores_as_work(tmp_path):
    """com.microsoft Attention (a fused BERT layer) holds the layer's Q, K and V projections: counted as
    none, a cut after three fused layers read as a small share of the model's work."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 24)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(24, np.float32), "b")
    nodes = [
        helper.make_node("Attention", ["x", "w", "b"], ["a"], domain="com.microsoft", num_heads=2),
        helper.make_node("Relu", ["a"], ["y"]),
    ]
    g = helper.make_graph(nodes, "attn", [_vi("x", [1, 4, 8])], [_vi("y", [1, 4, 8])], [w, b])
    path = _with_contrib_ops(g, tmp_path / "attn.onnx")
    make_session(str(path)).run(None, {"x": np.ones((1, 4, 8), np.float32)})  # onnxruntime runs it
    (cut,) = open_model(path).cuts()
    # 4 tokens x 8 inputs x 24 projected, and 4 x 4 scores over Q's 8 and V's 8
    assert cut.head_macs == cut.total_macs == 4 * 8 * 24 + 4 * 4 * (8 + 8)


def test_an_op_only_onnxruntime_defines_in_onnxs_own_domain_passes_the_checker_and_splits(tmp_path):
    """onnxruntime-genai writes SimplifiedLayerNormalization in ONNX's own domain, which the ONNX checker
    does not know ("No Op registered") and onnxruntime runs: such a file was refused by every command. An
    op neither of them defines is still refused in the checker's words."""
    gamma = numpy_helper.from_array(np.linspace(0.5, 1.5, 8).astype(np.float32), "gamma")

    def model(op: str) -> str:
        nodes = [
            helper.make_node("Relu", ["x"], ["a"]),
            helper.make_node(op, ["a", "gamma"], ["n"], axis=-1, epsilon=1e-5),
            helper.make_node("Sigmoid", ["n"], ["y"]),
        ]
        g = helper.make_graph(nodes, "rms", [_vi("x", [1, 4, 8])], [_vi("y", [1, 4, 8])], [gamma])
        path = tmp_path / f"{op}.onnx"
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), path)
        return str(path)

    path = model("SimplifiedLayerNormalization")
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 4, 8)).astype(np.float32)}
    whole = make_session(path).run(None, feeds)[0]
    h = open_model(path)
    assert len(h.cuts()) == 2
    for cut in h.cuts():
        head, tail = extract(h.index, cut)
        np.testing.assert_array_equal(run_split(head, tail, cut, feeds)["y"], whole)
    assert [n.domain for n in h.model.graph.node] == ["", "", ""]  # set aside for the check only
    unknown = run_cli("cuts", model("NoSuchNormalization"))
    assert unknown.returncode != 0 and "No Op registered for NoSuchNormalization" in unknown.stderr
    # an ONNX op below the opset it begins at, which onnxruntime has no earlier one of either: refused
    early = helper.make_graph(
        [helper.make_node("Gelu", ["x"], ["y"])], "early", [_vi("x", [1, 4, 8])], [_vi("y", [1, 4, 8])]
    )
    onnx.save(helper.make_model(early, opset_imports=[helper.make_opsetid("", 11)]), tmp_path / "early.onnx")
    refused = run_cli("cuts", str(tmp_path / "early.onnx"))
    assert refused.returncode != 0 and "No Op registered for Gelu with domain_version of 11" in refused.stderr


def test_names_that_look_like_rich_markup_are_printed_as_they_are(tmp_path):
    """A node named '[/]relu' made `cuts` die on rich's MarkupError, an output named '[/]' `fidelity`, a
    crossing tensor '[/]' `split` after its plan was written (told it failed), and '[bold]b' printed as b."""
    nodes = [
        helper.make_node("Relu", ["x"], ["[/]"], name="[/]relu"),
        helper.make_node("Neg", ["[/]"], ["[bold]b"]),
        helper.make_node("Abs", ["[bold]b"], ["[red]y"]),
    ]
    g = helper.make_graph(nodes, "g", [_vi("x", [1, 4])], [_vi("[red]y", [1, 4])])
    path = _save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "markup.onnx")
    shown = run_cli("cuts", path)
    assert shown.returncode == 0, shown.stderr
    assert "[/]relu" in shown.stdout and "[bold]b[1x4]" in shown.stdout, shown.stdout
    for k, name in ((1, "[/]"), (2, "[bold]b")):
        split = run_cli("split", path, "--cut", str(k), "-o", str(tmp_path / f"p{k}"))
        assert split.returncode == 0, split.stderr
        assert f"cut {k} crosses {name} (" in split.stdout, split.stdout
    measured = run_cli("fidelity", path, "--cut", "2", "--codec", "int8")
    assert measured.returncode == 0, measured.stderr
    assert "[red]y" in measured.stdout, measured.stdout


def test_onnx_attention_counts_its_scores_as_work(tmp_path):
    """ONNX's own Attention (opset 23, as torch.onnx.export writes scaled_dot_product_attention there) was
    counted as no work: the same module at opset 18, its attention as MatMuls, had 2 S² D more."""
    rng = np.random.default_rng(0)
    ws = [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), f"w{k}") for k in "qkv"]
    nodes = [helper.make_node("MatMul", ["x", f"w{k}"], [k]) for k in "qkv"]
    nodes += [
        helper.make_node("Attention", ["q", "k", "v"], ["a"], q_num_heads=2, kv_num_heads=2),
        helper.make_node("Relu", ["a"], ["y"]),
    ]
    g = helper.make_graph(nodes, "sdpa", [_vi("x", [1, 8, 16])], [_vi("y", [1, 8, 16])], ws)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)])
    h = open_model(_save(m, tmp_path / "sdpa.onnx"))
    last = h.cuts()[-1]
    # three projections of 8 tokens x 16 x 16, then 8 x 8 scores over 16 wide and their sum of V
    assert last.total_macs == 3 * 8 * 16 * 16 + 2 * 8 * 8 * 16


def test_a_top1_left_out_is_said_why_under_the_fidelity_table(tmp_path):
    """Class scores the unsplit model answers one class for on every random input show '-' for top-1: the
    table says why (it read as a figure missing), and that the cosine tells there."""
    bias = numpy_helper.from_array(np.array([0, 0, 0, 100], np.float32), "bias")
    model = _tiny(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("Add", ["r", "bias"], ["s"]),
            helper.make_node("Softmax", ["s"], ["y"], axis=1),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        inits=[bias],
    )
    path = _save(model, tmp_path / "one-class.onnx")
    r = run_cli("fidelity", path, "--cut", "r", "--codec", "int8")
    assert r.returncode == 0, r.stderr
    assert "top-1 -: not class scores" in r.stdout and "the cosine tells there" in r.stdout, r.stdout
    assert (
        json.loads(run_cli("fidelity", path, "--cut", "r", "--json").stdout)["outputs"][0]["top1_agreement"]
        is None
    )


@pytest.mark.parametrize("equation", ["bqd,bkd->bqk", "...qd,...kd->...qk"])
def test_einsum_counts_the_letters_it_sums_over_as_work(tmp_path, equation):
    """An Einsum (attention scores, bilinear layers, as some exports write them) was counted as no work:
    it is as much as the MatMul that computes the same product."""
    rng = np.random.default_rng(0)
    wq = numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "wq")
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"]),
        helper.make_node("Einsum", ["q", "x"], ["s"], equation=equation),
        helper.make_node("Relu", ["s"], ["y"]),
    ]
    g = helper.make_graph(nodes, "ein", [_vi("x", ["N", 8, 16])], [_vi("y", ["N", 8, 8])], [wq])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    h = open_model(_save(m, tmp_path / "ein.onnx"))
    # the projection (8 tokens x 16 x 16), then 8 x 8 scores, each a sum over the 16 wide d
    assert h.cuts()[-1].total_macs == 8 * 16 * 16 + 8 * 8 * 16


@pytest.mark.parametrize(
    "equation, shapes, out, macs",
    [
        ("bij->bji", [["N", 4, 5]], ["N", 5, 4], 0),
        ("bii->bi", [["N", 4, 4]], ["N", 4], 0),
        ("ij,ij->", [[4, 5], [4, 5]], [], 20),
    ],
)
def test_an_einsum_that_sums_nothing_is_no_work_and_a_full_contraction_is(
    tmp_path, equation, shapes, out, macs
):
    """A transpose or a diagonal written as Einsum moves data, as a Transpose does (0); a contraction to
    a scalar sums every element (it read as none: a scalar has no elements per sample)."""
    names = ["a", "b"][: len(shapes)]
    g = helper.make_graph(
        [helper.make_node("Einsum", names, ["s"], equation=equation), helper.make_node("Relu", ["s"], ["y"])],
        "ein",
        [_vi(n, d) for n, d in zip(names, shapes, strict=True)],
        [_vi("y", out)],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    from splitpoint.core.graph.flops import count_macs

    assert count_macs(open_model(_save(m, tmp_path / "ein.onnx")).index) == macs


@pytest.mark.parametrize("mode, taps", [(None, 4), ("bicubic", 16), ("nearest", 0)])
def test_grid_sample_counts_its_interpolation_as_work(tmp_path, mode, taps):
    """A spatial transformer's GridSample read as no work: each output element weighs 2 (bilinear, the
    default) or 4 (bicubic) taps along each of its two axes; nearest picks one."""
    attrs = {} if mode is None else {"mode": mode}
    g = helper.make_graph(
        [
            helper.make_node("GridSample", ["x", "grid"], ["s"], **attrs),
            helper.make_node("Relu", ["s"], ["y"]),
        ],
        "stn",
        [_vi("x", ["N", 3, 8, 8]), _vi("grid", ["N", 6, 5, 2])],
        [_vi("y", ["N", 3, 6, 5])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 16)])
    from splitpoint.core.graph.flops import count_macs

    assert count_macs(open_model(_save(m, tmp_path / "stn.onnx")).index) == 3 * 6 * 5 * taps
