"""What the CLI shows: consoles, progress bars and tables, built from library results.

Kept apart from ``cli.py`` so that each command stays a few lines of wiring: parse options, build a
config, call one library function, print one of these.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

# Tables are wide; when output is piped (CI logs, files) there is no terminal width to follow.
console = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def fmt(v: float | None, pattern: str = "{:.1f}") -> str:
    return "-" if v is None else pattern.format(v)


@contextmanager
def progress(
    label: str, quiet: bool = False, transient: bool = True, on: Console | None = None
) -> Iterator[Callable[..., None]]:
    """A progress bar (on stderr unless ``on`` says otherwise: the console a command also prints to, so
    that its lines and the bar do not overwrite each other); yields ``note(what, done, total)``."""
    if quiet:
        yield lambda *_, **__: None
        return
    with Progress(
        TextColumn(f"[bold]{label}[/] {{task.description}}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=on or err,
        transient=transient,
    ) as bar:
        task = bar.add_task("", total=1)

        def note(
            what: str | None = None, done: int | None = None, total: int | None = None, advance: int = 0
        ):
            fields: dict[str, Any] = {"advance": advance}
            if what is not None:
                fields["description"] = what
            if done is not None:
                fields["completed"] = done
            if total is not None:
                fields["total"] = max(total, 1)
            bar.update(task, **fields)

        yield note


def table(title: str | None, columns: list[str], rows: list[list[str]], left: int = 1) -> Table:
    """A table whose first ``left`` columns are text and the rest right-aligned figures."""
    t = Table(title=title)
    for k, col in enumerate(columns):
        t.add_column(col, justify="left" if k < left else "right")
    for r in rows:
        t.add_row(*r)
    return t


def cuts_table(name: str, cuts: list) -> Table:
    rows = [
        [
            str(c.index),
            c.last_node,
            ", ".join(
                f"{x.name}[{x.shape}]{' (raw input)' if x.source == 'input' else ''}" for x in c.crossing
            ),
            human_bytes(c.bytes_per_sample),
            f"{100 * c.head_macs_share:.1f}%",
            f"{100 * c.head_params_share:.1f}%",
        ]
        for c in cuts
    ]
    cols = ["cut", "after node", "crossing tensors", "bytes/sample", "head MACs", "head params"]
    return table(f"{name}: {len(cuts)} candidate cuts (bytes per sample, derived from shapes)", cols, rows, 3)


def front_table(title: str, front: list, pick: Any) -> Table:
    rows = [
        [
            "★" if c is pick else "",
            c.label,
            f"{c.latency_ms:.1f}",
            f"{c.throughput_ips:.1f}",
            f"{c.edge_ms:.1f}",
            f"{c.transfer_ms:.1f}",
            human_bytes(c.bytes_per_inference),
            human_bytes(c.inp.edge_memory_bytes),
            fmt(c.inp.fidelity, "{:.3f}"),
        ]
        for c in front
    ]
    cols = ["", "candidate", "latency ms", "throughput /s", "edge ms", "transfer ms", "bytes/inf"]
    return table(title, [*cols, "edge memory", "fidelity"], rows, 2)


def show_plan(r: Any, objective: str, out: Path | None) -> None:
    """``splitpoint plan``'s answer: the front, the pick, and where the plan went."""
    d = r.decision
    title = (
        f"{r.handle.name} on {r.network.name}: Pareto front ({len(d.front)} of {len(d.candidates)} "
        "candidates; figures derived from measured profiles)"
    )
    console.print(front_table(title, d.front, d.pick))
    console.print(
        f"pick ({objective}): [bold]{d.pick.label}[/] — {d.pick.latency_ms:.1f} ms predicted, "
        f"{d.pick.throughput_ips:.1f}/s, {human_bytes(d.pick.bytes_per_inference)}/inference"
    )
    if r.plan is not None:
        console.print(f"plan {r.plan.plan_id[:12]} → {out}")


def fidelity_table(title: str, report: Any) -> Table:
    rows = [
        [
            o.name,
            fmt(o.top1_agreement, "{:.3f}"),
            f"{o.cosine:.5f}",
            f"{o.max_abs_error:.4g}",
            f"{o.snr_db:.1f}",
        ]
        for o in report.outputs
    ]
    return table(title, ["output", "top-1 agreement", "cosine", "max abs error", "SNR dB"], rows)


def status_table(fleet: dict[str, dict]) -> Table:
    rows = []
    for dev, kinds in sorted(fleet.items()):
        st = kinds.get("status", {})
        plans = st.get("plans")
        plan = (st.get("plan", "") or "")[:12] or (", ".join(p[:12] for p in plans) if plans else "-")
        endpoint = str(st.get("server") or st.get("endpoint") or "-")
        rows.append(
            [
                dev,
                str(st.get("role", "?")),
                str(st.get("state", "?")),
                plan,
                endpoint,
                str(st.get("fallback", "-")),
            ]
        )
    return table(None, ["device", "role", "state", "plan", "server / endpoint", "fallback"], rows, 5)


def watch_table(latest: dict[str, dict]) -> Table:
    rows = []
    for dev, k in sorted(latest.items()):
        st, me, la = k.get("status", {}), k.get("metrics", {}), k.get("latency", {})
        rows.append(
            [
                dev,
                str(st.get("role", me.get("role", "?"))),
                str(st.get("state", "?")),
                str(me.get("requests", me.get("ok", "-"))),
                str(me.get("fallback", st.get("fallback", "-"))),
                fmt(la.get("total_ms")),
                fmt(la.get("head_ms")),
                fmt(la.get("network_ms")),
                fmt(la.get("tail_ms")),
                fmt(me.get("cpu_percent")),
                fmt((me.get("process_rss_bytes") or 0) / 2**20),
                fmt(me.get("temperature_c")),
                str(me.get("telemetry_dropped", "-")),
            ]
        )
    cols = ["device", "role", "state", "requests", "fallback", "e2e ms", "head ms", "network ms", "tail ms"]
    return table(None, [*cols, "CPU %", "RSS MiB", "temp °C", "dropped"], rows, 3)
