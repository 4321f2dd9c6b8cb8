"""Cost of listing cuts and writing a split plan, on the zoo's real graphs at full size.

Targets (issue 2): all cuts of a graph listed in < 1 s (index + enumerate); one split plan
written in < 2 s (``core.plandir.write_plan``: extract, full checker on both halves, a trial run,
write head.onnx, tail.onnx and plan.json). Measured on resnet18, resnet50, mobilenetv2 and alexnet at
full width and resolution. Synthetic residual chains of 255 to 2,019 nodes (tiny tensors, so
their files and shape inference are cheap) are kept only as a scaling check: µs per cut should
stay flat as the graph grows.
Run: python benchmarks/bench_cutting.py [--models resnet18,...] [--no-synthetic] [--out DIR]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, arguments, machine, timed, verdict, write_results

from splitpoint.core import zoo
from splitpoint.core.graph import ModelHandle
from splitpoint.core.graph.cuts import enumerate_cuts
from splitpoint.core.graph.index import GraphIndex
from splitpoint.core.onnxio import load_model, sha256_file
from splitpoint.core.plandir import write_plan
from splitpoint.core.zoo.builder import ModelBuilder

MODELS = "resnet18,resnet50,mobilenetv2,alexnet"
SYNTHETIC_BLOCKS = (36, 72, 144, 288)
LIST_TARGET_S = 1.0
SPLIT_TARGET_S = 2.0
SCRIPT = "python benchmarks/bench_cutting.py"


def deep_residual(blocks: int):
    """A residual DAG of 7 nodes per block (conv-bn-relu-conv-bn-add-relu), tiny tensors."""
    import numpy as np

    b = ModelBuilder(f"deep{blocks}", seed=0)
    x = b.input("input", (8, 16, 16), np.random.default_rng(0).standard_normal((2, 8, 16, 16)))
    for _ in range(blocks):
        y = b.relu(b.bn(b.conv(x, 8, 3)))
        y = b.bn(b.conv(y, 8, 3), gain=0.5)
        x = b.relu(b.add(x, y))
    b.output(b.gemm(b.flatten(b.gap(x)), 10))
    return b.build()


def measure(name: str, kind: str, path: Path | None, model=None, repeat: int = 3) -> dict:
    """Index + enumerate (listing every cut) and one split plan at the middle cut, medians."""
    t_load = None
    if path is not None:
        t_load, _, model = timed(lambda: load_model(path), repeat=repeat)
    assert model is not None
    t_index, _, idx = timed(lambda: GraphIndex.build(model), repeat=repeat)
    t_enum, _, cuts = timed(lambda: enumerate_cuts(idx), repeat=max(repeat, 5))
    mid = cuts[len(cuts) // 2]
    sha = sha256_file(path) if path is not None else "0" * 64
    with tempfile.TemporaryDirectory() as d:
        splits = []
        for _ in range(repeat + 1):  # the first warms the disk and onnxruntime, and is not counted
            # a fresh index each time: the split reads the weights' arrays once per index, as a new
            # `splitpoint split` process does
            h = ModelHandle(path or Path(f"{name}.onnx"), name, sha, model, GraphIndex.build(model))
            t0 = time.perf_counter()
            write_plan(h, Path(d) / "p", cut=mid, force=True)
            splits.append(time.perf_counter() - t0)
        t_split = statistics.median(splits[1:])
        plan_bytes = sum(f.stat().st_size for f in (Path(d) / "p").iterdir())
    return {
        "model": name,
        "kind": kind,
        "nodes": len(idx.nodes),
        "cuts": len(cuts),
        "load_s": t_load,
        "index_s": t_index,
        "enumerate_s": t_enum,
        "list_all_cuts_s": t_index + t_enum,
        "split_cut": mid.index,
        "split_s": t_split,
        "plan_bytes": plan_bytes,
        "us_per_cut": 1e6 * t_enum / len(cuts),
    }


def _ms(x: float | None) -> str:
    return "–" if x is None else f"{1e3 * x:.1f}"


def markdown(rows: list[dict], facts: dict, options: str = "") -> str:
    """``options``: the arguments besides the table's own that the run was given (e.g. --repeat 5)."""
    real = [r for r in rows if r["kind"] == "zoo"]
    synthetic = [r for r in rows if r["kind"] == "synthetic"]
    names = ",".join(r["model"] for r in real)
    models_opt = "" if names == MODELS else f" --models '{names}'"
    models_opt += "" if synthetic else " --no-synthetic"
    md = [
        "# Graph cutting cost",
        "",
        f"Medians on {facts.get('cpu', '?')} ({facts.get('cores', '?')} cores), onnxruntime "
        f"{facts.get('onnxruntime', '?')}, {facts.get('when', '?')}. "
        "*Index* = the graph index built at load time, including ONNX shape inference; *enumerate* = the "
        "sweep over all cuts; *list all cuts* = index + enumerate; *one split plan* = "
        "`core.plandir.write_plan` at the middle cut: extract, the full ONNX checker on both halves (their "
        "structure and shapes; the weights were checked when the model was loaded), a trial run of the "
        "split, write head.onnx, tail.onnx and plan.json. *Load* (reading the ONNX file, the checker on "
        "the whole model included) is shown apart and not counted in either target.",
        "",
        f"All of it: `{SCRIPT}{models_opt}{options}`.",
        "",
    ]
    if real:
        md += [
            "## The zoo's models at full size",
            "",
            f"Reproduce: `{SCRIPT} --models {','.join(r['model'] for r in real)} --no-synthetic{options}`",
            "",
            "| model | nodes | cuts | load (ms) | index (ms) | enumerate (ms) | **list all cuts (ms)** | "
            f"< {LIST_TARGET_S:g} s | split at cut | plan written (MB) | **one split plan (ms)** | "
            f"< {SPLIT_TARGET_S:g} s |",
            "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|",
        ]
        for r in real:
            md.append(
                f"| {r['model']} | {r['nodes']} | {r['cuts']} | {_ms(r['load_s'])} | {_ms(r['index_s'])} | "
                f"{_ms(r['enumerate_s'])} | **{_ms(r['list_all_cuts_s'])}** | "
                f"{verdict(r['list_all_cuts_s'] < LIST_TARGET_S)} | {r['split_cut']} | "
                f"{r['plan_bytes'] / 1e6:.1f} | **{_ms(r['split_s'])}** | "
                f"{verdict(r['split_s'] < SPLIT_TARGET_S)} |"
            )
        checks = [(r, "list all cuts", r["list_all_cuts_s"], LIST_TARGET_S) for r in real] + [
            (r, "one split plan", r["split_s"], SPLIT_TARGET_S) for r in real
        ]
        misses = [f"{r['model']} {what} {1e3 * v:.0f} ms" for r, what, v, lim in checks if not v < lim]
        md += [
            "",
            f"**{len(checks) - len(misses)} of {len(checks)} met** (list all cuts < {LIST_TARGET_S:g} s, one "
            f"split plan < {SPLIT_TARGET_S:g} s, per model)"
            + (f"; missed: {'; '.join(misses)}." if misses else "."),
            "",
        ]
    if synthetic:
        big = next((r for r in synthetic if r["nodes"] >= 1000), None)
        md += [
            "## Scaling check on synthetic graphs (not a real model)",
            "",
            "Residual chains of 7 nodes per block with tiny tensors (8 channels, 16×16): shape inference "
            "and the files written are far cheaper than a real model's, so their absolute times are not "
            "the targets' evidence; what they show is how the sweep grows with the node count.",
            "",
            f"Reproduce: `{SCRIPT} --models ''{options}` (synthetic rows only)",
            "",
            "| synthetic graph | nodes | cuts | index (ms) | enumerate (ms) | list all cuts (ms) | µs/cut | "
            "one split plan (ms) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in synthetic:
            md.append(
                f"| {r['model']} | {r['nodes']} | {r['cuts']} | {_ms(r['index_s'])} | "
                f"{_ms(r['enumerate_s'])} | {_ms(r['list_all_cuts_s'])} | {r['us_per_cut']:.1f} | "
                f"{_ms(r['split_s'])} |"
            )
        per_cut = [r["us_per_cut"] for r in synthetic]
        growth = synthetic[-1]["nodes"] / synthetic[0]["nodes"]
        md += [
            "",
            f"µs per cut ranges {min(per_cut):.1f}–{max(per_cut):.1f} ({max(per_cut) / min(per_cut):.2f}× "
            f"apart) while the graph grows {growth:.0f}×"
            + (
                f"; the {big['nodes']}-node graph lists all its cuts in {_ms(big['list_all_cuts_s'])} ms."
                if big
                else "."
            ),
            "",
        ]
    return "\n".join(md)


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--models", default=MODELS, help="zoo models at full size, comma-separated")
    ap.add_argument("--no-synthetic", action="store_true", help="skip the synthetic scaling rows")
    ap.add_argument("--repeat", type=int, default=3, help="timed repetitions (median) per figure")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for cutting.json and cutting.md")
    args = ap.parse_args()
    names = [n for n in args.models.split(",") if n]
    rows = []
    for name in names:
        path = zoo.zoo_path(name)  # built once and cached; the build is not timed
        rows.append(measure(name, "zoo", path, repeat=args.repeat))
        print(rows[-1], flush=True)
    if not args.no_synthetic:
        for blocks in SYNTHETIC_BLOCKS:
            rows.append(
                measure(f"deep-residual-{blocks}", "synthetic", None, deep_residual(blocks), args.repeat)
            )
            print(rows[-1], flush=True)
    options = f" --repeat {args.repeat}" if args.repeat != 3 else ""
    facts = machine()
    write_results("cutting", {"rows": rows}, markdown(rows, facts, options), args.out, facts)


if __name__ == "__main__":
    main()
