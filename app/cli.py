"""The ``splitpoint`` command line: a thin layer over the library, one sub-command per job.

Every sub-command that takes a model accepts an ONNX path or a zoo name. Errors caused by
input print one specific line and exit 2; nothing is half-written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from splitpoint.core.errors import SplitPointError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Split ONNX inference between an edge device and a server, chosen from measurements.",
)
# Tables are wide; when output is piped (CI logs, files) there is no terminal width to follow.
console = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def _human_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@app.command()
def zoo(
    names: list[str] = typer.Argument(None, help="zoo models to write (default: list them)"),
    out: Path = typer.Option(Path("."), "-o", "--out", help="directory for the .onnx files"),
    width: float = typer.Option(1.0, help="channel width multiplier (1.0 = published architecture)"),
    resolution: int | None = typer.Option(None, help="input resolution (default: the model's own)"),
    seed: int = typer.Option(0, help="weight seed"),
) -> None:
    """List the built-in models, or write them as ONNX files (seeded random weights, no download)."""
    from splitpoint.core import zoo as zoo_mod
    from splitpoint.core.onnxio import save_model

    if not names:
        t = Table("name", "architecture", "params (published)", "GMACs (published)", "input")
        for e in zoo_mod.ZOO.values():
            t.add_row(
                e.name,
                e.summary,
                f"{e.params:,}" if e.params else "-",
                f"{e.gmacs}" if e.gmacs else "-",
                f"{e.resolution}x{e.resolution}",
            )
        console.print(t)
        return
    out.mkdir(parents=True, exist_ok=True)
    for n in names:
        model = zoo_mod.build(n, width=width, resolution=resolution, seed=seed)
        path = out / f"{n}.onnx"
        save_model(model, path)
        console.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {len(model.graph.node)} nodes)")


@app.command()
def cuts(
    model: str = typer.Argument(..., help="ONNX file or zoo name"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """List every candidate cut: crossing tensors, bytes per sample, head share of MACs and params."""
    from splitpoint.core.graph import open_model

    h = open_model(model)
    cs = h.cuts()
    if as_json:
        json.dump(
            {
                "model": str(h.path),
                "model_sha256": h.sha256,
                "compute_nodes": len(h.index.compute),
                "cuts": [c.to_dict() for c in cs],
            },
            sys.stdout,
            indent=1,
        )
        sys.stdout.write("\n")
        return
    t = Table(title=f"{h.name}: {len(cs)} candidate cuts (bytes per sample, derived from shapes)")
    for col in ("cut", "after node", "crossing tensors", "bytes/sample", "head MACs", "head params"):
        t.add_column(
            col, justify="right" if col in ("cut", "bytes/sample", "head MACs", "head params") else "left"
        )
    for c in cs:
        crossing = ", ".join(
            f"{x.name}[{x.shape}]{' (raw input)' if x.source == 'input' else ''}" for x in c.crossing
        )
        t.add_row(
            str(c.index),
            c.last_node,
            crossing,
            _human_bytes(c.bytes_per_sample),
            f"{100 * c.head_macs_share:.1f}%",
            f"{100 * c.head_params_share:.1f}%",
        )
    console.print(t)


@app.command()
def split(
    model: str = typer.Argument(..., help="ONNX file or zoo name"),
    cut: str = typer.Option(
        ..., "--cut", help="cut index (see `splitpoint cuts`) or comma-separated tensor names"
    ),
    out: Path = typer.Option(..., "-o", "--out", help="plan directory to write"),
    force: bool = typer.Option(False, "--force", help="replace a non-empty output directory"),
    with_full: bool = typer.Option(False, "--with-full", help="ship the whole model too (edge fallback)"),
) -> None:
    """Write head.onnx, tail.onnx and plan.json for one cut."""
    from splitpoint.core.graph import open_model, resolve_cut
    from splitpoint.core.plandir import write_plan

    h = open_model(model)
    c = resolve_cut(h.index, cut)
    plan = write_plan(h.index, c, out, h.name, h.sha256, force=force, include_full=with_full)
    console.print(
        f"plan {plan.plan_id[:12]} → {out}: cut {c.index if c.index is not None else cut} crosses "
        f"{', '.join(t.name for t in plan.cut_tensors)} ({_human_bytes(c.bytes_per_sample)}/sample)"
    )


@app.command()
def profile(
    model: str = typer.Argument(..., help="ONNX file or zoo name"),
    role: str = typer.Option("edge", "--role", help="edge or server: where this machine sits in the split"),
    out: Path | None = typer.Option(
        None, "-o", "--out", help="profile JSON (default profiles/measured/MODEL-ROLE.json)"
    ),
    threads: int = typer.Option(
        1, "--threads", help="onnxruntime intra-op threads (0 = onnxruntime's default)"
    ),
    provider: str = typer.Option("CPUExecutionProvider", "--provider", help="onnxruntime execution provider"),
    budget: float = typer.Option(
        30.0, "--budget", help="timed run time allowed, in multiples of one inference"
    ),
    cpus: float | None = typer.Option(
        None, "--cpus", help="emulate a smaller device: limit to this many CPUs"
    ),
    slowdown: float | None = typer.Option(
        None, "--emulate-slowdown", help="emulate a device this many times slower"
    ),
    int8: bool = typer.Option(
        False, "--int8", help="also time the int8 (static QDQ) model, for int8-head plans"
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress output (daemons, scripts)"),
) -> None:
    """Measure the model on this machine: whole model, per node, and head/tail segments per cut."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from splitpoint.core.graph import open_model
    from splitpoint.profiles.cpulimit import cpu_limit
    from splitpoint.profiles.profiler import ProfileSettings, profile_model

    if role not in ("edge", "server"):
        raise typer.BadParameter("--role must be edge or server")
    if cpus is not None and slowdown is not None:
        raise typer.BadParameter("give --cpus or --emulate-slowdown, not both")
    if slowdown is not None:
        if slowdown < 1:
            raise typer.BadParameter("--emulate-slowdown must be >= 1")
        cpus = max(threads, 1) / slowdown
    h = open_model(model)
    out = out or Path("profiles") / "measured" / f"{h.name}-{role}.json"
    settings = ProfileSettings(role=role, threads=threads, provider=provider, budget=budget, int8=int8)
    with cpu_limit(cpus) as emulation:
        if quiet:
            prof = profile_model(h, settings, emulation)
        else:
            with Progress(
                TextColumn("[bold]profiling[/] {task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeElapsedColumn(),
                console=err,
                transient=True,
            ) as bar:
                task = bar.add_task(h.name, total=1)

                def note(what: str, done: int, total: int) -> None:
                    bar.update(task, description=f"{h.name}: {what}", completed=done, total=max(total, 1))

                prof = profile_model(h, settings, emulation, progress=note)
    prof.save(out)
    if not quiet:
        em = f", emulated: {emulation.mechanism} {emulation.cpus:g} CPUs" if emulation else ""
        console.print(
            f"{h.name} ({role}{em}): whole model {prof.whole.median_ms:.2f} ms median "
            f"(p90 {prof.whole.p90_ms:.2f}), {len(prof.cost['measured_cuts'])} segments measured, "
            f"{len(prof.cuts)} cuts; cost {prof.cost['full_inference_equivalents']:.0f}x one inference → {out}"
        )


def _front_table(title: str, front, pick) -> Table:
    t = Table(title=title)
    for col in (
        "",
        "candidate",
        "latency ms",
        "throughput /s",
        "edge ms",
        "transfer ms",
        "bytes/inf",
        "edge memory",
        "fidelity",
    ):
        t.add_column(col, justify="left" if col in ("", "candidate") else "right")
    for c in front:
        t.add_row(
            "★" if c is pick else "",
            c.label,
            f"{c.latency_ms:.1f}",
            f"{c.throughput_ips:.1f}",
            f"{c.edge_ms:.1f}",
            f"{c.transfer_ms:.1f}",
            _human_bytes(c.bytes_per_inference),
            _human_bytes(c.inp.edge_memory_bytes),
            f"{c.inp.fidelity:.3f}" if c.inp.fidelity is not None else "?",
        )
    return t


@app.command()
def plan(
    model: str = typer.Argument(..., help="ONNX file or zoo name"),
    edge_profile: Path = typer.Option(..., "--edge-profile", help="profile measured on the edge device"),
    server_profile: Path = typer.Option(..., "--server-profile", help="profile measured on the server"),
    network: str = typer.Option(
        ..., "--network", help="network profile name (see profiles/networks) or YAML path"
    ),
    out: Path | None = typer.Option(None, "-o", "--out", help="plan directory to write"),
    max_latency: float | None = typer.Option(None, "--max-latency", help="ms"),
    min_fidelity: float | None = typer.Option(None, "--min-fidelity", help="e.g. 0.99 top-1 agreement"),
    edge_memory: float | None = typer.Option(None, "--edge-memory", help="edge memory budget, MiB"),
    max_bytes: int | None = typer.Option(None, "--max-bytes", help="bytes per inference on the wire"),
    objective: str = typer.Option(
        "latency", "--objective", help="latency | throughput | bytes | edge-memory | fidelity"
    ),
    codecs: str | None = typer.Option(
        None, "--codecs", help="comma-separated codecs to consider (default: a standard set)"
    ),
    int8_heads: bool = typer.Option(
        False, "--int8-heads", help="also consider heads with int8 weights (edge profiled with --int8)"
    ),
    inputs: Path | None = typer.Option(
        None, "--inputs", help="folder of .npy files or images for fidelity"
    ),
    random: int = typer.Option(8, "--random", help="seeded random samples for fidelity when no --inputs"),
    plot: Path | None = typer.Option(None, "--plot", help="write a PNG of the front"),
    force: bool = typer.Option(False, "--force", help="replace a non-empty plan directory"),
    as_json: bool = typer.Option(False, "--json", help="print the decision as JSON"),
) -> None:
    """Choose where to cut and how to compress from measured profiles; write the plan."""
    from splitpoint.core.graph import open_model
    from splitpoint.core.plandir import write_baseline_plan, write_plan
    from splitpoint.partitioner.costmodel import EDGE_ONLY, SERVER_ONLY
    from splitpoint.partitioner.fidelity import load_inputs
    from splitpoint.partitioner.pareto import Constraints
    from splitpoint.partitioner.planner import decide, gather
    from splitpoint.profiles.schema import load_measured, load_network

    h = open_model(model)
    net = load_network(network)
    edge = load_measured(edge_profile, model_sha256=h.sha256)
    server = load_measured(server_profile, model_sha256=h.sha256)
    samples = load_inputs(h.model, inputs, random)
    m = gather(h, edge, server, samples, codecs.split(",") if codecs else None, int8_heads=int8_heads)
    cons = Constraints(
        max_latency,
        min_fidelity,
        int(edge_memory * 2**20) if edge_memory else None,
        max_bytes,
        objective=objective,
    )
    d = decide(m, [net], cons)[0]
    front = [c.to_dict() for c in d.front]
    predicted = {
        **d.pick.to_dict(),
        "network": net.model_dump(),
        "constraints": cons.__dict__,
        "fidelity_samples": len(samples),
        "fidelity_inputs": str(inputs) if inputs else f"random x{random}",
    }
    if as_json:
        json.dump({"pick": predicted, "front": front}, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        console.print(
            _front_table(
                f"{h.name} on {net.name}: Pareto front ({len(d.front)} of {len(d.candidates)} "
                "candidates; figures derived from measured profiles)",
                d.front,
                d.pick,
            )
        )
        console.print(
            f"pick ({objective}): [bold]{d.pick.label}[/] — {d.pick.latency_ms:.1f} ms predicted, "
            f"{d.pick.throughput_ips:.1f}/s, {_human_bytes(d.pick.bytes_per_inference)}/inference"
        )
    if plot:
        from splitpoint.app.plots import plot_front

        plot_front(d.candidates, d.front, d.pick, plot, f"{h.name} on {net.name}")
    if out:
        p = d.pick.inp
        head_model = None
        if p.head_weights == "int8":
            from splitpoint.core.graph.extract import extract
            from splitpoint.core.quantize import quantize_head

            base = h.model if p.kind == EDGE_ONLY else extract(h.index, h.cuts()[p.cut - 1], check=False)[0]
            head_model = quantize_head(base, samples, "static")
        if p.kind in (EDGE_ONLY, SERVER_ONLY):
            written = write_baseline_plan(
                h.index,
                p.kind,
                out,
                h.name,
                h.sha256,
                force=force,
                codec=p.codec,
                predicted=predicted,
                front=front,
                model=head_model,
                head_weights=p.head_weights,
            )
        else:
            written = write_plan(
                h.index,
                h.cuts()[p.cut - 1],
                out,
                h.name,
                h.sha256,
                force=force,
                codec=p.codec,
                predicted=predicted,
                front=front,
                head_model=head_model,
                head_weights=p.head_weights,
            )
        if not as_json:
            console.print(f"plan {written.plan_id[:12]} → {out}")


@app.command()
def fidelity(
    model: str = typer.Argument(..., help="ONNX file or zoo name"),
    cut: str = typer.Option(..., "--cut", help="cut index or comma-separated tensor names"),
    codec: str = typer.Option("int8", "--codec", help="cut-tensor codec, e.g. int8+zstd"),
    quantize_head: str | None = typer.Option(
        None, "--quantize-head-weights", help="static (QDQ, calibrated on the inputs) or dynamic"
    ),
    inputs: Path | None = typer.Option(None, "--inputs", help="folder of .npy files or images"),
    random: int = typer.Option(16, "--random", help="seeded random samples when no --inputs"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Measure the split model with a codec (and an int8 head) against the float model."""
    from splitpoint.core.codecs import Codec
    from splitpoint.core.graph import open_model, resolve_cut
    from splitpoint.core.graph.extract import extract
    from splitpoint.core.quantize import quantize_head as qh
    from splitpoint.partitioner.fidelity import load_inputs, measure

    Codec.parse(codec)
    h = open_model(model)
    c = resolve_cut(h.index, cut)
    samples = load_inputs(h.model, inputs, random)
    head_model = None
    if quantize_head:
        head_model = qh(extract(h.index, c, check=False)[0], samples, quantize_head)
    rep = measure(
        h,
        c,
        [codec],
        samples,
        head_model=head_model,
        head_weights=f"int8-{quantize_head}" if quantize_head else "float32",
    )[codec]
    if as_json:
        json.dump(rep.to_dict(), sys.stdout, indent=1)
        sys.stdout.write("\n")
        return
    t = Table(
        title=f"{h.name} cut {c.index if c.index is not None else cut}, codec {codec}, head {rep.head_weights}: "
        f"measured on {rep.samples} samples"
    )
    for col in ("output", "top-1 agreement", "cosine", "max abs error", "SNR dB"):
        t.add_column(col, justify="left" if col == "output" else "right")
    for o in rep.outputs:
        t.add_row(
            o.name,
            "-" if o.top1_agreement is None else f"{o.top1_agreement:.3f}",
            f"{o.cosine:.5f}",
            f"{o.max_abs_error:.4g}",
            f"{o.snr_db:.1f}",
        )
    console.print(t)


edge_app = typer.Typer(add_completion=False, no_args_is_help=True, help="The edge daemon.")
app.add_typer(edge_app, name="edge")


def _logging(quiet: bool) -> None:
    import logging

    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, format="%(asctime)s %(name)s %(message)s"
    )


@app.command()
def serve(
    bind: str = typer.Option("tcp://0.0.0.0:5555", "--bind", help="ZeroMQ endpoint to listen on"),
    plans: Path = typer.Option(
        Path("plans"), "--plans", help="directory of plan directories (pushed plans land here)"
    ),
    workers: int = typer.Option(2, "--workers", help="tail worker threads"),
    max_batch: int = typer.Option(
        1,
        "--max-batch",
        min=1,
        help="micro-batching: up to this many queued same-plan requests share a tail run",
    ),
    threads: int = typer.Option(
        0, "--threads", help="onnxruntime intra-op threads per session (0 = default)"
    ),
    provider: str = typer.Option("CPUExecutionProvider", "--provider", help="e.g. CUDAExecutionProvider"),
    max_message_mb: float = typer.Option(256, "--max-message-mb", help="refuse larger messages"),
    mqtt: str | None = typer.Option(None, "--mqtt", help="telemetry broker, mqtt://[user:pass@]host:port"),
    device_id: str = typer.Option("server", "--device-id"),
    curve_secret: Path | None = typer.Option(
        None, "--curve-secret", help="file with this server's CurveZMQ secret key (z85)"
    ),
    curve_allow: list[Path] = typer.Option(
        [], "--curve-allow", help="file(s) with allowed client public keys (z85)"
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Run the tail server until SIGTERM/Ctrl-C."""
    import signal
    import threading

    from splitpoint.server.tail_server import ServerConfig, TailServer

    _logging(quiet)
    plans.mkdir(parents=True, exist_ok=True)
    cfg = ServerConfig(
        bind=bind,
        plans_dir=plans,
        workers=workers,
        max_batch=max_batch,
        threads=threads,
        provider=provider,
        max_message_bytes=int(max_message_mb * 2**20),
        mqtt=mqtt,
        device_id=device_id,
        curve_secret_key=curve_secret.read_bytes().strip() if curve_secret else None,
        curve_allow=[p.read_bytes().strip() for p in curve_allow],
    )
    srv = TailServer(cfg).start()
    if not quiet:
        err.print(f"serving {len(srv.registry.ids())} plan(s) on {srv.endpoint}")
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    srv.stop()


def _curve_keypair(secret_file: Path | None):
    if secret_file is None:
        return None
    import zmq

    secret = secret_file.read_bytes().strip()
    try:
        return zmq.curve_public(secret), secret
    except (ValueError, zmq.ZMQError) as exc:
        raise SplitPointError(f"{secret_file}: not a z85 CurveZMQ secret key ({exc})") from exc


@app.command()
def keygen(out: Path = typer.Argument(..., help="writes OUT.key (secret) and OUT.pub (public), z85")) -> None:
    """A CurveZMQ key pair for `serve --curve-secret/--curve-allow` and `edge run --curve-server-key/--curve-secret`."""
    import os

    import zmq

    public, secret = zmq.curve_keypair()
    key, pub = out.with_suffix(".key"), out.with_suffix(".pub")
    if key.exists() or pub.exists():
        raise SplitPointError(f"{key} or {pub} exists; not overwriting a key")
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret + b"\n")
    pub.write_bytes(public + b"\n")
    console.print(f"secret key {key} (mode 600), public key {pub}")


@edge_app.command("run")
def edge_run(
    plan_dir: Path = typer.Argument(..., help="plan directory (from `splitpoint plan` or `split`)"),
    server: str = typer.Option("tcp://127.0.0.1:5555", "--server", help="the tail server's endpoint"),
    inputs: Path | None = typer.Option(None, "--inputs", help="folder of .npy inputs to run once"),
    outputs: Path | None = typer.Option(None, "--outputs", help="write results here (.npz per input)"),
    listen: str | None = typer.Option(
        None, "--listen", help="serve local requests, e.g. ipc:///tmp/splitpoint.sock"
    ),
    window: int = typer.Option(4, "--window", help="requests in flight"),
    timeout: float = typer.Option(2.0, "--timeout", help="seconds before a request falls back (or fails)"),
    no_fallback: bool = typer.Option(
        False, "--no-fallback", help="fail instead of running the whole model locally"
    ),
    threads: int = typer.Option(1, "--threads"),
    mqtt: str | None = typer.Option(None, "--mqtt", help="telemetry broker, mqtt://host:port"),
    device_id: str = typer.Option("edge", "--device-id"),
    curve_server_key: Path | None = typer.Option(
        None, "--curve-server-key", help="file with the server's CurveZMQ public key (z85): encrypt"
    ),
    curve_secret: Path | None = typer.Option(
        None, "--curve-secret", help="file with this device's CurveZMQ secret key (z85), for allow-lists"
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Run the head on this device and the tail on the server."""
    from splitpoint.edge.client import EdgeConfig
    from splitpoint.edge.daemon import EdgeDaemon

    _logging(quiet)
    if not inputs and not listen:
        raise typer.BadParameter("give --inputs DIR and/or --listen ENDPOINT")
    daemon = EdgeDaemon(
        EdgeConfig(
            plan_dir,
            server=server,
            window=window,
            timeout_s=timeout,
            fallback=not no_fallback,
            threads=threads,
            mqtt=mqtt,
            device_id=device_id,
            curve_server_key=curve_server_key.read_bytes().strip() if curve_server_key else None,
            curve_keypair=_curve_keypair(curve_secret),
        ),
        listen=listen,
    )
    daemon.install_signal_handlers()
    if inputs:
        summary = daemon.run_folder(inputs, outputs)
        console.print(
            f"{summary['ok']} split, {summary['fallback']} local fallback, {summary['errors']} errors"
        )
    if listen:
        daemon.serve_local()
    else:
        daemon.client.close()


@app.command()
def deploy(
    plan_dir: Path = typer.Argument(..., help="plan directory"),
    server: list[str] = typer.Option([], "--server", help="tail server endpoint(s)"),
    edge: list[str] = typer.Option([], "--edge", help="edge daemon endpoint(s) (its --listen)"),
    timeout: float = typer.Option(30.0, "--timeout"),
) -> None:
    """Push a plan to servers and edge daemons and wait for each to acknowledge it."""
    from splitpoint.app.orchestrator import deploy as push

    if not server and not edge:
        raise typer.BadParameter("name at least one --server or --edge")
    for ep in [*server, *edge]:
        pid = push(plan_dir, ep, timeout)
        console.print(f"{ep}: plan {pid[:12]} acknowledged")


@app.command()
def status(
    mqtt: str = typer.Option(..., "--mqtt", help="broker, mqtt://host:port"),
    seconds: float = typer.Option(1.5, "--seconds", help="how long to listen"),
) -> None:
    """Devices and their plans, from retained telemetry."""
    from splitpoint.app.orchestrator import collect

    fleet = collect(mqtt, seconds)
    t = Table("device", "role", "state", "plan", "server / endpoint", "fallback")
    for dev, kinds in sorted(fleet.items()):
        st = kinds.get("status", {})
        plans = st.get("plans")
        t.add_row(
            dev,
            str(st.get("role", "?")),
            str(st.get("state", "?")),
            (st.get("plan", "") or "")[:12] or (", ".join(p[:12] for p in plans) if plans else "-"),
            str(st.get("server") or st.get("endpoint") or "-"),
            str(st.get("fallback", "-")),
        )
    console.print(t if fleet else "no devices have reported")


@app.command()
def watch(
    mqtt: str = typer.Option(..., "--mqtt", help="broker, mqtt://host:port"),
    seconds: float = typer.Option(0, "--seconds", help="stop after this long (0 = until Ctrl-C)"),
) -> None:
    """Live table of the fleet: state, throughput, latency breakdown, CPU, memory, temperature."""
    import threading
    import time as _time

    from rich.live import Live

    from splitpoint.app.orchestrator import collect

    latest: dict[str, dict] = {}

    def on(dev: str, kind: str, payload: dict) -> None:
        latest.setdefault(dev, {})[kind] = payload

    def table() -> Table:
        t = Table(
            "device",
            "role",
            "state",
            "requests",
            "fallback",
            "e2e ms",
            "head ms",
            "network ms",
            "tail ms",
            "CPU %",
            "RSS MiB",
            "temp °C",
            "dropped",
        )
        for dev, k in sorted(latest.items()):
            st, me, la = k.get("status", {}), k.get("metrics", {}), k.get("latency", {})
            f = lambda v, fmt="{:.1f}": "-" if v is None else fmt.format(v)  # noqa: E731
            t.add_row(
                dev,
                str(st.get("role", me.get("role", "?"))),
                str(st.get("state", "?")),
                str(me.get("requests", me.get("ok", "-"))),
                str(me.get("fallback", st.get("fallback", "-"))),
                f(la.get("total_ms")),
                f(la.get("head_ms")),
                f(la.get("network_ms")),
                f(la.get("tail_ms")),
                f(me.get("cpu_percent")),
                f((me.get("process_rss_bytes") or 0) / 2**20),
                f(me.get("temperature_c")),
                str(me.get("telemetry_dropped", "-")),
            )
        return t

    stop = threading.Event()
    th = threading.Thread(target=lambda: collect(mqtt, seconds or 10**9, on), daemon=True)
    th.start()
    try:
        with Live(table(), console=console, refresh_per_second=4) as live:
            end = _time.monotonic() + (seconds or 10**9)
            while not stop.is_set() and _time.monotonic() < end:
                _time.sleep(0.25)
                live.update(table())
    except KeyboardInterrupt:
        pass


@app.command()
def demo(
    model: str = typer.Option("resnet18", "--model", help="zoo model"),
    network: str = typer.Option("wifi6", "--network", help="network profile to plan for"),
    requests: int = typer.Option(300, "--requests"),
    window: int = typer.Option(4, "--window"),
    mqtt: str | None = typer.Option(None, "--mqtt", help="use this broker instead of the embedded one"),
    edge_slowdown: float = typer.Option(
        4.0, "--edge-slowdown", help="emulate an edge this many times slower (1 = off)"
    ),
    no_link: bool = typer.Option(
        False, "--no-link-emulation", help="plain loopback instead of the network profile"
    ),
) -> None:
    """Profile, plan, serve and run a split model on this machine, end to end."""
    from splitpoint.app.demo import DemoConfig, run_demo

    run_demo(
        DemoConfig(
            model=model,
            network=network,
            requests=requests,
            window=window,
            mqtt=mqtt,
            edge_slowdown=edge_slowdown,
            emulate_link=not no_link,
        ),
        say=console.print,
    )


@app.command()
def bench(
    models: str = typer.Option(
        "resnet18,resnet50,mobilenetv2", "--models", help="zoo models or .onnx paths, comma-separated"
    ),
    networks: str = typer.Option("3g,lte,wifi-n,5g", "--networks", help="network profiles, comma-separated"),
    device: str = typer.Option("rpi4", "--device", help="device profile the edge CPU is calibrated to"),
    link: str = typer.Option("auto", "--link", help="auto | netns (root) | proxy (userspace) | loopback"),
    out: Path = typer.Option(
        Path("bench-results"), "-o", "--out", help="directory for results.json, report.md, plots"
    ),
    seconds: float = typer.Option(1.5, "--seconds", help="measuring time per candidate and phase"),
    window: int = typer.Option(
        4,
        "--window",
        help="least requests in flight in the throughput phase (more where latency ÷ slowest stage needs it)",
    ),
    max_front: int = typer.Option(
        4, "--max-front", help="front members measured besides the pick and baselines"
    ),
    min_fidelity: float = typer.Option(0.99, "--min-fidelity", help="the pick's constraint"),
) -> None:
    """Measure the pick, the Pareto front and the baselines per model and network, over emulated links."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from splitpoint.app.bench.report import write_report
    from splitpoint.app.bench.run import BenchConfig, run_bench

    cfg = BenchConfig(
        models=[m for m in models.split(",") if m],
        networks=[n for n in networks.split(",") if n],
        device=device,
        link=link,
        out=out,
        seconds=seconds,
        window=window,
        max_front=max_front,
        min_fidelity=min_fidelity,
    )
    with Progress(
        TextColumn("[bold]bench[/] {task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=err,
    ) as bar:
        task = bar.add_task("starting", total=len(cfg.models) * len(cfg.networks))

        def progress(text=None, advance=0):
            bar.update(task, advance=advance, **({"description": text} if text else {}))

        results = run_bench(cfg, progress)
    results = write_report(results, out)
    from splitpoint.app.bench.report import headline

    console.print("\n".join(headline(results)))
    s = results["summary"]
    console.print(
        f"median prediction error {100 * (s['prediction_error_median'] or 0):.1f} %; regret ≤ 1.05 in "
        f"{100 * (s['regret_within_target_share'] or 0):.0f} % of cases; {s['bench_seconds'] / 60:.1f} min; "
        f"report in {out / 'report.md'}"
    )


def main() -> None:
    try:
        app()
    except SplitPointError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
