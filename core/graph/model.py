"""A user's model, loaded once: path, checksum, graph index, and its cuts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

from splitpoint.core import zoo
from splitpoint.core.onnxio import load_model, sha256_file

from .cuts import Cut, enumerate_cuts, resolve_cut
from .index import GraphIndex


@dataclass
class ModelHandle:
    """A user's model, loaded once: where it came from, its checksum and its graph index."""

    path: Path
    name: str
    sha256: str
    model: onnx.ModelProto
    index: GraphIndex

    def cuts(self) -> list[Cut]:
        if not hasattr(self, "_cuts"):
            self._cuts = enumerate_cuts(self.index)
        return self._cuts


def open_model(spec: str | Path) -> ModelHandle:
    """Load a model given as an ONNX path or a zoo name, checked and indexed."""
    path = zoo.resolve(spec)
    model = load_model(path)
    name = path.stem if str(spec) not in zoo.ZOO else str(spec)
    return ModelHandle(path, name, sha256_file(path), model, GraphIndex.build(model))


__all__ = ["ModelHandle", "open_model", "Cut", "enumerate_cuts", "resolve_cut", "GraphIndex"]
