"""Models as exporters write them, not as the zoo builds them: a static batch of 1 (torch.onnx.export's
default), symbolic height and width, a batch written as -1, stale value_info (shapes traced for one input
and declared static), onnxruntime's own domains (com.microsoft.nchwc, from its layout optimiser), several
inputs and outputs, external data, and an attention block's -inf mask and computed Reshape. Cut, split,
profile, fidelity, plan, serve and bench all work on each."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper, shape_inference

from splitpoint.core import zoo
from splitpoint.core.errors import ModelError, ProfileError
from splitpoint.core.graph import open_model
from splitpoint.core.graph.extract import extract
from splitpoint.core.plandir import write_plan
from splitpoint.core.runner import assemble, load_split, make_session, run_batched
from splitpoint.core.samples import sample_feeds
from splitpoint.partitioner.pareto import Constraints
from splitpoint.partitioner.planner import decide, gather
from splitpoint.profiles.profiler import ProfileSettings, profile_model
from splitpoint.profiles.schema import load_network

from .conftest import run_cli
from .test_graph_structures import sequence_values_model


def _set_dims(vi: onnx.ValueInfoProto, dims) -> None:
    shape = vi.type.tensor_type.shape
    shape.ClearField("dim")
    for v in dims:
        d = shape.dim.add()
        if isinstance(v, int):
            d.dim_value = v
        else:
            d.dim_param = v


def _copy(m: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(m)
    return out


def static_batch_1(base):
    m = _copy(base)
    _set_dims(m.graph.input[0], [1, 3, 48, 48])
    for o in m.graph.output:
        o.type.tensor_type.shape.dim[0].Clear()
        o.type.tensor_type.shape.dim[0].dim_value = 1
    return shape_inference.infer_shapes(m)  # value_info everywhere, batch 1 baked in


def symbolic_hw(base):
    m = _copy(base)
    _set_dims(m.graph.input[0], ["batch", 3, "height", "width"])
    return m


def minus_one_batch(base):
    """A batch written as dim_value -1 (some converters' "any size"), shape inference carrying it on."""
    m = _copy(base)
    m.graph.input[0].type.tensor_type.shape.dim[0].Clear()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1
    return m


def stale_value_info(base):
    """Shapes traced at batch 1 for half the spatial size, declared static: wrong at run time."""
    m = shape_inference.infer_shapes(base)
    for vi in m.graph.value_info:
        dims = vi.type.tensor_type.shape.dim
        if len(dims) == 4:
            _set_dims(vi, [1, dims[1].dim_value or 1, 1, 1])
    return m


def nchwc(base, path):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(path)
    ort.InferenceSession(base.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return onnx.load(str(path))


def sequence_model():
    """The exporter's classic: x [1, 40, 120] through a transpose pair, value_info declaring the middle
    tensors {-1, 1, 120} (traced wrongly) while they are {1, 40, 120} at run time."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((120, 16)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Transpose", ["x"], ["t1"], perm=[0, 2, 1]),
        helper.make_node("Relu", ["t1"], ["r"]),
        helper.make_node("Transpose", ["r"], ["t2"], perm=[0, 2, 1]),
        helper.make_node("Sigmoid", ["t2"], ["s"]),
        helper.make_node("MatMul", ["s", "w"], ["y"]),
    ]
    g = helper.make_graph(
        nodes,
        "seq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 40, 120])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 40, 16])],
        [w],
        value_info=[helper.make_tensor_value_info(n, TensorProto.FLOAT, [-1, 1, 120]) for n in ("t2", "s")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def text_encoder():
    """A BERT-style input set: token ids (a 50-row table), token types (a 2-row table, read through a Cast)
    and an integer attention mask. A sample past a table's rows makes onnxruntime's Gather fail."""
    rng = np.random.default_rng(1)
    w = {
        "wte": rng.standard_normal((50, 16)),
        "tte": rng.standard_normal((2, 16)),
        "w1": rng.standard_normal((16, 16)) / 4,
        "w2": rng.standard_normal((16, 3)) / 4,
    }
    nodes = [
        helper.make_node("Gather", ["wte", "input_ids"], ["tok"]),
        helper.make_node("Cast", ["token_type_ids"], ["tt32"], to=TensorProto.INT32),
        helper.make_node("Gather", ["tte", "tt32"], ["typ"]),
        helper.make_node("Add", ["tok", "typ"], ["x"]),
        helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mf", "axis2"], ["m3"]),
        helper.make_node("Mul", ["x", "m3"], ["xm"]),
        helper.make_node("MatMul", ["xm", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("ReduceMean", ["r"], ["pooled"], axes=[1], keepdims=0),
        helper.make_node("MatMul", ["pooled", "w2"], ["logits"]),
    ]
    ints = [
        helper.make_tensor_value_info(n, TensorProto.INT64, [1, 8]) for n in ("input_ids", "token_type_ids")
    ]
    g = helper.make_graph(
        nodes,
        "text",
        [*ints, helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in w.items()]
        + [numpy_helper.from_array(np.array([2], np.int64), "axis2")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def masked_encoder(batch="batch", seq=8):
    """A one-head attention block as exporters write it: the additive mask made with Where (-inf at padded
    tokens, crossing a cut as a float tensor), and a [batch·seq, hidden] Reshape whose target is computed
    (ReduceProd of a Shape slice), which shape inference cannot follow even at fixed input shapes."""
    rng = np.random.default_rng(2)
    w = {"wte": rng.standard_normal((50, 16)), "w1": rng.standard_normal((16, 16)) / 4}
    w["w2"] = rng.standard_normal((16, 3))
    consts = {"z": [0], "two": [2], "hid": [16], "ax1": [1], "zero": 0}
    nodes = [
        helper.make_node("Gather", ["wte", "input_ids"], ["emb"]),
        helper.make_node("Shape", ["emb"], ["s"]),
        helper.make_node("Slice", ["s", "z", "two"], ["s01"]),
        helper.make_node("ReduceProd", ["s01"], ["rows"], keepdims=1),
        helper.make_node("Concat", ["rows", "hid"], ["target"], axis=0),
        helper.make_node("Reshape", ["emb", "target"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w1"], ["h"]),
        helper.make_node("Reshape", ["h", "s"], ["hs"]),
        helper.make_node("Equal", ["attention_mask", "zero"], ["padded"]),
        helper.make_node("Where", ["padded", "ninf", "fzero"], ["neg"]),
        helper.make_node("Unsqueeze", ["neg", "ax1"], ["neg3"]),
        helper.make_node("Transpose", ["hs"], ["hsT"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["hs", "hsT"], ["scores"]),
        helper.make_node("Add", ["scores", "neg3"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["att"], axis=-1),
        helper.make_node("MatMul", ["att", "hs"], ["ctx"]),
        helper.make_node("ReduceMean", ["ctx"], ["pooled"], axes=[1], keepdims=0),
        helper.make_node("MatMul", ["pooled", "w2"], ["logits"]),
    ]
    g = helper.make_graph(
        nodes,
        "masked",
        [
            helper.make_tensor_value_info(n, TensorProto.INT64, [batch, seq])
            for n in ("input_ids", "attention_mask")
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 3])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in w.items()]
        + [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in consts.items()]
        + [
            numpy_helper.from_array(np.array(v, np.float32), k)
            for k, v in (("ninf", -np.inf), ("fzero", 0.0))
        ],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _cut_crossing(h, name):
    return next(c for c in h.cuts() if name in {t.name for t in c.crossing})


@pytest.mark.parametrize(
    ("batch", "seq", "shapes"),
    [(1, "seq", {"input_ids": [1, 8], "attention_mask": [1, 8]}), ("batch", 8, None)],
)
def test_sizes_inference_cannot_follow_are_measured(tmp_path, batch, seq, shapes):
    path = tmp_path / "m.onnx"
    onnx.save(masked_encoder(batch, seq), str(path))
    h = open_model(path, shapes)
    (flat,) = [t for t in _cut_crossing(h, "flat").crossing if t.name == "flat"]
    assert flat.bytes_per_sample == 8 * 16 * 4, flat  # [batch·seq, 16] float32, per sample
    assert flat.shape == ("8x16" if batch == 1 else "batch*8x16")
    # the tail declares it so that it takes any batch
    cut = _cut_crossing(h, "flat")
    head, tail = extract(h.index, cut)
    hs, ts = make_session(head.SerializeToString()), make_session(tail.SerializeToString())
    n = 1 if batch == 1 else 3
    feeds = {
        k: np.concatenate([sample_feeds(h.model, 1, s)[k] for s in range(n)])
        for k in ("input_ids", "attention_mask")
    }
    mid = dict(
        zip(
            [o.name for o in hs.get_outputs()],
            hs.run(None, {i.name: feeds[i.name] for i in hs.get_inputs()}),
            strict=True,
        )
    )
    got = ts.run(None, {i.name: mid.get(i.name, feeds.get(i.name)) for i in ts.get_inputs()})[0]
    np.testing.assert_allclose(got, make_session(h.model.SerializeToString()).run(None, feeds)[0], rtol=1e-5)


def test_a_padding_mask_crosses_a_quantised_cut_exactly(tmp_path):
    """The -inf of a padded token's mask rides an int8 cut (sent exactly), through a real server."""
    from splitpoint.edge.client import EdgeClient
    from splitpoint.edge.config import EdgeConfig
    from splitpoint.server.config import ServerConfig
    from splitpoint.server.tail_server import TailServer

    path = tmp_path / "m.onnx"
    onnx.save(masked_encoder(1, "seq"), str(path))
    h = open_model(path, {"input_ids": [1, 8], "attention_mask": [1, 8]})
    cut = _cut_crossing(h, "neg3")
    assert {"hs", "neg3"} <= {t.name for t in cut.crossing}
    write_plan(h, tmp_path / "plans" / "p", cut=cut, codec="int8+zstd")
    ref = make_session(h.model.SerializeToString())
    srv = TailServer(ServerConfig(bind="tcp://127.0.0.1:0", plans_dir=tmp_path / "plans")).start()
    try:
        with EdgeClient(
            EdgeConfig(plan_dir=tmp_path / "plans" / "p", server=srv.endpoint, fallback=False)
        ) as c:
            feeds = [sample_feeds(h.model, 1, k) for k in range(6)]
            assert any((f["attention_mask"] == 0).any() for f in feeds)  # padded rows among them
            for f in feeds:
                r = c.infer(f, timeout=30)
                assert not r.fallback
                np.testing.assert_allclose(r.outputs[0], ref.run(None, f)[0], rtol=0.05, atol=0.05)
    finally:
        srv.stop()


def test_integer_inputs_are_sampled_within_the_tables_they_index():
    m = text_encoder()
    for seed in range(20):
        f = sample_feeds(m, 1, seed)
        assert f["input_ids"].max() < 50 and f["token_type_ids"].max() < 2
        mask = f["attention_mask"][0]
        assert mask[0] == 1 and mask.sum() >= 4 and (np.diff(mask) <= 0).all()  # tokens, then padding
    assert len({int(v) for seed in range(20) for v in sample_feeds(m, 1, seed)["input_ids"].ravel()}) > 30
    assert len({int(sample_feeds(m, 1, seed)["attention_mask"].sum()) for seed in range(20)}) >= 3


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    d = tmp_path_factory.mktemp("exported")
    base = zoo.build("resnet18", width=0.25, resolution=48)
    paths = {}
    for name, model in [
        ("static1", static_batch_1(base)),
        ("symhw", symbolic_hw(base)),
        ("stale", stale_value_info(base)),
        ("minus1", minus_one_batch(base)),
        ("sequence", sequence_model()),
        ("multitask", zoo.build("multitask", width=0.25, resolution=64)),
        ("text", text_encoder()),
        ("sequences", sequence_values_model()),
    ]:
        paths[name] = d / f"{name}.onnx"
        onnx.save(model, str(paths[name]))
    paths["nchwc"] = d / "nchwc.onnx"
    nchwc(base, paths["nchwc"])
    paths["external"] = d / "external.onnx"
    onnx.save(
        base, str(paths["external"]), save_as_external_data=True, location="external.bin", size_threshold=0
    )
    return paths


SHAPES = {"symhw": {"input": [1, 3, 48, 48]}}


def _handle(variants, name):
    return open_model(variants[name], SHAPES.get(name))


@pytest.mark.parametrize(
    "name",
    [
        "static1",
        "symhw",
        "stale",
        "minus1",
        "sequence",
        "multitask",
        "nchwc",
        "external",
        "text",
        "sequences",
    ],
)
def test_every_cut_rejoins_to_the_unsplit_model(variants, name, tmp_path):
    h = _handle(variants, name)
    feeds = sample_feeds(h.model, 1, 5)
    ref = make_session(h.path).run(None, feeds)
    cuts = h.cuts()
    for cut in cuts[:: max(1, len(cuts) // 6)]:  # a spread of cuts, first to last
        head, tail = extract(h.index, cut)  # the checker runs on both: declared shapes must hold
        hs, ts = make_session(head.SerializeToString()), make_session(tail.SerializeToString())
        produced = dict(
            zip(
                [o.name for o in hs.get_outputs()],
                hs.run(None, {i.name: feeds[i.name] for i in hs.get_inputs()}),
                strict=True,
            )
        )
        late = dict(
            zip(
                [o.name for o in ts.get_outputs()],
                ts.run(None, {i.name: produced.get(i.name, feeds.get(i.name)) for i in ts.get_inputs()}),
                strict=True,
            )
        )
        got = [produced[o] if o in cut.head_outputs else late[o] for o in h.index.outputs]
        for g, r in zip(got, ref, strict=True):
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)
    # a written plan, loaded as the edge and server load it, gives the same answer
    plan = write_plan(h, tmp_path / "p", cut=cuts[len(cuts) // 2])
    _, head_r, tail_r = load_split(tmp_path / "p")
    sent, early = head_r.run(feeds)
    for g, r in zip(assemble(plan, early, tail_r.run(sent) if tail_r else {}), ref, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_symbolic_height_and_width_need_a_shape_and_say_so(variants):
    with pytest.raises(
        ModelError,
        match=r"input 'input' has unknown dimensions height, width: give --input-shape input:Nx3x\?x\?",
    ):
        open_model(variants["symhw"])
    proc = run_cli("cuts", str(variants["symhw"]), timeout=60)
    assert (
        proc.returncode == 2
        and "--input-shape input:Nx3x?x?" in proc.stderr
        and "Traceback" not in proc.stderr
    )
    proc = run_cli("cuts", str(variants["symhw"]), "--input-shape", "input:1x3x96x96", "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr
    with pytest.raises(ModelError, match="dimension 1 fixed at 3"):
        open_model(variants["symhw"], {"input": [1, 4, 48, 48]})
    with pytest.raises(ModelError, match="no input named 'images'"):
        open_model(variants["symhw"], {"images": [1, 3, 48, 48]})


def test_fidelity_takes_a_symbolic_models_sizes_from_the_samples_given(variants, tmp_path):
    """Samples of 1x3x64x64 say the height and width: asking for --input-shape as well would make the
    user write down what the files hold. One given on the command line still wins, and must fit them."""
    folder = tmp_path / "samples"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for k in range(3):  # .npy without the batch dimension, as one sample is usually saved
        np.save(folder / f"s{k}.npy", rng.standard_normal((3, 64, 64)).astype(np.float32))
    path = str(variants["symhw"])
    proc = run_cli("fidelity", path, "--cut", "2", "--codec", "float32", "--inputs", str(folder), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["inputs"].startswith("3 inputs from") and report["outputs"], report
    assert all(o["max_abs_error"] == 0.0 for o in report["outputs"]), report
    proc = run_cli(
        "fidelity", path, "--cut", "2", "--inputs", str(folder), "--input-shape", "input:1x3x32x32"
    )
    assert proc.returncode != 0 and "does not fit input input [1, 3, 32, 32]" in proc.stderr, proc.stderr


def test_n_keeps_a_symbolic_batch_free_while_height_and_width_are_fixed(tmp_path):
    """An export with a dynamic batch, height and width: fixing the spatial size must not fix the batch
    too (there was no way to say so: every dimension had to be a number, and the plan refused batch 2)."""
    from splitpoint.core.graph.shapes import parse_input_shapes

    w = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w"
    )
    g = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("GlobalAveragePool", ["r"], ["y"]),
        ],
        "dyn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 1, 1])],
        [w],
    )
    path = tmp_path / "dyn.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(ModelError, match=r"give --input-shape x:Nx3x\?x\?"):
        open_model(path)
    for spelled in ("x:Nx3x32x32", "x:?x3x32x32", "x:-1x3x32x32"):
        assert parse_input_shapes([spelled]) == {"x": [-1, 3, 32, 32]}
    h = open_model(path, parse_input_shapes(["x:Nx3x32x32"]))
    dims = h.model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    plan = write_plan(h, tmp_path / "p", cut=h.cuts()[1])
    _, head_r, tail_r = load_split(tmp_path / "p")
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)}
    sent, early = head_r.run(feeds)
    got = assemble(plan, early, tail_r.run(sent) if tail_r else {})[0]
    np.testing.assert_allclose(got, ort.InferenceSession(str(path)).run(None, feeds)[0], rtol=1e-5, atol=1e-5)
    assert got.shape == (2, 4, 1, 1)
    proc = run_cli("cuts", str(path), "--input-shape", "x:Nx3x32x32", "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_profile_fidelity_and_plan_on_exported_models(variants):
    for name in ("static1", "symhw", "minus1", "nchwc", "multitask", "text", "sequences"):
        h = _handle(variants, name)
        edge = profile_model(h, ProfileSettings(role="edge", budget=4, anchors=2))
        server = profile_model(h, ProfileSettings(role="server", budget=4, anchors=2))
        assert edge.input_shapes == h.input_shapes and len(edge.cuts) == len(h.cuts())
        samples = [sample_feeds(h.model, 1, k) for k in range(3)]  # several samples: batched where it can be
        m = gather(h, edge, server, samples, codecs=["float32", "int8"])
        d = decide(m, [load_network("lte")], Constraints(min_fidelity=0.9))[0]
        assert d.pick.inp.fidelity is not None and d.pick.inp.fidelity >= 0.9, name
        assert any(f == 1.0 for (_, codec, _), f in m.fidelity.items() if codec == "float32"), name


def test_a_profile_at_other_input_shapes_is_refused(variants):
    h48 = open_model(variants["symhw"], {"input": [1, 3, 48, 48]})
    h64 = open_model(variants["symhw"], {"input": [1, 3, 64, 64]})
    prof = profile_model(h48, ProfileSettings(role="edge", budget=2, anchors=1))
    with pytest.raises(ProfileError, match="measured with input shapes"):
        gather(h64, prof, prof, [sample_feeds(h64.model, 1, 0)])
    # the shape a file already fixes, given again, is the same model: its profile stands
    plain = open_model(variants["static1"])
    same = open_model(variants["static1"], {"input": [1, 3, 48, 48]})
    assert same.input_shapes == plain.input_shapes == {}
    prof = profile_model(plain, ProfileSettings(role="edge", budget=2, anchors=1))
    prof.check_model(same.sha256, "edge profile", same.input_shapes)


def test_static_batch_runs_one_sample_at_a_time(variants):
    h = _handle(variants, "static1")
    sess = make_session(h.path)
    samples = [sample_feeds(h.model, 1, k) for k in range(4)]
    out = run_batched(sess, samples)[0]
    assert out.shape[0] == 4
    np.testing.assert_allclose(out[2:3], sess.run(None, samples[2])[0], rtol=1e-5)


def test_serve_an_exported_model(variants, tmp_path):
    from splitpoint.edge.client import EdgeClient
    from splitpoint.edge.config import EdgeConfig
    from splitpoint.server.config import ServerConfig
    from splitpoint.server.tail_server import TailServer

    for name in ("static1", "nchwc", "multitask", "text"):
        h = _handle(variants, name)
        write_plan(h, tmp_path / name / "p", cut=h.cuts()[len(h.cuts()) // 2], codec="float16")
        srv = TailServer(ServerConfig(bind="tcp://127.0.0.1:0", plans_dir=tmp_path / name)).start()
        try:
            with EdgeClient(
                EdgeConfig(plan_dir=tmp_path / name / "p", server=srv.endpoint, fallback=False)
            ) as c:
                feeds = sample_feeds(h.model, 1, 9)
                r = c.infer(feeds, timeout=30)
            for g, ref in zip(r.outputs, make_session(h.path).run(None, feeds), strict=True):
                np.testing.assert_allclose(g, ref, rtol=1e-2, atol=1e-2)
        finally:
            srv.stop()


def test_bench_on_an_exported_model(variants, tmp_path):
    from splitpoint.app.bench.report import write_report
    from splitpoint.app.bench.run import BenchConfig, run_bench

    device = tmp_path / "board.yaml"
    device.write_text(
        "name: board\nrole: edge\ncpu: test\ncores: 1\nclock_ghz: 1.0\nmemory_gb: 1\n"
        "thermal_limit_c: 80\nreference_latency_ms:\n  mobilenetv2: 40\n"
    )
    cfg = BenchConfig(
        models=(str(variants["symhw"]),),
        networks=("wifi-n",),
        device=str(device),
        link="loopback",
        seconds=0.2,
        min_requests=2,
        max_requests=3,
        max_front=1,
        fidelity_samples=2,
        inputs=2,
        profile_budget=4,
        input_shapes=("input:1x3x48x48",),
    )
    results = write_report(run_bench(cfg), tmp_path / "out")
    rows = results["runs"][0]["rows"]
    assert rows and all("error" not in r["measured"] for r in rows), [r["measured"] for r in rows]


def test_several_inputs_come_from_npz_files(variants, tmp_path):
    """A sample of a several-input model is one .npz with an array per input: `edge run --inputs` and
    `fidelity --inputs` read them; a file lacking an input is that sample's error, a bare .npy the
    folder's."""
    from splitpoint.core.samples import load_inputs
    from splitpoint.server.config import ServerConfig
    from splitpoint.server.tail_server import TailServer

    h = _handle(variants, "text")
    write_plan(h, tmp_path / "plans" / "p", cut=h.cuts()[len(h.cuts()) // 2])
    good = tmp_path / "in"
    good.mkdir()
    feeds = [sample_feeds(h.model, 1, k) for k in range(3)]
    for k, f in enumerate(feeds):  # one sample each, batch dimension left out
        np.savez(good / f"s{k}.npz", **{n: a[0] for n, a in f.items()})
    loaded = load_inputs(h.model, good)
    assert len(loaded) == 3 and all(np.array_equal(loaded[1][n], feeds[1][n]) for n in feeds[1])
    np.savez(good / "s9.npz", input_ids=feeds[0]["input_ids"])  # lacks two of the three inputs
    srv = TailServer(ServerConfig(bind="tcp://127.0.0.1:0", plans_dir=tmp_path / "plans")).start()
    try:
        out = tmp_path / "out"
        args = ("edge", "run", str(tmp_path / "plans" / "p"), "--server", srv.endpoint, "--inputs", str(good))
        proc = run_cli(*args, "--outputs", str(out), timeout=120)
        assert proc.returncode == 1 and "3 split, 0 local fallback, 1 errors" in proc.stdout, proc.stderr
        # the answers' measured times beside the counts: the three answered, not the one refused
        assert "measured: 3 answers in" in proc.stdout and "split, median of 3: " in proc.stdout, proc.stdout
        timed = re.search(
            r"median of 3: ([\d.]+) ms per request \(waiting on the edge ([\d.]+), head ([\d.]+)", proc.stdout
        )
        assert timed and float(timed[1]) > 0 and float(timed[3]) > 0 and float(timed[2]) < float(timed[1]), (
            proc.stdout
        )
        assert "s9.npz has no array named token_type_ids, attention_mask" in proc.stderr
        ref = make_session(h.path)
        for k, f in enumerate(feeds):
            np.testing.assert_allclose(np.load(out / f"s{k}.npz")["logits"], ref.run(None, f)[0], rtol=1e-5)
        bare = tmp_path / "bare"
        bare.mkdir()
        np.save(bare / "x.npy", feeds[0]["input_ids"])
        proc = run_cli(*args[:-1], str(bare), timeout=120)
        assert (
            proc.returncode == 2 and "give each sample as a .npz file with one array per input" in proc.stderr
        )
    finally:
        srv.stop()


def test_a_fixed_batch_above_one_reads_files_in_whole_batches(tmp_path):
    """A model exported at a fixed batch of 4 runs 4 rows at a time: a file of 8 rows is two of its samples,
    and a file whose rows do not fill whole batches says so."""
    from splitpoint.core.errors import SplitPointError
    from splitpoint.core.samples import load_inputs

    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "b4",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])],
    )
    m = helper.make_model(g)
    np.save(tmp_path / "a.npy", np.arange(24, dtype=np.float32).reshape(8, 3))
    got = load_inputs(m, tmp_path)
    assert [s["x"].shape for s in got] == [(4, 3), (4, 3)] and got[1]["x"][0, 0] == 12
    np.save(tmp_path / "b.npy", np.zeros((3, 3), np.float32))
    with pytest.raises(SplitPointError, match="b.npy: 3 rows; input x takes batches of 4"):
        load_inputs(m, tmp_path)


def test_the_onnx_package_s_light_models_keep_their_run_time_weights_on_each_side(tmp_path):
    """The onnx wheel's own model-zoo tests (`backend/test/data/light`: IR 3, opset 9, every weight listed
    as an input) make their weights at run time with ConstantOfShape. Such a weight is a constant
    subgraph: each side computes its own, none crosses a cut, every split equals the whole model, and
    the one served answers as it does."""
    from pathlib import Path

    from splitpoint.edge.client import EdgeClient
    from splitpoint.edge.config import EdgeConfig
    from splitpoint.server.config import ServerConfig
    from splitpoint.server.tail_server import TailServer

    from .test_split_equivalence import run_split

    path = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_squeezenet.onnx"
    h = open_model(path)
    made = {o for n in h.model.graph.node if n.op_type == "ConstantOfShape" for o in n.output}
    assert len(made) > 30  # its weights, made at run time
    cuts = h.cuts()
    assert len(cuts) > 40
    assert not [(c.index, t.name) for c in cuts for t in c.crossing if t.name in made]
    feeds = sample_feeds(h.model, 1, 0)
    want = dict(zip(h.index.outputs, h.whole_session(1).run(None, feeds), strict=True))
    for cut in cuts[:: len(cuts) // 6]:
        head, tail = extract(h.index, cut)
        got = run_split(head, tail, cut, feeds)
        for k, ref in want.items():
            np.testing.assert_allclose(got[k], ref, rtol=1e-5, atol=1e-6, err_msg=f"cut {cut.index} {k}")
    mid = cuts[len(cuts) // 2]
    write_plan(h, tmp_path / "plans" / "p", cut=mid)
    srv = TailServer(ServerConfig(bind="tcp://127.0.0.1:0", plans_dir=tmp_path / "plans")).start()
    try:
        cfg = EdgeConfig(plan_dir=tmp_path / "plans" / "p", server=srv.endpoint, fallback=False)
        with EdgeClient(cfg) as c:
            r = c.infer(feeds, timeout=60)
        assert not r.fallback and r.breakdown["head_ms"] > 0 and r.breakdown["tail_ms"] > 0
        for k, ref in want.items():
            np.testing.assert_allclose(r[k], ref, rtol=1e-5, atol=1e-6)
    finally:
        srv.stop()


def test_plan_takes_its_profiles_input_shapes_when_none_are_given(variants, tmp_path):
    """`plan` refused a model of symbolic height and width without --input-shape though both profiles
    record the shapes they were measured at, which the plan must be made at anyway."""
    args = ["--input-shape", "input:1x3x48x48"]
    for role in ("edge", "server"):
        out = str(tmp_path / f"{role}.json")
        run_cli(
            "profile", str(variants["symhw"]), "--role", role, "--budget", "3", "-o", out, "--quiet", *args,
            check=True, timeout=300,
        )  # fmt: skip
    profiles = [
        "--edge-profile",
        str(tmp_path / "edge.json"),
        "--server-profile",
        str(tmp_path / "server.json"),
    ]
    out = str(tmp_path / "p")
    r = run_cli(
        "plan", str(variants["symhw"]), *profiles, "--network", "lte", "--random", "2", "-o", out, timeout=300
    )
    assert r.returncode == 0, r.stderr
    from splitpoint.core.plan import Plan

    assert Plan.load(tmp_path / "p").input_shapes == {"input": [1, 3, 48, 48]}
    other = run_cli("plan", str(variants["symhw"]), *profiles, "--network", "lte", "--input-shape",
                    "input:1x3x64x64", timeout=300)  # fmt: skip
    assert other.returncode == 2 and "measured with input shapes" in other.stderr


def test_a_quantising_codec_on_integer_tensors_is_named_as_what_is_sent(variants):
    """A text encoder's input is token ids, which every codec sends exact: its server-only candidates
    read 'int4+zstd' and 'int8' (and again under each lossy name) for the same bytes. Each is named by the
    codec as it applies (float32 with its lossless stage), once."""
    from splitpoint.partitioner.planner import candidate_inputs, gather

    h = _handle(variants, "text")
    assert all(h.index.info[i].dtype.startswith("int") for i in h.index.inputs)
    edge = profile_model(h, ProfileSettings(role="edge", budget=2, anchors=1))
    server = profile_model(h, ProfileSettings(role="server", budget=2, anchors=1))
    codecs = ["float32", "int8", "int4+zstd", "int8+zstd"]
    m = gather(h, edge, server, [sample_feeds(h.model, 1, 0)], codecs)
    cands = candidate_inputs(m)
    server = sorted(c.codec for c in cands if c.kind == "server-only")
    assert server == ["float32", "float32+zstd"], server
    keys = [(c.kind, c.cut, c.codec, c.head_weights) for c in cands]
    assert len(keys) == len(set(keys))
    floats = [c for c in cands if c.kind == "split" and c.codec.startswith("int8")]
    assert floats, "a cut of float tensors keeps its quantising codecs"
