"""The decoders SplitPoint splits: a zoo architecture built with its seed, or a user's exported ONNX file.
Both give the same things to the planner, the fidelity runs and the plan writer: the model's shape (layers,
cache heads and head size, hidden width, vocabulary, positions) and any run of layers as a model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx

from .errors import PlanError, SplitPointError


class Decoder(Protocol):
    name: str
    layers: int
    heads: int  # of the KV cache
    head_dim: int
    d_model: int  # the hidden state's width: what a split sends per token
    vocab: int
    n_ctx: int  # positions: prompt + generated tokens
    ids_dtype: str
    hidden_dtype: str  # float32, or float16 for a half-precision export
    logits: str
    logits_dtype: str

    def whole(self) -> onnx.ModelProto: ...

    def part(self, first: int, last: int) -> onnx.ModelProto:
        """Layers ``first`` .. ``last - 1``: token ids in when first is 0, else the hidden state entering
        ``first``; the hidden state leaving ``last - 1`` out, or the logits when it is the last layer."""
        ...

    def boundary(self, k: int) -> str:
        """The hidden state's tensor name between layers k-1 and k."""
        ...

    def sha256(self) -> str: ...


@dataclass
class ZooDecoder:
    """A zoo architecture (``zoo/decoder.py``): every part is built with the whole model's weights."""

    name: str
    seed: int = 0
    ids_dtype: str = "int64"
    hidden_dtype: str = "float32"
    logits: str = "logits"
    logits_dtype: str = "float32"

    def __post_init__(self) -> None:
        from .zoo.decoder import DECODERS

        spec = DECODERS[self.name]
        self.spec = spec
        self._whole: onnx.ModelProto | None = None
        self.layers, self.heads, self.head_dim = spec.layers, spec.heads, spec.head_dim
        self.d_model, self.vocab, self.n_ctx = spec.d_model, spec.vocab, spec.n_ctx

    def whole(self) -> onnx.ModelProto:
        from .zoo.decoder import build_decoder

        if self._whole is None:  # GPT-2 small takes seconds to build
            self._whole = build_decoder(self.spec, self.name, self.seed)
        return self._whole

    def part(self, first: int, last: int) -> onnx.ModelProto:
        from .zoo.decoder import build_decoder

        return build_decoder(self.spec, f"{self.name}-{first}-{last}", self.seed, (first, last))

    def boundary(self, k: int) -> str:
        from .zoo.decoder import hidden_name

        return hidden_name(k - 1)

    def sha256(self) -> str:
        from .onnxio import model_bytes, sha256_bytes

        return sha256_bytes(model_bytes(self.whole()))


@dataclass
class ExportedDecoder:
    """A decoder exported to ONNX with onnxruntime-genai's cache names, cut between layers by
    ``graph.decodercut``. ``max_len`` where no position table shows the model's length."""

    path: Path
    max_len: int | None = None
    name: str = ""
    _model: onnx.ModelProto = field(init=False, repr=False)

    def __post_init__(self) -> None:
        from .graph.decodercut import decoder_layout
        from .graph.genai import as_decoder
        from .graph.index import GraphIndex
        from .onnxio import load_model

        self.path = Path(self.path)
        self.name = self.name or self.path.stem
        self._model = as_decoder(load_model(self.path))
        self.idx = GraphIndex.build(self._model)
        lay = decoder_layout(self.idx)
        self.layout = lay
        if self.max_len is not None and lay.max_len is not None and self.max_len > lay.max_len:
            raise PlanError(f"--max-len {self.max_len} is past the model's {lay.max_len} positions")
        n_ctx = self.max_len or lay.max_len
        if n_ctx is None:
            raise PlanError(
                f"{self.path}: the model shows no position table to read its length from: give --max-len"
            )
        self.layers, self.heads, self.head_dim, self.n_ctx = lay.layers, lay.kv_heads, lay.head_dim, n_ctx
        self.ids_dtype = self.idx.tensor(lay.main_input).dtype
        if lay.max_len is None:
            self._check_last_position(n_ctx)
        self.kv_bytes_by_layer = self._kv_bytes_by_layer()
        self.hidden_dtype = self.idx.tensor(lay.boundaries[0]).dtype
        self.logits, self.logits_dtype = lay.logits, self.idx.tensor(lay.logits).dtype
        self.d_model, self.vocab = self._widths()

    def _kv_bytes_by_layer(self) -> tuple[int, ...]:
        """Per layer, the bytes one position adds to its key and value caches, from their declared heads,
        head size and dtype (layers may differ: grouped heads, float16 caches)."""
        out = []
        for i in range(self.layers):
            total = 0
            for kind in ("key", "value"):
                t = self.idx.info.get(f"past_key_values.{i}.{kind}")  # a graph input: declared
                dims = [d for d in (t.dims or [])[1:] if isinstance(d, int)] if t is not None else []
                if t is None or len(dims) != 2:  # heads and head size not both fixed: as layer 0, float32
                    return ()
                total += dims[0] * dims[1] * np.dtype(t.dtype).itemsize
            out.append(total)
        return tuple(out)

    def _check_last_position(self, n_ctx: int) -> None:
        """Where the model computes its positions itself (no position table it indexes with position_ids
        shows its length), run it once at the last position --max-len allows: a table shorter than that
        then fails here, at planning, not in the middle of a generation."""
        from .kvcache import DecoderSegment

        seg = DecoderSegment(self._model, 1)

        def at(position: int) -> None:
            past = {
                k: np.zeros((*v.shape[:2], position, v.shape[3]), v.dtype)
                for k, v in seg.empty_past().items()
            }
            seg.step(np.zeros((1, 1), self.ids_dtype), past)

        try:  # the first token first: a model that fails there fails for another reason than --max-len
            seg.step(np.zeros((1, 1), self.ids_dtype), seg.empty_past())
        except Exception as exc:  # onnxruntime's own type
            raise PlanError(
                f"the model does not run one token of one sequence on an empty cache: {_said(exc)}"
            ) from exc
        try:
            at(n_ctx - 1)
        except Exception as exc:  # onnxruntime's own type: an index past a table, most often
            try:  # a model that fails on its second token fails whatever --max-len
                at(1)
            except Exception as second:
                raise PlanError(
                    f"the model does not run a second token after a first on one sequence, whatever "
                    f"--max-len: {_said(second)}"
                ) from second
            raise PlanError(
                f"--max-len {n_ctx}: the model fails at position {n_ctx - 1} ({_said(exc)}); "
                "give a smaller --max-len"
            ) from exc

    def _widths(self) -> tuple[int, int]:
        """The hidden state's and the logits' last dimension: declared, or seen in one run of the model."""
        from .kvcache import DecoderSegment

        last = [(self.idx.tensor(t).dims or [None])[-1] for t in (self.layout.boundaries[0], self.logits)]
        if isinstance(last[0], int) and isinstance(last[1], int):
            return last[0], last[1]
        seg = DecoderSegment(self.part(0, 1), 1)
        hidden = seg.step(np.zeros((1, 1), self.ids_dtype), seg.empty_past())[0]
        logits = DecoderSegment(self._model, 1)
        out = logits.step(np.zeros((1, 1), self.ids_dtype), logits.empty_past())[0]
        return int(hidden.shape[-1]), int(out.shape[-1])

    def whole(self) -> onnx.ModelProto:
        return self._model

    def part(self, first: int, last: int) -> onnx.ModelProto:
        from .graph.decodercut import decoder_part

        return decoder_part(self.idx, self.layout, first, last)

    def boundary(self, k: int) -> str:
        return self.layout.boundaries[k - 1]

    def sha256(self) -> str:
        from .onnxio import sha256_file

        return sha256_file(self.path)


def hidden_codec(dec: Decoder, codec: str) -> str:
    """``codec`` by what it sends of this decoder's hidden states. On a float16 export, float32 and float16
    both send the tensor unchanged (the same bytes): named float16, what goes on the wire, where float32
    read as twice the bytes and listed one candidate twice."""
    from .codecs import Codec

    c = Codec.parse(codec)
    if dec.hidden_dtype == "float16" and c.base == "float32":
        return Codec("float16", c.stage).name
    return c.name


def exact_codec(dec: Decoder) -> str:
    """The codec that sends this decoder's hidden states exactly, by name."""
    return hidden_codec(dec, "float32")


def open_decoder(model: str, seed: int = 0, max_len: int | None = None) -> Decoder:
    """A zoo decoder's name or an exported decoder's ONNX file."""
    from .zoo.decoder import DECODERS

    if max_len is not None and max_len < 2:  # 0 read as "not given", a negative one deep in numpy
        raise SplitPointError(
            f"--max-len must be at least 2 positions (a prompt token and a generated one), not {max_len}"
        )
    if model in DECODERS:
        if max_len is not None and max_len != DECODERS[model].n_ctx:
            raise SplitPointError(
                f"--max-len is for exported decoders: the zoo's {model} has {DECODERS[model].n_ctx} positions"
            )
        return ZooDecoder(model, seed)
    if model.endswith(".onnx") or Path(model).exists():
        return ExportedDecoder(Path(model), max_len)
    raise SplitPointError(f"unknown decoder {model!r}: an ONNX file or one of {', '.join(DECODERS)}")


def check_split(dec: Decoder, head: onnx.ModelProto, tail: onnx.ModelProto) -> None:
    """The split's logits against the whole model's over a short prompt and two decode steps, or PlanError:
    a split that does not reproduce its model is never written."""
    from .kvcache import DecoderSegment

    w, h, t = (DecoderSegment(m, 1) for m in (dec.whole(), head, tail))
    pw, ph, pt = w.empty_past(), h.empty_past(), t.empty_past()
    x = (np.arange(max(1, min(3, dec.n_ctx - 2))) % 2).reshape(1, -1).astype(dec.ids_dtype)
    for _ in range(3):
        ref, pw = w.step(x, pw)
        hidden, ph = h.step(x, ph)
        got, pt = t.step(hidden, pt)
        # the split runs the same kernels, but fused differently across the cut: float32 agrees to ~1e-6,
        # float16 to its own rounding (~1e-3)
        rel = 1e-2 if ref.dtype == np.float16 else 1e-4
        ref, got = ref.astype(np.float32), got.astype(np.float32)
        tol = rel * (1 + float(np.abs(ref).max()))
        if ref.shape != got.shape or not np.allclose(got, ref, rtol=rel, atol=tol):
            diff = (
                f"{np.abs(got - ref).max():.3g}"
                if ref.shape == got.shape
                else f"shape {got.shape}, not {ref.shape}"
            )
            raise PlanError(f"the split decoder does not reproduce the whole model's logits ({diff})")
        x = ref[:, -1:].argmax(-1).astype(dec.ids_dtype)


def _said(exc: BaseException) -> str:
    """onnxruntime's words on one line, their start and their end (the cause) where they run long."""
    from .errors import clipped

    return clipped(" ".join(str(exc).split()))
