"""`splitpoint demo`: the whole pipeline on one machine, in about a minute.

Profiles a zoo model as edge (under a real CPU limit, standing in for a small device) and as server,
plans for a network profile, shows the Pareto front, then starts the tail server (its own process), an
MQTT broker (embedded unless --mqtt is given) and the edge client over the emulated link, and runs two
candidates side by side: the planner's pick and a contrasting one (the best split at a cut when the pick
is not a cut, else the best whole-model baseline). For each it prints what every stage measured next to
what the planner predicted, and how closely the answers match the unsplit model. Nothing is left behind
unless the configuration's ``workdir`` keeps it.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import Field, field_validator

from splitpoint.app.process import output, start_server, stop
from splitpoint.core.config import StrictConfig
from splitpoint.core.errors import SplitPointError
from splitpoint.profiles.profiler import median_of_present

INPUTS = 16  # distinct inputs cycled through the requests: agreement is measured on all of them
PLAN_SAMPLES = 16  # the planner's fidelity samples: other seeds than the inputs the runs are judged on
STAGES = (
    "head_ms",
    "encode_ms",
    "network_ms",
    "server_decode_ms",
    "tail_ms",
    "decode_ms",
    "local_ms",
    "total_ms",
)


class DemoConfig(StrictConfig):
    label: ClassVar[str] = "demo"
    model: str = "resnet18"
    network: str = "wifi6"
    requests: int = Field(120, ge=1, le=1_000_000)  # per candidate
    window: int | None = Field(None, ge=1, le=4096)  # None: each plan's (the throughput its pick needs)
    mqtt: str | None = None
    workdir: Path | None = None  # keep the plans here (default: a temporary directory, removed at the end)
    budget: float = Field(12.0, gt=0)
    edge_slowdown: float = Field(4.0, ge=1)  # the edge stands in for a small device under a real CPU limit
    emulate_link: bool = True  # the network profile applied to real traffic by the userspace link proxy
    min_fidelity: float = Field(0.99, ge=0, le=1)
    input_shapes: tuple[str, ...] = ()  # --input-shape NAME:1x3x640x640, for a model with symbolic sizes
    inputs: Path | None = None  # the user's samples: planned on, and sent (the first INPUTS of them)

    @field_validator("mqtt")
    @classmethod
    def _broker_url(cls, v: str | None) -> str | None:
        from splitpoint.core.telemetry import BrokerURL

        if v is not None:
            try:
                BrokerURL.parse(v)
            except SplitPointError as exc:
                raise ValueError(str(exc)) from None
        return v


def run_demo(
    cfg: DemoConfig, say: Callable[..., None] = print, progress: Callable[..., None] | None = None
) -> dict:
    work = Path(cfg.workdir) if cfg.workdir else Path(tempfile.mkdtemp(prefix="splitpoint-demo-"))
    try:
        return _run(cfg, work, say, progress or (lambda *a, **k: None))
    finally:
        if cfg.workdir is None:
            shutil.rmtree(work, ignore_errors=True)  # plans hold whole models: tens of MB


def _run(cfg: DemoConfig, work: Path, say: Callable[..., None], progress: Callable[..., None]) -> dict:
    from splitpoint.core.graph import open_model
    from splitpoint.core.graph.shapes import parse_input_shapes
    from splitpoint.core.plan import SPLIT
    from splitpoint.partitioner.emit import write_candidate
    from splitpoint.partitioner.job import fidelity_measure
    from splitpoint.partitioner.pareto import Constraints
    from splitpoint.partitioner.planner import best_of_kind, decide, gather
    from splitpoint.profiles.cpulimit import CpuLimitError, cpu_limit
    from splitpoint.profiles.profiler import ProfileSettings, profile_model
    from splitpoint.profiles.schema import load_network

    t_start = time.perf_counter()
    h = open_model(cfg.model, parse_input_shapes(cfg.input_shapes))
    net = load_network(cfg.network)
    if cfg.mqtt is not None:  # a broker that is not there is news now, not after the minute of work
        from splitpoint.app.orchestrator import FleetSubscriber

        with FleetSubscriber(cfg.mqtt):
            pass
    edge_cpus = 1.0 / cfg.edge_slowdown if cfg.edge_slowdown > 1 else None
    try:
        with cpu_limit(edge_cpus):
            pass
    except CpuLimitError as exc:
        say(f"      (no CPU limit available: {exc}; the edge runs at full speed)")
        edge_cpus = None
    limited = f", limited to {edge_cpus:g} CPU" if edge_cpus else ""
    say(f"[1/6] profiling {h.name} as edge (1 thread{limited}) and as server (1 thread)…")
    h.cuts()  # bookkeeping at full speed, as `profile` does (profiles/job.py)
    with cpu_limit(edge_cpus) as em:
        edge = profile_model(h, ProfileSettings(role="edge", threads=1, budget=cfg.budget), em)
    server = profile_model(h, ProfileSettings(role="server", threads=1, budget=cfg.budget))
    say(
        f"      edge whole model {edge.whole.median_ms:.1f} ms, server {server.whole.median_ms:.1f} ms "
        f"(measured)"
    )

    say(
        f"[2/6] planning for {net.name} ({net.uplink_mbps:g} Mbit/s up, RTT {net.rtt_ms:g} ms), fidelity ≥ "
        f"{cfg.min_fidelity}…"
    )
    samples, truths, measured_on = h.fidelity_samples(PLAN_SAMPLES, cfg.inputs)
    m = gather(h, edge, server, samples, codecs=["float32", "float16", "int8", "int8+lz4"], truths=truths)
    d = decide(m, [net], Constraints(min_fidelity=cfg.min_fidelity))[0]
    pick = d.pick
    other_kind = "server-only" if pick.inp.kind == SPLIT else SPLIT
    other = best_of_kind(m, d, other_kind, cfg.min_fidelity)
    say(
        f"      Pareto front: {len(d.front)} of {len(d.candidates)} candidates, derived from the measured "
        f"profiles; fidelity = {fidelity_measure(h)}, measured on {measured_on}:"
    )
    shown = _fold(sorted(d.front, key=lambda c: c.latency_ms))
    for c, same in shown[:8]:
        mark = "★" if c is pick or pick in same else " "
        also = f"  (same figures: {', '.join(x.label for x in same)})" if same else ""
        say(
            f"      {mark} {c.label:24s} {c.latency_ms:8.1f} ms {c.throughput_ips:7.1f}/s "
            f"{c.bytes_per_inference / 1024:9.1f} KiB  fidelity {c.inp.fidelity:.3f}{also}"
        )
    if len(shown) > 8:
        say(f"        … and {len(shown) - 8} more")
    runs = [("pick", pick)] + (
        [("best " + ("split at a cut" if other_kind == SPLIT else "whole model on the server"), other)]
        if other
        else []
    )
    if other is None:
        say(f"      no {other_kind} candidate meets fidelity {cfg.min_fidelity}: only the pick runs")
    plans = work / "plans"
    dirs = {}
    for k, (role, c) in enumerate(runs):
        dirs[role] = plans / f"{k}-{c.inp.kind}"
        write_candidate(h, c, dirs[role], include_full=True, front=[x.to_dict() for x in d.front], force=True)
    if cfg.inputs is not None:  # the user's own, judged again on the requests
        inputs, judged = samples[:INPUTS], f"{min(INPUTS, len(samples))} of the inputs from {cfg.inputs}"
    else:
        from splitpoint.core.samples import sample_feeds

        inputs, judged = [sample_feeds(h.model, 1, 100 + k) for k in range(INPUTS)], f"{INPUTS} other inputs"
    results = _serve_and_run(cfg, h, net, edge_cpus, plans, runs, dirs, inputs, say, progress)
    say(
        "[6/6] measured vs predicted (medians of sequential requests, ms; predicted = derived from the "
        "profiles):"
    )
    for role, c in runs:
        r = results[role]
        say(f"      {role}: {c.label}")
        for name, pred, meas in _rows(c, r["stages"]):
            say(f"        {name:28s} predicted {_f(pred):>9s}   measured {_f(meas):>9s}")
        say(
            f"        throughput {r['throughput_ips']:.1f}/s measured vs {c.throughput_ips:.1f}/s predicted; "
            f"{r['fallbacks']} fallbacks; top-1 agreement with the unsplit model {_pct(r['top1_agreement'])} "
            f"on {judged}; max |split − unsplit| {r['max_abs_error']:.2e}"
        )
    if len(runs) == 2:
        (ra, ca), (rb, cb) = runs
        a, b = results[ra]["stages"]["total_ms"], results[rb]["stages"]["total_ms"]
        faster = ra if a <= b else rb
        agrees = (a <= b) == (ca.latency_ms <= cb.latency_ms)
        say(
            f"      {faster} is faster: {min(a, b):.1f} vs {max(a, b):.1f} ms measured "
            f"({max(a, b) / min(a, b):.2f}x), predicted {ca.latency_ms:.1f} vs {cb.latency_ms:.1f} ms: "
            f"the measurement {'confirms' if agrees else 'reverses'} the planner's order."
        )
    say(
        "      'max |split − unsplit|' is the largest difference in any output value between the split "
        "model and the unsplit one on the same input: the cut tensor's codec (e.g. int8 rounding) causes "
        "it; 0 means identical."
    )
    burst = []
    for role, c in runs:
        pred, meas = c.breakdown.get("head_ms"), results[role]["stages"].get("head_ms")
        if edge_cpus and pred and meas is not None and meas < 0.6 * pred:
            burst.append(c.label)
    if burst:
        say(
            f"      {', '.join(burst)}: the edge's head measured well below its prediction. Under the CPU "
            "limit a run of a few ms that starts after idle time goes faster than its sustained share (the "
            "sequential requests leave the edge idle while the server works); the profile times runs back "
            "to back, as a real device would run them at any time (docs/bench.md)."
        )
    if h.weights.startswith("random"):
        say(
            "      The weights are random: near-tied scores make top-1 fragile under any rounding, so these "
            "agreements say little about a trained model (the bench measures trained ones)."
        )
    fleet = results.pop("_telemetry")
    say(
        f"      telemetry seen from: {', '.join(fleet) or 'none'}; total "
        f"{time.perf_counter() - t_start:.0f} s"
    )
    return {
        "model": h.name,
        "network": net.name,
        "pick": pick.label,
        "other": other.label if other else None,
        "runs": {role: results[role] for role, _ in runs},
        "telemetry_devices": fleet,
        "seconds": time.perf_counter() - t_start,
        "plans": {k: str(v) for k, v in dirs.items()},
    }


def _serve_and_run(cfg, h, net, edge_cpus, plans, runs, dirs, inputs, say, progress) -> dict[str, Any]:
    from splitpoint.app.bench.emulate import EmulatedLink
    from splitpoint.app.broker import EmbeddedBroker, free_port
    from splitpoint.app.orchestrator import collect
    from splitpoint.edge.client import EdgeClient
    from splitpoint.edge.config import EdgeConfig, planned_window
    from splitpoint.partitioner.planner import link_of
    from splitpoint.profiles.cpulimit import cpu_limit

    broker = EmbeddedBroker().start() if cfg.mqtt is None else None
    url = broker.url if broker else cfg.mqtt
    full = h.whole_session()
    refs = [full.run(None, f) for f in inputs]
    results: dict[str, Any] = {}
    try:
        # the link proxy and the server (own processes) start before this process takes the edge's CPU limit
        with EmulatedLink(
            link_of(net), "proxy" if cfg.emulate_link else "loopback", server_port=free_port()
        ) as em:
            say(f"[3/6] server on {em.server_bind}, link {em.mechanism} ({em.detail}), MQTT at {url}")
            srv = start_server(em.server_bind, plans, "--mqtt", url, "--device-id", "demo-server")
            try:
                with cpu_limit(edge_cpus):
                    for step, (role, c) in enumerate(runs):
                        window = cfg.window or planned_window(dirs[role])
                        say(f"[{4 + step}/6] {role}: {c.label}, {cfg.requests} requests, {window} in flight…")
                        ec = EdgeConfig(
                            plan_dir=dirs[role],
                            server=em.edge_connect,
                            window=window,
                            mqtt=url,
                            device_id="demo-edge",
                            timeout_s=10.0,
                            connect_grace_s=20.0,
                        )
                        with EdgeClient(ec) as client:
                            if srv.poll() is not None:
                                raise SplitPointError(f"server exited: {output(srv)}")
                            results[role] = _exercise(client, inputs, refs, cfg.requests, progress, role)
                results["_telemetry"] = sorted(collect(url, 2.5))
            finally:
                stop(srv)
    finally:
        if broker:
            broker.stop()
    return results


def _exercise(client, inputs, refs, n: int, progress, role: str) -> dict:
    """Pipelined requests for throughput, then sequential ones for each stage's latency."""
    client.infer(inputs[0], timeout=60)  # warm-up
    progress(role, 0, n)
    t0 = time.perf_counter()
    futures = [client.submit(inputs[k % len(inputs)]) for k in range(n)]
    pipelined = []
    for k, f in enumerate(futures):
        pipelined.append(f.result(120))
        progress(role, k + 1, n)
    wall = time.perf_counter() - t0
    seq = [client.infer(inputs[k % len(inputs)], timeout=60) for k in range(min(30, n))]
    errors, agree = [], []
    for k, r in enumerate(pipelined[: len(inputs)]):
        ref = refs[k % len(inputs)]
        errors.append(
            max(float(np.abs(a.astype(np.float64) - b).max()) for a, b in zip(r.outputs, ref, strict=True))
        )
        agree.append(float(np.argmax(r.outputs[0]) == np.argmax(ref[0])))
    return {
        "requests": n,
        "throughput_ips": (n - 1) / wall if n > 1 else None,
        "fallbacks": sum(r.fallback for r in pipelined),
        "stages": {k: median_of_present([r.breakdown.get(k) for r in seq]) for k in STAGES},
        "max_abs_error": max(errors),
        "top1_agreement": float(np.mean(agree)),
    }


def _rows(c, measured: dict) -> list[tuple[str, float | None, float | None]]:
    pb = c.breakdown
    network = (
        pb.get("uplink_ms", 0) + pb.get("rtt_ms", 0) + pb.get("downlink_ms", 0) if "uplink_ms" in pb else None
    )
    if c.inp.kind == "edge-only":
        return [
            ("whole model (edge)", pb.get("head_ms"), measured["local_ms"]),
            ("end to end", c.latency_ms, measured["total_ms"]),
        ]
    return [
        ("head (edge)", pb.get("head_ms"), measured["head_ms"]),
        ("encode (edge)", pb.get("encode_ms"), measured["encode_ms"]),
        ("network (up + RTT + down)", network, measured["network_ms"]),
        ("decode (server)", pb.get("decode_ms"), measured["server_decode_ms"]),
        ("tail (server)", pb.get("tail_ms"), measured["tail_ms"]),
        ("end to end", c.latency_ms, measured["total_ms"]),
    ]


def _fold(cands: list) -> list[tuple[Any, list]]:
    """Candidates whose predicted figures are all equal shown once, with the others named."""

    def key(c: Any) -> tuple:
        return (round(c.latency_ms, 2), round(c.throughput_ips, 2), c.bytes_per_inference, c.inp.fidelity)

    out: list[tuple[Any, list]] = []
    for c in cands:
        for first, same in out:
            if key(first) == key(c):
                same.append(c)
                break
        else:
            out.append((c, []))
    return out


def _f(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f} %"
