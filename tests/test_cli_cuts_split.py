"""`splitpoint cuts` and `splitpoint split` as a user runs them, bad input included."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from splitpoint.core import zoo
from splitpoint.core.errors import PlanError
from splitpoint.core.plan import Plan, write_dir_atomically
from splitpoint.core.runner import assemble, load_split, make_session

from .conftest import random_feeds, run_cli


@pytest.fixture(scope="module")
def small_resnet(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "r18.onnx"
    onnx.save_model(zoo.build("resnet18", width=0.25, resolution=32), str(path))
    return path


def test_cuts_json_lists_every_cut(small_resnet):
    proc = run_cli("cuts", str(small_resnet), "--json", check=True)
    data = json.loads(proc.stdout)
    cuts = data["cuts"]
    assert [c["index"] for c in cuts] == list(range(1, data["compute_nodes"]))
    for c in cuts:
        assert c["bytes_per_sample"] == sum(t["bytes_per_sample"] for t in c["crossing"])
        assert all(t["dtype"] == "float32" and t["shape"].startswith("N") for t in c["crossing"])
    table = run_cli("cuts", str(small_resnet), check=True).stdout
    assert "candidate cuts" in table and "maxpool_0" in table


def test_split_writes_a_verified_plan_that_reproduces_the_model(small_resnet, tmp_path):
    out = tmp_path / "plan"
    run_cli("split", str(small_resnet), "--cut", "bn_3,maxpool_0", "-o", str(out), check=True)
    plan, head, tail = load_split(out)
    assert {t.name for t in plan.cut_tensors} == {"bn_3", "maxpool_0"}
    assert set(plan.files) == {"head.onnx", "tail.onnx"} and len(plan.plan_id) == 64
    model = onnx.load(str(small_resnet))
    feeds = random_feeds(model, batch=2)
    sent, early = head.run(feeds)
    outs = assemble(plan, early, tail.run(sent))
    ref = make_session(str(small_resnet)).run(None, feeds)
    np.testing.assert_allclose(outs[0], ref[0], atol=1e-5)
    # tampering with a file is caught by the checksum
    with open(out / "tail.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(PlanError, match="checksum mismatch for tail.onnx"):
        Plan.load(out)


def test_zoo_names_are_accepted_wherever_a_model_is(tmp_path):
    proc = run_cli("cuts", "multitask", "--json", check=True)
    assert json.loads(proc.stdout)["cuts"][0]["raw_input_crossing"] is True


def _bad_models(tmp_path, small_resnet):
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n" * 20)
    data = small_resnet.read_bytes()
    trunc = tmp_path / "truncated.onnx"
    trunc.write_bytes(data[: len(data) // 2])
    bad = helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["nope"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        )
    )
    invalid = tmp_path / "invalid.onnx"
    invalid.write_bytes(bad.SerializeToString())
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    return {
        "missing": (tmp_path / "missing.onnx", "model file not found"),
        "empty": (empty, "model file is empty"),
        "text": (text, "not (a valid ONNX file|an ONNX model)"),
        "truncated": (trunc, "not (a valid ONNX file|an ONNX model)"),
        "checker": (invalid, "fails the ONNX checker"),
    }


@pytest.mark.parametrize("case", ["missing", "empty", "text", "truncated", "checker"])
def test_bad_model_files_get_a_specific_error_and_no_output(case, tmp_path, small_resnet):
    path, message = _bad_models(tmp_path, small_resnet)[case]
    out = tmp_path / "out"
    for args in (["cuts", str(path)], ["split", str(path), "--cut", "3", "-o", str(out)]):
        proc = run_cli(*args)
        assert proc.returncode == 2, proc.stderr
        assert "error:" in proc.stderr and "Traceback" not in proc.stderr
        import re

        assert re.search(message, proc.stderr), proc.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "cut,message",
    [
        ("0", "cut index 0 does not exist: valid cuts are 1..68"),
        ("69", "cut index 69 does not exist"),
        ("-4", "cut index -4 does not exist"),
        ("relu_999", "no tensor named 'relu_999'"),
        ("bn_3", "the tail also needs maxpool_0"),
    ],
)
def test_bad_cuts_are_refused(cut, message, small_resnet, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("split", str(small_resnet), "--cut", cut, "-o", str(out))
    assert proc.returncode == 2 and message in proc.stderr.replace("\n", " "), proc.stderr
    assert not out.exists()


def test_existing_output_is_kept_without_force_and_replaced_with_it(small_resnet, tmp_path):
    out = tmp_path / "plan"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = run_cli("split", str(small_resnet), "--cut", "4", "-o", str(out))
    assert proc.returncode == 2 and "not empty" in proc.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    run_cli("split", str(small_resnet), "--cut", "4", "-o", str(out), "--force", check=True)
    assert sorted(p.name for p in out.iterdir()) == ["head.onnx", "plan.json", "tail.onnx"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_failure_mid_write_leaves_previous_content_intact(tmp_path):
    out = tmp_path / "plan"
    out.mkdir()
    (out / "plan.json").write_text("old")

    def write(tmp):
        (tmp / "head.onnx").write_bytes(b"partial")
        raise KeyboardInterrupt  # Ctrl-C halfway

    with pytest.raises(KeyboardInterrupt):
        write_dir_atomically(out, write, force=True)
    assert [p.name for p in out.iterdir()] == ["plan.json"] and (out / "plan.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["plan"]
