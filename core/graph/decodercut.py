"""Where an exported decoder splits between layers, and its parts.

A decoder exported with onnxruntime-genai's names (``past_key_values.{i}.key``/``.value`` in,
``present.{i}.key``/``.value`` out) marks no layer boundaries. The boundary between layers k-1 and k is the
residual stream: the one tensor through which everything layers k and later need from the earlier layers
flows. It is found by walking back from the later layers' outputs, which must stop at it without reaching an
earlier layer's cache.

Exporters derive some tensors once for all layers: the causal mask from ``attention_mask`` and the past
length read off layer 0's cache, the positions. Each part recomputes them from what it has:
- ``attention_mask`` and ``position_ids`` are built on each side from its own cache length
  (``kvcache.step_feeds``);
- a shape read off another layer's cache reads the part's own first layer's cache instead (every layer's
  cache holds the same tokens);
- ``input_ids`` read only for its shape is fed, on the server, as zeros of that shape;
- an earlier activation's shape (transformers shapes the final hidden state from the embedding's) is
  rebuilt from tensors the part holds: static dimensions as constants, symbolic ones from an input with
  the same symbol.
Whatever is cut, the split is checked against the whole model before a plan is written (``decoders``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import onnx

from splitpoint.core.errors import ModelError
from splitpoint.core.kvcache import IDS, STANDARD_INPUTS
from splitpoint.core.onnxio import check_model
from splitpoint.core.plan import PAST_RE
from splitpoint.core.samples import VALUE_MOVING_OPS

from .extract import _submodel
from .index import GraphIndex

PRESENT_RE = re.compile(r"^present\.(\d+)\.(key|value)$")


def past(i: int, kind: str) -> str:
    return f"past_key_values.{i}.{kind}"


def present(i: int, kind: str) -> str:
    return f"present.{i}.{kind}"


@dataclass(frozen=True)
class DecoderLayout:
    """What the split needs to know of an exported decoder."""

    layers: int
    main_input: str  # token ids
    logits: str  # the output besides the caches
    kv_heads: int
    head_dim: int
    boundaries: tuple[str, ...]  # boundaries[k - 1]: the hidden state entering layer k, k = 1 .. layers-1
    max_len: int | None  # positions the model has, where a position table shows it


class _NotSeparated(Exception):
    pass


def decoder_layout(idx: GraphIndex) -> DecoderLayout:
    """The layout of ``idx``'s decoder, or ModelError saying what makes it unsplittable."""
    pasts: dict[int, set[str]] = {}
    others = []
    for name in idx.inputs:
        m = PAST_RE.match(name)
        if m:
            pasts.setdefault(int(m[1]), set()).add(m[2])
        elif name not in STANDARD_INPUTS:
            others.append(name)
    if not pasts:
        raise ModelError(
            "not a decoder with a KV cache: no past_key_values.{i}.key/value inputs "
            "(onnxruntime-genai's names)"
        )
    layers = max(pasts) + 1
    missing = [
        n
        for i in range(layers)
        for kind in ("key", "value")
        for n in (past(i, kind), present(i, kind))
        if n not in idx.inputs and n not in idx.outputs
    ]
    if missing:
        raise ModelError(
            f"a decoder needs every layer's past and present key and value; missing {missing[:4]}"
        )
    if layers < 2:
        raise ModelError("a decoder with one layer cannot be split between layers")
    if "use_cache_branch" in others:
        raise ModelError(
            "a merged decoder export (use_cache_branch: its layers live inside If branches) cannot be cut "
            "between layers: export the decoder with past (e.g. optimum's decoder_with_past_model.onnx)"
        )
    if others != [IDS]:
        raise ModelError(
            f"a decoder's inputs are input_ids, optionally {' and '.join(STANDARD_INPUTS)}, and the caches; "
            f"this one also takes {[o for o in others if o != IDS] or 'no input_ids'}"
        )
    rest = [o for o in idx.outputs if not PRESENT_RE.match(o)]
    if len(rest) != 1:
        raise ModelError(
            f"a decoder gives one output besides its presents (the logits), not {rest}: export it returning "
            "only the logits and the presents (or cut the others off the graph, e.g. with "
            "onnx.utils.extract_model keeping those outputs)"
        )
    logits = idx.info[rest[0]].dims if rest[0] in idx.info else None
    if logits is not None and len(logits) != 3:
        # the last position's alone ([batch, vocab]): every reader takes [0, -1], a single score, whose
        # argmax is always 0 (a fidelity of 1.000 measured on nothing)
        raise ModelError(
            f"{rest[0]}: expected logits [batch, sequence, vocab] (every new position's), not {logits}: "
            "export the logits of all positions"
        )
    dims = idx.info[past(0, "key")].dims if past(0, "key") in idx.info else None
    if dims and len(dims) == 4 and isinstance(dims[1], int) and not isinstance(dims[3], int):
        raise ModelError(
            f"{past(0, 'key')}: its head size (dimension 3 of [batch, heads, length, head size]) is the "
            f"symbol {dims[3]!r}, which could not be read off the model's attention: declare it in the "
            "file (e.g. with onnx.tools.update_model_dims.update_inputs_outputs_dims)"
        )
    if not dims or len(dims) != 4 or not isinstance(dims[1], int) or not isinstance(dims[3], int):
        raise ModelError(
            f"{past(0, 'key')}: expected [batch, heads, length, head size] with fixed heads, not {dims}"
        )
    fixed = [
        (n, d[0])
        for n in (IDS, past(0, "key"))
        if n in idx.info and (d := idx.info[n].dims) and isinstance(d[0], int) and d[0] != 1
    ]
    if fixed:
        raise ModelError(
            f"{fixed[0][0]} has its batch fixed at {fixed[0][1]}: a generation runs one sequence, so export "
            "the decoder with a batch of 1 or a dynamic one"
        )
    boundaries = tuple(_boundary(idx, k, layers, rest[0]) for k in range(1, layers))
    return DecoderLayout(layers, IDS, rest[0], dims[1], dims[3], boundaries, _positions(idx))


def _positions(idx: GraphIndex) -> int | None:
    """Rows of the table ``position_ids`` index (learned positions or a rotary cache), if one does."""
    for p in idx.consumers.get("position_ids", []):
        n = idx.nodes[p]
        if (
            n.op_type == "Gather"
            and len(n.input) > 1
            and n.input[1] == "position_ids"
            and n.input[0] in idx.initializers
        ):
            dims = idx.initializers[n.input[0]].dims
            if dims:
                return int(dims[0])
    # a rotary cache of one row per position, read inside onnxruntime's fused attention (onnxruntime-genai's
    # exports: GroupQueryAttention's cos_cache, input 7) or its RotaryEmbedding (input 2)
    for n in idx.nodes:
        at = _ROTARY_CACHE.get(n.op_type) if n.domain == "com.microsoft" else None
        if at is not None and len(n.input) > at and n.input[at] in idx.initializers:
            dims = idx.initializers[n.input[at]].dims
            if dims:
                return int(dims[0])
    return None


_ROTARY_CACHE = {"GroupQueryAttention": 7, "RotaryEmbedding": 2}


def _walk(idx: GraphIndex, starts: list[str], forward: bool) -> set[str]:
    seen: set[str] = set()
    stack = list(starts)
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        if forward:
            for p in idx.consumers.get(t, []):
                stack.extend(o for o in idx.nodes[p].output if o)
        else:
            p = idx.producer.get(t)
            if p is not None:
                stack.extend(i for i in idx.node_ins[p] if i)
    return seen


def _boundary(idx: GraphIndex, k: int, layers: int, logits: str) -> str:
    """The residual stream entering layer ``k``: downstream of layer k-1's cache, upstream of layer k's, and
    the only way from the earlier layers to the later ones. Of several, the latest: a separator inside
    layer k-1 (after its attention) would leave the rest of that layer to the tail."""
    after = _walk(idx, [past(k - 1, "key"), past(k - 1, "value")], forward=True)
    before = _walk(idx, [present(k, "key"), present(k, "value")], forward=False)
    candidates = sorted((t for t in after & before if t in idx.producer), key=idx.producer.__getitem__)
    # a hidden state is [batch, tokens, width] floats: those first (each try walks the later layers)
    likely = [c for c in candidates if _is_hidden_like(idx, c)]
    candidates = [c for c in candidates if c not in set(likely)] + likely
    outputs = [logits] + [present(j, kind) for j in range(k, layers) for kind in ("key", "value")]
    for c in reversed(candidates):
        try:
            _closure(idx, outputs, c, range(k, layers))
        except _NotSeparated:
            continue
        return c
    raise ModelError(
        f"no single tensor separates decoder layers 0..{k - 1} from {k}..{layers - 1}: the later layers "
        "read something of the earlier ones besides their hidden state"
    )


def _is_hidden_like(idx: GraphIndex, t: str) -> bool:
    info = idx.info.get(t)
    return (
        info is not None and info.dims is not None and len(info.dims) == 3 and info.dtype.startswith("float")
    )


def _stand_ins(idx: GraphIndex, main: str, own: range) -> dict[str, str]:
    """Inputs a part may read only the shape of, each with the input that stands in for it: the token ids
    (a later part: zeros of their shape, fed by the server) and another layer's cache (this part's first
    layer's, which holds as many tokens, where the two are declared alike)."""
    out = {IDS: IDS} if own.start > 0 and main != IDS else {}
    for name in idx.inputs:
        m = PAST_RE.match(name)
        if m and int(m[1]) not in own:
            mine = past(own.start, m[2])
            theirs, ours = idx.info.get(name), idx.info.get(mine)
            if theirs is not None and ours is not None and _alike(theirs.dims, ours.dims):
                out[name] = mine
    return out


def _alike(a: list | None, b: list | None) -> bool:
    """Two caches declared alike: the same rank, the same static sizes, and a symbol where the other has
    one. Whether two symbols are one size is not the file's to say: torch's ``Dim.AUTO`` names each
    cache's length apart (s42, s45, ...) though every layer holds the same tokens, and a split of such
    an export was refused as if its later layers read an earlier one's values."""
    if a is None or b is None or len(a) != len(b):
        return False
    return all(
        (x == y)
        if isinstance(x, int) and isinstance(y, int)
        else not (isinstance(x, int) or isinstance(y, int))
        for x, y in zip(a, b, strict=True)
    )


DimSource = tuple[str, int | str, int]  # ("const", value, 0) or ("shape", tensor, axis)


def _closure(
    idx: GraphIndex, outputs: list[str], main: str, own: range
) -> tuple[list[int], list[str], dict[int, list[DimSource]]]:
    """The nodes a part needs to compute ``outputs`` from ``main``, the standard inputs and its own layers'
    caches, its inputs in order, and the Shape nodes it replaces; _NotSeparated if it needs anything else.
    Exporters read lengths off tensors of other layers:
    - the token ids and layer 0's cache, read through a stand-in (``_stand_ins``), provided nothing in the
      part depends on their values;
    - an earlier activation's shape (e.g. the embedding's, to shape the final hidden state), rebuilt from
      the shapes of tensors the part holds: a static dimension as a constant, a symbolic one from an input
      with the same symbol, the batch from the main input's."""
    have = {main, *STANDARD_INPUTS, *(past(i, kind) for i in own for kind in ("key", "value"))}
    stand_ins = _stand_ins(idx, main, own)
    avail = have | set(stand_ins)
    positions: set[int] = set()
    used: set[str] = set()
    shape_read: set[str] = set()
    subs: dict[int, list[DimSource]] = {}
    memo: dict[str, bool] = {}
    known: dict[int | str | None, tuple[str, int]] | None = None
    seen: set[str] = set()
    stack = list(outputs)
    while stack:
        t = stack.pop()
        if t in seen or not t:
            continue
        seen.add(t)
        if t in have:
            used.add(t)
            continue
        if t in stand_ins:
            used.add(stand_ins[t])
            shape_read.add(t)
            continue
        if t in idx.initializers:
            continue
        p = idx.producer.get(t)
        if p is None:
            raise _NotSeparated(t)
        node = idx.nodes[p]
        if node.op_type == "Shape" and not _computable(idx, node.input[0], have, memo):
            if known is None:  # each symbol at its first place among the part's inputs, the main one first
                known = {}
                for n in [main, *(i for i in idx.inputs if i in avail)]:
                    for axis, d in enumerate((idx.info[n].dims or []) if n in idx.info else []):
                        known.setdefault(d, (n, axis))
            dims = _dim_sources(idx, node, main, known)
            if dims is not None:
                subs[p] = dims
                for kind, src, _ in dims:
                    if kind == "shape":
                        assert isinstance(src, str)
                        used.add(stand_ins.get(src, src))
                continue
        positions.add(p)
        stack.extend(i for i in idx.node_ins[p] if i)
    for t in shape_read:
        _check_shape_only(idx, positions, t)
    order = [main, *(s for s in STANDARD_INPUTS if s in used)]
    if IDS in used and main != IDS:
        order.append(IDS)
    order += [past(i, kind) for i in own for kind in ("key", "value") if past(i, kind) in used]
    return sorted(positions), order, subs


def _computable(idx: GraphIndex, t: str, avail: set[str], memo: dict[str, bool]) -> bool:
    """Whether ``t`` follows from ``avail`` and constants alone (stand-ins do not count: their values are
    not the real ones). ``memo`` keeps every tensor's answer for the part's later questions."""
    stack = [(t, False)]
    while stack:
        x, expanded = stack.pop()
        if x in memo:
            continue
        if not x or x in avail or x in idx.initializers:
            memo[x] = True
            continue
        p = idx.producer.get(x)
        if p is None:
            memo[x] = False
            continue
        ins = [i for i in idx.node_ins[p] if i]
        if expanded:
            memo[x] = all(memo[i] for i in ins)
        else:
            stack.append((x, True))
            stack.extend((i, False) for i in ins if i not in memo)
    return memo[t]


def _dim_sources(
    idx: GraphIndex, shape_node: onnx.NodeProto, main: str, known: dict[int | str | None, tuple[str, int]]
) -> list[DimSource] | None:
    """Where each dimension a Shape node reads can be had in a part that lacks its input (``known``: where
    each symbol is found among the tensors the part holds, the main input first), or None."""
    info = idx.info.get(shape_node.input[0])
    opset = next((o.version for o in idx.model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if info is None or info.dims is None or any(d is None for d in info.dims) or opset < 15:
        return None
    rank = len(info.dims)
    attrs = {a.name: a.i for a in shape_node.attribute}
    start, end = attrs.get("start", 0), attrs.get("end", rank)
    start, end = (start + rank if start < 0 else start), (end + rank if end < 0 else end)
    out: list[DimSource] = []
    for axis in range(max(0, start), min(rank, end)):
        d = info.dims[axis]
        if isinstance(d, int):
            out.append(("const", d, 0))
            continue
        found: DimSource | None = ("shape", *known[d]) if d in known else None
        if found is None and axis == 0 and rank >= 2:
            found = ("shape", main, 0)  # the batch, as every activation of a step has it (a wrong guess
            # fails the split's check against the whole model, whose prefill has more tokens than batch)
        if found is None:
            return None
        out.append(found)
    return out


def _shape_nodes(output: str, dims: list[DimSource], stand_ins: dict[str, str]) -> list[onnx.NodeProto]:
    """Nodes that compute a replaced Shape node's ``output`` from ``dims``."""
    nodes, parts = [], []
    for j, (kind, src, axis) in enumerate(dims):
        name = f"{output}__dim{j}"
        if kind == "const":
            value = onnx.helper.make_tensor(name, onnx.TensorProto.INT64, [1], [int(src)])
            nodes.append(onnx.helper.make_node("Constant", [], [name], value=value))
        else:
            src = stand_ins.get(str(src), str(src))
            nodes.append(onnx.helper.make_node("Shape", [src], [name], start=axis, end=axis + 1))
        parts.append(name)
    nodes.append(onnx.helper.make_node("Concat", parts, [output], axis=0))
    return nodes


def _check_shape_only(idx: GraphIndex, positions: set[int], source: str) -> None:
    """_NotSeparated unless the part's nodes read ``source`` only for its shape: through ops that move or
    cast values (a reshape, a one-input concat) to a Shape or Size."""
    tainted, stack = {source}, [source]
    while stack:
        t = stack.pop()
        for p in idx.consumers.get(t, []):
            if p not in positions:
                continue
            n = idx.nodes[p]
            if n.op_type in ("Shape", "Size"):
                continue
            moves = n.op_type in VALUE_MOVING_OPS and n.input[0] == t
            if moves or (n.op_type == "Concat" and len([i for i in n.input if i]) == 1):
                new = [o for o in n.output if o and o not in tainted]
                tainted.update(new)
                stack.extend(new)
                continue
            raise _NotSeparated(source)  # e.g. an embedding of the ids, attention over the cache


def decoder_part(
    idx: GraphIndex, layout: DecoderLayout, first: int, last: int, shared_weights: bool = False
) -> onnx.ModelProto:
    """Layers ``first`` to ``last - 1`` as a model: token ids (first = 0) or the hidden state entering
    ``first`` in, the hidden state leaving ``last - 1`` (or the logits) out, with those layers' caches."""
    if not 0 <= first < last <= layout.layers:
        raise ModelError(f"layers {first}..{last - 1} are not a part of a {layout.layers}-layer decoder")
    main = layout.main_input if first == 0 else layout.boundaries[first - 1]
    out = layout.logits if last == layout.layers else layout.boundaries[last - 1]
    own = range(first, last)
    outputs = [out] + [present(i, kind) for i in own for kind in ("key", "value")]
    try:
        positions, inputs, subs = _closure(idx, outputs, main, own)
    except _NotSeparated as exc:
        raise ModelError(f"layers {first}..{last - 1} need {exc.args[0]!r}, which they do not hold") from None
    name = f"{idx.model.graph.name or 'decoder'}_layers_{first}_{last}"
    model = _submodel(idx, positions, inputs, outputs, name, shared_weights)
    stand_ins = _stand_ins(idx, main, own)
    for n in model.graph.node:  # another layer's cache, read for its length: this part's own stands in
        for j, i in enumerate(n.input):
            if PAST_RE.match(i) and i in stand_ins:
                n.input[j] = stand_ins[i]
    rebuilt = [
        n for p, dims in sorted(subs.items()) for n in _shape_nodes(idx.nodes[p].output[0], dims, stand_ins)
    ]
    for n in reversed(rebuilt):  # they read the part's inputs only: first in the graph
        model.graph.node.insert(0, n)
    try:
        check_model(model, where=f"decoder layers {first}..{last - 1}", full=True, weights=not shared_weights)
    except ModelError as exc:
        if not idx.trial_error:
            raise
        # a part's interface declared without a shape: what neither inference nor a run could type
        raise ModelError(
            f"{exc} (shape inference cannot type the tensors between its layers, and onnxruntime could not "
            f"run the model on a random sample to measure them: {idx.trial_error})"
        ) from exc
    return model
