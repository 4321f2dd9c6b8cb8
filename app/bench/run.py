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
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from splitpoint.app.process import check_running, run_child, splitpoint_command, start_server, stop
from splitpoint.core.config import StrictConfig
from splitpoint.core.errors import ModelError, SplitPointError

if TYPE_CHECKING:
    from splitpoint.partitioner.costmodel import Candidate
    from splitpoint.partitioner.planner import Decision

DEFAULT_MODELS = ["resnet18", "resnet50", "mobilenetv2"]  # random weights: latency and bytes


def default_models() -> tuple[str, ...]:
    """The random-weight architectures, and the trained models that are installed (task fidelity)."""
    from splitpoint.core import zoo
    from splitpoint.core.zoo.trained import availability

    return (*DEFAULT_MODELS, *(n for n in zoo.trained_names() if availability(n) is None))


DEFAULT_NETWORKS = ["3g", "lte", "wifi-n", "5g"]
BENCH_CODECS = ["float32", "float16", "int8", "int8-ch", "int4", "int8+lz4", "int8+zstd"]
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


def nonempty_names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
    """A list option given as "a,,b" or "": the empty names dropped, and at least one left."""
    v = tuple(x for x in v if x)
    if not v:
        raise ValueError("name at least one")
    twice = sorted({x for x in v if v.count(x) > 1})
    if twice:  # measured twice over, and reported as two rows of one thing
        raise ValueError(f"{', '.join(twice)} given twice")
    return v


class BenchConfig(StrictConfig):
    label: ClassVar[str] = "bench"
    models: tuple[str, ...] = Field(default_factory=default_models)
    networks: tuple[str, ...] = tuple(DEFAULT_NETWORKS)
    device: str = "rpi4"
    link: Literal["auto", "netns", "proxy", "loopback"] = "auto"
    out: Path = Path("bench-results")
    seconds: float = Field(1.5, gt=0)  # per candidate and phase, once min_requests are done
    min_requests: int = Field(3, ge=1)
    max_requests: int = Field(20, ge=1)
    window: int = Field(4, ge=1, le=1024)
    max_front: int = Field(4, ge=0)  # front members measured besides the pick and the baselines
    # (cut, head) pairs whose fidelity the planner measures for the front beyond the pick's (None: every
    # one the exact front needs; a 416x416 detector at 64 samples costs ~16 s each here)
    front_budget: int | None = Field(12, ge=0)
    min_fidelity: float = Field(0.99, ge=0, le=1)
    fidelity_samples: int | None = Field(None, ge=1)  # None: 64 rendered inputs (trained), else 8 random
    inputs: int = Field(4, ge=1)
    profile_budget: float = Field(12.0, gt=0)
    codecs: tuple[str, ...] = tuple(BENCH_CODECS)
    # NAME:1x3x640x640, applied to each model whose input of that name has a free dimension
    input_shapes: tuple[str, ...] = ()
    # NAME[:AXIS], applied to each model with an output of that name (fidelity.scores_for)
    scores: tuple[str, ...] = ()

    _nonempty = field_validator("models", "networks")(nonempty_names)

    @model_validator(mode="after")
    def _profiles_exist(self) -> BenchConfig:
        """Every named profile loads, before minutes of measuring (a ProfileError names the bad one)."""
        from splitpoint.profiles.schema import load_device, load_network

        for n in self.networks:
            load_network(n)
        load_device(self.device)
        return self


def bench_command(cfg: BenchConfig) -> str:
    """The command line that reproduces a bench, for its report: every option that differs from its
    default (the report printed models, networks and device only, and a run with --input-shape or
    --link proxy could not be repeated from it)."""
    defaults = BenchConfig.model_fields
    parts = ["splitpoint bench", f"--models {','.join(cfg.models)}", f"--networks {','.join(cfg.networks)}"]
    parts.append(f"--device {cfg.device}")
    for field, option in (
        ("link", "--link"),
        ("seconds", "--seconds"),
        ("window", "--window"),
        ("max_front", "--max-front"),
        ("front_budget", "--front-budget"),
        ("min_fidelity", "--min-fidelity"),
    ):
        value = getattr(cfg, field)
        if value != defaults[field].default:
            parts.append(f"{option} {value:g}" if isinstance(value, float) else f"{option} {value}")
    parts += [f"--input-shape {s}" for s in cfg.input_shapes]
    parts += [f"--scores {s}" for s in cfg.scores]
    return " ".join([*parts, f"-o {cfg.out}"])


def _key(c) -> str:
    i = c.inp
    return f"{i.kind}-{i.cut if i.cut is not None else 'x'}-{i.codec.replace('+', '_')}-{i.head_weights}"


def choose(decision: Decision, max_front: int) -> dict[str, tuple[str, Candidate]]:
    """The candidates to measure: the pick, up to ``max_front`` front members spread over the
    predicted latency range, and the baselines (edge-only, server-only raw and compressed)."""
    out: dict[str, tuple[str, Candidate]] = {}
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


def run_edge(prefix: list[str], plans: list, server: str, inputs: Path, out: Path, cfg, limit, where: str):
    """The edge runner (``edgerun``) as its own process, in the edge's namespace, under the edge's CPU
    limit (applied from here: inside the namespace the cgroup tree is not mounted) from when its
    sessions are built (``--gate``) to its end; what it measured is in ``out``. Returns the limit's
    emulation record."""
    from splitpoint.profiles.cpulimit import cpu_limit

    from .edgerun import GO, READY

    args = ["--plans", json.dumps(plans), "--server", server, "--inputs", str(inputs)]
    args += ["--seconds", str(cfg.seconds), "--min-requests", str(cfg.min_requests)]
    args += ["--max-requests", str(cfg.max_requests), "--out", str(out), "--gate"]
    with tempfile.TemporaryFile("w+") as errors:  # a pipe could fill while this waits for "ready"
        edge = subprocess.Popen(
            [*prefix, sys.executable, "-m", "splitpoint.app.bench.edgerun", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert edge.stdin is not None and edge.stdout is not None
        try:
            ready = edge.stdout.readline().strip() == READY
            if ready:
                with cpu_limit(limit, pid=edge.pid) as emulation:
                    edge.stdin.write(GO + "\n")
                    edge.stdin.flush()
                    edge.communicate()
            else:
                edge.kill()
                edge.communicate()
        finally:
            if edge.poll() is None:
                edge.kill()
                edge.wait()
        errors.seek(0)
        stderr = errors.read()
    if not ready or edge.returncode:
        raise SplitPointError(f"edge run failed on {where}: {stderr.strip()[-800:]}")
    return emulation


def profile_apart(h, role: str, limit: float | None, budget: float, work: Path):
    """The model profiled by ``splitpoint profile --quiet`` in a process of its own, under ``limit``.
    In the bench's process its other threads (the progress display) would spend the same CPU quota,
    and the device would look slower than it is to the edge runner, which runs alone there: the whole
    model was predicted 5-17 % slower than the edge runner then measured it."""
    from splitpoint.profiles.schema import load_measured

    out = work / f"profile-{h.name}-{role}.json"
    args = ["profile", str(h.path), "--role", role, "--threads", "1", "--budget", str(budget), "--quiet"]
    args += ["-o", str(out), *(["--cpus", str(limit)] if limit else [])]
    for name, dims in h.input_shapes.items():
        args += ["--input-shape", f"{name}:{'x'.join(str(d) for d in dims)}"]
    r = run_child(splitpoint_command(*args))
    if r.returncode:
        raise SplitPointError(f"profiling {h.name} as {role} failed: {r.stderr.strip()[-800:]}")
    return load_measured(out, h.sha256, h.input_shapes)


def window_for(cand, least: int) -> int:
    """Requests in flight needed to keep the slowest stage busy (Little's law: latency / the
    slowest stage's time), so the throughput phase measures the pipeline, not the window."""
    slowest_ms = 1000.0 / cand.throughput_ips if cand.throughput_ips > 0 else cand.latency_ms
    return int(min(32, max(least, -(-cand.latency_ms // slowest_ms) + 1)))


def _write_plan(m, cand, path: Path) -> None:
    from splitpoint.partitioner.emit import write_candidate

    if not path.exists():
        write_candidate(m.handle, cand, path, samples=m.samples)


def _inputs_file(h, n: int, path: Path) -> None:
    """The inputs the edge sends, with the unsplit model's outputs: a trained model's rendered task inputs
    (its cut tensors then compress as they do in use), else seeded random tensors."""
    from splitpoint.partitioner.fidelity import comparison_rules

    sess = h.whole_session()
    arrays: dict[str, np.ndarray] = {"n": np.array(n)}
    names = [i.name for i in sess.get_inputs()]
    arrays["input_names"] = np.array(names)
    # how the edge runner compares each output, as the planner does: its --scores axis (0, never a class
    # axis: none), whether it may be class scores, its rows per sample
    rules = dict(zip(h.index.outputs, comparison_rules(h), strict=True))
    ordered = [rules[o.name] for o in sess.get_outputs()]
    arrays["score_axes"] = np.array([axis or 0 for axis, _, _ in ordered], np.int64)
    arrays["class_scores"] = np.array([scores for _, scores, _ in ordered], np.bool_)
    arrays["rows_per_sample"] = np.array([k for _, _, k in ordered], np.int64)
    for k, feeds in enumerate(h.fidelity_samples(n, seed=1000)[0]):
        outs = sess.run(None, {nm: feeds[nm] for nm in names})
        arrays["n_outputs"] = np.array(len(outs))
        for j, nm in enumerate(names):
            arrays[f"in{k}_{j}"] = feeds[nm]
        for j, o in enumerate(outs):
            arrays[f"ref{k}_{j}"] = o
    np.savez(path, allow_pickle=False, **arrays)


def measure_network(
    m, decision, net, cfg: BenchConfig, plans_root: Path, inputs: Path, calib, work: Path, once: dict
) -> dict:
    """``once``: the model's edge-only measurement by plan key, with the network it was measured on;
    it sends nothing, so it is measured on the first network and the same figures stand for the others."""
    from splitpoint.partitioner.planner import link_of

    from .emulate import EmulatedLink, probe_link

    chosen = choose(decision, cfg.max_front)
    plan_dirs = {}
    for key, (_, cand) in chosen.items():
        _write_plan(m, cand, plans_root / key)
        plan_dirs[key] = plans_root / key
    local = {k for k, (_, c) in chosen.items() if c.inp.kind == "edge-only"}
    to_run = [k for k in plan_dirs if k not in once]
    serve_dir = work / f"serve-{net.name}"
    shutil.rmtree(serve_dir, ignore_errors=True)
    serve_dir.mkdir(parents=True)
    for key, d in plan_dirs.items():
        if chosen[key][1].inp.kind != "edge-only":
            (serve_dir / key).symlink_to(d.resolve())
    link = link_of(net)
    with EmulatedLink(link, cfg.link) as em:
        try:
            probe = probe_link(em, [(64, 64, 3), (65536, 64, 3)])
        except SplitPointError as exc:  # the report shows it; the runtime's own runs still go ahead
            probe = [{"error": str(exc)}]
        srv = start_server(
            em.server_bind, serve_dir, prefix=em.server_prefix, insecure=em.mechanism == "netns"
        )
        out = work / f"edge-{m.handle.name}-{net.name}.json"
        try:
            # the edge-only plan first: it needs no server, so the server has time to load its tails
            order = sorted(to_run, key=lambda k: k not in local)
            plans = [[str(plan_dirs[k]), window_for(chosen[k][1], cfg.window)] for k in order]
            edge_emulation = run_edge(
                em.edge_prefix, plans, em.edge_connect, inputs, out, cfg, calib.limit, net.name
            )
            check_running([srv])  # requests answered by a server that ran through, or the server's error
        except SplitPointError:
            check_running([srv])
            raise
        finally:
            stop(srv)
        edge_out = json.loads(out.read_text(encoding="utf-8"))
        mechanism = em.to_dict()
    rows = []
    for key in sorted(local - set(once)):
        once[key] = (net.name, edge_out["results"].get(str(plan_dirs[key]), {"error": "not run"}))
    for key, (role, cand) in chosen.items():
        if key in to_run:
            meas = edge_out["results"].get(str(plan_dirs[key]), {"error": "not run"})
        else:
            first, meas = once[key]
            meas = {**meas, "measured_on": first}
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


def bytes_at_fidelity(candidates: list[Candidate], floor: float) -> dict[str, dict]:
    """Per codec, the fewest bytes sent per inference by a candidate whose measured fidelity is at least
    ``floor`` (float head weights), against sending the raw input: "how much does a split save at this
    fidelity?". Only candidates whose fidelity the planner measured count (it measures the contenders:
    the pick's and the front's codecs at each cut); a codec it measured nowhere at the floor says how
    many of its candidates it measured (``bytes`` None), one it never measured is absent."""
    raws = (c.bytes_per_inference for c in candidates if c.inp.kind == "server-only" and c.inp.codec == RAW)
    raw = next(raws, None)
    out: dict[str, dict] = {}
    for c in candidates:
        i = c.inp
        if i.kind == "edge-only" or i.head_weights != "float32" or i.fidelity is None:
            continue
        best = out.setdefault(i.codec, {"bytes": None, "measured": 0})
        best["measured"] += 1
        if i.fidelity < floor:
            continue
        if best["bytes"] is None or c.bytes_per_inference < best["bytes"]:
            out[i.codec] = {
                "measured": best["measured"],
                "bytes": c.bytes_per_inference,
                "where": c.label,
                "fidelity": i.fidelity,
                "saved_vs_raw_input": 1 - c.bytes_per_inference / raw if raw else None,
            }
    return out


def check_model_names(models: Sequence[str]) -> None:
    """Each of --models a zoo name or an existing file, before anything is measured."""
    from splitpoint.core import zoo

    for name in models:
        if name not in zoo.ZOO and not Path(name).is_file():
            raise SplitPointError(
                f"--models: {name!r} is neither an ONNX file nor a zoo model (known: {', '.join(zoo.ZOO)})"
            )


def open_models_first(models: Sequence[str], input_shapes: Sequence[str], scores: Sequence[str] = ()) -> None:
    """Every model opened (a file that is not ONNX named now, not after minutes of calibration), every
    --input-shape matched by an input of some model and every --scores by an output of some model: a
    bench applies each to the models that have it, so a misspelt name was ignored without a word."""
    from splitpoint.core.graph import open_model
    from splitpoint.core.graph.shapes import parse_input_shapes
    from splitpoint.partitioner.fidelity import scores_for, set_score_axes

    shapes = parse_input_shapes(tuple(input_shapes))
    inputs: set[str] = set()
    used: set[str] = set()
    check_model_names(models)
    for name in models:
        try:
            h = open_model(name, shapes, only_present=True)
            mine = scores_for(h, scores)
            set_score_axes(h, mine)  # an axis the output does not have, now
        except ModelError as exc:  # one option for every model that has the name: say which model
            raise ModelError(f"{name}: {exc}") from exc
        inputs |= {i.name for i in h.model.graph.input}
        used |= set(mine)
    unknown = sorted(set(shapes) - inputs)
    if unknown:
        raise SplitPointError(
            f"--input-shape names {', '.join(map(repr, unknown))}: no model of --models has such an input"
        )
    unused = [s for s in scores if s not in used]
    if unused:
        raise SplitPointError(
            f"--scores {', '.join(map(repr, unused))}: no model of --models has such an output"
        )


def run_bench(cfg: BenchConfig, progress=None) -> dict:
    """Everything measured, returned as one JSON-ready dict (the report is written from it)."""
    from splitpoint.core.graph import open_model
    from splitpoint.core.graph.shapes import parse_input_shapes
    from splitpoint.partitioner.fidelity import scores_for, set_score_axes
    from splitpoint.partitioner.pareto import Constraints
    from splitpoint.partitioner.planner import decide, gather
    from splitpoint.profiles.facts import device_facts
    from splitpoint.profiles.schema import load_device, load_network

    from .edgecpu import calibrate_apart
    from .emulate import MECHANISMS
    from .hostload import HostLoad
    from .provenance import provenance

    t0 = time.perf_counter()
    load = HostLoad()
    say = progress or (lambda *a, **k: None)
    # every argument is checked before the minutes of calibration and profiling start
    device = load_device(cfg.device)
    nets = [load_network(n) for n in cfg.networks]
    check_model_names(cfg.models)
    if not cfg.models or not nets:
        raise SplitPointError("name at least one model and one network")
    if cfg.link not in MECHANISMS:
        raise SplitPointError(f"--link: unknown mechanism {cfg.link!r}; choose from {', '.join(MECHANISMS)}")
    say("calibrating the edge CPU", total=len(cfg.models) * len(nets))
    calib = calibrate_apart(device)
    work = Path(tempfile.mkdtemp(prefix="splitpoint-bench-"))
    results: dict[str, Any] = {
        "config": cfg.model_dump(mode="json"),
        "command": bench_command(cfg),
        "machine": {**device_facts(), **provenance()},
        "edge_calibration": calib.to_dict(),
        "models": {},
        "runs": [],
    }
    try:
        for name in cfg.models:
            tm = time.perf_counter()
            h = open_model(name, parse_input_shapes(cfg.input_shapes), only_present=True)
            set_score_axes(h, scores_for(h, cfg.scores))
            say(f"{h.name}: profiling edge ({calib.cpus:g} CPU) and server")
            edge = profile_apart(h, "edge", calib.limit, cfg.profile_budget, work)
            server = profile_apart(h, "server", None, cfg.profile_budget, work)
            say(f"{h.name}: planning for {len(nets)} networks")
            samples, truths, measured_on = h.fidelity_samples(cfg.fidelity_samples or (64 if h.task else 8))
            m = gather(h, edge, server, samples, codecs=list(cfg.codecs), truths=truths)
            decisions = decide(
                m, nets, Constraints(min_fidelity=cfg.min_fidelity), front_budget=cfg.front_budget
            )
            t_plan = time.perf_counter() - tm
            inputs = work / f"{h.name}-inputs.npz"
            _inputs_file(h, cfg.inputs, inputs)
            results["models"][h.name] = {
                "edge_whole_ms": edge.whole.median_ms,
                "server_whole_ms": server.whole.median_ms,
                "cuts": len(h.cuts()),
                "profile_and_plan_s": t_plan,
                "sha256": h.sha256,
                "weights": h.weights,
                "task": h.task,
                "fidelity_inputs": measured_on,
                "bytes_at_fidelity": bytes_at_fidelity(decisions[0].candidates, cfg.min_fidelity),
                "fidelity_measured_cuts": len({k[0] for k in m.fidelity}),
                "front_unmeasured": decisions[0].unmeasured,
            }
            once: dict = {}
            for net, d in zip(nets, decisions, strict=True):
                say(f"{h.name} on {net.name}: measuring")
                results["runs"].append(
                    measure_network(m, d, net, cfg, work / "plans" / h.name, inputs, calib, work, once)
                )
                say(None, advance=1)
            results["models"][h.name]["seconds"] = time.perf_counter() - tm
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["seconds"] = time.perf_counter() - t0
    results["host_load"] = load.measured()
    return results
