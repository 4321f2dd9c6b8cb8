"""The README's main command, at a small scale: profile, plan, show the front, serve, run the pick and a
contrasting candidate over an emulated link, telemetry through a real mosquitto, everything shut down and
cleaned up afterwards."""

from __future__ import annotations

import tempfile
from pathlib import Path

from splitpoint.app.demo import DemoConfig, run_demo


def test_demo_runs_two_candidates_end_to_end(tmp_path, mosquitto, small_resnet18):
    lines: list[str] = []
    s = run_demo(
        DemoConfig(
            model=str(small_resnet18),
            network="lte",
            requests=20,
            budget=8,
            mqtt=mosquitto,
            workdir=tmp_path / "work",
        ),
        say=lambda *a: lines.append(" ".join(map(str, a))),
    )
    assert any("Pareto front" in line for line in lines) and any("link proxy" in line for line in lines)
    assert s["other"] is not None and set(s["runs"]) == {"pick", next(k for k in s["runs"] if k != "pick")}
    labels = {s["pick"], s["other"]}
    assert any(label.startswith("cut ") for label in labels), labels  # a split really runs
    for role, r in s["runs"].items():
        assert r["fallbacks"] == 0 and r["throughput_ips"] > 0 and r["stages"]["total_ms"] > 0, role
        assert 0 <= r["top1_agreement"] <= 1 and r["max_abs_error"] >= 0
        if (
            r["stages"]["network_ms"] is not None
        ):  # the lte link's RTT alone is 70 ms: below it means no emulation
            assert r["stages"]["network_ms"] >= 0.9 * 70
    assert any("faster" in line for line in lines) and any(
        "max |split − unsplit|' is" in line for line in lines
    )
    assert {"demo-edge", "demo-server"} <= set(s["telemetry_devices"])
    assert all((Path(p) / "plan.json").is_file() for p in s["plans"].values())  # kept: --workdir was given


def test_demo_leaves_nothing_in_the_temporary_directory(mosquitto, small_resnet18):
    before = set(Path(tempfile.gettempdir()).glob("splitpoint-demo-*"))
    s = run_demo(
        DemoConfig(model=str(small_resnet18), network="wifi-n", requests=5, budget=4, mqtt=mosquitto),
        say=lambda *a: None,
    )
    assert set(Path(tempfile.gettempdir()).glob("splitpoint-demo-*")) == before
    assert not any(Path(p).exists() for p in s["plans"].values())


def test_demo_takes_the_input_shapes_and_samples_a_user_s_model_needs(tmp_path, mosquitto):
    """A model with a symbolic height and width: `demo --model FILE` asked for --input-shape, which demo
    did not take (a dead end), and had no --inputs. Both as `plan` takes them: the shapes fix the model,
    the samples are planned on and sent."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from .conftest import run_cli

    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["y"]),
    ]
    g = helper.make_graph(
        nodes,
        "hw",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 1, 1])],
        [w],
    )
    path = tmp_path / "hw.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    (tmp_path / "in").mkdir()
    for k in range(3):
        np.save(tmp_path / "in" / f"s{k}.npy", rng.standard_normal((1, 3, 24, 24)).astype(np.float32))
    r = run_cli(
        "demo", "--model", str(path), "--requests", "3", "--no-link-emulation", "--edge-slowdown", "1",
        "--mqtt", mosquitto, "--input-shape", "x:Nx3x24x24", "--inputs", str(tmp_path / "in"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = " ".join(r.stdout.split())
    assert f"measured on 3 inputs from {tmp_path / 'in'}" in out, out
    assert f"on 3 of the inputs from {tmp_path / 'in'}" in out, out
