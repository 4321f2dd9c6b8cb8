"""What the CLI shows: consoles, progress bars and tables, built from library results.

Kept apart from the ``cli`` package so that each command stays a few lines of wiring: parse options, build a
config, call one library function, print one of these.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


def _width(stream: Any) -> int | None:
    """Tables are wide; when output is piped (CI logs, files) there is no terminal width to follow: 160,
    unless $COLUMNS says (rich reads it; piped, a COLUMNS=300 was ignored)."""
    return None if stream.isatty() or os.environ.get("COLUMNS", "").strip().isdigit() else 160


console = Console(width=_width(sys.stdout))
err = Console(stderr=True, width=_width(sys.stderr))


def human_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def fmt(v: object, pattern: str = "{:.1f}", lo: float = -math.inf, hi: float = math.inf) -> str:
    """A figure as text; '-' for none, '?' for a value that is not a number, or one no device could
    have measured (outside ``lo``..``hi``: a negative latency, a CPU past 100 %): a device's junk is not
    shown as a measurement."""
    if v is None:
        return "-"
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or not lo <= v <= hi:
        return "?"
    return pattern.format(v)


def count(v: object) -> str:
    """A count a device keeps (requests, errors): a whole number from 0 up, else '?'."""
    if v is None:
        return "-"
    return str(v) if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else "?"


def text(v: object, default: str = "-") -> str:
    """A device's value as a table cell: its text with rich markup escaped (a state of '[/]' is not
    markup to render, nor '[green]online' a colour to take); control characters were escaped on receipt."""
    return default if v is None or v == "" else escape(str(v))


def word(v: object, default: str = "-") -> str:
    """A device's text field (role, state, plan, endpoint) as a cell: '?' for a value of another type,
    which shown as text (a list's brackets, a dict the cleaning emptied) would pass for something sent."""
    if v is None or v == "":
        return default
    return escape(v) if isinstance(v, str) else "?"


def flag(v: object) -> str:
    """A device's yes/no field: '?' for anything but a bool."""
    return "-" if v is None else ("yes" if v else "no") if isinstance(v, bool) else "?"


@contextmanager
def progress(
    label: str, quiet: bool = False, transient: bool = True, on: Console | None = None
) -> Iterator[Callable[..., None]]:
    """A progress bar (on stderr unless ``on`` says otherwise: the console a command also prints to, so
    that its lines and the bar do not overwrite each other); yields ``note(what, done, total)``."""
    if quiet:
        yield lambda *_, **__: None
        return
    console = on or err
    if not console.is_terminal:
        # a log file or a pipe shows no bar (rich draws it only on a terminal): a plan that measured
        # fidelity for ten minutes printed nothing at all; here a line now and then says where it is
        yield _progress_lines(label, console)
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


PROGRESS_LINE_EVERY_S = 10.0


def _progress_lines(label: str, console: Console) -> Callable[..., None]:
    """``note(what, done, total)`` as a plain line at most every PROGRESS_LINE_EVERY_S, the first that
    long after the start (what finishes sooner says nothing), for output that is not a terminal."""
    t0 = time.monotonic()
    state: dict[str, Any] = {"what": "", "done": 0, "total": 1, "said": 0.0}

    def note(what: str | None = None, done: int | None = None, total: int | None = None, advance: int = 0):
        if what is not None:
            state["what"] = what
        state["done"] = done if done is not None else state["done"] + advance
        if total is not None:
            state["total"] = max(total, 1)
        now = time.monotonic() - t0
        if now - state["said"] >= PROGRESS_LINE_EVERY_S:
            state["said"] = now
            console.print(
                f"{label} {state['what']} {state['done']}/{state['total']} ({now:.0f} s)",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )

    return note


def table(title: str | None, columns: list[str], rows: list[list[str]], left: int = 1) -> Table:
    """A table whose first ``left`` columns are text and the rest right-aligned figures."""
    t = Table(title=title)
    for k, col in enumerate(columns):
        t.add_column(col, justify="left" if k < left else "right")
    for r in rows:
        t.add_row(*r)
    return t


SHOWN_CROSSING = 4  # a cut's tensors shown in the table; past this, the largest few and a count


def _crossing_cell(crossing: list) -> str:
    """A cut's tensors in one cell. A transformer's cut can carry dozens of small shape and mask
    tensors: listed whole, one Swin-T export's table ran to 48,000 lines. The largest are shown, and the
    rest counted with their bytes (``--json`` lists every one)."""

    def one(x: Any) -> str:
        return escape(f"{x.name}[{x.shape}]") + (" (raw input)" if x.source == "input" else "")

    if len(crossing) <= SHOWN_CROSSING:
        return ", ".join(one(x) for x in crossing)
    # a tensor of unknown size (a shape only a run could tell) may be the largest: shown first, never
    # summed as 0 bytes
    big = sorted(crossing, key=lambda x: (x.bytes_per_sample is not None, -(x.bytes_per_sample or 0)))[
        : SHOWN_CROSSING - 1
    ]
    rest = [x for x in crossing if x not in big]
    sizes = [x.bytes_per_sample for x in rest]
    known = human_bytes(sum(b for b in sizes if b is not None))
    unknown = sum(b is None for b in sizes)
    total = f"{known} in all" if not unknown else f"{known} and {unknown} of unknown size"
    return ", ".join(one(x) for x in big) + f", and {len(rest)} more ({total}; --json lists them)"


def _share(share: float | None) -> str:
    return "–" if share is None else f"{100 * share:.1f}%"


def cuts_table(name: str, cuts: list, batch: int | None = None) -> Table:
    """``batch``: the batch the inputs fix (above 1, a row's bytes are a whole request's, not a sample's)."""
    rows = [
        [
            str(c.index),
            escape(c.last_node),
            _crossing_cell(c.crossing),
            human_bytes(c.bytes_per_sample),
            _share(c.head_macs_share),
            _share(c.head_params_share),
        ]
        for c in cuts
    ]
    # a fixed leading dim above 1 may be a batch or not (a time-major [steps, batch, features] input):
    # the rows are a whole request's either way, and the title does not guess which
    per = "request" if batch and batch > 1 else "sample"
    cols = ["cut", "after node", "crossing tensors", f"bytes/{per}", "head MACs", "head params"]
    source = "at the inputs' fixed shapes" if per == "request" else "from the tensors' shapes"
    return table(f"{escape(name)}: {len(cuts)} candidate cuts (bytes per {per}, {source})", cols, rows, 3)


def _front_cells(c: Any) -> list[str]:
    return [
        f"{c.latency_ms:.1f}",
        f"{c.throughput_ips:.1f}",
        f"{c.edge_ms:.1f}",
        f"{c.transfer_ms:.1f}",
        human_bytes(c.bytes_per_inference),
        human_bytes(c.inp.edge_memory_bytes),
        fmt(c.inp.fidelity, "{:.3f}"),
    ]


def fold_alike(front: list, pick: Any = None, constraints: Any = None) -> list[list]:
    """The front's members grouped where every figure the table shows is the same, in front order.

    The front keeps candidates equal in every objective (neither dominates the other), and cuts a
    fused node apart (an Add and its ReLU: no time of their own in the per-node profile, the same
    tensor size) are exactly that; others differ only below the table's precision. Each group is
    one row; the pick, where it is in one, leads its group. With ``constraints``, members of a group
    also miss the same ones."""
    groups: dict[tuple, list] = {}
    for c in front:
        misses = tuple(constraints.misses(c)) if constraints is not None else ()
        groups.setdefault((*_front_cells(c), *misses), []).append(c)
    out = []
    for g in groups.values():
        if pick is not None and any(c is pick for c in g):
            g = [pick, *(c for c in g if c is not pick)]
        out.append(g)
    return out


def _alike_label(group: list) -> str:
    head, rest = group[0].label, [c.label for c in group[1:]]
    if not rest:
        return head
    shown = ", ".join(rest[:3]) + (f" and {len(rest) - 3} more" if len(rest) > 3 else "")
    return f"{head} (+{len(rest)} alike: {shown})"


def front_table(title: str, front: list, pick: Any, constraints: Any = None) -> Table:
    """One row per group of candidates alike in every figure shown; with ``constraints`` (the ones the
    user gave, a ``partitioner.pareto.Constraints``), a column marking what each row misses."""
    rows = []
    for g in fold_alike(front, pick, constraints):
        c = g[0]
        row = ["★" if any(x is pick for x in g) else "", _alike_label(g), *_front_cells(c)]
        if constraints is not None:
            misses = constraints.misses(c)
            row.append("✗ " + "; ".join(misses) if misses else "✓")
        rows.append(row)
    cols = ["", "candidate", "latency ms", "throughput /s", "edge ms", "transfer ms", "bytes/inf up+down"]
    cols += ["edge memory", "fidelity"]
    if constraints is not None:
        cols.append("constraints")
    t = table(title, cols, rows, 2)
    if constraints is not None:
        t.columns[-1].justify = "left"
    return t


def _given(constraints: Any) -> bool:
    names = ("max_latency_ms", "min_fidelity", "max_edge_memory_bytes", "max_bytes", "min_throughput_ips")
    return constraints is not None and any(getattr(constraints, n) is not None for n in names)


# below this measured fidelity, a pick made with no floor is pointed out (the demo's and bench's floor)
LOSSY_NOTE_BELOW = 0.99


def show_plan(r: Any, objective: str, out: Path | None) -> None:
    """``splitpoint plan``'s answer: the front (alike candidates folded, constraint misses marked),
    the pick, and where the plan went."""
    d = r.decision
    cons = getattr(r, "constraints", None)
    cons = cons if _given(cons) else None
    groups = fold_alike(d.front, d.pick, cons)
    folded = len(d.front) - len(groups)
    over = getattr(d, "objectives", None)
    names = ("latency", "throughput", "edge memory", "bytes", "fidelity")
    title = (
        f"{escape(r.handle.name)} on {r.network.name}: Pareto front"
        + (f" over {' × '.join(names[i] for i in over)}" if over else "")
        + f" ({len(d.front)} of {len(d.candidates)} "
        "candidates"
        + (f" in {len(groups)} rows: candidates alike in every figure share one" if folded else "")
        + "; figures derived from measured profiles)"
    )
    console.print(front_table(title, d.front, d.pick, cons))
    if getattr(d, "unmeasured", 0):
        console.print(
            f"{d.unmeasured} cut(s) that could be on the front were left unmeasured (--front-budget): the "
            "front is of the candidates measured; the pick is exact"
        )
    pred = getattr(r, "predicted", {}) or {}
    if pred.get("fidelity_measure"):
        console.print(f"fidelity = {pred['fidelity_measure']}, measured on {pred.get('fidelity_inputs')}")
    if cons is not None:
        missing = [g for g in groups if cons.violations(g[0])]
        console.print(
            f"{len(groups) - len(missing)} of {len(groups)} rows meet every constraint given; "
            f"{len(missing)} miss at least one (✗)."
        )
    fid = d.pick.inp.fidelity
    console.print(
        f"pick ({objective}): [bold]{d.pick.label}[/] — {d.pick.latency_ms:.1f} ms predicted, "
        f"{d.pick.throughput_ips:.1f}/s ({d.pick.window} in flight), "
        f"{human_bytes(d.pick.bytes_per_inference)}/inference"
        + (f" ({human_bytes(d.pick.inp.up_bytes)} up)" if d.pick.bytes_per_inference else "")
        + (f", fidelity {fid:.3f} measured" if fid is not None else "")
    )
    if fid is not None and fid < LOSSY_NOTE_BELOW and (cons is None or cons.min_fidelity is None):
        # with no floor the pick may trade accuracy for speed: say so where the user reads the pick
        console.print(
            f"note: no --min-fidelity was given, and the pick's measured fidelity is {fid:.3f} "
            f"({pred.get('fidelity_samples', '?')} samples): give --min-fidelity {LOSSY_NOTE_BELOW:g} "
            "(or the floor your task needs) to pick among the candidates that keep more"
        )
    _few_samples_note(fid if _lossy(d.pick.inp) else None, cons.min_fidelity if cons else None, pred)
    _fallback_memory_note(r.plan, d.candidates, cons)
    if d.pick.inp.kind != "edge-only" and d.pick.inp.runtime_timing != "measured":
        # the predictions leave out the sockets' and threads' own time: said, not shown as 0
        console.print(
            f"note: the runtime's own time per request is {d.pick.inp.runtime_timing}; profile both sides "
            "with --runtime to count it (a fraction of a millisecond on a fast machine, milliseconds on a "
            "Pi-class one)"
        )
    if r.plan is not None:
        console.print(f"plan {r.plan.plan_id[:12]} → {out}")


def _fallback_memory_note(plan: Any, candidates: list, cons: Any) -> None:
    """--with-full ships the whole model for the edge to fall back on; the edge-memory limit judged the
    pick's head alone (a 1.9 GB fallback went with a pick shown at 1.0 GiB under --edge-memory 1200)."""
    limit = getattr(cons, "max_edge_memory_bytes", None)
    if plan is None or limit is None or "full.onnx" not in plan.files:
        return
    whole = [
        c.inp.edge_memory_bytes
        for c in candidates
        if c.inp.kind == "edge-only" and c.inp.head_weights == "float32"
    ]
    if whole and whole[0] > limit:
        console.print(
            f"note: the whole model shipped for fallback (--with-full) takes {human_bytes(whole[0])} on the "
            f"edge (derived, as the edge-only candidate), past --edge-memory {human_bytes(limit)}: the edge "
            "loads it only where three times its size is free, and says when it does not; leave out "
            "--with-full to keep the plan within the limit"
        )


def _lossy(inp: Any) -> bool:
    """Whether a candidate's answers may differ from the model's: a lossy codec or a quantised head
    (the model all on the edge runs as it is)."""
    from splitpoint.core.codecs import Codec

    return inp.kind != "edge-only" and (not Codec.parse(inp.codec).lossless or inp.head_weights != "float32")


def _few_samples_note(fid: float | None, floor: float | None, pred: dict, whose: str = "the pick's") -> None:
    """Where a lossy pick's fidelity (``fid``; None for a lossless one) was measured on too few inputs to
    show the floor it met, say so and how many it takes."""
    few = _too_few_for(floor, pred.get("fidelity_samples"))
    if fid is None or few is None or floor is None:
        return
    console.print(
        f"note: {whose} fidelity {fid:.3f} was measured on {pred['fidelity_samples']} inputs: where "
        "fidelity is the share of inputs that agree, agreement on all of them bounds it only at ≥ "
        f"{few[0]:.2f} (95 %), below the floor {floor:g}; give at least {few[1]} samples (--random N, "
        "or --inputs DIR) for the floor to hold with that confidence",
        highlight=False,
    )


def _too_few_for(floor: float | None, n: object) -> tuple[float, int] | None:
    """(the 95 % lower bound that agreement on all ``n`` inputs gives, the inputs the floor needs) where
    ``n`` cannot show ``floor``; None where it can or nothing is known: a measured 1.000 on 8 inputs met a
    floor of 0.99 that the bench's own requests then measured at 0.69."""
    from splitpoint.partitioner.taskmetrics import Z95, wilson

    if floor is None or not isinstance(n, int) or n <= 0 or floor <= 0 or floor >= 1:
        return None
    low = wilson(n, n).low  # n / (n + z^2): the bound reaches the floor at n = floor z^2 / (1 - floor)
    return (low, math.ceil(floor * Z95**2 / (1 - floor))) if low < floor else None


def show_plan_set(r: Any, out: Path | None) -> None:
    """``splitpoint plan --set``'s answer: each member, its bandwidth range, its predicted latency at
    both ends of that range (derived) and its measured fidelity."""
    from splitpoint.partitioner.costmodel import Link, evaluate

    rtt = r.network.rtt_ms
    down = r.network.downlink_mbps / r.network.uplink_mbps
    rows = []
    for k, m in enumerate(r.members):
        ends = [b for b in (max(m.lo_mbps, 0.1), m.hi_mbps) if b != float("inf")]
        evs = [evaluate(m.inp, Link("x", b, b * down, rtt)) for b in ends]
        hi = "∞" if m.hi_mbps == float("inf") else f"{m.hi_mbps:.3g}"
        rows.append(
            [
                f"m{k}",
                m.label,
                f"{m.lo_mbps:.3g} – {hi}",
                " – ".join(f"{e.latency_ms:.1f}" for e in evs),
                " – ".join(f"{e.throughput_ips:.3g}" for e in evs),
                fmt(m.inp.fidelity, "{:.3f}"),
            ]
        )
    rate = getattr(r, "rate_ips", None)
    title = (
        f"{escape(r.handle.name)}: plan set for {r.network.name}'s round trip ({rtt:g} ms)"
        + (f", requests arriving at {rate:g}/s" if rate else "")
        + "; latency and throughput derived from measured profiles"
    )
    heads = ["member", "plan", "uplink Mbit/s", "ms at the range's ends", "per s there", "fidelity"]
    console.print(table(title, heads, rows, 2))
    pred = getattr(r, "predicted", None) or {}
    if pred.get("fidelity_measure"):  # as `plan` says it: what the fidelity column was measured on
        console.print(f"fidelity = {pred['fidelity_measure']}, measured on {pred.get('fidelity_inputs')}")
    lossy = [m.inp.fidelity for m in r.members if m.inp.fidelity is not None and _lossy(m.inp)]
    floor = getattr(r, "min_fidelity", None)
    if floor is None and lossy and min(lossy) < LOSSY_NOTE_BELOW:  # as `plan` says of its pick
        console.print(
            f"note: no --min-fidelity was given, and a member's measured fidelity is {min(lossy):.3f} "
            f"({pred.get('fidelity_samples', '?')} samples): give --min-fidelity {LOSSY_NOTE_BELOW:g} "
            "(or the floor your task needs) for members that keep more"
        )
    _few_samples_note(min(lossy) if lossy else None, floor, pred, "a lossy member's")
    if rate:
        from splitpoint.partitioner.planset import RATE_HEADROOM, short_of_rate

        short = short_of_rate(r.members, rate, rtt, down)
        if short is not None:
            where = (
                "at any uplink"
                if short.everywhere
                else f"from {short.lo_mbps:.3g} to {short.hi_mbps:.3g} Mbit/s uplink"
            )
            console.print(
                f"[yellow]warning:[/yellow] no member is predicted to keep up with {rate:g} requests/s "
                f"{where} (with {RATE_HEADROOM:g}x headroom; the most there is {short.most_ips:.3g}/s): "
                "there the one that comes closest runs and requests queue"
            )
    if r.written is not None:
        console.print(f"plan set of {len(r.members)} ({r.written.policy}) → {out}")


def fidelity_table(title: str, report: Any) -> Table:
    rows = [
        [
            escape(o.name),
            fmt(o.top1_agreement, "{:.3f}")
            if o.exact_agreement is None
            else f"{o.exact_agreement:.3f} equal",
            "—" if o.cosine is None else f"{o.cosine:.5f}",
            f"{o.max_abs_error:.4g}"
            + (
                f" ({o.shape_mismatches} of {report.samples} samples of another shape)"
                if o.shape_mismatches
                else ""
            ),
            f"{o.snr_db:.1f}",
        ]
        for o in report.outputs
    ]
    return table(title, ["output", "top-1 (or equal) agreement", "cosine", "max abs error", "SNR dB"], rows)


def device_state(kinds: dict) -> str:
    """The device's state as its retained status says, and where processes collide on its id, that too:
    with two, the one that stopped last writes 'offline' over the other's 'online'."""
    st = kinds.get("status", {})
    state = word(st.get("state"), "?")
    if state == "online" and st.get("edge_only") is True:
        state += " (edge-only plan)"
    elif state == "online":  # up, but what it relies on may not be: "online" alone read as healthy
        if st.get("server_up") is False:
            local = st.get("fallback") is True or st.get("local") is True
            state += f" (server unreachable: {'answering locally' if local else 'requests fail'})"
        elif st.get("fallback") is True:
            state += " (fallback)"
        if st.get("next_up") is False:
            state += " (next stage not connected: requests fail)"
    n = kinds.get("instances")
    if isinstance(n, int) and n > 1:
        return f"{state}: {n} processes publish under this id"
    if isinstance(n, int) and n == 1 and state == "offline":
        return "offline? (another process with this id still publishes)"
    return state


def _plan_cell(st: dict) -> str:
    """The plan a device runs (or a server's plans), and an adaptive edge's member: '?' where the
    device sent something else than ids."""
    plan, plans = st.get("plan"), st.get("plans")
    if plan not in (None, ""):
        cell = escape(plan[:12]) if isinstance(plan, str) else "?"
    elif isinstance(plans, list):
        cell = ", ".join(escape(p[:12]) if isinstance(p, str) else "?" for p in plans)
    else:
        cell = "-" if plans is None else "?"
    member, size = st.get("member"), st.get("plan_set")
    if member and isinstance(size, int) and not isinstance(size, bool):  # an adaptive edge: which member
        cell += f" ({word(member)}, of a set of {size})"
    return cell


def fleet_notes(fleet: dict) -> list[str]:
    """Said under a view: the ids let go past those kept, and the messages left unread, and why (they
    were dropped without a word: a view blinded by junk read as a quiet fleet)."""
    notes = []
    n = getattr(fleet, "forgotten", 0)
    if n:
        notes.append(
            f"{n} device ids forgotten past the {getattr(fleet, 'kept', len(fleet)):,} kept (the least "
            "recently heard go first: a device that publishes again comes back)"
        )
    skipped = getattr(fleet, "skipped", {})
    if skipped:
        whys = ", ".join(f"{k} {v:,}" for k, v in sorted(skipped.items()))
        notes.append(f"{sum(skipped.values()):,} messages on device topics left unread ({whys})")
    return notes


def status_table(fleet: dict[str, dict]) -> Table:
    rows = []
    for dev, kinds in sorted(fleet.items()):
        st = kinds.get("status", {})
        rows.append(
            [
                text(dev),
                word(st.get("role"), "?"),
                device_state(kinds),
                _plan_cell(st),
                word(st.get("server") or st.get("endpoint")),
                flag(st.get("fallback")),
            ]
        )
    t = table(None, ["device", "role", "state", "plan", "server / endpoint", "fallback"], rows, 5)
    t.caption = "\n".join(fleet_notes(fleet)) or None
    return t


def heard_s_ago(kinds: dict, now: float | None = None) -> float | None:
    """Seconds since the device's latest metrics or latency message: figures that stop moving while the
    broker or the device is down would otherwise look current. Timed by when this machine received it
    (a device whose clock runs ahead read 0 s ago for ever); a retained message, received at once
    however old, by the device's own stamp."""
    stamps = [
        p.get("received", p.get("ts"))
        for p in (kinds.get("metrics"), kinds.get("latency"))
        if isinstance(p, dict)
    ]
    times = [float(t) for t in stamps if isinstance(t, int | float) and not isinstance(t, bool)]
    return max(0.0, (time.time() if now is None else now) - max(times)) if times else None


# the fleet view's columns, most needed first: on a narrow terminal the last ones give way (and the
# caption names them) instead of every column shrinking to '…', device names and figures included
WATCH_COLUMNS = (
    "device",
    "state",
    "heard s ago",
    "e2e ms",
    "requests",
    "errors",
    "role",
    "uplink est Mbit/s",
    "RTT est ms",
    "plan-set member",
    "host CPU %",
    "RSS MiB",
    "fallbacks",
    "head ms",
    "network ms",
    "tail ms",
    "temp °C",
    "telemetry dropped",
)
MAX_ROWS = 200
WATCH_ORDER = (  # the order shown in
    "device",
    "heard s ago",
    "role",
    "state",
    "plan-set member",
    "requests",
    "fallbacks",
    "errors",
    "uplink est Mbit/s",
    "RTT est ms",
    "e2e ms",
    "head ms",
    "network ms",
    "tail ms",
    "host CPU %",
    "RSS MiB",
    "temp °C",
    "telemetry dropped",
)


def _errors(metrics: dict) -> str:
    """Requests that failed and, where a device counts them apart, those it refused (malformed, unknown
    plan, busy): a server's refusals were in no column."""
    errors, refused = count(metrics.get("errors")), count(metrics.get("rejected"))
    if refused in ("-", "0"):
        return errors
    if "?" in (errors, refused):
        return "?"
    return str(int(errors if errors != "-" else 0) + int(refused))


def _watch_row(k: dict) -> dict[str, str]:
    st, me, la = k.get("status", {}), k.get("metrics", {}), k.get("latency", {})
    rss = me.get("process_rss_bytes")
    member = st.get("member", me.get("member"))
    return {
        "heard s ago": fmt(heard_s_ago(k)),
        "role": word(st.get("role", me.get("role")), "?"),
        "state": device_state(k),
        # the status names the member ("m1 int8 cut 20"); metrics carry its number alone
        "plan-set member": word(member) if not isinstance(member, int) else count(member),
        "requests": count(me.get("requests", me.get("ok"))),
        "fallbacks": count(me.get("fallback")),
        "errors": _errors(me),
        "uplink est Mbit/s": fmt(me.get("bandwidth_mbps_est"), lo=0),
        "RTT est ms": fmt(me.get("rtt_ms_est"), lo=0),
        "e2e ms": fmt(la.get("total_ms"), lo=0),
        "head ms": fmt(la.get("head_ms"), lo=0),
        "network ms": fmt(la.get("network_ms"), lo=0),
        "tail ms": fmt(la.get("tail_ms"), lo=0),
        "host CPU %": fmt(me.get("cpu_percent"), lo=0, hi=100),  # psutil's, over the whole machine
        "RSS MiB": fmt(
            rss / 2**20 if isinstance(rss, int | float) and not isinstance(rss, bool) else rss, lo=0
        ),
        "temp °C": fmt(me.get("temperature_c"), lo=-60, hi=200),
        "telemetry dropped": count(me.get("telemetry_dropped")),
    }


def watch_table(latest: dict[str, dict], lost_since: float | None = None, width: int | None = None) -> Table:
    """``lost_since``: when the watcher's own broker connection dropped (every figure is then stale);
    ``width``: the characters the table may take (default: the console's). Counts are since the device
    started; the link estimates and the latencies (the last request's) are the device's own: measured
    on its clock, the estimates derived from its requests."""

    # a screenful: thousands of rows (forged ids, or a large fleet) took seconds per frame to draw. The
    # screenful is of those heard most lately (a device that publishes is not pushed off by ids that
    # spoke once), in name order
    def quiet_for(item: tuple[str, dict]) -> float:
        ago = heard_s_ago(item[1])
        return math.inf if ago is None else ago

    recent = sorted(latest.items(), key=quiet_for)[:MAX_ROWS] if len(latest) > MAX_ROWS else latest.items()
    rows = [{"device": text(dev), **_watch_row(k)} for dev, k in sorted(recent)]

    def head(col: str) -> str:  # two lines at most, broken where the unit begins
        if col == "heard s ago":
            return "heard\ns ago"
        words = col.split()
        return col if len(words) == 1 else " ".join(words[:-1]) + "\n" + words[-1]

    def need(col: str) -> int:  # the column's width, its padding and border included
        return max([*(len(x) for x in head(col).split("\n")), *(len(r[col]) for r in rows)]) + 3

    shown = list(WATCH_COLUMNS)
    room = (width or console.width) - 1
    while len(shown) > 2 and sum(need(c) for c in shown) > room:
        shown.pop()
    cols = [c for c in WATCH_ORDER if c in shown]
    t = Table()
    for c in cols:
        left = c in ("device", "role", "state", "plan-set member")
        t.add_column(head(c), justify="left" if left else "right", width=need(c) - 3, no_wrap=True)
    for r in rows:
        t.add_row(*(r[c] for c in cols))
    notes = []
    if len(cols) < len(WATCH_COLUMNS):
        hidden = [c for c in WATCH_ORDER if c not in shown]
        notes.append(
            f"{len(hidden)} column{'s' if len(hidden) > 1 else ''} left out for the terminal's width: "
            + ", ".join(f"'{c}'" for c in hidden)
        )
    if len(latest) > len(rows):
        notes.append(
            f"{len(latest) - len(rows)} more devices not shown, the least lately heard (`splitpoint status` "
            "lists them)"
        )
    notes += fleet_notes(latest)
    if lost_since is not None:
        notes.append(
            f"[bold red]connection to the MQTT broker lost {time.time() - lost_since:.0f} s ago: "
            "these figures are as they were then[/]"
        )
    t.caption = "\n".join(notes) or None
    return t


def show_chain(r: Any, out: Path | None) -> None:
    """``splitpoint plan-chain``'s answer: the front over the chain and its baselines, and the pick."""
    from splitpoint.partitioner.chainplan import describe

    m, d = r.measurements, r.decision
    names: dict[int, list[str]] = {}
    for name, p in d.baselines.items():
        names.setdefault(id(p), []).append(name)
    rows = []
    # the pick too: a plan that meets the floor may be off the front, beaten by ones below it
    shown = {id(p): p for p in [*d.front, *d.baselines.values(), d.pick]}.values()
    cons = getattr(r, "constraints", None)
    missed = False
    for p in sorted(shown, key=lambda p: p.latency_ms):
        misses = cons.misses(p) if cons is not None else []
        missed = missed or bool(misses)
        mark = "★ " if p is d.pick else "✗ " if misses else ""  # (not "→": the plans' own labels use it)
        rows.append(
            [
                mark + describe(m, p),
                ", ".join((["front"] if any(p is q for q in d.front) else []) + names.get(id(p), [])),
                f"{p.latency_ms:.1f}",
                f"{p.throughput_ips:.1f}",
                " / ".join(f"{x:.1f}" for x in p.stage_ms),
                " / ".join(human_bytes(b) for b in p.hop_bytes) or "-",
                fmt(p.fidelity, "{:.3f}"),
            ]
        )
    hops = [f" ({net.name})" for net in m.networks] + [""]
    chain = " → ".join(f"{dev}{hop}" for dev, hop in zip(m.devices, hops, strict=True))
    console.print(
        table(
            f"{escape(m.handle.name)} over {chain}: latency x throughput front and baselines (derived from "
            "measured profiles; fidelity measured)",
            ["plan", "role", "latency ms", "throughput /s", "busy ms per device", "bytes up per hop"]
            + ["fidelity"],
            rows,
        )
    )
    if missed:
        console.print(
            "✗: misses a constraint given (the front is over latency and throughput; shown for scale)"
        )
    if any(int(m.costs.positions[i]) == 0 for p in shown for i in p.cuts):
        console.print(
            "cut 0: that device runs none of the model and sends the input on (`split` takes no cut 0: "
            "such a plan is written by plan-chain -o)"
        )
    pred = r.predicted
    console.print(f"fidelity = {pred['fidelity_measure']}, measured on {pred['fidelity_inputs']}")
    p = d.pick
    console.print(
        f"pick: [bold]{describe(m, p)}[/] — {p.latency_ms:.1f} ms, {p.throughput_ips:.1f}/s predicted "
        f"(bottleneck {p.bottleneck_ms:.1f} ms)"
    )
    from splitpoint.core.codecs import Codec

    if not d.exhaustive:
        console.print(
            "note: the search for a plan at the fidelity floor ran out of its fidelity runs and then gave up "
            "whole codecs, the lossiest first: the pick is the best plan found, not shown to be the best",
            highlight=False,
        )
    lossy = any(not Codec.parse(m.costs.codecs[k]).lossless for k in p.codecs)
    _few_samples_note(p.fidelity if lossy else None, cons.min_fidelity if cons is not None else None, pred)
    if r.plan is not None:
        console.print(
            f"plan {r.plan.plan_id[:12]} → {out} ({len(r.plan.stages)} "
            f"stage{'s' if len(r.plan.stages) != 1 else ''})"
        )


def show_decoder_plan(r: Any, job: Any, network: str) -> None:
    """``splitpoint plan-decoder``'s answer: the best candidates and the baselines (derived from measured
    blocks), the pick's measured fidelity, the baselines faster than it, and where its plan went."""
    key = (lambda c: c.tpot_ms) if job.objective == "tpot" else (lambda c: c.ttft_ms)
    rows = [
        [
            c.label + (" ← pick" if c is r.pick else ""),
            f"{c.ttft_ms:.1f}",
            f"{c.tpot_ms:.1f}",
            human_bytes(c.step_bytes),
            f"{c.edge_memory_bytes / 2**20:.1f}",
        ]
        for c in sorted(r.candidates, key=key)[:12]
    ]
    rows += [
        [
            name + " (baseline)",
            f"{b['ttft_ms']:.1f}",
            f"{b['tpot_ms']:.1f}",
            "",
            f"{b['edge_memory_bytes'] / 2**20:.1f}",
        ]
        for name, b in r.baselines.items()
    ]
    console.print(
        table(
            f"{escape(r.decoder.name)} on {network}: derived from measured blocks "
            f"(best 12 by {job.objective})",
            ["candidate", "TTFT ms", "TPOT ms", "bytes/token", "edge MiB"],
            rows,
        )
    )
    best, fid = r.pick, r.fidelity
    if best is None or fid is None:
        return
    a, k = fid["agreement"], fid["kl"]
    console.print(
        f"pick: {best.label}: greedy agreement {a['value']:.3f} [{a['low']:.3f}, {a['high']:.3f}], "
        f"next-token KL {k['value']:.2g} nats (measured, {fid['prompts']} random prompts x "
        f"{fid['new_tokens']} tokens, against the unsplit model; {r.weights})"
    )
    if job.min_agreement is None and a["value"] < 0.99:
        console.print(
            f"[yellow]note:[/] the pick is lossy (greedy agreement {a['value']:.3f}) and no floor was given: "
            "--min-agreement A picks the fastest split whose measured agreement reaches A",
            highlight=False,
        )
    if not r.runtime_measured:
        console.print(
            "TTFT and TPOT leave out the runtime's own time per step (client, wire, server session): "
            "not measured with --no-runtime",
            highlight=False,
        )
    if r.faster_baselines:
        base = r.baselines
        listed = ", ".join(
            f"{escape(n)} {base[n]['ttft_ms']:.1f} / {base[n]['tpot_ms']:.1f} ms"
            + (
                f" ({base[n]['edge_memory_bytes'] / 2**20:.0f} MiB on the edge)"
                if base[n]["edge_memory_bytes"]
                else ""
            )
            for n in r.faster_baselines
        )
        console.print(
            f"[yellow]note:[/] faster than the pick ({best.ttft_ms:.1f} / {best.tpot_ms:.1f} ms TTFT / "
            f"TPOT) within these limits, derived alike: {listed}. The pick is the best split, not the "
            "best way to run this model here; a split pays where the edge cannot hold the model "
            "(--edge-memory) and the server's share outweighs a round trip per token",
            highlight=False,
        )
    if r.plan is not None:
        console.print(f"pick: {best.label}; plan {r.plan.plan_id[:12]} → {job.out}")
