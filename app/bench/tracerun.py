"""The edge side of a trace run (`splitpoint bench --trace`): requests at a fixed rate, whatever the link.

Its own process, under the emulated edge's CPU limit (applied by the parent). Arrivals are open-loop, as a
camera's frames are: request ``i`` is due at ``start + i / rate`` and is submitted then, however many
are still in flight, so a policy that falls behind shows it as latency. Each request's latency runs from
when it was due to when its answer (or its explicit error) arrived. A request with no answer at all by
the end is *lost*; an index answered more than once is a *duplicate*.

It loads and warms up first, says ``ready`` on standard output, and starts at the wall-clock time the
parent then writes on standard input: the parent reshapes the link at the trace's phase boundaries on
the same clock.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any


def _client(args):
    from splitpoint.edge.adaptive import AdaptiveClient
    from splitpoint.edge.client import EdgeClient
    from splitpoint.edge.config import EdgeConfig

    cfg = EdgeConfig(
        plan_dir=Path(args.dir),
        server=args.server,
        window=64,  # arrivals are not held back by the window: the rate sets the load
        timeout_s=args.timeout,
        fallback=False,  # a late answer is an explicit error, not a local run that hides the policy
        connect_grace_s=10.0,
        heartbeat_s=1.0,
        dead_after_s=args.timeout,
    )
    if args.mode == "fixed":
        return EdgeClient(cfg)
    return AdaptiveClient(
        args.dir, cfg, window=args.adapt_window, start_mbps=args.start_mbps, probe_every=args.probe_every
    )


def run(args) -> dict:
    from .edgerun import answers_against_refs, load_inputs

    inputs, refs, rules = load_inputs(args.inputs)
    client = _client(args)
    members = client.clients if args.mode == "adaptive" else [client]
    link = getattr(client, "link", None)
    for c in members:  # every session warm before the clock starts
        for k in range(args.warmup):
            c.infer(inputs[k % len(inputs)], timeout=args.timeout * 3)
    print("ready", flush=True)
    start = float(sys.stdin.readline())
    n = int(args.seconds * args.rate)
    answers: dict[int, list] = {}
    # one answer per member and input, checked against the unsplit model's after the run (a member
    # answers an input alike each time; checking every answer in the reply thread would slow the run)
    kept: dict[tuple[int, int], Any] = {}
    lock = threading.Lock()
    futures: list[Future] = []

    def answered(i: int, due: float, f: Future) -> None:
        t = time.time()
        exc = f.exception()
        row: dict[str, Any] = {"i": i, "t": due - start, "ms": (t - due) * 1e3, "error": None, "member": None}
        if exc is not None:
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        else:
            r = f.result()
            row["member"] = r.breakdown.get("member", 0)
            kept.setdefault((row["member"], i % len(inputs)), r)
            if "hedged_with" in r.breakdown:  # a probe the edge also ran: ``member`` answered first
                row["hedged_with"] = r.breakdown["hedged_with"]
            row["fallback"] = r.fallback
            # what the edge's link estimate was fed, and what it then held (measured; a hedged probe the
            # edge answered first has none here: its probe's reply fed the estimate later)
            row["network_ms"] = r.breakdown.get("network_ms")
            row["bytes_sent"] = r.breakdown.get("bytes_sent")
            if link is not None:
                row["uplink_mbps_est"], row["rtt_ms_est"] = link.uplink_mbps, link.rtt_ms
                row["rtt_age_s"] = link.rtt_age_s()
        with lock:
            answers.setdefault(i, []).append(row)

    for i in range(n):
        due = start + i / args.rate
        wait = due - time.time()
        if wait > 0:
            time.sleep(wait)
        f = client.submit(inputs[i % len(inputs)])
        f.add_done_callback(lambda f, i=i, due=due: answered(i, due, f))
        futures.append(f)
    end = time.time() + args.timeout + 5.0
    for f in futures:
        left = end - time.time()
        if left <= 0:
            break
        try:
            f.exception(timeout=left)
        except FutureTimeout:
            break
    time.sleep(0.2)  # callbacks run on the thread that resolved the request
    with lock:
        rows = [a[0] for _, a in sorted(answers.items())]
        duplicates = sum(len(a) - 1 for a in answers.values())
    switches = []
    if args.mode == "adaptive":
        switches = [{**s, "t": s["t"] - start} for s in client.switches if s["t"] >= start]
    client.close(drain=False)
    checked: dict[int, list] = {}
    for (member, k), r in sorted(kept.items(), key=lambda kv: kv[0]):
        checked.setdefault(member, []).append((k, r))
    return {
        # every member that answered, against the unsplit model on the inputs it answered (measured)
        "answers": {
            str(m): {"inputs": len(seq), **answers_against_refs(seq, refs, rules)}
            for m, seq in checked.items()
        },
        "requests": n,
        "answered": len(rows),
        "lost": n - len(rows),
        "duplicates": duplicates,
        "failed": sum(r["error"] is not None for r in rows),
        "rows": rows,
        "switches": switches,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="edge side of `splitpoint bench --trace`")
    ap.add_argument("--mode", choices=["adaptive", "fixed"], required=True)
    ap.add_argument("--dir", required=True, help="a plan set (adaptive) or one plan (fixed)")
    ap.add_argument("--server", required=True)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--rate", type=float, required=True, help="requests per second")
    ap.add_argument("--seconds", type=float, required=True, help="how long requests arrive")
    ap.add_argument("--adapt-window", type=int, default=5)
    ap.add_argument("--probe-every", type=int, default=None)
    ap.add_argument("--start-mbps", type=float, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    Path(args.out).write_text(json.dumps(run(args)), encoding="utf-8")


if __name__ == "__main__":
    main()
