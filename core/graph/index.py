"""An index over an ONNX graph: who produces and who consumes each tensor, in topological order.

Control-flow nodes (If/Loop/Scan) are atomic here: the tensors their subgraphs read from the
outer scope count as inputs of the node itself, which is what ``onnx.utils.Extractor`` misses.
Nodes that depend on no graph input (Constant, shape constants) are kept apart: they are cheap,
so each side gets its own copy rather than shipping their outputs across the network.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import onnx
from onnx import helper, numpy_helper

from splitpoint.core.codecs import CARRIED_DTYPES
from splitpoint.core.errors import ModelError, clipped, first_line
from splitpoint.core.subgraphs import node_inputs
from splitpoint.core.weights import stub, with_stubs

# ops whose output shape follows their input's values: the count of what they find or keep, a branch taken
VALUE_SHAPED_OPS = frozenset({"NonZero", "NonMaxSuppression", "Unique", "Compress", "If", "Loop", "Scan"})
CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan"})
# ops whose output shape is set by the values of inputs other than their data (a target shape, repeats,
# starts and ends, sizes, axes), and which of their inputs are data (by position; default the first)
SHAPE_INPUT_OPS = frozenset(
    {
        "Reshape", "Expand", "Tile", "Slice", "Range", "ConstantOfShape", "TopK", "Resize", "Upsample", "Pad",
        "OneHot", "Squeeze", "Unsqueeze", "Split", "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin",
        "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
        "CenterCropPad", "Col2Im", "GridSample", "AffineGrid", "RandomNormalLike", "RandomUniformLike",
    }
)  # fmt: skip
_DATA_INPUTS: dict[str, tuple[int, ...]] = {
    "Range": (),
    "ConstantOfShape": (),
    "OneHot": (0, 2),
    "GridSample": (0, 1),
}


def dtype_name(elem_type: int) -> str:
    """An ONNX element type as numpy names it ("float32", "bfloat16", "object" for strings)."""
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name


@dataclass
class TensorInfo:
    name: str
    elem_type: int
    dims: list[int | str | None] | None  # per dim: int, symbolic name, or None; None: unknown rank
    rows: int = 1  # a symbolic leading dim is the batch times this (a [batch*seq, hidden] reshape)
    lead_is_batch: bool = True  # whether a symbolic leading dim is the batch (not a size found in the data)
    # where the batch is when it is not the leading dim: a recurrent layer's [seq, directions, batch, hidden]
    batch_axis: int | None = None

    @property
    def dtype(self) -> str:
        return dtype_name(self.elem_type)

    @property
    def itemsize(self) -> int:
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.elem_type)).itemsize

    def per_sample_elements(self) -> int | None:
        """Elements for one sample, where they are known: a symbolic leading dim is the batch, and so is
        the batch's symbol elsewhere (``batch_axis``); static tensors count whole."""
        if self.dims is None:
            return None
        if self.batch_axis is not None:
            rest = [d for k, d in enumerate(self.dims) if k != self.batch_axis]
            ints = [d for d in rest if isinstance(d, int)]
            return int(np.prod(ints, dtype=np.int64)) if len(ints) == len(rest) else None
        nbytes = self.bytes_per_sample()
        return None if nbytes is None else nbytes // max(self.itemsize, 1)

    def bytes_per_sample(self) -> int | None:
        """Bytes for one sample: a symbolic leading dim is the batch (or the batch's symbol where
        ``batch_axis`` says); static tensors count whole."""
        if self.dims is None:
            return None
        if self.batch_axis is not None:
            n = self.per_sample_elements()
            return None if n is None else n * self.itemsize
        if any(d is None for d in self.dims[1:]) or (
            self.dims and self.dims[0] is None and not self.lead_is_batch
        ):
            return None
        batch = bool(self.dims) and isinstance(self.dims[0], str)
        if batch and not self.lead_is_batch:
            return None
        dims = self.dims[1:] if batch else self.dims
        if any(isinstance(d, str) for d in dims):
            return None
        rows = self.rows if batch else 1
        return int(np.prod([d for d in dims if isinstance(d, int)], dtype=np.int64)) * self.itemsize * rows

    def shape_str(self) -> str:
        if self.dims is None:
            return "?"
        return "x".join("?" if d is None else str(d) for d in self.dims)

    def value_info(self) -> onnx.ValueInfoProto:
        shape = None if self.dims is None else [d if d is not None else None for d in self.dims]
        return helper.make_tensor_value_info(self.name, self.elem_type, shape)


def _tensor_info(vi: onnx.ValueInfoProto) -> TensorInfo | None:
    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type") or tt.elem_type == 0:
        return None
    if not tt.HasField("shape"):
        return TensorInfo(vi.name, tt.elem_type, None)
    dims: list[int | str | None] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return TensorInfo(vi.name, tt.elem_type, dims)


@dataclass
class GraphIndex:
    """Topologically ordered view of a model's main graph, built once per model."""

    model: onnx.ModelProto
    nodes: list = field(default_factory=list)  # all nodes, topological order
    compute: list = field(default_factory=list)  # positions (into nodes) of non-constant nodes
    const: set = field(default_factory=set)  # positions of constant nodes
    producer: dict = field(default_factory=dict)  # tensor -> node position
    consumers: dict = field(default_factory=dict)  # tensor -> [node positions]
    inputs: list = field(default_factory=list)  # real graph inputs (not initializers)
    outputs: list = field(default_factory=list)
    initializers: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # tensor -> TensorInfo
    node_ins: list = field(default_factory=list)  # per node: inputs incl. subgraph refs
    input_symbols: set = field(default_factory=set)  # the symbolic dims the graph's inputs declare
    batch_symbol: str | None = None  # the first input's leading dim, where it is a symbol: the batch
    non_tensor: set = field(default_factory=set)  # values that are sequences, maps or optionals: no codec
    body_info: dict = field(default_factory=dict)  # tensor -> TensorInfo inside Loop/If/Scan bodies
    trial_error: str | None = None  # why the trial run that types what inference missed failed, if it did
    _stubs: dict = field(default_factory=dict, repr=False)  # weight_stub's, by initializer name
    _arrays: dict = field(default_factory=dict, repr=False)  # weight_array's

    @classmethod
    def build(cls, model: onnx.ModelProto) -> GraphIndex:
        g = model.graph
        idx = cls(model=model)
        idx.initializers = {t.name: t for t in g.initializer}
        idx.inputs = [i.name for i in g.input if i.name not in idx.initializers]
        idx.outputs = [o.name for o in g.output]
        idx.nodes = _toposort(list(g.node), set(idx.inputs) | set(idx.initializers))
        idx.node_ins = [node_inputs(n) for n in idx.nodes]
        consumers: dict[str, list[int]] = defaultdict(list)
        for p, n in enumerate(idx.nodes):
            for o in n.output:
                if o:
                    idx.producer[o] = p
            for i in dict.fromkeys(idx.node_ins[p]):
                consumers[i].append(p)
        idx.consumers = dict(consumers)
        # constant nodes: no graph input upstream
        graph_inputs = set(idx.inputs)
        dynamic: set[str] = set(graph_inputs)
        for p, n in enumerate(idx.nodes):
            if any(i in dynamic for i in idx.node_ins[p]) or not n.output:
                dynamic.update(o for o in n.output if o)
            else:
                idx.const.add(p)
        idx.compute = [p for p in range(len(idx.nodes)) if p not in idx.const]
        idx.info, idx.non_tensor, idx.body_info = _infer_types(model)
        idx.input_symbols = {
            d for i in idx.inputs if i in idx.info for d in idx.info[i].dims or () if isinstance(d, str)
        }
        first = idx.info.get(idx.inputs[0]) if idx.inputs else None
        idx.batch_symbol = first.dims[0] if first and first.dims and isinstance(first.dims[0], str) else None
        for t in idx.info.values():  # a leading symbol inference made up (unk__3) is no batch
            if t.dims and isinstance(t.dims[0], str) and t.dims[0] not in idx.input_symbols:
                t.lead_is_batch = False
        # the batch elsewhere than first: an LSTM's or GRU's [seq, directions, batch, hidden] with the batch
        # free counted no bytes and no work
        for t in idx.info.values():
            _mark_batch_axis(t, idx.batch_symbol)
        for name in idx.outputs:
            if name not in graph_inputs and name not in idx.initializers and name not in idx.producer:
                raise ModelError(
                    f"graph output {name!r} is not produced by any node; not supported for splitting"
                )
        return idx

    def weight_stub(self, name: str) -> onnx.TensorProto:
        """The initializer ``name`` as a stub referring to its shared array (``core/weights.py``)."""
        if name not in self._stubs:
            self._stubs[name] = stub(self.initializers[name])
        return self._stubs[name]

    def weight_array(self, name: str) -> np.ndarray:
        """The initializer ``name`` as an array, read once per model and shared by every session built
        from a part of it."""
        if name not in self._arrays:
            self._arrays[name] = numpy_helper.to_array(self.initializers[name])
        return self._arrays[name]

    def resolved(self, t: TensorInfo) -> bool:
        """Whether ``t`` is known as far as a trial run could tell: not where its rank is unknown, nor
        where a dim is a symbol inference invented (``unk__3`` after a Reshape whose target it could not
        follow), hiding a size a cut needs. Runs measure such a dim only where the batch is the inputs'
        one free dimension: with several (a decoder's sequence and cache lengths), two runs cannot tell
        which of them a size follows."""
        if t.dims is None:
            return False
        if not self._batch_only or t.name in self._value_shaped:
            return True
        return all(isinstance(d, int) or d in self.input_symbols for d in t.dims)

    @cached_property
    def strict_checks(self) -> bool:
        """Whether the whole model passes the checker with strict shape inference, which every part cut
        from it is put through: one that does not (an opset-8 Constant of int64, which onnxruntime runs)
        has its parts checked as it was, or every cut listed failed when written."""
        from splitpoint.core.onnxio import check_model

        try:
            check_model(self.model, full=True, weights=False)
        except ModelError:
            return False
        return True

    @cached_property
    def _value_shaped(self) -> set[str]:
        """Tensors whose shape may follow the input's values, not only its shape (NonZero's count, what
        NonMaxSuppression keeps, a Reshape to a shape computed from data, a branch or a loop, and
        everything after them): two trial runs that happen to agree on such a size prove nothing, so it
        stays free."""
        return self._shaped_by_values(VALUE_SHAPED_OPS)

    @cached_property
    def _rows_follow_values(self) -> set[str]:
        """As ``_value_shaped``, less what follows a branch or a loop alone: their outputs keep the shapes
        their bodies give (a batch among them), which trial runs measure like any other."""
        return self._shaped_by_values(VALUE_SHAPED_OPS - CONTROL_FLOW_OPS)

    def _shaped_by_values(self, sources: frozenset[str]) -> set[str]:
        data = set(self.inputs)  # values that follow the inputs' values
        shaped: set[str] = set()
        for p, n in enumerate(self.nodes):
            ins = self.node_ins[p]
            if n.op_type in ("Shape", "Size"):
                value_dependent = bool(ins) and ins[0] in shaped
            else:
                value_dependent = any(i in data for i in ins)
            shape_from = [
                i for k, i in enumerate(n.input) if i and k not in _DATA_INPUTS.get(n.op_type, (0,))
            ]
            if (
                n.op_type in sources
                or any(i in shaped for i in ins)
                or (n.op_type in SHAPE_INPUT_OPS and any(i in data for i in shape_from))
            ):
                shaped.update(o for o in n.output if o)
            if value_dependent:
                data.update(o for o in n.output if o)
        return shaped

    @cached_property
    def _batch_only(self) -> bool:
        return all(
            all(isinstance(d, int) for d in (self.info[i].dims or [None])[1:])
            for i in self.inputs
            if i in self.info
        )

    def is_tensor(self, name: str) -> bool:
        """Whether ``name`` is a tensor (a sequence or a map, e.g. SplitToSequence's output, cannot cross a
        cut: no codec carries it). A value inference could not type is run once to find out."""
        if name not in self.non_tensor and (name in self.info or name in self.initializers):
            return True
        if name not in self.non_tensor:
            self._measure_shapes()
        return name not in self.non_tensor and name in self.info

    def read_inputs(self) -> list[str]:
        """The model inputs a node reads: what a server-only plan sends. An input nothing reads (an export's
        leftover) went over the link for nothing, and was counted as sent; one the model returns as it is
        the edge answers, as in every plan."""
        return [t for t in self.inputs if self.consumers.get(t)]

    def untyped(self) -> list[str]:
        """The node outputs neither inference nor the trial run typed (it failed): no cut can cross them.
        Read after the trial run; it starts none."""
        return [
            o for n in self.nodes for o in n.output if o and o not in self.info and o not in self.non_tensor
        ]

    def carried(self, name: str) -> bool:
        """Whether ``name`` can cross a cut: a tensor of a type a codec carries (not a sequence or a map,
        nor bfloat16, strings, ...: onnxruntime returns no numpy array for some, no payload holds others)."""
        return self.is_tensor(name) and self.tensor(name).dtype in CARRIED_DTYPES

    def tensor(self, name: str) -> TensorInfo:
        t = self.info.get(name)
        if t is None or not self.resolved(t):
            self._measure_shapes()
            t = self.info.get(name)
        if t is None:
            raise ModelError(
                f"could not determine the type of tensor {name!r} (shape inference and a trial run failed)"
            )
        return t

    def _measure_shapes(self) -> None:
        """Fill the types and shapes static inference missed (custom-domain ops, Loop outputs, a Reshape
        to a computed shape) by running the model twice with every such tensor exposed: at batch 1 and 2
        where the batch is free, else twice at its fixed shape with different inputs. Dims that differ
        stay free; a leading one that doubles with the batch is the batch (times its rows per sample)."""
        if getattr(self, "_measured", False):
            return
        self._measured = True
        missing = [
            o
            for n in self.nodes
            for o in n.output
            if o and o not in self.non_tensor and (o not in self.info or not self.resolved(self.info[o]))
        ]
        if not missing:
            return
        import onnxruntime as ort

        m = onnx.ModelProto()
        m.CopyFrom(self.model)
        # what the file declares for the tensors exposed is what went unresolved: a stale static shape
        # there (traced at another input) made onnxruntime refuse the run, and every such tensor unknown
        del m.graph.value_info[:]
        del m.graph.output[:]
        m.graph.output.extend([helper.make_empty_tensor_value_info(n) for n in missing])
        from splitpoint.core.samples import sample_feeds

        try:
            so = ort.SessionOptions()
            so.log_severity_level = 4  # best effort: a failure here is the caller's to report
            sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
            leads = [not isinstance(i.shape[0], int) for i in sess.get_inputs() if i.shape]
            runs = [sess.run(missing, sample_feeds(self.model, 1, 0))]
            free_batch = all(leads) or self.batch_symbol is not None
            if free_batch:
                # at batch 2 where the first input's batch is free, beside an input of a fixed size too (an
                # LSTM's [25] state, a [1] bias): runs at batch 1 alone took an axes-less Squeeze's [N] for
                # a scalar, and the plan refused every batch of 2 it was sent; where such an input does not
                # take a batch of 2, the runs are at batch 1 as before
                try:
                    runs.append(sess.run(missing, sample_feeds(self.model, 2, 1)))
                except Exception:
                    if all(leads):
                        raise
                    free_batch = False
            if not free_batch:
                runs.append(sess.run(missing, sample_feeds(self.model, 1, 1)))
        except Exception as exc:  # best effort: callers report the tensor that stays unknown, and why
            self.trial_error = clipped(first_line(exc), 400)
            return
        batch = self.batch_symbol or "N"
        for name, a, b in zip(missing, *runs, strict=True):
            if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)):
                self.non_tensor.add(name)  # a sequence or a map, returned as a list or a dict
                continue
            self.info[name] = _measured_info(
                name,
                self.info.get(name),
                a,
                b,
                batch if free_batch else None,
                name in self._rows_follow_values,
            )
            _mark_batch_axis(self.info[name], self.batch_symbol)


def _mark_batch_axis(t: TensorInfo, batch: str | None) -> None:
    """Where the batch is not a tensor's leading dim but its only symbol (``batch_axis``)."""
    symbols = [k for k, d in enumerate(t.dims or ()) if isinstance(d, str)]
    if batch is not None and len(symbols) == 1 and symbols[0] > 0 and t.dims and t.dims[symbols[0]] == batch:
        t.batch_axis = symbols[0]


def _measured_info(
    name: str,
    inferred: TensorInfo | None,
    a: np.ndarray,
    b: np.ndarray,
    batch: str | None,
    value_shaped: bool = False,
) -> TensorInfo:
    """A tensor's type from two trial runs: ``a`` at batch 1 and ``b`` at batch 2 where the batch (named
    ``batch``) is free, else two samples at the fixed shape. What inference knew for sure stays: numbers
    and the inputs' own symbols. A leading dim that doubles with the batch is the batch times its rows per
    sample (``batch*16``: a [batch·seq, hidden] reshape), another that goes from 1 to 2 is the batch; any
    other dim that differs stays free. Where the shape may follow the input's values (``value_shaped``:
    after NonZero, Compress, NonMaxSuppression...) a size the runs agree on proves nothing (both kept no
    row, or every row) and stays free, each its own: a plan fixed the rows its trial happened to keep, and
    refused every request that kept another number."""
    elem = helper.np_dtype_to_tensor_dtype(a.dtype)
    if a.ndim != b.ndim:  # a rank that follows the batch (an axes-less Squeeze): no shape fits both runs
        return TensorInfo(name, elem, None)
    known = inferred.dims if inferred is not None and inferred.dims and len(inferred.dims) == a.ndim else None
    dims: list[int | str | None] = []
    rows = 1
    for k, (da, db) in enumerate(zip(a.shape, b.shape, strict=True)):
        kept = known[k] if known is not None else None
        if isinstance(kept, int) or (kept is not None and kept == batch):
            dims.append(kept)
        elif value_shaped:
            dims.append(None)
        elif da == db:
            dims.append(int(da))
        elif k == 0 and batch is not None and db == 2 * da:
            rows = int(da)
            dims.append(batch if rows == 1 else f"{batch}*{rows}")
        elif batch is not None and (da, db) == (1, 2):
            # the batch further in (attention's [3, batch, heads, tokens, size] after a permute): it kept
            # inference's invented symbol, and the cut's bytes per sample read as unknown
            dims.append(batch)
        else:
            dims.append(kept if isinstance(kept, str) else f"d{k}")
    lead = bool(dims) and batch is not None and isinstance(dims[0], str) and dims[0].split("*")[0] == batch
    return TensorInfo(name, elem, dims, rows, lead_is_batch=lead)


def _toposort(nodes: list, available: set[str]) -> list:
    """Kahn's algorithm, stable with respect to the file's order (which ONNX requires to be
    topological already; this also accepts files that are not)."""
    ins = [set(node_inputs(n)) for n in nodes]
    produced = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    waiting = [len({x for x in s if x in produced and x not in available}) for s in ins]
    users = defaultdict(list)
    for i, s in enumerate(ins):
        for x in s:
            if x in produced:
                users[produced[x]].append(i)
    import heapq

    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        stuck = [nodes[i].name or nodes[i].op_type for i in range(len(nodes)) if waiting[i] > 0][:5]
        raise ModelError(f"graph has a cycle or a missing tensor; nodes that never become ready: {stuck}")
    return [nodes[i] for i in order]


def _without_declared_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with no value_info and no shapes on the graph outputs: exporters leave stale ones there
    (a shape traced for one input, declared static), and shape inference would trust them. Its large
    weights are stubs: it is for shape inference only."""
    m = with_stubs(model)  # inference reads the weights' types and shapes only, never their values
    del m.graph.value_info[:]
    # an output that is a graph input or a weight is no computed value: its shape is the input's (a
    # shapeless copy of it made inference lose the input's shape, and with it every shape downstream)
    given = {i.name for i in m.graph.input} | {t.name for t in m.graph.initializer}
    for o in m.graph.output:
        if o.type.HasField("tensor_type") and o.name not in given:
            o.type.tensor_type.ClearField("shape")
    return m


def _infer_types(model: onnx.ModelProto) -> tuple[dict[str, TensorInfo], set[str], dict[str, TensorInfo]]:
    """Types and shapes inferred from the graph itself, and the values inferred to be no tensor (sequences,
    maps, optionals); what inference cannot tell stays unknown and is measured by a trial run when a cut
    needs it (``GraphIndex.tensor``)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(
            _without_declared_shapes(model), check_type=False, strict_mode=False, data_prop=True
        )
    except Exception:  # inference is best effort; missing shapes are measured per tensor later
        inferred = _without_declared_shapes(model)
    g = inferred.graph
    out: dict[str, TensorInfo] = {}
    others: set[str] = set()
    for vi in list(g.output) + list(g.value_info) + list(g.input):  # a graph input's own entry last
        ti = _tensor_info(vi)
        if ti is not None:
            out[vi.name] = ti
        elif vi.type.WhichOneof("value") not in (None, "tensor_type"):
            others.add(vi.name)
    for t in model.graph.initializer:
        out[t.name] = TensorInfo(t.name, t.data_type, list(t.dims))
    bodies = _body_types(g)
    with contextlib.suppress(Exception):  # best effort, as above: a body left untyped counts no work
        _reinfer_loop_bodies(inferred, out, bodies)
    return out, others, bodies


def _reinfer_loop_bodies(model: onnx.ModelProto, outer: dict[str, TensorInfo], bodies: dict) -> None:
    """Shape inference leaves a Loop body's carried values untyped where the body declares none (exporters
    and onnx.helper often do): infer the body again as a graph of its own, its carried inputs typed as
    the Loop's initial values and the outer values it reads as inputs of theirs."""
    for n in model.graph.node:
        if n.op_type != "Loop":
            continue
        body = next(
            (a.g for a in n.attribute if a.name == "body" and a.type == onnx.AttributeProto.GRAPH), None
        )
        if body is None:
            continue
        g = onnx.GraphProto()
        g.CopyFrom(body)
        for vi, src in zip(g.input[2:], n.input[2:], strict=False):
            t = outer.get(src)
            if t is not None and t.dims is not None and vi.type.HasField("tensor_type"):
                vi.CopyFrom(onnx.helper.make_tensor_value_info(vi.name, t.elem_type, t.dims))
        local = {i.name for i in g.input} | {t.name for t in g.initializer}
        local |= {o for m in g.node for o in m.output}
        read = {i for m in g.node for i in node_inputs(m) if i and i not in local}
        for name in sorted(read):
            t = outer.get(name)
            if t is not None and t.dims is not None:
                g.input.append(onnx.helper.make_tensor_value_info(name, t.elem_type, t.dims))
        del g.value_info[:]
        m = onnx.helper.make_model(g, opset_imports=model.opset_import, ir_version=model.ir_version)
        typed = onnx.shape_inference.infer_shapes(m, check_type=False, strict_mode=False, data_prop=True)
        for vi in list(typed.graph.input) + list(typed.graph.value_info) + list(typed.graph.output):
            ti = _tensor_info(vi)
            if ti is not None and ti.dims is not None and vi.name not in outer:
                bodies[vi.name] = ti


def _body_types(g: onnx.GraphProto) -> dict[str, TensorInfo]:
    """The types inference gave the tensors inside control-flow bodies (at any depth), to count the work
    a Loop, If or Scan does: kept apart from the main graph's, which cuts are made of."""
    out: dict[str, TensorInfo] = {}
    for n in g.node:
        for a in n.attribute:
            for body in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                for vi in list(body.input) + list(body.value_info) + list(body.output):
                    ti = _tensor_info(vi)
                    if ti is not None:
                        out.setdefault(vi.name, ti)
                for t in body.initializer:
                    out.setdefault(t.name, TensorInfo(t.name, t.data_type, list(t.dims)))
                for k, v in _body_types(body).items():
                    out.setdefault(k, v)
    return out
