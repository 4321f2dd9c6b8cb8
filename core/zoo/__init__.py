"""The model zoo: standard architectures generated locally (seeded random weights), cached by their
build arguments, and trained models used where their packages installed them (``trained.py``).

Every command that takes a model accepts either an ONNX path or a zoo name, resolved here.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
import psutil

from ..errors import ModelError
from ..files import cache_root, utf8_path, writer_gone, writer_tag
from . import models, trained
from .decoder import DECODERS, build_decoder


@dataclass(frozen=True)
class ZooEntry:
    name: str
    build: Callable[..., onnx.ModelProto]
    summary: str
    resolution: int
    # Published figures for the full-width model at its default resolution (torchvision docs).
    params: int | None = None
    gmacs: float | None = None
    min_resolution: int = 32
    # Trained entries: real weights from a package (``source``, e.g. "ddddocr==1.6.1"), the task their
    # datasets and metrics evaluate, and concrete shapes for inputs whose dims are symbolic in the file.
    trained: bool = False
    task: str | None = None
    input_shapes: dict[str, list[int]] | None = None
    source: str = ""


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry("alexnet", models.alexnet, "plain chain CNN (AlexNet layout)", 224, 61_100_840, 0.71, 64),
        ZooEntry("resnet18", models.resnet18, "residual DAG, basic blocks", 224, 11_689_512, 1.81),
        ZooEntry("resnet50", models.resnet50, "residual DAG, bottleneck blocks", 224, 25_557_032, 4.09),
        ZooEntry(
            "mobilenetv2",
            models.mobilenetv2,
            "inverted residuals, depthwise convolutions",
            224,
            3_504_872,
            0.30,
        ),
        ZooEntry("multitask", models.multitask, "two inputs, three outputs (one early), tied weights", 64),
    ]
}
ZOO.update(
    {
        m.name: ZooEntry(
            m.name,
            trained.loader(m.name),
            m.summary,
            m.resolution,
            params=m.params,
            min_resolution=m.resolution,
            trained=True,
            task=m.task,
            input_shapes=m.input_shapes,
            source=m.source,
        )
        for m in trained.TRAINED.values()
    }
)


def random_names() -> list[str]:
    """The architectures with seeded random weights (any width and resolution)."""
    return [n for n, e in ZOO.items() if not e.trained]


def trained_names() -> list[str]:
    """The trained models (fixed weights and input sizes; need ``pip install 'splitpoint[trained]'``)."""
    return [n for n, e in ZOO.items() if e.trained]


def build(name: str, width: float = 1.0, resolution: int | None = None, seed: int = 0) -> onnx.ModelProto:
    if name in DECODERS:
        raise ModelError(
            f"{name!r} is a zoo decoder: zoo.write (`splitpoint zoo {name}`) and split-decoder make it"
        )
    if name not in ZOO:
        raise ModelError(f"unknown zoo model {name!r}; known: {', '.join([*ZOO, *DECODERS])}")
    if width <= 0 or width > 4:
        raise ModelError(f"width must be in (0, 4], got {width}")
    e = ZOO[name]
    if e.trained:
        if width != 1.0 or (resolution is not None and resolution != e.resolution):
            raise ModelError(
                f"{name} is a trained model ({e.source}): its weights and input size are fixed, "
                "so width and resolution do not apply"
            )
        return e.build()
    res = resolution or e.resolution
    if res < e.min_resolution or res > 1024:
        raise ModelError(f"{name}: resolution must be in [{e.min_resolution}, 1024], got {res}")
    return e.build(width=width, resolution=res, seed=seed)


def cache_dir() -> Path:
    return cache_root() / "zoo"


def zoo_path(name: str, width: float = 1.0, resolution: int | None = None, seed: int = 0) -> Path:
    """Build once, then reuse the file: the same arguments always give the same bytes. A trained model's
    file is the one its package installed."""
    if name in ZOO and ZOO[name].trained:
        if width != 1.0 or (resolution is not None and resolution != ZOO[name].resolution):
            build(name, width, resolution, seed)  # raises: fixed weights
        return trained.locate(name)
    res = resolution or (ZOO[name].resolution if name in ZOO else 0)
    path = cache_dir() / f"{name}-w{width:g}-r{res}-s{seed}.onnx"
    if not path.exists():
        model = build(name, width, resolution, seed)
        tmp = path.with_name(f".{path.name}.tmp-{writer_tag()}-")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _sweep(path.parent)
            onnx.save_model(model, str(tmp))
            os.replace(tmp, path)
        except OSError as exc:  # a full or read-only cache: said as such, and no partial file left in it
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)  # else: not the space (HOME=/proc, no rights)
            raise ModelError(
                f"cannot keep the zoo model {name} in the cache {path.parent} ({exc.strerror or exc}): "
                + ("free space there, or " if full else "")
                + "set SPLITPOINT_CACHE to a folder this user may write"
            ) from exc
    return path


def _sweep(folder: Path) -> None:
    """Remove the temporary files of builds whose process is gone: one killed while it wrote (SIGTERM from
    ``systemctl stop`` at first boot) left a file as large as its model (244 MB for AlexNet) for good."""
    for f in folder.glob(".*.tmp-*"):
        if writer_gone(f.name):
            with contextlib.suppress(OSError):
                f.unlink()
    # the name before the writer was in it (NAME.tmpPID): gone where its process is and it is an hour old
    for f in folder.glob("*.tmp[0-9]*"):
        pid = f.suffix[len(".tmp") :]
        with contextlib.suppress(OSError, ValueError):
            if pid.isdigit() and not psutil.pid_exists(int(pid)) and time.time() - f.stat().st_mtime > 3600:
                f.unlink()


def resolve(spec: str | Path) -> Path:
    """A path to an ONNX file for ``spec``: an existing file, or a zoo name built on demand."""
    utf8_path(spec)  # a name onnxruntime cannot open is refused here, by name
    p = Path(spec)
    # a zoo name is a path only where a file of that name exists: a directory called resnet18 in the
    # working directory (a plan written with -o resnet18) does not hide the zoo's model
    if (
        p.is_file()
        or str(spec).endswith(".onnx")
        or os.sep in str(spec)
        or (p.exists() and str(spec) not in ZOO)
    ):
        return p
    if str(spec) in ZOO:
        return zoo_path(str(spec))
    if str(spec) in DECODERS:  # listed by `zoo`, but split between layers, token by token
        raise ModelError(
            f"{spec!r} is a zoo decoder: `splitpoint split-decoder`, `plan-decoder` and `generate` take it "
            f"(this command takes a file or one of {', '.join(ZOO)})"
        )
    raise ModelError(f"{spec!r} is neither a file nor a zoo model (known: {', '.join(ZOO)})")


def _weights(e: ZooEntry) -> str:
    if not e.trained:
        return "random weights (seeded)"
    why = trained.availability(e.name)
    state = "" if why is None else f"; needs pip install {e.source}"  # (no brackets: rich reads markup)
    return f"trained: {e.source}, {e.task}{state}"


def _input(e: ZooEntry) -> str:
    if e.input_shapes:
        return ", ".join("x".join(map(str, s[-2:])) for s in e.input_shapes.values())
    return f"{e.resolution}x{e.resolution}"


def listing() -> list[list[str]]:
    """One row per zoo entry: name, architecture and weights (random or trained, from which package),
    parameters (published; for trained models, counted in the file) and MACs, input size."""
    return [
        [
            e.name,
            f"{e.summary}; {_weights(e)}",
            f"{e.params:,}" if e.params else "-",
            f"{e.gmacs}" if e.gmacs else "-",
            _input(e),
        ]
        for e in ZOO.values()
    ] + [
        [
            name,
            "decoder-only transformer, GPT-2 layout, KV cache as inputs/outputs; random weights with outlier "
            "channels (split-decoder, plan-decoder)",
            f"{spec.params():,}",
            "-",
            "token ids",
        ]
        for name, spec in DECODERS.items()
    ]


def write(
    names: list[str], out: Path, width: float = 1.0, resolution: int | None = None, seed: int = 0
) -> list[tuple[Path, int]]:
    """Build and save each named model as OUT/NAME.onnx; returns (path, node count) per model."""
    from ..onnxio import save_model

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for n in names:
        if n in DECODERS:
            if width != 1.0 or resolution is not None:
                raise ModelError(f"{n} is a decoder: width and resolution do not apply")
            model = build_decoder(DECODERS[n], n, seed)
        else:
            model = build(n, width=width, resolution=resolution, seed=seed)
        path = out / f"{n}.onnx"
        save_model(model, path)
        written.append((path, len(model.graph.node)))
    return written
