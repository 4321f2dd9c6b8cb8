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
- ``input_ids`` read only for its shape is fed, on the server, as zeros of that shape.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import onnx

from splitpoint.core.errors import ModelError
from splitpoint.core.kvcache import IDS, STANDARD_INPUTS
from splitpoint.core.onnxio import check_model

from .extract import _submodel
from .index import GraphIndex

PAST_RE = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
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
        raise ModelError(f"a decoder gives one output besides its presents (the logits), not {rest}")
    dims = idx.info[past(0, "key")].dims if past(0, "key") in idx.info else None
    if not dims or len(dims) != 4 or not isinstance(dims[1], int) or not isinstance(dims[3], int):
        raise ModelError(
            f"{past(0, 'key')}: expected [batch, heads, length, head size] with fixed heads, not {dims}"
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
    return None


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


def _closure(idx: GraphIndex, outputs: list[str], main: str, own: range) -> tuple[list[int], list[str]]:
    """The nodes a part needs to compute ``outputs`` from ``main``, the standard inputs and its own layers'
    caches, and its inputs in order; _NotSeparated if it needs anything else."""
    have = {main, *STANDARD_INPUTS, *(past(i, kind) for i in own for kind in ("key", "value"))}
    positions: set[int] = set()
    used: set[str] = set()
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
        if t in idx.initializers:
            continue
        p = idx.producer.get(t)
        if p is None:
            raise _NotSeparated(t)
        positions.add(p)
        node = idx.nodes[p]
        for i in idx.node_ins[p]:
            m = PAST_RE.match(i)
            if node.op_type == "Shape" and m and int(m[1]) not in own:
                used.add(past(own.start, m[2]))  # the same length, read off this part's own cache
            elif node.op_type == "Shape" and i == IDS and own.start > 0:
                used.add(IDS)  # fed as zeros of the new tokens' shape
            else:
                stack.append(i)
    order = [main, *(s for s in STANDARD_INPUTS if s in used)]
    if IDS in used and main != IDS:
        order.append(IDS)
    order += [past(i, kind) for i in own for kind in ("key", "value") if past(i, kind) in used]
    return sorted(positions), order


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
        positions, inputs = _closure(idx, outputs, main, own)
    except _NotSeparated as exc:
        raise ModelError(f"layers {first}..{last - 1} need {exc.args[0]!r}, which they do not hold") from None
    name = f"{idx.model.graph.name or 'decoder'}_layers_{first}_{last}"
    model = _submodel(idx, positions, inputs, outputs, name, shared_weights)
    for n in model.graph.node:  # shapes read off another part's cache read this part's own
        if n.op_type == "Shape" and (m := PAST_RE.match(n.input[0])) and int(m[1]) not in own:
            n.input[0] = past(first, m[2])
    check_model(model, where=f"decoder layers {first}..{last - 1}", full=True, weights=not shared_weights)
    return model
