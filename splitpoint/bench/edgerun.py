"""The edge side of a benchmark run: its own process, under the emulated edge's CPU limit,
inside the edge's network namespace where there is one.

For each plan it is given it runs requests one at a time (latency: every figure on this
process's clock, the server's own stage times from its clock, never a difference of the two),
then with a window of requests in flight (throughput), and records edge CPU time, peak RSS,
bytes sent and agreement with the unsplit model's outputs. Sessions are built before the CPU
limit is applied: start-up is not what is being measured.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import psutil

STAGES = ("head_ms", "encode_ms", "network_ms", "server_queue_ms", "server_decode_ms", "tail_ms", "server_encode_ms",
          "decode_ms", "local_ms", "total_ms")


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _p90(xs):
    xs = sorted(x for x in xs if x is not None)
    return xs[min(len(xs) - 1, int(0.9 * len(xs)))] if xs else None


def run_plan(plan_dir: Path, server: str, inputs: list[dict], refs: list[list[np.ndarray]], args) -> dict:
    from splitpoint.edge.client import EdgeClient, EdgeConfig

    client = EdgeClient(EdgeConfig(plan_dir, server=server, window=args.window, timeout_s=args.timeout,
                                   fallback=False, connect_grace_s=10.0, heartbeat_s=1.0, dead_after_s=args.timeout))
    proc = psutil.Process()
    try:
        for k in range(args.warmup):
            client.infer(inputs[k % len(inputs)], timeout=args.timeout * 3)
        seq, cpu0, t_end = [], proc.cpu_times(), time.perf_counter() + args.seconds
        while len(seq) < args.max_requests and (len(seq) < args.min_requests or time.perf_counter() < t_end):
            k = len(seq) % len(inputs)
            seq.append((k, client.infer(inputs[k], timeout=args.timeout * 3)))
        cpu1 = proc.cpu_times()
        n_pipe = max(args.min_requests, min(args.max_requests, int(args.seconds * 1000 / max(
            1.0, _median([r.breakdown.get("total_ms") for _, r in seq])) * args.window)))
        t0 = time.perf_counter()
        futs = [client.submit(inputs[i % len(inputs)]) for i in range(n_pipe)]
        done = [f.result(args.timeout * 3 + 60) for f in futs]
        wall = time.perf_counter() - t0
        rss = proc.memory_info().rss
    finally:
        client.close()
    b = [r.breakdown for _, r in seq]
    stages = {k: _median([x.get(k) for x in b]) for k in STAGES}
    compute = ("head_ms", "encode_ms", "server_decode_ms", "tail_ms", "server_encode_ms", "decode_ms", "local_ms")
    # everything that is not compute: the link plus the runtime's own cost (all of it at loopback)
    non_compute = [x["total_ms"] - sum(x.get(k) or 0.0 for k in compute) for x in b]
    agree, max_err = [], 0.0
    for k, r in seq:
        for out, ref in zip(r.outputs, refs[k]):
            max_err = max(max_err, float(np.abs(out.astype(np.float64) - ref).max()))
        o, ref = r.outputs[0].reshape(-1), refs[k][0].reshape(-1)
        agree.append(float(np.argmax(o) == np.argmax(ref)))
    return {
        "requests_sequential": len(seq), "requests_pipelined": n_pipe,
        "latency_ms_median": stages["total_ms"], "latency_ms_p90": _p90([x.get("total_ms") for x in b]),
        "stages_ms_median": stages,
        "non_compute_ms_median": _median(non_compute), "edge_rss_bytes": rss,
        "throughput_ips": n_pipe / wall, "window": args.window,
        "fallbacks": sum(r.fallback for _, r in seq) + sum(r.fallback for r in done),
        "bytes_sent_median": _median([x.get("bytes_sent") for x in b]),
        "edge_cpu_ms_per_request": 1e3 * ((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)) / max(1, len(seq)),
        "top1_agreement": float(np.mean(agree)) if agree else None, "max_abs_error": max_err,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="edge side of `splitpoint bench`")
    ap.add_argument("--plans", required=True, help="JSON list of plan directories")
    ap.add_argument("--server", required=True)
    ap.add_argument("--inputs", required=True, help=".npz with the inputs and the unsplit model's outputs")
    ap.add_argument("--cpus", type=float, default=0.0, help="CPU limit for this process (0: none)")
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=3.0, help="per plan and phase, after min-requests")
    ap.add_argument("--min-requests", type=int, default=5)
    ap.add_argument("--max-requests", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    from splitpoint.profiles.cpulimit import cpu_limit

    data = np.load(args.inputs)
    n = int(data["n"])
    names = [str(s) for s in data["input_names"]]
    inputs = [{nm: data[f"in{k}_{j}"] for j, nm in enumerate(names)} for k in range(n)]
    refs = [[data[f"ref{k}_{j}"] for j in range(int(data["n_outputs"]))] for k in range(n)]
    results = {}
    with cpu_limit(args.cpus or None) as em:
        for plan in json.loads(args.plans):
            try:
                results[plan] = run_plan(Path(plan), args.server, inputs, refs, args)
            except Exception as exc:  # one failing candidate is reported, the others still run
                results[plan] = {"error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps({"done": plan}), flush=True)
        emulation = em.model_dump() if em else None
    out = {"results": results, "edge_emulation": emulation,
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    Path(args.out).write_text(json.dumps(out))
    sys.exit(0)


if __name__ == "__main__":
    main()
