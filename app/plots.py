"""Pareto-front plots (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

from splitpoint.core.plan import EDGE_ONLY, SERVER_ONLY
from splitpoint.partitioner.costmodel import Candidate


def plot_front(
    cands: list[Candidate], front: list[Candidate], pick: Candidate | None, path: str | Path, title: str = ""
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.8))
    on = set(map(id, front))
    rest = [c for c in cands if id(c) not in on]
    for ax, y, ylabel, log in (
        (a, lambda c: c.throughput_ips, "pipelined throughput (inferences/s)", False),
        (b, lambda c: max(c.bytes_per_inference, 1), "bytes per inference", True),
    ):
        ax.scatter([c.latency_ms for c in rest], [y(c) for c in rest], s=8, c="#bbbbbb", label="dominated")
        ax.scatter(
            [c.latency_ms for c in front], [y(c) for c in front], s=28, c="#1f77b4", label="Pareto front"
        )
        for c in cands:
            if c.inp.kind in (EDGE_ONLY, SERVER_ONLY) and (
                c.inp.kind == EDGE_ONLY or c.inp.codec == "float32"
            ):
                ax.annotate(
                    c.label, (c.latency_ms, y(c)), fontsize=7, xytext=(4, 4), textcoords="offset points"
                )
        if pick is not None:
            ax.scatter(
                [pick.latency_ms], [y(pick)], marker="*", s=220, c="#d62728", label=f"pick: {pick.label}"
            )
        ax.set_xscale("log")
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("predicted end-to-end latency (ms, log)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    a.legend(fontsize=8, loc="best")
    fig.suptitle(title + " (derived from measured profiles)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
