"""A decoder split over emulated links: predicted against measured TTFT and TPOT per candidate, bytes per
token, beside the all-on-edge and all-on-server baselines.

For each network: the decoder planner's measurements (``splitpoint.partitioner.decoderplan.measure``: the
edge's blocks under the edge's CPU limit, the server's at one onnxruntime thread, as the server below
runs), its pick and a spread of cuts; then a real server (``splitpoint serve``) in its network namespace
and, per candidate, ``splitpoint generate`` under the same CPU limit in the edge's namespace, over a link
shaped to the network profile (docs/bench.md). Medians over the runs.

    python benchmarks/bench_decoder.py [--model gpt2] [--networks lte,wifi-n] [--edge-cpus 1.0]
        [--prompt-tokens 32] [--new-tokens 48] [--runs 3]
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from common import arguments, targets_table, write_results

from splitpoint.app.bench.emulate import EmulatedLink
from splitpoint.app.decoderruntime import generate, runtime_overhead
from splitpoint.app.process import check_started, start_server, stop
from splitpoint.core.decoders import ZooDecoder
from splitpoint.core.errors import SplitPointError
from splitpoint.core.plandir import write_decoder_plan
from splitpoint.core.zoo.decoder import DECODERS
from splitpoint.partitioner.decoderplan import baselines, candidates, measure, pick
from splitpoint.partitioner.planner import link_of
from splitpoint.profiles.schema import load_network


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--model", default="gpt2", choices=sorted(DECODERS))
    ap.add_argument("--networks", default="lte,wifi-n")
    ap.add_argument("--edge-cpus", type=float, default=1.0)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--link", default="auto", choices=["auto", "netns", "proxy"])
    args = ap.parse_args()
    spec = ZooDecoder(args.model)
    t_start = time.perf_counter()
    m = measure(
        spec,
        codecs=("float32", "int8-ol"),
        head_weights=("float32", "int4"),
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        edge_cpus=args.edge_cpus,
        server_threads=1,
    )
    m = dataclasses.replace(
        m, overhead_ms=runtime_overhead(args.prompt_tokens, args.new_tokens, args.edge_cpus, args.runs)
    )
    nets = args.networks.split(",")
    L = spec.layers
    chosen: dict[tuple[int, str, str], dict] = {}
    for k in sorted({1, L // 2, L - 1}):
        for c in ("float32", "int8-ol"):
            chosen[(k, c, "float32")] = {"why": "spread"}
    chosen[(L // 2, "int8-ol", "int4")] = {"why": "spread"}
    picks = {}
    for net in nets:
        p = pick(candidates(m, link_of(load_network(net))))
        assert p is not None
        picks[net] = (p.edge_layers, p.codec, p.head_weights)
        chosen.setdefault(picks[net], {"why": "pick"})
    work = Path(tempfile.mkdtemp(prefix="splitpoint-bench-decoder-"))
    rows = []
    try:
        plans = work / "plans"
        for k, c, w in chosen:
            write_decoder_plan(spec, plans / f"k{k}-{c}-{w}", edge_layers=k, codec=c, head_weights=w)
        for net in nets:
            link = link_of(load_network(net))
            cands = {(x.edge_layers, x.codec, x.head_weights): x for x in candidates(m, link)}
            with EmulatedLink(link, args.link) as em:
                srv = start_server(em.server_bind, plans, prefix=em.server_prefix, insecure=True)
                try:
                    check_started([srv])
                    time.sleep(2.0)  # the plans load
                    for k, c, w in chosen:
                        runs = [
                            _generate(em.edge_prefix, plans / f"k{k}-{c}-{w}", em.edge_connect, args)
                            for _ in range(args.runs)
                        ]
                        pred = cands[(k, c, w)]
                        rows.append(
                            {
                                "network": net,
                                "mechanism": em.mechanism,
                                "edge_layers": k,
                                "codec": c,
                                "head_weights": w,
                                "pick": picks[net] == (k, c, w),
                                "predicted": {"ttft_ms": pred.ttft_ms, "tpot_ms": pred.tpot_ms},
                                "measured": {
                                    "ttft_ms": statistics.median(r["ttft_ms"] for r in runs),
                                    "tpot_ms": statistics.median(r["tpot_ms"] for r in runs),
                                },
                                "measured_breakdown": {
                                    key: statistics.median(r["breakdown"][key] for r in runs)
                                    for key in runs[0]["breakdown"]
                                },
                                "bytes_per_token": runs[0]["bytes_per_token"],
                                "bytes_per_prefill": runs[0]["bytes_per_prefill"],
                                "breakdown": pred.breakdown,
                            }
                        )
                finally:
                    stop(srv)
            base = baselines(m, link)
            for r in rows:
                if r["network"] == net:
                    r["baselines"] = base
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for r in rows:
        for key in ("ttft_ms", "tpot_ms"):
            r[f"{key}_error"] = abs(r["predicted"][key] - r["measured"][key]) / r["measured"][key]
    _report(rows, m, args, time.perf_counter() - t_start)


def _generate(prefix: list[str], plan: Path, server: str, args) -> dict:
    try:
        return generate(plan, server, args.prompt_tokens, args.new_tokens, args.edge_cpus, prefix)
    except SplitPointError as exc:
        raise SystemExit(str(exc)) from None


def _report(rows: list[dict], m, args, seconds: float) -> None:
    tpot_err = statistics.median(r["tpot_ms_error"] for r in rows)
    ttft_err = statistics.median(r["ttft_ms_error"] for r in rows)
    targets = [
        (
            "TPOT predicted within 10 % of measured (median over candidates)",
            f"{tpot_err:.1%}",
            tpot_err <= 0.10,
        ),
        (
            "TTFT predicted within 15 % of measured (median over candidates)",
            f"{ttft_err:.1%}",
            ttft_err <= 0.15,
        ),
    ]
    mech = ", ".join(sorted({r["mechanism"] for r in rows}))
    lines = [
        "# Decoder split over emulated links: TTFT and TPOT, predicted against measured",
        "",
        f"`python benchmarks/bench_decoder.py --model {args.model} --networks {args.networks} --edge-cpus "
        f"{args.edge_cpus} --prompt-tokens {args.prompt_tokens} --new-tokens {args.new_tokens} --runs "
        f"{args.runs}`, {seconds / 60:.1f} min. `{args.model}` (random weights, "
        f"{DECODERS[args.model].params():,} parameters), greedy, a random {args.prompt_tokens}-token prompt, "
        f"{args.new_tokens} new tokens; the edge under {args.edge_cpus:g} CPU (cgroup quota, one onnxruntime "
        f"thread), the server at one onnxruntime thread, link emulation: {mech}. *Predicted* is derived by "
        "the decoder planner from measured blocks (`splitpoint.partitioner.decoderplan`); *measured* is "
        f"`splitpoint generate` on the edge's clock, median of {args.runs} runs. Every token is one round "
        f"trip. The runtime's own time per step, measured on `decoder-tiny` over loopback and counted in "
        f"every prediction: {m.overhead_ms[0]:.2f} ms (prefill), {m.overhead_ms[1]:.2f} ms (decode step).",
        "",
        *targets_table(targets),
        "## Every candidate",
        "",
        "| network | layers on the edge | codec | edge weights | pick | TTFT predicted / measured (ms) "
        "| error | TPOT predicted / measured (ms) | error | bytes per token | bytes per prefill |",
        "|---|---:|---|---|---|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        p, me = r["predicted"], r["measured"]
        lines.append(
            f"| {r['network']} | {r['edge_layers']} | {r['codec']} | {r['head_weights']} | "
            f"{'pick' if r['pick'] else ''} | "
            f"{p['ttft_ms']:.1f} / {me['ttft_ms']:.1f} | {r['ttft_ms_error']:.1%} | "
            f"{p['tpot_ms']:.1f} / {me['tpot_ms']:.1f} | {r['tpot_ms_error']:.1%} | {r['bytes_per_token']} | "
            f"{r['bytes_per_prefill']} |"
        )
    lines += ["", *parts_table(rows)]
    lines += [
        "",
        "## Baselines (derived, not run)",
        "",
        "| network | baseline | TTFT (ms) | TPOT (ms) | edge memory (MiB) |",
    ]
    lines.append("|---|---|---:|---:|---:|")
    seen = set()
    for r in rows:
        if r["network"] in seen:
            continue
        seen.add(r["network"])
        for name, b in r["baselines"].items():
            lines.append(
                f"| {r['network']} | {name} | {b['ttft_ms']:.1f} | {b['tpot_ms']:.1f} | "
                f"{b['edge_memory_bytes'] / 2**20:.0f} |"
            )
    lines += [
        "",
        "## Edge weights: float32 against int4 (MatMulNBits), per middle layer on the edge (the middle "
        "layers timed together; measured)",
        "",
        "| edge weights | prefill ms | decode step ms | stored MiB |",
        "|---|---:|---:|---:|",
        *[
            f"| {w} | {side.middle.prefill_ms:.2f} | {side.middle.step_ms:.3f} | "
            f"{m.weight_bytes[w][1] / 2**20:.1f} |"
            for w, side in m.edge.items()
        ],
        "",
    ]
    write_results(
        "decoder",
        {
            "args": vars(args),
            "seconds": seconds,
            "rows": rows,
            "edge_weights": {  # the "Edge weights" table: one middle layer on the edge, measured
                w: {
                    "prefill_ms": side.middle.prefill_ms,
                    "step_ms": side.middle.step_ms,
                    "stored_bytes": m.weight_bytes[w][1],
                }
                for w, side in m.edge.items()
            },
            "targets": [{"target": t, "measured": v, "met": ok} for t, v, ok in targets],
        },
        "\n".join(lines),
    )


def parts_table(rows: list[dict]) -> list[str]:
    """Where a decode step's time went, predicted / measured per part: a miss shows which part the
    planner got wrong. Measured: ``generate``'s breakdown (the edge's head on its clock, the server's own
    time from its reply, the rest: codec, link and both runtimes), median of the runs."""
    out = [
        "## Where a token's time went (decode step, predicted / measured ms)",
        "",
        "| network | layers on the edge | codec | edge weights | edge (head) | server "
        "| codec, link and runtime |",
        "|---|---:|---|---|---|---|---|",
    ]
    for r in rows:
        p, me = r["breakdown"], r["measured_breakdown"]
        rest = sum(
            p[k] for k in ("encode_step_ms", "uplink_step_ms", "rtt_ms", "downlink_ms", "runtime_step_ms")
        )
        out.append(
            f"| {r['network']} | {r['edge_layers']} | {r['codec']} | {r['head_weights']} | "
            f"{p['edge_step_ms']:.1f} / {me['edge_step_ms']:.1f} | {p['server_step_ms']:.1f} / "
            f"{me['server_step_ms']:.1f} | {rest:.1f} / {me['link_and_runtime_step_ms']:.1f} |"
        )
    return out


if __name__ == "__main__":
    main()
