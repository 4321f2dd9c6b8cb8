"""Head and tail sub-models for a cut.

Written here rather than with ``onnx.utils.Extractor``, which accepts invalid boundaries by
silently pulling head nodes into the tail, and drops subgraph outer-scope references and
model-local functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from splitpoint.core.errors import ModelError, clipped
from splitpoint.core.onnxio import IR_WEIGHTS_NOT_INPUTS, check_model
from splitpoint.core.weights import shareable, with_stubs

from .cuts import Cut, head_positions
from .index import GraphIndex


def _with_constants(idx: GraphIndex, positions: set[int]) -> list[int]:
    """Add the constant nodes the given nodes read, transitively; each side gets its own copy."""
    need = set(positions)
    stack = [t for p in positions for t in idx.node_ins[p]]
    while stack:
        t = stack.pop()
        p = idx.producer.get(t)
        if p is not None and p in idx.const and p not in need:
            need.add(p)
            stack.extend(idx.node_ins[p])
    return sorted(need)


def _submodel(
    idx: GraphIndex,
    positions: list[int],
    inputs: list[str],
    outputs: list[str],
    name: str,
    shared: bool = False,
) -> onnx.ModelProto:
    src = idx.model
    # model outputs no computing node makes: a constant node's (its node comes along), a weight's, and
    # a model input passed through (it enters the part that outputs it)
    made_by_const = {idx.producer[o] for o in outputs if idx.producer.get(o) in idx.const}
    if made_by_const:
        positions = _with_constants(idx, set(positions) | made_by_const)
    inputs = inputs + [o for o in outputs if o in idx.inputs and o not in inputs]
    nodes = [idx.nodes[p] for p in positions]
    reads = {t for p in positions for t in idx.node_ins[p]} | set(outputs)
    inits = [
        idx.weight_stub(t) if shared and shareable(init) else init
        for t, init in idx.initializers.items()
        if t in reads
    ]
    original_inputs = {i.name: i for i in src.graph.input}
    original_outputs = {o.name: o for o in src.graph.output}

    def vi(name: str) -> onnx.ValueInfoProto:
        # the model's own inputs as given (their shapes fixed by --input-shape); everything else from the
        # index, whose shapes come from the graph, never from the exporter's value_info (often stale). A
        # model output whose rank follows the batch (an axes-less Squeeze: a scalar at batch 1) has no shape
        # to declare, which the checker requires: the file's own declaration stands in (the plan records no
        # shape for it, and checks none)
        if name in original_inputs:
            return original_inputs[name]
        t = idx.tensor(name)
        if (
            t.dims is None
            and name in original_outputs
            and original_outputs[name].type.tensor_type.HasField("shape")
        ):
            return original_outputs[name]
        return t.value_info()

    graph = helper.make_graph(nodes, name, [vi(i) for i in inputs], [vi(o) for o in outputs])
    model = helper.make_model(
        graph, opset_imports=list(src.opset_import), producer_name="splitpoint", functions=list(src.functions)
    )
    # the weights go in after make_model, which copies the graph it is given: one copy of them, not two
    model.graph.initializer.extend(inits)
    # IR 3 wants every weight listed as a graph input too (old model-zoo files do so); from IR 4 on they
    # need not be, and a part lists only what it receives
    model.ir_version = max(src.ir_version, IR_WEIGHTS_NOT_INPUTS)
    return model


def extract(
    idx: GraphIndex, cut: Cut, check: bool = True, shared_weights: bool = False
) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """Head and tail of ``cut``. With ``shared_weights`` their large weights are stubs, for sessions
    built with ``make_session(..., weights=idx.weight_array)`` (the profiler, fidelity runs): no copy
    of the weights per part."""
    head = set(head_positions(idx, cut))
    tail = [p for p in idx.compute if p not in head]
    head_reads = {t for p in head for t in idx.node_ins[p]}
    head_inputs = [i for i in idx.inputs if i in head_reads]
    head_sent = [c.name for c in cut.crossing if c.source == "head"]
    head_outputs = list(dict.fromkeys(head_sent + cut.head_outputs))
    tail_outputs = [o for o in idx.outputs if o not in cut.head_outputs]
    h = _submodel(
        idx,
        _with_constants(idx, head),
        head_inputs,
        head_outputs,
        f"{idx.model.graph.name}_head",
        shared_weights,
    )
    t = _submodel(
        idx,
        _with_constants(idx, set(tail)),
        [c.name for c in cut.crossing],
        tail_outputs,
        f"{idx.model.graph.name}_tail",
        shared_weights,
    )
    if check:
        # the weights are the model's own, checked when it was loaded: the parts' structure is what is new
        _check_part(idx, h, "extracted head")
        _check_part(idx, t, "extracted tail")
    return h, t


def _check_part(idx: GraphIndex, model: onnx.ModelProto, where: str) -> None:
    """The checker on a part: with strict shape inference where the whole model passes it, and where
    only the part fails it, as the model was checked. Strict inference can fail on a part where it
    passed on the whole (a cut tensor whose now fixed size an STFT's inference then contradicts, though
    onnxruntime runs it); the trial run that follows (``verify_segments``) is the proof that the parts
    rejoin, and what it refuses is refused in onnxruntime's words."""
    if idx.strict_checks:
        try:
            check_model(model, where=where, full=True, weights=False)
            return
        except ModelError:
            pass
    check_model(model, where=where, full=False, weights=False)


@dataclass
class Segment:
    """One stage's part of the model: its nodes as a sub-model (None when it runs nothing), the tensors
    it receives, the ones it sends on, and the model outputs it computes."""

    model: onnx.ModelProto | None
    receives: list[str]  # the crossing set of the cut before it (the model's inputs for the first)
    sends: list[str]  # the crossing set of the cut after it (nothing for the last)
    produces: list[str]  # model outputs computed in this segment


def extract_segments(
    idx: GraphIndex, cuts: list[Cut | None], check: bool = True, shared_weights: bool = False
) -> list[Segment]:
    """The segments between nested cuts, in order (``None`` for the empty cut: nothing before it, so
    the raw inputs cross). A segment's sub-model reads only what its nodes need; the tensors it received
    and must pass on (a skip connection across a device, a raw input read later) are forwarded by the
    runner as they are. Two cuts give the familiar head and tail. ``shared_weights``: as for ``extract``
    (a segment that is the whole model keeps its weights inline)."""
    heads: list[frozenset] = [frozenset()]
    for c in cuts:
        h = frozenset() if c is None else head_positions(idx, c)
        if not heads[-1] <= h:
            raise ModelError("the cuts of a chain must be nested, each after the one before")
        heads.append(h)
    heads.append(frozenset(idx.compute))
    crossing = [list(idx.inputs)] + [
        idx.read_inputs() if c is None else [t.name for t in c.crossing] for c in cuts
    ]
    crossing.append([])
    segments = []
    for i in range(len(heads) - 1):
        own = heads[i + 1] - heads[i]
        produced = {o for p in own for o in idx.nodes[p].output if o}
        outs = [o for o in idx.outputs if o in produced]
        if i == 0:
            # graph outputs that are graph inputs come from the edge, which holds them, as in a one-stage
            # plan
            outs += [o for o in idx.outputs if o in idx.inputs]
        if i == len(heads) - 2:
            # ... and those no computing node makes (a constant node's, a weight) from the last stage, with
            # the rest of the model's outputs
            outs += [o for o in idx.outputs if o in idx.initializers or idx.producer.get(o) in idx.const]
        sends = crossing[i + 1]
        model = None
        if own == heads[-1] and (i == 0 or len(crossing[i]) == len(idx.inputs)):
            model = idx.model  # the whole model (one stage, or every stage before it empty): as given
        elif own:
            reads = {t for p in own for t in idx.node_ins[p]}
            ins = [t for t in (idx.inputs if i == 0 else crossing[i]) if t in reads]
            made = list(dict.fromkeys([t for t in sends if t in produced] + outs))
            model = _submodel(
                idx,
                _with_constants(idx, set(own)),
                ins,
                made,
                f"{idx.model.graph.name}_stage{i}",
                shared_weights,
            )
            if check:
                _check_part(idx, model, f"extracted stage {i}")
        segments.append(Segment(model, [] if i == 0 else crossing[i], sends, outs))
    return segments


def verify_segments(
    models: list[onnx.ModelProto | None],
    feeds: dict[str, np.ndarray],
    where: str = "the split",
    weights: Callable[[str], np.ndarray] | None = None,
) -> list[onnx.ModelProto | None]:
    """Run the segments in order on one sample, each on what the ones before produced. A received
    tensor whose declared dimension the run contradicts is declared free instead (the models returned
    are corrected); a chain that still does not rejoin is refused with onnxruntime's reason, before
    any plan is written. ``weights`` (``GraphIndex.weight_array``): the trial runs use copies of the
    models with their large weights as stubs, so that no weight is copied for them."""
    from splitpoint.core.runner import make_session

    available = dict(feeds)
    fixed_models: list[onnx.ModelProto | None] = []
    for i, model in enumerate(models):
        if model is None:
            fixed_models.append(None)
            continue
        trial = with_stubs(model) if weights is not None else _copy(model)
        changed = i > 0 and _free_contradicted_dims(trial, available)
        part = "the head" if i == 0 else "the tail" if i == len(models) - 1 else f"stage {i}"
        try:
            sess = make_session(trial, threads=1, weights=weights, prepack=False)
            outs = sess.run(None, {x.name: available[x.name] for x in sess.get_inputs()})
        except Exception as exc:  # onnxruntime's own error types
            before = "" if i == 0 else " on what the stages before it produced"
            raise ModelError(
                f"{where}: {part} does not run{before}: {type(exc).__name__}: {clipped(str(exc))}"
            ) from exc
        if weights is None:
            fixed = trial
        elif changed:
            fixed = _copy(model)
            _free_contradicted_dims(fixed, available)
        else:
            fixed = model
        available.update(zip([o.name for o in sess.get_outputs()], outs, strict=True))
        fixed_models.append(fixed)
    return fixed_models


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def _free_contradicted_dims(model: onnx.ModelProto, available: dict[str, np.ndarray]) -> bool:
    """Free the declared input dimensions that ``available`` contradicts; True if any were. A symbol the
    inputs share but the run gives two sizes is freed too, in every input after the first that has it:
    a receiver checks that the tensors it is sent agree on each shared symbol (a batch of 1 beside a batch
    of 2 would be broadcast, not refused), so only the symbols that hold may stay shared."""
    changed = False
    sizes: dict[str, int] = {}
    for i, vi in enumerate(model.graph.input):
        got = available.get(vi.name)
        if got is None or not vi.type.HasField("tensor_type"):
            continue
        dims = vi.type.tensor_type.shape.dim
        if len(dims) != got.ndim:
            vi.type.tensor_type.ClearField("shape")
            changed = True
            continue
        for k, d in enumerate(dims):
            if (
                d.HasField("dim_value")
                and d.dim_value != got.shape[k]
                or (d.HasField("dim_param") and sizes.setdefault(d.dim_param, got.shape[k]) != got.shape[k])
            ):
                d.Clear()
                d.dim_param = f"free{i}_{k}"  # its own symbol: one symbol is one size across a graph
                changed = True
    return changed
