"""Writing a plan directory: the one place that does it, for every kind of plan, all or nothing.

A split plan holds ``head.onnx`` and ``tail.onnx``; a server-only plan holds the whole model as its tail
(the raw inputs cross); an edge-only plan holds the whole model as its head (nothing crosses). Any of them
can carry ``full.onnx`` for the edge's local fallback. The directory is written in a temporary sibling and
renamed into place, so an error or Ctrl-C leaves the previous content or nothing, never half a plan.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from .errors import PlanError
from .graph.cuts import Cut
from .graph.extract import extract, verify_split
from .graph.index import GraphIndex
from .graph.model import ModelHandle
from .onnxio import save_model, sha256_file
from .plan import (
    EDGE_ONLY,
    FULL_FILE,
    HEAD_FILE,
    KINDS,
    PLAN_FILE,
    SERVER_ONLY,
    SPLIT,
    TAIL_FILE,
    Plan,
    TensorSpec,
    write_dir_atomically,
)
from .samples import sample_feeds


def _spec(name: str, shape: str, dtype: str, bytes_per_sample: int | None, side: str) -> TensorSpec:
    """A TensorSpec, validated (its side is one of the plan format's)."""
    return TensorSpec.model_validate(
        {"name": name, "shape": shape, "dtype": dtype, "bytes_per_sample": bytes_per_sample, "side": side}
    )


def _tensor(idx: GraphIndex, name: str, side: str) -> TensorSpec:
    t = idx.tensor(name)
    return _spec(name, t.shape_str(), t.dtype, t.bytes_per_sample(), side)


def _routing(
    idx: GraphIndex, kind: str, cut: Cut | None, head: onnx.ModelProto | None
) -> tuple[list[TensorSpec], list[TensorSpec], list[TensorSpec]]:
    """Inputs (which side reads each), outputs (which side produces each) and the tensors that cross."""
    if kind == SPLIT:
        assert cut is not None and head is not None
        head_in = {i.name for i in head.graph.input}
        tail_in = {c.name for c in cut.crossing if c.source == "input"}
        inputs = [
            _tensor(idx, n, "both" if n in head_in and n in tail_in else "tail" if n in tail_in else "head")
            for n in idx.inputs
        ]
        outputs = [_tensor(idx, o, "head" if o in cut.head_outputs else "tail") for o in idx.outputs]
        crossing = [_spec(c.name, c.shape, c.dtype, c.bytes_per_sample, c.source) for c in cut.crossing]
        return inputs, outputs, crossing
    side = "tail" if kind == SERVER_ONLY else "head"
    inputs = [_tensor(idx, n, side) for n in idx.inputs]
    outputs = [_tensor(idx, o, side) for o in idx.outputs]
    crossing = [t.model_copy(update={"side": "input"}) for t in inputs]
    return inputs, outputs, crossing if kind == SERVER_ONLY else []


def write_plan(
    handle: ModelHandle,
    out_dir: str | Path,
    *,
    kind: str = SPLIT,
    cut: Cut | None = None,
    codec: str = "float32",
    head_model: onnx.ModelProto | None = None,
    head_weights: str = "float32",
    include_full: bool = False,
    predicted: dict | None = None,
    front: list | None = None,
    force: bool = False,
) -> Plan:
    """Extract (for a split), check and write one plan; ``head_model`` replaces the edge's model
    (e.g. its int8 version). Returns the plan as written, its id computed from its content."""
    if kind not in KINDS:
        raise PlanError(f"unknown plan kind {kind!r}; one of {', '.join(KINDS)}")
    if (kind == SPLIT) != (cut is not None):
        raise PlanError("a split plan needs a cut, and only a split plan takes one")
    idx = handle.index
    models: dict[str, onnx.ModelProto] = {}
    if kind == SPLIT:
        assert cut is not None
        head, tail = extract(idx, cut)
        tail = verify_split(head, tail, sample_feeds(idx.model, 1), where=f"cut {cut.index or ''}".strip())
        models = {HEAD_FILE: head, TAIL_FILE: tail}
    elif kind == SERVER_ONLY:
        models = {TAIL_FILE: idx.model}
    else:
        models = {HEAD_FILE: idx.model}
    inputs, outputs, crossing = _routing(idx, kind, cut, models.get(HEAD_FILE))
    if head_model is not None:
        if HEAD_FILE not in models:
            raise PlanError("a server-only plan has no edge model to replace")
        models[HEAD_FILE] = head_model
    if include_full:
        models[FULL_FILE] = idx.model
    result: list[Plan] = []

    def write(tmp: Path) -> None:
        for name, model in models.items():
            save_model(model, tmp / name)
        files = {f.name: sha256_file(f) for f in sorted(tmp.iterdir())}  # models and their external data
        plan = Plan.model_validate(
            dict(
                model_name=handle.name,
                model_sha256=handle.sha256,
                cut_index=cut.index if cut is not None else (0 if kind == SERVER_ONLY else None),
                cut_tensors=crossing,
                inputs=inputs,
                outputs=outputs,
                files=files,
                codec=codec if kind != EDGE_ONLY else "float32",
                head_weights=head_weights if kind != SERVER_ONLY else "float32",
                kind=kind,
                input_shapes=handle.input_shapes,
                predicted=predicted or {},
                front=front or [],
            )
        )
        plan.plan_id = plan.content_id()
        (tmp / PLAN_FILE).write_text(plan.to_json())
        result.append(plan)

    write_dir_atomically(out_dir, write, force=force)
    return result[0]
