"""Measured fidelity: the split model with a codec (and optionally an int8 head) against the
unsplit float model, on the same inputs. Never assumed from the codec's nominal precision."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from splitpoint.core.codecs import decode, encode
from splitpoint.core.errors import SplitPointError
from splitpoint.core.graph import ModelHandle
from splitpoint.core.graph.cuts import Cut
from splitpoint.core.graph.extract import extract
from splitpoint.core.runner import make_session, sample_feeds

SNR_CAP_DB = 300.0  # an exact match has infinite SNR; JSON needs a number


@dataclass
class OutputFidelity:
    name: str
    top1_agreement: float | None  # for (N, classes) outputs
    cosine: float
    max_abs_error: float
    snr_db: float


@dataclass
class FidelityReport:
    cut: int | None
    codec: str
    head_weights: str
    samples: int
    outputs: list[OutputFidelity]

    @property
    def score(self) -> float:
        """One number for the planner: the worst top-1 agreement if any output classifies, else the
        worst cosine similarity."""
        top1 = [o.top1_agreement for o in self.outputs if o.top1_agreement is not None]
        return min(top1) if top1 else min(o.cosine for o in self.outputs)

    def to_dict(self) -> dict:
        return {**asdict(self), "score": self.score}


def compare(name: str, ref: np.ndarray, got: np.ndarray) -> OutputFidelity:
    ref = ref.astype(np.float64)
    got = got.astype(np.float64)
    n = ref.shape[0] if ref.ndim else 1
    r, g = ref.reshape(n, -1), got.reshape(n, -1)
    top1 = float(np.mean(r.argmax(1) == g.argmax(1))) if (ref.ndim == 2 and ref.shape[1] > 1) else None
    denom = np.linalg.norm(r, axis=1) * np.linalg.norm(g, axis=1)
    cos = np.where(denom > 0, (r * g).sum(1) / np.where(denom > 0, denom, 1), 1.0)
    noise = float(((r - g) ** 2).sum())
    signal = float((r**2).sum())
    snr = SNR_CAP_DB if noise == 0 else min(SNR_CAP_DB, 10 * np.log10(max(signal, 1e-30) / noise))
    return OutputFidelity(name, top1, float(cos.mean()), float(np.abs(r - g).max()), float(snr))


def load_inputs(
    model: onnx.ModelProto, inputs: str | Path | None = None, random: int = 16, seed: int = 1234
) -> list[dict[str, np.ndarray]]:
    """Per-sample feeds: ``.npy`` files (one sample each, or a batch) or images from a folder,
    else ``random`` seeded samples."""
    from onnx import helper

    inits = {t.name for t in model.graph.initializer}
    specs = [i for i in model.graph.input if i.name not in inits]
    if inputs is None:
        return [sample_feeds(model, 1, seed + k) for k in range(random)]
    folder = Path(inputs)
    if not folder.is_dir():
        raise SplitPointError(f"--inputs must be a folder of .npy files or images: {folder}")
    files = sorted(
        p for p in folder.iterdir() if p.suffix.lower() in (".npy", ".png", ".jpg", ".jpeg", ".bmp")
    )
    if not files:
        raise SplitPointError(f"no .npy or image files in {folder}")
    if len(specs) != 1:
        raise SplitPointError(
            f"--inputs feeds single-input models; this one has {len(specs)} inputs (use --random)"
        )
    spec = specs[0]
    dims = [d.dim_value if d.HasField("dim_value") else 1 for d in spec.type.tensor_type.shape.dim]
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(spec.type.tensor_type.elem_type))
    out = []
    for f in files:
        arr = np.load(f) if f.suffix == ".npy" else image_tensor(f, dims)
        arr = arr.astype(dtype, copy=False)
        if arr.ndim == len(dims) - 1:
            arr = arr[None]
        if list(arr.shape[1:]) != dims[1:]:
            raise SplitPointError(f"{f.name}: shape {arr.shape} does not fit input {spec.name} {dims}")
        out.extend({spec.name: arr[k : k + 1]} for k in range(arr.shape[0]))
    return out


def image_tensor(path: Path, dims: list[int]) -> np.ndarray:
    """An image resized to the model's input and normalised with ImageNet statistics (NCHW)."""
    from PIL import Image

    _, c, h, w = dims
    img = Image.open(path).convert("RGB" if c == 3 else "L").resize((w, h), Image.BILINEAR)
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = x.reshape(h, w, c).transpose(2, 0, 1)
    if c == 3:
        x = (x - np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]) / np.array(
            [0.229, 0.224, 0.225], np.float32
        )[:, None, None]
    return x[None]


def _batch(samples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([s[k] for s in samples]) for k in samples[0]}


def measure(
    handle: ModelHandle,
    cut: Cut,
    codecs: list[str],
    samples: list[dict[str, np.ndarray]],
    head_model: onnx.ModelProto | None = None,
    head_weights: str = "float32",
    reference: list[np.ndarray] | None = None,
) -> dict[str, FidelityReport]:
    """Fidelity of each codec at one cut. Each sample is encoded on its own, as the edge does."""
    feeds = _batch(samples)
    if reference is None:
        reference = make_session(handle.path).run(None, feeds)
    head, tail = extract(handle.index, cut, check=False)
    hs = make_session((head_model or head).SerializeToString())
    ts = make_session(tail.SerializeToString())
    h_out = dict(
        zip(
            [o.name for o in hs.get_outputs()], hs.run(None, {i.name: feeds[i.name] for i in hs.get_inputs()})
        )
    )
    sent = {c.name: (feeds[c.name] if c.source == "input" else h_out[c.name]) for c in cut.crossing}
    tail_names = [o.name for o in ts.get_outputs()]
    n = len(samples)
    reports = {}
    runs: dict[bytes, dict] = {}  # codecs that decode to identical tensors share one tail run
    for codec in codecs:
        received = {
            name: np.concatenate([decode(encode(t[k : k + 1], codec)) for k in range(n)])
            for name, t in sent.items()
        }
        digest = b"".join(
            hashlib.sha256(np.ascontiguousarray(received[k]).tobytes()).digest() for k in sorted(received)
        )
        if digest not in runs:
            runs[digest] = dict(zip(tail_names, ts.run(None, received)))
        late = runs[digest]
        outs = [
            compare(name, ref, h_out[name] if name in cut.head_outputs else late[name])
            for name, ref in zip(handle.index.outputs, reference)
        ]
        reports[codec] = FidelityReport(cut.index, codec, head_weights, n, outs)
    return reports
