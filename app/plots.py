"""Pareto-front plots (matplotlib, headless), and the axis helpers the bench's plots share."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from splitpoint.core.plan import EDGE_ONLY, SERVER_ONLY
from splitpoint.partitioner.costmodel import Candidate
from splitpoint.partitioner.pareto import Constraints

DOMINATED = "#bbbbbb"
FRONT = "#1f77b4"
PICK = "#d62728"
LIMIT = "#8c1a1a"


def _plain(v: float) -> str:
    return f"{v:,.0f}" if v >= 1000 else f"{v:g}"


def _bytes_label(v: float) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if v >= scale:
            return f"{v / scale:g} {unit}"
    return f"{v:g} B"


def readable_scale(
    ax: Any,
    which: str,
    lo: float,
    hi: float,
    label: Callable[[float], str] = _plain,
    min_ratio: float = 4.0,
) -> None:
    """Set ``ax``'s x or y axis to show [lo, hi] (data limits; a margin is added) so that it reads
    at a glance: a log scale only where the data span at least ``min_ratio``, and then ticks at
    1, 2, 5 x 10^k (fewer or more where the span needs) written as plain numbers, never 10^k
    labels that overlap; a linear scale with its default ticks otherwise."""
    import matplotlib.ticker as mt

    axis = ax.xaxis if which == "x" else ax.yaxis
    set_scale, set_lim = (ax.set_xscale, ax.set_xlim) if which == "x" else (ax.set_yscale, ax.set_ylim)
    if lo <= 0 or hi <= 0 or hi / lo < min_ratio:
        pad = 0.06 * (hi - lo) if hi > lo else max(abs(hi) * 0.1, 1.0)
        set_scale("linear")
        set_lim(lo - pad, hi + pad)
        axis.set_major_locator(mt.MaxNLocator(6))
        axis.set_major_formatter(mt.FuncFormatter(lambda v, _: label(v)))
        return
    set_scale("log")
    lo, hi = lo / 1.25, hi * 1.25
    set_lim(lo, hi)
    exps = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    ticks: list[float] = []
    for subs in ((1,), (1, 3), (1, 2, 5), (1, 2, 3, 5, 7), tuple(range(1, 10))):
        ticks = [m * 10.0**e for e in exps for m in subs if lo <= m * 10.0**e <= hi]
        if len(ticks) >= 4:
            break
    axis.set_major_locator(mt.FixedLocator(ticks))
    axis.set_major_formatter(mt.FuncFormatter(lambda v, _: label(v)))
    axis.set_minor_locator(mt.NullLocator())


def place_labels(ax: Any, items: Sequence[tuple[float, float, str]], fontsize: float = 6) -> None:
    """Label points so that no label runs off the panel or covers another: each label points inwards
    (left of its point in the panel's right part) and moves up or down by a line until it is clear
    of those already placed. Call after the axis limits are set."""
    fig = ax.figure
    x0, x1 = ax.get_xlim()
    to_px = ax.transData.transform
    pt = fig.dpi / 72.0
    h = fontsize * 1.25 * pt
    placed: list[tuple[float, float, float, float]] = []
    for x, y, text in sorted(items, key=lambda it: -it[1]):
        px, py = to_px((x, y))
        lx, rx = to_px((x0, y))[0], to_px((x1, y))[0]
        right = (px - lx) > 0.6 * (rx - lx)
        w = 0.6 * fontsize * pt * len(text)
        dx = -5 if right else 5
        left = px + dx * pt - (w if right else 0)
        for step in (0, -1, 1, -2, 2, -3, 3, -4, 4):
            dy = 3 + step * fontsize * 1.25
            bottom = py + dy * pt
            box = (left, bottom, left + w, bottom + h)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                break
        placed.append(box)
        ax.annotate(
            text,
            (x, y),
            fontsize=fontsize,
            xytext=(dx, dy),
            textcoords="offset points",
            ha="right" if right else "left",
            va="bottom",
        )


def hollow_marker(label: str, color: str = "0.3") -> Any:
    """A legend entry for points drawn hollow: the candidates that miss a constraint."""
    from matplotlib.lines import Line2D

    return Line2D([], [], ls="", marker="o", ms=6, mfc="none", mec=color, color=color, label=label)


def finish_grid(fig: Any, handles: list, title: str, path: Path) -> None:
    """One legend under the panels, in as many rows as the figure's width needs, and the title wrapped to
    that width: with one or two networks a one-line title and legend were cut off at both ends."""
    import textwrap

    width = fig.get_figwidth()
    ncol = min(len(handles), max(2, int(width / 1.7)))
    fig.legend(handles=handles, loc="outside lower center", ncol=ncol, fontsize=9, frameon=False)
    fig.suptitle(textwrap.fill(title, int(width * 10)), fontsize=11)
    fig.savefig(path, dpi=90)


def _span(values: Sequence[float]) -> tuple[float, float]:
    return (min(values), max(values)) if values else (1.0, 10.0)


def _is_baseline_label(c: Candidate) -> bool:
    return c.inp.kind == EDGE_ONLY or (c.inp.kind == SERVER_ONLY and c.inp.codec == "float32")


def constraint_text(cons: Constraints | None) -> str:
    """The constraints a user gave, as one line ("" when none)."""
    if cons is None:
        return ""
    parts = []
    if cons.max_latency_ms is not None:
        parts.append(f"latency ≤ {cons.max_latency_ms:g} ms")
    if cons.min_fidelity is not None:
        parts.append(f"fidelity ≥ {cons.min_fidelity:g}")
    if cons.max_edge_memory_bytes is not None:
        parts.append(f"edge memory ≤ {cons.max_edge_memory_bytes / 2**20:.1f} MiB")
    if cons.max_bytes is not None:
        parts.append(f"≤ {cons.max_bytes:,} bytes per inference")
    if cons.min_throughput_ips is not None:
        parts.append(f"throughput ≥ {cons.min_throughput_ips:g}/s")
    return ", ".join(parts)


def front_figure(
    cands: list[Candidate],
    front: list[Candidate],
    pick: Candidate | None,
    title: str = "",
    constraints: Constraints | None = None,
) -> Any:
    """The front against predicted latency, one panel per objective (throughput, bytes on the
    wire, fidelity), with the user's constraints drawn where an axis shows them. Nothing sent
    (0 bytes: edge-only) sits in its own strip under the log bytes axis, at 0, never at a made-up
    value. Front members that miss a constraint are drawn hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    cons = constraints or Constraints()
    on = set(map(id, front))
    rest = [c for c in cands if id(c) not in on]
    ok = [c for c in front if not cons.violations(c)]
    miss = [c for c in front if cons.violations(c)]
    zero = [c for c in cands if c.bytes_per_inference <= 0]

    fig = plt.figure(figsize=(15, 5.8))
    gs = fig.add_gridspec(
        2 if zero else 1, 3, height_ratios=[8, 1] if zero else None, hspace=0.06, wspace=0.25
    )
    ax_t = fig.add_subplot(gs[:, 0])
    ax_b = fig.add_subplot(gs[0, 1], sharex=ax_t)
    ax_z = fig.add_subplot(gs[1, 1], sharex=ax_t) if zero else None
    ax_f = fig.add_subplot(gs[:, 2], sharex=ax_t)

    def scatter(
        ax, y: Callable[[Candidate], float], keep: Callable[[Candidate], bool], labels: bool = True
    ) -> None:
        def pts(cs):
            cs = [c for c in cs if keep(c)]
            return [c.latency_ms for c in cs], [y(c) for c in cs]

        ax.scatter(*pts(rest), s=8, c=DOMINATED, zorder=2)
        ax.scatter(*pts(ok), s=30, c=FRONT, zorder=3)
        ax.scatter(*pts(miss), s=30, facecolors="none", edgecolors=FRONT, linewidths=1.2, zorder=3)
        if pick is not None and keep(pick):
            ax.scatter([pick.latency_ms], [y(pick)], marker="*", s=260, c=PICK, zorder=4)
        for c in cands if labels else []:
            if keep(c) and (_is_baseline_label(c) or c is pick):
                ax.annotate(
                    c.label, (c.latency_ms, y(c)), fontsize=7, xytext=(5, 4), textcoords="offset points"
                )

    def has_fid(c: Candidate) -> bool:
        return c.inp.fidelity is not None

    scatter(ax_t, lambda c: c.throughput_ips, lambda c: True)
    scatter(ax_b, lambda c: c.bytes_per_inference, lambda c: c.bytes_per_inference > 0)
    if ax_z is not None:
        scatter(ax_z, lambda c: 0.0, lambda c: c.bytes_per_inference <= 0)
    scatter(ax_f, lambda c: c.inp.fidelity or 0.0, has_fid, labels=False)  # crowded at 1.0

    # axes: latency on x everywhere, each y as it reads best
    lat = [c.latency_ms for c in cands]
    if cons.max_latency_ms is not None:
        lat.append(cons.max_latency_ms)
    readable_scale(ax_t, "x", *_span(lat))
    thr = [c.throughput_ips for c in cands] + (
        [cons.min_throughput_ips] if cons.min_throughput_ips is not None else []
    )
    ax_t.set_ylim(0, max(thr, default=1.0) * 1.08)
    sent = [c.bytes_per_inference for c in cands if c.bytes_per_inference > 0]
    if cons.max_bytes:
        sent.append(cons.max_bytes)
    readable_scale(ax_b, "y", *_span(sent), label=_bytes_label, min_ratio=10)
    fids = [c.inp.fidelity for c in cands if c.inp.fidelity is not None]
    if cons.min_fidelity is not None:
        fids.append(cons.min_fidelity)
    f_lo = min(fids, default=0.0)
    ax_f.set_ylim(max(0.0, f_lo - 0.05 * max(1.0 - f_lo, 0.02) - 0.01), 1.0 + max(1.0 - f_lo, 0.02) * 0.06)

    # the constraints, where an axis shows them
    limit: dict[str, Any] = {"color": LIMIT, "ls": "--", "lw": 1.2, "zorder": 5}
    shade: dict[str, Any] = {"color": LIMIT, "alpha": 0.07, "lw": 0, "zorder": 1}
    if cons.max_latency_ms is not None:
        for ax in [ax_t, ax_b, ax_f, *([ax_z] if ax_z is not None else [])]:
            ax.axvline(cons.max_latency_ms, gid="max-latency", **limit)
            ax.axvspan(cons.max_latency_ms, ax.get_xlim()[1], **shade)
    if cons.min_fidelity is not None:
        ax_f.axhline(cons.min_fidelity, gid="min-fidelity", **limit)
        ax_f.axhspan(ax_f.get_ylim()[0], cons.min_fidelity, **shade)
        ax_f.annotate(
            f"min fidelity {cons.min_fidelity:g}",
            (0.01, cons.min_fidelity),
            xycoords=("axes fraction", "data"),
            xytext=(0, -11),
            textcoords="offset points",
            fontsize=7,
            color=LIMIT,
        )
    if cons.min_throughput_ips is not None:
        ax_t.axhline(cons.min_throughput_ips, gid="min-throughput", **limit)
        ax_t.axhspan(0, cons.min_throughput_ips, **shade)
    if cons.max_bytes:
        ax_b.axhline(cons.max_bytes, gid="max-bytes", **limit)
        ax_b.axhspan(cons.max_bytes, ax_b.get_ylim()[1], **shade)
    if cons.max_latency_ms is not None:
        ax_t.annotate(
            f"max latency {cons.max_latency_ms:g} ms",
            (cons.max_latency_ms, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(4, -12),
            textcoords="offset points",
            fontsize=7,
            color=LIMIT,
        )

    xlabel = "predicted end-to-end latency (ms" + (", log)" if ax_t.get_xscale() == "log" else ")")
    ax_t.set_ylabel("pipelined throughput (inferences/s)")
    ax_b.set_ylabel("bytes on the wire per inference")
    ax_f.set_ylabel("fidelity (top-1 agreement with the unsplit model)")
    for ax in (ax_t, ax_f, ax_z if ax_z is not None else ax_b):
        ax.set_xlabel(xlabel)
    for ax in (ax_t, ax_b, ax_f):
        ax.grid(alpha=0.3)
    ax_t.set_title("throughput", fontsize=10)
    ax_b.set_title("bytes sent", fontsize=10)
    ax_f.set_title("fidelity", fontsize=10)
    if ax_z is not None:
        # a broken axis: the strip below holds what sends nothing, apart from the log scale
        ax_b.tick_params(labelbottom=False, bottom=False)
        ax_b.spines["bottom"].set_visible(False)
        ax_z.spines["top"].set_linestyle((0, (4, 3)))
        ax_z.set_ylim(-1, 1)
        ax_z.set_yticks([0], ["0 B"])
        ax_z.grid(alpha=0.3, axis="x")
        ax_z.annotate(
            "nothing sent", (0.99, 0.5), xycoords="axes fraction", ha="right", va="center", fontsize=7
        )
    measured = sum(c.inp.fidelity is not None for c in cands)
    if measured < len(cands):  # the planner measures fidelity only where it can change the front
        ax_f.set_title(f"fidelity (measured for {measured} of {len(cands)} candidates)", fontsize=10)

    handles = [
        Line2D([], [], ls="", marker="o", ms=4, color=DOMINATED, label="dominated"),
        Line2D(
            [],
            [],
            ls="",
            marker="o",
            ms=6,
            color=FRONT,
            label="Pareto front, meets the constraints" if constraint_text(constraints) else "Pareto front",
        ),
    ]
    if miss:
        handles.append(hollow_marker("Pareto front, misses a constraint", FRONT))
    if pick is not None:
        handles.append(Line2D([], [], ls="", marker="*", ms=13, color=PICK, label=f"pick: {pick.label}"))
    drawn = [
        cons.max_latency_ms is not None,
        cons.min_fidelity is not None,
        cons.min_throughput_ips is not None,
        bool(cons.max_bytes),
    ]
    if any(drawn):
        handles.append(Line2D([], [], color=LIMIT, ls="--", label="a constraint (shaded: misses it)"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    given = constraint_text(constraints)
    off_axis = []
    if cons.max_edge_memory_bytes is not None:
        off_axis.append("edge memory")
    if cons.max_bytes == 0:
        off_axis.append("bytes")
    sub = (
        f"{len(cands)} candidates, {len(front)} on the Pareto front"
        + (f", {len(miss)} of them miss a constraint" if miss else "")
        + (f"; constraints: {given}" if given else "; no constraints given")
        + (f" ({' and '.join(off_axis)} on no axis: misses drawn hollow)" if off_axis else "")
    )
    heading = f"{title} — figures predicted from measured profiles".strip(" —")
    sub = textwrap.fill(sub, 160)
    fig.suptitle(f"{heading}\n{sub}", fontsize=11)
    fig.subplots_adjust(left=0.05, right=0.99, top=0.86 - 0.035 * sub.count("\n"), bottom=0.17)
    return fig


def plot_front(
    cands: list[Candidate],
    front: list[Candidate],
    pick: Candidate | None,
    path: str | Path,
    title: str = "",
    constraints: Constraints | None = None,
) -> None:
    fig = front_figure(cands, front, pick, title, constraints)
    import matplotlib.pyplot as plt

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
