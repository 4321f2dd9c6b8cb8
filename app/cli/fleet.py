"""The orchestrator's view of the fleet: deploying plans to servers and edges, and reading their
telemetry."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from splitpoint.core.errors import SplitPointError

from ..console import console, err
from .common import _curve_pair, _print_json, _seconds, app


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

    from ..orchestrator import deploy as push
    from ..orchestrator import files_to_push

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
    # past one metrics period (2 s): a device whose status another process overwrote shows as live
    seconds: Annotated[float, typer.Option(help="how long to listen")] = 2.5,
    as_json: Annotated[
        bool, typer.Option("--json", help="one JSON object: each device's latest message of each kind")
    ] = False,
) -> None:
    """Devices and their plans, from retained telemetry."""
    from ..console import fleet_notes, status_table
    from ..orchestrator import collect

    fleet = collect(mqtt, _seconds("--seconds", seconds))
    if as_json:  # for scripts: the payloads as docs/protocol.md gives them, by device and kind
        _print_json({"devices": dict(fleet), "forgotten": fleet.forgotten, "skipped": fleet.skipped})
        return
    console.print(status_table(fleet) if fleet else "no devices have reported")
    if not fleet:
        for note in fleet_notes(fleet):
            console.print(note, markup=False)


@app.command()
def watch(
    mqtt: Annotated[str, typer.Option(help="broker, mqtt://host:port")],
    seconds: Annotated[float, typer.Option(help="stop after this long (0 = until Ctrl-C)")] = 0,
) -> None:
    """Live table of the fleet: state, requests and errors so far, link estimates, latency breakdown,
    CPU, memory, temperature."""
    from rich.live import Live

    from ..console import watch_table
    from ..orchestrator import watch as follow

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
