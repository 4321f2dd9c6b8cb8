"""The runtime's own time per request on a device: what the edge client and a server (or relay)
spend on a request besides the model and the codec (the socket, the framing, the threads' hand-offs).

On a device kept busy by a pipeline this time competes with the model for the same CPU, so the chain's
cost model adds it to every device's stage. It is measured, not assumed: the real edge runner and a
real ``splitpoint serve``, each under the device's CPU limit, exchange requests of a plan whose model
computes nothing (one ReLU over 16 floats on each side of the cut), and each side's CPU time per
request, over its share of a CPU, is that device's time per request. On an unlimited device the CPU
time itself is the figure (one core's time).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

import onnx
import psutil
from onnx import TensorProto, helper

from splitpoint.core.graph import open_model
from splitpoint.core.onnxio import BUILT_IR_VERSION
from splitpoint.core.plandir import write_plan
from splitpoint.profiles.cpulimit import cpu_limit

from ..broker import free_port
from ..process import check_started, start_server, stop

MIB = 2**20
LARGE = MIB // 4  # floats: a cut tensor of 1 MiB


def _null_model(path: Path, n: int) -> Path:
    """``n`` floats in, a ReLU each side of the cut, the first 16 out: the cut tensor is ``n`` floats,
    the reply small, and the model's own work next to nothing."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])
    ends = [helper.make_tensor(k, TensorProto.INT64, [1], [v]) for k, v in (("s0", 0), ("s1", 16), ("ax", 1))]
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("Slice", ["b", "s0", "s1", "ax"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "null", [x], [y], initializer=ends)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=BUILT_IR_VERSION)
    onnx.save_model(model, str(path))
    return path


def runtime_cost(limit: float | None, window: int = 4, requests: int = 400) -> dict[str, dict[str, float]]:
    """The runtime's time per request on a device with ``limit`` CPUs (None: no limit), as an edge and
    as a server: ``{"ms": {"edge", "server"}, "ms_per_mib": {"edge", "server"}}``, the fixed part from
    a cut tensor of 16 floats and the part per MiB of cut tensor sent (edge) or received (server) from
    one of 1 MiB, each over up to ``requests`` requests ``window`` at a time (and one at a time)."""
    small = _probe(limit, 16, window, requests)
    large = _probe(limit, LARGE, window, max(50, requests // 4))
    return {
        "ms": small,
        "ms_per_mib": {k: max(0.0, (large[k] - small[k]) / ((LARGE - 16) * 4 / MIB)) for k in small},
    }


def _probe(limit: float | None, n: int, window: int, requests: int) -> dict[str, float]:
    from .run import _inputs_file, run_edge

    cfg = SimpleNamespace(seconds=1.0, min_requests=min(50, requests), max_requests=requests)
    share = limit if limit else 1.0
    with tempfile.TemporaryDirectory(prefix="splitpoint-runtime-") as tmp:
        work = Path(tmp)
        h = open_model(_null_model(work / "null.onnx", n))
        serve = work / "plans"
        write_plan(h, serve / "null", cut=h.cuts()[0], codec="float32")
        inputs = work / "inputs.npz"
        _inputs_file(h, 4, inputs)
        bind = f"tcp://127.0.0.1:{free_port()}"
        srv = start_server(bind, serve)
        with contextlib.ExitStack() as stack:
            stack.callback(stop, srv)
            stack.enter_context(cpu_limit(limit, pid=srv.pid))
            check_started([srv])
            out = work / "edge.json"
            plans = [[str(serve / "null"), window]]
            # a few requests first warm the server up (its imports and sessions are not a request's cost)
            warm = SimpleNamespace(seconds=0.0, min_requests=5, max_requests=5)
            run_edge([], plans, bind, inputs, out, warm, limit, "the runtime probe")
            proc = psutil.Process(srv.pid)
            before = proc.cpu_times()
            run_edge([], plans, bind, inputs, out, cfg, limit, "the runtime probe")
            after = proc.cpu_times()
        r = json.loads(out.read_text(encoding="utf-8"))["results"][str(serve / "null")]
        if "error" in r:
            raise RuntimeError(f"the runtime probe failed: {r['error']}")
        n_req = r["requests_sequential"] + r["requests_pipelined"] + 1  # and the warm-up request
        server_cpu_ms = 1e3 * ((after.user - before.user) + (after.system - before.system)) / n_req
        return {"edge": r["edge_cpu_ms_per_request_pipelined"] / share, "server": server_cpu_ms / share}
