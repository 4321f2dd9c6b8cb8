"""`splitpoint bench --trace TRACE.yaml`: plan sets against a link that changes while requests arrive.

A trace is a list of phases (``network: lte``, ``seconds: 20``), optionally repeated or cycled up to a
total. Per model: the edge CPU calibrated to the device, both sides profiled, two plan sets built from
the same measurements (``adaptive``: cut and codec per bandwidth range; ``bits-only``: the cut fixed and
only the codec varied, as QuantPipe does), then, over one emulated link (the userspace link proxy: it
holds rate and delay both, so it can change them under live connections):

- every member of the adaptive set, fixed, on each network of the trace (the best fixed member of each
  phase is the yardstick);
- the adaptive set over the whole trace, the link reshaped live at each phase boundary;
- the bits-only set over the same trace.

Requests arrive at a fixed rate (open loop), from an edge process under the device's CPU limit
(``tracerun``). Every figure is measured; which member the planner expects per network is predicted.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, ValidationError, field_validator, model_validator

from splitpoint.app.process import check_started, start_server, stop
from splitpoint.core.config import Document, StrictConfig, explain_fields
from splitpoint.core.errors import SplitPointError
from splitpoint.core.textfiles import load_yaml, read_document

from .hostload import HostLoad
from .run import BENCH_CODECS, default_models, nonempty_names
from .tracereport import pct

MAX_PLAYED = 10_000  # phases a trace plays in all: each is a reshaping of the link and rows in the report


class Phase(Document):
    network: str
    # the link is reshaped at each boundary and a phase's latency is a median of its requests: a phase of
    # 1e-300 s passed, and cycling it up to total_seconds built phases until memory ran out
    seconds: float = Field(ge=0.1, le=86_400, allow_inf_nan=False)


class Trace(Document):
    """Phases in order; ``repeat`` plays the list that many times, ``total_seconds`` cycles it up to that
    time (the last phase cut short)."""

    phases: list[Phase] = Field(min_length=1, max_length=10_000)
    repeat: int = Field(1, ge=1, le=10_000)
    total_seconds: float | None = Field(None, gt=0, le=86_400, allow_inf_nan=False)

    @field_validator("phases")
    @classmethod
    def _networks_load(cls, v: list[Phase]) -> list[Phase]:
        from splitpoint.profiles.schema import load_network

        for p in v:
            load_network(p.network)
        return v

    @model_validator(mode="after")
    def _played_count(self) -> Trace:
        if self.total_seconds is not None and "repeat" in self.model_fields_set:
            raise ValueError(
                "give repeat (play the phases that many times) or total_seconds (cycle them up to that "
                "time), not both: one of them would be ignored"
            )
        cycle = sum(p.seconds for p in self.phases)
        n = (
            len(self.phases) * self.repeat
            if self.total_seconds is None
            else math.ceil(self.total_seconds / cycle) * len(self.phases)
        )
        if n > MAX_PLAYED:
            raise ValueError(f"plays {n:,} phases; at most {MAX_PLAYED:,} (longer phases, or fewer repeats)")
        return self

    def played(self) -> list[Phase]:
        """The phases as they are played, in order."""
        out: list[Phase] = []
        if self.total_seconds is None:
            return [p for _ in range(self.repeat) for p in self.phases]
        t, k = 0.0, 0
        while t < self.total_seconds - 1e-9:
            p = self.phases[k % len(self.phases)]
            s = min(p.seconds, self.total_seconds - t)
            out.append(Phase(network=p.network, seconds=s))
            t, k = t + s, k + 1
        return out


MAX_TRACE_BYTES = 16 * 2**20  # 10,000 phases are a few hundred KiB


def _beside(folder: Path, phase: object) -> object:
    """A phase whose network is a relative path to a file beside the trace, with that path: a trace and
    its network files travel together (`../net/x.yaml` in a trace was looked for from the working
    directory, "not found" from anywhere else). Where the trace's folder has no such file, the path
    stands as given (from the working directory), and a bundled name stays a name."""
    if not isinstance(phase, dict) or not isinstance(net := phase.get("network"), str):
        return phase
    given = Path(net)
    pathlike = "/" in net or os.sep in net or given.suffix in (".yaml", ".yml")
    if pathlike and not given.is_absolute() and (folder / given).exists():
        return {**phase, "network": str(folder / given)}
    return phase


def load_trace(path: str | Path) -> Trace:
    """A trace file or a bundled trace's name, checked whole (every network profile loads) before
    anything runs."""
    from splitpoint.profiles.schema import trace_path

    p, shown = trace_path(path), str(path)  # as given: Path("./x") prints as "x", which names a trace
    raw = read_document(p, "trace", MAX_TRACE_BYTES, load_yaml, SplitPointError, shown)
    if isinstance(raw, list):
        raw = {"phases": raw}
    if not isinstance(raw, dict):
        raise SplitPointError(f"trace {shown}: expected a list of phases or a mapping with 'phases'")
    if isinstance(raw.get("phases"), list):
        raw["phases"] = [_beside(p.parent, ph) for ph in raw["phases"]]
    try:
        return Trace(**raw)
    except ValidationError as exc:
        raise SplitPointError(f"trace {shown}: {explain_fields(exc)}") from None
    except SplitPointError as exc:
        raise SplitPointError(f"trace {shown}: {exc}") from None


class TraceBenchConfig(StrictConfig):
    label: ClassVar[str] = "bench --trace"
    trace: Path
    models: tuple[str, ...] = Field(default_factory=lambda: tuple(default_models())[:2])
    device: str = "rpi4"
    rate: float = Field(5.0, gt=0, le=200)  # requests per second
    adapt_window: int = Field(
        10, ge=1, le=1000
    )  # requests between the adaptive client's decisions (QuantPipe's 10)
    probe_every: int = Field(3, ge=1, le=1000)  # while on the edge: one request in this many probes the link
    # each fixed member on each network of the trace; None: as long as the longest phase on that network,
    # which a phase of the adaptive run is compared with (where no member keeps up, latency grows with
    # the queue: a 10 s run's median was half a 20 s phase's)
    fixed_seconds: float | None = Field(None, gt=0)
    min_fidelity: float = Field(0.99, ge=0, le=1)
    profile_budget: float = Field(12.0, gt=0)
    out: Path = Path("bench-results")
    input_shapes: tuple[str, ...] = ()
    scores: tuple[str, ...] = ()  # NAME[:AXIS], applied to each model with that output

    _nonempty = field_validator("models")(nonempty_names)

    @field_validator("trace")
    @classmethod
    def _trace_loads(cls, v: Path) -> Path:
        load_trace(v)
        return v

    @model_validator(mode="after")
    def _every_phase_gets_requests(self) -> TraceBenchConfig:
        """A phase no request arrives in has nothing to judge (a rate of 0.0001/s once reported every
        phase 'within 10 %' of nothing)."""
        for k, p in enumerate(load_trace(self.trace).played(), 1):
            if self.rate * p.seconds < 1:
                raise ValueError(
                    f"--rate {self.rate:g}/s brings no request in phase {k} ({p.network}, {p.seconds:g} s): "
                    f"give at least {1 / p.seconds:.3g}/s, or longer phases"
                )
        return self


def trace_command(cfg: TraceBenchConfig) -> str:
    parts = ["splitpoint bench", f"--trace {cfg.trace}", f"--rate {cfg.rate:g}"]
    parts += [f"--models {','.join(cfg.models)}", f"--device {cfg.device}"]
    parts += [f"--input-shape {s}" for s in cfg.input_shapes]
    parts += [f"--scores {s}" for s in cfg.scores]
    return " ".join([*parts, f"-o {cfg.out}"])


def run_trace_bench(cfg: TraceBenchConfig, progress=None) -> dict:
    from splitpoint.core.graph import open_model
    from splitpoint.core.graph.shapes import parse_input_shapes
    from splitpoint.partitioner.emit import write_plan_set
    from splitpoint.partitioner.fidelity import scores_for, set_score_axes
    from splitpoint.partitioner.job import set_members
    from splitpoint.partitioner.planner import gather, link_of
    from splitpoint.profiles.facts import device_facts
    from splitpoint.profiles.schema import load_device, load_network

    from .edgecpu import calibrate_apart
    from .provenance import provenance
    from .run import _inputs_file, profile_apart

    t0 = time.perf_counter()
    load = HostLoad()
    say = progress or (lambda *a, **k: None)
    trace = load_trace(cfg.trace)
    phases = trace.played()
    nets = {p.network: load_network(p.network) for p in phases}
    say("calibrating the edge CPU", total=len(cfg.models))
    calib = calibrate_apart(load_device(cfg.device))
    work = Path(tempfile.mkdtemp(prefix="splitpoint-trace-bench-"))
    results: dict[str, Any] = {
        "kind": "trace",
        "config": cfg.model_dump(mode="json"),
        "trace": [p.model_dump() for p in phases],
        "networks": {n: {"uplink_mbps": v.uplink_mbps, "rtt_ms": v.rtt_ms} for n, v in nets.items()},
        "machine": {**device_facts(), **provenance()},
        "edge_calibration": calib.to_dict(),
        "models": {},
    }
    try:
        for name in cfg.models:
            h = open_model(name, parse_input_shapes(cfg.input_shapes), only_present=True)
            set_score_axes(h, scores_for(h, cfg.scores))
            say(f"{h.name}: profiling edge ({calib.cpus:g} CPU) and server")
            edge = profile_apart(h, "edge", calib.limit, cfg.profile_budget, work)
            server = profile_apart(h, "server", None, cfg.profile_budget, work)
            say(f"{h.name}: plan sets")
            samples, truths, measured_on = h.fidelity_samples(64 if h.task else 8)
            m = gather(h, edge, server, samples, codecs=list(BENCH_CODECS), truths=truths)
            first = link_of(nets[phases[0].network])
            sets = {}
            for policy in ("adaptive", "bits-only"):
                members, _ = set_members(m, first, policy, cfg.min_fidelity, rate_ips=cfg.rate)
                d = work / h.name / policy
                write_plan_set(
                    h,
                    members,
                    d,
                    network=first.name,
                    rtt_ms=first.rtt_ms,
                    uplink_mbps=first.uplink_mbps,
                    down_ratio=first.downlink_mbps / first.uplink_mbps,
                    policy=policy,
                    samples=m.samples,
                    rate_ips=cfg.rate,
                )
                sets[policy] = d
            inputs = work / f"{h.name}-inputs.npz"
            _inputs_file(h, 4, inputs)
            res = _run_model(cfg, phases, nets, sets, inputs, calib.limit, work, say, h.name)
            res.update({"weights": h.weights, "fidelity_inputs": measured_on})
            results["models"][h.name] = res
            say(None, advance=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["seconds"] = time.perf_counter() - t0
    results["host_load"] = load.measured()
    return results


def fixed_seconds(given: float | None, phases: list[Phase]) -> dict[str, float]:
    """How long each fixed member runs on each network of the trace: ``given``, else as long as the
    longest phase on that network, which a phase of the adaptive run is compared with."""
    nets = dict.fromkeys(p.network for p in phases)
    return {n: given or max(p.seconds for p in phases if p.network == n) for n in nets}


def _run_model(cfg, phases, nets, sets, inputs, limit, work, say, name) -> dict:
    from splitpoint.core.planset import PlanSet
    from splitpoint.partitioner.planner import link_of

    from .emulate import EmulatedChain

    adaptive, _ = PlanSet.load(sets["adaptive"])
    bits, _ = PlanSet.load(sets["bits-only"])
    order = list(dict.fromkeys(p.network for p in phases))
    first = link_of(nets[phases[0].network])
    total = sum(p.seconds for p in phases)
    links = {n: link_of(nets[n]) for n in order}
    out: dict[str, Any] = {
        "members": [_member(m, links) for m in adaptive.members],
        "bits_only_members": [_member(m) for m in bits.members],
        "expected": {n: adaptive.index_for(nets[n].uplink_mbps) for n in order},
        "fixed": {n: {} for n in order},
        "fixed_seconds": fixed_seconds(cfg.fixed_seconds, phases),
    }
    emu = EmulatedChain([first], "proxy")
    with emu as hops:
        em = hops.hop(0)
        timeline = (emu, phases, {n: link_of(v) for n, v in nets.items()})
        for policy, set_dir in (("adaptive", sets["adaptive"]), ("bits-only", sets["bits-only"])):
            srv = start_server(em.server_bind, set_dir, prefix=em.server_prefix)
            try:
                check_started([srv])
                if policy == "adaptive":
                    for net in order:
                        emu.reshape(0, link_of(nets[net]))
                        for mem in adaptive.members:
                            say(f"{name}: {mem.label} fixed on {net}")
                            r = _edge_run(
                                cfg,
                                em,
                                "fixed",
                                set_dir / mem.dir,
                                inputs,
                                out["fixed_seconds"][net],
                                None,
                                limit,
                                work,
                            )
                            out["fixed"][net][mem.label] = _summary(r)
                emu.reshape(0, first)
                say(f"{name}: {policy} over the trace ({total:g} s)")
                run = _edge_run(
                    cfg, em, "adaptive", set_dir, inputs, total, first.uplink_mbps, limit, work, timeline
                )
                out["adaptive" if policy == "adaptive" else "bits_only"] = run
            finally:
                stop(srv)
    for key in ("adaptive", "bits_only"):
        out[key]["phases"] = _phases(out[key], phases, cfg.rate)
    _judge(out, phases, cfg)
    return out


def _member(m, links: dict | None = None) -> dict:
    """A member's range, and (with ``links``) what the planner predicted for it on each network from
    the measured profiles: the reason the set expects it where it does."""
    from splitpoint.partitioner.costmodel import CandidateInput, evaluate

    out = {"label": m.label, "lo_mbps": m.lo_mbps, "hi_mbps": m.hi_mbps, "plan_id": m.plan_id}
    if links and m.facts:
        evs = {n: evaluate(CandidateInput(**m.facts), link) for n, link in links.items()}
        out["predicted"] = {
            n: {"latency_ms": e.latency_ms, "served_ips": e.throughput_ips} for n, e in evs.items()
        }
    return out


def _edge_run(cfg, em, mode, d, inputs, seconds, start_mbps, limit, work, timeline=None) -> dict:
    """``tracerun`` under the edge's CPU limit; with ``timeline`` (the emulated chain, the phases, their
    links), the link is reshaped at each phase boundary on the clock the edge started on."""
    from splitpoint.profiles.cpulimit import cpu_limit

    outf = work / f"trace-{time.monotonic_ns()}.json"
    args = ["--mode", mode, "--dir", str(d), "--server", em.edge_connect, "--inputs", str(inputs)]
    args += ["--rate", str(cfg.rate), "--seconds", str(seconds), "--adapt-window", str(cfg.adapt_window)]
    args += ["--probe-every", str(cfg.probe_every)]
    args += ["--out", str(outf), *(["--start-mbps", str(start_mbps)] if start_mbps else [])]
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [*em.edge_prefix, sys.executable, "-m", "splitpoint.app.bench.tracerun", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        assert proc.stdin is not None and proc.stdout is not None  # both PIPE
        reshaped: list[dict] = []
        with cpu_limit(limit, pid=proc.pid):
            if proc.stdout.readline().strip() != "ready":
                proc.wait()
                err.seek(0)
                raise SplitPointError(f"trace edge run failed to start: {err.read().strip()[-800:]}")
            start = time.time() + 0.5
            proc.stdin.write(f"{start!r}\n")
            proc.stdin.flush()
            if timeline is not None:
                emu, phases, links = timeline
                at = 0.0
                for p_prev, p in zip(phases, phases[1:], strict=False):
                    at += p_prev.seconds
                    time.sleep(max(0.0, start + at - time.time()))
                    if p.network != p_prev.network:
                        emu.reshape(0, links[p.network])
                    reshaped.append({"t": time.time() - start, "network": p.network})
            proc.wait()
        if proc.returncode:
            err.seek(0)
            raise SplitPointError(f"trace edge run failed: {err.read().strip()[-800:]}")
    res = json.loads(outf.read_text(encoding="utf-8"))
    res["reshaped"] = reshaped
    return res


def _median(rows: list[dict]) -> float | None:
    """Median latency with each failed request counted as never answered: an edge that refuses what its
    link cannot carry in time would otherwise look fast by answering only the lucky ones. None where half
    or more failed (then the share answered tells policies apart)."""
    ms = sorted(r["ms"] if r["error"] is None else math.inf for r in rows)
    mid = statistics.median(ms) if ms else math.inf
    return mid if math.isfinite(mid) else None


def _answered(rows: list[dict]) -> float | None:
    return sum(r["error"] is None for r in rows) / len(rows) if rows else None


def _summary(run: dict) -> dict:
    ok = [r for r in run["rows"] if r["error"] is None]
    # answers per second from the first due time to the last answer (measured): below the arrival rate,
    # the member cannot keep up and its latency is a queue's, growing with the run's length
    span = max((r["t"] + r["ms"] / 1e3 for r in ok), default=0.0) - min((r["t"] for r in ok), default=0.0)
    return {
        "requests": run["requests"],
        "median_ms": _median(run["rows"]),
        "answered": _answered(run["rows"]),
        "failed": run["failed"],
        "lost": run["lost"],
        "served_ips": len(ok) / span if span > 0 else None,
        "answers": run.get("answers", {}),  # against the unsplit model (tracerun)
    }


def _bounds(phases: list[Phase]) -> list[float]:
    out, t = [], 0.0
    for p in phases:
        out.append(t)
        t += p.seconds
    return [*out, t]


def _phases(run: dict, phases: list[Phase], rate: float) -> list[dict]:
    b = _bounds(phases)
    rows = []
    for j, p in enumerate(phases):
        lo, hi = b[j], b[j + 1]
        mine = [r for r in run["rows"] if lo <= r["t"] < hi]
        used: dict[str, int] = {}
        for r in mine:
            if r["member"] is not None:
                used[str(r["member"])] = used.get(str(r["member"]), 0) + 1
        est = [r["uplink_mbps_est"] for r in mine if r.get("uplink_mbps_est") is not None]
        rtt = [r["rtt_ms_est"] for r in mine if r.get("rtt_ms_est") is not None]
        age = [r["rtt_age_s"] for r in mine if r.get("rtt_age_s") is not None]
        rows.append(
            {
                "network": p.network,
                # the edge's own estimate while the phase ran (medians): what its choices were made on
                "uplink_mbps_estimated": statistics.median(est) if est else None,
                "rtt_ms_estimated": statistics.median(rtt) if rtt else None,
                # how old that round trip was (its last ping; a busy link sends none): the median
                "rtt_age_s": statistics.median(age) if age else None,
                "seconds": p.seconds,
                "start_s": lo,
                "requests": len(mine),
                "failed": sum(r["error"] is not None for r in mine),
                "answered": _answered(mine),
                "median_ms": _median(mine),
                "switches": sum(lo <= s["t"] < hi for s in run["switches"]),
                "members_used": used,
                "first_request": math.ceil(lo * rate - 1e-9),
            }
        )
    return rows


def _judge(out: dict, phases: list[Phase], cfg: TraceBenchConfig) -> None:
    """Each phase beside its best fixed member and the bits-only run; the done-when verdicts."""
    a, bo = out["adaptive"], out["bits_only"]
    labels = [m["label"] for m in out["members"]]
    changes = []
    for j, row in enumerate(a["phases"]):
        here = out["fixed"][row["network"]]
        fixed = {k: v["median_ms"] for k, v in here.items() if v["median_ms"] is not None}
        shares = {k: v.get("answered") or 0.0 for k, v in here.items()}
        # the fastest member that answered at least half its requests; where none did, the one that
        # answered most, and the phase is judged by its share answered instead of a median
        best = (
            min(fixed, key=fixed.__getitem__)
            if fixed
            else max(shares, key=shares.__getitem__)
            if shares
            else None
        )
        row["best_fixed_member"] = best
        row["best_fixed_median_ms"] = fixed.get(best) if best else None
        row["best_fixed_answered"] = shares.get(best) if best else None
        served = [v.get("served_ips") for v in here.values()]
        served = [x for x in served if x is not None]
        # no fixed member kept up with the arrivals on this network (measured): every latency here is
        # a queue's, and depends on what the phase inherited from the one before
        row["overloaded"] = bool(served) and max(served) < 0.95 * cfg.rate
        row["bits_only_median_ms"] = bo["phases"][j]["median_ms"]
        if not row["requests"]:
            row["within_10pct"] = None  # nothing arrived in it: no data, not a pass
        elif row["best_fixed_median_ms"] is not None:
            row["within_10pct"] = (
                row["median_ms"] is not None and row["median_ms"] <= 1.1 * row["best_fixed_median_ms"]
            )
        else:
            row["within_10pct"] = best is not None and (row["answered"] or 0.0) * 1.1 >= shares[best]
        if j == 0:
            continue
        prev = out["expected"][phases[j - 1].network]
        want = out["expected"][row["network"]]
        if want == prev:
            continue
        # the member the edge was on when the link changed, and its first switch away from it in this
        # phase (to the member its own estimate and the arrival rate pick, which may differ from the
        # set's range at the profile's nominal uplink); none is needed if it was on the expected one
        # already (a switch then is a late move for the phase before, counted against "at most 1")
        was = _member_at(a, row["start_s"])
        end = row["start_s"] + row["seconds"]
        away = [s for s in a["switches"] if row["start_s"] <= s["t"] < end and s["from"] == was]
        first = away[0] if away and was != want else None
        delay = 0 if was == want else first["request"] - row["first_request"] if first else None
        fixed_here = out["fixed"][row["network"]]
        was_label = labels[was] if was is not None else labels[prev]
        changes.append(
            {
                "phase": j,
                # both members' medians, each fixed on this phase's network (measured): a late switch
                # from a member that is no slower here costs nothing
                "from_fixed_ms": fixed_here.get(was_label, {}).get("median_ms"),
                "to_fixed_ms": fixed_here.get(labels[want], {}).get("median_ms"),
                "from": was_label,
                "to": first["to_label"] if first else labels[want],
                "switch_after_requests": delay,
                "within_2_windows": delay is not None and delay <= 2 * cfg.adapt_window,
            }
        )
    a["changes"] = changes
    ok_a = [r["ms"] for r in a["rows"] if r["error"] is None]
    ok_b = [r["ms"] for r in bo["rows"] if r["error"] is None]
    a["median_ms"], bo["median_ms"] = _median(a["rows"]), _median(bo["rows"])
    a["answered"], bo["answered"] = _answered(a["rows"]), _answered(bo["rows"])
    a["mean_ms"] = statistics.fmean(ok_a) if ok_a else None
    bo["mean_ms"] = statistics.fmean(ok_b) if ok_b else None
    n_phase = len(a["phases"])
    lower = sum(
        r["median_ms"] is not None and b["median_ms"] is not None and r["median_ms"] <= b["median_ms"]
        for r, b in zip(a["phases"], bo["phases"], strict=True)
    )
    # a set of one plan adapts nothing: adaptive and bits-only then run the same plan, and which of
    # the two comes out faster is noise, not a verdict on either policy
    same = len(out["members"]) == 1 and [m["label"] for m in out["bits_only_members"]] == [
        out["members"][0]["label"]
    ]
    judged = [r for r in a["phases"] if r["within_10pct"] is not None]
    missed = [r for r in judged if not r["within_10pct"]]
    one_plan = len(out["members"]) == 1
    why = ""
    if missed and all(r.get("overloaded") for r in missed):
        why = (
            f"; every phase missed is one where no fixed member kept up with {cfg.rate:g}/s "
            "(measured), so its latency is a queue's"
        )
    out["targets"] = [
        _t(
            "0 lost and 0 duplicate requests",
            f"{a['lost']} lost, {a['duplicates']} duplicates",
            a["lost"] == 0 and a["duplicates"] == 0,
        ),
        _t(
            "a switch within 2 windows of each change",
            f"{sum(c['within_2_windows'] for c in changes)} of {len(changes)} changes"
            + (" (the same member is best on every network: none needed)" if not changes else ""),
            all(c["within_2_windows"] for c in changes),
        ),
        _t(
            "at most 1 switch in each phase",
            f"{sum(r['switches'] <= 1 for r in a['phases'])} of {n_phase} phases",
            all(r["switches"] <= 1 for r in a["phases"]),
        ),
        _t(
            "each phase's median within 10 % of its best fixed member",
            f"{sum(bool(r['within_10pct']) for r in judged)} of {len(judged)} phases{why}"
            + (f" ({n_phase - len(judged)} phases had no request)" if len(judged) < n_phase else "")
            + (
                f"; the set is the one plan {out['members'][0]['label']}, its own best fixed member: the "
                "difference is the machine's run-to-run spread"
                if one_plan
                else ""
            ),
            # a set of one plan is the fixed member it is compared with
            None if one_plan or not judged else not missed,
        ),
        _t(
            "adaptive median below bits-only",
            f"{_ms(a['median_ms'])} vs {_ms(bo['median_ms'])} (failed requests counted as never answered); "
            f"answered {pct(a['answered'])} vs {pct(bo['answered'])}; means of the answered "
            f"{_ms(a['mean_ms'])} vs {_ms(bo['mean_ms'])}; adaptive's phase median at or below "
            f"bits-only's in {lower} of "
            f"{n_phase} phases (an overall median of two networks' latencies falls between their modes)"
            + (
                f"; both sets hold the one plan {out['members'][0]['label']}: the two runs are the same "
                "policy, and their difference is the machine's run-to-run spread"
                if same
                else ""
            ),
            # bits-only failing half its requests has no median: any adaptive median is below it
            None
            if same
            else a["median_ms"] is not None and (bo["median_ms"] is None or a["median_ms"] < bo["median_ms"]),
        ),
    ]


def _member_at(run: dict, t: float) -> int | None:
    """The member the run was on at time ``t``: the last switch's before it, else the one it began on."""
    before = [s for s in run["switches"] if s["t"] < t]
    if before:
        return int(before[-1]["to"])
    if run["switches"]:
        return int(run["switches"][0]["from"])
    first = next((r["member"] for r in run["rows"] if r.get("member") is not None), None)
    return None if first is None else int(first)


def _t(target: str, shown: str, met: bool | None) -> dict:
    """``met`` None: the target does not apply to this run (said why in ``shown``)."""
    return {"target": target, "shown": shown, "met": None if met is None else bool(met)}


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f} ms"
