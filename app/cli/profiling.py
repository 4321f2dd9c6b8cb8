"""Measuring a model on the machine the command runs on (the edge, or the server)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..console import console, err, progress
from .common import Model, OneSample, Quiet, Shapes, app


@app.command()
def profile(
    model: Model,
    role: Annotated[str, typer.Option(help="edge or server: where this machine sits in the split")] = "edge",
    out: Annotated[
        Path | None,
        typer.Option("-o", "--out", help="profile JSON (default profiles/measured/MODEL-ROLE.json)"),
    ] = None,
    threads: Annotated[
        int, typer.Option(help="onnxruntime intra-op threads (0 = onnxruntime's default)")
    ] = 1,
    provider: Annotated[str, typer.Option(help="onnxruntime execution provider")] = "CPUExecutionProvider",
    budget: Annotated[
        float,
        typer.Option(
            help="wall time allowed for the segments (session builds included), in multiples of one inference"
        ),
    ] = 30.0,
    cpus: Annotated[
        float | None, typer.Option(help="emulate a smaller device: limit to this many CPUs")
    ] = None,
    slowdown: Annotated[
        float | None, typer.Option("--emulate-slowdown", help="emulate a device this many times slower")
    ] = None,
    int8: Annotated[
        bool, typer.Option("--int8", help="also time the int8 (static QDQ) model, for int8-head plans")
    ] = False,
    runtime: Annotated[
        bool,
        typer.Option(
            "--runtime",
            help="also measure the runtime's own time per request here (a real edge client and server, "
            "under the same CPU limit): plan-chain adds it to this device's stage",
        ),
    ] = False,
    fresh_codecs: Annotated[
        bool,
        typer.Option(
            "--fresh-codecs",
            help="measure codec speeds again: by default a profile reuses those measured on this machine "
            "under the same CPU limit in the last 24 h (the profile's cost.codecs_source says when)",
        ),
    ] = False,
    input_shape: Shapes = None,
    inputs: OneSample = None,
    quiet: Quiet = False,
) -> None:
    """Measure the model on this machine: whole model, per node, and head/tail segments per cut."""
    from splitpoint.core.machine import usable_cores
    from splitpoint.profiles.job import ProfileJob, run_profile

    job = ProfileJob.of(
        model=model,
        role=role,
        out=out,
        threads=threads,
        provider=provider,
        budget=budget,
        cpus=cpus,
        slowdown=slowdown,
        int8=int8,
        input_shapes=tuple(input_shape or ()),
        fresh_codecs=fresh_codecs,
        inputs=inputs,
    )
    with progress("profiling", quiet) as note:
        prof, path = run_profile(job, note)
    if runtime:
        from ..bench.runtimecost import runtime_cost

        rt = runtime_cost(job.cpu_limit)
        prof = prof.model_copy(update={"runtime_ms": rt["ms"], "runtime_ms_per_mib": rt["ms_per_mib"]})
        prof.save(path)
    asked, got = job.cpu_limit, prof.emulation.cpus if prof.emulation else None
    if asked and got is not None and abs(got - asked) > 0.01 * asked:  # said under --quiet too
        err.print(
            f"[yellow]warning: asked for {asked:g} CPUs, got {got:g} "
            f"({prof.emulation.detail if prof.emulation else ''}): the profile is of a device of that "
            "many CPUs[/yellow]"
        )
    seen = prof.emulation.measured_slowdown if prof.emulation else None
    want = job.slowdown or (max(job.threads, 1) / asked if asked and asked < max(job.threads, 1) else None)
    if seen and want and abs(seen / want - 1) > 0.10:
        period_ms = (prof.emulation.period_us or 0) / 1e3 if prof.emulation else 0.0
        why = slowdown_reason(seen, want, job.threads or usable_cores(), prof.whole.median_ms, period_ms)
        err.print(
            f"[yellow]warning: the model ran {seen:.2f}x slower than at this machine's full speed, not the "
            f"{want:.2f}x asked: {why}; the profile is of the device measured ({seen:.2f}x)[/yellow]",
            highlight=False,
        )
    if not quiet:
        em = f", emulated: {prof.emulation.mechanism} {prof.emulation.cpus:g} CPUs" if prof.emulation else ""
        if prof.emulation and prof.emulation.measured_slowdown:
            em += f", {prof.emulation.measured_slowdown:.2f}x slower than this machine (measured)"
        console.print(
            f"{prof.model_name} ({role}{em}): whole model {prof.whole.median_ms:.2f} ms median (p90 "
            f"{prof.whole.p90_ms:.2f}), {len(prof.cost['measured_cuts'])} of {len(prof.cuts)} cuts "
            f"measured (the rest derived); took {prof.cost['wall_s']:.3g} s = "
            f"{prof.cost['wall_inference_equivalents']:.0f}x one "
            f"inference (wall clock, session builds included) → {path}"
        )
        if not prof.cost.get("derived_curve", "per-node").startswith("per-node"):
            console.print(f"[yellow]derived cuts follow {prof.cost['derived_curve']}[/yellow]")
        if prof.runtime_ms:
            console.print(
                f"runtime's own time per request (measured): {prof.runtime_ms['edge']:.2f} ms as an edge, "
                f"{prof.runtime_ms['server']:.2f} ms as a server, and per MiB of cut tensor "
                f"{prof.runtime_ms_per_mib['edge']:.2f} ms sent, {prof.runtime_ms_per_mib['server']:.2f} ms "
                "received"
            )


def slowdown_reason(seen: float, want: float, threads: int, whole_ms: float, period_ms: float) -> str:
    """Why a profile under a CPU limit ran ``seen`` times slower where ``want`` was asked."""
    if seen > want:
        if threads > 1:  # measured: --threads 2 --emulate-slowdown 4 ran ResNet-18 ~7x slower
            return (
                "onnxruntime's threads spin through the quota while they wait for one another "
                "(use --threads 1)"
            )
        return "a CFS quota this short is over-enforced by this kernel"
    if whole_ms < 20 * period_ms:
        return (
            f"the quota is enforced per period, and runs this short ({whole_ms:.2f} ms) were slowed less "
            "than asked"
        )
    return (
        "the machine's speed changed between the limited runs and the runs at full speed they are compared "
        "with (a busy machine)"
    )
