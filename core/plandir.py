"""Writing a plan directory: the one place that does it, for every kind of plan, all or nothing.

A plan's directory holds one model per stage that runs something: ``head.onnx`` for the edge,
``tail.onnx`` for the last stage, ``stageI.onnx`` for relays between; a server-only plan's tail is the
whole model (the raw inputs a node reads cross; where one is read by none, the tail is the model without
it) and an edge-only plan's head is. Any of them can carry ``full.onnx``
for the edge's local fallback. The directory is written in a temporary sibling and renamed into place,
so an error or Ctrl-C leaves the previous content or nothing, never half a plan.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import onnx

from .config import explain_fields
from .errors import ModelError, PlanError, clipped, first_line
from .graph.cuts import Cut
from .graph.extract import extract_segments, verify_segments
from .graph.index import GraphIndex
from .graph.model import ModelHandle
from .onnxio import save_and_hash
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
    Stage,
    TensorSpec,
    stage_file,
    write_dir_atomically,
)
from .wire import names_unfit

if TYPE_CHECKING:
    from .decoders import Decoder


def _spec(name: str, shape: str, dtype: str, bytes_per_sample: int | None, side: str) -> TensorSpec:
    """A TensorSpec, validated (its side is one of the plan format's); a tensor the plan format cannot
    carry (a name past its 1,024 characters) is refused in words, before anything is written."""
    from pydantic import ValidationError

    try:
        return TensorSpec.model_validate(
            {"name": name, "shape": shape, "dtype": dtype, "bytes_per_sample": bytes_per_sample, "side": side}
        )
    except ValidationError as exc:
        shown = name if len(name) <= 60 else f"{name[:40]}…({len(name)} characters)"
        raise PlanError(
            f"tensor {shown!r} cannot go into a plan ({explain_fields(exc)}); rename it in the model"
        ) from exc


def _tensor(idx: GraphIndex, name: str, side: str) -> TensorSpec:
    t = idx.tensor(name)
    return _spec(name, t.shape_str(), t.dtype, t.bytes_per_sample(), side)


def _crossing(idx: GraphIndex, cut: Cut | None) -> list[TensorSpec]:
    """What crosses a cut, each marked "input" (a raw model input) or "head" (computed before it)."""
    if cut is None:
        return [_tensor(idx, n, "input") for n in idx.read_inputs()]
    return [_spec(c.name, c.shape, c.dtype, c.bytes_per_sample, c.source) for c in cut.crossing]


def _check_messages(idx: GraphIndex, cuts: list[Cut | None]) -> None:
    """Refuse, before any work, a plan one of whose messages the protocol's limits would refuse: what
    crosses each cut, and the outputs a reply (or the edge daemon's answer) carries."""
    for i, cut in enumerate(cuts):
        why = names_unfit([t.name for t in _crossing(idx, cut)])
        if why is not None:
            where = f"cut {cut.index}" if cut is not None else "sending the model's inputs"
            raise PlanError(f"{where} (hop {i + 1}) cannot go over the wire: {why}; choose another cut")
        # a rank that follows the batch or the data (an axes-less Squeeze: a scalar at batch 1, [N] at 2)
        # cannot be declared in a stage's interface: the checker's "Field 'shape' of 'type' is required"
        ranked = [
            t.name for t in (cut.crossing if cut is not None else []) if idx.tensor(t.name).dims is None
        ]
        if ranked and cut is not None:
            raise PlanError(
                f"cut {cut.index} (hop {i + 1}): the rank of {', '.join(map(repr, ranked))} is not known (it "
                "changes with the batch or the data, or a trial run could not measure it); choose another "
                "cut, or fix the batch with --input-shape"
                + (f" (the trial run failed: {idx.trial_error})" if idx.trial_error else "")
            )
    why = names_unfit(list(idx.outputs)) if cuts else None  # a server's reply carries them
    if why is not None:
        raise PlanError(f"the model's outputs cannot go over the wire in one answer: {why}")


def _refuse_if_the_whole_model_fails(handle: ModelHandle, feeds: dict, exc: Exception) -> None:
    """Where a part fails, whether the whole model runs at these shapes at all: one that does not was
    refused as the cut's fault ("the tail does not run on what the stages before it produced", or a
    checker's words about an untyped tensor): a hummingbird export traced at batch 5, run at 1, and a
    model with an operator onnxruntime has no kernel for (opset 6's Add)."""
    try:
        handle.whole_session(threads=1).run(None, feeds)
    except Exception as whole:  # onnxruntime's own error types
        kind = type(whole).__name__
        why = (
            " (no kernel for that operator, opset version and element type on this provider: one of "
            "another provider's, such as CUDA's, does not run here; an old opset's may, exported at a "
            "newer opset)"
            if kind == "NotImplemented"
            else ""
        )
        # a model onnxruntime refuses to load (a type its checker rejects) is no question of shapes
        where = (
            ""
            if why or kind in ("InvalidGraph", "InvalidProtobuf", "NoModel")
            else " at these input shapes (see --input-shape)"
        )
        raise ModelError(
            f"onnxruntime could not run the model{where}: {clipped(first_line(whole))}{why}"
            f"{handle.random_values_note()}"
        ) from exc


def write_plan(
    handle: ModelHandle,
    out_dir: str | Path,
    *,
    kind: str = SPLIT,
    cut: Cut | None = None,
    codec: str = "float32",
    cuts: list[Cut | None] | None = None,
    codecs: list[str] | None = None,
    devices: list[str] | None = None,
    head_model: onnx.ModelProto | None = None,
    head_weights: str = "float32",
    include_full: bool = False,
    predicted: dict | None = None,
    front: list | None = None,
    force: bool = False,
) -> Plan:
    """Extract, check and write one plan. Two stages by ``kind`` and ``cut``, or a chain by ``cuts`` (one
    per hop, in order; ``None`` for the empty cut) with a codec per hop and a device name per stage.
    ``head_model`` replaces the edge's model (e.g. its int8 version). Returns the plan as written, its
    id computed from its content."""
    if kind not in KINDS:
        raise PlanError(f"unknown plan kind {kind!r}; one of {', '.join(KINDS)}")
    if cuts is None:
        if (kind == SPLIT) != (cut is not None):
            raise PlanError("a split plan needs a cut, and only a split plan takes one")
        cuts = [cut] if kind == SPLIT else [None] if kind == SERVER_ONLY else []
    elif cut is not None:
        raise PlanError("give one cut, or the cuts of a chain, not both")
    kind = EDGE_ONLY if not cuts else SERVER_ONLY if cuts[0] is None else SPLIT
    hops = len(cuts)
    codecs = list(codecs) if codecs is not None else [codec] * hops
    if len(codecs) != hops:
        raise PlanError(f"{hops} cut(s) need {hops} codec(s), one per hop; got {len(codecs)}")
    if devices is not None and len(devices) != hops + 1:
        raise PlanError(f"{hops} cut(s) make {hops + 1} stages: name {hops + 1} devices, not {len(devices)}")
    idx = handle.index
    _check_messages(idx, cuts)
    feeds = handle.sample(1)
    where = "the plan" if hops != 1 or cuts[0] is None else f"cut {cuts[0].index or ''}".strip()
    try:
        segments = extract_segments(idx, cuts, shared_weights=True)  # filled from the arrays when saved
        models = [seg.model for seg in segments]
        models = verify_segments(models, feeds, where=where, weights=idx.weight_array) if hops else models
    except ModelError as exc:  # the sample's values, not the cut, may be what the model refuses
        _refuse_if_the_whole_model_fails(handle, feeds, exc)
        raise ModelError(f"{exc}{handle.random_values_note()}") from exc
    if head_model is not None:
        if models[0] is None:
            raise PlanError("a server-only plan has no edge model to replace")
        models[0] = head_model
    n = hops + 1
    files_models = {stage_file(i, n): m for i, m in enumerate(models) if m is not None}
    if include_full and kind != EDGE_ONLY:  # its head is the whole model already: never a second copy
        files_models[FULL_FILE] = idx.model
    head_reads = {i.name for i in models[0].graph.input} if models[0] is not None else set()
    first_sent = {c.name for c in _crossing(idx, cuts[0]) if c.side == "input"} if cuts else set()
    inputs = [
        _tensor(
            idx, t, "both" if t in head_reads and t in first_sent else "tail" if t in first_sent else "head"
        )
        for t in idx.inputs
    ]
    made_first = set(segments[0].produces)
    outputs = [_tensor(idx, o, "head" if o in made_first else "tail") for o in idx.outputs]
    sends = [_crossing(idx, c) for c in cuts] + [[]]
    stages = [
        Stage(
            file=stage_file(i, n) if models[i] is not None else None,
            device=devices[i] if devices else "",
            weights=head_weights if i == 0 and models[0] is not None else "float32",  # type: ignore[arg-type]
            end=(cuts[i].index if cuts[i] is not None else 0) if i < hops else None,  # type: ignore[union-attr]
            receives=sends[i - 1] if i else [],
            sends=sends[i],
            codec=codecs[i] if i < hops else "float32",
            produces=seg.produces,
        )
        for i, seg in enumerate(segments)
    ]
    result: list[Plan] = []

    def write(tmp: Path) -> None:
        files = save_and_hash(files_models, tmp, idx.weight_array)  # models and their external data
        plan = Plan.model_validate(
            dict(
                model_name=handle.name,
                model_sha256=handle.sha256,
                inputs=inputs,
                outputs=outputs,
                stages=stages,
                files=files,
                kind=kind,
                input_shapes=handle.input_shapes,
                predicted=predicted or {},
                front=front or [],
            )
        )
        plan.plan_id = plan.content_id()
        (tmp / PLAN_FILE).write_text(plan.to_json(), encoding="utf-8")
        result.append(plan)

    write_dir_atomically(out_dir, write, force=force)
    return result[0]


def write_decoder_plan(
    dec: Decoder,
    out_dir: str | Path,
    *,
    edge_layers: int,
    codec: str = "float32",
    head_weights: str = "float32",
    include_full: bool = False,
    predicted: dict | None = None,
    force: bool = False,
) -> Plan:
    """A decoder split between layers: ``head.onnx`` (embedding and the first ``edge_layers`` layers, the
    edge's KV cache), ``tail.onnx`` (the other layers and the output head, the server's KV cache), and a
    plan whose stage 0 sends the hidden state of the new tokens with ``codec``. ``dec`` is a zoo decoder or
    an exported one (``core/decoders.py``); an exported one's split is checked against the whole model
    before anything is written. ``head_weights`` int4 stores the edge's layers as 4-bit MatMulNBits
    weights (the embedding stays float)."""
    from .decoders import ZooDecoder, check_split, hidden_codec
    from .plan import DecoderInfo

    if not 0 < edge_layers < dec.layers:
        raise PlanError(f"--edge-layers must be 1 to {dec.layers - 1} for a {dec.layers}-layer decoder")
    if head_weights not in ("float32", "int4"):
        raise PlanError(f"--head-weights must be float32 or int4 for a decoder, not {head_weights!r}")
    codec = hidden_codec(dec, codec)  # parsed before the model work, not in the plan's validation after it
    whole = dec.whole()
    models = {HEAD_FILE: dec.part(0, edge_layers), TAIL_FILE: dec.part(edge_layers, dec.layers)}
    if not isinstance(dec, ZooDecoder):  # the zoo's parts are built, not cut: exact by construction
        check_split(dec, models[HEAD_FILE], models[TAIL_FILE])
    if head_weights == "int4":
        from .quantize import quantize_matmul_weights

        models[HEAD_FILE] = quantize_matmul_weights(models[HEAD_FILE])
    if include_full:
        models[FULL_FILE] = whole
    info = DecoderInfo(
        layers=dec.layers,
        edge_layers=edge_layers,
        heads=dec.heads,
        head_dim=dec.head_dim,
        hidden=dec.d_model,
        vocab=dec.vocab,
        max_len=dec.n_ctx,
    )
    crossing = [_spec(dec.boundary(edge_layers), f"1xsequencex{info.hidden}", dec.hidden_dtype, None, "head")]
    sha256 = dec.sha256()
    result: list[Plan] = []

    def write(tmp: Path) -> None:
        files = save_and_hash(models, tmp)
        plan = Plan.model_validate(
            dict(
                model_name=dec.name,
                model_sha256=sha256,
                inputs=[_spec("input_ids", "1xsequence", dec.ids_dtype, None, "head")],
                outputs=[_spec(dec.logits, f"1xsequencex{info.vocab}", dec.logits_dtype, None, "tail")],
                stages=[
                    Stage(file=HEAD_FILE, sends=crossing, codec=codec, weights=head_weights),  # type: ignore[arg-type]
                    Stage(file=TAIL_FILE, receives=crossing, produces=[dec.logits]),
                ],
                files=files,
                kind=SPLIT,
                decoder=info,
                predicted=predicted or {},
            )
        )
        plan.plan_id = plan.content_id()
        (tmp / PLAN_FILE).write_text(plan.to_json(), encoding="utf-8")
        result.append(plan)

    write_dir_atomically(out_dir, write, force=force)
    return result[0]
