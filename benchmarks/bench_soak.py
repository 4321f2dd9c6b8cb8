"""Soak: 64 edge clients at once against one tail server for 60 s.

Each client is a real EdgeClient (its own DEALER socket and background thread) sending one request after
another with no local fallback, so every failure counts as an error. The clients live in 4 processes of
16; the server is its own process (1 worker). The server's and the client processes' RSS are sampled every
second: a server that leaks under load grows here.

Targets (issue 12): 0 errors; RSS flat (the server's last sample within 5 % of its sample 10 s in, after
its working set has formed).
Run: python benchmarks/bench_soak.py [--clients 64] [--seconds 60] [--processes 4]
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import psutil
from common import arguments, write_results

from splitpoint.app.broker import free_port
from splitpoint.app.process import start_server, stop
from splitpoint.core import zoo
from splitpoint.core.graph import open_model
from splitpoint.core.plandir import write_plan

WARM_S = 10.0  # the RSS baseline is taken this long after the clients start


def client_process(plan_dir: str, endpoint: str, clients: int, seconds: float, out: mp.Queue) -> None:
    from splitpoint.edge.client import EdgeClient, EdgeError
    from splitpoint.edge.config import EdgeConfig

    cfg = EdgeConfig(
        plan_dir=Path(plan_dir), server=endpoint, fallback=False, timeout_s=60.0, connect_grace_s=30
    )
    rng = np.random.default_rng(0)
    x = {"input": rng.standard_normal((1, 3, 64, 64)).astype(np.float32)}
    results = [{"ok": 0, "errors": 0, "latency_ms": [], "codes": {}} for _ in range(clients)]
    start = threading.Barrier(clients + 1)

    def run(k: int, c: EdgeClient) -> None:
        r = results[k]
        start.wait()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.perf_counter()
            try:
                c.infer(x, timeout=120)
                r["ok"] += 1
                r["latency_ms"].append((time.perf_counter() - t0) * 1e3)
            except (EdgeError, TimeoutError) as exc:
                r["errors"] += 1
                code = getattr(exc, "code", type(exc).__name__)
                r["codes"][code] = r["codes"].get(code, 0) + 1

    cs = [EdgeClient(cfg) for _ in range(clients)]
    threads = [threading.Thread(target=run, args=(k, c)) for k, c in enumerate(cs)]
    for t in threads:
        t.start()
    start.wait()
    for t in threads:
        t.join()
    for c in cs:
        c.close()
    out.put(results)


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--processes", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=60.0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="splitpoint-soak-"))
    model = work / "r18.onnx"
    zoo.write(["resnet18"], work, width=0.25, resolution=64)
    (work / "resnet18.onnx").rename(model)
    h = open_model(model)
    cut = next(c for c in h.cuts()[len(h.cuts()) // 2 :] if len(c.crossing) == 1)
    write_plan(h, work / "plans" / "p", cut=cut, codec="int8")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    srv = start_server(endpoint, work / "plans", capture=False)
    server = psutil.Process(srv.pid)
    per = args.clients // args.processes
    q: mp.Queue = mp.get_context("spawn").Queue()
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=client_process, args=(str(work / "plans" / "p"), endpoint, per, args.seconds, q))
        for _ in range(args.processes)
    ]
    try:
        time.sleep(2.0)  # the server loads its plan
        t0 = time.monotonic()
        for p in procs:
            p.start()
        samples = []
        while any(p.is_alive() for p in procs) and q.qsize() < len(procs):
            edge_rss = sum(psutil.Process(p.pid).memory_info().rss for p in procs if p.is_alive())
            samples.append(
                {"t_s": time.monotonic() - t0, "server_rss": server.memory_info().rss, "edge_rss": edge_rss}
            )
            time.sleep(1.0)
        results = [r for _ in procs for r in q.get(timeout=300)]
        for p in procs:
            p.join(30)
    finally:
        stop(srv)
    lat = [v for r in results for v in r["latency_ms"]]
    ok, errors = sum(r["ok"] for r in results), sum(r["errors"] for r in results)
    codes: dict[str, int] = {}
    for r in results:
        for k, v in r["codes"].items():
            codes[k] = codes.get(k, 0) + v
    # the clients start connecting at t = 0 and run for --seconds once all of them are up
    start_s = min(s["t_s"] for s in samples if s["t_s"] >= WARM_S) if samples[-1]["t_s"] >= WARM_S else 0
    base = next(s for s in samples if s["t_s"] >= start_s)
    last = samples[-1]
    growth = last["server_rss"] / base["server_rss"] - 1
    flat = growth <= 0.05
    data = {
        "clients": len(results),
        "processes": args.processes,
        "seconds": args.seconds,
        "requests": ok,
        "errors": errors,
        "error_codes": codes,
        "throughput_ips": ok / args.seconds,
        "latency_ms": {"p50": statistics.median(lat), "p99": float(np.percentile(lat, 99)), "max": max(lat)},
        "server_rss": {
            "at_warm_s": base["server_rss"],
            "last": last["server_rss"],
            "max": max(s["server_rss"] for s in samples),
            "growth": growth,
        },
        "edge_rss_last": last["edge_rss"],
        "per_client_requests": sorted(r["ok"] for r in results),
        "samples": samples,
        "targets": {"errors": 0, "server_rss_growth_max": 0.05},
        "met": {"errors": errors == 0, "rss_flat": flat},
    }
    mib = 2**20
    per_client = data["per_client_requests"]
    md = "\n".join(
        [
            "# Soak: 64 edge clients against one server",
            "",
            f"`python benchmarks/bench_soak.py --clients {args.clients} --processes {args.processes} "
            f"--seconds "
            f"{args.seconds:g}` on this machine: {len(results)} EdgeClients in {args.processes} processes, "
            f"each "
            "sending one request after another (no local fallback: a failure is an error) to one "
            "`splitpoint serve` "
            "(1 worker) for a quarter-width ResNet-18 at 64×64, split mid-network, int8 cut tensor.",
            "",
            "| figure | measured | target | met? |",
            "|---|---:|---:|---|",
            f"| requests answered | {ok} ({ok / args.seconds:.0f}/s) | | |",
            f"| errors | {errors} {codes or ''} | 0 | {'yes' if errors == 0 else 'no'} |",
            f"| server RSS at {base['t_s']:.0f} s → last ({last['t_s']:.0f} s) | "
            f"{base['server_rss'] / mib:.1f} → "
            f"{last['server_rss'] / mib:.1f} MiB ({100 * growth:+.1f} %) | ≤ +5 % | "
            f"{'yes' if flat else 'no'} |",
            f"| server RSS, largest sample | {data['server_rss']['max'] / mib:.1f} MiB | | |",
            f"| latency p50 / p99 / max | {data['latency_ms']['p50']:.1f} / {data['latency_ms']['p99']:.1f} "
            f"/ "
            f"{data['latency_ms']['max']:.1f} ms | | |",
            f"| requests per client, fewest / median / most | {per_client[0]} / "
            f"{statistics.median(per_client):.0f} / {per_client[-1]} | | |",
            "",
            "Latency here is queueing: 64 clients share one server process on a 2-core machine, so each "
            "request waits for the others' tails. RSS sampled every second; the full series is in "
            "`soak.json`.",
            "",
        ]
    )
    write_results("soak", data, md)


if __name__ == "__main__":
    main()
