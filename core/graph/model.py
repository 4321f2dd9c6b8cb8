"""A user's model, loaded once: path, checksum, graph index, and its cuts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import onnx

from splitpoint.core import zoo
from splitpoint.core.onnxio import load_model, sha256_file

from .cuts import Cut, enumerate_cuts, resolve_cut
from .index import GraphIndex
from .shapes import InputShapes, apply_input_shapes, declared_shapes


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

    def fidelity_samples(
        self, n: int, inputs: Path | None = None, seed: int | None = None
    ) -> tuple[list, list | None, str]:
        """Fidelity inputs: a folder the user gives, else a trained model's rendered task inputs (with
        their truths), else seeded random tensors. Returns (feeds per sample, truths or None, and what
        they are, said wherever a fidelity figure is shown)."""
        from splitpoint.core.samples import load_inputs

        if inputs is None and self.task is not None:
            from splitpoint.core.datasets import samples

            drawn = samples(self.name, n, seed=0 if seed is None else seed)
            return (
                [s.feeds for s in drawn],
                [s.truth for s in drawn],
                f"{n} rendered {self.task} inputs ({self.weights})",
            )
        feeds = load_inputs(self.model, inputs, n, 1234 if seed is None else seed)
        what = f"{len(feeds)} inputs from {inputs}" if inputs is not None else f"{n} random inputs"
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
        return self._cuts


def open_model(
    spec: str | Path, input_shapes: InputShapes | None = None, only_present: bool = False
) -> ModelHandle:
    """Load a model given as an ONNX path or a zoo name, fix its symbolic input dimensions (given, or
    the zoo entry's defaults), check and index it. An unknown non-batch dimension that nobody gave stops
    here, naming the input and the option. ``only_present``: shapes for inputs this model lacks are
    ignored (one --input-shape list for several models)."""
    path = zoo.resolve(spec)
    model = load_model(path)
    entry = zoo.ZOO.get(str(spec))
    name = str(spec) if entry is not None else path.stem
    shapes = dict(getattr(entry, "input_shapes", None) or {}) if entry is not None else {}
    names = {i.name for i in model.graph.input}
    declared = declared_shapes(model)
    shapes.update({k: v for k, v in (input_shapes or {}).items() if k in names or not only_present})
    model = apply_input_shapes(model, shapes, where=str(path))
    # a shape the file already fixes changes nothing: the profile and plan say "as in the file" either way
    shapes = {k: v for k, v in shapes.items() if declared.get(k) != v}
    trained = bool(getattr(entry, "trained", False))
    weights = "the user's model"
    if entry is not None:
        weights = f"trained weights, {entry.source}" if trained else "random weights, zoo architecture"
    task = entry.task if entry is not None and trained else None
    return ModelHandle(path, name, sha256_file(path), model, GraphIndex.build(model), shapes, task, weights)


__all__ = ["ModelHandle", "open_model", "Cut", "enumerate_cuts", "resolve_cut", "GraphIndex"]
