"""``splitpoint plan`` as a library call: a validated job in, the decision and the written plan out."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from pydantic import Field, field_validator

from splitpoint.core.codecs import Codec
from splitpoint.core.config import StrictConfig
from splitpoint.core.errors import ProfileError, SplitPointError
from splitpoint.core.graph import ModelHandle, open_model
from splitpoint.core.graph.shapes import parse_input_shapes
from splitpoint.core.plan import Plan, check_target
from splitpoint.core.planset import POLICIES, PlanSet
from splitpoint.profiles.schema import NetworkProfile, load_measured, load_network

from .chainplan import (
    ChainConstraints,
    ChainDecision,
    ChainMeasurements,
    decide_chain,
    gather_chain,
    numbered,
    plan_dict,
    write_chain,
)
from .costmodel import CandidateInput, Link, traffic_bytes
from .emit import write_candidate, write_plan_set
from .fidelity import set_score_axes
from .pareto import Constraints
from .planner import Decision, Measurements, decide, gather, link_of, measure_winners
from .planset import Member, bits_only_set, plan_set, sweep_links

Objective = Literal["latency", "throughput", "bytes", "edge-memory", "fidelity"]


class PlanJob(StrictConfig):
    label: ClassVar[str] = "plan"
    options: ClassVar[dict[str, str]] = {
        "max_latency_ms": "max-latency",
        "edge_memory_mib": "edge-memory",
        "rate_ips": "rate",
        "edge_profile": "edge-profile",
        "server_profile": "server-profile",
    }
    model: str  # ONNX path or zoo name
    edge_profile: Path
    server_profile: Path
    network: str  # network profile name or YAML path
    out: Path | None = None  # plan directory to write (none: decide only)
    max_latency_ms: float | None = Field(None, gt=0)
    min_fidelity: float | None = Field(None, ge=0, le=1)
    edge_memory_mib: float | None = Field(None, gt=0)
    max_bytes: int | None = Field(None, ge=0)
    objective: Objective = "latency"
    codecs: tuple[str, ...] | None = None
    int8_heads: bool = False
    inputs: Path | None = None  # folder of .npy files or images for fidelity
    random: int | None = Field(
        None, ge=1, le=100_000
    )  # fidelity samples: default 8 random, 64 for a trained model
    force: bool = False
    input_shapes: tuple[str, ...] = ()  # NAME:1x3x640x640, for inputs with symbolic dimensions
    scores: tuple[str, ...] = ()  # NAME[:AXIS]: outputs compared as class scores along AXIS (fidelity)
    rate_ips: float | None = Field(None, gt=0)  # plan sets: the arrival rate every member must keep up with
    with_full: bool = False  # ship the whole model too, for the edge to fall back on
    # (cut, head precision) pairs whose fidelity is measured for the front beyond the pick's (None: every
    # one the exact front needs; a Swin-T's 3,492 cuts took 6.5 minutes of tail runs here)
    front_budget: int | None = Field(None, ge=0)

    @field_validator("codecs")
    @classmethod
    def _codecs(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return None if v is None else tuple(Codec.parse(c).name for c in v)

    def constraints(self) -> Constraints:
        mem = int(self.edge_memory_mib * 2**20) if self.edge_memory_mib else None
        return Constraints(
            self.max_latency_ms, self.min_fidelity, mem, self.max_bytes, objective=self.objective
        )


@dataclass
class PlanOutcome:
    handle: ModelHandle
    network: NetworkProfile
    decision: Decision
    predicted: dict  # the pick's derived figures, with what they were derived from
    samples: list[dict[str, np.ndarray]]
    plan: Plan | None  # written when the job names an output directory
    constraints: Constraints | None = None  # the job's, as the pick honoured them


def job_shapes(given: Sequence[str], profiles: Sequence[Path]) -> dict:
    """The input shapes to plan at: those given (--input-shape), else those the profiles were measured at
    (a plan must be made at its profiles' shapes: asking for them again only repeated what the files
    say). Profiles that disagree are refused where they are checked against the model."""
    if given:
        return parse_input_shapes(list(given))
    for p in profiles:
        with contextlib.suppress(ProfileError):  # a missing or bad file is reported where it is loaded
            if shapes := load_measured(p).input_shapes:
                return dict(shapes)
    return {}


def fidelity_measure(handle: ModelHandle) -> str:
    """What a fidelity figure of this model means, for every output that shows one."""
    if handle.task:
        from .taskmetrics import PRIMARY

        return f"{handle.task} {PRIMARY[handle.task].replace('_', ' ')} with the unsplit model"
    named = "".join(f", top-1 at every position along axis {a} for {n}" for n, a in handle.score_axes.items())
    return (
        "agreement with the unsplit model, the worst output's: top-1 for class scores (a row per sample,"
        " not made by a normalisation or an activation, and on random inputs not one class on all of 8"
        " or more)"
        f"{named}, equal elements for integer outputs, cosine otherwise"
    )


def fidelity_facts(handle: ModelHandle, samples: int, measured_on: str) -> dict:
    """What a plan's fidelity figure was measured on and what it means, as the plan records it."""
    return {
        "fidelity_samples": samples,
        "fidelity_inputs": measured_on,
        "fidelity_measure": fidelity_measure(handle),
    }


def _load(job: PlanJob) -> tuple[ModelHandle, NetworkProfile, Measurements, str]:
    """Files, profiles and network checked first, then the measured facts of every candidate."""
    if job.out:
        check_target(job.out, job.force)
    handle = open_model(job.model, job_shapes(job.input_shapes, [job.edge_profile]))
    set_score_axes(handle, job.scores)
    network = load_network(job.network)
    edge = load_measured(job.edge_profile, handle.sha256, handle.input_shapes)
    server = load_measured(job.server_profile, handle.sha256, handle.input_shapes)
    for path, prof, want in ((job.edge_profile, edge, "edge"), (job.server_profile, server, "server")):
        if prof.role != want:  # named by its file: which of the two was given in the other's place
            raise ProfileError(
                f"{path} was measured in the {prof.role} role, and is given as --{want}-profile "
                f"(profile this model with --role {want} on the {want})"
            )
    n = job.random or (64 if handle.task else 8)
    samples, truths, measured_on = handle.fidelity_samples(n, job.inputs)
    with handle.sample_runs():
        m = gather(
            handle, edge, server, samples, list(job.codecs) if job.codecs else None, job.int8_heads, truths
        )
    return handle, network, m, measured_on


def run_plan(job: PlanJob, note: Callable[[str, int, int], None] | None = None) -> PlanOutcome:
    """Load and check everything first (files, profiles, network), then measure and decide."""
    handle, network, m, measured_on = _load(job)
    samples = m.samples
    cons = job.constraints()
    d = decide(m, [network], cons, note, front_budget=job.front_budget)[0]
    front = [c.to_dict() for c in d.front]
    predicted = {
        **d.pick.to_dict(),
        "network": network.model_dump(),
        "constraints": cons.__dict__,
        **fidelity_facts(handle, len(samples), measured_on),
    }
    plan = None
    if job.out:
        plan = write_candidate(
            handle,
            d.pick,
            job.out,
            samples=samples,
            predicted=predicted,
            front=front,
            force=job.force,
            include_full=job.with_full,
        )
    return PlanOutcome(handle, network, d, predicted, samples, plan, cons)


@dataclass
class PlanSetOutcome:
    handle: ModelHandle
    network: NetworkProfile
    members: list[Member]
    inputs: list[CandidateInput]  # every candidate's measured facts
    written: PlanSet | None
    rate_ips: float | None = None  # the arrival rate the members keep up with, if one was given
    predicted: dict | None = None  # what the fidelity was measured on (fidelity_facts)
    min_fidelity: float | None = None


def run_plan_set(
    job: PlanJob, policy: str = "adaptive", note: Callable[[str, int, int], None] | None = None
) -> PlanSetOutcome:
    """``splitpoint plan --set``: the few members each fastest over a range of uplink bandwidth (at the
    network profile's round trip and down/up ratio), every winner's fidelity measured; with
    ``bits-only`` the cut stays the one fastest on the profile's link and only the codec varies. The
    job's memory and bytes limits apply to every member; a latency limit has no meaning over a range."""
    if policy not in POLICIES:
        raise SplitPointError(f"--set: unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
    handle, network, m, measured_on = _load(job)
    facts = fidelity_facts(handle, len(m.samples), measured_on)
    link = link_of(network)
    mem = int(job.edge_memory_mib * 2**20) if job.edge_memory_mib else None
    members, inputs = set_members(
        m, link, policy, job.min_fidelity or 0.0, mem, job.max_bytes, note, rate_ips=job.rate_ips
    )
    down = link.downlink_mbps / link.uplink_mbps
    written = None
    if job.out:
        written = write_plan_set(
            handle,
            members,
            job.out,
            network=network.name,
            rtt_ms=link.rtt_ms,
            uplink_mbps=link.uplink_mbps,
            down_ratio=down,
            policy=policy,
            samples=m.samples,
            include_full=job.with_full,
            force=job.force,
            rate_ips=job.rate_ips,
            fidelity=facts,
        )
    return PlanSetOutcome(handle, network, members, inputs, written, job.rate_ips, facts, job.min_fidelity)


def set_members(
    m: Measurements,
    link: Link,
    policy: str,
    min_fidelity: float,
    edge_memory_bytes: int | None = None,
    max_bytes: int | None = None,
    note: Callable[[str, int, int], None] | None = None,
    rate_ips: float | None = None,
) -> tuple[list[Member], list[CandidateInput]]:
    """A plan set's members from measured facts (``link``: the round trip and down/up ratio the
    bandwidth sweep keeps), and every candidate's facts; the memory and bytes limits apply to each,
    and with ``rate_ips`` each member is one that keeps up with that arrival rate where any does."""
    down = link.downlink_mbps / link.uplink_mbps
    sweep = sweep_links(0.1, 10_000.0, 61, link.rtt_ms, down)

    def within(c: CandidateInput) -> bool:  # the limits `plan` applies, the same way
        return (edge_memory_bytes is None or c.edge_memory_bytes <= edge_memory_bytes) and (
            max_bytes is None or traffic_bytes(c) <= max_bytes
        )

    # the limits choose what is measured: applied after, they left the set to the few candidates the
    # sweep had measured without them (server-only where a cut within the memory limit was faster)
    inputs = measure_winners(m, sweep, min_fidelity, note, rate_ips, allowed=within)
    allowed = [c for c in inputs if within(c)]
    try:
        members = (
            plan_set(allowed, link.rtt_ms, down, min_fidelity, rate_ips=rate_ips)
            if policy == "adaptive"
            else bits_only_set(allowed, link, min_fidelity, rate_ips)
        )
    except ValueError as exc:
        raise SplitPointError(f"no plan set: {exc} within the memory and bytes limits") from exc
    return members, inputs


class ChainJob(StrictConfig):
    """``splitpoint plan-chain``: a model over an ordered chain of devices, one network per hop."""

    label: ClassVar[str] = "plan-chain"
    options: ClassVar[dict[str, str]] = {
        "max_latency_ms": "max-latency",
        "min_throughput_ips": "min-throughput",
        "memory_mib": "memory",
        "profiles": "profile",
    }
    model: str
    devices: tuple[str, ...] = Field(min_length=2, max_length=17)  # device names, edge first
    profiles: dict[str, Path]  # device name -> measured profile of the model there
    networks: tuple[str, ...] = Field(min_length=1, max_length=16)  # one per hop
    out: Path | None = None
    max_latency_ms: float | None = Field(None, gt=0)
    min_throughput_ips: float | None = Field(None, gt=0)
    min_fidelity: float | None = Field(None, ge=0, le=1)
    memory_mib: dict[str, float] = Field(default_factory=dict)  # device name -> memory budget
    max_hop_bytes: int | None = Field(None, ge=0)  # what any one hop may carry per request
    objective: Literal["latency", "throughput"] = "latency"
    codecs: tuple[str, ...] | None = None
    random: int | None = Field(None, ge=1, le=100_000)
    force: bool = False
    input_shapes: tuple[str, ...] = ()
    scores: tuple[str, ...] = ()  # NAME[:AXIS]: outputs compared as class scores along AXIS (fidelity)
    inputs: Path | None = None  # folder of samples for fidelity (the first also checks the plan's stages)

    @field_validator("codecs")
    @classmethod
    def _codecs(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return None if v is None else tuple(Codec.parse(c).name for c in v)

    @field_validator("memory_mib")
    @classmethod
    def _memory(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: m for k, m in v.items() if not m > 0 or m == float("inf")}
        if bad:
            raise ValueError(f"a device's memory must be a positive number of MiB: {bad}")
        return v


@dataclass
class ChainOutcome:
    measurements: ChainMeasurements
    decision: ChainDecision
    predicted: dict
    plan: Plan | None
    constraints: ChainConstraints | None = None  # the job's, which rows shown may miss (marked)


def run_chain_plan(job: ChainJob, note: Callable[[str, int, int], None] | None = None) -> ChainOutcome:
    """Load and check everything first (files, profiles, networks), then measure and decide."""
    if len(job.networks) != len(job.devices) - 1:
        raise SplitPointError(
            f"--networks: {len(job.devices)} devices need {len(job.devices) - 1} network profile(s), one "
            f"per hop; got {len(job.networks)}"
        )
    # a name given twice is one kind of device (one profile) in two places: numbered in the plan (pi,
    # pi-2), and a memory budget may name either the kind or one of them
    if job.out:
        check_target(job.out, job.force)
    names = numbered(job.devices)
    unknown = sorted(set(job.memory_mib) - set(job.devices) - set(names))
    if unknown:
        raise SplitPointError(f"--memory: no device named {', '.join(unknown)} in the chain")
    handle = open_model(job.model, job_shapes(job.input_shapes, list(job.profiles.values())))
    set_score_axes(handle, job.scores)
    networks = [load_network(n) for n in job.networks]
    missing = sorted({d for d in job.devices if d not in job.profiles})
    if missing:
        raise SplitPointError(f"--profile: no measured profile for {', '.join(missing)} (give NAME=FILE)")
    measured = {d: load_measured(p, handle.sha256, handle.input_shapes) for d, p in job.profiles.items()}
    profiles = {name: measured[kind] for name, kind in zip(names, job.devices, strict=True)}
    n = job.random or (64 if handle.task else 8)
    samples, truths, measured_on = handle.fidelity_samples(n, job.inputs)
    budget = [
        job.memory_mib.get(name, job.memory_mib.get(kind))
        for name, kind in zip(names, job.devices, strict=True)
    ]
    limits = [b * 2**20 if b is not None else None for b in budget]
    with handle.sample_runs():
        m = gather_chain(
            handle,
            names,
            profiles,
            networks,
            samples,
            list(job.codecs or []) or None,
            truths,
            limits,
            job.max_hop_bytes,
        )
    cons = ChainConstraints(job.max_latency_ms, job.min_throughput_ips, job.min_fidelity, job.objective)
    d = decide_chain(m, cons, note)
    predicted = {
        **plan_dict(m, d.pick),
        # every limit the pick was chosen under, the ones the search obeys exactly too
        "constraints": {
            **cons.__dict__,
            "memory_mib": dict(job.memory_mib),
            "max_hop_bytes": job.max_hop_bytes,
        },
        **fidelity_facts(handle, len(samples), measured_on),
        "pick_shown_best": d.exhaustive,  # False: the fidelity search ran out of runs (decide_chain)
    }
    plan = None
    if job.out:
        front = [plan_dict(m, p) for p in d.front]
        plan = write_chain(m, d.pick, job.out, predicted=predicted, front=front, force=job.force)
    return ChainOutcome(m, d, predicted, plan, cons)
