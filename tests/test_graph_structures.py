"""Cutting the structures that break naive extraction."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from splitpoint.core.errors import CutError
from splitpoint.core.graph.cuts import cut_by_tensors, enumerate_cuts
from splitpoint.core.graph.extract import extract
from splitpoint.core.graph.index import GraphIndex
from splitpoint.core.onnxio import load_model
from splitpoint.core.runner import make_session

from . import graphs
from .conftest import random_feeds
from .test_split_equivalence import run_split


def assert_all_cuts_exact(model):
    idx = GraphIndex.build(model)
    feeds = random_feeds(model, batch=3, seed=1)
    full = make_session(model.SerializeToString()).run(None, feeds)
    cuts = enumerate_cuts(idx)
    assert cuts
    for cut in cuts:
        got = run_split(*extract(idx, cut), cut, feeds)
        for name, ref in zip(idx.outputs, full, strict=True):
            np.testing.assert_allclose(got[name], ref, rtol=1e-6, atol=1e-6)
    return idx, cuts


def test_if_and_loop_are_atomic_and_their_outer_scope_reads_cross():
    idx, cuts = assert_all_cuts_exact(graphs.control_flow_model())
    # cutting just before the If: the branches read r, s and w from the outer scope
    before_if = next(c for c in cuts if c.last_node == "gt")
    crossing = {c.name for c in before_if.crossing}
    assert {"r", "s", "cond"} <= crossing
    assert "w" not in crossing  # initializers travel with the model, never on the wire
    # the Loop body reads r too: it must cross until the Loop is in the head
    after_if = next(c for c in cuts if c.last_node == "if")
    assert {c.name for c in after_if.crossing} == {"cond", "iff", "r"}
    # a tensor of a body is named as such, not as absent from the graph
    for inner, holder in (("t_out", "If node 'if'"), ("acc_out", "Loop node 'loop'")):
        with pytest.raises(CutError, match=f"{inner}' is inside the body of {holder}: a cut runs between"):
            cut_by_tensors(idx, [inner])


def test_model_local_functions_are_carried_to_both_sides():
    model = graphs.local_function_model()
    idx, cuts = assert_all_cuts_exact(model)
    head, tail = extract(idx, cuts[0])
    assert [f.name for f in head.functions] == ["ScaledRelu"] and [f.name for f in tail.functions] == [
        "ScaledRelu"
    ]


def test_a_models_local_functions_are_inlined_when_it_is_opened(tmp_path):
    """torch's export_modules_as_functions writes each block as a local function: kept whole, its work
    counted as none (ResNet-18 as 9.7M of 148M MACs), the profile attributed 2 % of the kernel time
    and derived every cut from that, and no cut fell inside a block. Opened, the model is inlined as
    onnxruntime runs it: the work counts, cuts fall inside the blocks, and every split is exact."""
    import onnxruntime as ort

    from splitpoint.core.graph.flops import count_macs
    from splitpoint.core.graph.model import open_model

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32), "w")
    fn = helper.make_function(
        "local",
        "Block",
        ["X", "W"],
        ["Y"],
        [helper.make_node("MatMul", ["X", "W"], ["m"]), helper.make_node("Relu", ["m"], ["Y"])],
        opset_imports=[helper.make_opsetid("", 17)],
    )
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])
    nodes = [
        helper.make_node("Block", ["x", "w"], ["a"], name="b1", domain="local"),
        helper.make_node("Block", ["a", "w"], ["y"], name="b2", domain="local"),
    ]
    g = helper.make_graph(nodes, "fn", [x], [y], [w])
    m = helper.make_model(
        g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)], functions=[fn]
    )
    path = tmp_path / "fn.onnx"
    onnx.save(m, path)
    h = open_model(str(path))
    assert not h.model.functions and not h.file_runs_as_planned
    assert count_macs(h.index) == 2 * 8 * 8
    assert len(h.cuts()) == 3  # inside the first block, between them, inside the second
    feeds = {"x": np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)}
    full = ort.InferenceSession(str(path)).run(None, feeds)[0]
    for cut in h.cuts():
        head, tail = extract(h.index, cut)
        hs = make_session(head)
        mid = dict(zip([o.name for o in hs.get_outputs()], hs.run(None, feeds), strict=True))
        ts = make_session(tail)
        got = ts.run(None, {i.name: mid[i.name] for i in ts.get_inputs()})[0]
        np.testing.assert_allclose(got, full, rtol=1e-6)


def test_an_ir3_model_whose_weights_are_inputs_splits_at_every_cut(tmp_path):
    """Old model-zoo files (IR 3) list every weight as a graph input too: the parts carry the weights,
    receive only what crosses, and pass the checker."""
    from splitpoint.core.graph.model import open_model
    from splitpoint.core.plandir import write_plan

    model = graphs.ir3_weights_as_inputs_model()
    idx, cuts = assert_all_cuts_exact(model)
    assert idx.inputs == ["data"] and len(cuts) >= 5
    for cut in cuts:
        head, tail = extract(idx, cut)
        assert [i.name for i in head.graph.input] == ["data"]
        assert {i.name for i in tail.graph.input} == {c.name for c in cut.crossing}
    path = tmp_path / "old.onnx"
    onnx.save(model, path)
    h = open_model(str(path))
    write_plan(h, tmp_path / "plan", cut=h.cuts()[2], codec="int8")
    assert (tmp_path / "plan" / "head.onnx").is_file() and (tmp_path / "plan" / "tail.onnx").is_file()


def test_initializer_shared_across_the_cut_goes_to_both_sides(small_models):
    idx = GraphIndex.build(small_models["multitask"])
    tied = [n for n in idx.nodes if n.op_type == "Conv"]
    shared = {n.input[1] for n in tied if sum(m.input[1] == n.input[1] for m in tied) == 2}.pop()
    users = [p for p, n in enumerate(idx.nodes) if shared in n.input]
    cut = next(
        c
        for c in enumerate_cuts(idx)
        if idx.compute[c.index - 1] >= users[0] and idx.compute[c.index] <= users[1]
    )
    head, tail = extract(idx, cut)
    assert shared in {t.name for t in head.graph.initializer}
    assert shared in {t.name for t in tail.graph.initializer}
    assert shared not in {c.name for c in cut.crossing}


def test_external_data_model_round_trips(tmp_path, small_models):
    path = tmp_path / "ext" / "model.onnx"
    path.parent.mkdir()
    original = onnx.ModelProto()
    original.CopyFrom(small_models["resnet18"])  # saving as external data rewrites the proto in place
    onnx.save_model(
        original,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    assert (path.parent / "weights.bin").stat().st_size > path.stat().st_size
    model = load_model(path)
    idx = GraphIndex.build(model)
    cut = enumerate_cuts(idx)[10]
    feeds = random_feeds(model, seed=5)
    got = run_split(*extract(idx, cut), cut, feeds)
    ref = make_session(small_models["resnet18"].SerializeToString()).run(None, feeds)[0]
    np.testing.assert_allclose(got[idx.outputs[0]], ref, atol=1e-5)


def test_tensor_named_cuts_are_validated(small_models):
    idx = GraphIndex.build(small_models["resnet18"])
    # inside a residual block: the skip connection also crosses, so the boundary is incomplete
    inner = next(
        n.output[0] for n in idx.nodes if n.op_type == "BatchNormalization" and n.output[0] == "bn_3"
    )
    with pytest.raises(CutError, match="tail also needs maxpool_0"):
        cut_by_tensors(idx, [inner])
    # naming both tensors is a valid cut crossing exactly those two
    cut = cut_by_tensors(idx, ["bn_3", "maxpool_0"])
    assert {c.name for c in cut.crossing} == {"bn_3", "maxpool_0"}
    # a block output is a one-tensor cut equal to the prefix cut with the same head
    add = next(
        n.output[0]
        for n in idx.nodes
        if n.op_type == "Relu" and idx.nodes[idx.producer[n.input[0]]].op_type == "Add"
    )
    c1 = cut_by_tensors(idx, [add])
    assert [c.name for c in c1.crossing] == [add] and c1.index is not None
    with pytest.raises(CutError, match="no tensor named 'bn_99'.*did you mean"):
        cut_by_tensors(idx, ["bn_99"])
    with pytest.raises(CutError, match="'input' is a graph input: name tensors the head computes"):
        cut_by_tensors(idx, ["input"])
    with pytest.raises(CutError, match="leaves nothing for the tail"):
        cut_by_tensors(idx, [idx.outputs[0]])


def sequence_values_model() -> onnx.ModelProto:
    """A Relu, its columns as a sequence (SplitToSequence), joined again, a Sigmoid."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("SplitToSequence", ["r"], ["seq"], axis=1),
        helper.make_node("ConcatFromSequence", ["seq"], ["c"], axis=1),
        helper.make_node("Sigmoid", ["c"], ["y"]),
    ]
    g = helper.make_graph(
        nodes,
        "seq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_a_sequence_never_crosses_a_cut():
    """No codec carries a sequence: the cut it would cross is not offered (its index skipped, the others
    keep theirs), and naming it says why."""
    from splitpoint.core.graph.cuts import cut_by_index

    idx, cuts = assert_all_cuts_exact(sequence_values_model())
    assert [c.index for c in cuts] == [1, 3]
    assert cut_by_index(idx, 3, cuts).crossing[0].name == "c"
    with pytest.raises(CutError, match="cut 2: invalid cut: .* would cross as a sequence, a map"):
        cut_by_index(idx, 2, cuts)
    with pytest.raises(CutError, match="seq would cross as a sequence, a map or an optional value"):
        cut_by_tensors(idx, ["seq"])


def test_a_cut_by_name_suggests_only_a_cut_that_could_be_one():
    """Cutting at ``b`` leaves the tail reading the sequence ``b`` was made from: adding it to the cut
    is no way out (no codec carries a sequence), so it is not suggested as one."""
    from onnx import TensorProto, helper

    from splitpoint.core.graph import GraphIndex

    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("SequenceConstruct", ["x"], ["sq"]),
        helper.make_node("ConcatFromSequence", ["sq"], ["b"], axis=0),
        helper.make_node("Relu", ["b"], ["r"]),
        helper.make_node("SequenceAt", ["sq", "zero"], ["e"]),
        helper.make_node("Add", ["r", "e"], ["y"]),
    ]
    zero = helper.make_tensor("zero", TensorProto.INT64, [], [0])
    g = helper.make_graph(
        nodes,
        "seq",
        [helper.make_tensor_value_info("x", f, [2, 3])],
        [helper.make_tensor_value_info("y", f, [2, 3])],
        [zero],
    )
    idx = GraphIndex.build(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    with pytest.raises(CutError) as caught:
        cut_by_tensors(idx, ["b"])
    msg = str(caught.value)
    assert "the tail also needs sq from the head" in msg and "instead" not in msg, msg
    assert "no codec carries sq (a sequence, a map or an optional value): cut elsewhere" in msg, msg


def test_sizes_that_follow_the_data_stay_free():
    """NonZero's count differs from input to input: two trial runs that happen to agree must not fix it,
    or the tail refuses the next input. Its cut tensors have no size per sample until they are measured."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("NonZero", ["r"], ["nz"]),
        helper.make_node("Transpose", ["nz"], ["idx"], perm=[1, 0]),
        helper.make_node("GatherND", ["r", "idx"], ["vals"]),
        helper.make_node("Mul", ["vals", "two"], ["v2"]),
        helper.make_node("ReduceSum", ["v2"], ["s"], keepdims=1),
        helper.make_node("Add", ["s", "r"], ["y"]),
    ]
    g = helper.make_graph(
        nodes,
        "nz",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [numpy_helper.from_array(np.array(2, np.float32), "two")],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    idx = GraphIndex.build(model)
    cuts = enumerate_cuts(idx)
    by_last = {c.last_node: c for c in cuts}
    vals = next(t for t in by_last["GatherND#3"].crossing if t.name == "vals")
    assert vals.bytes_per_sample is None and not vals.shape[0].isdigit()
    full = make_session(model.SerializeToString())
    counts = set()
    for seed in range(6):  # inputs with different numbers of positive values, through every cut
        x = {"x": np.random.default_rng(seed).standard_normal((1, 64)).astype(np.float32)}
        counts.add(int((x["x"] > 0).sum()))
        for cut in cuts:
            got = run_split(*extract(idx, cut), cut, x)
            np.testing.assert_allclose(got["y"], full.run(None, x)[0], rtol=1e-6)
    assert len(counts) > 1


def test_outputs_no_computing_node_makes_come_from_a_stage(tmp_path):
    """A Constant node's output, a weight and a model input handed back are model outputs too: every
    two-stage cut, a cut named by tensors, a three-stage chain and a served plan give all of them."""
    from splitpoint.core.graph.extract import extract_segments
    from splitpoint.core.graph.model import open_model
    from splitpoint.core.plandir import write_plan
    from splitpoint.edge.client import EdgeClient
    from splitpoint.edge.config import EdgeConfig
    from splitpoint.server.config import ServerConfig
    from splitpoint.server.tail_server import TailServer

    model = graphs.outputs_without_compute_model()
    idx, cuts = assert_all_cuts_exact(model)
    assert all("x" in c.head_outputs for c in cuts)  # the edge holds the input it hands back
    feeds = random_feeds(model, batch=2, seed=4)
    full = dict(zip(idx.outputs, make_session(model.SerializeToString()).run(None, feeds), strict=True))
    named = cut_by_tensors(idx, ["r1"])
    assert "x" in named.head_outputs
    got = run_split(*extract(idx, named), named, feeds)
    assert set(got) == set(idx.outputs)
    # three stages: each output from exactly one of them
    segs = extract_segments(idx, [cuts[0], cuts[2]])
    assert sorted(o for s in segs for o in s.produces) == sorted(idx.outputs)
    pool = dict(feeds)
    for s in segs:
        if s.model is not None:
            sess = make_session(s.model.SerializeToString())
            outs = sess.run(None, {i.name: pool[i.name] for i in sess.get_inputs()})
            pool.update(zip([o.name for o in sess.get_outputs()], outs, strict=True))
    for name, ref in full.items():
        np.testing.assert_allclose(pool[name], ref, rtol=1e-6, atol=1e-6)
    # and served: the edge's answer carries all four
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    h = open_model(str(path))
    write_plan(h, tmp_path / "plans" / "p", cut=h.cuts()[1], codec="int8")
    srv = TailServer(ServerConfig(bind="tcp://127.0.0.1:0", plans_dir=tmp_path / "plans")).start()
    try:
        with EdgeClient(
            EdgeConfig(plan_dir=tmp_path / "plans" / "p", server=srv.endpoint, fallback=False)
        ) as c:
            one = {"x": feeds["x"][:1]}
            r = c.infer(one, timeout=30)
    finally:
        srv.stop()
    ref1 = make_session(model.SerializeToString()).run(None, one)
    for name, got1, want in zip(idx.outputs, r.outputs, ref1, strict=True):
        assert got1.dtype == want.dtype and got1.shape == want.shape, name
        np.testing.assert_allclose(got1, want, rtol=0.05, atol=0.05)
