"""A user's model, loaded once: path, checksum, graph index, and its cuts."""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import inliner

if TYPE_CHECKING:
    import onnxruntime as ort

from splitpoint.core import zoo
from splitpoint.core.codecs import CARRIED_DTYPES
from splitpoint.core.errors import ModelError, clipped, first_line
from splitpoint.core.files import utf8_path
from splitpoint.core.onnxio import drop_unused, load_model_and_digest
from splitpoint.core.subgraphs import iter_nodes

from .cuts import Cut, enumerate_cuts, resolve_cut
from .extract import IR_WEIGHTS_NOT_INPUTS
from .index import GraphIndex, dtype_name
from .shapes import InputShapes, apply_input_shapes, declared_shapes

log = logging.getLogger("splitpoint.model")

# a leading dimension named for what a batch is not: a length, a count of boxes or points, a size
_NOT_A_BATCH = re.compile(
    r"seq|len|time|token|step|frame|word|char|box|point|node|edge|height|width|^[LTHW]$|^num_", re.IGNORECASE
)
_SAID_NOT_A_BATCH: set[tuple[str, str]] = set()


def say_if_not_a_batch(model: onnx.ModelProto, where: str) -> None:
    """Every symbolic leading dimension is taken as the batch (a sample is one row of it: profiles,
    fidelity and bytes per sample count one): one named for a length or a count is said so, once, with
    the way to give its size (an attention over ``x[L, 64]`` was costed at L = 1, its ranking of cuts
    inverted)."""
    for i in model.graph.input:
        dims = i.type.tensor_type.shape.dim if i.type.HasField("tensor_type") else []
        if not dims or not dims[0].dim_param:
            continue
        name = dims[0].dim_param
        if "batch" in name.lower() or not _NOT_A_BATCH.search(name) or (where, i.name) in _SAID_NOT_A_BATCH:
            continue
        _SAID_NOT_A_BATCH.add((where, i.name))
        rest = "".join(f"x{d.dim_value}" if d.dim_value > 0 else f"x{d.dim_param or '?'}" for d in dims[1:])
        log.warning(
            "%s: input %s's leading dimension %r is taken as the batch (one sample is one row of it, and "
            "samples are made with one); if it is a length or a count, give the size to plan for, e.g. "
            "--input-shape %s:200%s",
            where,
            i.name,
            name,
            i.name,
            rest,
        )


@dataclass
class ModelHandle:
    """A user's model, loaded once: where it came from, its checksum, its graph index, and the input
    shapes it was fixed to (``--input-shape``; empty when the file's own shapes were complete)."""

    path: Path
    name: str
    sha256: str
    model: onnx.ModelProto  # with input_shapes applied
    index: GraphIndex
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    task: str | None = None  # a trained zoo model's task: fidelity is then measured as task agreement
    weights: str = "the user's model"  # "trained …" or "random …" for zoo entries, said wherever fidelity is
    # False where opening changed what runs (weights listed as inputs, made constants as every plan has them)
    file_runs_as_planned: bool = True
    # the user's own sample (``--inputs``' first), run wherever one sample is: for a model whose integer
    # inputs must hold real values (a shape, an index into an activation), which seeded random ones break
    given_sample: dict[str, np.ndarray] | None = None
    # outputs the user named as class scores along an axis (``--scores``: a language model's [batch, tokens,
    # vocab] logits): fidelity compares their top-1 at every position there, not their cosine
    score_axes: dict[str, int] = field(default_factory=dict)

    def take_sample_from(self, folder: Path) -> None:
        from splitpoint.core.samples import load_inputs

        self.given_sample = load_inputs(self.model, folder, limit=1)[0]

    def sample(self, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
        """One sample at ``batch``: the user's where given (its rows repeated to the batch), else seeded
        random values of the declared shapes."""
        from splitpoint.core.samples import sample_feeds

        if self.given_sample is None:
            return sample_feeds(self.model, batch, seed)
        return {
            k: np.concatenate([v] * batch) if batch > 1 and v.ndim and v.shape[0] == 1 else v
            for k, v in self.given_sample.items()
        }

    def random_values_note(self) -> str:
        """Said after onnxruntime's refusal of a sample: which random values may be to blame, and the fix."""
        from splitpoint.core.samples import random_values_note

        return "" if self.given_sample is not None else random_values_note(self.model)

    @contextlib.contextmanager
    def sample_runs(self) -> Iterator[None]:
        """Where the model runs on seeded random samples (plan's, fidelity's): onnxruntime's refusal of
        them names the integer inputs they filled with 0..9 and the way out (--inputs), as profile's and
        split's do; plan's said only onnxruntime's words about a Reshape."""
        try:
            yield
        except Exception as exc:
            note = self.random_values_note()
            if not (note and type(exc).__module__.startswith("onnxruntime")):
                raise
            raise ModelError(
                f"onnxruntime could not run the model: {clipped(first_line(exc))}{note}"
            ) from exc

    @property
    def runnable(self) -> Path | onnx.ModelProto:
        """What a session of the whole model is built from (give it ``index.weight_array`` as its
        weights): the file, unless it lists its weights as inputs. From IR 4 on, onnxruntime then treats
        them as overridable, folds nothing (no Conv+BatchNorm fusion) and ran an opset-9 ResNet-18
        export 55 % slower than the same model with them as constants, which is how every plan's segments
        run: a profile timed on the file mispredicted every cut and the all-on-device plan."""
        return self.path if self.file_runs_as_planned else self.model

    def whole_session(
        self, threads: int = 0, provider: str = "CPUExecutionProvider", enable_profiling: bool = False
    ) -> ort.InferenceSession:
        """An onnxruntime session of the whole model as every plan runs it (``runnable``, with this
        index's weights): the profile's whole-model timing and every unsplit reference come from it."""
        from splitpoint.core.runner import make_session

        def build() -> ort.InferenceSession:
            return make_session(
                self.runnable,
                threads,
                provider,
                enable_profiling=enable_profiling,
                weights=self.index.weight_array,
            )

        try:
            return build()
        except Exception as exc:
            # onnxruntime cannot load a file whose external data holds a tensor its shape inference reads
            # (an Unsqueeze's axes saved with size_threshold=0): "Cannot parse data from external tensors".
            # The model in memory, as every plan's parts run, has that data inline
            if not (self.file_runs_as_planned and "external" in str(exc).lower()):
                raise
            self.file_runs_as_planned = False
            return build()

    def fidelity_samples(
        self, n: int, inputs: Path | None = None, seed: int | None = None
    ) -> tuple[list, list | None, str]:
        """Fidelity inputs: a folder the user gives, else a trained model's rendered task inputs (with
        their truths), else seeded random tensors. Returns (feeds per sample, truths or None, and what
        they are, said wherever a fidelity figure is shown)."""
        from splitpoint.core.samples import IMAGE_SUFFIXES, load_inputs

        if inputs is None and self.task is not None:
            from splitpoint.core.datasets import samples

            drawn = samples(self.name, n, seed=0 if seed is None else seed)
            return (
                [s.feeds for s in drawn],
                [s.truth for s in drawn],
                f"{n} rendered {self.task} inputs ({self.weights})",
            )
        feeds = load_inputs(self.model, inputs, n, 1234 if seed is None else seed)
        if (
            inputs is not None
        ):  # the user's own: the first is also what a one-sample run (a plan's check) runs
            self.given_sample = feeds[0]
        what = f"{len(feeds)} inputs from {inputs}" if inputs is not None else f"{n} random inputs"
        if inputs is not None and any(
            f.suffix.lower() in IMAGE_SUFFIXES and f.is_file() for f in Path(inputs).iterdir()
        ):
            what += " (images resized and scaled to 0..1, colour ones ImageNet-normalised)"
        return feeds, None, f"{what} ({self.weights})"

    @property
    def fixed_batch(self) -> int | None:
        """The batch every input fixes (the same static leading dimension), or None where it is free."""
        lead = {(self.index.info[i].dims or [None])[0] for i in self.index.inputs if i in self.index.info}
        (b,) = lead if len(lead) == 1 else (None,)
        return b if isinstance(b, int) else None

    def cuts(self) -> list[Cut]:
        if not hasattr(self, "_cuts"):
            self._cuts = enumerate_cuts(self.index)
            if not self._cuts and len(self.index.compute) > 1 and self.index.trial_error:
                # every cut needs a tensor's type that only a run could tell: say why there is none
                raise ModelError(
                    "no candidate cut: shape inference cannot type the tensors between the nodes, and "
                    f"onnxruntime could not run the model to measure them ({self.index.trial_error})"
                )
            untyped = self.index.untyped() if self.index.trial_error else []
            if untyped:
                # the cuts that cross them are left out: said, where they went missing without a word (a
                # fused BERT's cuts between its layers)
                from splitpoint.core.samples import random_values_note

                log.warning(
                    "%s: %d tensor(s) between the nodes have no known type (%s): shape inference cannot "
                    "tell, and onnxruntime could not run the model to measure them (%s)%s; the cuts that "
                    "cross them are not offered",
                    self.name,
                    len(untyped),
                    ", ".join(untyped[:3]) + (", …" if len(untyped) > 3 else ""),
                    self.index.trial_error,
                    random_values_note(self.model),
                )
        return self._cuts


def open_model(
    spec: str | Path, input_shapes: InputShapes | None = None, only_present: bool = False
) -> ModelHandle:
    """Load a model given as an ONNX path or a zoo name, fix its symbolic input dimensions (given, or
    the zoo entry's defaults), check and index it. An unknown non-batch dimension that nobody gave stops
    here, naming the input and the option. ``only_present``: shapes for inputs this model lacks are
    ignored, and so are those for inputs it declares fully static (one --input-shape list for several
    models: a GRU's ``x:1x20x8`` is not meant for a CNN whose ``x`` is 1x3x32x32 in the file)."""
    path = zoo.resolve(spec)
    model, digest, reordered = load_model_and_digest(path, input_shapes=input_shapes)
    # onnxruntime names an unnamed node by its op type and place in the model it is given (``MatMul_3``):
    # a session of a file whose nodes came out of order named them by the file's places, which the
    # profile, reading the model in order, gave to other nodes (18 % of the time attributed)
    as_planned = not reordered
    if model.functions:
        # a model's local functions (torch's export_modules_as_functions: a residual block per call) run
        # inlined in onnxruntime; kept whole here, their work counted as none (ResNet-18 as 9.7M MACs
        # of 148M), the profile attributed 2 % of the kernel time and derived every cut from that, and
        # no cut could fall inside a block. Inlined as onnxruntime inlines them, they are nodes like any
        model = inliner.inline_local_functions(model)
        as_planned = False
    if weights_to_constants(model):
        as_planned = False
    if drop_unused(model.graph):  # the file's dead nodes would run in a session of it, timed and all
        as_planned = False
    training = dropout_to_inference(model)
    if training:
        log.warning(
            "%s: %d Dropout node(s) in training mode (%s): run in inference mode, as onnxruntime's optimiser "
            "runs them in the whole model (export the model after model.eval())",
            path,
            len(training),
            ", ".join(training[:3]) + (", …" if len(training) > 3 else ""),
        )
        as_planned = False
    entry = zoo.ZOO.get(str(spec))
    name = str(spec) if entry is not None else utf8_path(path.stem)  # a C locale's escapes recovered
    shapes = dict(getattr(entry, "input_shapes", None) or {}) if entry is not None else {}
    names = {i.name for i in model.graph.input}
    declared = declared_shapes(model)
    fixed = {k for k, dims in declared.items() if dims and all(d > 0 for d in dims)}
    shapes.update(
        {k: v for k, v in (input_shapes or {}).items() if not only_present or (k in names and k not in fixed)}
    )
    check_interface(model, str(path))
    check_operators(model, str(path))
    model = apply_input_shapes(model, shapes, where=str(path))
    say_if_not_a_batch(model, str(path))
    if model.graph.value_info:
        # the exporter's shapes for intermediate tensors, often traced at another input and stale: the
        # index never reads them, and onnxruntime trusts them, so a session of the file computed a
        # computed-shape Reshape at the stale batch ((1, 1, 32) where the graph gives (2, 1, 16)), while
        # every plan's parts, which carry none, gave the graph's answer
        del model.graph.value_info[:]
        as_planned = False
    # a shape the file already fixes changes nothing: the profile and plan say "as in the file" either way
    shapes = {k: v for k, v in shapes.items() if declared.get(k) != v}
    trained = bool(getattr(entry, "trained", False))
    weights = "the user's model"
    if entry is not None:
        weights = f"trained weights, {entry.source}" if trained else "random weights, zoo architecture"
    task = entry.task if entry is not None and trained else None
    return ModelHandle(path, name, digest, model, GraphIndex.build(model), shapes, task, weights, as_planned)


def weights_to_constants(model: onnx.ModelProto) -> bool:
    """Drop from the graph's inputs those that are also initializers (IR 3 required every weight listed
    so; ``torch.onnx.export(keep_initializers_as_inputs=True)`` and older converters still do it): a
    split keeps such a default as a constant, and so does every session of the whole model built from
    this. Whether any was dropped."""
    weights = {t.name for t in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in weights]
    if len(keep) == len(model.graph.input):
        return False
    del model.graph.input[:]
    model.graph.input.extend(keep)
    model.ir_version = max(model.ir_version, IR_WEIGHTS_NOT_INPUTS)
    return True


def dropout_to_inference(model: onnx.ModelProto) -> list[str]:
    """Make every Dropout whose ``training_mode`` is a constant run in inference mode; the names of those
    that were in training mode. A model exported without ``model.eval()`` keeps them (torch's default
    exporter does): onnxruntime's optimiser drops them from the whole model, but a tail whose input is a
    Dropout's keeps it, and the split answered with random elements zeroed (0.9 relative error)."""
    values: dict[str, onnx.TensorProto] = {}
    for n in iter_nodes(model.graph):
        for a in n.attribute:
            for g in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                values.update((t.name, t) for t in g.initializer)
        if n.op_type == "Constant" and n.output:
            value = next((a.t for a in n.attribute if a.name == "value"), None)
            if value is not None:
                values[n.output[0]] = value
    values.update((t.name, t) for t in model.graph.initializer)
    training = []
    for n in iter_nodes(model.graph):
        if (
            n.op_type != "Dropout"
            or n.domain not in ("", "ai.onnx")
            or len(n.input) < 3
            or n.input[2] not in values
        ):
            continue
        try:
            on = bool(np.asarray(onnx.numpy_helper.to_array(values[n.input[2]])).any())
        except Exception:  # a value that cannot be read (external data not loaded): taken as on
            on = True
        del n.input[2:]  # absent: inference mode
        if on:
            training.append(n.name or n.output[0])
    return training


_NOT_TENSOR = {
    "sequence_type": "a sequence",
    "map_type": "a map",
    "optional_type": "an optional",
    "sparse_tensor_type": "a sparse tensor",
}


def check_operators(model: onnx.ModelProto, where: str) -> None:
    """Refuse, naming it, an operator of a domain onnxruntime has no kernel for (a company's custom op):
    every stage runs in onnxruntime, and without this the cut, the split and the checker's complaint
    about the untyped tensor it leaves come first, far from the cause. Standard-domain operators are left
    to the session, which names an operator too new for it; the model's own functions count as known."""
    newest = onnx.defs.onnx_opset_version()
    for o in model.opset_import:  # the checker lets it by, and shape inference knows none of its changes
        if o.domain in ("", "ai.onnx") and o.version > newest:
            raise ModelError(
                f"{where}: the model is stamped with opset {o.version} of the standard operators, newer than "
                f"the onnx package here ({onnx.__version__}) knows (up to {newest}): export it at opset "
                f"{newest} or lower, or upgrade onnx and onnxruntime"
            )
    local = {(f.domain, f.name) for f in model.functions}
    odd = sorted(
        {(n.domain, n.op_type) for n in iter_nodes(model.graph) if n.domain not in ("", "ai.onnx")} - local
    )
    if not odd:
        return
    known = _runtime_operators()
    unknown = [f"{d}:{op}" for d, op in odd if known is not None and (d, op) not in known]
    if unknown:
        raise ModelError(
            f"{where}: {', '.join(unknown)} {'is an operator' if len(unknown) == 1 else 'are operators'} "
            "onnxruntime has no kernel for (a custom operator library is not loaded); SplitPoint runs "
            "every stage with onnxruntime's own operators"
        )


@functools.cache
def _runtime_operators() -> frozenset | None:
    """(domain, op) of every operator onnxruntime registers; None where this build does not list them."""
    try:
        from onnxruntime.capi import _pybind_state

        return frozenset((s.domain, s.name) for s in _pybind_state.get_all_operator_schema())
    except (ImportError, AttributeError):  # pragma: no cover - a build without schema listing
        return None


def check_interface(model: onnx.ModelProto, where: str) -> None:
    """Refuse, naming the value, a model whose inputs or outputs no payload carries: every plan sends its
    inputs (server-only) or its outputs (from the tail) over the network. A scikit-learn classifier
    converted with ZipMap (a sequence of maps) or string labels is the usual case; both convert to
    tensors."""
    weights = {t.name for t in model.graph.initializer}
    zipmaps = {o for n in model.graph.node if n.op_type == "ZipMap" for o in n.output}
    values = [("input", v) for v in model.graph.input if v.name not in weights]
    for kind, v in [*values, *(("output", v) for v in model.graph.output)]:
        which = v.type.WhichOneof("value")
        if which is None:  # untyped: inference or a trial run types it later
            continue
        if which != "tensor_type":
            hint = (
                " (ZipMap's: convert the model without it: skl2onnx's options={'zipmap': False}, "
                "onnxmltools' zipmap=False)"
                if v.name in zipmaps
                else ""
            )
            raise ModelError(
                f"{where}: model {kind} {v.name!r} is {_NOT_TENSOR.get(str(which), 'not a tensor')}{hint}; "
                "SplitPoint runs models whose inputs and outputs are tensors"
            )
        elem = v.type.tensor_type.elem_type
        if elem and _numpy_name(elem) not in CARRIED_DTYPES:
            name = onnx.TensorProto.DataType.Name(elem).lower()
            hint = ""
            if name == "string":
                hint = (
                    " (a classifier's labels as strings: convert it with integer labels)"
                    if kind == "output"
                    else " (categories as strings: map them to integers before the model)"
                )
            raise ModelError(
                f"{where}: model {kind} {v.name!r} is a {name} tensor{hint}, and no codec carries that type "
                f"(carried: {', '.join(sorted(CARRIED_DTYPES))})"
            )


def _numpy_name(elem: int) -> str:
    """``dtype_name``, or "" for a type numpy has no name for."""
    try:
        return dtype_name(elem)
    except (KeyError, TypeError, ValueError):
        return ""


__all__ = ["ModelHandle", "open_model", "Cut", "enumerate_cuts", "resolve_cut", "GraphIndex"]
