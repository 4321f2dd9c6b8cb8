"""Choosing cuts and codecs from measured profiles: one plan, a plan set over bandwidth, or a
chain of devices."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from splitpoint.core.errors import SplitPointError

from ..console import progress, show_plan, show_plan_set
from .common import (
    FidelityInputs,
    Model,
    Scores,
    Shapes,
    _check_plot_path,
    _codec_list,
    _print_json,
    app,
    require,
)


@app.command()
def plan(
    model: Model,
    edge_profile: Annotated[Path, typer.Option(help="profile measured on the edge device")],
    server_profile: Annotated[Path, typer.Option(help="profile measured on the server")],
    network: Annotated[str, typer.Option(help="network profile name (see profiles/networks) or YAML path")],
    out: Annotated[Path | None, typer.Option("-o", "--out", help="plan directory to write")] = None,
    max_latency: Annotated[float | None, typer.Option(help="ms")] = None,
    min_fidelity: Annotated[
        float | None,
        typer.Option(
            help="e.g. 0.99: agreement with the unsplit model (top-1 for class scores, cosine for other "
            "outputs, the task's metric for trained zoo models; the output says which)"
        ),
    ] = None,
    edge_memory: Annotated[float | None, typer.Option(help="edge memory budget, MiB")] = None,
    max_bytes: Annotated[
        int | None,
        typer.Option(
            help="bytes sent and received per inference: the encoded cut tensor and the reply "
            "(TCP/IP framing not counted)"
        ),
    ] = None,
    objective: Annotated[
        str, typer.Option(help="latency | throughput | bytes | edge-memory | fidelity")
    ] = "latency",
    codecs: Annotated[
        str | None, typer.Option(help="comma-separated codecs to consider (default: a standard set)")
    ] = None,
    int8_heads: Annotated[
        bool, typer.Option("--int8-heads", help="also consider int8-weight heads (edge profiled with --int8)")
    ] = False,
    inputs: FidelityInputs = None,
    random: Annotated[
        int | None,
        typer.Option(
            help="fidelity samples when no --inputs: seeded random (8), or rendered task inputs for a "
            "trained zoo model (64)"
        ),
    ] = None,
    plot: Annotated[Path | None, typer.Option(help="write a PNG of the front")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace a non-empty plan directory")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the decision as JSON")] = False,
    input_shape: Shapes = None,
    scores: Scores = None,
    plan_set: Annotated[
        str | None,
        typer.Option(
            "--set",
            help="write a plan set for run-time switching: adaptive (cut and codec follow the uplink) or "
            "bits-only (the cut fixed, the codec follows it)",
        ),
    ] = None,
    rate: Annotated[
        float | None,
        typer.Option(
            help="with --set: requests per second arriving; each member keeps up with it where any can"
        ),
    ] = None,
    with_full: Annotated[
        bool,
        typer.Option(
            "--with-full",
            help="ship the whole model too: the edge answers locally while the server is out of reach",
        ),
    ] = False,
    front_budget: Annotated[
        int | None,
        typer.Option(
            help="cuts whose fidelity is measured for the front beyond the pick's (each a run of the tail "
            "over every sample) \\[default: all the exact front needs: minutes on a model of thousands "
            "of cuts]"
        ),
    ] = None,
) -> None:
    """Choose where to cut and how to compress from measured profiles; write the plan (or, with --set,
    the few plans each fastest over a range of uplink bandwidth)."""
    from splitpoint.partitioner.job import PlanJob, run_plan

    job = PlanJob.of(
        model=model,
        edge_profile=edge_profile,
        server_profile=server_profile,
        network=network,
        out=out,
        max_latency_ms=max_latency,
        min_fidelity=min_fidelity,
        edge_memory_mib=edge_memory,
        max_bytes=max_bytes,
        objective=objective,
        codecs=_codec_list(codecs),
        int8_heads=int8_heads,
        inputs=inputs,
        random=random,
        force=force,
        input_shapes=tuple(input_shape or ()),
        scores=tuple(scores or ()),
        rate_ips=rate,
        with_full=with_full,
        front_budget=front_budget,
    )
    if rate is not None and plan_set is None:
        raise typer.BadParameter("--rate chooses plan-set members; it goes with --set")
    if plan_set is not None:
        if plot:
            raise typer.BadParameter("--plot draws one link's front; it does not go with --set")
        if front_budget is not None:
            raise typer.BadParameter(
                "--front-budget bounds one link's front; a set measures its members only"
            )
        # a set's members are each the fastest over a range of bandwidth: a latency limit or another
        # objective has no one link to be judged at (the memory, bytes and fidelity limits apply to each)
        if max_latency is not None:
            raise typer.BadParameter(
                "--max-latency has no one link to be judged at in a plan set (each member is the fastest "
                "over its own range of bandwidth); leave it out, or plan one link without --set"
            )
        if objective != "latency":
            raise typer.BadParameter(
                f"--objective {objective}: a plan set's members are chosen by latency over bandwidth; "
                "leave it out, or plan one link without --set"
            )
        _plan_set(job, plan_set, as_json)
        return
    if plot:
        require("matplotlib", "--plot")
        _check_plot_path(plot)
    with progress("planning", as_json) as note:
        r = run_plan(job, note)
    if plot:
        from ..plots import plot_front

        plot_front(
            r.decision.candidates,
            r.decision.front,
            r.decision.pick,
            plot,
            f"{r.handle.name} on {r.network.name}",
            r.constraints,
        )
    if as_json:
        _print_json({"pick": r.predicted, "front": [c.to_dict() for c in r.decision.front]})
    else:
        show_plan(r, objective, out)


def _plan_set(job: Any, policy: str, as_json: bool) -> None:
    from splitpoint.partitioner.job import run_plan_set

    with progress("planning a set", as_json) as note:
        rs = run_plan_set(job, policy, note)
    if as_json:
        _print_json(rs.written.model_dump(mode="json") if rs.written else [m.label for m in rs.members])
    else:
        show_plan_set(rs, job.out)


@app.command("plan-chain")
def plan_chain(
    model: Model,
    devices: Annotated[str, typer.Option(help="device names in order, edge first, e.g. pi,pi,server")],
    profile: Annotated[
        list[str], typer.Option(help="NAME=FILE: the model's profile measured on that device; one per device")
    ],
    networks: Annotated[str, typer.Option(help="network profile per hop, comma-separated, in order")],
    out: Annotated[Path | None, typer.Option("-o", "--out", help="plan directory to write")] = None,
    max_latency: Annotated[float | None, typer.Option(help="ms")] = None,
    min_throughput: Annotated[float | None, typer.Option(help="inferences per second")] = None,
    min_fidelity: Annotated[float | None, typer.Option(help="e.g. 0.99")] = None,
    memory: Annotated[
        list[str] | None, typer.Option(help="NAME=MiB: a device's memory budget for its segment")
    ] = None,
    max_hop_bytes: Annotated[
        int | None,
        typer.Option(
            help="bytes any one hop may carry per request, both ways: the cut tensor and the reply (a "
            "metered link)"
        ),
    ] = None,
    objective: Annotated[str, typer.Option(help="latency | throughput")] = "latency",
    codecs: Annotated[str | None, typer.Option(help="comma-separated codecs to consider per hop")] = None,
    random: Annotated[int | None, typer.Option(help="fidelity samples (default 8; 64 for trained)")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace a non-empty plan directory")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the decision as JSON")] = False,
    input_shape: Shapes = None,
    scores: Scores = None,
    inputs: FidelityInputs = None,
) -> None:
    """Choose cuts and codecs for a chain of devices jointly (edge, relays, server); write the plan."""
    from splitpoint.partitioner.chainplan import numbered, plan_dict
    from splitpoint.partitioner.job import ChainJob, run_chain_plan

    def pairs(items: list[str] | None, what: str) -> dict[str, str]:
        out_: dict[str, str] = {}
        for item in items or []:
            name, sep, value = item.partition("=")
            if not sep or not name or not value:
                raise SplitPointError(f"--{what}: expected NAME=VALUE, got {item!r}")
            if name in out_:  # the last one silently won
                raise SplitPointError(f"--{what}: {name} is given twice ({out_[name]!r} and {value!r})")
            chain = [x for x in devices.split(",") if x]
            # --memory may name one of two alike devices as the plans do (pi-2); --profile a kind
            known = chain if what == "profile" else list(dict.fromkeys([*chain, *numbered(chain)]))
            if name not in known:  # silently ignored before
                raise SplitPointError(f"--{what}: {name!r} is not a device of --devices ({', '.join(known)})")
            out_[name] = value
        return out_

    job = ChainJob.of(
        model=model,
        devices=tuple(x for x in devices.split(",") if x),
        profiles=pairs(profile, "profile"),
        networks=tuple(x for x in networks.split(",") if x),
        out=out,
        max_latency_ms=max_latency,
        min_throughput_ips=min_throughput,
        min_fidelity=min_fidelity,
        memory_mib=pairs(memory, "memory"),
        max_hop_bytes=max_hop_bytes,
        objective=objective,
        codecs=_codec_list(codecs),
        random=random,
        force=force,
        inputs=inputs,
        input_shapes=tuple(input_shape or ()),
        scores=tuple(scores or ()),
    )
    with progress("planning the chain", as_json) as note:
        r = run_chain_plan(job, note)
    if as_json:
        m = r.measurements
        _print_json(
            {
                "pick": r.predicted,
                "front": [plan_dict(m, p) for p in r.decision.front],
                "baselines": {k: plan_dict(m, p) for k, p in r.decision.baselines.items()},
            }
        )
    else:
        from ..console import show_chain

        show_chain(r, out)
