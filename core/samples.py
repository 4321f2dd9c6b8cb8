"""Model inputs: seeded random samples of the declared shapes, or a user's folder of arrays or images.

Profiling, fidelity runs, the demo and the bench all feed models through here, so that "a sample" means
the same tensor everywhere.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from .errors import SplitPointError
from .weights import with_stubs

# ops whose output's values are their (first) input's values, moved or cast: ids keep indexing the same
# table through them, and a tensor read only through them and a Shape is read for its shape alone
VALUE_MOVING_OPS = frozenset(
    {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand", "Transpose"}
)


# onnxruntime's fused embedding (com.microsoft EmbedLayerNormalization, as its transformer optimiser
# writes BERTs): each index input's position and the position of the table it reads rows of
FUSED_LOOKUPS = {"EmbedLayerNormalization": ((0, 2), (1, 4), (8, 3))}  # ids, token types, positions


def index_bounds(model: onnx.ModelProto) -> dict[str, int]:
    """Integer inputs that index a table (an embedding: token ids, token types, positions), each with the
    rows of its smallest table: a sample past them makes onnxruntime's Gather fail ("indices element out
    of data bounds") where a real input never would, and a fused embedding's alike ("input index out of
    range": a BERT's 2 token types, a sample's 0..9)."""
    rows: dict[str, int] = {}
    for t in model.graph.initializer:
        rows[t.name] = int(t.dims[0]) if t.dims else 0
    for n in model.graph.node:
        if (
            n.op_type == "Constant"
            and n.attribute
            and n.attribute[0].name == "value"
            and n.attribute[0].t.dims
        ):
            rows[n.output[0]] = int(n.attribute[0].t.dims[0])
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    out: dict[str, int] = {}
    sizes = _static_sizes(model)
    for inp in model.graph.input:
        stack, seen = [inp.name], set()
        while stack:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            for n in consumers.get(t, []):
                axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
                if n.op_type == "Gather" and len(n.input) > 1 and n.input[1] == t:
                    # a weight table's rows, or the size along ``axis`` of any tensor of known shape
                    # (an index into an activation: one of a model's 4 heads, its last 3 steps)
                    dims = sizes(n.input[0])
                    k = axis + len(dims) if dims and axis < 0 else axis
                    n_rows = rows.get(n.input[0], 0) if axis == 0 else 0
                    if not n_rows and dims and 0 <= k < len(dims):
                        n_rows = dims[k] or 0
                    if n_rows > 0:
                        out[inp.name] = min(out.get(inp.name, n_rows), n_rows)
                elif n.op_type in VALUE_MOVING_OPS and n.input[0] == t:
                    stack.extend(n.output)
                for at, table in FUSED_LOOKUPS.get(n.op_type, ()) if n.domain == "com.microsoft" else ():
                    if len(n.input) > table and at < len(n.input) and n.input[at] == t:
                        n_rows = rows.get(n.input[table], 0) or ((sizes(n.input[table]) or [0])[0] or 0)
                        if n_rows > 0:
                            out[inp.name] = min(out.get(inp.name, n_rows), n_rows)
    return out


def _static_sizes(model: onnx.ModelProto) -> Callable[[str], list[int | None]]:
    """A tensor's declared dimensions (None where unknown; [] where its shape is not known at all), from
    the file's shapes, inferred once on the first tensor the file leaves without them."""
    declared: dict[str, list[int | None]] = {}
    inferred: list[dict[str, list[int | None]]] = []

    def dims_of(vis) -> dict[str, list[int | None]]:
        return {
            vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
            for vi in vis
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")
        }

    g = model.graph
    declared.update(dims_of([*g.input, *g.output, *g.value_info]))
    declared.update({t.name: list(t.dims) for t in g.initializer})

    def sizes(name: str) -> list[int | None]:
        if name in declared:
            return declared[name]
        if not inferred:
            try:
                # the weights as stubs: their types and shapes are all inference reads, and a model of
                # 2 GiB or more cannot be serialised for it
                whole = onnx.shape_inference.infer_shapes(with_stubs(model))
                inferred.append(dims_of(whole.graph.value_info))
            except Exception:  # noqa: BLE001 - no shape then: the input keeps its 0..9
                inferred.append({})
        return inferred[0].get(name, [])

    return sizes


def fed_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs a sample feeds: those that are no initializer (a weight listed as an input, as
    IR 3 required, keeps its value)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def sample_feeds(model: onnx.ModelProto, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs of the model's declared shapes and dtypes (symbolic dims become ``batch``). Integer
    inputs that index a table take any of its rows (others 0..9); integer masks (``attention_mask``) are
    right-padded sequences (``padding_mask``), as a random mask could hide every position of a row."""
    rng = np.random.default_rng(seed)
    bounds = index_bounds(model)
    feeds = {}
    for i in fed_inputs(model):
        tt = i.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in tt.shape.dim]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        if np.issubdtype(dtype, np.floating):
            feeds[i.name] = rng.standard_normal(dims).astype(dtype)
        elif dtype == np.bool_:
            feeds[i.name] = rng.random(dims) > 0.5
        elif "mask" in i.name.lower() and i.name not in bounds:
            feeds[i.name] = padding_mask(rng, dims, dtype)
        else:
            feeds[i.name] = rng.integers(0, bounds.get(i.name, 10), dims).astype(dtype)
    # a rank-0 input draws a numpy scalar, which onnxruntime refuses for some dtypes (bool): an array
    return {k: np.asarray(v) for k, v in feeds.items()}


def random_values_note(model: onnx.ModelProto) -> str:
    """The integer inputs a seeded random sample fills with 0..9 (no table bounds them, no mask), named
    with the way out: a model that reads one as a shape or as an index into an activation fails on such
    values, and onnxruntime's words ("requested shape", "out of data bounds") read as a fault of the
    model, the cut or the input shapes. Empty where there is none."""
    bounded = index_bounds(model)
    names = [  # those sample_feeds draws from 0..9
        i.name
        for i in fed_inputs(model)
        if i.name not in bounded
        and "mask" not in i.name.lower()
        and np.issubdtype(np.dtype(helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)), np.integer)
    ]
    if not names:
        return ""
    return (
        f" (it ran on a seeded random sample, integers 0..9 in {', '.join(map(repr, names))}: where they "
        "must be real values, such as a shape or an index, give --inputs DIR with a sample)"
    )


def padding_mask(rng: np.random.Generator, dims: list[int], dtype: np.dtype) -> np.ndarray:
    """Ones for the tokens a row holds, zeros for its right padding (up to half the row, at least one
    token kept): what a batch of sentences of different lengths brings, and what turns a model's additive
    mask into -inf, which every codec must carry."""
    mask = np.ones(dims, dtype)
    if not dims or dims[-1] < 2:
        return mask
    rows = mask.reshape(-1, dims[-1])
    for r, pad in enumerate(rng.integers(0, dims[-1] // 2 + 1, rows.shape[0])):
        rows[r, dims[-1] - pad :] = 0
    return mask


def load_inputs(
    model: onnx.ModelProto,
    inputs: str | Path | None = None,
    random: int = 16,
    seed: int = 1234,
    limit: int | None = None,
) -> list[dict[str, np.ndarray]]:
    """Per-sample feeds from a folder: ``.npy`` files (one sample each, or a batch) or images for a
    single-input model, ``.npz`` files (one sample each, an array per input, named as the inputs) for any;
    else ``random`` seeded samples. ``limit``: the first files only (a command that runs one sample)."""
    specs = fed_inputs(model)
    if inputs is None:
        return [sample_feeds(model, 1, seed + k) for k in range(random)]
    folder = Path(inputs)
    if not folder.is_dir():
        raise SplitPointError(f"--inputs must be a folder of .npy/.npz files or images: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".npz", *SINGLE_INPUT_SUFFIXES))
    if not files:
        raise SplitPointError(f"no .npy, .npz or image files in {folder}")
    files = files[:limit] if limit is not None else files
    dims = {
        i.name: [d.dim_value if d.HasField("dim_value") else 1 for d in i.type.tensor_type.shape.dim]
        for i in specs
    }
    dtypes = {i.name: np.dtype(helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)) for i in specs}
    out: list[dict[str, np.ndarray]] = []
    for f in files:
        if f.suffix.lower() == ".npz":
            sample = read_npz(f, {n: len(d) for n, d in dims.items()})
            _check_sample_shapes(f, sample, specs)
            out.append({n: _as_input_type(a, dtypes[n], f, n) for n, a in sample.items()})
            continue
        only_input(f, list(dims))
        ((name, want),) = dims.items()
        if f.suffix.lower() == ".npy":
            arr = load_npy(f)
        else:
            try:
                arr = image_tensor(f, want, name)
            except (OSError, ValueError, EOFError) as exc:  # truncated, another format
                raise SplitPointError(f"{f.name}: not a readable image ({exc})") from exc
        arr = _as_input_type(arr, dtypes[name], f, name)
        if not want and arr.ndim == 0:  # a scalar: one sample per file, no batch to split it by
            out.append({name: arr})
            continue
        if not want and specs[0].type.tensor_type.HasField("shape"):
            raise SplitPointError(f"{f.name}: shape {arr.shape}; input {name} is a scalar")
        if arr.ndim == len(want) - 1:
            arr = arr[None]
        if list(arr.shape[1:]) != want[1:]:
            raise SplitPointError(f"{f.name}: shape {arr.shape} does not fit input {name} {want}")
        rows = want[0] if want and want[0] > 1 else 1  # a model that fixes its batch above 1 runs that many
        if arr.shape[0] % rows:
            raise SplitPointError(f"{f.name}: {arr.shape[0]} rows; input {name} takes batches of {rows}")
        out.extend({name: arr[k : k + rows]} for k in range(0, arr.shape[0], rows))
    return out


def _as_input_type(arr: np.ndarray, dtype: np.dtype, f: Path, name: str) -> np.ndarray:
    """``arr`` as the input's element type, where that keeps its values: an image's bytes as floats, a
    float64 .npy as float32 (rounded). A value the type cannot hold is refused, not changed: float32
    activations past 65504 became infinite as float16 samples, and fidelity was measured on them."""
    if arr.dtype == dtype:
        return arr
    if arr.dtype.kind == "c" and dtype.kind != "c":
        changed, why, out = True, "complex values would lose their imaginary part", arr
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            out = arr.astype(dtype)
        if dtype.kind == "f" and arr.dtype.kind == "f":
            changed = bool((np.isinf(out) & ~np.isinf(arr)).any())
            why = f"values past {dtype}'s range ({np.finfo(dtype).max:g}) would be infinite"
        else:  # to integers or bools, or integers to floats (an id past 2^24 as float32): each value back
            changed = not np.array_equal(out.astype(arr.dtype), arr, equal_nan=False)
            why = "values it cannot hold (fractions, or out of its range) would change"
    if changed:
        raise SplitPointError(
            f"{f.name}: input {name} takes {dtype}; this file holds {arr.dtype}, and {why}: save the "
            f"samples as {dtype}"
        )
    return out


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
SINGLE_INPUT_SUFFIXES = (".npy", *IMAGE_SUFFIXES)


def _check_sample_shapes(path: Path, sample: dict[str, np.ndarray], specs: list) -> None:
    """A sample's arrays against the sizes the model (with its --input-shape) fixes past the batch, and
    a dimension several inputs share (one symbol) the same size in each: the model refused such a sample
    only when a part ran, and the message blamed the cut (a tail's BroadcastIterator)."""
    seen: dict[str, tuple[str, int]] = {}
    for spec in specs:
        a = sample.get(spec.name)
        if a is None:
            continue
        for k, d in enumerate(spec.type.tensor_type.shape.dim):
            if k >= a.ndim:
                break
            size = int(a.shape[k])
            if k > 0 and d.HasField("dim_value") and d.dim_value > 0 and size != d.dim_value:
                want = [
                    x.dim_value if x.HasField("dim_value") else x.dim_param or "?"
                    for x in spec.type.tensor_type.shape.dim
                ]
                raise SplitPointError(
                    f"{path.name}: {spec.name} has shape {list(a.shape)}; the model takes {want} "
                    f"(dimension {k} as the file or --input-shape fixes it)"
                )
            # past the batch: a leading "any size" is N in every input, and an index list's length beside
            # a feature matrix's rows is no batch they share
            if k > 0 and d.HasField("dim_param") and d.dim_param:
                first = seen.setdefault(d.dim_param, (spec.name, size))
                if first[1] != size:
                    raise SplitPointError(
                        f"{path.name}: inputs {first[0]} and {spec.name} share dimension {d.dim_param!r}, "
                        f"which is {first[1]} in {first[0]} and {size} in {spec.name}"
                    )


def sample_shapes(model: onnx.ModelProto, inputs: str | Path) -> dict[str, list[int]]:
    """The shapes a folder's first array sample gives the inputs this model leaves unknown past the batch
    (the batch kept free, as -1): a user who gives samples has said their height and width, and asking
    again for ``--input-shape`` would make them write down what the files already hold. Images, which a
    model resizes to its own declared size, say nothing; nor does a folder without arrays."""
    specs = fed_inputs(model)
    open_dims = {
        i.name: len(i.type.tensor_type.shape.dim)
        for i in specs
        if any(not d.HasField("dim_value") or d.dim_value < 0 for d in i.type.tensor_type.shape.dim[1:])
    }
    folder = Path(inputs)
    arrays = (
        sorted(p for p in folder.iterdir() if p.suffix.lower() in (".npy", ".npz")) if folder.is_dir() else []
    )
    if not open_dims or not arrays:
        return {}
    sample = read_sample(arrays[0], {i.name: len(i.type.tensor_type.shape.dim) for i in specs})
    return {
        n: [-1, *sample[n].shape[1:]]
        for n, rank in open_dims.items()
        if n in sample and sample[n].ndim == rank
    }


def only_input(path: Path, names: list[str]) -> None:
    """A bare array or image is a sample of a single-input model only."""
    if len(names) != 1:
        raise SplitPointError(
            f"{path.name}: this model has {len(names)} inputs ({', '.join(names)}); give each sample as a "
            ".npz file with one array per input, named as the inputs"
        )


def read_sample(path: Path, ranks: dict[str, int | None]) -> dict[str, np.ndarray]:
    """One sample from a ``.npy`` (a single-input model's) or a ``.npz`` (see ``read_npz``) file, with its
    batch dimension added where it was left out; or SplitPointError naming the file."""
    if path.suffix.lower() == ".npz":
        return read_npz(path, ranks)
    only_input(path, list(ranks))
    arr = load_npy(path)
    ((name, rank),) = ranks.items()
    return {name: arr[None] if rank is not None and arr.ndim == rank - 1 else arr}


def load_npy(path: Path) -> np.ndarray:
    """A ``.npy`` file's array in this machine's byte order, or SplitPointError naming the file: one that
    is truncated, empty (EOFError ended a whole run), pickled, of strings or bytes (a cast to the input's
    type raised a traceback), or whose header declares more data than the file holds (numpy allocated
    the 3.5 PiB it declared first: "not enough memory", the file unnamed)."""
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _fortran, dtype = header(fh)
            have = os.fstat(fh.fileno()).st_size - fh.tell()
        need = math.prod(shape) * dtype.itemsize
        if need > have:
            raise SplitPointError(
                f"{path.name}: not a readable .npy array (its header declares {shape} of {dtype}, "
                f"{need:,} bytes, and the file holds {have:,})"
            )
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, MemoryError) as exc:
        raise SplitPointError(
            f"{path.name}: not a readable .npy array ({exc or 'the file is empty'})"
        ) from exc
    return _numbers(path, "", _native(arr))


def _numbers(path: Path, name: str, arr: np.ndarray) -> np.ndarray:
    """An array of numbers (or booleans): what a model input takes."""
    if arr.dtype.kind not in "biufc":
        what = f"array {name!r} holds" if name else "holds"
        raise SplitPointError(f"{path.name}: {what} {arr.dtype} values, not numbers")
    return arr


def _native(arr: np.ndarray) -> np.ndarray:
    """The array in this machine's byte order: ``np.save`` keeps a big-endian array's order, and
    onnxruntime reads the bytes as its own order without a word (NaN and noise from a valid file)."""
    return arr if arr.dtype.isnative else arr.astype(arr.dtype.newbyteorder("="))


def read_npz(path: Path, ranks: dict[str, int | None]) -> dict[str, np.ndarray]:
    """One sample of a model with any number of inputs: a ``.npz`` holding an array per input (named as
    the inputs; one sample, with or without its batch dimension). An array that feeds no input is refused
    by name, as onnxruntime refuses one: ignored, a value given for a model input that has a default (an
    initializer of the same name, which a split keeps as a constant) would change nothing in silence."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: _numbers(path, k, _native(z[k])) for k in z.files}
    except (OSError, ValueError, EOFError, MemoryError, zipfile.BadZipFile) as exc:
        raise SplitPointError(f"cannot read {path.name}: {exc or 'the file is empty'}") from exc
    missing = [n for n in ranks if n not in arrays]
    if missing:
        raise SplitPointError(
            f"{path.name} has no array named {', '.join(missing)} (it holds {', '.join(arrays) or 'none'}); "
            "name each array as the model input it feeds"
        )
    extra = [k for k in arrays if k not in ranks]
    if extra:
        raise SplitPointError(
            f"{path.name} holds {', '.join(map(repr, extra))}, which feeds no input (the inputs: "
            f"{', '.join(ranks)}; a model input with a default value, an initializer of the same name, "
            "keeps that default)"
        )
    return {
        n: arrays[n][None] if r is not None and arrays[n].ndim == r - 1 else arrays[n]
        for n, r in ranks.items()
    }


def image_tensor(path: Path, dims: list[int], name: str = "the model's") -> np.ndarray:
    """An image resized to the model's input and normalised with ImageNet statistics, laid out as the
    input is: [N, C, H, W] or channels-last [N, H, W, C], of 1 or 3 channels. Any other input is said so
    (an image given to a sequence model read as a broken .npy file)."""
    from PIL import Image

    last = len(dims) == 4 and dims[3] in (1, 3) and dims[1] not in (1, 3)
    if len(dims) != 4 or (dims[1] not in (1, 3) and not last):
        raise SplitPointError(
            f"{path.name}: an image feeds an input of [N, C, H, W] or [N, H, W, C] with 1 or 3 channels; "
            f"input {name} is {dims}: give its samples as .npy or .npz files"
        )
    c, h, w = (dims[3], dims[1], dims[2]) if last else (dims[1], dims[2], dims[3])
    img = Image.open(path).convert("RGB" if c == 3 else "L").resize((w, h), Image.Resampling.BILINEAR)
    x: np.ndarray = np.asarray(img, dtype=np.float32).reshape(h, w, c) / np.float32(255.0)
    if c == 3:
        x = (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    return (x if last else x.transpose(2, 0, 1))[None]
