"""Concrete input shapes for models exported with symbolic dimensions (``images: [batch, 3, height, width]``).

A cut tensor's size, a profile's timings and a plan's files all depend on the input's height and width, so
SplitPoint works on the model with those dimensions fixed, as trtexec's ``--shapes`` and onnxsim's
``--overwrite-input-shape`` do. A leading symbolic dimension is the batch and may stay free; any other
unknown dimension must be given (``--input-shape images:1x3x640x640``), and its absence stops a command
before it does any work. ``N`` (or ``?``, ``-1``) for a dimension leaves it as exported: the batch of
``images:Nx3x640x640`` stays free while the height and width are fixed.
"""

from __future__ import annotations

import onnx

from ..errors import ModelError
from ..onnxio import free_dim
from ..plan import PAST_RE

InputShapes = dict[str, list[int]]
KEEP = -1  # a dimension left as the model declares it (N, ?, -1 on the command line)
_KEEP_TOKENS = ("n", "?", "-1")


def parse_input_shapes(specs: list[str] | tuple[str, ...] | None) -> InputShapes:
    """``["images:Nx3x640x640", ...]`` → ``{"images": [-1, 3, 640, 640]}`` (a name may hold ':'; N keeps
    a dimension as exported)."""
    shapes: InputShapes = {}
    for spec in specs or ():
        name, sep, dims = spec.rpartition(":")
        try:
            values = [KEEP if d in _KEEP_TOKENS else int(d) for d in dims.lower().split("x")]
        except ValueError:
            values = []
        if not sep or not name or not values or any(v < 0 and v != KEEP for v in values):
            raise ModelError(
                f"--input-shape {spec!r}: write NAME:DIMxDIM… (sizes of 0 or more, N to keep a dimension "
                "as exported), e.g. images:1x3x640x640 or images:Nx3x640x640"
            )
        if name in shapes:
            raise ModelError(f"--input-shape names {name!r} twice")
        shapes[name] = values
    return shapes


def _dims(vi: onnx.ValueInfoProto) -> list[int | str | None]:
    return [
        d.dim_value if d.HasField("dim_value") else (d.dim_param if d.HasField("dim_param") else None)
        for d in vi.type.tensor_type.shape.dim
    ]


# what converters write for "any size" as a symbol's name: no symbol, since two of them need not be equal
# (paddle2onnx declares an image input [-1, 3, ?, ?], whose height and width differ)
_ANONYMOUS = ("?", "", "-1")


def name_anonymous_dims(model: onnx.ModelProto) -> None:
    """Give each "any size" dimension its own symbol, in place: -1 as a size (some converters' "any
    size"), and the anonymous names in ``_ANONYMOUS``. A leading one of an input is the batch, ``N``, which
    the inputs share; any other is the input's own (``x_dim2``), so that a size given for one never fixes
    another, and a shape check never takes two of them for one size."""
    g = model.graph
    for is_input, vis in ((True, g.input), (False, g.output), (False, g.value_info)):
        for vi in vis:
            if not vi.type.HasField("tensor_type"):
                continue
            for k, d in enumerate(vi.type.tensor_type.shape.dim):
                anonymous = (d.HasField("dim_value") and d.dim_value < 0) or (
                    d.HasField("dim_param") and d.dim_param.strip() in _ANONYMOUS
                )
                if anonymous:
                    d.Clear()
                    d.dim_param = free_dim(vi.name, k, batch_shared=is_input)


def apply_input_shapes(model: onnx.ModelProto, shapes: InputShapes, where: str = "model") -> onnx.ModelProto:
    """A copy of ``model`` with the given input dimensions fixed; refuses unknown inputs, wrong ranks,
    values that contradict a static dimension, and inputs left with an unknown non-batch dimension."""
    inits = {t.name for t in model.graph.initializer}
    inputs = {i.name: i for i in model.graph.input if i.name not in inits}
    unknown = sorted(set(shapes) - set(inputs))
    if unknown:
        raise ModelError(f"{where} has no input named {unknown[0]!r} (its inputs: {', '.join(inputs)})")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    symbols: dict[str, tuple[int, str]] = {}  # a symbol given a size: it, and the input whose option gave it
    kept_free: dict[str, str] = {}  # a symbol an option left free (N): the input whose option kept it
    kept_first: dict[str, str] = {}  # of those, the ones left free as an input's first dimension
    name_anonymous_dims(out)
    for vi in out.graph.input:
        if vi.name not in shapes:
            continue
        have, want = _dims(vi), shapes[vi.name]
        if len(have) != len(want):
            raise ModelError(
                f"input {vi.name!r} has rank {len(have)}; --input-shape gives {len(want)} dimensions"
            )
        for k, (h, w) in enumerate(zip(have, want, strict=True)):
            # a static size, 0 included (an empty tensor)
            if isinstance(h, int) and h >= 0 and h != w and w != KEEP:
                raise ModelError(f"input {vi.name!r} has dimension {k} fixed at {h}; --input-shape gives {w}")
        dims = vi.type.tensor_type.shape.dim
        for k, (d, w) in enumerate(zip(dims, want, strict=True)):
            if w == KEEP:
                if d.HasField("dim_param"):
                    kept_free.setdefault(d.dim_param, vi.name)
                    if k == 0:
                        kept_first.setdefault(d.dim_param, vi.name)
                continue
            if d.HasField("dim_param"):
                # one symbol is one size: two inputs that share it given two sizes cannot both hold
                # (onnxruntime would refuse the pair at run time, or a cut's shapes would be nonsense)
                first, _ = symbols.setdefault(d.dim_param, (w, vi.name))
                if first != w:
                    raise ModelError(
                        f"--input-shape gives dimension {d.dim_param!r} two sizes, {first} and {w}: the "
                        f"model's inputs share it, so it is one size (input {vi.name!r})"
                    )
            d.Clear()
            d.dim_value = w
    # a symbol left free in one input and given a size in another cannot be both: the size would hold in
    # one input and not in the other (an LSTM's x:Nx7x16 beside h0:4x2x24 planned cuts that failed)
    for sym, name in kept_free.items():
        if sym in symbols:
            size, by = symbols[sym]
            raise ModelError(
                f"--input-shape {name} keeps dimension {sym!r} free, but --input-shape {by} "
                f"gives it {size}: the model's inputs share it, so give {name} that size too"
            )
    # a symbol is one size wherever it appears: the sizes given for one input fix the others' (an LSTM's
    # initial states share the data's batch)
    for vi in out.graph.input:
        if vi.name in shapes or vi.name in inits:
            continue
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in symbols:
                w = symbols[d.dim_param][0]
                d.Clear()
                d.dim_value = w
    # per input missing a size: its name, its unknown dimensions (symbols, or "dim K"), an --input-shape
    missing: list[tuple[str, list[str], str]] = []
    # a symbol past the first dimension of some input (an LSTM's initial states hold the batch second)
    # must take a size: only a first dimension may stay free, so it is no batch that N keeps free
    later = {d for vi in out.graph.input if vi.name not in inits for d in _dims(vi)[1:] if isinstance(d, str)}
    for vi in out.graph.input:
        if vi.name in inits:
            continue
        dims = _dims(vi)
        fixed = [isinstance(d, int) and d >= 0 for d in dims]
        free = [
            d if isinstance(d, str) and d != free_dim(vi.name, k) else f"dim {k}"  # no symbol: its position
            for k, d in enumerate(dims)
            if k > 0 and not fixed[k]
        ]
        if free:
            example = "x".join(
                str(d) if fixed[k] else ("N" if k == 0 and d not in later else "?")
                for k, d in enumerate(dims)
            )
            missing.append((vi.name, free, f"--input-shape {vi.name}:{example}"))
    if missing:
        hint = "(each ? a size; N keeps the batch free, or give it)"
        if any(PAST_RE.match(n) for n, _, _ in missing):
            # a decoder's cache has no size to give: it grows by a token per step, which one-shot plans cannot
            hint += (
                "; inputs named past_key_values.* are a decoder's KV cache: `splitpoint split-decoder` and "
                "`plan-decoder` split a decoder between its layers, with each side's cache"
            )
        # (a symbol kept free past the first dimension is the case said below, not this one: x:Nx?x64 for
        # x[batch, seq, 64] was told seq was x's first dimension and a later one of another input)
        held = sorted({d for _, free, _ in missing for d in free} & set(kept_first))
        if held:
            hint += "; " + "; ".join(
                f"{sym!r} is the first dimension of {kept_first[sym]}, kept free, and a later one of another "
                "input: only a first dimension may stay free, so give it a size in both"
                for sym in held
            )
        # N (or ?) given past the batch keeps that dimension as free as the file has it: say so, or the
        # user reads the options as asking again for what they gave
        kept = [n for n, _, _ in missing if any(w == KEEP for w in list(shapes.get(n, ()))[1:])]
        if kept:
            hint += (
                f"; N, ? or -1 in --input-shape {', '.join(kept)} left a dimension past the batch unknown: "
                "only the batch (the first) may stay free"
            )
        if len(missing) == 1:
            name, free, option = missing[0]
            raise ModelError(f"input {name!r} has unknown dimensions {', '.join(free)}: give {option} {hint}")
        # every input at once (fixing them one error at a time is a run per input), and only the options
        # needed: a symbol given for one input fixes it in the others (a BERT's ids, mask and types share
        # their sequence length). A "dim K" is no symbol: no other input's option covers it.
        options, covered, shared = [], set(), []
        for name, free, option in missing:
            if all(d in covered for d in free):
                shared.append(name)
            else:
                options.append(option)
                covered |= {d for d in free if not d.startswith("dim ")}
        also = f" (which fixes them in {', '.join(map(repr, shared))} too)" if shared else ""
        raise ModelError(
            f"{len(missing)} inputs have unknown dimensions: "
            + "; ".join(f"{name!r} ({', '.join(free)})" for name, free, _ in missing)
            + f": give {' '.join(options)}{also} {hint}"
        )
    return out


def declared_shapes(model: onnx.ModelProto) -> InputShapes:
    """The inputs' fixed dimensions as they stand (symbolic or unknown ones as -1)."""
    inits = {t.name for t in model.graph.initializer}
    return {
        i.name: [d if isinstance(d, int) and d > 0 else -1 for d in _dims(i)]
        for i in model.graph.input
        if i.name not in inits
    }
