"""`splitpoint bench --chain`: a model pipelined over a chain of devices, measured over emulated links.

Each device of the chain is its own process: the edge (the bench's edge runner), relays and the server
(`splitpoint serve`, with `--stage I --next` for a relay), each in its own network namespace where
namespaces work (else on loopback behind link proxies), each Pi-class device under its own calibrated
CPU limit, and every hop shaped by its own network profile. Per model and network mix it measures the
pick, a spread of the front, the best two-device plan and the model on each single device, one request
at a time (latency) and with a window in flight (throughput), beside the partitioner's predictions.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from splitpoint.app.process import check_started, start_server, stop
from splitpoint.core.config import StrictConfig
from splitpoint.core.errors import SplitPointError

from .hostload import HostLoad
from .run import nonempty_names, run_edge, window_for

DEFAULT_CHAIN_MODELS = ("resnet18", "mobilenetv2", "resnet50")


class ChainBenchConfig(StrictConfig):
    label: ClassVar[str] = "bench --chain"
    models: tuple[str, ...] = DEFAULT_CHAIN_MODELS
    chain: tuple[str, ...] = Field(min_length=2, max_length=8)  # device profiles, edge first
    mixes: tuple[tuple[str, ...], ...] = Field(min_length=1)  # each: one network profile per hop
    link: Literal["auto", "netns", "proxy", "loopback"] = "auto"
    out: Path = Path("bench-results")
    seconds: float = Field(1.5, gt=0)
    min_requests: int = Field(6, ge=1)
    max_requests: int = Field(24, ge=1)
    window: int = Field(4, ge=1, le=1024)
    max_front: int = Field(3, ge=0)
    min_fidelity: float = Field(0.99, ge=0, le=1)
    objective: Literal["latency", "throughput"] = "throughput"
    fidelity_samples: int | None = Field(None, ge=1)
    inputs: int = Field(4, ge=1)
    profile_budget: float = Field(12.0, gt=0)
    codecs: tuple[str, ...] = ("float32", "float16", "int8", "int8+zstd")
    input_shapes: tuple[str, ...] = ()
    scores: tuple[str, ...] = ()  # NAME[:AXIS], applied to each model with that output

    _nonempty = field_validator("models")(nonempty_names)

    @model_validator(mode="after")
    def _profiles_exist(self) -> ChainBenchConfig:
        """Every device and network profile loads and every mix has one network per hop, before minutes
        of measuring."""
        from splitpoint.profiles.schema import load_device, load_network

        for d in self.chain:
            load_device(d)
        for mix in self.mixes:
            if len(mix) != len(self.chain) - 1:
                raise ValueError(
                    f"a chain of {len(self.chain)} devices needs {len(self.chain) - 1} network profiles per "
                    f"mix (one per hop); got {','.join(mix)}"
                )
            for n in mix:
                load_network(n)
        return self


def chain_command(cfg: ChainBenchConfig) -> str:
    """The command line that reproduces a chain bench, for its report."""
    parts = ["splitpoint bench", f"--chain {','.join(cfg.chain)}"]
    parts += [f"--networks {','.join(mix)}" for mix in cfg.mixes]
    parts += [f"--models {','.join(cfg.models)}", f"--seconds {cfg.seconds:g}", f"--window {cfg.window}"]
    if cfg.link != "auto":
        parts.append(f"--link {cfg.link}")
    if cfg.max_front != ChainBenchConfig.model_fields["max_front"].default:
        parts.append(f"--max-front {cfg.max_front}")
    parts += [f"--input-shape {s}" for s in cfg.input_shapes]
    parts += [f"--scores {s}" for s in cfg.scores]
    return " ".join([*parts, f"-o {cfg.out}"])


def choose_chain(decision, max_front: int) -> dict[str, tuple[str, Any]]:
    """The plans to measure: the pick, up to ``max_front`` front members spread over its latency range,
    and every baseline (each single device, the best two-device plan)."""
    out: dict[str, tuple[str, Any]] = {}
    for name, p in decision.baselines.items():
        key = _key(p)
        role = f"baseline: {name}"
        out[key] = (f"{out[key][0]}, {name}" if key in out else role, p)
    members = [p for p in decision.front if _key(p) not in out and p is not decision.pick]
    if members and max_front > 0:
        step = max(1, len(members) / max_front)
        for k in range(min(max_front, len(members))):
            p = members[int(k * step)]
            out[_key(p)] = ("front", p)
    key = _key(decision.pick)
    out[key] = (f"pick ({out[key][0]})" if key in out else "pick", decision.pick)
    return out


def _key(p) -> str:
    cuts = "-".join(map(str, p.cuts)) or "none"
    return f"c{cuts}-k{'-'.join(map(str, p.codecs)) or 'none'}"


def run_chain_bench(cfg: ChainBenchConfig, progress=None) -> dict:
    """Everything measured, as one JSON-ready dict (the report is written from it)."""
    from splitpoint.core.graph import open_model
    from splitpoint.core.graph.shapes import parse_input_shapes
    from splitpoint.partitioner.chainplan import ChainConstraints, decide_chain, gather_chain, numbered
    from splitpoint.partitioner.fidelity import scores_for, set_score_axes
    from splitpoint.profiles.facts import device_facts
    from splitpoint.profiles.schema import load_device, load_network

    from .edgecpu import calibrate_apart
    from .provenance import provenance
    from .run import _inputs_file, profile_apart
    from .runtimecost import runtime_cost

    t0 = time.perf_counter()
    load = HostLoad()
    say = progress or (lambda *a, **k: None)
    specs = [load_device(d) for d in cfg.chain]
    names = numbered([s.name for s in specs])
    say("calibrating the devices' CPUs", total=len(cfg.models) * len(cfg.mixes))
    calib: dict[str, Any] = {}
    for spec in specs:
        if spec.role == "edge" and spec.name not in calib:
            calib[spec.name] = calibrate_apart(spec)
    limits = [calib[s.name].limit if s.name in calib else None for s in specs]
    work = Path(tempfile.mkdtemp(prefix="splitpoint-chain-bench-"))
    results: dict[str, Any] = {
        "kind": "chain",
        "config": cfg.model_dump(mode="json"),
        "machine": {**device_facts(), **provenance()},
        "devices": [
            {"name": n, "profile": s.name, "role": s.role, "cpus": limits[i]}
            for i, (n, s) in enumerate(zip(names, specs, strict=True))
        ],
        "calibration": {k: c.to_dict() for k, c in calib.items()},
        "models": {},
        "runs": [],
    }
    try:
        runtime = {}  # per device profile: the runtime's own time per request there (measured)
        for spec in specs:
            if spec.name not in runtime:
                say(f"runtime cost on {spec.name}")
                runtime[spec.name] = runtime_cost(calib[spec.name].limit if spec.name in calib else None)
        results["runtime_ms"] = runtime
        for model in cfg.models:
            tm = time.perf_counter()
            h = open_model(model, parse_input_shapes(cfg.input_shapes), only_present=True)
            set_score_axes(h, scores_for(h, cfg.scores))
            profiles = {}
            for spec in specs:
                if spec.name in profiles:
                    continue
                say(f"{h.name}: profiling on {spec.name}")
                limit = calib[spec.name].limit if spec.name in calib else None
                prof = profile_apart(h, spec.role, limit, cfg.profile_budget, work)
                rt = runtime[spec.name]
                profiles[spec.name] = prof.model_copy(
                    update={"runtime_ms": rt["ms"], "runtime_ms_per_mib": rt["ms_per_mib"]}
                )
            by_name = {n: profiles[s.name] for n, s in zip(names, specs, strict=True)}
            samples, truths, measured_on = h.fidelity_samples(cfg.fidelity_samples or (64 if h.task else 8))
            inputs = work / f"{h.name}-inputs.npz"
            _inputs_file(h, cfg.inputs, inputs)
            results["models"][h.name] = {
                "cuts": len(h.cuts()),
                "weights": h.weights,
                "fidelity_inputs": measured_on,
                "whole_ms": {s.name: profiles[s.name].whole.median_ms for s in specs},
            }
            for mix in cfg.mixes:
                nets = [load_network(n) for n in mix]
                say(f"{h.name} over {'/'.join(mix)}: planning")
                m = gather_chain(h, names, by_name, nets, samples, list(cfg.codecs), truths)
                tp = time.perf_counter()
                d = decide_chain(m, ChainConstraints(min_fidelity=cfg.min_fidelity, objective=cfg.objective))
                plan_s = time.perf_counter() - tp
                say(f"{h.name} over {'/'.join(mix)}: measuring")
                run = measure_chain(m, d, cfg, limits, work / "plans" / h.name / "-".join(mix), inputs, work)
                run["planning_s"] = plan_s
                results["runs"].append(run)
                say(None, advance=1)
            results["models"][h.name]["seconds"] = time.perf_counter() - tm
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["seconds"] = time.perf_counter() - t0
    results["host_load"] = load.measured()
    return results


def measure_chain(
    m, decision, cfg: ChainBenchConfig, limits: list, plans_root: Path, inputs: Path, work: Path
) -> dict:
    from splitpoint.partitioner.chainplan import plan_dict, write_chain
    from splitpoint.profiles.cpulimit import cpu_limit

    from .emulate import EmulatedChain, probe_link

    chosen = choose_chain(decision, cfg.max_front)
    dirs: dict[str, Path] = {}
    for key, (_, p) in chosen.items():
        dirs[key] = plans_root / key
        if not dirs[key].exists():
            write_chain(m, p, dirs[key], include_full=False)
    n = len(m.devices)
    serve: list[Path] = []
    for j in range(1, n):  # device j serves the plans that reach it
        d = work / f"serve-{plans_root.name}-{j}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        for key, (_, p) in chosen.items():
            if len(p.cuts) >= j:
                (d / key).symlink_to(dirs[key].resolve())
        serve.append(d)
    links = list(m.costs.links)
    out = work / f"edge-{m.handle.name}-{plans_root.name}.json"
    with EmulatedChain(list(links), cfg.link) as em, contextlib.ExitStack() as stack:
        probes = []
        for h in range(n - 1):
            try:
                probes.append(probe_link(em.hop(h), [(64, 64, 3), (65536, 64, 3)]))
            except SplitPointError as exc:
                probes.append([{"error": str(exc)}])
        procs = []
        emulation = []
        for j in range(n - 1, 0, -1):  # the last device first: each relay connects to the one after it
            extra = [] if j == n - 1 else ["--stage", str(j), "--next", em.connects[j]]
            insecure = em.mechanism == "netns"  # bound inside this machine's own namespaces
            proc = start_server(em.binds[j], serve[j - 1], *extra, prefix=em.prefixes[j], insecure=insecure)
            stack.callback(stop, proc)
            procs.append(proc)
            emulation.append(stack.enter_context(cpu_limit(limits[j], pid=proc.pid)))
        check_started(procs)
        # the edge-only plan first: it needs no server, so the others have time to load their segments
        order = sorted(chosen, key=lambda k: len(chosen[k][1].cuts) > 0)
        plans = [[str(dirs[k]), window_for(chosen[k][1], cfg.window)] for k in order]
        where = "/".join(link.name for link in links)
        edge_emulation = run_edge(em.prefixes[0], plans, em.connects[0], inputs, out, cfg, limits[0], where)
        edge_out = json.loads(out.read_text(encoding="utf-8"))
        mechanism = {"mechanism": em.mechanism, "hops": em.details}
    rows = []
    for key, (role, p) in chosen.items():
        predicted = plan_dict(m, p)
        rows.append(
            {
                "model": m.handle.name,
                "networks": [net.name for net in m.networks],
                "candidate": predicted["label"],
                "role": role,
                "is_pick": p is decision.pick,
                "predicted": predicted,
                "measured": edge_out["results"].get(str(dirs[key]), {"error": "not run"}),
            }
        )
    return {
        "model": m.handle.name,
        "networks": [net.name for net in m.networks],
        "links": [link.__dict__ for link in links],
        "link": mechanism,
        "link_probe": probes,
        "rows": rows,
        "emulation": [e.model_dump() if e else None for e in [edge_emulation, *reversed(emulation)]],
        "front_size": len(decision.front),
    }
