"""Writing a plan directory for one cut: head.onnx, tail.onnx, plan.json, all or nothing."""

from __future__ import annotations

from pathlib import Path

import onnx

from splitpoint.core.onnxio import save_model, sha256_file
from splitpoint.core.plan import Plan, TensorSpec, write_dir_atomically

from .graph.cuts import Cut
from .graph.extract import extract
from .graph.index import GraphIndex

HEAD_FILE = "head.onnx"
TAIL_FILE = "tail.onnx"
FULL_FILE = "full.onnx"


def io_specs(idx: GraphIndex, head: onnx.ModelProto, cut: Cut) -> tuple[list[TensorSpec], list[TensorSpec]]:
    head_in = {i.name for i in head.graph.input}
    tail_in = {c.name for c in cut.crossing if c.source == "input"}
    inputs = []
    for name in idx.inputs:
        t = idx.tensor(name)
        side = "both" if (name in head_in and name in tail_in) else ("tail" if name in tail_in else "head")
        inputs.append(TensorSpec(name, t.shape_str(), t.dtype, t.bytes_per_sample(), side))
    outputs = [
        TensorSpec(
            o,
            idx.tensor(o).shape_str(),
            idx.tensor(o).dtype,
            idx.tensor(o).bytes_per_sample(),
            "head" if o in cut.head_outputs else "tail",
        )
        for o in idx.outputs
    ]
    return inputs, outputs


def build_plan(
    cut: Cut,
    model_name: str,
    model_sha256: str,
    files: dict[str, str],
    codec: str = "float32",
    head_weights: str = "float32",
    predicted: dict | None = None,
    front: list | None = None,
) -> Plan:
    plan = Plan(
        model_name=model_name,
        model_sha256=model_sha256,
        cut_index=cut.index,
        cut_tensors=[
            TensorSpec(c.name, c.shape, c.dtype, c.bytes_per_sample, c.source) for c in cut.crossing
        ],
        inputs=[],
        outputs=[],
        files=files,
        codec=codec,
        head_weights=head_weights,
        predicted=predicted or {},
        front=front or [],
    )
    return plan


def write_baseline_plan(
    idx: GraphIndex,
    kind: str,
    out_dir: str | Path,
    model_name: str,
    model_sha256: str,
    force: bool = False,
    codec: str = "float32",
    predicted: dict | None = None,
    front: list | None = None,
    model: onnx.ModelProto | None = None,
    head_weights: str = "float32",
) -> Plan:
    """The two plans a user could pick instead of splitting: the whole model on the server
    (raw inputs cross, encoded with ``codec``) or the whole model on the edge."""
    if kind not in ("server-only", "edge-only"):
        raise ValueError(kind)
    server = kind == "server-only"
    inputs = [
        TensorSpec(
            n,
            idx.tensor(n).shape_str(),
            idx.tensor(n).dtype,
            idx.tensor(n).bytes_per_sample(),
            "tail" if server else "head",
        )
        for n in idx.inputs
    ]
    outputs = [
        TensorSpec(
            o,
            idx.tensor(o).shape_str(),
            idx.tensor(o).dtype,
            idx.tensor(o).bytes_per_sample(),
            "tail" if server else "head",
        )
        for o in idx.outputs
    ]
    crossing = (
        [TensorSpec(t.name, t.shape, t.dtype, t.bytes_per_sample, "input") for t in inputs] if server else []
    )
    result: dict[str, Plan] = {}
    file_name = TAIL_FILE if server else HEAD_FILE

    def write(tmp: Path) -> None:
        save_model(model if model is not None else idx.model, tmp / file_name)
        plan = Plan(
            model_name=model_name,
            model_sha256=model_sha256,
            cut_index=0 if server else None,
            cut_tensors=crossing,
            inputs=inputs,
            outputs=outputs,
            files={file_name: sha256_file(tmp / file_name)},
            codec=codec if server else "float32",
            predicted=predicted or {},
            front=front or [],
            kind=kind,
            head_weights=head_weights if not server else "float32",
        )
        plan.plan_id = plan.content_id()
        (tmp / "plan.json").write_text(plan.to_json())
        result["plan"] = plan

    write_dir_atomically(out_dir, write, force=force)
    return result["plan"]


def write_plan(
    idx: GraphIndex,
    cut: Cut,
    out_dir: str | Path,
    model_name: str,
    model_sha256: str,
    force: bool = False,
    include_full: bool = False,
    codec: str = "float32",
    predicted: dict | None = None,
    front: list | None = None,
    head_model: onnx.ModelProto | None = None,
    head_weights: str = "float32",
) -> Plan:
    """Extract, check and write. ``head_model`` replaces the extracted head (e.g. quantised)."""
    head, tail = extract(idx, cut)
    inputs, outputs = io_specs(idx, head, cut)
    if head_model is not None:
        head = head_model
    result: dict[str, Plan] = {}

    def write(tmp: Path) -> None:
        save_model(head, tmp / HEAD_FILE)
        save_model(tail, tmp / TAIL_FILE)
        if include_full:
            save_model(idx.model, tmp / FULL_FILE)
        files = {
            f.name: sha256_file(f)
            for f in sorted(tmp.iterdir())
            if f.suffix == ".onnx" or f.name.endswith(".data")
        }
        plan = build_plan(cut, model_name, model_sha256, files, codec, head_weights, predicted, front)
        plan.inputs, plan.outputs = inputs, outputs
        plan.plan_id = plan.content_id()
        (tmp / "plan.json").write_text(plan.to_json())
        result["plan"] = plan

    write_dir_atomically(out_dir, write, force=force)
    return result["plan"]
