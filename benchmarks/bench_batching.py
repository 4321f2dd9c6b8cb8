"""Server micro-batching: aggregate throughput of one tail server (1 worker, 1 onnxruntime
thread, its own process) serving several edge clients at once, with and without ``--max-batch``.

Run: python benchmarks/bench_batching.py [--model resnet18] [--clients 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results

from splitpoint.app.broker import free_port
from splitpoint.app.process import start_server, stop
from splitpoint.core.graph import open_model
from splitpoint.core.plandir import write_plan
from splitpoint.core.samples import sample_feeds
from splitpoint.edge.client import EdgeClient, EdgeConfig


def run(plan: Path, max_batch: int, clients: int, window: int, per_client: int, feeds) -> dict:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    srv = start_server(endpoint, plan.parent, "--max-batch", str(max_batch), capture=False)
    try:
        cs = [
            EdgeClient(
                EdgeConfig(plan_dir=plan, server=endpoint, window=window, connect_grace_s=20, timeout_s=60)
            )
            for _ in range(clients)
        ]
        for c in cs:
            c.infer(feeds, timeout=60)
        batches: list[int] = []
        done: list[float] = []
        lock = threading.Lock()

        def finished(f):
            with lock:
                done.append(time.perf_counter())
                if f.exception() is None:
                    batches.append(f.result().breakdown.get("server_batch", 1))

        def one(c):
            futs = []
            for _ in range(per_client):  # submit blocks while the window is full: register at once
                f = c.submit(feeds)
                f.add_done_callback(finished)
                futs.append(f)
            for f in futs:
                f.result(120)

        threads = [threading.Thread(target=one, args=(c,)) for c in cs]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done.sort()
        for c in cs:
            c.close()
        n = len(done)
        return {
            "max_batch": max_batch,
            "requests": n,
            "throughput_ips": (n - 1) / (done[-1] - done[0]),
            "wall_s": time.perf_counter() - t0,
            "mean_batch": statistics.mean(batches),
            "max_seen_batch": max(batches),
        }
    finally:
        stop(srv)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--per-client", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    h = open_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="splitpoint-batch-"))
    plan = work / "plans" / "server-only"  # all compute on the server: it is the bottleneck being measured
    write_plan(h, plan, kind="server-only", codec="float16")
    feeds = sample_feeds(h.model)
    rows = []
    for _ in range(args.rounds):  # alternated, so the machine's drift falls on both settings
        for mb in (1, 8):
            rows.append(run(plan, mb, args.clients, args.window, args.per_client, feeds))
            print(rows[-1], flush=True)
    by = {mb: statistics.median(r["throughput_ips"] for r in rows if r["max_batch"] == mb) for mb in (1, 8)}
    md = [
        "# Server micro-batching",
        "",
        f"`python benchmarks/bench_batching.py --model {args.model} --clients {args.clients}`: one tail "
        f"server (1 worker, "
        f"1 onnxruntime thread, CPU) serving {args.clients} edge clients in one process, {args.window} "
        f"requests in flight "
        f"each, the server-only plan (float16 input). Throughput is the steady state over all clients; the "
        f"settings alternate "
        f"over {args.rounds} rounds.",
        "",
        "| --max-batch | requests | throughput (/s) | mean requests per tail run | largest run |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        md.append(
            f"| {r['max_batch']} | {r['requests']} | {r['throughput_ips']:.1f} | {r['mean_batch']:.2f} | "
            f"{r['max_seen_batch']} |"
        )
    md += [
        "",
        f"Median throughput {by[1]:.1f}/s without batching, {by[8]:.1f}/s with `--max-batch 8` "
        f"({by[8] / by[1]:.2f}×), measured on this 2-core CPU machine.",
        "",
    ]
    write_results("batching", {"rows": rows, "median_ips": by, "ratio": by[8] / by[1]}, "\n".join(md))


if __name__ == "__main__":
    main()
