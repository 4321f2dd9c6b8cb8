"""Exported decoders split between layers: graphs written by torch.onnx.export (tests/data/exported-decoder):
a GPT-2-style one whose layers share a causal mask built once from attention_mask, input_ids' shape and
layer 0's cache length; a Llama-style one with grouped-query attention, rotary positions and no
attention_mask (also in float16); and Hugging Face transformers' own GPT-2. Every split gives the whole
model's logits step by step; a plan of each, served by a real server, generates the whole model's tokens;
what cannot be split is refused with the reason and nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from splitpoint.app.broker import free_port
from splitpoint.app.process import start_server, stop
from splitpoint.core.decoders import ExportedDecoder
from splitpoint.core.errors import ModelError, PlanError
from splitpoint.core.graph.decodercut import decoder_layout, decoder_part
from splitpoint.core.graph.index import GraphIndex
from splitpoint.core.kvcache import DecoderSegment
from splitpoint.core.onnxio import load_model
from splitpoint.core.plan import Plan
from splitpoint.core.plandir import write_decoder_plan
from splitpoint.core.zoo.decoder import DECODER_TINY, build_decoder, hidden_name
from splitpoint.edge.decoder import DecoderClient, generate_local

from .conftest import run_cli

DATA = Path(__file__).parent / "data" / "exported-decoder"
MODEL = DATA / "decoder.onnx"
# file: (layers, cache heads, head size, positions, hidden width, vocabulary)
SHAPES = {
    "decoder.onnx": (4, 3, 8, 128, 24, 128),
    "decoder-gqa.onnx": (3, 2, 8, 64, 32, 100),
    "decoder-gqa-fp16.onnx": (3, 2, 8, 64, 32, 100),
    "decoder-hf-gpt2.onnx": (3, 4, 16, 128, 64, 200),  # transformers' own GPT-2 (export.py --hf)
}


_INDEX: dict[str, GraphIndex] = {}


def _index(name: str) -> GraphIndex:
    if name not in _INDEX:
        _INDEX[name] = GraphIndex.build(load_model(DATA / name))
    return _INDEX[name]


@pytest.mark.parametrize("name", list(SHAPES))
def test_the_layout_is_read_from_the_graph(name):
    idx = _index(name)
    lay = decoder_layout(idx)
    assert (lay.layers, lay.kv_heads, lay.head_dim, lay.max_len) == SHAPES[name][:4]
    assert lay.main_input == "input_ids" and lay.logits == "logits"
    # one residual-stream tensor per boundary, in layer order
    assert len(set(lay.boundaries)) == lay.layers - 1
    assert [idx.producer[b] for b in lay.boundaries] == sorted(idx.producer[b] for b in lay.boundaries)


def test_the_zoo_decoders_boundaries_are_its_hidden_states():
    lay = decoder_layout(GraphIndex.build(build_decoder(DECODER_TINY, "tiny", 0)))
    assert lay.boundaries == tuple(hidden_name(i) for i in range(DECODER_TINY.layers - 1))


@pytest.mark.parametrize("name,k", [(n, k) for n, shape in SHAPES.items() for k in range(1, shape[0])])
def test_every_split_gives_the_whole_models_logits_step_by_step(name, k):
    idx = _index(name)
    lay = decoder_layout(idx)
    L = lay.layers
    whole = DecoderSegment(idx.model, 1)
    head = DecoderSegment(decoder_part(idx, lay, 0, k), 1)
    tail = DecoderSegment(decoder_part(idx, lay, k, L), 1)
    # each side holds only its own layers' caches; the mask and positions never cross
    assert {n for n in tail.inputs if n.startswith("past_")} == {
        f"past_key_values.{i}.{kind}" for i in range(k, L) for kind in ("key", "value")
    }
    assert tail.main_in == lay.boundaries[k - 1] and head.main_out == lay.boundaries[k - 1]
    pw, ph, pt = whole.empty_past(), head.empty_past(), tail.empty_past()
    x = np.random.default_rng(k).integers(0, SHAPES[name][5], (1, 6))
    tokens = []
    for _ in range(6):
        ref, pw = whole.step(x, pw)
        hidden, ph = head.step(x, ph)
        got, pt = tail.step(hidden, pt)
        tol = 2e-3 if ref.dtype == np.float16 else 1e-5  # float16 rounds differently where kernels fuse
        np.testing.assert_allclose(got.astype(np.float32), ref.astype(np.float32), rtol=tol, atol=tol * 10)
        tokens.append(int(ref[0, -1].argmax()))
        x = np.array([[tokens[-1]]])
    assert pt[f"past_key_values.{k}.key"].shape[2] == 6 + 5  # the prompt and five steps, on the server's side
    assert len(set(tokens)) >= 2  # the logits compared are of a sequence, not one token repeated


@pytest.mark.parametrize("name", list(SHAPES))
def test_a_served_plan_of_it_generates_the_whole_models_tokens(name, tmp_path):
    layers, _, _, positions, width, vocab = SHAPES[name]
    out = tmp_path / "plans" / "exported"
    r = subprocess.run(
        [sys.executable, "-m", "splitpoint.app", "split-decoder", str(DATA / name), "--edge-layers", "2"]
        + ["-o", str(out), "--with-full"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    plan = Plan.load(out)
    assert plan.decoder is not None and (plan.decoder.layers, plan.decoder.max_len) == (layers, positions)
    assert plan.decoder.hidden == width and plan.decoder.vocab == vocab
    prompt = np.random.default_rng(3).integers(0, vocab, (1, 7))
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = start_server(endpoint, tmp_path / "plans")
    try:
        unsplit = generate_local(out, prompt, 48)  # full.onnx: the exported model itself
        with DecoderClient(out, endpoint, timeout_s=30) as client:
            split = client.generate(prompt, 48)
            again = client.generate(prompt, 48)  # a new session starts from an empty cache
    finally:
        stop(proc)
    assert split.tokens == unsplit.tokens == again.tokens
    assert len(set(split.tokens)) > 10
    # the prefill sends the prompt's 7 hidden states, each later step one, with the same header
    size = width * (2 if "fp16" in name else 4)
    assert plan.cut_tensors[0].dtype == ("float16" if "fp16" in name else "float32")
    # the default codec sends the hidden state as it is, and the plan names what that is
    assert plan.stages[0].codec == ("float16" if "fp16" in name else "float32")
    assert split.bytes_sent[0] - 7 * size == split.bytes_sent[1] - size > 0


def test_a_float16_decoders_candidates_name_what_they_send_once_each():
    """On a float16 export float32 and float16 send the same bytes (the tensor unchanged): one candidate
    per cut and weight precision, named float16, where the planner listed each twice, one as "float32"."""
    from splitpoint.partitioner.costmodel import Link
    from splitpoint.partitioner.decoderplan import candidates, measure

    link = Link("wifi", 50.0, 50.0, 5.0)
    for name, exact in (("decoder-gqa-fp16.onnx", "float16"), ("decoder-gqa.onnx", "float32")):
        dec = ExportedDecoder(DATA / name)
        m = measure(
            dec,
            codecs=("float32", "float16", "int8-ol"),
            head_weights=("float32",),
            prompt_tokens=16,
            new_tokens=16,
            repeats=1,
        )
        cands = candidates(m, link)
        codecs = [c.codec for c in cands if c.edge_layers == 1]
        assert codecs == ([exact, "int8-ol"] if exact == "float16" else ["float32", "float16", "int8-ol"])
        assert len({c.label for c in cands}) == len(cands)
        if exact == "float16":  # what the float16 candidate sends: two bytes a value, plus the header
            one = next(c for c in cands if c.codec == "float16")
            assert 2 * dec.d_model < one.step_bytes < 2 * dec.d_model + 128


@pytest.mark.parametrize("name", ["decoder-gqa.onnx", "decoder-gqa-fp16.onnx"])
def test_the_edge_memory_counts_each_layers_cache_in_its_own_dtype(name):
    """Grouped-query heads and a float16 cache: the planner's --edge-memory figure held the first layer's
    shape in float32 for every layer (twice a float16 cache)."""
    from splitpoint.partitioner.decoderplan import kv_bytes

    dec = ExportedDecoder(DATA / name)
    layers, heads, head_dim = SHAPES[name][:3]
    itemsize = 2 if "fp16" in name else 4
    assert dec.kv_bytes_by_layer == (2 * heads * head_dim * itemsize,) * layers
    assert kv_bytes(dec, 0, 2) == 2 * 2 * heads * head_dim * itemsize
    assert kv_bytes(DECODER_TINY, 0, 2) == 2 * 2 * DECODER_TINY.heads * DECODER_TINY.head_dim * 4


@pytest.mark.parametrize(
    "args, words",
    [
        (["--codec", "bogus"], "unknown codec 'bogus'"),
        (["--max-len", "0"], "--max-len must be at least 2"),
        (["--max-len", "-5"], "--max-len must be at least 2"),
    ],
)
def test_split_decoder_refuses_bad_options_in_one_line_before_any_work(tmp_path, args, words):
    out = tmp_path / "plan"
    r = run_cli("split-decoder", str(MODEL), "--edge-layers", "2", "-o", str(out), *args)
    assert r.returncode != 0 and "Traceback" not in r.stderr and words in r.stderr, r.stderr
    assert not out.exists()


def _strip_position_table(tmp_path: Path) -> Path:
    """The exported decoder with its learned positions replaced by a computed zero: no table to read
    the model's length from."""
    m = onnx.load(str(MODEL))
    for n in m.graph.node:
        if n.op_type == "Gather" and n.input[1] == "position_ids":
            table = n.input[0]
            n.input[0] = table + "_computed"
            m.graph.node.insert(
                0,
                onnx.helper.make_node("Identity", [table], [table + "_computed"]),
            )
            break
    p = tmp_path / "no-table.onnx"
    onnx.save(m, str(p))
    return p


def test_what_cannot_be_split_is_refused_with_the_reason_and_nothing_written(tmp_path):
    out = tmp_path / "plan"
    with pytest.raises(PlanError, match="must be 1 to 3"):
        write_decoder_plan(ExportedDecoder(MODEL), out, edge_layers=4)
    with pytest.raises(PlanError, match="past the model's 128 positions"):
        ExportedDecoder(MODEL, max_len=500)
    with pytest.raises(PlanError, match="give --max-len"):
        ExportedDecoder(_strip_position_table(tmp_path))
    assert not out.exists()
    # a length past the table the model reads (hidden behind a computed tensor) fails its trial run at
    # planning, where it would have failed a generation at position 128
    with pytest.raises(PlanError, match=r"--max-len 500: the model fails at position 499 \(.*out of"):
        ExportedDecoder(_strip_position_table(tmp_path), 500)
    # given, it splits
    plan = write_decoder_plan(ExportedDecoder(_strip_position_table(tmp_path), 100), out, edge_layers=2)
    assert plan.decoder is not None and plan.decoder.max_len == 100
    # a one-shot model is not a decoder
    cnn = tmp_path / "cnn.onnx"
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    relu = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(onnx.helper.make_model(relu), str(cnn))
    r = subprocess.run(
        [sys.executable, "-m", "splitpoint.app", "split-decoder", str(cnn), "--edge-layers", "1"]
        + ["-o", str(tmp_path / "p2")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0 and "no past_key_values" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "p2").exists()


def test_a_merged_export_is_refused_with_what_to_export_instead(tmp_path):
    m = onnx.load(str(DATA / "decoder-gqa.onnx"))
    m.graph.input.append(onnx.helper.make_tensor_value_info("use_cache_branch", onnx.TensorProto.BOOL, [1]))
    p = tmp_path / "merged.onnx"
    onnx.save(m, str(p))
    with pytest.raises(ModelError, match="merged decoder export.*decoder_with_past_model"):
        ExportedDecoder(p)


def test_a_later_layer_reading_an_earlier_layers_cache_is_refused(tmp_path):
    """Layer 3 reading layer 0's cache values (not only its length) has no single boundary after layer 0."""
    m = onnx.load(str(MODEL))
    idx = GraphIndex.build(m)
    concat = next(n for n in idx.nodes if n.op_type == "Concat" and "past_key_values.3.value" in n.input)
    concat.input[list(concat.input).index("past_key_values.3.value")] = "past_key_values.0.value"
    p = tmp_path / "crossed.onnx"
    onnx.save(m, str(p))
    with pytest.raises(ModelError, match="no single tensor separates decoder layers"):
        decoder_layout(GraphIndex.build(load_model(p)))


def test_plan_decoder_measures_and_picks_a_split_of_it_at_a_fidelity_floor(tmp_path):
    out = tmp_path / "pick"
    r = subprocess.run(
        [sys.executable, "-m", "splitpoint.app", "plan-decoder", str(MODEL), "--network", "wifi-n", "--json"]
        + ["--prompt-tokens", "16", "--new-tokens", "16", "--min-agreement", "0.95", "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    cands = res["candidates"]
    assert len(cands) == 3 * 4 * 2  # cut after 1..3 layers x four codecs x two edge weight precisions
    assert all(c["tpot_ms"] > 0 and c["ttft_ms"] >= c["tpot_ms"] * 0.5 for c in cands)
    # candidates are measured fastest first until one reaches the floor: that one is the pick
    tried = res["fidelity_measured"]
    assert tried and tried[-1]["candidate"] == res["pick"]["label"]
    assert all(t["agreement"]["value"] < 0.95 for t in tried[:-1])
    assert res["pick"]["fidelity"]["agreement"]["value"] >= 0.95
    plan = Plan.load(out)
    assert plan.decoder is not None and plan.decoder.edge_layers == res["pick"]["edge_layers"]
    assert plan.stages[0].codec == res["pick"]["codec"]
    assert plan.predicted["fidelity"]["agreement"]["value"] >= 0.95


def _variant(tmp_path: Path, name: str, change) -> Path:
    m = onnx.load(str(MODEL))
    change(m)
    p = tmp_path / f"{name}.onnx"
    onnx.save(m, str(p))
    return p


def _split_generates_the_whole_models_tokens(path: Path, tmp_path: Path) -> None:
    out = tmp_path / "plans" / path.stem
    write_decoder_plan(ExportedDecoder(path), out, edge_layers=2, include_full=True)
    prompt = np.random.default_rng(3).integers(0, 128, (1, 7))
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = start_server(endpoint, tmp_path / "plans")
    try:
        unsplit = generate_local(out, prompt, 24)
        with DecoderClient(out, endpoint, timeout_s=30) as client:
            split = client.generate(prompt, 24)
    finally:
        stop(proc)
    assert split.tokens == unsplit.tokens and len(set(split.tokens)) > 3


def test_exports_as_users_write_them_split_or_are_refused_for_what_they_are(tmp_path):
    """torch's Dim.AUTO names each cache's length apart (refused, blaming the wrong layer, as if later
    layers read an earlier one's values); a boolean attention_mask (fed int64 and refused by
    onnxruntime, reported as a --max-len problem); a batch fixed at 2 (the same wrong advice); logits of
    the last position only (a traceback, after a fidelity of 1.000 measured on a single score)."""

    def own_lengths(m):  # Dim.AUTO: s0, s1, ... one symbol per cache input
        for k, vi in enumerate(i for i in m.graph.input if i.name.startswith("past_key_values.")):
            vi.type.tensor_type.shape.dim[2].dim_param = f"s{k}"

    _split_generates_the_whole_models_tokens(_variant(tmp_path, "auto-dims", own_lengths), tmp_path)

    def bool_mask(m):
        mask = next(i for i in m.graph.input if i.name == "attention_mask")
        mask.type.tensor_type.elem_type = onnx.TensorProto.BOOL
        for n in m.graph.node:
            n.input[:] = ["attention_mask_i64" if i == "attention_mask" else i for i in n.input]
        m.graph.node.insert(
            0,
            onnx.helper.make_node(
                "Cast", ["attention_mask"], ["attention_mask_i64"], to=onnx.TensorProto.INT64
            ),
        )

    _split_generates_the_whole_models_tokens(_variant(tmp_path, "bool-mask", bool_mask), tmp_path)

    def batch_of_two(m):
        for vi in m.graph.input:
            vi.type.tensor_type.shape.dim[0].Clear()
            vi.type.tensor_type.shape.dim[0].dim_value = 2

    with pytest.raises(
        ModelError, match="input_ids has its batch fixed at 2: a generation runs one sequence"
    ):
        ExportedDecoder(_variant(tmp_path, "batch2", batch_of_two))

    def last_logits(m):
        logits = m.graph.output[0]
        assert logits.name == "logits"
        for n in m.graph.node:
            n.output[:] = ["logits_all" if o == "logits" else o for o in n.output]
        m.graph.initializer.append(onnx.numpy_helper.from_array(np.array(-1, np.int64), "last"))
        m.graph.node.append(onnx.helper.make_node("Gather", ["logits_all", "last"], ["logits"], axis=1))
        del logits.type.tensor_type.shape.dim[1]

    with pytest.raises(ModelError, match=r"expected logits \[batch, sequence, vocab\]"):
        ExportedDecoder(_variant(tmp_path, "last-logits", last_logits))

    def extra_output(m):  # a last_hidden_state beside the logits
        m.graph.output.append(onnx.helper.make_empty_tensor_value_info(m.graph.node[-1].input[0]))

    with pytest.raises(ModelError, match="besides its presents .* export it returning only the logits"):
        ExportedDecoder(_variant(tmp_path, "extra-output", extra_output))


def test_an_export_whose_layers_are_gemm_gets_4_bit_edge_weights(tmp_path):
    """transformers' GPT-2 writes its layers as Gemm: its head stayed float while the plan said int4,
    and plan-decoder scored int4 candidates that were the float ones."""
    out = tmp_path / "p"
    plan = write_decoder_plan(
        ExportedDecoder(DATA / "decoder-hf-gpt2.onnx"), out, edge_layers=2, head_weights="int4"
    )
    head = onnx.load(str(out / "head.onnx"))
    ops = [n.op_type for n in head.graph.node]
    assert plan.stages[0].weights == "int4" and ops.count("MatMulNBits") >= 8 and "Gemm" not in ops


def _decoder_with_heads_per_layer(heads: list[int], path: Path) -> Path:
    """An exported-style decoder whose layers keep different numbers of KV heads (as OpenELM's do)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    vocab, d, dh = 50, 16, 8
    inits, nodes = [], []
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "seq"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "seq", vocab])]

    def init(name, arr):
        inits.append(numpy_helper.from_array(arr.astype(np.float32) if arr.dtype.kind == "f" else arr, name))
        return name

    nodes.append(
        helper.make_node("Gather", [init("emb", rng.standard_normal((vocab, d))), "input_ids"], ["h0"])
    )
    h = "h0"
    for i, nh in enumerate(heads):
        for kind in ("key", "value"):
            past, present = f"past_key_values.{i}.{kind}", f"present.{i}.{kind}"
            inputs.append(helper.make_tensor_value_info(past, TensorProto.FLOAT, [1, nh, "past", dh]))
            outputs.append(helper.make_tensor_value_info(present, TensorProto.FLOAT, [1, nh, "total", dh]))
            w = init(f"w{kind}{i}", rng.standard_normal((d, nh * dh)) * 0.1)
            shape = init(f"shape{kind}{i}", np.array([1, -1, nh, dh], np.int64))
            nodes += [
                helper.make_node("MatMul", [h, w], [f"{kind}{i}_p"]),
                helper.make_node("Reshape", [f"{kind}{i}_p", shape], [f"{kind}{i}_r"]),
                helper.make_node("Transpose", [f"{kind}{i}_r"], [f"{kind}{i}_t"], perm=[0, 2, 1, 3]),
                helper.make_node("Concat", [past, f"{kind}{i}_t"], [present], axis=2),
            ]
        nodes += [
            helper.make_node("ReduceMean", [f"present.{i}.key"], [f"s{i}"], axes=[1, 2, 3], keepdims=0),
            helper.make_node("MatMul", [h, init(f"wo{i}", rng.standard_normal((d, d)) * 0.3)], [f"o{i}"]),
            helper.make_node("Unsqueeze", [f"s{i}"], [f"su{i}"], axes=[1, 2]),
            helper.make_node("Add", [f"o{i}", f"su{i}"], [f"h{i + 1}"]),
        ]
        h = f"h{i + 1}"
    nodes.append(helper.make_node("MatMul", [h, init("wout", rng.standard_normal((d, vocab)))], ["logits"]))
    g = helper.make_graph(nodes, "dec", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)])
    m.ir_version = 7
    onnx.save(onnx.shape_inference.infer_shapes(m), str(path))
    return path


@pytest.mark.parametrize("edge_layers", [1, 2])
def test_a_decoder_whose_layers_keep_different_numbers_of_heads_is_split_and_run(tmp_path, edge_layers):
    """plan.json's heads are the first layer's; layers after it may keep fewer or more (grouped heads).
    The fit check held every layer to the first one's count and refused, at deploy, at a server's start
    and at `generate`, the plan `split-decoder` had just written."""
    from splitpoint.core.runner import check_models_load
    from splitpoint.server.registry import PlanRegistry

    path = _decoder_with_heads_per_layer([2, 4, 2], tmp_path / "dec.onnx")
    out = tmp_path / "plans" / "p"
    write_decoder_plan(ExportedDecoder(path, max_len=64), out, edge_layers=edge_layers, include_full=True)
    check_models_load(out, Plan.load(out))
    assert len(PlanRegistry(tmp_path / "plans").ids()) == 1
    local = generate_local(out, np.array([[1, 2, 3]]), 3)
    assert len(local.tokens) == 3


def _genai_decoder(
    path: Path,
    layers=3,
    hidden=64,
    heads=4,
    kv_heads=2,
    vocab=64,
    positions=64,
    seed=0,
    fused="SkipSimplifiedLayerNormalization",
    opset=21,
) -> Path:
    """As onnxruntime-genai's model builder writes a Llama: SimplifiedLayerNormalization in ONNX's domain,
    each residual add fused with the next norm (SkipSimplifiedLayerNormalization), GroupQueryAttention with
    packed QKV and rotary caches, the caches' head size the symbol kv_cache_dim."""
    rng = np.random.default_rng(seed)
    hd = hidden // heads
    inits, nodes = [], []

    def w(name, shape, scale=0.2):
        inits.append(numpy_helper.from_array((scale * rng.standard_normal(shape)).astype(np.float32), name))
        return name

    def c(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    w("embed", (vocab, hidden), 1.0)
    inv = 1.0 / 10000 ** (np.arange(0, hd, 2) / hd)
    ang = np.outer(np.arange(positions), inv)
    c("cos_cache", np.cos(ang).astype(np.float32))
    c("sin_cache", np.sin(ang).astype(np.float32))
    c("one", np.array([1], np.int64))
    c("one_s", np.array(1, np.int64))
    nodes += [
        helper.make_node("ReduceSum", ["attention_mask", "one"], ["mask_sum"], keepdims=0),
        helper.make_node("Sub", ["mask_sum", "one_s"], ["seqlens"]),
        helper.make_node("Cast", ["seqlens"], ["seqlens_k"], to=T.INT32),
        helper.make_node("Shape", ["attention_mask"], ["mask_shape"]),
        helper.make_node("Gather", ["mask_shape", "one_s"], ["total"], axis=0),
        helper.make_node("Cast", ["total"], ["total_len"], to=T.INT32),
        helper.make_node("Gather", ["embed", "input_ids"], ["x0"]),
        helper.make_node(
            "SimplifiedLayerNormalization",
            ["x0", w("ln_in0", (hidden,), 1.0)],
            ["n0"],
            axis=-1,
            epsilon=1e-5,
            stash_type=1,
        ),
    ]

    def skip_norm(x: str, skip: str, gamma: str, normed: str, total: str) -> onnx.NodeProto:
        """The residual add fused with the next norm; SkipLayerNormalization with its beta and bias, and
        its epsilon left to onnxruntime's default (1e-12)."""
        if fused == "SkipSimplifiedLayerNormalization":
            ins, eps = [x, skip, w(gamma, (hidden,), 1.0)], {"epsilon": 1e-5}
        else:
            beta, bias = w(gamma + "_beta", (hidden,), 0.1), w(gamma + "_bias", (hidden,), 0.1)
            ins, eps = [x, skip, w(gamma, (hidden,), 1.0), beta, bias], {}
        return helper.make_node(fused, ins, [normed, "", "", total], domain="com.microsoft", **eps)

    stream, normed = "x0", "n0"
    for i in range(layers):
        qkv = w(f"qkv{i}", (hidden, (heads + 2 * kv_heads) * hd))
        nodes += [
            helper.make_node("MatMul", [normed, qkv], [f"qkv_out{i}"]),
            helper.make_node(
                "GroupQueryAttention",
                [
                    f"qkv_out{i}",
                    "",
                    "",
                    f"past_key_values.{i}.key",
                    f"past_key_values.{i}.value",
                    "seqlens_k",
                    "total_len",
                    "cos_cache",
                    "sin_cache",
                ],
                [f"attn{i}", f"present.{i}.key", f"present.{i}.value"],
                domain="com.microsoft",
                num_heads=heads,
                kv_num_heads=kv_heads,
                do_rotary=1,
            ),
            helper.make_node("MatMul", [f"attn{i}", w(f"o{i}", (heads * hd, hidden))], [f"o_out{i}"]),
            skip_norm(stream, f"o_out{i}", f"ln_post{i}", f"m{i}", f"s{i}"),
            helper.make_node("MatMul", [f"m{i}", w(f"up{i}", (hidden, 2 * hidden))], [f"up_out{i}"]),
            helper.make_node("Relu", [f"up_out{i}"], [f"act{i}"]),
            helper.make_node("MatMul", [f"act{i}", w(f"down{i}", (2 * hidden, hidden))], [f"down_out{i}"]),
            skip_norm(f"s{i}", f"down_out{i}", f"ln_in{i + 1}", f"n{i + 1}", f"r{i + 1}"),
        ]
        stream, normed = f"r{i + 1}", f"n{i + 1}"
    nodes.append(helper.make_node("MatMul", [normed, w("lm_head", (hidden, vocab), 1.0)], ["logits"]))

    def cache(n, length):
        return helper.make_tensor_value_info(n, T.FLOAT, ["batch_size", kv_heads, length, "kv_cache_dim"])

    ins = [
        helper.make_tensor_value_info("input_ids", T.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", T.INT64, ["batch_size", "total_sequence_length"]),
    ]
    ins += [
        cache(f"past_key_values.{i}.{k}", "past_sequence_length")
        for i in range(layers)
        for k in ("key", "value")
    ]
    outs = [helper.make_tensor_value_info("logits", T.FLOAT, ["batch_size", "sequence_length", vocab])]
    outs += [
        cache(f"present.{i}.{k}", "total_sequence_length") for i in range(layers) for k in ("key", "value")
    ]
    g = helper.make_graph(nodes, "genai", ins, outs, inits)
    m = helper.make_model(
        g, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    )
    m.ir_version = 10
    onnx.save(m, str(path))
    return path


def _greedy_on_the_file(path: Path, prompt: np.ndarray, n: int, kv_heads=2, head_size=16) -> list[int]:
    """Greedy tokens of onnxruntime on the exported file itself, its fused ops and all."""
    from splitpoint.core.runner import make_session

    sess = make_session(str(path))
    names = [o.name for o in sess.get_outputs()]
    past = {
        i.name: np.zeros((1, kv_heads, 0, head_size), np.float32)
        for i in sess.get_inputs()
        if i.name.startswith("past_key_values")
    }
    ids, total, out = prompt, 0, []
    for _ in range(n):
        total += ids.shape[1]
        got = sess.run(None, {"input_ids": ids, "attention_mask": np.ones((1, total), np.int64), **past})
        res = dict(zip(names, got, strict=True))
        out.append(int(res["logits"][0, -1].argmax()))
        past = {k: res[k.replace("past_key_values", "present")] for k in past}
        ids = np.array([[out[-1]]], np.int64)
    return out


@pytest.mark.parametrize(
    ("fused", "opset", "edge_layers"),
    [
        ("SkipSimplifiedLayerNormalization", 21, 1),
        ("SkipSimplifiedLayerNormalization", 21, 2),
        ("SkipLayerNormalization", 14, 2),
    ],
)
def test_an_onnxruntime_genai_export_is_split_and_generates_its_own_tokens(
    tmp_path, fused, opset, edge_layers
):
    """onnxruntime-genai's model builder writes ops only onnxruntime defines (SimplifiedLayerNormalization in
    ONNX's own domain: the checker refused the file), fuses each residual add with the next norm (no tensor
    separated the layers) and leaves the caches' head size a symbol (refused as "not fixed heads"). Its
    split serves the greedy tokens onnxruntime gives on the file itself, and its logits stay within 1e-5
    (relative) of the file's. onnxruntime's transformer optimiser fuses a GPT-2's norms as
    SkipLayerNormalization (beta, bias; its epsilon left to the default), taken apart into ONNX's
    LayerNormalization, which
    below opset 17 only onnxruntime defines."""
    path = _genai_decoder(tmp_path / "genai.onnx", fused=fused, opset=opset)
    out = tmp_path / "plans" / "genai"
    dec = ExportedDecoder(path)
    plan = write_decoder_plan(dec, out, edge_layers=edge_layers, include_full=True)
    assert plan.decoder is not None and (plan.decoder.head_dim, plan.decoder.max_len) == (16, 64)
    prompt = np.random.default_rng(3).integers(0, 64, (1, 7))
    feeds = {"input_ids": prompt, "attention_mask": np.ones((1, 7), np.int64)}
    feeds |= {
        f"past_key_values.{i}.{k}": np.zeros((1, 2, 0, 16), np.float32)
        for i in range(3)
        for k in ("key", "value")
    }
    from splitpoint.core.runner import make_session

    as_split = make_session(dec.whole().SerializeToString()).run(["logits"], feeds)[0]
    as_written = make_session(str(path)).run(["logits"], feeds)[0]
    np.testing.assert_allclose(as_split, as_written, rtol=1e-5, atol=1e-5)
    want = _greedy_on_the_file(path, prompt, 24)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = start_server(endpoint, tmp_path / "plans")
    try:
        with DecoderClient(out, endpoint, timeout_s=30) as client:
            split = client.generate(prompt, 24)
    finally:
        stop(proc)
    assert split.tokens == want and len(set(want)) > 3
