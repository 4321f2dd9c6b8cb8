"""Decoder-only transformers: split between layers with a KV cache on each side, planned by time
to first token and per output token, and generated through."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from splitpoint.core.errors import SplitPointError

from ..console import console, progress, show_decoder_plan
from .common import CurveServerKey, DeviceSecret, _codec_list, _curve_pair, _print_json, _seconds, app

# The zoo's decoders, spelled here so that building the CLI does not import the zoo (and onnx with it):
# `splitpoint --help` and the fleet commands start in a third less time. A test holds it to the zoo.
DECODER_NAMES = ("gpt2", "decoder-tiny")

_DECODER_HELP = (
    "decoder zoo name (" + ", ".join(DECODER_NAMES) + ") or an exported decoder's ONNX file "
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
        bool,
        typer.Option("--force", help="replace an earlier plan in the output directory (never other files)"),
    ] = False,
    with_full: Annotated[
        bool, typer.Option("--with-full", help="ship the whole model too (generate --local)")
    ] = False,
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
        f"{dec.hidden} floats per token sent as {plan.codec}, "
        f"{'edge weights as in the model' if head_weights == 'float32' else f'edge weights {head_weights}'}; "
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
        bool,
        typer.Option("--force", help="replace an earlier plan in the output directory (never other files)"),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the candidates as JSON")] = False,
    seed: Annotated[int, typer.Option(help="weights' seed (zoo decoders)")] = 0,
    max_len: Annotated[int | None, typer.Option(help=_MAX_LEN_HELP)] = None,
    no_runtime: Annotated[
        bool,
        typer.Option(
            "--no-runtime",
            help="leave out the runtime's own time per step (else measured on decoder-tiny served and "
            "generated over loopback, about 5 s, and counted in every candidate)",
        ),
    ] = False,
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

    def overhead(j: DecoderPlanJob) -> tuple[float, float]:
        from splitpoint.app.decoderruntime import runtime_overhead

        return runtime_overhead(j.prompt_tokens, j.new_tokens, j.edge_cpus)

    with progress("planning a decoder", as_json) as note:
        r = run_decoder_plan(job, note, None if no_runtime else overhead)
    refused = r.refusal(job)
    if as_json and not refused:  # a refusal is one line on stderr and nothing on stdout, as plan's
        _print_json(decoder_plan_json(r))
    elif not as_json:
        show_decoder_plan(r, job, network)  # the table shows what every candidate came to
    if refused:
        raise SplitPointError(refused)


@app.command()
def generate(
    plan_dir: Annotated[Path, typer.Argument(help="a decoder plan (splitpoint split-decoder)")],
    server: Annotated[str, typer.Option(help="the server holding the tail")] = "tcp://127.0.0.1:5555",
    prompt_tokens: Annotated[int, typer.Option(help="random prompt of this many tokens")] = 16,
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate")] = 32,
    seed: Annotated[int, typer.Option(help="the prompt's seed")] = 0,
    local: Annotated[
        bool, typer.Option("--local", help="run the unsplit model here instead (for comparison)")
    ] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait for each step's answer")] = 10.0,
    threads: Annotated[
        int,
        typer.Option(help="onnxruntime intra-op threads (0 = onnxruntime's default; 1 under --cpus)"),
    ] = 0,
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
    if cpus is not None and threads == 0:
        # one thread, as plan-decoder measures a small device: a pool sized to the host's cores under a
        # quota of a fraction of one ran the prefill 5-10x slower in runs here
        threads = 1
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
