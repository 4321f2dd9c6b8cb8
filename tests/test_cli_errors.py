"""Every error a user can cause on the command line is one line naming the problem, exit status 2,
within seconds, and no traceback: bad endpoints, busy ports, unreachable brokers, missing files,
out-of-range options, missing optional packages. And `edge run --inputs` exits 1 unless every input
got an answer."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from splitpoint.app.broker import free_port
from splitpoint.core.graph import open_model
from splitpoint.core.plan import EDGE_ONLY
from splitpoint.core.plandir import write_plan

from .conftest import run_cli

SECONDS = 5.0  # the issue's bound for a user error, python start-up included


def _cpu() -> float:
    """CPU seconds of this process's finished children: the work a command did before its error, which
    other jobs on a shared machine do not stretch as they stretch wall time (5.4 s of wall for a 2 s
    refusal, with two other jobs on two cores)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@pytest.fixture(scope="module")
def plan_dir(tmp_path_factory, small_resnet18):
    d = tmp_path_factory.mktemp("cli-errors")
    h = open_model(small_resnet18)
    write_plan(h, d / "plan", cut=h.cuts()[10])
    inputs = d / "inputs"
    inputs.mkdir()
    for k in range(3):
        np.save(
            inputs / f"x{k}.npy", np.random.default_rng(k).standard_normal((3, 64, 64)).astype(np.float32)
        )
    return d


def _one_line_error(proc, needle: str, started: float) -> None:
    elapsed = _cpu() - started
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and needle in lines[0], (needle, lines[0])
    assert elapsed < SECONDS, f"took {elapsed:.1f} s of CPU"


def _busy_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


@pytest.mark.parametrize(
    "args, needle",
    [
        (["serve", "--bind", "127.0.0.1:5599"], "has no scheme; write tcp://127.0.0.1:5599"),
        (["serve", "--bind", "/tmp/sp.sock"], "has no scheme; write ipc:///tmp/sp.sock for a local socket"),
        (["serve", "--bind", "udp://127.0.0.1:5599"], "is not tcp://HOST:PORT"),
        (["serve", "--bind", "tcp://0.0.0.0:5599"], "give this server CurveZMQ keys"),
        (["serve", "--workers", "0"], "--workers: Input should be greater than or equal to 1"),
        (["serve", "--curve-secret", "/nonexistent/server.key"], "cannot read secret key"),
        (["status", "--mqtt", f"mqtt://127.0.0.1:{free_port()}"], "cannot reach the MQTT broker"),
        (
            ["watch", "--mqtt", f"mqtt://127.0.0.1:{free_port()}", "--seconds", "1"],
            "cannot reach the MQTT broker",
        ),
        (["status", "--mqtt", "http://127.0.0.1:1883"], "MQTT URL must be mqtt://"),
        (["keygen", "/nonexistent/dir/key"], "does not exist; create it first"),
        (["keygen", "/etc/hostname/key"], "/etc/hostname is a file, not a directory"),
        (["relay", "/nonexistent", "--stage", "1", "--next", "tcp://127.0.0.1:5"], "holds no plan"),
        (
            [
                "relay",
                "--plans",
                "/tmp",
                "--stage",
                "1",
                "--next",
                "tcp://127.0.0.1:5",
                "--listen",
                "127.0.0.1:9",
            ],
            "invalid relay options: --listen: ",  # the relay's own names, not serve's --bind
        ),
        (["serve", "--stage", "1"], "is a middle stage and forwards its cut tensor: give --next"),
        (["serve", "--stage", "0", "--next", "tcp://127.0.0.1:5"], "--stage 0 is the edge's"),
        (
            ["serve", "--stage", "1", "--next", "tcp://127.0.0.1:5599", "--bind", "tcp://127.0.0.1:5599"],
            "is this relay's own address",
        ),
        (["split", "mobilenetv2", "--cut", "6", "--codec", "bogus", "-o", "/tmp/x"], "unknown codec 'bogus'"),
        (["profile", "/nonexistent/model.onnx"], "model file not found"),
        (["profile", "resnet18", "--cpus", "0.5", "--emulate-slowdown", "4"], "not both"),
        (["cuts", "no-such-model"], "neither a file nor a zoo model"),
        (["split", "resnet18", "-o", "/tmp/x"], "Missing option '--cut'"),
        (["split", "resnet18", "--cut", "99999", "-o", "/tmp/x"], "cut index 99999 does not exist"),
        (["demo", "--requests", "0"], "--requests: Input should be greater than or equal to 1"),
        (["bench", "--networks", "nope"], "no network profile named 'nope'"),
        (["bench", "--networks", "lte,wifi-n,lte"], "lte given twice"),
        (["bench", "--rate", "5", "--networks", "lte"], "--rate is the arrival rate of a trace"),
        (["bench", "--networks", "lte", "-o", "/etc/hostname"], "-o /etc/hostname: not a directory"),
        (["bench", "--networks", "lte", "-o", "/etc/hostname/x"], "/etc/hostname is a file"),
        (
            ["bench", "--models", "mobilenetv2", "--networks", "lte", "--input-shape", "nosuch:1x3x224x224"],
            "--input-shape names 'nosuch': no model of --models has such an input",
        ),
        (  # the model whose input the shape contradicts is named: it applies to every model with that input
            ["bench", "--models", "mobilenetv2", "--networks", "lte", "--input-shape", "input:1x3x224x9"],
            "mobilenetv2: input 'input' has dimension 3 fixed at 224",
        ),
        (
            ["status", "--mqtt", "mqtt://127.0.0.1:1", "--seconds", "nan"],
            "--seconds must be a number of seconds",
        ),
        (["watch", "--mqtt", "mqtt://127.0.0.1:1", "--seconds", "-1"], "0 or more (until Ctrl-C)"),
        (["deploy", "/x", "--server", "tcp://127.0.0.1:5", "--timeout", "1e12"], "at most a year"),
        (["edge", "run", "/x", "--listen", "ipc:///tmp/x", "--timeout", "inf"], "should be a finite number"),
        (["demo", "--mqtt", "http://x"], "MQTT URL must be mqtt://"),
        (["demo", "--mqtt", f"mqtt://127.0.0.1:{free_port()}"], "cannot reach the MQTT broker"),
        (
            ["deploy", "/nonexistent/plan", "--server", "tcp://127.0.0.1:5599"],
            "/nonexistent/plan does not exist: give a plan's directory",
        ),
        (["deploy", "/nonexistent/plan", "--server", "127.0.0.1:5599"], "has no scheme"),
        (["no-such-command"], "No such command"),
        (["split", "resnet18", "--cut", ",", "-o", "/tmp/x"], "--cut is empty"),
        (["fidelity", "resnet18", "--cut", "4", "--random", "0"], "--random must be at least 1"),
        (["keygen", ""], "NAME is empty"),
        (
            ["deploy", "/x", "--server", "tcp://127.0.0.1:5", "--curve-secret", "/x/orch.key"],
            "without --curve-server-key (the server's public key) the connection is not encrypted",
        ),
        (
            ["edge", "run", "/x", "--listen", "ipc:///tmp/x", "--curve-secret", "/x/pi.key"],
            "--curve-secret is this device's key for a CurveZMQ server",
        ),
        (["deploy", "/x", "--relay", "0=tcp://127.0.0.1:5"], "stage 0 is the edge's; push it with --edge"),
        (["serve", "--session-idle", "-1"], "--session-idle: Input should be greater than 0"),
        (
            ["serve", "--max-unread-replies", "0"],
            "--max-unread-replies: Input should be greater than or equal to 1",
        ),
        (["profile", "resnet18", "-o", "/tmp"], "is a directory: give the profile's file name"),
        # where the profile cannot be written is said before its minutes of measurement
        (["profile", "resnet18", "-o", "/etc/hostname/p.json"], "cannot be written: /etc/hostname is a file"),
        (["serve", "--plans", "/etc/hostname"], "is a file: give the directory the plans are kept in"),
        (["deploy", "/nonexistent/plan", "--server", "tcp://127.0.0.1:5599", "--timeout", "-1"], "--timeout"),
        (["plan-decoder", "decoder-tiny", "--max-ttft", "-1"], "--max-ttft: Input should be greater than 0"),
        (["plan-decoder", "decoder-tiny", "--codecs", ","], "--codecs is empty"),
        (["plan-decoder", "decoder-tiny", "--prompt-tokens", "0"], "--prompt-tokens: Input should be"),
        (["plan-decoder", "decoder-tiny", "--head-weights", "int3"], "--head-weights: float32 and/or int4"),
        # a taken output directory is refused before the measurements it would have lost
        (["plan-decoder", "decoder-tiny", "-o", "/etc"], "output directory /etc is not empty"),
        (["split-decoder", "decoder-tiny", "--edge-layers", "1", "-o", "/etc"], "/etc is not empty"),
        (["split", "resnet18", "--cut", "3", "-o", "/etc"], "output directory /etc is not empty"),
        (
            ["plan", "resnet18", "--edge-profile", "e.json", "--server-profile", "s.json"]
            + ["--network", "lte", "-o", "/etc"],
            "output directory /etc is not empty",
        ),
        (
            ["plan-chain", "resnet18", "--devices", "a,b", "--profile", "a=x.json", "--profile", "b=y.json"]
            + ["--networks", "lte", "-o", "/etc", "--force"],
            "/etc holds files that are not a plan",
        ),
        (
            ["split-decoder", "decoder-tiny", "--edge-layers", "2", "--max-len", "100", "-o", "/tmp/x"],
            "--max-len is for exported decoders",
        ),
        (["profile", "resnet18", "--cpus", "1000"], "more than this machine's"),
        # -o over the model being profiled (or any other file) replaced it with the profile
        (["profile", "resnet18", "-o", "/etc/hostname"], "exists and is not a profile"),
        (["profile", "resnet18", "-o", "/dev/null"], "exists and is not a regular file"),
        (["serve", "--plans", "/tmp", "--max-message-mb", "nan"], "--max-message-mb"),
        (["serve", "--plans", "/tmp", "--max-message-mb", "inf"], "--max-message-mb"),
        (
            [
                "edge",
                "run",
                "/tmp",
                "--server",
                "tcp://127.0.0.1:5",
                "--inputs",
                "/tmp",
                "--max-message-mb",
                "nan",
            ],
            "--max-message-mb",
        ),
        (
            ["plan-chain", "resnet18", "--devices", "a,b", "--profile", "a=x.json", "--profile", "a=y.json"]
            + ["--networks", "lte"],
            "a is given twice",
        ),
        (
            ["plan-chain", "resnet18", "--devices", "a,b", "--profile", "c=x.json", "--networks", "lte"],
            "'c' is not a device of --devices",
        ),
    ],
)
def test_user_errors_are_one_line_exit_2_and_fast(args, needle):
    t0 = _cpu()
    _one_line_error(run_cli(*args, timeout=60), needle, t0)


def test_profile_output_through_a_symbolic_link_is_refused_and_both_are_kept(tmp_path):
    """The profile is written beside its name and renamed over it: through a link, the rename replaces
    the link and leaves the profile it names stale, which the user did not ask for."""
    earlier = tmp_path / "edge.json"
    earlier.write_text('{"kind": "splitpoint-profile", "earlier": true}\n')
    link = tmp_path / "latest.json"
    link.symlink_to(earlier)
    t0 = _cpu()
    _one_line_error(run_cli("profile", "resnet18", "-o", str(link), timeout=60), "is a symbolic link", t0)
    assert link.is_symlink() and os.readlink(link) == str(earlier)
    assert json.loads(earlier.read_text()) == {"kind": "splitpoint-profile", "earlier": True}


def test_a_zoo_cache_that_cannot_be_written_is_named_and_left_clean(tmp_path):
    """A full or read-only cache failed every zoo-name command with a bare 'No space left on device' (no
    path), one more partial file left in it per run."""
    (tmp_path / "file").write_text("")
    r = run_cli(
        "cuts", "mobilenetv2", env={"SPLITPOINT_CACHE": str(tmp_path / "file" / "cache")}, timeout=120
    )
    said = " ".join(r.stderr.split())
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"cannot keep the zoo model mobilenetv2 in the cache {tmp_path}/file/cache/zoo" in said, said
    assert "set SPLITPOINT_CACHE" in said and "free space" not in said  # the space is not what is wrong
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_busy_port_is_one_line(tmp_path):
    with _busy_port() as s:
        port = s.getsockname()[1]
        t0 = _cpu()
        proc = run_cli("serve", "--bind", f"tcp://127.0.0.1:{port}", "--plans", str(tmp_path), timeout=60)
    _one_line_error(proc, "Address already in use", t0)


def test_edge_endpoint_and_plan_errors_are_one_line(plan_dir):
    for args, needle in [
        (["--server", "127.0.0.1:5599", "--inputs", str(plan_dir / "inputs")], "has no scheme"),
        (["--listen", "tcp://0.0.0.0:7777"], "lets other machines deploy models to this device"),
        (["--server", "tcp://127.0.0.1:1"], "give --inputs DIR and/or --listen ENDPOINT"),
    ]:
        t0 = _cpu()
        _one_line_error(run_cli("edge", "run", str(plan_dir / "plan"), *args, timeout=60), needle, t0)
    t0 = _cpu()
    proc = run_cli("edge", "run", "/nonexistent/plan", "--inputs", str(plan_dir / "inputs"), timeout=60)
    _one_line_error(proc, "plan directory /nonexistent/plan does not exist", t0)
    t0 = _cpu()  # the folder of plans, not a plan: one of them is named
    proc = run_cli("edge", "run", str(plan_dir), "--listen", f"ipc://{plan_dir}/e.sock", timeout=60)
    _one_line_error(
        proc, f"{plan_dir} is a folder of plans, not one plan: give one of them, e.g. {plan_dir / 'plan'}", t0
    )


def test_plan_options_are_checked_before_any_work(tmp_path):
    t0 = _cpu()
    proc = run_cli(
        "plan",
        "resnet18",
        "--edge-profile",
        "e.json",
        "--server-profile",
        "s.json",
        "--network",
        "lte",
        "--min-fidelity",
        "1.5",
        timeout=60,
    )
    _one_line_error(proc, "--min-fidelity: Input should be less than or equal to 1", t0)


def test_plot_without_matplotlib_fails_before_any_work(tmp_path):
    """A folder that shadows matplotlib with a package that fails to import stands in for a machine
    where it is not installed."""
    fake = tmp_path / "site" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('matplotlib is not installed here')\n")
    env = {**os.environ, "PYTHONPATH": f"{fake.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    import subprocess

    t0 = _cpu()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "splitpoint.app",
            "plan",
            "resnet18",
            "--edge-profile",
            "e.json",
            "--server-profile",
            "s.json",
            "--network",
            "lte",
            "--plot",
            str(tmp_path / "f.png"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    _one_line_error(proc, "--plot needs matplotlib, which does not import here", t0)


def test_edge_run_exits_1_unless_every_input_is_answered(plan_dir, tmp_path):
    # no server, no fallback model: every input fails explicitly, and the exit status says so
    proc = run_cli(
        "edge",
        "run",
        str(plan_dir / "plan"),
        "--server",
        f"tcp://127.0.0.1:{free_port()}",
        "--inputs",
        str(plan_dir / "inputs"),
        "--timeout",
        "1",
        "--quiet",
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert (
        "0 split, 0 local fallback, 3 errors" in proc.stdout and "3 of 3 inputs got no answer" in proc.stderr
    )
    assert "Traceback" not in proc.stderr


def test_a_model_that_cannot_run_at_the_given_shapes_is_one_line(tmp_path):
    """An export that baked a traced shape into a Reshape runs at that shape only: onnxruntime's refusal at
    another is reported as the model's, on one line, not as a traceback."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Reshape", ["r", "shape"], ["y"])],
        "baked",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 2])],
        [numpy_helper.from_array(np.array([1, 2, 2], np.int64), "shape")],
    )
    model = tmp_path / "baked.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    assert (
        run_cli("profile", str(model), "--input-shape", "x:1x4", "-o", str(tmp_path / "ok.json")).returncode
        == 0
    )
    started = _cpu()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    os.environ["TMPDIR"], before = str(tmp), os.environ.get("TMPDIR")
    try:
        proc = run_cli("profile", str(model), "--input-shape", "x:1x6", "-o", str(tmp_path / "p.json"))
    finally:
        os.environ.pop("TMPDIR") if before is None else os.environ.__setitem__("TMPDIR", before)
    _one_line_error(proc, "onnxruntime could not run the model at these input shapes", started)
    assert not (tmp_path / "p.json").exists()
    # onnxruntime's profiling trace of the failed runs is gone too
    assert not [p.name for p in tmp.iterdir() if p.name.startswith("splitpoint")]


def test_edge_messages_say_what_happened(small_resnet18, tmp_path):
    """A dead server with fallback switched off names the switch (not a missing model); an input of another
    shape names the shape the plan takes; an edge-only plan's answers are not counted as splits."""
    from splitpoint.edge.client import EdgeClient, EdgeError
    from splitpoint.edge.config import EdgeConfig

    h = open_model(small_resnet18)
    write_plan(h, tmp_path / "full", cut=h.cuts()[10], include_full=True)
    write_plan(h, tmp_path / "bare", cut=h.cuts()[10])
    dead = f"tcp://127.0.0.1:{free_port()}"
    x = {"input": np.zeros((1, 3, 64, 64), np.float32)}
    for plan, fallback, needle in [
        ("full", False, "local fallback is off (--no-fallback)"),
        ("bare", True, "the plan ships no full model to fall back on"),
    ]:
        with EdgeClient(
            EdgeConfig(plan_dir=tmp_path / plan, server=dead, fallback=fallback, timeout_s=1)
        ) as c:
            with pytest.raises(EdgeError, match=re.escape(needle)):
                c.infer(x, timeout=10)
            with pytest.raises(
                EdgeError, match=r"model input input: shape \[1, 3, 32, 32\], the plan expects"
            ):
                c.infer({"input": np.zeros((1, 3, 32, 32), np.float32)}, timeout=10)
            with pytest.raises(EdgeError, match="dtype float64, the plan expects float32"):
                c.infer({"input": np.zeros((1, 3, 64, 64))}, timeout=10)
    write_plan(h, tmp_path / "local", kind=EDGE_ONLY)
    inputs = tmp_path / "in"
    inputs.mkdir()
    np.save(inputs / "a.npy", x["input"])
    proc = run_cli(
        "edge", "run", str(tmp_path / "local"), "--server", dead, "--inputs", str(inputs), timeout=120
    )
    assert proc.returncode == 0 and "1 run on the edge (edge-only plan), 0 errors" in proc.stdout, proc.stdout


def test_a_write_the_machine_refuses_is_one_line_and_leaves_nothing_half_written(tmp_path, small_resnet18):
    """A file-size limit stands in for a full disk (Python ignores SIGXFSZ, so the write fails with
    EFBIG as it would with ENOSPC): the plan's files go to a temporary name first, and the error is one
    line, with the runtime-failure exit status."""
    import resource
    import subprocess

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    out = tmp_path / "plan"
    r = subprocess.run(
        [sys.executable, "-m", "splitpoint.app", "split", str(small_resnet18), "--cut", "10", "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "File too large" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name != "plan"]


def test_bad_files_and_names_in_the_way_are_one_line(plan_dir, tmp_path, small_resnet18):
    """A corrupt .npy among the inputs, one plan's directory given as the server's plans directory, a plan
    whose fallback model was not copied, and directories in the working directory named like a zoo model
    and a network profile (a plan written with -o lte hid the built-in profile)."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.npy").write_bytes(b"not an array")
    t0 = _cpu()
    r = run_cli("fidelity", str(small_resnet18), "--cut", "4", "--inputs", str(bad), timeout=60)
    _one_line_error(r, "a.npy: not a readable", t0)
    t0 = _cpu()
    r = run_cli("serve", "--plans", str(plan_dir / "plan"), timeout=60)
    _one_line_error(r, "is one plan's directory", t0)
    assert "PosixPath" not in r.stderr and "(got '" in r.stderr, r.stderr  # the path as typed
    h = open_model(small_resnet18)
    no_full = tmp_path / "no-full"
    write_plan(h, no_full, cut=h.cuts()[10], include_full=True)
    (no_full / "full.onnx").unlink()
    t0 = _cpu()
    server = f"tcp://127.0.0.1:{free_port()}"
    r = run_cli("edge", "run", str(no_full), "--server", server, "--inputs", str(bad), timeout=60)
    _one_line_error(r, "lists full.onnx (its model for falling back) but the file is missing", t0)
    (tmp_path / "resnet18").mkdir()
    (tmp_path / "lte").mkdir()
    r = run_cli("cuts", "resnet18", "--json", timeout=300, cwd=tmp_path)
    assert r.returncode == 0 and '"cuts"' in r.stdout, r.stderr
    from splitpoint.profiles.schema import load_network

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert load_network("lte").uplink_mbps == pytest.approx(5.85)
    finally:
        os.chdir(cwd)


def test_a_boolean_where_a_number_belongs_is_refused_in_hand_written_files(tmp_path):
    """pydantic reads `true` as 1.0: `uplink_mbps: true` planned a 1 Mbit/s link without a word."""
    from splitpoint.core.errors import ProfileError
    from splitpoint.profiles.schema import load_network

    f = tmp_path / "net.yaml"
    f.write_text("name: x\nuplink_mbps: true\ndownlink_mbps: 10\nrtt_ms: 20\njitter_ms: 1\nloss: 0\n")
    with pytest.raises(ProfileError, match="uplink_mbps is true, a boolean where a number belongs"):
        load_network(f)
    f.write_text("name: x\nuplink_mbps: 1\ndownlink_mbps: 10\nrtt_ms: 20\njitter_ms: 1\nloss: 0\n")
    assert load_network(f).uplink_mbps == 1.0


def test_a_key_given_twice_in_a_hand_written_file_is_refused_with_both_lines(tmp_path):
    """YAML and JSON parsers keep the last of two equal keys: a network file that says uplink_mbps twice
    planned at the second without a word. Each file a user writes names the key and where."""
    from splitpoint.app.bench.trace import load_trace
    from splitpoint.core.errors import PlanError, ProfileError, SplitPointError
    from splitpoint.core.plan import json_object
    from splitpoint.profiles.schema import load_measured, load_network

    net = tmp_path / "net.yaml"
    net.write_text("name: x\nuplink_mbps: 50\ndownlink_mbps: 10\nrtt_ms: 20\nuplink_mbps: 5\n")
    with pytest.raises(ProfileError, match="duplicate key 'uplink_mbps' on lines 2 and 5"):
        load_network(net)
    trace = tmp_path / "trace.yaml"
    trace.write_text("- network: lte\n  seconds: 20\n  seconds: 2\n")
    with pytest.raises(SplitPointError, match="duplicate key 'seconds' on lines 2 and 3"):
        load_trace(trace)
    prof = tmp_path / "p.json"
    prof.write_text('{"role": "edge", "role": "server"}')
    with pytest.raises(ProfileError, match="duplicate key 'role'"):
        load_measured(prof)
    prof.write_text('{"role": "edge", "whole": {"median_ms": NaN}}')
    with pytest.raises(ProfileError, match="NaN is not a JSON value"):
        load_measured(prof)
    with pytest.raises(PlanError, match="duplicate key 'plan_id'"):
        json_object(b'{"plan_id": "a", "plan_id": "b"}', "plan.json", "plan")
    # Python's json reads NaN and Infinity, which JSON has not: a pushed plan carried them into its id
    for token in ("NaN", "Infinity", "-Infinity"):
        with pytest.raises(PlanError, match=f"{token} is not a JSON value"):
            json_object(b'{"predicted": {"latency_ms": ' + token.encode() + b"}}", "plan.json", "plan")
    # YAML's merge keys stay what they are: later keys override the merged ones
    from splitpoint.core.textfiles import load_yaml

    assert load_yaml("b: &b {x: 1, y: 2}\nc:\n  <<: *b\n  x: 3\n")["c"] == {"x": 3, "y": 2}
    t0 = _cpu()
    net.write_text("name: x\nuplink_mbps: 50\ndownlink_mbps: 10\nrtt_ms: 20\nuplink_mbps: 5\n")
    r = run_cli("bench", "--networks", str(net), "-o", str(tmp_path / "b"), timeout=60)
    _one_line_error(r, "duplicate key 'uplink_mbps' on lines 2 and 5", t0)


def test_a_plot_format_matplotlib_cannot_write_is_refused_before_the_plan_is_written(tmp_path):
    t0 = _cpu()
    out = tmp_path / "plan"
    r = run_cli(
        "plan", "resnet18", "--edge-profile", "e.json", "--server-profile", "s.json", "--network", "lte",
        "--plot", str(tmp_path / "front.txt"), "-o", str(out), timeout=60,
    )  # fmt: skip
    _one_line_error(r, "--plot", t0)
    assert "front.txt: name a file ending in" in r.stderr and not out.exists()


def test_a_plot_path_under_a_file_is_refused_before_the_plan_is_written(tmp_path):
    t0 = _cpu()
    (tmp_path / "notes").write_text("a file, not a directory")
    out = tmp_path / "plan"
    r = run_cli(
        "plan", "resnet18", "--edge-profile", "e.json", "--server-profile", "s.json", "--network", "lte",
        "--plot", str(tmp_path / "notes" / "front.png"), "-o", str(out), timeout=60,
    )  # fmt: skip
    _one_line_error(r, f"{tmp_path / 'notes'} is a file", t0)
    assert not out.exists()


def test_an_input_shape_larger_than_memory_is_one_line(tmp_path):
    """numpy's MemoryError names the size it wanted; the user is pointed at the option that asked for it."""
    t0 = _cpu()
    out = tmp_path / "p.json"
    r = run_cli(
        "profile", "resnet18", "--input-shape", "input:100000000x3x224x224", "-o", str(out), timeout=60
    )
    _one_line_error(r, "not enough memory", t0)
    assert "--input-shape" in r.stderr and "TiB" in r.stderr and not out.exists()


def test_a_failed_calibration_says_why_in_one_line():
    """Calibration runs in a process of its own; its failure is reported by that process's last line (the
    reason), not as the whole traceback."""
    from splitpoint.app.bench.edgecpu import calibrate_apart
    from splitpoint.core.errors import SplitPointError
    from splitpoint.profiles.schema import DeviceSpec

    spec = DeviceSpec(
        name="odd-board", role="edge", cpu="none", cores=1, clock_ghz=1.0, memory_gb=1.0, thermal_limit_c=80,
        reference_latency_ms={"no-such-model": 10.0},
    )  # fmt: skip
    with pytest.raises(SplitPointError) as caught:
        calibrate_apart(spec)
    text = str(caught.value)
    assert text.startswith("calibrating odd-board failed: ")
    assert "has no reference latency for a zoo model" in text and "no-such-model" in text
    assert "Traceback" not in text and "\n" not in text


def test_a_bench_output_directory_is_claimed_for_the_run(tmp_path):
    """Two benches given one -o both said they succeeded, and the second's results replaced the first's:
    the directory is locked for a run, and one the run created is removed if it stays empty."""
    from splitpoint.app.bench.outdir import LOCK, claimed_output
    from splitpoint.core.errors import OutputExistsError

    out = tmp_path / "results"
    with claimed_output(out):
        assert (out / LOCK).read_text() == str(os.getpid())
        with (
            pytest.raises(OutputExistsError, match=f"another bench \\(pid {os.getpid()}\\) is writing"),
            claimed_output(out),
        ):
            pass
        r = run_cli("bench", "--networks", "lte", "--models", "mobilenetv2", "-o", str(out), timeout=60)
        assert r.returncode == 2 and "another bench" in r.stderr
    assert not out.exists()  # made for a run that wrote nothing
    out.mkdir()
    (out / "report.md").write_text("an earlier run")
    with claimed_output(out):
        pass
    assert sorted(p.name for p in out.iterdir()) == ["report.md"]


def test_a_folder_run_answers_each_file_on_its_own_and_refuses_clashing_names(plan_dir, tmp_path):
    """An empty .npy ended a whole run as 'interrupted' with no answer written; x.npy and x.npz both wrote
    x.npz, the second over the first. Now the empty file is that file's error, every other one is
    answered (written whole, as it comes), and clashing names are refused before anything runs."""
    import shutil

    from splitpoint.server.config import ServerConfig
    from splitpoint.server.tail_server import TailServer

    inputs = tmp_path / "in"
    shutil.copytree(plan_dir / "inputs", inputs)
    (inputs / "empty.npy").write_bytes(b"")
    srv = TailServer(ServerConfig(bind="tcp://127.0.0.1:0", plans_dir=None)).start()
    srv.registry.add_dir(plan_dir / "plan")
    assert srv.endpoint is not None
    try:
        out = tmp_path / "answers"
        args = ["edge", "run", str(plan_dir / "plan"), "--server", srv.endpoint, "--inputs", str(inputs)]
        proc = run_cli(*args, "--outputs", str(out), "--quiet", timeout=120)
        assert proc.returncode == 1 and "empty.npy" in proc.stderr and "interrupted" not in proc.stderr
        assert "3 split" in proc.stdout and "1 of 4 inputs got no answer" in proc.stderr, proc.stderr
        assert sorted(p.name for p in out.iterdir()) == ["x0.npz", "x1.npz", "x2.npz"]  # no temporary left
        with np.load(out / "x0.npz") as z:
            assert "fallback" in z.files and not bool(z["fallback"])
        np.savez(inputs / "x1.npz", input=np.zeros((3, 64, 64), np.float32))
        t0 = _cpu()
        clash = run_cli(*args, "--outputs", str(tmp_path / "again"), "--quiet", timeout=60)
        _one_line_error(clash, "x1.npy and x1.npz would both be answered in x1.npz", t0)
    finally:
        srv.stop()


def test_an_answer_is_written_whole_whatever_its_outputs_are_called(tmp_path):
    """np.savez takes array names as keyword arguments: a model output named 'file' or 'fallback' clashed
    with its own and the run died with a traceback."""
    from splitpoint.edge.daemon import write_answer

    path = tmp_path / "a.npz"
    write_answer(path, {"file": np.arange(3), "fallback": np.ones(2, np.float32)}, True)
    with np.load(path) as z:
        assert sorted(z.files) == ["fallback", "file", "splitpoint_fallback"]
        assert z["file"].tolist() == [0, 1, 2] and bool(z["splitpoint_fallback"])
    assert [p.name for p in tmp_path.iterdir()] == ["a.npz"]
    # outputs named as the flag's first two choices: both kept, the flag under the next free name
    taken = {"fallback": np.zeros(1), "splitpoint_fallback": np.array([1.5, 2.7])}
    write_answer(path, taken, False)
    with np.load(path) as z:
        assert sorted(z.files) == ["fallback", "splitpoint_fallback", "splitpoint_fallback_3"]
        assert z["splitpoint_fallback"].tolist() == [1.5, 2.7] and not bool(z["splitpoint_fallback_3"])


def test_key_files_of_the_wrong_kind_or_open_to_others_are_refused(tmp_path):
    """A server given its .pub as its secret ran with a key anyone could read; a secret key at mode 644
    and a .key file on an allow-list were taken silently; a non-z85 character was a ZMQError traceback."""
    from splitpoint.core.curve import keygen, keypair_from_secret, read_public, read_secret
    from splitpoint.core.errors import ConfigError

    key, pub = keygen(tmp_path / "server")
    public, secret = keypair_from_secret(key)
    assert read_public(pub) == public and read_secret(key) == secret
    with pytest.raises(ConfigError, match=r"a \.pub file is a public key.*give the secret key, server\.key"):
        read_secret(pub)
    with pytest.raises(ConfigError, match=r"a \.key file is a secret key.*server\.pub"):
        read_public(key)
    key.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by other users.*chmod 600"):
        read_secret(key)
    bad = tmp_path / "bad.pub"
    bad.write_text("~" * 40)
    with pytest.raises(ConfigError, match="character 1 is not one z85 uses"):
        read_public(bad)
    r = run_cli("serve", "--curve-secret", str(pub), timeout=60)
    assert r.returncode == 2 and "a .pub file is a public key" in r.stderr and "Traceback" not in r.stderr
    # a typo that keeps to z85's characters: '$' opening a group of five overflows it (a ZMQError
    # traceback from the socket, or on an allow-list a key that silently matched nobody)
    typo = tmp_path / "typo.pub"
    typo.write_bytes(b"$" + pub.read_bytes().strip()[1:])
    with pytest.raises(ConfigError, match="it does not decode: a character mistyped"):
        read_public(typo)
    r = run_cli("deploy", str(tmp_path), "--server", "tcp://127.0.0.1:9", "--curve-server-key", str(typo))
    assert r.returncode == 2 and "does not decode" in r.stderr and "Traceback" not in r.stderr, r.stderr
    with pytest.raises(ConfigError, match="is a directory"):
        read_secret(tmp_path)
    # the name as given: two devices called pi.kitchen and pi.garage are two key pairs, not one pi.key
    a, _ = keygen(tmp_path / "pi.kitchen")
    b, _ = keygen(tmp_path / "pi.garage")
    assert (a.name, b.name) == ("pi.kitchen.key", "pi.garage.key")
    c, d = keygen(tmp_path / "edge.key")  # a suffix typed with the name is the pair's own
    assert (c.name, d.name) == ("edge.key", "edge.pub")


def test_a_broker_password_is_never_printed_and_may_hold_any_character():
    """A malformed --mqtt URL was echoed whole, password included, into errors (and the journal); a
    password with '/', '#' or '?' could not be given at all (percent-encoding was sent as typed)."""
    from splitpoint.core.telemetry import BrokerURL

    for url in (
        "mqtt://tele:S3cr3tPw!x@127.0.0.1:99999",
        "mqtt://tele:S3cr3tPw/x@127.0.0.1:1883",  # urllib's own error quoted what followed the ':'
        "tele:S3cr3tPw@127.0.0.1:99999",  # no scheme: the config's (got ...) showed it whole
        "mqtt://tele:S3cr3tPw@[::1:1883",  # an unclosed IPv6 host: a traceback
    ):
        for cmd in (["status", "--mqtt", url], ["serve", "--mqtt", url]):
            r = run_cli(*cmd, timeout=60)
            out = r.stderr + r.stdout
            assert r.returncode == 2 and "S3cr3tPw" not in out and "Traceback" not in out, out
            assert "tele:***@" in r.stderr, r.stderr
    url = BrokerURL.parse("mqtt://tele2:p%40ss%2Fw%23rd@127.0.0.1:18991")
    assert (url.username, url.password, url.port) == ("tele2", "p@ss/w#rd", 18991)


def test_a_plan_json_with_a_huge_integer_is_a_plan_error():
    """json refuses integers past 4,300 digits with a ValueError that is no JSONDecodeError: a deploy
    carrying one was answered `internal`, with a traceback in the server's log."""
    from splitpoint.core.errors import PlanError
    from splitpoint.core.plan import Plan

    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.parse(b'{"x": ' + b"9" * 5000 + b"}", "pushed plan.json")


def test_a_flood_of_refused_keys_is_no_flood_of_log_lines(caplog):
    """One line per refused key a minute let a client making a new key per connection write a line per
    attempt (500 in 3 s): at most 10 a minute in all, and the rest counted once the minute is over."""
    import logging

    import zmq

    from splitpoint.server.tail_server import REFUSED_LINES, _AllowList

    allow = _AllowList([zmq.curve_keypair()[0]])
    caplog.set_level(logging.WARNING, logger="splitpoint.server")
    for k in range(500):
        allow._say_refused(f"{k:040d}".encode(), 1000.0 + k * 0.001)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == REFUSED_LINES and all("is not on --curve-allow" in m for m in lines), lines
    allow._say_refused(b"x" * 40, 1061.0)  # the next minute: what went unsaid is counted
    assert "490 more connection(s) refused in the last minute" in caplog.records[-2].getMessage()


def test_every_command_s_help_is_readable_at_80_columns():
    """A terminal of 80 columns (and any pipe, which rich treats so) shows every option's name, metavar
    and help whole: no name or default cut to an ellipsis, as a second column of --no-FLAG names did."""
    from typer.testing import CliRunner

    from splitpoint.app.cli import app

    commands = [[c.name or c.callback.__name__] for c in app.registered_commands if c.callback is not None]
    commands += [
        ["edge", c.name or c.callback.__name__]
        for g in app.registered_groups
        for c in (g.typer_instance.registered_commands if g.typer_instance else [])
        if c.callback is not None
    ]
    assert len(commands) >= 15
    runner = CliRunner()
    for name in commands:
        result = runner.invoke(app, [*name, "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
        assert result.exit_code == 0, (name, result.output)
        lines = result.output.splitlines()
        assert max(len(line) for line in lines) <= 80, name
        assert not [line for line in lines if "…" in line], (name, result.output)
        # a flag takes no value, and its help shows none: `--force <bool>` reads as `--force true`
        assert "<bool>" not in result.output and "--help" in result.output, (name, result.output)


def test_a_profiling_session_left_unfinished_leaves_no_trace_file(tmp_path, small_resnet18):
    """Ctrl-C while the profiler built its session: onnxruntime wrote the session's trace into the temp
    folder when it was destroyed, after every handler ran, and it stayed there."""
    code = (
        "import sys\n"
        "from splitpoint.core.runner import make_session\n"
        f"s = make_session({str(small_resnet18)!r}, enable_profiling=True)\n"
        "raise KeyboardInterrupt  # the session is never ended: destroyed at exit\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert r.returncode != 0 and "KeyboardInterrupt" in r.stderr
    assert list(tmp_path.glob("splitpoint-ort-*")) == []  # (importing onnxruntime leaves a .ses of its own)


def test_a_child_run_for_the_bench_is_stopped_cleanly_when_the_bench_is(tmp_path):
    """SIGTERM to the bench alone while it profiled in a child under a CPU limit: subprocess.run killed
    the child with SIGKILL, and its cgroup stayed behind. The child is asked to stop first."""
    child = (
        "import signal, sys, time, pathlib\n"
        f"def bye(*a):\n    pathlib.Path({str(tmp_path / 'cleaned')!r}).write_text('yes'); sys.exit(143)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        f"pathlib.Path({str(tmp_path / 'up')!r}).write_text('up')\n"
        "time.sleep(60)\n"
    )
    parent = (
        "import signal, sys\n"
        "from splitpoint.app.cli import _terminated\n"
        "from splitpoint.app.process import run_child\n"
        "signal.signal(signal.SIGTERM, _terminated)  # as main() does\n"
        f"run_child([sys.executable, '-c', {child!r}])\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", parent])
    deadline = time.monotonic() + 60
    while not (tmp_path / "up").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.terminate()
    assert proc.wait(60) == 143
    assert (tmp_path / "cleaned").read_text() == "yes"


def test_a_folder_run_stopped_by_a_signal_says_so_and_exits_as_interrupted(plan_dir, tmp_path):
    """SIGINT or SIGTERM mid-folder exited 1 with 'N of M inputs got no answer', as if the inputs had
    failed: it says it was interrupted and exits 128 + the signal, as every other command does."""
    import shutil
    import signal

    from splitpoint.server.config import ServerConfig
    from splitpoint.server.tail_server import TailServer

    inputs = tmp_path / "in"
    inputs.mkdir()
    x0 = next((plan_dir / "inputs").glob("*.npy"))
    for k in range(3000):
        shutil.copy(x0, inputs / f"x{k}.npy")
    srv = TailServer(ServerConfig(bind="tcp://127.0.0.1:0", plans_dir=None)).start()
    srv.registry.add_dir(plan_dir / "plan")
    assert srv.endpoint is not None
    out = tmp_path / "answers"
    cmd = [
        sys.executable,
        "-m",
        "splitpoint.app",
        "edge",
        "run",
        str(plan_dir / "plan"),
        "--server",
        srv.endpoint,
    ]
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            shutil.rmtree(out, ignore_errors=True)
            proc = subprocess.Popen(
                [*cmd, "--inputs", str(inputs), "--outputs", str(out), "--quiet"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            deadline = time.monotonic() + 120
            while not (out.is_dir() and any(out.iterdir())) and time.monotonic() < deadline:
                time.sleep(0.05)
            proc.send_signal(sig)
            _, errs = proc.communicate(timeout=120)
            assert proc.returncode == 128 + sig, errs
            assert "interrupted: " in errs and "of 3000 inputs got no answer" in errs, errs
    finally:
        srv.stop()


def test_ctrl_c_while_the_cli_loads_says_interrupted_without_a_traceback():
    """Ctrl-C in a command's first 0.3 s (numpy, onnx and onnxruntime being imported) printed a traceback
    from inside an import and killed the process by the signal. The signal is sent here as numpy's import
    begins, every time."""
    child = (
        "import builtins, os, signal, sys\n"
        "from splitpoint.app import launch\n"
        "real = builtins.__import__\n"
        "def spy(name, *a, **k):\n"
        "    if name == 'numpy':\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = spy\n"
        "sys.argv = ['splitpoint', 'cuts', 'alexnet']\n"
        "launch.main()\n"
    )
    r = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stderr.strip()) == (130, "interrupted"), r.stderr[-2000:]


def test_file_names_outside_utf8_and_ascii_only_terminals_get_answers_not_tracebacks(
    small_resnet18, tmp_path
):
    """A file name whose bytes are not UTF-8 (Latin-1's é) is refused by name (onnxruntime raised a
    TypeError, a plan's model name a validation error); one that is UTF-8 but read in a C locale without
    Python's UTF-8 mode is recovered and split; a non-ASCII model name printed to an ASCII-only stdout is
    escaped, where rich died mid-table."""
    import shutil

    latin = os.fsdecode(str(tmp_path).encode() + b"/lat\xe9.onnx")
    shutil.copy(small_resnet18, latin)
    r = run_cli("profile", latin, "--role", "server", "-o", str(tmp_path / "p.json"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip() == (
        f"error: the path '{tmp_path}/lat\\xe9.onnx' is not valid UTF-8, which onnxruntime needs: rename it "
        "(e.g. convmv -f latin1 -t utf8)"
    )
    assert not (tmp_path / "p.json").exists()

    named = tmp_path / "My Models" / "modèle ü.onnx"
    named.parent.mkdir()
    shutil.copy(small_resnet18, named)
    c_locale = {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": ""}
    r = run_cli("split", str(named), "--cut", "20", "-o", str(tmp_path / "pu"), env=c_locale)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "pu" / "plan.json").read_bytes())["model_name"] == "modèle ü"

    r = run_cli("cuts", str(named), env={"PYTHONIOENCODING": "ascii"})
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "mod\\xe8le \\xfc" in r.stdout


def test_an_empty_cache_variable_is_the_default_cache_not_the_working_directory(tmp_path):
    home = tmp_path / "home"
    work = tmp_path / "work"
    work.mkdir()
    r = run_cli("cuts", "alexnet", env={"SPLITPOINT_CACHE": "", "HOME": str(home)}, cwd=work)
    assert r.returncode == 0, r.stderr[-2000:]
    assert list(work.iterdir()) == [] and (home / ".cache" / "splitpoint" / "zoo").is_dir()


def test_a_name_too_long_for_its_temporary_name_is_refused_before_any_work(small_resnet18, tmp_path):
    """A 250-byte name is legal, the temporary one a write goes through beside it is not: the write failed
    after the work, naming a hidden file the user never chose."""
    long = "a" * 250
    r = run_cli("split", str(small_resnet18), "--cut", "20", "-o", str(tmp_path / long))
    assert r.returncode == 2 and "at most" in r.stderr and "temporary name" in r.stderr, r.stderr
    r = run_cli("profile", str(small_resnet18), "-o", str(tmp_path / f"{long}.json"))
    assert r.returncode == 2 and "its name is 255 bytes, and at most 245 fit here" in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []
    r = run_cli("split", str(small_resnet18), "--cut", "20", "-o", str(tmp_path / ("b" * 200)))
    assert r.returncode == 0, r.stderr  # a long name that fits with its temporary one is written


def test_a_daemon_raises_its_open_file_limit_and_says_when_it_cannot(tmp_path):
    """At a soft limit of 64 (a shell's ulimit -n), 100 local connections made libzmq abort the edge
    daemon and a TCP server spin at 100 % CPU, refusing new clients in silence."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 64:
        pytest.skip("this machine's hard limit leaves nothing to raise")
    serve = f"exec {sys.executable} -m splitpoint.app serve --plans {tmp_path} --bind tcp://127.0.0.1"
    proc = subprocess.Popen(
        ["bash", "-c", f"ulimit -Sn 64; {serve}:{free_port()}"], stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "serving" not in proc.stderr.readline():
            pass
        limits = Path(f"/proc/{proc.pid}/limits").read_text()
        soft = int(re.search(r"Max open files\s+(\d+)", limits)[1])
        assert soft == min(hard, 65536) or soft >= 65536, soft
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    low = subprocess.run(
        ["bash", "-c", f"ulimit -n 64; {serve}:1:1"], capture_output=True, text=True, timeout=60
    )
    said = low.stderr
    assert "at most 64 open files (ulimit -n, LimitNOFILE= in a systemd unit)" in said, said


def test_the_cli_names_the_zoo_s_decoders_and_builds_without_the_model_libraries():
    """`splitpoint --help` and the fleet commands start without numpy, onnx or onnxruntime (half a
    second of imports on a small board): the decoder names in split-decoder's help are spelled in the
    CLI, and must stay the zoo's."""
    from splitpoint.app.cli.decoders import DECODER_NAMES
    from splitpoint.core.zoo.decoder import DECODERS

    assert sorted(DECODER_NAMES) == sorted(DECODERS)
    code = (
        "import sys\n"
        "import splitpoint.app.cli\n"
        "print(sorted(m for m in ('numpy', 'onnx', 'onnxruntime', 'zmq') if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


def test_the_command_list_shows_each_summary_as_one_paragraph(monkeypatch):
    """`splitpoint --help` broke descriptions where the docstring's source lines ended (typer's rich mode
    keeps them in the command list): on a wide terminal each summary is one line, whole."""
    import inspect as _inspect

    import typer.rich_utils
    from typer.testing import CliRunner

    from splitpoint.app.cli import app

    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", 400)  # read from the environment once, at import
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    checked = 0
    for info in app.registered_commands:
        doc = _inspect.getdoc(info.callback) if info.callback is not None else None
        if not doc:
            continue
        summary = " ".join(doc.split("\n\n")[0].split())
        if len(summary) > 300:
            continue
        assert any(summary in line for line in lines), (info.name, summary)
        checked += 1
    assert checked >= 15


def test_json_output_is_strict_json_where_a_figure_is_not_finite(capsys):
    """fidelity --json of a model whose outputs are NaN printed its infinite max error as the bare token
    Infinity, which JSON has not: a strict parser in a user's pipeline stopped there. Every --json
    output, bench results.json and telemetry payload writes a non-finite figure as null."""
    from splitpoint.app.cli.common import _print_json
    from splitpoint.core.textfiles import dumps_strict

    _print_json({"max_abs_error": float("inf"), "snr": [float("nan"), 1.5], "n": np.float32("-inf"), "k": 3})
    out = capsys.readouterr().out

    def refuse(token):
        raise ValueError(token)

    assert json.loads(out, parse_constant=refuse) == {
        "max_abs_error": None,
        "snr": [None, 1.5],
        "n": None,
        "k": 3,
    }
    assert json.loads(dumps_strict({"a": (1.0, float("-inf"))})) == {"a": [1.0, None]}
