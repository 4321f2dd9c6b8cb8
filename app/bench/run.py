"""`splitpoint bench`: for each model x network, plan, then measure the pick, a spread of the
Pareto front and the baselines over an emulated link with an emulated edge CPU, next to what
the partitioner predicted for the same candidates.

Per model: calibrated edge profile and server profile (measured), planner measurements and
decisions for every network at once. Per (model, network): one emulated link, one server
process (in the server's namespace where there is one), one edge process (CPU-limited, in the
edge's namespace) that runs every candidate in turn. Nothing is timed across two processes'
clocks: the edge times each request on its own clock, the server reports its stage times.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from splitpoint.app.process import stop
from splitpoint.core.errors import SplitPointError

DEFAULT_MODELS = ["resnet18", "resnet50", "mobilenetv2"]
DEFAULT_NETWORKS = ["3g", "lte", "wifi-n", "5g"]
BENCH_CODECS = ["float32", "float16", "int8", "int8+lz4", "int8+zstd"]
RAW, COMPRESSED = (
    "float32",
    "int8+zstd",
)  # the server-only baselines: raw input, input compressed as a user would
# what the report calls each baseline (a candidate's role is "baseline: " + one of these)
ALL_ON_EDGE, ALL_ON_SERVER_RAW, ALL_ON_SERVER_COMPRESSED = (
    "all on edge",
    "all on server, raw input",
    f"all on server, input {COMPRESSED}",
)


@dataclass
class BenchConfig:
    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    networks: list[str] = field(default_factory=lambda: list(DEFAULT_NETWORKS))
    device: str = "rpi4"
    link: str = "auto"  # auto | netns | proxy | loopback
    out: Path = Path("bench-results")
    seconds: float = 1.5  # per candidate and phase, once min_requests are done
    min_requests: int = 3
    max_requests: int = 20
    window: int = 4
    max_front: int = 4  # front members measured besides the pick and the baselines
    min_fidelity: float = 0.99
    fidelity_samples: int = 4
    inputs: int = 4
    profile_budget: float = 12.0
    codecs: list[str] = field(default_factory=lambda: list(BENCH_CODECS))


def _key(c) -> str:
    i = c.inp
    return f"{i.kind}-{i.cut if i.cut is not None else 'x'}-{i.codec.replace('+', '_')}-{i.head_weights}"


def choose(decision, max_front: int) -> dict[str, tuple[str, object]]:
    """The candidates to measure: the pick, up to ``max_front`` front members spread over the
    predicted latency range, and the baselines (edge-only, server-only raw and compressed)."""
    out: dict[str, tuple[str, object]] = {}
    for c in decision.candidates:
        i = c.inp
        if i.head_weights != "float32":
            continue
        if i.kind == "edge-only":
            out[_key(c)] = (f"baseline: {ALL_ON_EDGE}", c)
        elif i.kind == "server-only" and i.codec == RAW:
            out[_key(c)] = (f"baseline: {ALL_ON_SERVER_RAW}", c)
        elif i.kind == "server-only" and i.codec == COMPRESSED:
            out[_key(c)] = (f"baseline: {ALL_ON_SERVER_COMPRESSED}", c)
    members = sorted(
        (c for c in decision.front if _key(c) not in out and c is not decision.pick),
        key=lambda c: c.latency_ms,
    )
    if members and max_front > 0:
        step = max(1, len(members) / max_front)
        for k in range(min(max_front, len(members))):
            c = members[int(k * step)]
            out[_key(c)] = ("front", c)
    role = out.get(_key(decision.pick), ("", None))[0]
    out[_key(decision.pick)] = (f"pick{' (' + role + ')' if role else ''}", decision.pick)
    return out


def window_for(cand, least: int) -> int:
    """Requests in flight needed to keep the slowest stage busy (Little's law: latency / the
    slowest stage's time), so the throughput phase measures the pipeline, not the window."""
    slowest_ms = 1000.0 / cand.throughput_ips if cand.throughput_ips > 0 else cand.latency_ms
    return int(min(32, max(least, -(-cand.latency_ms // slowest_ms) + 1)))


def _write_plan(m, cand, path: Path) -> None:
    from splitpoint.core.plandir import write_baseline_plan, write_plan

    h, i = m.handle, cand.inp
    if path.exists():
        return
    if i.kind == "split":
        write_plan(
            h.index, h.cuts()[i.cut - 1], path, h.name, h.sha256, codec=i.codec, predicted=cand.to_dict()
        )
    else:
        write_baseline_plan(h.index, i.kind, path, h.name, h.sha256, codec=i.codec, predicted=cand.to_dict())


def _inputs_file(h, n: int, path: Path) -> None:
    from splitpoint.core.runner import make_session, sample_feeds

    sess = make_session(h.path)
    arrays: dict[str, np.ndarray] = {"n": np.array(n)}
    names = [i.name for i in sess.get_inputs()]
    arrays["input_names"] = np.array(names)
    for k in range(n):
        feeds = sample_feeds(h.model, 1, 1000 + k)
        outs = sess.run(None, feeds)
        arrays["n_outputs"] = np.array(len(outs))
        for j, nm in enumerate(names):
            arrays[f"in{k}_{j}"] = feeds[nm]
        for j, o in enumerate(outs):
            arrays[f"ref{k}_{j}"] = o
    np.savez(path, **arrays)


def _probe_link(em) -> list[dict]:
    """The link itself, measured with plain TCP exchanges on the server's port before the
    server takes it (the proxy connects upstream per connection, so the same path is probed)."""
    bind = em.server_bind[len("tcp://") :]
    srv = subprocess.Popen(
        [*em.server_prefix, sys.executable, "-m", "splitpoint.app.bench.probe", "serve", "--bind", bind],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        srv.stdout.readline()
        out = subprocess.run(
            [
                *em.edge_prefix,
                sys.executable,
                "-m",
                "splitpoint.app.bench.probe",
                "measure",
                "--connect",
                em.edge_connect[len("tcp://") :],
                "--sizes",
                "64:64,65536:64",
                "--repeats",
                "3",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if out.returncode:
            return [{"error": out.stderr.strip()[-300:]}]
        rows = json.loads(out.stdout)
        for r in rows:
            r["predicted_ms"] = em.predicted_ms(r["up_bytes"], r["down_bytes"])
            del r["samples_ms"]
        return rows
    finally:
        srv.kill()
        srv.wait()


def measure_network(
    m, decision, net, cfg: BenchConfig, plans_root: Path, inputs: Path, calib, work: Path
) -> dict:
    from splitpoint.partitioner.planner import link_of
    from splitpoint.profiles.cpulimit import cpu_limit

    from .emulate import EmulatedLink

    chosen = choose(decision, cfg.max_front)
    plan_dirs = {}
    for key, (_, cand) in chosen.items():
        _write_plan(m, cand, plans_root / key)
        plan_dirs[key] = plans_root / key
    serve_dir = work / f"serve-{net.name}"
    shutil.rmtree(serve_dir, ignore_errors=True)
    serve_dir.mkdir(parents=True)
    for key, d in plan_dirs.items():
        if chosen[key][1].inp.kind != "edge-only":
            (serve_dir / key).symlink_to(d.resolve())
    link = link_of(net)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with EmulatedLink(link, cfg.link) as em:
        probe = _probe_link(em)
        srv = subprocess.Popen(
            [
                *em.server_prefix,
                sys.executable,
                "-m",
                "splitpoint.app.cli",
                "serve",
                "--bind",
                em.server_bind,
                "--plans",
                str(serve_dir),
                "--workers",
                "1",
                "--threads",
                "1",
                "--quiet",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        out = work / f"edge-{m.handle.name}-{net.name}.json"
        try:
            # the edge-only plan first: it needs no server, so the server has time to load its tails
            order = sorted(plan_dirs, key=lambda k: chosen[k][1].inp.kind != "edge-only")
            plans = [[str(plan_dirs[k]), window_for(chosen[k][1], cfg.window)] for k in order]
            edge = subprocess.Popen(
                [
                    *em.edge_prefix,
                    sys.executable,
                    "-m",
                    "splitpoint.app.bench.edgerun",
                    "--plans",
                    json.dumps(plans),
                    "--server",
                    em.edge_connect,
                    "--inputs",
                    str(inputs),
                    "--seconds",
                    str(cfg.seconds),
                    "--min-requests",
                    str(cfg.min_requests),
                    "--max-requests",
                    str(cfg.max_requests),
                    "--out",
                    str(out),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            # limited from here: inside the namespace the cgroup tree is not mounted
            with cpu_limit(calib.limit, pid=edge.pid) as edge_emulation:
                _, stderr = edge.communicate()
            if edge.returncode:
                raise SplitPointError(f"edge run failed on {net.name}: {stderr.strip()[-800:]}")
        finally:
            stop(srv)
        edge_out = json.loads(out.read_text())
        mechanism = em.to_dict()
    rows = []
    for key, (role, cand) in chosen.items():
        meas = edge_out["results"].get(str(plan_dirs[key]), {"error": "not run"})
        rows.append(
            {
                "model": m.handle.name,
                "network": net.name,
                "candidate": cand.label,
                "role": role,
                "is_pick": cand is decision.pick,
                "predicted": cand.to_dict(),
                "measured": meas,
            }
        )
    return {
        "network": net.name,
        "link": mechanism,
        "link_probe": probe,
        "rows": rows,
        "edge_emulation": edge_emulation.model_dump() if edge_emulation else None,
        "edge_peak_rss_bytes": edge_out.get("peak_rss_bytes"),
    }


def run_bench(cfg: BenchConfig, progress=None) -> dict:
    """Everything measured, returned as one JSON-ready dict (the report is written from it)."""
    from splitpoint.core import zoo
    from splitpoint.core.graph import open_model
    from splitpoint.partitioner.fidelity import load_inputs
    from splitpoint.partitioner.pareto import Constraints
    from splitpoint.partitioner.planner import decide, gather
    from splitpoint.profiles.cpulimit import cpu_limit
    from splitpoint.profiles.facts import device_facts
    from splitpoint.profiles.profiler import ProfileSettings, profile_model
    from splitpoint.profiles.schema import load_device, load_network

    from .edgecpu import calibrate
    from .emulate import MECHANISMS

    t0 = time.perf_counter()
    say = progress or (lambda *a, **k: None)
    # every argument is checked before the minutes of calibration and profiling start
    device = load_device(cfg.device)
    nets = [load_network(n) for n in cfg.networks]
    for name in cfg.models:
        if name not in zoo.ZOO and not Path(name).is_file():
            raise SplitPointError(
                f"--models: {name!r} is neither an ONNX file nor a zoo model (known: {', '.join(zoo.ZOO)})"
            )
    if not cfg.models or not nets:
        raise SplitPointError("name at least one model and one network")
    if cfg.link not in MECHANISMS:
        raise SplitPointError(f"--link: unknown mechanism {cfg.link!r}; choose from {', '.join(MECHANISMS)}")
    say("calibrating the edge CPU", advance=0)
    calib = calibrate(device)
    work = Path(tempfile.mkdtemp(prefix="splitpoint-bench-"))
    results = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "machine": device_facts(),
        "edge_calibration": calib.to_dict(),
        "models": {},
        "runs": [],
    }
    try:
        for name in cfg.models:
            tm = time.perf_counter()
            h = open_model(name)
            say(f"{h.name}: profiling edge ({calib.cpus:g} CPU) and server")
            with cpu_limit(calib.limit) as em:
                edge = profile_model(
                    h, ProfileSettings(role="edge", threads=1, budget=cfg.profile_budget), em
                )
            server = profile_model(h, ProfileSettings(role="server", threads=1, budget=cfg.profile_budget))
            say(f"{h.name}: planning for {len(nets)} networks")
            m = gather(h, edge, server, load_inputs(h.model, random=cfg.fidelity_samples), codecs=cfg.codecs)
            decisions = decide(m, nets, Constraints(min_fidelity=cfg.min_fidelity))
            t_plan = time.perf_counter() - tm
            inputs = work / f"{h.name}-inputs.npz"
            _inputs_file(h, cfg.inputs, inputs)
            results["models"][h.name] = {
                "edge_whole_ms": edge.whole.median_ms,
                "server_whole_ms": server.whole.median_ms,
                "cuts": len(h.cuts()),
                "profile_and_plan_s": t_plan,
                "sha256": h.sha256,
            }
            for net, d in zip(nets, decisions):
                say(f"{h.name} on {net.name}: measuring")
                results["runs"].append(
                    measure_network(m, d, net, cfg, work / "plans" / h.name, inputs, calib, work)
                )
                say(None, advance=1)
            results["models"][h.name]["seconds"] = time.perf_counter() - tm
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["seconds"] = time.perf_counter() - t0
    return results
