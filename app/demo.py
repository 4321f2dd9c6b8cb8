"""`splitpoint demo`: the whole pipeline on one machine, in under a minute.

Profiles a zoo model as edge and as server, plans for a network profile, starts the tail
server (its own process), an MQTT broker (embedded unless --mqtt is given) and the edge
client, runs a few hundred inferences, and prints what each stage measured next to what the
planner predicted.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
from pydantic import Field

from splitpoint.app.process import output, start_server, stop
from splitpoint.core.config import StrictConfig
from splitpoint.core.errors import SplitPointError
from splitpoint.profiles.profiler import median_of_present


class DemoConfig(StrictConfig):
    label: ClassVar[str] = "demo"
    model: str = "resnet18"
    network: str = "wifi6"
    requests: int = Field(300, ge=1, le=1_000_000)
    window: int = Field(4, ge=1, le=4096)
    mqtt: str | None = None
    workdir: Path | None = None
    budget: float = Field(12.0, gt=0)
    edge_slowdown: float = Field(4.0, ge=1)  # the edge stands in for a small device under a real CPU limit
    emulate_link: bool = True  # the network profile applied to real traffic by the userspace link proxy


def run_demo(cfg: DemoConfig, say=print) -> dict:
    from splitpoint.app.broker import EmbeddedBroker, free_port
    from splitpoint.app.orchestrator import collect
    from splitpoint.core.graph import open_model
    from splitpoint.core.runner import make_session
    from splitpoint.core.samples import load_inputs, sample_feeds
    from splitpoint.edge.client import EdgeClient, EdgeConfig
    from splitpoint.partitioner.emit import write_candidate
    from splitpoint.partitioner.pareto import Constraints
    from splitpoint.partitioner.planner import decide, gather
    from splitpoint.profiles.profiler import ProfileSettings, profile_model
    from splitpoint.profiles.schema import load_network

    t_start = time.perf_counter()
    work = Path(cfg.workdir or tempfile.mkdtemp(prefix="splitpoint-demo-"))
    h = open_model(cfg.model)
    net = load_network(cfg.network)
    from splitpoint.profiles.cpulimit import CpuLimitError, cpu_limit

    edge_cpus = 1.0 / cfg.edge_slowdown if cfg.edge_slowdown and cfg.edge_slowdown > 1 else None
    try:
        with cpu_limit(edge_cpus) as em:
            pass
    except CpuLimitError as exc:
        say(f"      (no CPU limit available: {exc}; the edge runs at full speed)")
        edge_cpus = None
    say(
        f"[1/5] profiling {h.name} as edge (1 "
        f"thread{f', limited to {edge_cpus:g} CPU' if edge_cpus else ''}) "
        "and as server (1 thread)…"
    )
    with cpu_limit(edge_cpus) as em:
        edge = profile_model(h, ProfileSettings(role="edge", threads=1, budget=cfg.budget), em)
    server = profile_model(h, ProfileSettings(role="server", threads=1, budget=cfg.budget))
    if em:
        say(f"      edge emulated with {em.mechanism}, {em.cpus:g} CPU")
    say(
        f"      edge whole model {edge.whole.median_ms:.1f} ms, server {server.whole.median_ms:.1f} ms "
        f"(measured)"
    )
    say(f"[2/5] planning for {net.name} ({net.uplink_mbps} Mbit/s up, RTT {net.rtt_ms} ms)…")
    m = gather(
        h, edge, server, load_inputs(h.model, random=4), codecs=["float32", "float16", "int8", "int8+lz4"]
    )
    d = decide(m, [net], Constraints(min_fidelity=0.99))[0]
    p = d.pick
    plan_dir = work / "plan"
    write_candidate(h, p, plan_dir, include_full=True, front=[c.to_dict() for c in d.front], force=True)
    say(
        f"      pick: {p.label} — predicted {p.latency_ms:.1f} ms, {p.throughput_ips:.1f}/s "
        f"({len(d.front)} candidates on the front of {len(d.candidates)})"
    )

    broker = None
    url = cfg.mqtt
    if url is None:
        broker = EmbeddedBroker().start()
        url = broker.url
    # the link proxy (its own process) starts before this process takes the edge's CPU limit
    from splitpoint.app.bench.emulate import EmulatedLink
    from splitpoint.partitioner.planner import link_of

    link_ctx = EmulatedLink(
        link_of(net), "proxy" if cfg.emulate_link else "loopback", server_port=free_port()
    )
    try:
        em = link_ctx.__enter__()
    except BaseException:
        if broker:
            broker.stop()
        raise
    endpoint = em.server_bind
    say(
        f"[3/5] starting server on {endpoint}, link {em.mechanism} ({em.detail}), "
        f"MQTT {'embedded broker' if broker else 'broker'} at {url}…"
    )
    srv = start_server(endpoint, work, "--mqtt", url, "--device-id", "demo-server")
    client = None
    limit = cpu_limit(edge_cpus)
    limit.__enter__()
    try:
        client = EdgeClient(
            EdgeConfig(
                plan_dir=plan_dir,
                server=em.edge_connect,
                window=cfg.window,
                mqtt=url,
                device_id="demo-edge",
                timeout_s=10.0,
            )
        )
        # the server process must not inherit the edge's CPU limit: it was started before it
        end = time.monotonic() + 20
        while not client.server_up and time.monotonic() < end and p.inp.kind != "edge-only":
            if srv.poll() is not None:
                raise SplitPointError(f"server exited: {output(srv)}")
            time.sleep(0.05)
        feeds = sample_feeds(h.model, 1, 7)
        ref = make_session(h.path).run(None, feeds)
        say(f"[4/5] running {cfg.requests} inferences, {cfg.window} in flight…")
        client.infer(feeds, timeout=30)  # warm-up
        t0 = time.perf_counter()
        futures = [client.submit(feeds) for _ in range(cfg.requests)]
        results = [f.result(60) for f in futures]
        wall = time.perf_counter() - t0
        seq = [client.infer(feeds, timeout=30) for _ in range(min(50, cfg.requests))]  # unpipelined latency
        err = max(float(np.abs(a - b).max()) for a, b in zip(results[-1].outputs, ref, strict=True))
        fleet = collect(url, 2.5)
    finally:
        if client:
            client.close()
        limit.__exit__(None, None, None)
        stop(srv)
        link_ctx.__exit__(None, None, None)
        if broker:
            broker.stop()

    b = [r.breakdown for r in seq]
    measured = {
        k: median_of_present([x.get(k) for x in b])
        for k in (
            "head_ms",
            "encode_ms",
            "network_ms",
            "server_decode_ms",
            "tail_ms",
            "decode_ms",
            "total_ms",
            "local_ms",
        )
    }
    pb = p.breakdown
    rows = [
        ("head (edge)", pb.get("head_ms"), measured["head_ms"]),
        ("encode (edge)", pb.get("encode_ms"), measured["encode_ms"]),
        (
            "network (up + RTT + down)",
            pb.get("uplink_ms", 0) + pb.get("rtt_ms", 0) + pb.get("downlink_ms", 0)
            if "uplink_ms" in pb
            else None,
            measured["network_ms"],
        ),
        ("decode (server)", pb.get("decode_ms"), measured["server_decode_ms"]),
        ("tail (server)", pb.get("tail_ms"), measured["tail_ms"]),
        ("end to end", p.latency_ms, measured["total_ms"]),
    ]
    summary = {
        "model": h.name,
        "network": net.name,
        "pick": p.label,
        "requests": cfg.requests,
        "throughput_measured_ips": cfg.requests / wall,
        "throughput_predicted_ips": p.throughput_ips,
        "fallbacks": sum(r.fallback for r in results),
        "max_abs_error_vs_unsplit": err,
        "stages": rows,
        "telemetry_devices": sorted(fleet),
        "seconds": time.perf_counter() - t_start,
        "plan_dir": str(plan_dir),
    }
    say(
        f"[5/5] measured vs predicted (medians, ms; predicted = derived from the profiles; link: "
        f"{em.mechanism}, "
        f"{'emulated' if em.link else 'loopback, not emulated'}):"
    )
    for name, pred, meas in rows:
        say(f"      {name:28s} predicted {_f(pred):>9s}   measured {_f(meas):>9s}")
    say(
        f"      throughput: measured {summary['throughput_measured_ips']:.1f}/s pipelined vs predicted "
        f"{p.throughput_ips:.1f}/s; fallbacks {summary['fallbacks']}; max |split − unsplit| = {err:.2e}"
    )
    say(
        f"      telemetry seen from: {', '.join(summary['telemetry_devices']) or 'none'}; "
        f"total {summary['seconds']:.0f} s; plan in {plan_dir}"
    )
    return summary


def _f(x) -> str:
    return "-" if x is None else f"{x:.2f}"
