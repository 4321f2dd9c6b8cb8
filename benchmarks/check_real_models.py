"""Real models from packages on the index, through every command a user runs on their own model.

The zoo's models are built here; a user's come from exporters this project never saw. This script takes
the ONNX files that ship inside wheels on the package index (no model download site is needed), and runs
each through `splitpoint cuts`, `split` (at the middle cut), `fidelity` (float32 and int8+zstd),
`profile` (edge, emulated 4x slower; server), `plan` (LTE), then serves the plan picked and the split:
a real `splitpoint`-style server (TailServer) and an EdgeClient whose answer is compared with the whole
model's. A step passes when its command exits 0 without a traceback; a served answer when it equals the
whole model's (float32 split: relative error below 1e-4; the plan's pick may quantise: reported).

Run: python benchmarks/check_real_models.py [--only NAME] [--out DIR]
(needs the package index for `pip download`; the wheels are cached in ~/.cache/splitpoint/wheels)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import arguments, write_results

WHEELS = Path.home() / ".cache" / "splitpoint" / "wheels"


@dataclass
class Case:
    name: str
    package: str  # the wheel that ships it (pip name and version)
    member: str  # the .onnx inside it
    shapes: list[str] = field(default_factory=list)  # --input-shape values
    why: str = ""  # what makes it unusual


CASES = [
    Case(
        "pp-ocrv6-det",
        "rapidocr==3.10.0",
        "rapidocr/models/PP-OCRv6_det_small.onnx",
        ["x:1x3x320x320"],
        "paddle2onnx, symbolic height and width, ConvTranspose head",
    ),
    Case(
        "pp-ocrv6-rec",
        "rapidocr==3.10.0",
        "rapidocr/models/PP-OCRv6_rec_small.onnx",
        ["x:1x3x48x320"],
        "paddle2onnx, stale output shape, 18,710 classes",
    ),
    Case(
        "pp-ocr-cls",
        "rapidocr==3.10.0",
        "rapidocr/models/ch_ppocr_mobile_v2.0_cls_mobile.onnx",
        ["x:1x3x48x192"],
        "paddle2onnx, input [-1, 3, ?, ?]: each ? its own size",
    ),
    Case(
        "nudenet-yolov8n",
        "nudenet==3.4.2",
        "nudenet/320n.onnx",
        ["images:1x3x320x320"],
        "YOLOv8n, symbolic batch, height and width",
    ),
    Case(
        "magika",
        "magika==1.0.3",
        "magika/models/standard_v3_3/model.onnx",
        [],
        "jax2tf, int32 byte input, a layer norm past float16's range",
    ),
    Case(
        "silero-vad-v6",
        "faster-whisper==1.2.1",
        "faster_whisper/assets/silero_vad_v6.onnx",
        [],
        "three inputs (audio windows, LSTM h and c), states as outputs",
    ),
    # installed already (a dependency, or the [trained] extra): no download
    Case(
        "ddddocr-ocr-old",
        "ddddocr",
        "common_old.onnx",
        ["input1:1x1x64x256"],
        "eight opset domains declared, stale output shape",
    ),
    *(
        Case(
            f"onnx-{n}",
            "onnx",
            f"backend/test/data/light/light_{n}.onnx",
            [],
            "IR 3, weights listed as inputs and made at run time by ConstantOfShape, each of one value "
            "(any codec keeps the output: its pick says nothing of fidelity)",
        )
        for n in ("squeezenet", "resnet50", "inception_v1", "densenet121")
    ),
]


def fetch(case: Case, work: Path) -> Path:
    """The case's .onnx: from its wheel (downloaded once into WHEELS), or from an installed package."""
    if "==" not in case.package:
        import importlib.util

        spec = importlib.util.find_spec(case.package)
        assert spec is not None and spec.origin is not None, f"{case.package} is not installed"
        return Path(spec.origin).parent / case.member
    WHEELS.mkdir(parents=True, exist_ok=True)
    name, version = case.package.split("==")
    stem = name.replace("-", "_")
    wheel = next(iter(sorted(WHEELS.glob(f"{stem}-{version}-*.whl"))), None)
    if wheel is None:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", case.package, "-d", str(WHEELS)],
            check=True,
        )
        wheel = next(iter(sorted(WHEELS.glob(f"{stem}-{version}-*.whl"))))
    out = work / f"{case.name}.onnx"
    with zipfile.ZipFile(wheel) as z, z.open(case.member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return out


def step(label: str, args: list[str], log: list[dict]) -> tuple[bool, str]:
    t0 = time.perf_counter()
    p = subprocess.run(args, capture_output=True, text=True, timeout=900)
    ok = p.returncode == 0 and "Traceback" not in p.stderr
    last = (p.stderr.strip().splitlines() or [""])[-1][:300]
    log.append(
        {"step": label, "ok": ok, "s": round(time.perf_counter() - t0, 1), "error": "" if ok else last}
    )
    return ok, p.stdout


def served(model: Path, plan: Path, shapes: list[str]) -> dict:
    """The plan served over a real socket: its answer against the whole model's."""
    import numpy as np

    from splitpoint.core.graph import open_model
    from splitpoint.core.graph.shapes import parse_input_shapes
    from splitpoint.core.samples import sample_feeds
    from splitpoint.edge.client import EdgeClient
    from splitpoint.edge.config import EdgeConfig
    from splitpoint.server.config import ServerConfig
    from splitpoint.server.tail_server import TailServer

    h = open_model(model, parse_input_shapes(shapes))
    feeds = sample_feeds(h.model, 1, 3)
    want = h.whole_session(1).run(None, feeds)
    with tempfile.TemporaryDirectory() as d:
        shutil.copytree(plan, Path(d) / "p")
        srv = TailServer(ServerConfig(bind="tcp://127.0.0.1:0", plans_dir=Path(d))).start()
        try:
            cfg = EdgeConfig(plan_dir=Path(d) / "p", server=srv.endpoint, fallback=False, connect_grace_s=30)
            with EdgeClient(cfg) as c:
                r = c.infer(feeds, timeout=120)
        finally:
            srv.stop()
    errs = []
    for name, ref in zip(h.index.outputs, want, strict=True):
        got = r[name]
        if got.shape != ref.shape:
            return {"ok": False, "error": f"{name}: shape {got.shape} against {ref.shape}"}
        scale = float(np.abs(ref).max()) or 1.0
        errs.append(float(np.abs(got.astype(np.float64) - ref).max()) / scale)
    return {"ok": True, "rel_err": max(errs), "kind": "local" if "local_ms" in r.breakdown else "split"}


def check(case: Case, work: Path) -> dict:
    model = fetch(case, work)
    d = work / case.name
    d.mkdir(exist_ok=True)
    shape_args = [a for s in case.shapes for a in ("--input-shape", s)]
    sp = ["splitpoint"]
    log: list[dict] = []
    ok, out = step("cuts", [*sp, "cuts", str(model), "--json", *shape_args], log)
    row: dict = {"model": case.name, "package": case.package, "file": case.member, "why": case.why}
    if not ok:
        return {**row, "steps": log}
    cuts = json.loads(out)["cuts"]
    row["cuts"] = len(cuts)
    k = str(cuts[len(cuts) // 2]["index"])
    step("split", [*sp, "split", str(model), "--cut", k, "-o", str(d / "split"), "--force", *shape_args], log)
    for codec in ("float32", "int8+zstd"):
        step(
            f"fidelity {codec}",
            [
                *sp,
                "fidelity",
                str(model),
                "--cut",
                k,
                "--codec",
                codec,
                "--random",
                "4",
                "--json",
                *shape_args,
            ],
            log,
        )
    step(
        "profile edge",
        [
            *sp,
            "profile",
            str(model),
            "-o",
            str(d / "edge.json"),
            "--quiet",
            "--emulate-slowdown",
            "4",
            *shape_args,
        ],
        log,
    )
    step(
        "profile server",
        [
            *sp,
            "profile",
            str(model),
            "--role",
            "server",
            "-o",
            str(d / "server.json"),
            "--quiet",
            *shape_args,
        ],
        log,
    )
    ok, out = step(
        "plan",
        [
            *sp,
            "plan",
            str(model),
            "--edge-profile",
            str(d / "edge.json"),
            "--server-profile",
            str(d / "server.json"),
            "--network",
            "lte",
            "-o",
            str(d / "plan"),
            "--force",
            "--json",
            *shape_args,
        ],
        log,
    )
    if ok:
        row["pick"] = json.loads(out)["pick"]["label"]
    for label, plan in (("serve pick", d / "plan"), ("serve split", d / "split")):
        if not plan.is_dir():
            continue
        try:
            got = served(model, plan, case.shapes)
        except Exception as exc:  # reported, not raised: the next model still runs
            got = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
        if label == "serve split" and got.get("ok"):
            got["ok"] = got["rel_err"] < 1e-4
        log.append({"step": label, **got})
    row["steps"] = log
    return row


def report(rows: list[dict]) -> str:
    lines = [
        "# Real models from packages on the index",
        "",
        "`python benchmarks/check_real_models.py`: each model's ONNX file taken from the wheel that ships "
        "it (or the installed package), then `splitpoint cuts`, `split` at the middle cut, `fidelity` "
        "(float32, int8+zstd; 4 random inputs), `profile` (edge emulated 4x slower; server), `plan` (LTE), "
        "and the plan picked and the split served "
        "over a real socket, each answer compared with the whole model's (the split, float32, within 1e-4 "
        "relative). Pass/fail is measured; a step fails on a non-zero exit or a traceback.",
        "",
        "| model | package | what is unusual | cuts | steps passed | pick (LTE) "
        "| split's answer (max rel. err) |",
        "|---|---|---|---:|---:|---|---:|",
    ]
    passed = 0
    for r in rows:
        steps = r.get("steps", [])
        n_ok = sum(1 for s in steps if s.get("ok"))
        passed += n_ok == len(steps) and len(steps) == 9
        split = next((s for s in steps if s["step"] == "serve split"), {})
        err = f"{split['rel_err']:.1e}" if "rel_err" in split else "-"
        cells = [r["model"], f"`{r['package']}`", r["why"], r.get("cuts", "-"), f"{n_ok} of {len(steps)}"]
        lines.append("| " + " | ".join(map(str, [*cells, r.get("pick", "-"), err])) + " |")
    failures = [(r["model"], s) for r in rows for s in r.get("steps", []) if not s.get("ok")]
    lines += ["", f"**{passed} of {len(rows)} models passed every step.**", ""]
    if failures:
        lines += ["## Failures", ""]
        lines += [f"- {m}, {s['step']}: {s.get('error', '')}" for m, s in failures]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--only", action="append", help="a model's name (repeatable)")
    ap.add_argument("--out", type=Path, default=None, help="folder for real_models.json and .md")
    args = ap.parse_args()
    cases = [c for c in CASES if not args.only or c.name in args.only]
    rows = []
    with tempfile.TemporaryDirectory(prefix="splitpoint-real-") as tmp:
        for c in cases:
            rows.append(check(c, Path(tmp)))
            print(c.name, [(s["step"], s.get("ok")) for s in rows[-1].get("steps", [])], flush=True)
    write_results("real_models", {"models": rows}, report(rows), args.out)


if __name__ == "__main__":
    main()
