"""The edge side of a benchmark run: its own process, inside the edge's network namespace where
there is one, under the emulated edge's CPU limit (applied by the parent: ``ip netns exec``
remounts /sys, so the cgroup tree is not visible from inside).

It runs requests one at a time (latency: every figure on this process's clock, the server's own
stage times from its clock, never a difference of the two), one per candidate per round, then
each candidate with a window of requests in flight (throughput), and records edge CPU time, the
RSS each candidate's sessions add, bytes sent and agreement with the unsplit model's outputs.
With ``--gate`` (the bench) the limit starts once every session is built, before the warm-up
requests; without it (the parent applies it at once) it covers the whole process. Only requests are
timed either way.
Throughput is the steady state: completions after the first, over the time between the first
and the last.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import psutil

from splitpoint.edge.client import SPLIT_PARTS
from splitpoint.profiles.profiler import median_of_present

STAGES = (*SPLIT_PARTS, "local_ms", "total_ms")


READY, GO = "ready", "go"  # the --gate handshake with the parent (stdout, stdin)


def _p90(xs):
    xs = sorted(x for x in xs if x is not None)
    return xs[min(len(xs) - 1, int(0.9 * len(xs)))] if xs else None


class _Plan:
    """One candidate's client and what was measured of it so far."""

    def __init__(self, plan_dir: str, window: int, server: str, args):
        from splitpoint.edge.client import EdgeClient, EdgeConfig

        self.dir, self.window = plan_dir, window
        self.client = EdgeClient(
            EdgeConfig(
                plan_dir=Path(plan_dir),
                server=server,
                window=window,
                timeout_s=args.timeout,
                fallback=False,
                connect_grace_s=10.0,
                heartbeat_s=1.0,
                dead_after_s=args.timeout,
            )
        )
        self.seq: list = []
        self.spent_s = 0.0
        self.cpu_s = 0.0
        self.rss_added = 0

    def wants_more(self, args) -> bool:
        return len(self.seq) < args.max_requests and (
            len(self.seq) < args.min_requests or self.spent_s < args.seconds
        )


def measure_all(
    plans: list[tuple[str, int]], server: str, inputs: list[dict], refs: list[list[np.ndarray]], args
) -> dict:
    """Latency in rounds, one request per candidate per round, so that this machine's speed
    drift falls on every candidate alike (their comparison is the point); then throughput per
    candidate. CPU time is charged per request with the thread-wide clock of this process, which
    only this candidate's work moves while it runs (the others sit idle)."""
    proc = psutil.Process()
    runs, results = {}, {}
    for plan, window in plans:
        try:
            rss0 = proc.memory_info().rss
            runs[plan] = _Plan(plan, window, server, args)
            runs[plan].rss_added = proc.memory_info().rss - rss0
        except Exception as exc:  # one failing candidate is reported, the others still run
            results[plan] = {"error": f"{type(exc).__name__}: {exc}"}
            runs.pop(plan, None)
    if args.gate:
        wait_for_limit()
    for plan, r in list(runs.items()):
        try:
            rss0 = proc.memory_info().rss
            end = time.monotonic() + args.timeout  # a server still loading its tails is waited for
            while not (r.client.local_only or r.client.server_up) and time.monotonic() < end:
                time.sleep(0.02)
            for k in range(args.warmup):
                r.client.infer(inputs[k % len(inputs)], timeout=args.timeout * 3)
            # what this candidate's sessions and buffers added to the edge process, after a run
            r.rss_added += proc.memory_info().rss - rss0
        except Exception as exc:
            results[plan] = {"error": f"{type(exc).__name__}: {exc}"}
            runs.pop(plan).client.close(drain=False)
    while active := [r for r in runs.values() if r.wants_more(args)]:
        for r in active:
            k = len(r.seq) % len(inputs)
            c0, t0 = time.process_time(), time.perf_counter()
            try:
                r.seq.append((k, r.client.infer(inputs[k], timeout=args.timeout * 3)))
            except Exception as exc:
                results[r.dir] = {"error": f"{type(exc).__name__}: {exc}"}
                runs.pop(r.dir).client.close(drain=False)
                continue
            r.spent_s += time.perf_counter() - t0
            r.cpu_s += time.process_time() - c0  # all threads, nanosecond clock (psutil's ticks are 10 ms)
    for plan, r in runs.items():
        try:
            results[plan] = throughput_and_summary(r, inputs, refs, args, proc)
        except Exception as exc:
            results[plan] = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            r.client.close()
    return results


def load_inputs(path: str | Path) -> tuple[list[dict], list[list[np.ndarray]], list[tuple]]:
    """The bench's inputs file (``run._inputs_file``): the feeds, the unsplit model's outputs for each, and
    how each output is compared (the planner's ``comparison_rules``)."""
    data = np.load(path)
    n = int(data["n"])
    names = [str(s) for s in data["input_names"]]
    inputs = [{nm: data[f"in{k}_{j}"] for j, nm in enumerate(names)} for k in range(n)]
    refs = [[data[f"ref{k}_{j}"] for j in range(int(data["n_outputs"]))] for k in range(n)]
    rules = (
        [
            (int(a) or None, bool(c), int(k))
            for a, c, k in zip(data["score_axes"], data["class_scores"], data["rows_per_sample"], strict=True)
        ]
        if "score_axes" in data
        else []
    )
    return inputs, refs, rules


def answers_against_refs(seq: list, refs: list[list[np.ndarray]], rules: list) -> dict:
    """``seq``'s answers (input index, result) against the unsplit model's: the planner's agreement, the
    worst output's, and the largest difference in any output value of the same shape (a detector's
    boxes may differ in number: the agreement counts those)."""
    max_err = 0.0
    for k, r in seq:
        for out, ref in zip(r.outputs, refs[k], strict=True):
            if out.shape == np.shape(ref):
                max_err = max(max_err, float(np.abs(out.astype(np.float64) - ref).max(initial=0.0)))
    fid = _agreement(seq, refs, rules)
    return {
        # the planner's measure, the worst output's: top-1 for class scores, equal elements for integer
        # outputs, cosine otherwise (an argmax over a detector's boxes or a U-Net's mask read 0.5 for a
        # split the planner measured at 0.999)
        "agreement": min((o.primary for o in fid), default=None),
        "top1_agreement": fid[0].top1_agreement if fid else None,
        "max_abs_error": max_err,
    }


def _agreement(seq: list, refs: list[list[np.ndarray]], rules: list) -> list:
    """Each output's fidelity over the sequential requests, as ``splitpoint fidelity`` measures it: by the
    planner's ``comparison_rules`` (compare()'s axis, scores, rows per sample), one per output, or its
    default where none is given."""
    from splitpoint.core.runner import join
    from splitpoint.partitioner.fidelity import compare

    if not seq:
        return []
    got = join([list(r.outputs) for _, r in seq])
    want = join([list(refs[k]) for k, _ in seq])
    return [
        compare(f"output {i}", w, g, len(seq), *(rules[i] if i < len(rules) else ()))
        for i, (w, g) in enumerate(zip(want, got, strict=True))
    ]


def pipelined_requests(breakdowns: list[dict], window: int, args) -> int:
    """Requests for the throughput phase: about ``args.seconds`` of completions at the rate the
    sequential requests let one expect, the slower of the window's (latency / window) and the slowest
    stage's (edge compute, network, server). The window's rate alone would send an edge-only plan,
    whose one stage sets the pace whatever the window, window times as many requests as it has time for."""

    def med(*keys: str) -> float:
        return median_of_present([sum(b.get(k) or 0.0 for k in keys) for b in breakdowns]) or 0.0

    latency = max(1.0, med("total_ms"))
    stage = max(
        med("head_ms", "encode_ms", "decode_ms", "local_ms"),
        med("network_ms"),
        med("server_decode_ms", "tail_ms", "server_encode_ms"),
    )
    per_completion = max(latency / window, stage, 1e-3)
    return max(args.min_requests, min(args.max_requests, int(args.seconds * 1000 / per_completion)))


def wait_for_limit() -> None:
    """Say on stdout that every session is built and wait for the parent's word on stdin, which it
    gives once it has put this process under the edge's CPU limit. Imports and session builds run at
    full speed: no figure times them, and under a Pi-class share they took most of a bench's wall time."""
    print(READY, flush=True)
    if sys.stdin.readline().strip() != GO:
        raise SystemExit("the bench stopped before the edge's CPU limit was applied")


def throughput_and_summary(run: _Plan, inputs, refs, args, proc) -> dict:
    seq, client, window = run.seq, run.client, run.window
    n_pipe = pipelined_requests([x.breakdown for _, x in seq], window, args)
    finished: list[float] = []
    futs = []
    cpu0 = time.process_time()
    for i in range(n_pipe):
        f = client.submit(inputs[i % len(inputs)])
        f.add_done_callback(lambda _: finished.append(time.perf_counter()))
        futs.append(f)
    done = [f.result(args.timeout * 3 + 60) for f in futs]
    cpu_pipe = time.process_time() - cpu0
    finished.sort()
    steady_s = finished[-1] - finished[0]
    b = [r.breakdown for _, r in seq]
    stages = {k: median_of_present([x.get(k) for x in b]) for k in STAGES}
    compute = (
        "head_ms",
        "encode_ms",
        "server_decode_ms",
        "tail_ms",
        "server_encode_ms",
        "decode_ms",
        "local_ms",
    )
    # everything that is not compute: the link plus the runtime's own cost (all of it at loopback)
    non_compute = [x["total_ms"] - sum(x.get(k) or 0.0 for k in compute) for x in b]
    return {
        "chain_stages_ms_median": _chain_stages(b),
        "requests_sequential": len(seq),
        "requests_pipelined": n_pipe,
        "latency_ms_median": stages["total_ms"],
        "latency_ms_p90": _p90([x.get("total_ms") for x in b]),
        "stages_ms_median": stages,
        "non_compute_ms_median": median_of_present(non_compute),
        "edge_rss_added_bytes": run.rss_added,
        "throughput_ips": (n_pipe - 1) / steady_s if steady_s > 0 else None,
        "window": window,
        "fallbacks": sum(r.fallback for _, r in seq) + sum(r.fallback for r in done),
        "bytes_sent_median": median_of_present([x.get("bytes_sent") for x in b]),
        "edge_cpu_ms_per_request": 1e3 * run.cpu_s / max(1, len(seq)),
        "edge_cpu_ms_per_request_pipelined": 1e3 * cpu_pipe / n_pipe,
        **answers_against_refs(seq, refs, args.rules),
    }


def _chain_stages(breakdowns: list[dict]) -> list[dict] | None:
    """A chain's per-stage times (each stage's own clock), median per stage and figure; None for a plan
    of two stages, whose server times are in the breakdown itself."""
    lists: list[list] = [b["stages"] for b in breakdowns if isinstance(b.get("stages"), list)]
    if not lists:
        return None
    n = max(len(x) for x in lists)
    keys = ("queue_ms", "decode_ms", "tail_ms", "encode_ms", "next_ms", "total_ms", "bytes_sent")
    out = []
    for i in range(n):
        rows = [x[i] for x in lists if len(x) > i]
        med = {k: median_of_present([r.get(k) for r in rows]) for k in keys}
        out.append({"stage": rows[0].get("stage", i + 1), **med})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="edge side of `splitpoint bench`")
    ap.add_argument("--plans", required=True, help="JSON list of [plan directory, window]")
    ap.add_argument("--server", required=True)
    ap.add_argument("--inputs", required=True, help=".npz with the inputs and the unsplit model's outputs")
    ap.add_argument("--seconds", type=float, default=1.5, help="per plan and phase, after min-requests")
    ap.add_argument("--min-requests", type=int, default=5)
    ap.add_argument("--max-requests", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--gate", action="store_true", help="print 'ready' once built, start on 'go' on stdin")
    args = ap.parse_args(argv)
    inputs, refs, args.rules = load_inputs(args.inputs)
    results = measure_all([(p, int(w)) for p, w in json.loads(args.plans)], args.server, inputs, refs, args)
    out = {"results": results, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    Path(args.out).write_text(json.dumps(out), encoding="utf-8")
    sys.exit(0)


if __name__ == "__main__":
    main()
