"""Running the whole system end to end: the demo, and the benchmarks across network profiles,
traces of changing links and chains."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from splitpoint.core.errors import SplitPointError

from ..console import console, progress
from .common import FidelityInputs, Scores, Shapes, app


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
    input_shape: Shapes = None,
    inputs: FidelityInputs = None,
) -> None:
    """Profile, plan, serve and run a split model on this machine, end to end."""
    from ..demo import DemoConfig, run_demo

    cfg = DemoConfig.of(
        model=model,
        network=network,
        requests=requests,
        window=window,
        mqtt=mqtt,
        edge_slowdown=edge_slowdown,
        emulate_link=not no_link,
        input_shapes=tuple(input_shape or ()),
        inputs=inputs,
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
            help="a trace of phases (network, seconds), a file or a bundled name (lte-wifi): plan sets "
            "measured while the link changes live"
        ),
    ] = None,
    rate: Annotated[
        float | None,
        typer.Option(help="with --trace: requests per second, arriving open loop \\[default: 5]"),
    ] = None,
    scores: Scores = None,
) -> None:
    """Measure the pick, the Pareto front and the baselines per model and network, over emulated links."""
    from ..bench.report import summary_lines, write_report
    from ..bench.run import BenchConfig, run_bench

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
    results = _reported("bench", cfg, out, lambda note: write_report(run_bench(cfg, note), out))
    console.print("\n".join(summary_lines(results, out)))


def _reported(title: str, cfg: Any, out: Path, run: Callable[[Any], dict]) -> dict:
    """A bench run as every mode makes one: its -o claimed first (a bad one refused in a moment), its
    models opened before the progress and the minutes, then ``run(note)``, which writes the report."""
    from ..bench.outdir import claimed_output
    from ..bench.run import open_models_first

    with claimed_output(out):
        open_models_first(cfg.models, cfg.input_shapes, cfg.scores)
        with progress(title, transient=False) as note:
            return run(note)


def _not_with(mode: str, given: dict[str, bool], why: str = "") -> None:
    """Refuse the options given that ``mode`` would ignore."""
    unused = [name for name, g in given.items() if g]
    if unused:
        raise typer.BadParameter(
            f"{', '.join(unused)} {'does' if len(unused) == 1 else 'do'} not go with {mode}{why}"
        )


def _bench_trace(models, trace, rate, device, min_fidelity, out, input_shape, scores=None) -> None:
    """`bench --trace`: plan sets (adaptive, bits-only) and their fixed members on a changing link."""
    from ..bench.report import verdict
    from ..bench.trace import TraceBenchConfig, run_trace_bench, trace_command
    from ..bench.tracereport import write_trace_report

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
    results = _reported(
        "bench --trace",
        cfg,
        out,
        lambda note: write_trace_report(run_trace_bench(cfg, note), out, trace_command(cfg)),
    )
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
    from ..bench.chainbench import ChainBenchConfig, chain_command, run_chain_bench
    from ..bench.chainreport import write_report
    from ..bench.report import verdict

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
    results = _reported(
        "bench --chain",
        cfg,
        out,
        lambda note: write_report(run_chain_bench(cfg, note), out, chain_command(cfg)),
    )
    for t in results["targets"]:
        console.print(f"{t['target']}: {t['shown']} ({verdict(t['met'], 'not judged')})")
    console.print(f"report: {out / 'report.md'}")
