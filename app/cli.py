"""The ``splitpoint`` command line: one sub-command per job, each a few lines of wiring.

A command parses its options, builds a validated config or job, calls one library function and prints
what it returns (``console.py`` builds the tables). Every model argument is an ONNX path or a zoo name.
Errors caused by input print one specific line and exit 2; nothing is half-written.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import signal
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.markup import escape

from splitpoint.core.errors import SplitPointError, first_line, os_reason

from .console import (
    console,
    cuts_table,
    err,
    fidelity_table,
    human_bytes,
    progress,
    show_decoder_plan,
    show_plan,
    show_plan_set,
    table,
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Split ONNX inference between an edge device and a server, chosen from measurements.",
)
edge_app = typer.Typer(add_completion=False, no_args_is_help=True, help="The edge daemon.")
app.add_typer(edge_app, name="edge")

Model = Annotated[str, typer.Argument(help="ONNX file or zoo name")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no progress output (daemons, scripts)")]
Mqtt = Annotated[str | None, typer.Option("--mqtt", help="telemetry broker, mqtt://\\[user:pass@]host:port")]
MaxUnreadReplies = Annotated[
    int,
    typer.Option(
        help="replies held for one connection that does not read them (each up to a whole result); "
        "past it they are dropped"
    ),
]
CurveServerKey = Annotated[
    Path | None, typer.Option(help="file with the server's CurveZMQ public key (z85): encrypt")
]
DeviceSecret = Annotated[
    Path | None, typer.Option(help="file with this device's CurveZMQ secret key (z85), for allow-lists")
]
FidelityInputs = Annotated[
    Path | None,
    typer.Option(
        help="folder of samples for fidelity: .npy or images (one input), .npz (an array per input)"
    ),
]
Drain = Annotated[
    float,
    typer.Option(
        help="on SIGTERM/Ctrl-C: seconds to answer the requests already taken (new ones are refused as "
        "unavailable at once; any still held then are answered unavailable)"
    ),
]
OneSample = Annotated[
    Path | None,
    typer.Option(
        "--inputs",
        help="folder of samples (.npy for one input, .npz with an array per input): the first is what the "
        "model runs on, instead of seeded random values (for integer inputs that must hold real values: "
        "a shape, an index)",
    ),
]
Shapes = Annotated[
    list[str] | None,
    typer.Option(
        "--input-shape",
        help="NAME:1x3x640x640 fixes an input's symbolic dimensions (repeatable; needed for non-batch ones; "
        "N as the first size keeps the batch free, e.g. NAME:Nx3x640x640; every other dimension needs a "
        "size)",
    ),
]

Scores = Annotated[
    list[str] | None,
    typer.Option(
        "--scores",
        help="NAME[:AXIS]: fidelity compares output NAME as class scores along AXIS (default -1, the last): "
        "the share of positions whose top-1 is unchanged, not cosine (a language model's [batch, tokens, "
        "vocab] logits; repeatable)",
    ),
]


def _print_json(obj: object) -> None:
    json.dump(obj, sys.stdout, indent=1, default=str)
    sys.stdout.write("\n")


def require(module: str, option: str) -> None:
    """Fail before any work when an option needs a package that is missing or broken here."""
    try:
        __import__(module)
    except ImportError as exc:
        raise SplitPointError(
            f"{option} needs {module}, which does not import here ({exc}): pip install {module}"
        ) from exc


def _logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, format="%(asctime)s %(name)s %(message)s"
    )


@app.command()
def zoo(
    names: Annotated[
        list[str] | None, typer.Argument(help="zoo models to write (default: list them)")
    ] = None,
    out: Annotated[Path, typer.Option("-o", "--out", help="directory for the .onnx files")] = Path("."),
    width: Annotated[
        float, typer.Option(help="channel width multiplier (1.0 = published architecture)")
    ] = 1.0,
    resolution: Annotated[
        int | None, typer.Option(help="input resolution (default: the model's own)")
    ] = None,
    seed: Annotated[int, typer.Option(help="weight seed")] = 0,
) -> None:
    """List the built-in models, or write them as ONNX files (seeded weights, no download)."""
    from splitpoint.core import zoo as zoo_mod

    if not names:
        cols = ["name", "architecture", "params (published)", "GMACs (published)", "input"]
        console.print(table(None, cols, zoo_mod.listing(), 2))
        return
    for path, nodes in zoo_mod.write(names, out, width=width, resolution=resolution, seed=seed):
        console.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {nodes} nodes)")


@app.command()
def cuts(
    model: Model,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    input_shape: Shapes = None,
) -> None:
    """List every candidate cut: crossing tensors, bytes per sample, head share of MACs and params."""
    from splitpoint.core.graph import open_model
    from splitpoint.core.graph.shapes import parse_input_shapes

    h = open_model(model, parse_input_shapes(input_shape))
    if as_json:
        _print_json(
            {
                "model": str(h.path),
                "model_sha256": h.sha256,
                "compute_nodes": len(h.index.compute),
                # a batch the inputs fix: above 1, each cut's bytes_per_sample is a whole request's
                "fixed_batch": h.fixed_batch,
                "cuts": [c.to_dict() for c in h.cuts()],
            }
        )
    else:
        console.print(cuts_table(h.name, h.cuts(), h.fixed_batch))


@app.command()
def split(
    model: Model,
    cut: Annotated[
        list[str],
        typer.Option(
            help="cut index (see `splitpoint cuts`) or comma-separated tensor names; repeat it for a chain "
            "of devices, one cut index per hop, in increasing order"
        ),
    ],
    out: Annotated[Path, typer.Option("-o", "--out", help="plan directory to write")],
    codec: Annotated[
        list[str] | None, typer.Option(help="codec of each hop, in order (one for all, or one per cut)")
    ] = None,
    force: Annotated[
        bool, typer.Option(help="replace an earlier plan in the output directory (never other files)")
    ] = False,
    with_full: Annotated[bool, typer.Option(help="ship the whole model too (edge fallback)")] = False,
    input_shape: Shapes = None,
    inputs: OneSample = None,
) -> None:
    """Write plan.json and one model per stage: head.onnx and tail.onnx for one cut; with several cuts,
    stage1.onnx, stage2.onnx, ... for the relays between."""
    from splitpoint.core.codecs import Codec
    from splitpoint.core.graph import open_model, resolve_cut
    from splitpoint.core.graph.shapes import parse_input_shapes
    from splitpoint.core.plan import check_target
    from splitpoint.core.plandir import write_plan

    codecs = list(codec or ["float32"])
    for name in codecs:  # before the model is opened, and one line (a pydantic traceback before)
        Codec.parse(name)
    check_target(out, force)
    h = open_model(model, parse_input_shapes(input_shape))
    if inputs is not None:
        h.take_sample_from(inputs)
    cuts = [resolve_cut(h.index, c) for c in cut]
    if len(codecs) == 1:
        codecs *= len(cuts)
    if len(codecs) != len(cuts):
        raise SplitPointError(f"--codec: give one codec, or one per --cut ({len(cuts)}); got {len(codecs)}")
    ends = [c.index if c.index is not None else -1 for c in cuts]
    if len(cuts) > 1 and (-1 in ends or ends != sorted(ends) or len(set(ends)) != len(ends)):
        got = ", ".join(cut)
        raise SplitPointError(f"--cut: a chain's cuts are cut indices in increasing order; got {got}")
    plan = write_plan(h, out, cuts=list(cuts), codecs=codecs, force=force, include_full=with_full)
    for i, (c, spec) in enumerate(zip(cuts, cut, strict=True)):
        crossing = ", ".join(t.name for t in plan.stages[i].sends)
        where = c.index if c.index is not None else spec
        hop = f"hop {i + 1}: " if len(cuts) > 1 else ""
        console.print(
            f"{hop}cut {where} crosses {crossing} ({human_bytes(c.bytes_per_sample)}/sample uncompressed, "
            f"sent as {plan.stages[i].codec}{_as_applied(plan.stages[i].codec, plan.stages[i].sends)})"
        )
    console.print(
        f"plan {plan.plan_id[:12]} → {out} ({len(plan.stages)} stage{'s' if len(plan.stages) != 1 else ''})"
    )


def _decoder_names() -> list[str]:
    from splitpoint.core.zoo.decoder import DECODERS

    return list(DECODERS)


_DECODER_HELP = (
    "decoder zoo name (" + ", ".join(_decoder_names()) + ") or an exported decoder's ONNX file "
    "(past_key_values.{i}.key/value in, present.{i}.key/value out)"
)
_MAX_LEN_HELP = "positions an exported decoder has (read from its position table when it has one)"


@app.command("split-decoder")
def split_decoder(
    model: Annotated[str, typer.Argument(help=_DECODER_HELP)],
    edge_layers: Annotated[int, typer.Option(help="decoder layers on the edge (with the embedding)")],
    out: Annotated[Path, typer.Option("-o", "--out", help="plan directory to write")],
    codec: Annotated[str, typer.Option(help="codec of the hidden states sent per step")] = "float32",
    head_weights: Annotated[
        str, typer.Option(help="float32, or int4: the edge's layers as 4-bit MatMulNBits weights")
    ] = "float32",
    seed: Annotated[int, typer.Option(help="weights' seed (zoo decoders)")] = 0,
    max_len: Annotated[int | None, typer.Option(help=_MAX_LEN_HELP)] = None,
    force: Annotated[
        bool, typer.Option(help="replace an earlier plan in the output directory (never other files)")
    ] = False,
    with_full: Annotated[bool, typer.Option(help="ship the whole model too (generate --local)")] = False,
) -> None:
    """A decoder-only transformer split between layers: head.onnx (embedding, first layers, the edge's KV
    cache), tail.onnx (the other layers and the output head: the server's KV cache), plan.json. Every
    generated token then costs one round trip to the server."""
    from splitpoint.core.decoders import open_decoder
    from splitpoint.core.plan import check_target
    from splitpoint.core.plandir import write_decoder_plan

    check_target(out, force)
    source = open_decoder(model, seed, max_len)
    plan = write_decoder_plan(
        source,
        out,
        edge_layers=edge_layers,
        codec=codec,
        head_weights=head_weights,
        include_full=with_full,
        force=force,
    )
    dec = plan.decoder
    assert dec is not None
    console.print(
        f"{source.name}: {edge_layers} of {dec.layers} layers on the edge, hidden state "
        f"{dec.hidden} floats per token sent as {plan.codec}, edge weights {head_weights}; "
        f"plan {plan.plan_id[:12]} → {out}"
    )


@app.command("plan-decoder")
def plan_decoder(
    model: Annotated[str, typer.Argument(help=_DECODER_HELP)],
    network: Annotated[str, typer.Option(help="network profile name or YAML")] = "lte",
    edge_cpus: Annotated[
        float | None, typer.Option(help="measure the edge's layers under this CPU limit (cgroup quota)")
    ] = None,
    prompt_tokens: Annotated[int, typer.Option(help="prompt length the times are measured at")] = 32,
    new_tokens: Annotated[int, typer.Option(help="tokens generated (decode steps measured mid-way)")] = 64,
    codecs: Annotated[str, typer.Option(help="comma-separated codecs for the hidden states")] = (
        "float32,float16,int8-ol,int4-ol"
    ),
    head_weights: Annotated[str, typer.Option(help="edge weight precisions to consider")] = "float32,int4",
    max_ttft: Annotated[float | None, typer.Option(help="limit on time to first token, ms")] = None,
    max_tpot: Annotated[float | None, typer.Option(help="limit on time per output token, ms")] = None,
    edge_memory: Annotated[
        float | None, typer.Option(help="limit on the edge's weights + KV cache at the model's length, MiB")
    ] = None,
    objective: Annotated[str, typer.Option(help="tpot or ttft")] = "tpot",
    min_agreement: Annotated[
        float | None,
        typer.Option(help="floor on the pick's measured greedy-token agreement with the float model, 0-1"),
    ] = None,
    out: Annotated[Path | None, typer.Option("-o", "--out", help="write the pick's plan here")] = None,
    force: Annotated[
        bool, typer.Option(help="replace an earlier plan in the output directory (never other files)")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the candidates as JSON")] = False,
    seed: Annotated[int, typer.Option(help="weights' seed (zoo decoders)")] = 0,
    max_len: Annotated[int | None, typer.Option(help=_MAX_LEN_HELP)] = None,
) -> None:
    """Choose where to split a decoder, how to send its hidden states and the edge's weight precision, by
    time to first token and time per output token derived from measured layer blocks on this machine
    (the edge's under --edge-cpus). Every generated token costs one round trip."""
    from splitpoint.partitioner.decoderjob import DecoderPlanJob, decoder_plan_json, run_decoder_plan

    job = DecoderPlanJob.of(
        model=model,
        network=network,
        edge_cpus=edge_cpus,
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        codecs=tuple(_codec_list(codecs) or ()),
        head_weights=tuple(w.strip() for w in head_weights.split(",") if w.strip()),
        max_ttft_ms=max_ttft,
        max_tpot_ms=max_tpot,
        edge_memory_mib=edge_memory,
        objective=objective,
        min_agreement=min_agreement,
        out=out,
        force=force,
        seed=seed,
        max_len=max_len,
    )
    with progress("planning a decoder", as_json) as note:
        r = run_decoder_plan(job, note)
    if as_json:
        _print_json(decoder_plan_json(r))
    else:
        show_decoder_plan(r, job, network)
    refused = r.refusal(job)
    if refused:
        raise SplitPointError(refused)


@app.command()
def generate(
    plan_dir: Annotated[Path, typer.Argument(help="a decoder plan (splitpoint split-decoder)")],
    server: Annotated[str, typer.Option(help="the server holding the tail")] = "tcp://127.0.0.1:5555",
    prompt_tokens: Annotated[int, typer.Option(help="random prompt of this many tokens")] = 16,
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate")] = 32,
    seed: Annotated[int, typer.Option(help="the prompt's seed")] = 0,
    local: Annotated[bool, typer.Option(help="run the unsplit model here instead (for comparison)")] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait for each step's answer")] = 10.0,
    threads: Annotated[int, typer.Option(help="onnxruntime intra-op threads (0 = default)")] = 0,
    cpus: Annotated[
        float | None, typer.Option(help="run under this CPU limit (cgroup quota), as a small device would")
    ] = None,
    curve_server_key: CurveServerKey = None,
    curve_secret: DeviceSecret = None,
) -> None:
    """Generate greedily with a decoder plan and print one JSON object: tokens, ttft_ms, tpot_ms (both
    measured on this machine's clock)."""
    import numpy as np

    from splitpoint.core.curve import keypair_from_secret, read_public
    from splitpoint.core.endpoints import check_endpoint
    from splitpoint.edge.decoder import DecoderClient, generate_local, load_decoder_plan
    from splitpoint.profiles.cpulimit import cpu_limit

    plan = load_decoder_plan(plan_dir, role=None if local else "edge")
    assert plan.decoder is not None
    vocab, max_len = plan.decoder.vocab, plan.decoder.max_len
    if prompt_tokens < 1:
        raise SplitPointError("--prompt-tokens must be at least 1")
    if max_new_tokens < 1 or prompt_tokens + max_new_tokens > max_len:  # before the prompt is made
        raise SplitPointError(
            f"{prompt_tokens} prompt tokens + {max_new_tokens} new must be within the model's {max_len} "
            "positions (and at least one new token)"
        )
    if seed < 0:
        raise SplitPointError(f"--seed must be 0 or more, not {seed}")
    _seconds("--timeout", timeout)
    _curve_pair(curve_secret, curve_server_key)
    server_key = read_public(curve_server_key, "server's public key") if curve_server_key else None
    keypair = keypair_from_secret(curve_secret) if curve_secret else None
    if not local:
        try:
            check_endpoint(server)
        except ValueError as exc:
            raise SplitPointError(f"--server: {exc}") from exc
    prompt = np.random.default_rng(seed).integers(0, vocab, (1, prompt_tokens))
    with cpu_limit(cpus) as emulation:
        if local:
            gen = generate_local(plan_dir, prompt, max_new_tokens, threads)
        else:
            with DecoderClient(
                plan_dir,
                server,
                timeout_s=timeout,
                threads=threads,
                curve_server_key=server_key,
                curve_keypair=keypair,
            ) as client:
                gen = client.generate(prompt, max_new_tokens)
    out = {**gen.to_dict(), "mode": "local" if local else "split", "prompt_tokens": prompt_tokens}
    if emulation is not None:
        out["cpu_limit"] = emulation.model_dump()
    _print_json(out)


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
        bool, typer.Option(help="also time the int8 (static QDQ) model, for int8-head plans")
    ] = False,
    runtime: Annotated[
        bool,
        typer.Option(
            help="also measure the runtime's own time per request here (a real edge client and server, "
            "under the same CPU limit): plan-chain adds it to this device's stage"
        ),
    ] = False,
    fresh_codecs: Annotated[
        bool,
        typer.Option(
            help="measure codec speeds again: by default a profile reuses those measured on this machine "
            "under the same CPU limit in the last 24 h (the profile's cost.codecs_source says when)"
        ),
    ] = False,
    input_shape: Shapes = None,
    inputs: OneSample = None,
    quiet: Quiet = False,
) -> None:
    """Measure the model on this machine: whole model, per node, and head/tail segments per cut."""
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
        from .bench.runtimecost import runtime_cost

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
        err.print(
            f"[yellow]warning: the model ran {seen:.2f}x slower than at this machine's full speed, not the "
            f"{want:.2f}x asked: a CFS quota this short is over-enforced by this kernel; the profile is of "
            f"the device measured ({seen:.2f}x)[/yellow]",
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


@app.command()
def plan(
    model: Model,
    edge_profile: Annotated[Path, typer.Option(help="profile measured on the edge device")],
    server_profile: Annotated[Path, typer.Option(help="profile measured on the server")],
    network: Annotated[str, typer.Option(help="network profile name (see profiles/networks) or YAML path")],
    out: Annotated[Path | None, typer.Option("-o", "--out", help="plan directory to write")] = None,
    max_latency: Annotated[float | None, typer.Option(help="ms")] = None,
    min_fidelity: Annotated[float | None, typer.Option(help="e.g. 0.99 top-1 agreement")] = None,
    edge_memory: Annotated[float | None, typer.Option(help="edge memory budget, MiB")] = None,
    max_bytes: Annotated[int | None, typer.Option(help="bytes per inference on the wire")] = None,
    objective: Annotated[
        str, typer.Option(help="latency | throughput | bytes | edge-memory | fidelity")
    ] = "latency",
    codecs: Annotated[
        str | None, typer.Option(help="comma-separated codecs to consider (default: a standard set)")
    ] = None,
    int8_heads: Annotated[
        bool, typer.Option(help="also consider int8-weight heads (edge profiled with --int8)")
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
    force: Annotated[bool, typer.Option(help="replace a non-empty plan directory")] = False,
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
            help="ship the whole model too: the edge answers locally while the server is out of reach"
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
        from .plots import plot_front

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
        int | None, typer.Option(help="bytes any one hop may carry per request (a metered link)")
    ] = None,
    objective: Annotated[str, typer.Option(help="latency | throughput")] = "latency",
    codecs: Annotated[str | None, typer.Option(help="comma-separated codecs to consider per hop")] = None,
    random: Annotated[int | None, typer.Option(help="fidelity samples (default 8; 64 for trained)")] = None,
    force: Annotated[bool, typer.Option(help="replace a non-empty plan directory")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the decision as JSON")] = False,
    input_shape: Shapes = None,
    scores: Scores = None,
    inputs: FidelityInputs = None,
) -> None:
    """Choose cuts and codecs for a chain of devices jointly (edge, relays, server); write the plan."""
    from splitpoint.partitioner.chainplan import plan_dict
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
            if name not in chain:  # silently ignored before
                raise SplitPointError(f"--{what}: {name!r} is not a device of --devices ({', '.join(chain)})")
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
        from .console import show_chain

        show_chain(r, out)


def _as_applied(codec: str, sends: list) -> str:
    """How a codec applies to these tensors, where its name alone misleads: 'float32' sends each tensor
    exact in its own type (a float16 model's as float16), and a quantising codec sends integer tensors
    (token ids) exact."""
    from splitpoint.core.codecs import Codec, applied_to

    types = sorted({t.dtype for t in sends})
    if Codec.parse(codec).lossless:
        return "" if types == ["float32"] else f": each tensor exact, in its own type ({', '.join(types)})"
    exact = [d for d in types if applied_to(codec, [d]) != codec]
    return f"; {', '.join(exact)} tensors go exact" if exact else ""


@app.command()
def fidelity(
    model: Model,
    cut: Annotated[str, typer.Option(help="cut index or comma-separated tensor names")],
    codec: Annotated[str, typer.Option(help="cut-tensor codec, e.g. int8+zstd")] = "int8",
    quantize_head: Annotated[
        str | None,
        typer.Option("--quantize-head-weights", help="static (QDQ, calibrated on the inputs) or dynamic"),
    ] = None,
    inputs: Annotated[
        Path | None,
        typer.Option(help="folder of samples: .npy or images (one input), .npz (an array per input)"),
    ] = None,
    random: Annotated[
        int | None,
        typer.Option(
            help="samples when no --inputs: seeded random (8), or rendered task inputs for a trained zoo "
            "model (64), as plan measures"
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    input_shape: Shapes = None,
    scores: Scores = None,
) -> None:
    """Measure the split model with a codec (and an int8 head) against the float model."""
    from splitpoint.partitioner.fidelity import measure_one

    if random is not None and random < 1:
        raise typer.BadParameter(f"--random must be at least 1 sample, not {random}")
    rep = measure_one(model, cut, codec, quantize_head, inputs, random, input_shape, scores)
    if as_json:
        _print_json(rep.to_dict())
        return
    where = rep.cut if rep.cut is not None else cut
    # "float32" names the unquantised head, whatever its weights' own type (a float16 export's stay float16)
    head = "head weights as in the model" if rep.head_weights == "float32" else f"head {rep.head_weights}"
    title = f"{model} cut {where}, codec {codec}, {head}: measured on {rep.inputs}"
    console.print(fidelity_table(title, rep))
    if rep.task is not None:  # the figure plan would use for this cut and codec, beside the tensor ones
        metrics = rep.task["metrics"]
        said = ", ".join(
            f"{k.replace('_', ' ')}{' (primary)' if k == rep.task['primary'] else ''} {m['value']:.3f} "
            f"[{m['low']:.3f}, {m['high']:.3f}]"
            for k, m in metrics.items()
        )
        console.print(f"{rep.task['task']} with the unsplit model, 95 % intervals (measured): {said}")


@app.command()
def serve(
    bind: Annotated[str, typer.Option(help="ZeroMQ endpoint to listen on")] = "tcp://127.0.0.1:5555",
    plans: Annotated[
        Path, typer.Option(help="directory of plan directories (pushed plans land here)")
    ] = Path("plans"),
    workers: Annotated[
        int, typer.Option(help="tail worker threads (1: the socket thread runs each tail)")
    ] = 1,
    max_queue: Annotated[
        int, typer.Option(help="requests waiting for a tail before new ones are answered busy")
    ] = 256,
    max_unread_replies: MaxUnreadReplies = 1000,
    threads: Annotated[int, typer.Option(help="onnxruntime intra-op threads per session (0 = default)")] = 0,
    provider: Annotated[str, typer.Option(help="e.g. CUDAExecutionProvider")] = "CPUExecutionProvider",
    max_message_mb: Annotated[float, typer.Option(help="refuse larger messages")] = 256,
    mqtt: Mqtt = None,
    device_id: Annotated[str, typer.Option()] = "server",
    curve_secret: Annotated[
        Path | None, typer.Option(help="file with this server's CurveZMQ secret key (z85)")
    ] = None,
    curve_allow: Annotated[
        list[Path] | None, typer.Option(help="file(s) with allowed client public keys (z85)")
    ] = None,
    deploy_allow: Annotated[
        list[Path] | None, typer.Option(help="file(s) with the public keys that may deploy (z85)")
    ] = None,
    insecure: Annotated[
        bool, typer.Option(help="bind a non-loopback address without CurveZMQ: anyone may deploy and run")
    ] = False,
    stage: Annotated[
        int | None, typer.Option(help="the stage of each plan to run (a relay's); default: the last")
    ] = None,
    next: Annotated[  # noqa: A002 - the option's name
        str | None, typer.Option("--next", help="a relay: the next stage's endpoint")
    ] = None,
    next_timeout: Annotated[
        float, typer.Option(help="a relay: seconds before a request the next stage holds fails")
    ] = 10.0,
    next_grace: Annotated[
        float,
        typer.Option(help="a relay: seconds after start a request may wait for the first connection onwards"),
    ] = 5.0,
    next_server_key: Annotated[
        Path | None, typer.Option(help="a relay: file with the next stage's CurveZMQ public key (z85)")
    ] = None,
    max_sessions: Annotated[int, typer.Option(help="decoder plans: sequences held at once")] = 64,
    max_cache_mb: Annotated[float, typer.Option(help="decoder plans: all sessions' KV caches, MiB")] = 1024,
    session_idle: Annotated[
        float, typer.Option(help="decoder plans: seconds before an unused session is freed")
    ] = 300,
    drain: Drain = 5.0,
    quiet: Quiet = False,
) -> None:
    """Run the tail server (or, with --stage and --next, a relay of a chain) until SIGTERM/Ctrl-C
    (loopback unless --bind says otherwise)."""
    from splitpoint.server.config import ServerConfig
    from splitpoint.server.tail_server import TailServer

    _logging(quiet)
    cfg = ServerConfig.of(
        bind=bind,
        plans_dir=plans,
        workers=workers,
        max_queue=max_queue,
        max_unread_replies=max_unread_replies,
        threads=threads,
        provider=provider,
        max_message_bytes=int(max_message_mb * 2**20),
        mqtt=mqtt,
        device_id=device_id,
        **_server_keys(curve_secret, curve_allow, next_server_key, deploy_allow),
        insecure=insecure,
        stage=stage,
        next=next,
        next_timeout_s=next_timeout,
        next_connect_grace_s=next_grace,
        max_sessions=max_sessions,
        max_cache_mb=max_cache_mb,
        session_idle_s=session_idle,
        drain_s=drain,
    )
    TailServer(cfg).run()


@app.command()
def relay(
    plan: Annotated[
        Path | None, typer.Argument(help="a plan directory, or a directory of them (or --plans only)")
    ] = None,
    plans: Annotated[
        Path | None,
        typer.Option(
            help="directory of plans to serve, where plans deployed to this relay go (`deploy --relay`)"
        ),
    ] = None,
    *,
    stage: Annotated[int, typer.Option(help="the stage of the plan this device runs (1 is after the edge)")],
    next: Annotated[str, typer.Option("--next", help="the next stage's endpoint")],  # noqa: A002
    listen: Annotated[str, typer.Option(help="ZeroMQ endpoint to listen on")] = "tcp://127.0.0.1:5556",
    next_timeout: Annotated[
        float, typer.Option(help="seconds before a request the next stage holds fails")
    ] = 10.0,
    next_grace: Annotated[
        float, typer.Option(help="seconds after start a request may wait for the first connection onwards")
    ] = 5.0,
    threads: Annotated[int, typer.Option(help="onnxruntime intra-op threads per session (0 = default)")] = 0,
    mqtt: Mqtt = None,
    device_id: Annotated[str, typer.Option()] = "relay",
    insecure: Annotated[bool, typer.Option(help="listen on a non-loopback address without CurveZMQ")] = False,
    curve_secret: Annotated[
        Path | None, typer.Option(help="file with this relay's CurveZMQ secret key (z85)")
    ] = None,
    curve_allow: Annotated[
        list[Path] | None, typer.Option(help="file(s) with the public keys allowed to connect (z85)")
    ] = None,
    next_server_key: Annotated[
        Path | None, typer.Option(help="file with the next stage's CurveZMQ public key (z85)")
    ] = None,
    deploy_allow: Annotated[
        list[Path] | None, typer.Option(help="file(s) with the public keys that may deploy (z85)")
    ] = None,
    max_unread_replies: MaxUnreadReplies = 1000,
    drain: Drain = 5.0,
    quiet: Quiet = False,
) -> None:
    """Run one middle stage of a chain: receive a cut tensor, run this stage's segment, forward the next
    cut tensor, and pass the answer back (`serve --stage I --next ...` with a plan directory). Plans
    deployed to it (`deploy --relay I=ENDPOINT`) go to --plans, or to PLAN when it is a directory of
    plans; a relay started on one plan directory alone takes no deploys."""
    from splitpoint.core.plan import PLAN_FILE
    from splitpoint.server.config import RelayConfig
    from splitpoint.server.registry import PlanRegistry
    from splitpoint.server.tail_server import TailServer

    _logging(quiet)
    if plan is None and plans is None:
        raise SplitPointError(
            "give a plan directory, or --plans DIR to serve the plans in DIR and take deploys into it"
        )
    single = plan is not None and (plan / PLAN_FILE).is_file()
    if plan is not None and not single:
        if plans is not None:
            raise SplitPointError(
                f"{plan} is not a plan directory (no {PLAN_FILE} in it): with --plans, PLAN is one plan"
            )
        if not (plan.is_dir() and any((d / PLAN_FILE).is_file() for d in plan.iterdir())):
            # started on nothing, with no --plans to deploy into, it would answer unknown-plan for ever
            raise SplitPointError(
                f"{plan} holds no plan: give a plan directory (with {PLAN_FILE}) or a directory of them, "
                "or --plans DIR to take deploys into"
            )
        plans = plan
    cfg = RelayConfig.of(
        bind=listen,
        plans_dir=plans,
        threads=threads,
        mqtt=mqtt,
        device_id=device_id,
        insecure=insecure,
        stage=stage,
        next=next,
        next_timeout_s=next_timeout,
        next_connect_grace_s=next_grace,
        **_server_keys(curve_secret, curve_allow, next_server_key, deploy_allow),
        max_unread_replies=max_unread_replies,
        drain_s=drain,
    )
    registry = None
    if single:
        assert plan is not None
        registry = PlanRegistry(cfg.plans_dir, cfg.threads, cfg.provider, cfg.stage)
        registry.add_dir(plan)
    TailServer(cfg, registry).run()


@app.command()
def keygen(
    out: Annotated[Path, typer.Argument(help="writes OUT.key (secret) and OUT.pub (public), z85")],
) -> None:
    """A CurveZMQ key pair, for `serve --curve-secret/--curve-allow` and `edge run --curve-secret`."""
    from splitpoint.core.curve import keygen as make

    if not out.name:
        raise typer.BadParameter("NAME is empty: give the key pair's file name (NAME.key, NAME.pub)")
    key, pub = make(out)
    console.print(f"secret key {key} (mode 600), public key {pub}")


@edge_app.command("run")
def edge_run(
    plan_dir: Annotated[Path, typer.Argument(help="plan directory (from `splitpoint plan` or `split`)")],
    server: Annotated[str, typer.Option(help="the tail server's endpoint")] = "tcp://127.0.0.1:5555",
    inputs: Annotated[
        Path | None,
        typer.Option(help="folder of samples to run once: .npy (one input) or .npz (an array per input)"),
    ] = None,
    outputs: Annotated[Path | None, typer.Option(help="write results here (.npz per input)")] = None,
    listen: Annotated[
        str | None, typer.Option(help="serve local requests, e.g. ipc:///tmp/splitpoint.sock")
    ] = None,
    window: Annotated[
        int | None,
        typer.Option(
            help="requests in flight \\[default: the plan's, the throughput × latency its planner predicted "
            "(at most 64), else 4]"
        ),
    ] = None,
    timeout: Annotated[float, typer.Option(help="seconds before a request falls back (or fails)")] = 2.0,
    no_fallback: Annotated[
        bool, typer.Option("--no-fallback", help="fail instead of running the whole model locally")
    ] = False,
    threads: Annotated[int, typer.Option()] = 1,
    mqtt: Mqtt = None,
    device_id: Annotated[str, typer.Option()] = "edge",
    curve_server_key: CurveServerKey = None,
    curve_secret: DeviceSecret = None,
    insecure: Annotated[
        bool, typer.Option(help="let --listen be reachable from other machines (they may then deploy)")
    ] = False,
    quiet: Quiet = False,
) -> None:
    """Run the head on this device and the tail on the server."""
    from splitpoint.core.curve import keypair_from_secret, read_public
    from splitpoint.edge.config import EdgeConfig, planned_window
    from splitpoint.edge.daemon import EdgeDaemon

    _logging(quiet)
    if not inputs and not listen:
        raise typer.BadParameter("give --inputs DIR and/or --listen ENDPOINT")
    _curve_pair(curve_secret, curve_server_key)
    cfg = EdgeConfig.of(
        plan_dir=plan_dir,
        server=server,
        window=window if window is not None else planned_window(plan_dir),
        timeout_s=timeout,
        fallback=not no_fallback,
        threads=threads,
        mqtt=mqtt,
        device_id=device_id,
        listen=listen,
        insecure=insecure,
        curve_server_key=read_public(curve_server_key, "server's public key") if curve_server_key else None,
        curve_keypair=keypair_from_secret(curve_secret) if curve_secret else None,
    )
    if inputs is not None and not inputs.is_dir():  # before the connection to the server and the sessions
        raise SplitPointError(f"--inputs {inputs} is not a folder of .npy/.npz files")
    summary = EdgeDaemon(cfg).run(inputs, outputs)
    if inputs:
        n = summary["inputs"]
        answered = summary["ok"] + summary["local"] + summary["fallback"]
        done = (
            f"{summary['local']} run on the edge (edge-only plan)"
            if summary["local"]
            else f"{summary['ok']} split, {summary['fallback']} local fallback"
        )
        console.print(f"{done}, {summary['errors']} errors")
        said = _run_timings(summary)
        if said:
            console.print(said)
        if answered < n:  # exit 0 only when every input got an answer
            err.print(f"{n - answered} of {n} inputs got no answer")
            raise typer.Exit(1)


def _run_timings(summary: dict) -> str:
    """The folder run's measured times: what a user running their samples wants beside the counts (the
    median request, each part as this edge measured it or the server reported it, and the run's rate)."""
    from statistics import median

    marks = summary.get("breakdowns") or []
    if not marks:
        return ""

    def med(rows: list[dict], *keys: str) -> float:
        return median(sum(float(r.get(k) or 0.0) for k in keys) for r in rows)

    wall = max(float(summary.get("wall_s") or 0.0), 1e-9)
    lines = [
        f"measured: {len(marks)} answers in {wall:.2f} s, {len(marks) / wall:.1f}/s with the window in flight"
    ]
    split = [b for b in marks if "local_ms" not in b]
    if split:
        server = ("server_queue_ms", "server_decode_ms", "tail_ms", "server_encode_ms")
        parts = ("head_ms", "encode_ms", "network_ms", *server, "decode_ms")
        # a folder is submitted at once: what the parts leave of the total is waiting on this edge
        waited = median(
            max(0.0, float(b.get("total_ms") or 0.0) - sum(float(b.get(k) or 0.0) for k in parts))
            for b in split
        )
        lines.append(
            f"split, median of {len(split)}: {med(split, 'total_ms'):.2f} ms per request (waiting on the "
            f"edge {waited:.2f}, head {med(split, 'head_ms'):.2f}, encode {med(split, 'encode_ms'):.2f}, "
            f"network {med(split, 'network_ms'):.2f}, server {med(split, *server):.2f}, decode "
            f"{med(split, 'decode_ms'):.2f}), {med(split, 'bytes_sent') / 1024:.1f} KiB sent per request"
        )
    local = [b for b in marks if "local_ms" in b]
    if local:
        lines.append(
            f"on the edge alone, median of {len(local)}: {med(local, 'total_ms'):.2f} ms per request "
            f"(model {med(local, 'local_ms'):.2f})"
        )
    return "\n".join(lines)


@app.command()
def deploy(
    plan_dir: Annotated[Path, typer.Argument(help="plan directory")],
    server: Annotated[list[str] | None, typer.Option(help="tail server endpoint(s)")] = None,
    edge: Annotated[list[str] | None, typer.Option(help="edge daemon endpoint(s) (its --listen)")] = None,
    relay: Annotated[
        list[str] | None,
        typer.Option(help="a chain's relay as I=ENDPOINT (stage I gets its segment only); repeatable"),
    ] = None,
    timeout: Annotated[float, typer.Option()] = 30.0,
    curve_server_key: Annotated[
        Path | None, typer.Option(help="file with the server's CurveZMQ public key (z85)")
    ] = None,
    curve_secret: Annotated[
        Path | None, typer.Option(help="file with a secret key on the server's --deploy-allow list (z85)")
    ] = None,
) -> None:
    """Push a plan to servers and edge daemons and wait for each to acknowledge it."""
    from splitpoint.core.curve import keypair_from_secret, read_public
    from splitpoint.core.planset import PlanSet, is_plan_set

    from .orchestrator import deploy as push
    from .orchestrator import files_to_push

    relays = []
    for r in relay or []:
        i, sep, ep = r.partition("=")
        if not sep or not i.strip().isdigit():
            raise SplitPointError(f"--relay: expected I=ENDPOINT (e.g. 1=tcp://10.0.0.2:5556), got {r!r}")
        if int(i) == 0:
            raise SplitPointError(f"--relay {r}: stage 0 is the edge's; push it with --edge")
        relays.append((ep.strip(), f"stage-{int(i)}"))
    targets = [
        *((ep, "server") for ep in server or []),
        *relays,
        *((ep, "edge") for ep in edge or []),
    ]
    if not targets:
        raise typer.BadParameter("name at least one --server, --relay or --edge")
    _seconds("--timeout", timeout)
    _curve_pair(curve_secret, curve_server_key)
    key = read_public(curve_server_key, "server's public key") if curve_server_key else None
    pair = keypair_from_secret(curve_secret) if curve_secret else None
    dirs = [plan_dir]
    if is_plan_set(plan_dir):  # a set: every member to every target, each acknowledged
        if edge:
            raise SplitPointError(
                "an edge daemon runs one plan: a plan set is for the adaptive client "
                "(splitpoint.edge.adaptive.AdaptiveClient); deploy its members to --server and --relay"
            )
        dirs = [plan_dir / m.dir for m in PlanSet.load(plan_dir, role="server")[0].members]
    from splitpoint.core.endpoints import check_endpoint
    from splitpoint.core.plan import Plan

    for ep, _ in targets:  # a malformed endpoint is the command's error, before any device is tried
        try:
            check_endpoint(ep)
        except ValueError as exc:
            raise SplitPointError(f"--server/--relay/--edge: {exc}") from exc
    if not is_plan_set(plan_dir):  # a chain's middle stages need a device each: say which has none
        stages = len(Plan.load(plan_dir, verify=False).stages)  # files: each target's, below
        for r in relay or []:
            if int(r.partition("=")[0]) >= stages:
                raise SplitPointError(
                    f"--relay {r}: this plan has stages 0 (the edge's) to {stages - 1} (the server's)"
                )
        given = {role for _, role in relays}
        missing = [i for i in range(1, stages - 1) if f"stage-{i}" not in given]
        if missing and (server or relays):
            err.print(
                f"note: this plan has {stages} stages and no --relay here for stage(s) "
                f"{', '.join(map(str, missing))}: requests fail at the stage before until a relay "
                "serves it (deployed earlier, or given to the relay at its start: "
                "`splitpoint relay PLAN_DIR --stage I ...`)"
            )
    for _, role in targets:  # every file each target is sent, checked before any is pushed
        for d in dirs:
            files_to_push(d, role)
    failed: list[str] = []
    # servers and relays first, each failing stopping no other; edges only once every one of them has the
    # plan: an edge switched to a plan its server refuses has every request refused (or run locally)
    for ep, role in targets:
        for d in dirs:
            upstream = [f for f in failed if not f.endswith("(edge)")]
            if role == "edge" and upstream:
                err.print(
                    f"{escape(ep)} (edge): not deployed: {', '.join(map(escape, upstream))} did not take "
                    "the plan, and the edge would send every request to a stage without it; deploy there "
                    "first"
                )
                failed.append(f"{ep} ({role})")
                continue
            notes: list[str] = []
            try:
                pid = push(d, ep, timeout, role, key if role != "edge" else None, pair, notes)
            except SplitPointError as exc:
                err.print(f"{escape(ep)} ({role}): not deployed: {escape(str(exc))}")
                failed.append(f"{ep} ({role})")
                continue
            console.print(f"{ep}: plan {pid[:12]} acknowledged ({role})")
            for note in notes:
                err.print(f"{escape(ep)} ({role}): warning: {escape(note)}")
    if failed:
        done = len(targets) * len(dirs) - len(failed)
        raise SplitPointError(
            f"{len(failed)} of {len(targets) * len(dirs)} deploys failed ({done} acknowledged)"
        )


@app.command()
def status(
    mqtt: Annotated[str, typer.Option(help="broker, mqtt://host:port")],
    seconds: Annotated[float, typer.Option(help="how long to listen")] = 1.5,
) -> None:
    """Devices and their plans, from retained telemetry."""
    from .console import status_table
    from .orchestrator import collect

    fleet = collect(mqtt, _seconds("--seconds", seconds))
    console.print(status_table(fleet) if fleet else "no devices have reported")


@app.command()
def watch(
    mqtt: Annotated[str, typer.Option(help="broker, mqtt://host:port")],
    seconds: Annotated[float, typer.Option(help="stop after this long (0 = until Ctrl-C)")] = 0,
) -> None:
    """Live table of the fleet: state, requests and errors so far, link estimates, latency breakdown,
    CPU, memory, temperature."""
    from rich.live import Live

    from .console import watch_table
    from .orchestrator import watch as follow

    live: Live | None = None

    def show(fleet: dict[str, dict], lost_since: float | None) -> None:
        nonlocal live
        if live is None:  # drawn once the broker answers: an unreachable one is one error line, no table
            live = Live(watch_table(fleet, lost_since), console=console, refresh_per_second=4)
            live.start()
        else:
            live.update(watch_table(fleet, lost_since))

    _seconds("--seconds", seconds, zero="until Ctrl-C")
    try:
        follow(mqtt, show, seconds)
    finally:
        if live is not None:
            live.stop()


@app.command()
def demo(
    model: Annotated[str, typer.Option(help="zoo model or .onnx path")] = "resnet18",
    network: Annotated[str, typer.Option(help="network profile to plan for")] = "wifi6",
    requests: Annotated[int, typer.Option()] = 120,
    window: Annotated[
        int | None, typer.Option(help="requests in flight \\[default: each plan's, as edge run]")
    ] = None,
    mqtt: Annotated[str | None, typer.Option(help="use this broker instead of the embedded one")] = None,
    edge_slowdown: Annotated[
        float, typer.Option(help="emulate an edge this many times slower (1 = off)")
    ] = 4.0,
    no_link: Annotated[
        bool, typer.Option("--no-link-emulation", help="plain loopback instead of the network profile")
    ] = False,
) -> None:
    """Profile, plan, serve and run a split model on this machine, end to end."""
    from .demo import DemoConfig, run_demo

    cfg = DemoConfig.of(
        model=model,
        network=network,
        requests=requests,
        window=window,
        mqtt=mqtt,
        edge_slowdown=edge_slowdown,
        emulate_link=not no_link,
    )
    with progress("demo", on=console) as note:
        run_demo(cfg, say=console.print, progress=note)


@app.command()
def bench(
    models: Annotated[
        str | None,
        typer.Option(
            help="zoo models or .onnx paths, comma-separated \\[default: resnet18, resnet50, mobilenetv2 and "
            "the trained models that are installed; with --trace resnet18, resnet50; with --chain resnet18, "
            "mobilenetv2, resnet50]"
        ),
    ] = None,
    networks: Annotated[
        list[str] | None,
        typer.Option(
            help="network profiles, comma-separated \\[default: 3g,lte,wifi-n,5g]; with --chain one per hop, "
            "and the option repeated for each mix \\[default: wifi-n,ethernet and lte,wifi-n]"
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="device profile the edge CPU is calibrated to")] = "rpi4",
    chain: Annotated[
        str | None,
        typer.Option(help="pipeline over devices: device profiles in order, e.g. rpi4,rpi4,gpu-server"),
    ] = None,
    link: Annotated[str, typer.Option(help="auto | netns (root) | proxy (userspace) | loopback")] = "auto",
    out: Annotated[
        Path, typer.Option("-o", "--out", help="directory for results.json, report.md, plots")
    ] = Path("bench-results"),
    seconds: Annotated[
        float,
        typer.Option(
            help="measuring time per candidate and phase, within 3 to 20 requests (24 with --chain)"
        ),
    ] = 1.5,
    window: Annotated[
        int,
        typer.Option(
            help="least requests in flight in the throughput phase (more where latency ÷ slowest stage "
            "needs it)"
        ),
    ] = 4,
    max_front: Annotated[
        int | None,
        typer.Option(
            help="front members measured besides the pick and baselines \\[default: 4; 3 with --chain]"
        ),
    ] = None,
    front_budget: Annotated[
        int | None,
        typer.Option(help="cuts whose fidelity is measured for the front beyond the pick's (default 12)"),
    ] = None,
    min_fidelity: Annotated[float, typer.Option(help="the pick's constraint")] = 0.99,
    input_shape: Shapes = None,
    trace: Annotated[
        Path | None,
        typer.Option(
            help="a trace of phases (network, seconds): plan sets measured while the link changes live"
        ),
    ] = None,
    rate: Annotated[
        float | None,
        typer.Option(help="with --trace: requests per second, arriving open loop \\[default: 5]"),
    ] = None,
    scores: Scores = None,
) -> None:
    """Measure the pick, the Pareto front and the baselines per model and network, over emulated links."""
    from .bench.outdir import claimed_output
    from .bench.report import summary_lines, write_report
    from .bench.run import BenchConfig, open_models_first, run_bench

    if trace is not None:
        if chain:
            raise SplitPointError("--trace and --chain do not combine: a trace runs one edge and one server")
        # a trace's phases name its networks and it measures by its own clock: these would be ignored
        _not_with(
            "--trace",
            {
                "--networks": networks is not None,
                "--link": link != "auto",
                "--seconds": seconds != 1.5,
                "--window": window != 4,
                "--max-front": max_front is not None,
                "--front-budget": front_budget is not None,
            },
            ": the trace names its networks and phases",
        )
        return _bench_trace(
            models, trace, 5.0 if rate is None else rate, device, min_fidelity, out, input_shape, scores
        )
    if rate is not None:
        raise typer.BadParameter("--rate is the arrival rate of a trace; it goes with --trace")
    if chain:  # a chain names its devices in --chain, and measures every front member's fidelity
        _not_with("--chain", {"--device": device != "rpi4", "--front-budget": front_budget is not None})
        return _bench_chain(
            models, chain, networks, link, out, seconds, window, min_fidelity, input_shape, max_front, scores
        )
    cfg = BenchConfig.of(
        **({"models": models.split(",")} if models is not None else {}),
        networks=",".join(networks or ["3g,lte,wifi-n,5g"]).split(","),
        device=device,
        link=link,
        out=out,
        seconds=seconds,
        window=window,
        **({"max_front": max_front} if max_front is not None else {}),
        **({"front_budget": front_budget} if front_budget is not None else {}),
        min_fidelity=min_fidelity,
        input_shapes=tuple(input_shape or ()),
        scores=tuple(scores or ()),
    )
    with claimed_output(out):  # a bad -o is refused first, in a moment
        open_models_first(cfg.models, cfg.input_shapes, cfg.scores)  # before the progress and the minutes
        with progress("bench", transient=False) as note:
            results = write_report(run_bench(cfg, note), out)
    console.print("\n".join(summary_lines(results, out)))


def _not_with(mode: str, given: dict[str, bool], why: str = "") -> None:
    """Refuse the options given that ``mode`` would ignore."""
    unused = [name for name, g in given.items() if g]
    if unused:
        raise typer.BadParameter(
            f"{', '.join(unused)} {'does' if len(unused) == 1 else 'do'} not go with {mode}{why}"
        )


def _bench_trace(models, trace, rate, device, min_fidelity, out, input_shape, scores=None) -> None:
    """`bench --trace`: plan sets (adaptive, bits-only) and their fixed members on a changing link."""
    from .bench.outdir import claimed_output
    from .bench.report import verdict
    from .bench.run import open_models_first
    from .bench.trace import TraceBenchConfig, run_trace_bench, trace_command
    from .bench.tracereport import write_trace_report

    cfg = TraceBenchConfig.of(
        **({"models": models.split(",")} if models is not None else {}),
        trace=trace,
        rate=rate,
        device=device,
        min_fidelity=min_fidelity,
        out=out,
        input_shapes=tuple(input_shape or ()),
        scores=tuple(scores or ()),
    )
    with claimed_output(out):  # a bad -o is refused first, in a moment
        open_models_first(cfg.models, cfg.input_shapes, cfg.scores)  # before the progress and the minutes
        with progress("bench --trace", transient=False) as note:
            results = write_trace_report(run_trace_bench(cfg, note), out, trace_command(cfg))
    for name, m in results["models"].items():
        for t in m["targets"]:
            console.print(f"{name}: {t['target']}: {t['shown']} ({verdict(t['met'], 'not applicable')})")
    console.print(f"report: {out / 'report.md'}")


def _bench_chain(
    models,
    chain,
    networks,
    link,
    out,
    seconds,
    window,
    min_fidelity,
    input_shape,
    max_front=None,
    scores=None,
) -> None:
    """`bench --chain`: each --networks is one mix, a network profile per hop."""
    from .bench.chainbench import ChainBenchConfig, chain_command, run_chain_bench
    from .bench.chainreport import write_report
    from .bench.outdir import claimed_output
    from .bench.report import verdict
    from .bench.run import open_models_first

    cfg = ChainBenchConfig.of(
        **({"models": models.split(",")} if models is not None else {}),
        chain=chain.split(","),
        mixes=[n.split(",") for n in networks or ["wifi-n,ethernet", "lte,wifi-n"]],
        link=link,
        out=out,
        seconds=seconds,
        window=window,
        min_fidelity=min_fidelity,
        input_shapes=tuple(input_shape or ()),
        scores=tuple(scores or ()),
        **({"max_front": max_front} if max_front is not None else {}),
    )
    with claimed_output(out):  # a bad -o is refused first, in a moment
        open_models_first(cfg.models, cfg.input_shapes, cfg.scores)  # before the progress and the minutes
        with progress("bench --chain", transient=False) as note:
            results = write_report(run_chain_bench(cfg, note), out, chain_command(cfg))
    for t in results["targets"]:
        console.print(f"{t['target']}: {t['shown']} ({verdict(t['met'], 'not judged')})")
    console.print(f"report: {out / 'report.md'}")


def _check_plot_path(path: Path) -> None:
    """Before the work, not after the plan is written: a format matplotlib writes, in a directory."""
    from matplotlib.figure import Figure

    from splitpoint.core.files import file_in_the_way

    formats = Figure().canvas.get_supported_filetypes()
    if path.suffix.lstrip(".").lower() not in formats:
        raise typer.BadParameter(f"--plot {path}: name a file ending in .{', .'.join(sorted(formats))}")
    if (blocked := file_in_the_way(path.parent)) is not None:
        raise typer.BadParameter(f"--plot {path}: {blocked} is a file")


def _server_keys(
    secret: Path | None, allow: list[Path] | None, next_key: Path | None, deploy: list[Path] | None = None
) -> dict:
    """A server's or a relay's CurveZMQ keys, read and checked, as ServerConfig takes them."""
    from splitpoint.core.curve import read_public, read_secret

    return {
        "curve_secret_key": read_secret(secret) if secret else None,
        "curve_allow": tuple(read_public(p, "client's public key") for p in allow or ()),
        "deploy_allow": tuple(read_public(p, "deploy key's public key") for p in deploy or ()),
        "next_curve_server_key": read_public(next_key, "next stage's public key") if next_key else None,
    }


def _curve_pair(secret: Path | None, server_key: Path | None) -> None:
    """A device's own key serves only a CurveZMQ connection, which the server's public key makes: alone,
    it was ignored and the traffic went in plain text."""
    if secret and not server_key:
        raise typer.BadParameter(
            "--curve-secret is this device's key for a CurveZMQ server; without --curve-server-key (the "
            "server's public key) the connection is not encrypted and the key is not used: give both"
        )


def _seconds(option: str, value: float, zero: str | None = None) -> float:
    """A duration given on the command line: finite, above 0 (or 0 where ``zero`` says what it means),
    and within a year (time.sleep and monotonic deadlines overflow on 1e12)."""
    if not math.isfinite(value) or value < 0 or (value == 0 and zero is None) or value > 365 * 86_400:
        what = "0 or more" + f" ({zero})" if zero else "above 0"
        raise typer.BadParameter(
            f"{option} must be a number of seconds, {what} and at most a year, not {value:g}"
        )
    return value


def _codec_list(codecs: str | None) -> list[str] | None:
    """--codecs: None where not given; an empty list is a mistake, not "the default set"."""
    if codecs is None:
        return None
    names = [c.strip() for c in codecs.split(",") if c.strip()]
    if not names:
        raise typer.BadParameter("--codecs is empty: name at least one codec (or leave it out)")
    return names


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _fail(message: str, code: int) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False, markup=True, soft_wrap=True)
    sys.exit(code)


def _takes_input_shape() -> bool:
    """Whether the command being run has --input-shape: a hint to use it is no help where it has not
    (split-decoder, generate)."""
    name = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    for info in app.registered_commands:
        callback = info.callback
        if callback is not None and name in (info.name, callback.__name__.replace("_", "-")):
            return "input_shape" in inspect.signature(callback).parameters
    return False


def main() -> None:
    """Run the CLI; every error a user can cause is one line on stderr and exit status 2 (a runtime
    failure that a supervisor should restart on is 1)."""
    # SIGTERM (a supervisor, `kill`, a timeout) unwinds like Ctrl-C: what a command was writing is
    # removed on the way out (a temporary plan directory was left behind); the daemons put their own
    # handler in place of this one to drain first
    signal.signal(signal.SIGTERM, _terminated)
    try:
        code = app(standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(getattr(exc, "exit_code", 0))
    except (typer.Abort, KeyboardInterrupt):
        err.print("interrupted")
        sys.exit(130)
    except typer.TyperException as exc:  # usage: a missing, unknown or malformed option
        ctx = getattr(exc, "ctx", None)
        where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        text = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        if not text:  # no arguments at all: the help was the answer
            sys.exit(getattr(exc, "exit_code", 2))
        _fail(escape(text.replace("\n", " ")) + where, 2)
    except SplitPointError as exc:
        _fail(escape(str(exc)).replace("\n", " "), exc.exit_code)
    except MemoryError as exc:  # numpy's names the size it wanted: an input shape this machine cannot hold
        _fail(
            escape(f"not enough memory: {first_line(exc) or 'an allocation failed'} (check --input-shape)"), 2
        )
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as exc:
        _fail(escape(f"{exc.strerror}: {exc.filename}"), 2)
    except OSError as exc:  # the machine's: a full disk, a read-only file system (writes go by temp + rename)
        _fail(escape(os_reason(exc)), 1)
    except Exception as exc:
        if not type(exc).__module__.startswith("onnxruntime"):
            raise
        # the model itself fails to run (an export that fixed a shape it traced, an input shape it cannot
        # take): onnxruntime's own words, on one line
        text = " ".join(str(exc).split())
        about_shapes = any(w in text.lower() for w in ("shape", "dimension", "dims", "size", "rank"))
        what = " at these input shapes (see --input-shape)" if about_shapes and _takes_input_shape() else ""
        _fail(escape(f"onnxruntime could not run the model{what}: {text}"), 2)
    if code == 130:  # typer answers Ctrl-C with this code, not with the exception
        err.print("interrupted")
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
