"""The request path against the transports SplitPoint replaces, on this machine, in one run.

Each transport carries a float32 tensor of 4 KiB, 392 KiB or 4 MiB from a client to a server in another
process and brings back a 4 KiB tensor:
- raw pyzmq (DEALER/ROUTER, zero-copy frames, nothing else): the floor;
- pickle over TCP with an 8-byte length prefix, as ParetoPipe's custom backend does;
- torch RPC (TensorPipe), when torch is installed;
- SplitPoint: EdgeClient.infer against `splitpoint serve`, on a plan whose head and tail do next to no
  compute (a Relu; a Slice), float32 codec. Its *overhead* is the round trip minus every stage it
  measures itself (head, encode, server decode, tail, server encode, reply decode); its *transport* is
  the round trip minus the model's own compute only (head and tail), so that it carries the codec's
  serialisation as the peers carry theirs (pickle, TensorPipe), and is what the peers are compared with:
  they run no model.
Transports take turns in rounds, so the machine's drift falls on all of them alike.

Then the overhead decomposition of a real split request: ResNet-18 cut where one 392 KiB tensor crosses.

Targets (issue 14): SplitPoint's overhead at window 1 ≤ 1.2x the raw pyzmq round trip of the same bytes
and ≤ 0.3 ms p50 at 392 KiB, p99 ≤ 2x p50; faster end to end than pickle/TCP and torch RPC at every size.
Run: python benchmarks/bench_transport.py [--rounds 5] [--per-round 100]
"""

from __future__ import annotations

import argparse
import os
import pickle
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from common import arguments, write_results

from splitpoint.app.bench.edgerun import STAGES

SIZES = {"4 KiB": 1024, "392 KiB": 100_352, "4 MiB": 1_048_576}  # float32 elements
REPLY = 1024  # floats back: 4 KiB
TRANSPORTS = ("raw pyzmq", "pickle/TCP", "torch RPC", "SplitPoint")


# -- servers (each its own process: python bench_transport.py --serve KIND --port P) ----------------
def serve_zmq(port: int) -> None:
    import zmq

    s = zmq.Context().socket(zmq.ROUTER)
    s.bind(f"tcp://127.0.0.1:{port}")
    reply = np.zeros(REPLY, np.float32)
    while True:
        f = s.recv_multipart(copy=False)
        s.send_multipart([f[0], b"r", reply], copy=False)


def _recv_exact(conn: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = conn.recv_into(view[got:])
        if not k:
            raise ConnectionError("closed")
        got += k
    return buf


def serve_pickle(port: int) -> None:
    srv = socket.create_server(("127.0.0.1", port))
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reply = pickle.dumps(np.zeros(REPLY, np.float32))
    while True:
        (n,) = struct.unpack("!Q", _recv_exact(conn, 8))
        pickle.loads(_recv_exact(conn, n))
        conn.sendall(struct.pack("!Q", len(reply)) + reply)


def echo_small(t):  # torch RPC's remote function: must be importable by both processes
    return t[:REPLY].clone()


def serve_torch(port: int) -> None:
    import torch.distributed.rpc as rpc

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    rpc.init_rpc("server", rank=0, world_size=2)
    rpc.shutdown()  # serves until the client shuts down too


# -- clients -----------------------------------------------------------------------------------
class ZmqClient:
    def __init__(self, port: int):
        import zmq

        self.s = zmq.Context.instance().socket(zmq.DEALER)
        self.s.connect(f"tcp://127.0.0.1:{port}")

    def __call__(self, x: np.ndarray) -> float:
        t = time.perf_counter()
        self.s.send_multipart([b"q", x], copy=False)
        self.s.recv_multipart(copy=False)
        return (time.perf_counter() - t) * 1e3


class PickleClient:
    def __init__(self, port: int):
        for _ in range(100):
            try:
                self.c = socket.create_connection(("127.0.0.1", port))
                break
            except OSError:
                time.sleep(0.05)
        self.c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def __call__(self, x: np.ndarray) -> float:
        t = time.perf_counter()
        body = pickle.dumps(x)
        self.c.sendall(struct.pack("!Q", len(body)) + body)
        (n,) = struct.unpack("!Q", _recv_exact(self.c, 8))
        pickle.loads(_recv_exact(self.c, n))
        return (time.perf_counter() - t) * 1e3


class TorchClient:
    def __init__(self, port: int):
        import torch
        import torch.distributed.rpc as rpc

        self.torch, self.rpc = torch, rpc
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        rpc.init_rpc("client", rank=1, world_size=2)
        from bench_transport import echo_small  # the same module path as the server's

        self.fn = echo_small

    def __call__(self, x: np.ndarray) -> float:
        t = time.perf_counter()
        self.rpc.rpc_sync("server", self.fn, args=(self.torch.from_numpy(x),))
        return (time.perf_counter() - t) * 1e3


class SplitPointClient:
    """EdgeClient.infer on a compute-free plan; returns the round trip and records the overhead."""

    def __init__(self, work: Path, n: int, port: int):
        from splitpoint.app.process import start_server
        from splitpoint.edge.client import EdgeClient
        from splitpoint.edge.config import EdgeConfig

        plans = work / f"plans-{n}"
        plan_dir = thin_plan(work, n, plans)
        self.srv = start_server(f"tcp://127.0.0.1:{port}", plans)
        cfg = EdgeConfig(
            plan_dir=plan_dir, server=f"tcp://127.0.0.1:{port}", fallback=False, connect_grace_s=30
        )
        self.c = EdgeClient(cfg)
        self.overheads: list[float] = []
        self.transports: list[float] = []

    def __call__(self, x: np.ndarray) -> float:
        r = self.c.infer({"x": x[None]}, timeout=60)
        b = r.breakdown
        compute = sum(
            b.get(k) or 0.0
            for k in ("head_ms", "encode_ms", "server_decode_ms", "tail_ms", "server_encode_ms", "decode_ms")
        )
        self.overheads.append(b["total_ms"] - compute)
        self.transports.append(b["total_ms"] - (b.get("head_ms") or 0.0) - (b.get("tail_ms") or 0.0))
        return b["total_ms"]

    def close(self) -> None:
        from splitpoint.app.process import stop

        self.c.close()
        stop(self.srv)


def thin_plan(work: Path, n: int, plans: Path) -> Path:
    """x[1, n] → Relu (head) → the cut → Neg, Slice to 1024 floats (tail)."""
    import onnx
    from onnx import TensorProto, helper

    from splitpoint.core.graph import open_model
    from splitpoint.core.plandir import write_plan

    consts = [
        helper.make_tensor(k, TensorProto.INT64, [1], [v]) for k, v in (("s", 0), ("e", REPLY), ("a", 1))
    ]
    g = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["cut"]),
            helper.make_node("Neg", ["cut"], ["n"]),
            helper.make_node("Slice", ["n", "s", "e", "a"], ["y"]),
        ],
        "thin",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", REPLY])],
        consts,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path = work / f"thin-{n}.onnx"
    onnx.save(m, str(path))
    h = open_model(path)
    write_plan(h, plans / "p", cut=h.cuts()[0], force=True)
    return plans / "p"


def _free_port() -> int:
    from splitpoint.app.broker import free_port

    return free_port()


def transports(work: Path, n: int) -> tuple[dict, list]:
    """A client per transport for tensors of n floats (servers started), and the processes to stop."""
    procs, clients = [], {}
    me = str(Path(__file__).resolve())
    for kind, cls in (("raw pyzmq", ZmqClient), ("pickle/TCP", PickleClient), ("torch RPC", TorchClient)):
        if kind == "torch RPC" and not _has_torch():
            continue
        port = _free_port()
        procs.append(subprocess.Popen([sys.executable, me, "--serve", kind, "--port", str(port)]))
        time.sleep(0.3)
        clients[kind] = cls(port)
    clients["SplitPoint"] = SplitPointClient(work, n, _free_port())
    return clients, procs


def _has_torch() -> bool:
    try:
        import torch.distributed.rpc as rpc

        return rpc.is_available()
    except ImportError:
        return False


def measure_sizes(rounds: int, per_round: int) -> dict:
    rows = {}
    work = Path(tempfile.mkdtemp(prefix="splitpoint-transport-"))
    for label, n in SIZES.items():  # torch RPC initialises once per process: each size runs in a child
        rows[label] = run_size_in_child(label, n, rounds, per_round, work)
        print(
            label,
            {k: f"{v['p50']:.3f}" for k, v in rows[label].items() if isinstance(v, dict) and "p50" in v},
        )
    return rows


def run_size_in_child(label: str, n: int, rounds: int, per_round: int, work: Path) -> dict:
    import json

    out = work / f"size-{n}.json"
    subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--size",
            str(n),
            "--rounds",
            str(rounds),
            "--per-round",
            str(per_round),
            "--work",
            str(work),
            "--size-out",
            str(out),
        ],
        check=True,
    )
    return json.loads(out.read_text())


def one_size(n: int, rounds: int, per_round: int, work: Path) -> dict:
    clients, procs = transports(work, n)
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    times: dict[str, list[float]] = {k: [] for k in clients}
    try:
        for c in clients.values():  # warm-up
            for _ in range(20):
                c(x)
        if isinstance(clients["SplitPoint"], SplitPointClient):
            clients["SplitPoint"].overheads.clear()
            clients["SplitPoint"].transports.clear()
        for _ in range(rounds):
            for k, c in clients.items():
                times[k] += [c(x) for _ in range(per_round)]
        idle = after_idle(clients["raw pyzmq"], clients["SplitPoint"], x)
    finally:
        if "torch RPC" in clients:
            clients["torch RPC"].rpc.shutdown()
        clients["SplitPoint"].close()
        for p in procs:
            p.kill()
            p.wait()
    res: dict = {k: _stats(v) for k, v in times.items()}
    res["SplitPoint overhead"] = _stats(clients["SplitPoint"].overheads)
    res["SplitPoint transport"] = _stats(clients["SplitPoint"].transports)
    res["after idle"] = idle
    return res


# a split request's stages as the edge reports them, in the order they happen (no local fallback here)
SPLIT_STAGES = tuple(s for s in STAGES if s != "local_ms")
IDLE_GAP_S = 0.04  # about ResNet-18's tail on this machine: what a real request leaves the sockets idle


def after_idle(raw: ZmqClient, sp: SplitPointClient, x: np.ndarray, n: int = 40) -> dict:
    """Raw pyzmq's round trip and SplitPoint's overhead when each request follows an idle gap, as a real
    model's compute leaves one: the threads that wake on a message then wake from an idle CPU."""
    raw_ms, before = [], len(sp.overheads)
    for _ in range(n):
        time.sleep(IDLE_GAP_S)
        raw_ms.append(raw(x))
        time.sleep(IDLE_GAP_S)
        sp(x)
    return {
        "gap_s": IDLE_GAP_S,
        "raw pyzmq": _stats(raw_ms),
        "SplitPoint overhead": _stats(sp.overheads[before:]),
    }


def _stats(xs: list[float]) -> dict:
    return {"p50": statistics.median(xs), "p99": float(np.percentile(xs, 99)), "n": len(xs)}


def decomposition(requests: int) -> dict:
    """A real split: ResNet-18 at the cut where one 392 KiB tensor crosses, window 1, loopback."""
    from splitpoint.app.process import start_server, stop
    from splitpoint.core.graph import open_model
    from splitpoint.core.plandir import write_plan
    from splitpoint.core.samples import sample_feeds
    from splitpoint.edge.client import EdgeClient
    from splitpoint.edge.config import EdgeConfig

    h = open_model("resnet18")
    cut = next(c for c in h.cuts() if len(c.crossing) == 1 and c.bytes_per_sample == 401_408)
    work = Path(tempfile.mkdtemp(prefix="splitpoint-decomp-"))
    write_plan(h, work / "plans" / "p", cut=cut)
    port = _free_port()
    srv = start_server(f"tcp://127.0.0.1:{port}", work / "plans")
    keys = SPLIT_STAGES
    rows = []
    try:
        cfg = EdgeConfig(
            plan_dir=work / "plans" / "p",
            server=f"tcp://127.0.0.1:{port}",
            fallback=False,
            connect_grace_s=30,
        )
        with EdgeClient(cfg) as c:
            feeds = sample_feeds(h.model, 1, 0)
            for _ in range(10):
                c.infer(feeds, timeout=60)
            rows = [c.infer(feeds, timeout=60).breakdown for _ in range(requests)]
    finally:
        stop(srv)
    med = {k: statistics.median(r[k] for r in rows if r.get(k) is not None) for k in keys}
    compute = sum(
        med[k]
        for k in ("head_ms", "encode_ms", "server_decode_ms", "tail_ms", "server_encode_ms", "decode_ms")
    )
    overheads = [
        r["total_ms"]
        - sum(
            r.get(k) or 0
            for k in ("head_ms", "encode_ms", "server_decode_ms", "tail_ms", "server_encode_ms", "decode_ms")
        )
        for r in rows
    ]
    return {
        "cut": cut.index,
        "stages_ms": med,
        "compute_ms": compute,
        "overhead": _stats(overheads),
        "requests": requests,
    }


def report(rows: dict, dec: dict, args) -> None:
    lines = [
        "# Transport: SplitPoint's request path against the transports it replaces",
        "",
        f"`python benchmarks/bench_transport.py --rounds {args.rounds} --per-round {args.per_round}`: "
        f"client here, each "
        "server its own process, tcp loopback on this machine; a float32 tensor up, 4 KiB back; transports "
        "take "
        f"turns in {args.rounds} rounds of {args.per_round} requests. Round trips in ms, p50 / p99. "
        "SplitPoint runs a plan whose head and tail compute next to nothing (a Relu; a Slice) through "
        "onnxruntime; *transport* is its round trip minus that model compute (the codec's serialisation "
        "stays in, as pickle's and TensorPipe's stay in theirs), and is what the peers, which run no model, "
        "are compared with; *overhead* also leaves out the codec (encode and decode on both sides).",
        "",
        "| tensor | "
        + " | ".join(k for k in TRANSPORTS if k in next(iter(rows.values())))
        + " | SplitPoint transport | SplitPoint overhead | overhead ÷ raw pyzmq (p50) |",
        "|---|" + "---:|" * (len([k for k in TRANSPORTS if k in next(iter(rows.values()))]) + 3),
    ]
    verdicts = []
    for label, r in rows.items():
        cells = [f"{r[k]['p50']:.3f} / {r[k]['p99']:.3f}" for k in TRANSPORTS if k in r]
        ov, raw, tr = r["SplitPoint overhead"], r["raw pyzmq"], r["SplitPoint transport"]
        ratio = ov["p50"] / raw["p50"]
        lines.append(
            f"| {label} | "
            + " | ".join(cells)
            + f" | {tr['p50']:.3f} / {tr['p99']:.3f} | {ov['p50']:.3f} / {ov['p99']:.3f} | {ratio:.3f} |"
        )
        verdicts.append((f"overhead ≤ 1.2x raw pyzmq at {label}", f"{ratio:.3f}x", ratio <= 1.2))
        verdicts.append(
            (f"overhead p99 ≤ 2x p50 at {label}", f"{ov['p99'] / ov['p50']:.2f}x", ov["p99"] <= 2 * ov["p50"])
        )
        for other in ("pickle/TCP", "torch RPC"):
            if other in r:
                sp, o = tr["p50"], r[other]["p50"]
                verdicts.append(
                    (f"faster than {other} at {label} (transport, p50)", f"{sp:.3f} vs {o:.3f} ms", sp < o)
                )
    lines += [
        "",
        f"After an idle gap of {IDLE_GAP_S * 1e3:.0f} ms before each request (what a real model's compute "
        "leaves the sockets), p50 in ms: the threads that wake on a message wake from an idle CPU, "
        "for the raw round trip as for SplitPoint.",
        "",
        "| tensor | raw pyzmq after idle | SplitPoint overhead after idle | ratio |",
        "|---|---:|---:|---:|",
    ]
    for label, r in rows.items():
        a = r["after idle"]
        raw_i, sp_i = a["raw pyzmq"]["p50"], a["SplitPoint overhead"]["p50"]
        lines.append(f"| {label} | {raw_i:.3f} | {sp_i:.3f} | {sp_i / raw_i:.2f} |")
    ov392 = rows["392 KiB"]["SplitPoint overhead"]["p50"]
    verdicts.insert(0, ("overhead ≤ 0.3 ms p50 at 392 KiB", f"{ov392:.3f} ms", ov392 <= 0.3))
    lines += ["", "| target | measured | met? |", "|---|---:|---|"]
    lines += [f"| {t} | {m} | {'met' if ok else '**MISSED**'} |" for t, m, ok in verdicts]
    met = sum(ok for *_, ok in verdicts)
    lines += ["", f"{met} of {len(verdicts)} targets met.", ""]
    s = dec["stages_ms"]
    lines += [
        f"## A real split request: ResNet-18 at cut {dec['cut']} (one 392 KiB float32 tensor), window 1",
        "",
        f"Medians of {dec['requests']} requests, ms, each stage on its own clock (network = the edge's "
        f"round trip "
        "minus the server's own total).",
        "",
        "| head | encode | network | server queue | server decode | tail | server encode | reply decode | "
        "total | overhead (total − compute) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        "| "
        + " | ".join(f"{s[k]:.3f}" for k in SPLIT_STAGES)
        + f" | {dec['overhead']['p50']:.3f} (p99 {dec['overhead']['p99']:.3f}) |",
        "",
    ]
    write_results(
        "transport",
        {
            "sizes": rows,
            "decomposition": dec,
            "targets": [{"target": t, "measured": m, "met": ok} for t, m, ok in verdicts],
        },
        "\n".join(lines),
        args.out,
    )


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per-round", type=int, default=100)
    ap.add_argument("--serve", choices=["raw pyzmq", "pickle/TCP", "torch RPC"])
    ap.add_argument("--port", type=int)
    ap.add_argument("--size", type=int)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--size-out", help=argparse.SUPPRESS)  # a child's figures for one size
    ap.add_argument("--out", type=Path, help="folder for transport.json and transport.md")
    args = ap.parse_args()
    if args.serve:
        {"raw pyzmq": serve_zmq, "pickle/TCP": serve_pickle, "torch RPC": serve_torch}[args.serve](args.port)
        return
    if args.size:
        import json

        Path(args.size_out).write_text(
            json.dumps(one_size(args.size, args.rounds, args.per_round, Path(args.work)))
        )
        return
    rows = measure_sizes(args.rounds, args.per_round)
    report(rows, decomposition(400), args)


if __name__ == "__main__":
    main()
