"""``splitpoint plan-decoder`` as a library call: a validated job in, the measured decision and the written
plan out. Every option is checked, and the output directory claimed, before the measurements: on an exported
decoder those take minutes, and a name already taken or a bad limit found after them loses that work."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from splitpoint.core.codecs import Codec
from splitpoint.core.config import StrictConfig
from splitpoint.core.decoders import Decoder, ZooDecoder, open_decoder
from splitpoint.core.plan import Plan, check_target
from splitpoint.core.plandir import write_decoder_plan
from splitpoint.profiles.schema import load_network

from .decoderplan import (
    DecoderCandidate,
    baselines,
    candidates,
    faster_baselines,
    measure,
    pick_at_floor,
    pick_fidelity,
    ranked,
)
from .planner import link_of

Note = Callable[..., None]


class DecoderPlanJob(StrictConfig):
    label: ClassVar[str] = "plan-decoder"
    options: ClassVar[dict[str, str]] = {
        "max_ttft_ms": "max-ttft",
        "max_tpot_ms": "max-tpot",
        "edge_memory_mib": "edge-memory",
    }
    model: str  # a zoo decoder's name or an exported decoder's ONNX file
    network: str = "lte"  # network profile name or YAML path
    edge_cpus: float | None = Field(None, gt=0)  # the edge's blocks measured under this CPU quota
    prompt_tokens: int = Field(32, ge=1)
    new_tokens: int = Field(64, ge=1)
    codecs: tuple[str, ...] = ("float32", "float16", "int8-ol", "int4-ol")
    head_weights: tuple[str, ...] = ("float32", "int4")  # the edge's weight precisions to consider
    max_ttft_ms: float | None = Field(None, gt=0)
    max_tpot_ms: float | None = Field(None, gt=0)
    edge_memory_mib: float | None = Field(None, gt=0)
    objective: Literal["tpot", "ttft"] = "tpot"
    min_agreement: float | None = Field(None, gt=0, le=1)  # floor on the pick's measured greedy agreement
    out: Path | None = None  # the pick's plan directory (none: decide only)
    force: bool = False
    seed: int = 0
    max_len: int | None = None

    @field_validator("codecs")
    @classmethod
    def _codecs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("no codec given")
        return tuple(Codec.parse(c).name for c in v)

    @field_validator("head_weights")
    @classmethod
    def _weights(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("name at least one: float32 and/or int4")
        if any(w not in ("float32", "int4") for w in v):
            raise ValueError(f"float32 and/or int4, not {','.join(v)!r}")
        return v

    @property
    def edge_memory_bytes(self) -> int | None:
        return int(self.edge_memory_mib * 2**20) if self.edge_memory_mib is not None else None


@dataclass
class DecoderPlanOutcome:
    decoder: Decoder
    candidates: list[DecoderCandidate]
    pick: DecoderCandidate | None  # None: no candidate within the limits, or none reaches the floor
    fidelity: dict | None  # the pick's, measured
    tried: list[dict]  # every fidelity measured on the way to the floor (--min-agreement)
    baselines: dict[str, dict]  # the whole model on the edge or the server, derived alike
    faster_baselines: list[str]  # those faster than the pick within the same limits
    plan: Plan | None = None
    within_limits: int = 0  # candidates within --max-ttft, --max-tpot, --edge-memory
    weights: str = field(default="")  # what the decoder's weights are, for every fidelity figure
    runtime_measured: bool = False  # the runtime's own time per step, in every candidate (else 0)

    def refusal(self, job: DecoderPlanJob) -> str | None:
        """Why nothing was picked, in the user's options' words; None when something was."""
        if self.pick is not None:
            return None
        if self.within_limits:
            got = ", ".join(f"{t['candidate']} {t['agreement']['value']:.3f}" for t in self.tried)
            return f"no split tried reaches greedy agreement {job.min_agreement:g}: {got}"
        # each limit given, and the best any split does on it: which one stands in the way, and by how much
        given = [
            (job.max_ttft_ms, "--max-ttft", "time to first token", lambda c: c.ttft_ms, "ms", 1.0),
            (job.max_tpot_ms, "--max-tpot", "time per output token", lambda c: c.tpot_ms, "ms", 1.0),
            (
                job.edge_memory_mib,
                "--edge-memory",
                "edge memory",
                lambda c: c.edge_memory_bytes,
                "MiB",
                2**20,
            ),
        ]
        parts = []
        for limit, flag, what, of, unit, scale in given:
            if limit is None or not self.candidates:
                continue
            least = min(of(c) for c in self.candidates) / scale
            verdict = "no split meets it" if least > limit else "some split meets it alone"
            parts.append(f"{flag} {limit:g} {unit} ({verdict}: the least {what} is {least:.2f} {unit})")
        return "no split meets every limit given: " + "; ".join(parts)


def run_decoder_plan(
    job: DecoderPlanJob,
    note: Note | None = None,
    runtime: Callable[[DecoderPlanJob], tuple[float, float]] | None = None,
) -> DecoderPlanOutcome:
    """Measure the decoder's blocks, rank every (cut, codec, edge weights) by the objective within the
    limits, measure the pick's fidelity (down the ranking until one reaches ``min_agreement``), and write
    its plan where the job says. ``runtime``: measures the runtime's own time per step (prefill, decode
    step, ms) for the job, counted in every candidate; it runs a server and a client, which this layer
    does not (the CLI passes ``splitpoint.app.decoderruntime``'s)."""
    say = note or (lambda *_, **__: None)
    if job.out is not None:
        check_target(job.out, job.force)
    link = link_of(load_network(job.network))
    dec = open_decoder(job.model, job.seed, job.max_len)
    say("measuring decoder blocks (edge and server)")
    m = measure(
        dec,
        seed=job.seed,
        codecs=job.codecs,
        head_weights=job.head_weights,
        prompt_tokens=job.prompt_tokens,
        new_tokens=job.new_tokens,
        edge_cpus=job.edge_cpus,
    )
    if runtime is not None:
        say("measuring the runtime's own time per step (decoder-tiny over loopback)")
        m = replace(m, overhead_ms=runtime(job))
    cands = candidates(m, link)
    limit = job.edge_memory_bytes
    order = ranked(cands, job.max_ttft_ms, job.max_tpot_ms, limit, job.objective)
    best = order[0] if order else None
    fid: dict | None = None
    tried: list[dict] = []
    if order and job.min_agreement is not None:
        say(f"measuring candidates' fidelity until one reaches agreement {job.min_agreement:g}")
        best, fid, tried = pick_at_floor(dec, order, job.min_agreement, job.seed)
    elif best is not None:
        say("measuring the pick's fidelity")
        fid = pick_fidelity(dec, best, job.seed)
    base = baselines(m, link)
    beaten_by = (
        faster_baselines(best, base, job.max_ttft_ms, job.max_tpot_ms, limit, job.objective) if best else []
    )
    weights = "random weights, zoo architecture" if isinstance(dec, ZooDecoder) else "the user's model"
    outcome = DecoderPlanOutcome(
        dec, cands, best, fid, tried, base, beaten_by, None, len(order), weights, runtime is not None
    )
    if best is None or job.out is None:
        return outcome
    outcome.plan = write_decoder_plan(
        dec,
        job.out,
        edge_layers=best.edge_layers,
        codec=best.codec,
        head_weights=best.head_weights,
        predicted={**best.to_dict(), "network": job.network, "fidelity": fid},
        force=job.force,
    )
    return outcome


def decoder_plan_json(r: DecoderPlanOutcome) -> dict:
    """What ``--json`` prints: the pick with its measured fidelity, the candidates and baselines (derived)."""
    return {
        "pick": {**r.pick.to_dict(), "fidelity": r.fidelity} if r.pick else None,
        "faster_baselines": r.faster_baselines,
        "candidates": [c.to_dict() for c in r.candidates],
        "fidelity_measured": r.tried,
        "baselines": r.baselines,
        "labels": {
            "candidates": "derived from measured blocks",
            "baselines": "derived",
            "fidelity": "measured",
            "runtime_ms": (
                "measured apart: decoder-tiny served and generated over loopback, less its derived time"
                if r.runtime_measured
                else "not measured (--no-runtime): the runtime's own time per step is left out (0)"
            ),
        },
    }
