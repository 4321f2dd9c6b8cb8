"""The long-running processes: the tail server, a relay between devices, the edge daemon, and
the keys that secure them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from splitpoint.core.errors import SplitPointError

from ..console import console, err
from .common import (
    CurveServerKey,
    DeviceSecret,
    Drain,
    MaxMessageMb,
    MaxUnreadReplies,
    Mqtt,
    Quiet,
    _curve_pair,
    _daemon_files,
    _logging,
    _server_keys,
    app,
    edge_app,
    message_bytes,
)


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
        int,
        typer.Option(
            help="requests waiting for a tail (beyond the --workers running) before more are answered busy"
        ),
    ] = 256,
    max_unread_replies: MaxUnreadReplies = 1000,
    threads: Annotated[int, typer.Option(help="onnxruntime intra-op threads per session (0 = default)")] = 0,
    provider: Annotated[str, typer.Option(help="e.g. CUDAExecutionProvider")] = "CPUExecutionProvider",
    max_message_mb: MaxMessageMb = 256,
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
        bool,
        typer.Option(
            "--insecure", help="bind a non-loopback address without CurveZMQ: anyone may deploy and run"
        ),
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
    _daemon_files()
    cfg = ServerConfig.of(
        bind=bind,
        plans_dir=plans,
        workers=workers,
        max_queue=max_queue,
        max_unread_replies=max_unread_replies,
        threads=threads,
        provider=provider,
        max_message_bytes=message_bytes(max_message_mb),
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
    insecure: Annotated[
        bool, typer.Option("--insecure", help="listen on a non-loopback address without CurveZMQ")
    ] = False,
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
    max_message_mb: MaxMessageMb = 256,
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
    _daemon_files()
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
        max_message_bytes=message_bytes(max_message_mb),
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
    """A CurveZMQ key pair, for `serve --curve-secret/--curve-allow` and `edge run`/`generate
    --curve-secret`."""
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
        bool,
        typer.Option(
            "--insecure", help="let --listen be reachable from other machines (they may then deploy)"
        ),
    ] = False,
    max_message_mb: MaxMessageMb = 256,
    quiet: Quiet = False,
) -> None:
    """Run the head on this device and the tail on the server."""
    from splitpoint.core.curve import keypair_from_secret, read_public
    from splitpoint.edge.config import EdgeConfig, planned_window
    from splitpoint.edge.daemon import EdgeDaemon

    _logging(quiet)
    _daemon_files()
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
        max_message_bytes=message_bytes(max_message_mb),
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
        if summary.get("signal"):  # as any command stopped by Ctrl-C or SIGTERM: 128 + the signal
            err.print(f"interrupted: {n - answered} of {n} inputs got no answer")
            raise typer.Exit(128 + summary["signal"])
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
        waited = med(split, "edge_wait_ms")  # a folder is submitted at once: most of it waits here
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
