"""The bench report: derived figures (regret, prediction error, pipelining ratio), the
markdown tables and the plots, all from the measured results dict. Pure apart from writing."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from splitpoint.partitioner.costmodel import Link, downlink_ms, uplink_ms

from .run import ALL_ON_EDGE, ALL_ON_SERVER_COMPRESSED, ALL_ON_SERVER_RAW

TARGETS = {
    "prediction_error": 0.10,
    "regret": 1.05,
    "regret_share": 0.90,
    "overhead_ms": 0.5,
    "pipelined_ratio": 0.90,
    "bench_seconds": 15 * 60,
}


BASELINES = {
    ALL_ON_EDGE: "edge_only_ms",
    ALL_ON_SERVER_RAW: "server_raw_ms",
    ALL_ON_SERVER_COMPRESSED: "server_compressed_ms",
}


def _ok(row) -> bool:
    return "error" not in row["measured"] and row["measured"].get("latency_ms_median") is not None


def stage_bound_ips(row, link: Link | None, edge_cpus: float | None = None) -> float | None:
    """1 / the slowest measured stage: edge, uplink, server compute, downlink (the link stages
    from the profile's rate: serialisation cannot be timed on one clock). Under a CPU quota the
    edge stage is at least its measured CPU time per request over its CPU share: the runtime's
    own threads draw on the same share as the head."""
    s = row["measured"].get("stages_ms_median") or {}
    cpu_stage = row["measured"].get("edge_cpu_ms_per_request", 0.0) / edge_cpus if edge_cpus else 0.0
    if s.get("local_ms") is not None:
        stages = [max(s["local_ms"], cpu_stage)]
    else:
        edge = max((s.get("head_ms") or 0) + (s.get("encode_ms") or 0), cpu_stage)
        server = sum(s.get(k) or 0 for k in ("server_decode_ms", "tail_ms", "server_encode_ms"))
        stages = [edge, server]
        if link is not None:
            p = row["predicted"]
            stages += [uplink_ms(p["up_bytes"], link), downlink_ms(p["down_bytes"], link)]
    slowest = max(stages)
    return 1000.0 / slowest if slowest > 0 else None


def derive(results: dict) -> dict:
    """Regret per (model, network), prediction error and pipelining ratio per candidate."""
    cases, errors, ratios, overheads = [], [], [], []
    cpus = results.get("edge_calibration", {}).get("cpus")
    edge_cpus = cpus if cpus and cpus < 1 else None
    for run in results["runs"]:
        link = Link(**run["link"]["link"]) if run["link"].get("link") else None
        ok = [r for r in run["rows"] if _ok(r)]
        for r in ok:
            m, p = r["measured"], r["predicted"]
            r["prediction_error"] = abs(p["latency_ms"] - m["latency_ms_median"]) / m["latency_ms_median"]
            bound = stage_bound_ips(r, link, edge_cpus)
            r["pipelined_ratio"] = m["throughput_ips"] / bound if bound else None
            errors.append(r["prediction_error"])
            if r["pipelined_ratio"] is not None:
                ratios.append(r["pipelined_ratio"])
            if (
                link is None
                and m.get("non_compute_ms_median") is not None
                and "local_ms" not in (m.get("stages_ms_median") or {})
            ):
                overheads.append(m["non_compute_ms_median"])
        if not ok:
            continue
        # the pick must meet the user's constraints, so it is compared with the candidates that do
        floor = results["config"].get("min_fidelity") or 0.0
        feasible = [r for r in ok if (r["predicted"].get("fidelity") or 0.0) >= floor] or ok
        best = min(feasible, key=lambda r: r["measured"]["latency_ms_median"])
        fastest = min(ok, key=lambda r: r["measured"]["latency_ms_median"])
        pick = next((r for r in run["rows"] if r["is_pick"]), None)
        case = {
            "model": run["rows"][0]["model"],
            "network": run["network"],
            "pick": pick["candidate"] if pick else None,
            "pick_ms": pick["measured"].get("latency_ms_median") if pick and _ok(pick) else None,
            "best": best["candidate"],
            "best_ms": best["measured"]["latency_ms_median"],
            "candidates": len(ok),
            "fastest_any": fastest["candidate"],
            "fastest_any_ms": fastest["measured"]["latency_ms_median"],
            "fastest_any_fidelity": fastest["predicted"].get("fidelity"),
        }
        case["regret"] = case["pick_ms"] / case["best_ms"] if case["pick_ms"] else None
        for r in ok:
            for phrase, tag in BASELINES.items():
                if phrase in r["role"]:
                    case[tag] = r["measured"]["latency_ms_median"]
        cases.append(case)
    regrets = [c["regret"] for c in cases if c["regret"] is not None]
    summary = {
        "prediction_error_median": statistics.median(errors) if errors else None,
        "regret_within_target_share": (sum(r <= TARGETS["regret"] for r in regrets) / len(regrets))
        if regrets
        else None,
        "pipelined_ratio_median": statistics.median(ratios) if ratios else None,
        "runtime_overhead_ms_median": statistics.median(overheads) if overheads else None,
        "bench_seconds": results.get("seconds"),
    }
    results["cases"], results["summary"] = cases, summary
    return results


def _f(x, fmt="{:.1f}") -> str:
    return "–" if x is None else fmt.format(x)


def _target_lines(s: dict) -> list[str]:
    def line(name, value, ok, shown):
        return (
            f"| {name} | {shown} | {'met' if ok else 'MISSED' if ok is not None else 'not measured here'} |"
        )

    pe, rs, pr, oh, secs = (
        s["prediction_error_median"],
        s["regret_within_target_share"],
        s["pipelined_ratio_median"],
        s["runtime_overhead_ms_median"],
        s["bench_seconds"],
    )
    return [
        "| target | measured | |",
        "|---|---:|---|",
        line(
            "median prediction error ≤ 10 %",
            pe,
            None if pe is None else pe <= TARGETS["prediction_error"],
            _f(pe and 100 * pe, "{:.1f} %"),
        ),
        line(
            "regret ≤ 1.05 in ≥ 90 % of cases",
            rs,
            None if rs is None else rs >= TARGETS["regret_share"],
            _f(rs and 100 * rs, "{:.0f} % of cases"),
        ),
        line(
            "pipelined throughput ≥ 90 % of 1/max(stage) (median)",
            pr,
            None if pr is None else pr >= TARGETS["pipelined_ratio"],
            _f(pr and 100 * pr, "{:.0f} %"),
        ),
        line(
            "runtime overhead ≤ 0.5 ms at loopback (median)",
            oh,
            None if oh is None else oh <= TARGETS["overhead_ms"],
            _f(oh, "{:.2f} ms")
            if oh is not None
            else "measured without link emulation by `benchmarks/bench_runtime.py` "
            "([runtime.md](../runtime.md))",
        ),
        line(
            "whole bench under 15 min",
            secs,
            None if secs is None else secs <= TARGETS["bench_seconds"],
            _f(secs and secs / 60, "{:.1f} min"),
        ),
    ]


def summary_lines(results: dict, out: Path) -> list[str]:
    """What ``splitpoint bench`` prints when it is done: the headline table and the targets."""
    s = results["summary"]
    return [
        *headline(results),
        f"median prediction error {100 * (s['prediction_error_median'] or 0):.1f} %; regret ≤ 1.05 in "
        f"{100 * (s['regret_within_target_share'] or 0):.0f} % of cases; {s['bench_seconds'] / 60:.1f} min; "
        f"report in {out / 'report.md'}",
    ]


def headline(results: dict) -> list[str]:
    lines = [
        "| model | network | pick | pick measured (ms) | best measured meeting the constraints (ms) | "
        "regret | all on edge (ms) | all on server, raw (ms) | all on server, int8+zstd (ms) | fastest at "
        "any fidelity (ms, fidelity) |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for c in results["cases"]:
        fastest = (
            "same"
            if c["fastest_any"] == c["best"]
            else f"{c['fastest_any']} ({_f(c['fastest_any_ms'])}, {_f(c['fastest_any_fidelity'], '{:.2f}')})"
        )
        lines.append(
            f"| {c['model']} | {c['network']} | {c['pick']} | {_f(c['pick_ms'])} | {c['best']} "
            f"({_f(c['best_ms'])}) | "
            f"{_f(c['regret'], '{:.2f}')} | {_f(c.get('edge_only_ms'))} | {_f(c.get('server_raw_ms'))} | "
            f"{_f(c.get('server_compressed_ms'))} | {fastest} |"
        )
    return lines


def markdown(results: dict) -> str:
    cal, cfg, s = results["edge_calibration"], results["config"], results["summary"]
    mech = sorted({r["link"]["mechanism"] for r in results["runs"]})
    out = [
        "# SplitPoint bench",
        "",
        f"`splitpoint bench --models {','.join(cfg['models'])} --networks {','.join(cfg['networks'])} "
        f"--device {cfg['device']}` "
        f"on {results['machine'].get('cpu_model', '?')} ({results['machine'].get('cores_logical', '?')} "
        f"cores), "
        f"{results['seconds'] / 60:.1f} min in all.",
        "",
        f"- **Edge CPU (emulated):** {cal['device']}-class: {cal['reference_model']} measured "
        f"{cal['measured_ms']:.1f} ms here under "
        f"{cal['cpus']:g} CPU ({cal['mechanism']}) against the device profile's {cal['target_ms']:g} ms; "
        f"{cal['full_speed_ms']:.1f} ms "
        f"unlimited. {cal['note']}".rstrip(),
        f"- **Links (emulated, real traffic):** mechanism {', '.join(mech)}. Each network's link was probed "
        f"with plain TCP "
        "before the runtime used it (table below).",
        "- **Pipelining ratio** = measured throughput ÷ 1/max(stage), the stages measured one request at a "
        "time; the edge "
        "stage is the larger of head + encode and the edge's CPU time per request ÷ its CPU share.",
        "- **Every latency** is measured on the edge's clock (request in → result out); the server's stage "
        "times come from "
        "its own clock. *Predicted* figures are the partitioner's, derived from the measured profiles.",
        "",
        "## Headline: the pick against the baselines (median latency, one request at a time)",
        "",
        *headline(results),
        "",
        f"Regret = the pick's measured latency ÷ the best measured latency among the candidates measured "
        f"for that case "
        f"that meet the pick's constraints (planner-measured fidelity ≥ {cfg.get('min_fidelity')}). "
        f"Candidates are measured "
        "in rounds, one request each per round, so the machine's drift falls on all of them alike. The last "
        "column "
        "shows where a faster candidate exists that fails the fidelity constraint.",
        "",
        "## Targets",
        "",
        *_target_lines(s),
        "",
    ]
    out += [
        "## Links as probed",
        "",
        "Plain TCP request/response over each emulated link just before the runtime used it, "
        "median of 3, next to the cost model's figure for the same bytes. Jitter never reorders data, so it "
        "can only "
        "hold pieces back: medians sit a little above the profile's RTT.",
        "",
        "| model run | network | mechanism | 64 B ping measured / predicted (ms) | 64 KiB up measured / "
        "predicted (ms) |",
        "|---|---|---|---:|---:|",
    ]
    for run in results["runs"]:
        pr = [p for p in run["link_probe"] if "error" not in p]
        cells = [f"{_f(p['median_ms'])} / {_f(p['predicted_ms'])}" for p in pr] + ["–"] * (2 - len(pr))
        out.append(
            f"| {run['rows'][0]['model']} | {run['network']} | {run['link']['mechanism']} | {cells[0]} | "
            f"{cells[1]} |"
        )
    out += ["", "## Every measured candidate", ""]
    for run in results["runs"]:
        model = run["rows"][0]["model"]
        out += [
            f"### {model} on {run['network']}",
            "",
            "| candidate | role | predicted (ms) | measured p50 | p90 | error | throughput pred / meas (/s) "
            "| pipelining ratio | bytes up | edge CPU (ms/req) | edge RSS added (MiB) | fidelity (planner) "
            "| top-1 agreement |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in sorted(run["rows"], key=lambda r: r["measured"].get("latency_ms_median") or 1e12):
            p, m = r["predicted"], r["measured"]
            if not _ok(r):
                out.append(
                    f"| {r['candidate']} | {r['role']} | {_f(p['latency_ms'])} | failed: "
                    f"{m.get('error', '?')[:80]} | | | | | | | | | |"
                )
                continue
            out.append(
                f"| {r['candidate']} | {r['role']} | {_f(p['latency_ms'])} | {_f(m['latency_ms_median'])} | "
                f"{_f(m['latency_ms_p90'])} | {_f(100 * r['prediction_error'], '{:.0f} %')} | "
                f"{_f(p['throughput_ips'])} / {_f(m['throughput_ips'])} | "
                f"{_f(r['pipelined_ratio'] and 100 * r['pipelined_ratio'], '{:.0f} %')} | "
                f"{_f(m.get('bytes_sent_median'), '{:.0f}')} | {_f(m['edge_cpu_ms_per_request'])} | "
                f"{_f(m['edge_rss_added_bytes'] / 2**20, '{:.0f}')} | {_f(p.get('fidelity'), '{:.4f}')} | "
                f"{_f(m.get('top1_agreement'), '{:.2f}')} |"
            )
        out.append("")
    return "\n".join(out)


def plots(results: dict, out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker  # noqa: F401 (binds matplotlib.ticker, used below)
    except ImportError:
        return []
    runs = results["runs"]
    models = list(dict.fromkeys(r["rows"][0]["model"] for r in runs))
    nets = list(dict.fromkeys(r["network"] for r in runs))
    files = []

    fig, axes = plt.subplots(
        len(models), len(nets), figsize=(4 * len(nets), 3.3 * len(models)), squeeze=False
    )
    for run in runs:
        ax = axes[models.index(run["rows"][0]["model"])][nets.index(run["network"])]
        for r in filter(_ok, run["rows"]):
            m = r["measured"]
            style = "*" if r["is_pick"] else "s" if "baseline" in r["role"] else "o"
            ax.scatter(
                m["latency_ms_median"],
                m["throughput_ips"],
                marker=style,
                s=120 if r["is_pick"] else 40,
                color="C3" if r["is_pick"] else "C1" if "baseline" in r["role"] else "C0",
            )
            ax.annotate(r["candidate"], (m["latency_ms_median"], m["throughput_ips"]), fontsize=6)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(
            matplotlib.ticker.NullFormatter()
        )  # minor labels overlap on short ranges
        ax.set_title(f"{run['rows'][0]['model']} · {run['network']}", fontsize=9)
        ax.set_xlabel("measured latency (ms)", fontsize=8)
        ax.set_ylabel("measured throughput (/s)", fontsize=8)
    fig.suptitle("Measured latency vs throughput (★ pick, ■ baselines, ● front)")
    fig.tight_layout()
    fig.savefig(out / "latency_vs_throughput.png", dpi=90)
    plt.close(fig)
    files.append("latency_vs_throughput.png")

    fig, ax = plt.subplots(figsize=(6, 6))
    pts = [
        (r["predicted"]["latency_ms"], r["measured"]["latency_ms_median"])
        for run in runs
        for r in run["rows"]
        if _ok(r)
    ]
    if pts:
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14)
        lo, hi = min(min(p) for p in pts) * 0.8, max(max(p) for p in pts) * 1.2
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
        ax.plot([lo, hi], [lo * 1.1, hi * 1.1], "k:", lw=0.6)
        ax.plot([lo, hi], [lo / 1.1, hi / 1.1], "k:", lw=0.6)
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("predicted latency (ms, derived)")
    ax.set_ylabel("measured latency (ms)")
    ax.set_title("Predicted vs measured (dotted: ±10 %)")
    fig.tight_layout()
    fig.savefig(out / "predicted_vs_measured.png", dpi=90)
    plt.close(fig)
    files.append("predicted_vs_measured.png")

    keys = [
        ("head_ms", "head"),
        ("encode_ms", "encode"),
        ("network_ms", "network"),
        ("server_queue_ms", "server queue"),
        ("server_decode_ms", "decode"),
        ("tail_ms", "tail"),
        ("server_encode_ms", "reply encode"),
        ("decode_ms", "reply decode"),
        ("local_ms", "all on edge"),
    ]
    fig, axes = plt.subplots(
        len(models), len(nets), figsize=(4 * len(nets), 3.3 * len(models)), squeeze=False
    )
    for run in runs:
        ax = axes[models.index(run["rows"][0]["model"])][nets.index(run["network"])]
        rows = [r for r in run["rows"] if _ok(r)]
        bottoms = [0.0] * len(rows)
        for j, (k, label) in enumerate(keys):
            vals = [(r["measured"]["stages_ms_median"].get(k) or 0.0) for r in rows]
            ax.bar(range(len(rows)), vals, bottom=bottoms, label=label, color=f"C{j}")
            bottoms = [b + v for b, v in zip(bottoms, vals, strict=True)]
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(
            [r["candidate"] + (" ★" if r["is_pick"] else "") for r in rows],
            rotation=60,
            ha="right",
            fontsize=6,
        )
        ax.set_yscale("log" if any(b > 0 for b in bottoms) else "linear")
        ax.set_title(f"{run['rows'][0]['model']} · {run['network']}", fontsize=9)
        ax.set_ylabel("ms (median)", fontsize=8)
    axes[0][0].legend(fontsize=6)
    fig.suptitle("Measured latency breakdown per candidate")
    fig.tight_layout()
    fig.savefig(out / "latency_breakdown.png", dpi=90)
    plt.close(fig)
    files.append("latency_breakdown.png")
    return files


def write_report(results: dict, out: Path) -> dict:
    """results.json, report.md and the PNGs in ``out``, written to a temporary name first."""
    out.mkdir(parents=True, exist_ok=True)
    derive(results)
    results["plots"] = plots(results, out)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=str))
    tmp.replace(out / "results.json")
    md = markdown(results)
    if results["plots"]:
        md += "\n## Plots\n\n" + "\n".join(f"![{p}]({p})" for p in results["plots"]) + "\n"
    (out / "report.md.tmp").write_text(md)
    (out / "report.md.tmp").replace(out / "report.md")
    return results
