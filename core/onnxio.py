"""Loading and saving ONNX models with errors that name the problem.

onnx.load raises bare protobuf DecodeErrors (or nothing at all, for some truncations), which
tell a user little. Everything that reads a user's model goes through ``load_model`` here.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import stat
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError, EncodeError

from .errors import ModelError, first_line
from .subgraphs import node_inputs
from .weights import (
    nbytes,
    serialized_with_weights,
    stubbed_bytes,
    weights_as_inputs,
    with_stubs,
    with_weights,
)

# Protobuf refuses to serialise a single message above 2 GiB; larger models need external data.
_PROTOBUF_LIMIT = 2**31 - 1
_MARGIN = 256 * 2**20  # room for everything but the weights' data, and for string tensors


def _over_protobuf_limit(model: onnx.ModelProto, stubbed: int = 0) -> bool:
    """Whether the serialised model, with ``stubbed`` bytes of weights filled in, passes protobuf's
    limit. ``ByteSize`` serialises to count (~0.2 s per 250 MB), so the weights are sized from their
    shapes and it runs only near the limit."""
    weights = stubbed
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL and t.data_type != onnx.TensorProto.STRING:
            weights += nbytes(t)
    if weights <= _PROTOBUF_LIMIT - _MARGIN:
        return False
    if weights > _PROTOBUF_LIMIT:
        return True  # and ByteSize would fail: upb's protobuf cannot serialise past the limit to count
    try:
        return model.ByteSize() + stubbed > _PROTOBUF_LIMIT
    except EncodeError:  # past it after all (the rest of the model)
        return True


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_model(path: str | Path, check: bool = True) -> onnx.ModelProto:
    """Load a model (external data included) and run the checker, raising ModelError on any fault."""
    return load_model_and_digest(path, check)[0]


def load_model_and_digest(
    path: str | Path, check: bool = True, input_shapes: Mapping[str, list[int]] | None = None
) -> tuple[onnx.ModelProto, str, bool]:
    """``load_model``, the sha256 of the model file, from one read of it, and whether its nodes were put
    in order (``sort_nodes``: the file's order is then not the model's). The checker is given the bytes
    read where the model in memory is exactly them (no external data, nodes in order): serialising a
    100 MB model again for the checker took longer than the checker. ``input_shapes`` (``--input-shape``)
    give the rank of an input the file declares without a shape (``complete_interface``)."""
    p = Path(path)
    if not p.exists():
        raise ModelError(f"model file not found: {p}")
    if not p.is_file():
        raise ModelError(f"model path is not a file: {p}")
    if p.stat().st_size == 0:
        raise ModelError(f"model file is empty: {p}")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read the model file: {exc}") from exc
    with ThreadPoolExecutor(1) as pool:  # hashlib lets go of the GIL: the digest costs no wall time
        digest = pool.submit(sha256_bytes, data)
        model, reordered = _parse_and_check(p, data, check, input_shapes or {})
        return model, digest.result(), reordered


def _parse_and_check(
    p: Path, data: bytes, check: bool, input_shapes: Mapping[str, list[int]]
) -> tuple[onnx.ModelProto, bool]:
    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, RuntimeWarning, ValueError) as exc:
        raise ModelError(f"not a valid ONNX file (protobuf decode failed: {exc}): {p}") from exc
    except Exception as exc:  # onnx raises assorted types for garbage input
        raise ModelError(f"not a valid ONNX file ({type(exc).__name__}: {exc}): {p}") from exc
    if not model.graph.node and not model.graph.output:
        # protobuf happily decodes many non-ONNX byte strings into an empty message
        raise ModelError(f"not an ONNX model (no graph nodes or outputs decoded): {p}")
    if not model.opset_import:
        raise ModelError(f"not an ONNX model (no opset_import; file truncated or not ONNX?): {p}")
    external = False
    try:
        from onnx.external_data_helper import load_external_data_for_model, uses_external_data

        external = any(uses_external_data(t) for t in model.graph.initializer)
        if external:
            load_external_data_for_model(model, str(p.parent))
    # missing (OSError, or the checker's error), or outside the model's folder (the checker's)
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise ModelError(f"cannot load the model's external data next to {p}: {exc}") from exc
    densified = densify_sparse(model.graph, str(p))
    modernised = ir3_weights(model)
    renamed = rename_duplicate_nodes(model.graph)
    reordered = sort_nodes(model.graph, str(p))
    completed = complete_interface(model, input_shapes, str(p))
    if check:
        changed = external or reordered or completed or densified or modernised or renamed
        check_model(model, where=str(p), as_read=None if changed else data)
    return model, reordered


# IR 4 stopped requiring every initializer to be listed as a graph input
IR_WEIGHTS_NOT_INPUTS = 4
# the IR version of every model SplitPoint builds itself (the zoo, codec casts, bench probes), not onnx's
# newest: onnx 1.23 writes IR 14, which onnxruntime reads only from 1.31, and this is read by all it supports
BUILT_IR_VERSION = 8


def ir3_weights(model: onnx.ModelProto) -> bool:
    """What an IR 3 file's weights lack for the checker, where onnxruntime runs the file all the same: a
    weight listed as an input with no type or shape gets the initializer's, and an initializer that is
    not listed (``onnx.version_converter`` adds such constants and keeps IR 3) makes the model IR 4, the
    version that allows it. Both were refused as failing the checker, naming no way forward. Whether
    anything changed."""
    g = model.graph
    weights = {t.name: t for t in g.initializer}
    changed = False
    for i in g.input:
        t = weights.get(i.name)
        tt = i.type.tensor_type
        if t is not None and (not tt.elem_type or not tt.HasField("shape")):
            i.type.CopyFrom(onnx.helper.make_tensor_type_proto(t.data_type, list(t.dims)))
            changed = True
    if model.ir_version < IR_WEIGHTS_NOT_INPUTS and set(weights) - {i.name for i in g.input}:
        model.ir_version = IR_WEIGHTS_NOT_INPUTS
        changed = True
    return changed


def free_dim(name: str, k: int, batch_shared: bool = True) -> str:
    """The symbol for dimension ``k`` of value ``name`` where the file gives it no size and no name of
    its own: ``N`` for an input's leading one (the batch, which the inputs share), else ``NAME_dimK``,
    this value's alone. Error messages recognise these and speak of "dim K" instead."""
    return "N" if batch_shared and k == 0 else f"{name}_dim{k}"


def complete_interface(model: onnx.ModelProto, input_shapes: Mapping[str, list[int]], where: str) -> bool:
    """Give the graph's inputs and outputs declared without a shape one, in place; whether any was.

    The ONNX checker requires every graph input and output to declare a shape (of unknown sizes at
    least), but onnxruntime runs a file without them, and ``helper.make_tensor_value_info(name, type,
    None)`` writes an output so. An output's type and shape come from shape inference; an input's rank
    only the user knows: from ``--input-shape`` (its sizes are applied with the others'), or an error
    that asks for it."""
    g = model.graph
    weights = {t.name for t in g.initializer}
    changed = False
    for vi in g.input:
        t = vi.type.tensor_type
        if vi.name in weights or not vi.type.HasField("tensor_type") or t.HasField("shape"):
            continue
        want = input_shapes.get(vi.name)
        if want is None:
            raise ModelError(
                f"{where}: input {vi.name!r} declares no shape, not even its number of dimensions: give "
                f"--input-shape {vi.name}:DIMxDIM… (e.g. {vi.name}:1x3x224x224; N keeps the batch free)"
            )
        for k in range(len(want)):  # symbols: apply_input_shapes puts the sizes given in their place
            t.shape.dim.add().dim_param = free_dim(vi.name, k)
        changed = True
    bare = [
        o
        for o in g.output
        if not o.HasField("type")
        or (
            o.type.HasField("tensor_type")
            and not (o.type.tensor_type.HasField("shape") and o.type.tensor_type.elem_type)
        )
    ]
    if bare:
        try:
            inferred = onnx.shape_inference.infer_shapes(with_stubs(model))
        except Exception as exc:  # onnx raises assorted types: the reason is reported
            why = first_line(exc)
            raise ModelError(
                f"{where}: output {bare[0].name!r} declares no shape, and shape inference fails: {why}"
            ) from exc
        found = {o.name: o for o in inferred.graph.output}
        for o in bare:
            got = found.get(o.name)
            if (
                got is None
                or not got.type.tensor_type.HasField("shape")
                or not got.type.tensor_type.elem_type
            ):
                raise ModelError(
                    f"{where}: output {o.name!r} declares no type or shape, and shape inference cannot tell "
                    "them: declare them in the file (e.g. helper.make_tensor_value_info(name, type, dims))"
                )
            o.type.CopyFrom(got.type)
        changed = True
    return changed


def densify_sparse(graph: onnx.GraphProto, where: str) -> bool:
    """Turn the graph's sparse initializers into dense ones, in place. Every cut, weight count and
    extracted segment reads ``graph.initializer``: a sparse weight was invisible to them (its name read
    as an unknown tensor, a segment that used it failed the checker). Dense, it is one weight like the
    others, and onnxruntime runs both alike. Whether any was turned."""
    if not graph.sparse_initializer:
        return False
    from onnx import numpy_helper

    for sp in graph.sparse_initializer:
        name, dims = sp.values.name, tuple(sp.dims)
        try:
            values = numpy_helper.to_array(sp.values)
            size = int(np.prod(dims, dtype=np.int64)) * values.dtype.itemsize
            if size > _PROTOBUF_LIMIT:
                raise ModelError(
                    f"{where}: sparse initializer {name!r} is {size / 2**30:.1f} GiB dense; SplitPoint keeps "
                    "weights dense: store it as a dense initializer with external data"
                )
            dense = np.zeros(dims, values.dtype)
            at = numpy_helper.to_array(sp.indices).astype(np.int64)
            if at.ndim == 1:  # linearised positions
                dense.reshape(-1)[at] = values.reshape(-1)
            else:  # one row of coordinates per value
                dense[tuple(at.T)] = values.reshape(-1)
        except (ValueError, IndexError, TypeError) as exc:
            raise ModelError(
                f"{where}: sparse initializer {name!r} does not fit its shape {list(dims)}: {exc}"
            ) from exc
        graph.initializer.append(numpy_helper.from_array(dense, name))
    del graph.sparse_initializer[:]
    return True


def sort_nodes(graph: onnx.GraphProto, where: str = "the model") -> bool:
    """Put a graph's nodes in an order where each comes after what it reads, keeping the given order
    wherever it is one already. The ONNX standard asks for that order and the checker refuses a graph
    without it, but onnxruntime runs such graphs and hand-edited or merged models arrive so. A graph
    that no order fixes (a tensor nobody produces, a cycle) is refused naming the cause: the checker
    calls both an ordering problem, which this would have mended."""
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    known |= {t.values.name for t in graph.sparse_initializer}  # a sparse tensor's name is its values'
    needs = [set(node_inputs(n)) for n in graph.node]
    done = set(known)
    for i, n in enumerate(graph.node):
        if not needs[i] <= done:
            break
        done.update(n.output)
    else:
        return False  # in order already: left exactly as it is
    # the first node whose input is not ready yet is taken when it is: each pass takes, in the given
    # order, every node whose inputs are made, so an ordered stretch keeps its order
    done, order, pending = set(known), [], list(range(len(graph.node)))
    while pending:
        taken = []
        for i in pending:
            if needs[i] <= done:
                done.update(graph.node[i].output)
                taken.append(i)
        if not taken:
            raise ModelError(_unorderable(graph, [graph.node[i] for i in pending], done, where))
        order += taken
        gone = set(taken)
        pending = [i for i in pending if i not in gone]
    nodes = [graph.node[i] for i in order]
    del graph.node[:]
    graph.node.extend(nodes)
    return True


def drop_unused(graph: onnx.GraphProto) -> bool:
    """Remove, in place (``graph`` in order), the nodes whose results no graph output uses and the
    weights no remaining node reads; whether any went. They change no answer, but a cut was offered
    whose tail (or head, or middle stage) held only such nodes, which onnxruntime refuses (a part that
    returns nothing), and a session given a weight no node reads fails to find it. A weight the graph
    also lists as an input (overridable) stays."""
    live = {o.name for o in graph.output}
    keep = [False] * len(graph.node)
    for i in range(len(graph.node) - 1, -1, -1):
        n = graph.node[i]
        if any(o in live for o in n.output if o):
            keep[i] = True
            live.update(node_inputs(n))
    listed = {i.name for i in graph.input}
    weights = [t for t in graph.initializer if t.name in live or t.name in listed]
    if all(keep) and len(weights) == len(graph.initializer):
        return False
    nodes = [n for n, k in zip(graph.node, keep, strict=True) if k]
    del graph.node[:]
    graph.node.extend(nodes)
    if len(weights) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(weights)
    return True


def rename_duplicate_nodes(graph: onnx.GraphProto) -> bool:
    """Give a node whose name an earlier node has a name of its own (``name__2``), in place; whether any
    was renamed. onnxruntime refuses a graph in which two compute nodes share a name (the checker does
    not, and a split's session failed after the cuts were listed), and the profiler tells nodes by name;
    a converter may reuse one for Constant nodes (silero-vad's OpenVINO export names 15 of them
    ``F0::anon``), which was refused too. A node's name does not change what it computes."""
    taken = {n.name for n in graph.node if n.name}
    seen: set[str] = set()
    renamed = False
    for n in graph.node:
        if not n.name:
            continue
        if n.name in seen:
            k = 2
            while f"{n.name}__{k}" in taken:
                k += 1
            n.name = f"{n.name}__{k}"
            taken.add(n.name)
            renamed = True
        seen.add(n.name)
    return renamed


def _unorderable(graph: onnx.GraphProto, stuck: list, done: set[str], where: str) -> str:
    """Why no order runs ``stuck`` (the nodes never ready): a tensor nothing gives, else a cycle."""

    def shown(n) -> str:
        return f"{n.name!r} ({n.op_type})" if n.name else n.op_type

    made = {o for n in graph.node for o in n.output}
    for n in stuck:
        missing = [x for x in node_inputs(n) if x not in done and x not in made]
        if missing:
            return (
                f"{where}: node {shown(n)} reads {missing[0]!r}, which no node, graph input or initializer "
                "gives (a tensor lost in an edit or a merge)"
            )
    # the nodes waiting only on the cycle's outputs are not in it: drop, repeatedly, any whose outputs no
    # other stuck node reads
    ring = list(stuck)
    while True:
        read = {x for n in ring for x in node_inputs(n)}
        kept = [n for n in ring if any(o in read for o in n.output)]
        if len(kept) == len(ring):
            break
        ring = kept
    ring = ring or stuck
    names = ", ".join(shown(n) for n in ring[:5]) + (f" and {len(ring) - 5} more" if len(ring) > 5 else "")
    return f"{where}: nodes {names} read each other's outputs in a cycle: no order runs them"


def check_model(
    model: onnx.ModelProto,
    where: str = "model",
    full: bool = False,
    weights: bool = True,
    as_read: bytes | None = None,
) -> None:
    """The ONNX checker (``full``: with strict shape inference). ``weights=False`` leaves out the large
    weights' data (their types and shapes are still checked): for parts cut from a model whose weights
    ``load_model`` checked already. ``as_read``: the bytes ``model`` was parsed from, checked as they are
    instead of serialising the model again."""
    try:
        aside = _runtime_ops(model)
        if as_read is not None and not aside:
            if len(as_read) < onnx.checker.MAXIMUM_PROTOBUF:
                onnx.checker.check_model(as_read, full_check=full)
            return
        if not weights:
            model = weights_as_inputs(model)
        if _over_protobuf_limit(model):
            return  # the in-memory checker cannot take >2 GiB protos; checked on the saved file instead
        with _set_aside(model, aside):
            onnx.checker.check_model(model, full_check=full)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        # the checker's report runs over lines (a node printed in the middle of a sentence): all of it
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise ModelError(f"{where} fails the ONNX checker: {text[:500]}") from exc


_ASIDE_DOMAIN = "splitpoint.onnxruntime-ops"


@functools.cache
def _onnxruntime_default_domain_ops() -> dict[str, int]:
    """Ops onnxruntime registers in ONNX's own domain, each with the first opset it has one from
    (SimplifiedLayerNormalization, 1: onnxruntime-genai's model builder writes it so; LayerNormalization,
    1, where ONNX's begins at 17)."""
    try:
        from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema

        first: dict[str, int] = {}
        for s in get_all_operator_schema():
            if s.domain in ("", "ai.onnx"):
                first[s.name] = min(first.get(s.name, s.since_version), s.since_version)
        return first
    except (ImportError, AttributeError):  # a build without the schemas: the checker decides alone
        return {}


def _runtime_ops(model: onnx.ModelProto) -> frozenset[str]:
    """The op types of the top graph's nodes of ONNX's domain that ONNX does not define at the model's
    opset and onnxruntime runs (its LayerNormalization below opset 17, where ONNX's begins)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    unknown = {
        n.op_type
        for n in model.graph.node
        if n.domain in ("", "ai.onnx") and not _onnx_defines(n.op_type, opset)
    }
    runtime = _onnxruntime_default_domain_ops()
    if not opset or not unknown or any(runtime.get(op, opset + 1) > opset for op in unknown):
        return (
            frozenset()
        )  # none, or one neither defines at this opset (a Gelu at 11): the checker's words stand
    return frozenset(unknown)


@functools.cache
def _onnx_defines(op: str, opset: int) -> bool:
    try:
        onnx.defs.get_schema(op, opset, "")
    except onnx.defs.SchemaError:
        return False
    return True


@contextlib.contextmanager
def _set_aside(model: onnx.ModelProto, ops: frozenset[str]) -> Iterator[None]:
    """The checker checks every other node while the nodes of ``ops`` (ONNX's domain) sit in a domain of
    their own (it checks no unknown domain's ops): a model onnxruntime runs is not refused for an op only
    onnxruntime defines. ``model`` may be a copy of the one ``ops`` were found in."""
    nodes = [n for n in model.graph.node if n.domain in ("", "ai.onnx") and n.op_type in ops]
    if not nodes:
        yield
        return
    domains = [n.domain for n in nodes]
    for n in nodes:
        n.domain = _ASIDE_DOMAIN
    model.opset_import.append(onnx.helper.make_opsetid(_ASIDE_DOMAIN, 1))
    try:
        yield
    finally:
        for n, d in zip(nodes, domains, strict=True):
            n.domain = d
        del model.opset_import[len(model.opset_import) - 1]


def save_model(model: onnx.ModelProto, path: str | Path) -> None:
    """Save, switching to external data when the proto would exceed protobuf's 2 GiB limit."""
    p = Path(path)
    if _over_protobuf_limit(model):
        onnx.save_model(
            model,
            str(p),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=p.name + ".data",
            size_threshold=1024,
        )
        # onnx creates it 0600: a server or edge daemon running as another user could not read the plan.
        # The model file's own mode (reading the umask sets it for a moment, under other threads' writes)
        os.chmod(p.with_name(p.name + ".data"), stat.S_IMODE(p.stat().st_mode))
    else:
        onnx.save_model(model, str(p))


def save_and_hash(
    models: Mapping[str, onnx.ModelProto],
    directory: Path,
    weights: Callable[[str], np.ndarray] | None = None,
) -> dict[str, str]:
    """Save each model under its file name in ``directory``, its stubs filled from ``weights``
    (``core/weights.py``); the sha256 of every file there after (a model's external data included), by
    name. A model's bytes are hashed while they are written, from memory (hashlib and file writes let
    go of the GIL): hashing AlexNet's 244 MB of parts from the files after writing them cost as long
    again as writing them."""
    hashes: dict[str, Future] = {}
    writes: list[Future] = []
    with ThreadPoolExecutor(2) as pool:
        for name, model in models.items():
            path = directory / name
            stubbed = stubbed_bytes(model)
            if stubbed and weights is None:
                raise ModelError(f"{name}: its weights are shared stubs and no arrays were given for them")
            fill = weights if stubbed else None
            if _over_protobuf_limit(model, stubbed):
                save_model(with_weights(model, fill) if fill else model, path)
                continue  # with its external data, hashed from the files below
            pieces = serialized_with_weights(model, fill) if fill else [model.SerializeToString()]
            writes.append(pool.submit(_write_pieces, path, pieces))
            hashes[name] = pool.submit(_hash_pieces, pieces)
        for w in writes:
            w.result()  # a failed write raises here
    return {
        f.name: hashes[f.name].result() if f.name in hashes else sha256_file(f)
        for f in sorted(directory.iterdir())
    }


def _write_pieces(path: Path, pieces: list[bytes | memoryview]) -> None:
    with open(path, "wb") as f:
        for p in pieces:
            f.write(p)


def _hash_pieces(pieces: list[bytes | memoryview]) -> str:
    h = hashlib.sha256()
    for p in pieces:
        h.update(p)
    return h.hexdigest()


def model_bytes(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString()
