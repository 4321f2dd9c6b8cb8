"""The trace bench's report: results.json, report.md and a latency-over-time plot per model."""

from __future__ import annotations

from pathlib import Path

from splitpoint.core.textfiles import dumps_strict
from splitpoint.partitioner.planset import RATE_HEADROOM

from . import hostload
from .edgecpu import calibration_verdict
from .outdir import staged
from .provenance import sentence_end
from .report import verdict


def write_trace_report(results: dict, out: Path, command: str) -> dict:
    """Every file written before any replaces the last run's: nothing half-written, no mix of two runs."""
    results["command"] = command
    with staged(out) as stage:
        results["plots"] = [
            p for name, m in results["models"].items() if (p := plot(name, m, results, stage))
        ]
        (stage / "results.json").write_text(dumps_strict(results, indent=1, default=str), encoding="utf-8")
        (stage / "report.md").write_text(markdown(results, command), encoding="utf-8")
    return results


def _machine(m: dict) -> str:
    cores = m.get("cores_logical")
    return f"{m.get('cpu_model') or m.get('cpu') or 'an unnamed CPU'}" + (
        f" ({cores} cores)" if cores else ""
    )


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f}"


def _fixed_seconds(results: dict) -> str:
    """How long each fixed member ran on each network: as set, or as long as that network's longest phase."""
    if results["config"].get("fixed_seconds"):
        return f"{results['config']['fixed_seconds']:g} s"
    models: list[dict] = list(results["models"].values())
    per: dict = models[0].get("fixed_seconds", {}) if models else {}
    each = ", ".join(f"{n} {s:g} s" for n, s in per.items())
    return f"as long as the longest phase ({each})"


def _answers(run: dict) -> str:
    """Each member's answers against the unsplit model's, as the run checked them."""
    said = []
    for k, c in sorted(run.get("answers", {}).items(), key=lambda kv: int(kv[0])):
        agree = "–" if c["agreement"] is None else f"{c['agreement']:.3f}"
        said.append(f"m{k} {agree}, max {c['max_abs_error']:.2g} over {c['inputs']} inputs")
    return "; ".join(said) or "none answered"


def pct(v: float | None) -> str:
    """A share as a percentage ('–' for none)."""
    return "–" if v is None else f"{100 * v:.0f} %"


def markdown(results: dict, command: str) -> str:
    cal = results["edge_calibration"]
    cfg = results["config"]
    total = sum(p["seconds"] for p in results["trace"])
    nets = list(dict.fromkeys(p["network"] for p in results["trace"]))
    lines = [
        "# SplitPoint trace bench: plan sets on a changing link",
        "",
        f"`{command}` on {_machine(results['machine'])}, {results['seconds'] / 60:.1f} min in all"
        + sentence_end(results["machine"])
        + hostload.sentence(results.get("host_load")),
        "",
        f"- **Trace:** {len(results['trace'])} phases over {total:g} s ({', '.join(nets)}); requests arrive "
        f"at {cfg['rate']:g}/s whatever the link (open loop), latency from when each was due to its answer.",
        "- **Link:** the userspace link proxy on loopback (rate, delay and jitter per the network "
        "profile), reshaped live at each phase boundary under the open connections.",
        f"- **Edge CPU:** {cal['device']}-class: {cal['reference_model']} {cal['measured_ms']:.1f} ms here "
        f"under {cal['cpus']:g} CPU against the device profile's {cal['target_ms']:g} ms"
        f"{calibration_verdict(cal)}.",
        f"- **Policies:** *adaptive* (cut and codec per uplink range, re-judged every "
        f"{cfg['adapt_window']} requests at the edge's own estimate, with hysteresis; while on the edge one "
        f"request in {cfg['probe_every']} probes the link; while it sends, one in 5 goes over the "
        "member for a link 4x faster, when that one sends more); *bits-only* (the cut "
        "fixed, the codec per range, as QuantPipe does); each adaptive member *fixed*, measured "
        f"{_fixed_seconds(results)} on each network.",
        "- **The edge's estimate** (phase table, estimated): the medians over the phase of the uplink and "
        "round trip the adaptive edge estimated from its own requests and pings"
        + (
            " (the profiles: "
            + "; ".join(
                f"{n} {v['uplink_mbps']:g} Mbit/s, {v['rtt_ms']:g} ms" for n, v in results["networks"].items()
            )
            + ")"
            if results.get("networks")
            else ""
        )
        + ".",
        "",
    ]
    for name, m in results["models"].items():
        a, bo = m["adaptive"], m["bits_only"]
        lines += [f"## {name}", "", f"Weights: {m.get('weights', '?')}.", ""]
        predicted = all("predicted" in mem for mem in m["members"])
        head = "| member | uplink range (Mbit/s) | planner expects it on |"
        rule = "|---|---|---|"
        if predicted:
            head += "".join(f" predicted on {n}: ms, answers/s |" for n in nets)
            rule += "---:|" * len(nets)
        lines += [head, rule]
        for k, mem in enumerate(m["members"]):
            hi = "∞" if mem["hi_mbps"] is None else f"{mem['hi_mbps']:.3g}"
            on = ", ".join(n for n, e in m["expected"].items() if e == k) or "–"
            row = f"| m{k} {mem['label']} | {mem['lo_mbps']:.3g} – {hi} | {on} |"
            if predicted:
                row += "".join(
                    f" {mem['predicted'][n]['latency_ms']:.0f}, {mem['predicted'][n]['served_ips']:.2f} |"
                    for n in nets
                )
            lines.append(row)
        if predicted:
            lines += [
                "",
                f"Predicted (derived from the measured profiles at each network profile's uplink and RTT): "
                f"the set expects on a network the fastest member predicted to serve at least "
                f"{RATE_HEADROOM:g}x the arrival rate ({RATE_HEADROOM * cfg['rate']:g}/s), the margin that "
                "keeps a queue from growing through a slow spell; a faster member that serves less is "
                "not picked there.",
            ]
        lines += ["", "Bits-only members: " + ", ".join(x["label"] for x in m["bits_only_members"]) + ".", ""]
        lines += [
            "Fixed members, median latency (ms) per network, answers per second served and the share of "
            "requests answered (measured; below "
            f"{results['config']['rate']:g}/s a member cannot keep up and its latency is a queue's). Every "
            "median here counts a failed request (refused as the link could not carry it in time, or "
            "timed out) as never answered: '–' where half or more failed.",
            "",
        ]
        lines += ["| member | " + " | ".join(nets) + " |", "|---|" + "---:|" * len(nets)]
        for mem in m["members"]:
            cells = []
            for n in nets:
                f = m["fixed"][n].get(mem["label"], {})
                ips, share = f.get("served_ips"), f.get("answered")
                extra = [f"{ips:.1f}/s"] if ips is not None else []
                extra += [pct(share)] if share is not None else []
                cells.append(_ms(f.get("median_ms")) + (f" ({', '.join(extra)})" if extra else ""))
            lines.append(f"| {mem['label']} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "| phase | network | s | requests | edge's estimate (Mbit/s, ms RTT) | adaptive median (ms), "
            "answered | best fixed (ms, member, answered) | bits-only median (ms), answered | switches | "
            "members used | within 10 % |",
            "|---:|---|---:|---:|---|---:|---|---:|---:|---|---|",
        ]
        for j, r in enumerate(a["phases"]):
            within = "no data" if r["within_10pct"] is None else "yes" if r["within_10pct"] else "**no**"
            if r.get("overloaded"):
                within += " (no member keeps up)"
            used = ", ".join(f"m{k}×{c}" for k, c in sorted(r["members_used"].items()))
            up, rtt = r.get("uplink_mbps_estimated"), r.get("rtt_ms_estimated")
            seen = "–" if up is None else f"{up:.3g}" + ("" if rtt is None else f", {rtt:.0f}")
            age = r.get("rtt_age_s")
            if rtt is not None and age is not None and age > r["seconds"] / 2:
                seen += f" (RTT {age:.0f} s old: no idle moment to ping)"
            b = bo["phases"][j]
            best = f"{r['best_fixed_member'] or '–'}, {pct(r.get('best_fixed_answered'))}"
            lines.append(
                f"| {j} | {r['network']} | {r['seconds']:g} | {r['requests']} | {seen} | "
                f"{_ms(r['median_ms'])}, {pct(r.get('answered'))} | "
                f"{_ms(r['best_fixed_median_ms'])} ({best}) | "
                f"{_ms(r['bits_only_median_ms'])}, {pct(b.get('answered'))} | {r['switches']} | {used} | "
                f"{within} |"
            )
        lines += [
            "",
            f"Overall median (failed requests counted as never answered): adaptive {_ms(a['median_ms'])} "
            f"ms, bits-only {_ms(bo['median_ms'])} ms. "
            f"Adaptive: {a['requests']} requests, {a['lost']} lost, {a['duplicates']} duplicates, "
            f"{a['failed']} answered with an error, {len(a['switches'])} switches. Bits-only: {bo['lost']} "
            f"lost, {bo['duplicates']} duplicates, {bo['failed']} errors, {len(bo['switches'])} switches.",
            "",
        ]
        if a.get("answers") or bo.get("answers"):
            lines += [
                "Answers against the unsplit model's on the same inputs (measured; one answer per member and "
                "input; agreement as the planner measures fidelity, and the largest difference in any output "
                f"value): adaptive {_answers(a)}; bits-only {_answers(bo)}.",
                "",
            ]
        if a.get("changes"):
            lines += [
                "A change is a phase whose network the set expects another member on. *Switch after*: "
                "requests from the change to the edge's first switch away from the member it was on, to "
                "the member its own estimate (and the arrival rate) picks; 0 where it was on the expected "
                "member already.",
                "",
                "| change at phase | from → to | switch after (requests) | within 2 windows | "
                "fixed on this network: left member / expected member (ms) |",
            ]
            lines += ["|---:|---|---:|---|---|"]
            for c in a["changes"]:
                after = "none" if c["switch_after_requests"] is None else str(c["switch_after_requests"])
                ok = "yes" if c["within_2_windows"] else "**no**"
                both = f"{_ms(c.get('from_fixed_ms'))} / {_ms(c.get('to_fixed_ms'))}"
                lines.append(f"| {c['phase']} | {c['from']} → {c['to']} | {after} | {ok} | {both} |")
            lines.append("")
        lines += ["| target | measured | verdict |", "|---|---|---|"]
        lines += [
            f"| {t['target']} | {t['shown']} | **{verdict(t['met'], 'not applicable')}** |"
            for t in m["targets"]
        ]
        lines.append("")
        if f"trace-{name}.png" in results["plots"]:
            lines += [f"![latency over time, {name}](trace-{name}.png)", ""]
    return "\n".join(lines)


def plot(name: str, m: dict, results: dict, out: Path) -> str | None:
    """Latency over time for both policies, phases shaded by network, the adaptive switches marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(11, 4.2), layout="constrained")
    nets = list(dict.fromkeys(p["network"] for p in results["trace"]))
    shades = ["#e8eef7", "#f7efe3", "#e9f5e9", "#f3e8f5"]
    t = 0.0
    for p in results["trace"]:
        ax.axvspan(t, t + p["seconds"], color=shades[nets.index(p["network"]) % len(shades)], lw=0)
        t += p["seconds"]
    policies = (("bits_only", "bits-only", "x"), ("adaptive", "adaptive", "."))
    answered = [r["ms"] for key, _, _ in policies for r in m[key]["rows"] if r["error"] is None]
    top = max(answered, default=1000.0)
    for row, (key, label, style) in enumerate(policies):
        rows = [r for r in m[key]["rows"] if r["error"] is None]
        (line,) = ax.plot(
            [r["t"] for r in rows], [r["ms"] for r in rows], style, ms=4, label=label, alpha=0.75
        )
        # a failed request (refused busy, timed out) gets a mark in a row of its policy's own above the
        # answered ones: left out, an edge that refuses what it cannot carry would look as fast as its lucky
        # requests; drawn at its time to the error, a timeout hides among the slowest answers
        failed = [r["t"] for r in m[key]["rows"] if r["error"] is not None]
        if failed:
            ax.plot(
                failed,
                [top * (2.2 if row == 0 else 1.6)] * len(failed),
                "|",
                ms=9,
                color=line.get_color(),
                label=f"{label}: failed ({len(failed)}), marked above",
            )
    if any(r["error"] is not None for key, _, _ in policies for r in m[key]["rows"]):
        ax.axhline(top * 1.3, color="0.6", lw=0.6)
    for k, s in enumerate(m["adaptive"]["switches"]):
        ax.axvline(s["t"], color="k", ls="--", lw=0.8, label="adaptive switch" if k == 0 else None)
    from matplotlib.patches import Patch

    handles, labels = ax.get_legend_handles_labels()
    handles += [Patch(color=shades[i % len(shades)], label=n) for i, n in enumerate(nets)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("latency (ms, log)")
    ax.set_title(f"{name}: latency over the trace ({results['config']['rate']:g} requests/s)")
    path = f"trace-{name}.png"
    fig.savefig(out / path, dpi=110)
    plt.close(fig)
    return path
