"""Cut-tensor codecs, shared by the edge (encode) and the server (decode).

A codec name is a lossy-or-not base and an optional lossless stage: ``float32``, ``float16``,
``int8`` (affine, per tensor), ``int8-ch`` (affine, per channel), ``int4`` (4-bit packed,
per channel), each optionally ``+zstd`` or ``+lz4``. Every payload starts with a header that
describes itself (codec, dtype, shape, scale/offset, body length), so the receiver needs no
side channel; decoding validates all of it, and caps what it allocates, before touching the
body.
"""

from __future__ import annotations

import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import lz4.block
import numpy as np
import zstandard

from .errors import SplitPointError

MAGIC = b"SPT1"
VERSION = 1
# magic, version, base codec, lossless stage, dtype, ndim, channel axis, body bytes (raw), stored bytes
_HEAD = struct.Struct("<4sBBBBBbxQQ")
MAX_NDIM = 8
DEFAULT_MAX_BYTES = 256 * 2**20  # decoded tensors above this are refused unless the caller raises it

BASES = ("float32", "float16", "int8", "int8-ch", "int4")
STAGES = ("", "zstd", "lz4")
_DTYPES = ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")
ZSTD_LEVEL = 1


class CodecError(SplitPointError):
    """A payload is malformed, truncated, lies about its content, or names an unknown codec."""


@dataclass(frozen=True)
class Codec:
    base: str
    stage: str = ""

    @property
    def name(self) -> str:
        return self.base + (f"+{self.stage}" if self.stage else "")

    @property
    def lossless(self) -> bool:
        return self.base == "float32"

    @classmethod
    def parse(cls, name: str) -> Codec:
        base, _, stage = name.partition("+")
        if base not in BASES or stage not in STAGES:
            raise CodecError(f"unknown codec {name!r}; known: {', '.join(all_codecs())}")
        return cls(base, stage)


def all_codecs() -> list[str]:
    return [b + (f"+{s}" if s else "") for b in BASES for s in STAGES]


# The zstd stage compresses independent 128 KiB chunks on a small thread pool (as pzstd does):
# python-zstandard releases the GIL, and edge boards have several cores. Compressor objects are
# not thread-safe, so each thread keeps its own.
ZSTD_CHUNK = 128 * 1024
_local = threading.local()
_pool = ThreadPoolExecutor(
    max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="splitpoint-zstd"
)


def _zc() -> zstandard.ZstdCompressor:
    if not hasattr(_local, "zc"):
        _local.zc = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return _local.zc


def _zd() -> zstandard.ZstdDecompressor:
    if not hasattr(_local, "zd"):
        _local.zd = zstandard.ZstdDecompressor()
    return _local.zd


def _chunks(n: int) -> list[tuple[int, int]]:
    return [(i, min(i + ZSTD_CHUNK, n)) for i in range(0, n, ZSTD_CHUNK)] or [(0, 0)]


def _zstd_compress(body: bytes) -> bytes:
    """u32 chunk count, u32 compressed size per chunk, then the zstd frames."""
    spans = _chunks(len(body))
    view = memoryview(body)
    if len(spans) == 1:
        frames = [_zc().compress(body)]
    else:
        frames = list(_pool.map(lambda ab: _zc().compress(view[ab[0] : ab[1]]), spans))
    return struct.pack(f"<I{len(frames)}I", len(frames), *map(len, frames)) + b"".join(frames)


def _zstd_decompress(stored: bytes | memoryview, raw_len: int) -> bytes:
    spans = _chunks(raw_len)
    if len(stored) < 4:
        raise CodecError("zstd stage is corrupt: no chunk table")
    (n,) = struct.unpack_from("<I", stored, 0)
    if n != len(spans):
        raise CodecError(f"zstd stage is corrupt: {n} chunks for {raw_len} bytes (expected {len(spans)})")
    if len(stored) < 4 + 4 * n:
        raise CodecError("zstd stage is corrupt: chunk table truncated")
    sizes = struct.unpack_from(f"<{n}I", stored, 4)
    if 4 + 4 * n + sum(sizes) != len(stored):
        raise CodecError("zstd stage is corrupt: chunk sizes do not add up to the stored bytes")
    offs = np.cumsum((4 + 4 * n, *sizes))

    def one(i: int) -> bytes:
        want = spans[i][1] - spans[i][0]
        try:
            out = _zd().decompress(stored[offs[i] : offs[i + 1]], max_output_size=want)
        except zstandard.ZstdError as exc:
            raise CodecError(f"zstd stage is corrupt: {exc}") from exc
        if len(out) != want:
            raise CodecError(f"zstd stage is corrupt: chunk {i} gave {len(out)} bytes, expected {want}")
        return out

    parts = [one(0)] if n == 1 else list(_pool.map(one, range(n)))
    return b"".join(parts)


# -- quantisers: vectorised, no per-element Python -----------------------------------------------
def _ranges(x: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    if axis is None:
        return np.array([x.min()], np.float32), np.array([x.max()], np.float32)
    red = tuple(i for i in range(x.ndim) if i != axis)
    return x.min(axis=red).astype(np.float32), x.max(axis=red).astype(np.float32)


def _bshape(x: np.ndarray, axis: int | None) -> tuple:
    if axis is None:
        return (1,) * x.ndim
    return tuple(-1 if i == axis else 1 for i in range(x.ndim))


def _quantise(x: np.ndarray, levels: int, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = _ranges(x, axis)
    scale = (hi - lo) / levels
    scale[scale == 0] = 1.0
    inv = (1.0 / scale).reshape(_bshape(x, axis))
    # (x - lo) / scale + 0.5 as one multiply and one add: the values are >= 0, so truncating
    # to uint8 after +0.5 rounds to nearest
    q = np.multiply(x, inv, dtype=np.float32)
    q += (0.5 - lo.reshape(_bshape(x, axis)) * inv).astype(np.float32)
    return q.astype(np.uint8), np.concatenate([scale, lo])


def _dequantise(q: np.ndarray, params: np.ndarray, shape: tuple, axis: int | None) -> np.ndarray:
    c = params.size // 2
    scale, lo = params[:c], params[c:]
    b = tuple(-1 if (axis is not None and i == axis) else 1 for i in range(len(shape)))
    out = np.multiply(q.reshape(shape), scale.reshape(b), dtype=np.float32)
    out += lo.reshape(b)
    return out


def _channel_axis(x: np.ndarray) -> int | None:
    return 1 if x.ndim >= 2 else None


def encode(x: np.ndarray, codec: str | Codec) -> bytes:
    """Encode one tensor. Non-float tensors (indices, masks) are always sent exactly."""
    c = codec if isinstance(codec, Codec) else Codec.parse(codec)
    x = np.asarray(x, order="C")  # (ascontiguousarray would turn a scalar into 1-d)
    dtype = x.dtype.name
    if dtype not in _DTYPES:
        raise CodecError(f"cannot encode dtype {dtype}")
    base = c.base if (x.dtype.kind == "f" and x.size) else "float32"  # exact passthrough for non-floats
    axis = -1
    params = np.zeros(0, np.float32)
    if base == "float32":
        body = x.tobytes()
    elif base == "float16":
        body = x.astype(np.float16).tobytes()
    elif base in ("int8", "int8-ch"):
        ax = None if base == "int8" else _channel_axis(x)
        q, params = _quantise(x.astype(np.float32, copy=False), 255, ax)
        axis = -1 if ax is None else ax
        body = q.tobytes()
    else:  # int4: two values per byte, per-channel ranges
        ax = _channel_axis(x)
        q, params = _quantise(x.astype(np.float32, copy=False), 15, ax)
        axis = -1 if ax is None else ax
        flat = q.reshape(-1)
        if flat.size % 2:
            flat = np.concatenate([flat, np.zeros(1, np.uint8)])
        body = (flat[0::2] | (flat[1::2] << 4)).tobytes()
    raw_len = len(body)
    if c.stage == "zstd":
        body = _zstd_compress(body)
    elif c.stage == "lz4":
        body = lz4.block.compress(body, store_size=False)
    head = _HEAD.pack(
        MAGIC,
        VERSION,
        BASES.index(base),
        STAGES.index(c.stage),
        _DTYPES.index(dtype),
        x.ndim,
        axis,
        raw_len,
        len(body),
    )
    shape = struct.pack(f"<{x.ndim}Q", *x.shape)
    return b"".join([head, shape, struct.pack("<I", params.size), params.astype("<f4").tobytes(), body])


def _expected_body(base: str, n: int, itemsize: int) -> int:
    return {"float32": n * itemsize, "float16": n * 2, "int8": n, "int8-ch": n, "int4": (n + 1) // 2}[base]


def decode(payload: bytes | memoryview, max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Decode a payload, refusing anything inconsistent before allocating for it."""
    buf = memoryview(payload)
    if len(buf) < _HEAD.size:
        raise CodecError(f"payload truncated: {len(buf)} bytes, header needs {_HEAD.size}")
    magic, version, base_i, stage_i, dtype_i, ndim, axis, raw_len, stored = _HEAD.unpack_from(buf, 0)
    if magic != MAGIC:
        raise CodecError(f"not a SplitPoint tensor payload (magic {bytes(magic)!r})")
    if version != VERSION:
        raise CodecError(f"unsupported tensor payload version {version} (this build reads {VERSION})")
    if base_i >= len(BASES) or stage_i >= len(STAGES) or dtype_i >= len(_DTYPES):
        raise CodecError(f"unknown codec/dtype ids in header ({base_i}, {stage_i}, {dtype_i})")
    if ndim > MAX_NDIM:
        raise CodecError(f"header claims {ndim} dimensions (max {MAX_NDIM})")
    base, stage, dtype = BASES[base_i], STAGES[stage_i], np.dtype(_DTYPES[dtype_i])
    off = _HEAD.size
    if len(buf) < off + 8 * ndim + 4:
        raise CodecError("payload truncated inside the shape")
    shape = struct.unpack_from(f"<{ndim}Q", buf, off)
    off += 8 * ndim
    n = 1
    for d in shape:
        n *= d
        if n * dtype.itemsize > max_bytes:
            raise CodecError(f"header claims shape {shape} ({dtype}), above the {max_bytes}-byte cap")
    if base != "float32" and dtype.kind != "f":
        raise CodecError(f"codec {base} cannot carry dtype {dtype}")
    if not (-1 <= axis < max(ndim, 1)):
        raise CodecError(f"channel axis {axis} out of range for {ndim} dimensions")
    (nparams,) = struct.unpack_from("<I", buf, off)
    off += 4
    channels = shape[axis] if axis >= 0 else 1
    want_params = 0 if base in ("float32", "float16") else 2 * channels
    if nparams != want_params:
        raise CodecError(
            f"header has {nparams} quantisation parameters, codec {base} on shape {shape} needs {want_params}"
        )
    if len(buf) < off + 4 * nparams:
        raise CodecError("payload truncated inside the quantisation parameters")
    params = np.frombuffer(buf, "<f4", nparams, off).astype(np.float32)
    off += 4 * nparams
    if not np.isfinite(params).all():
        raise CodecError("quantisation parameters are not finite")
    if nparams:
        scale, lo = params[: nparams // 2], params[nparams // 2 :]
        levels = 15 if base == "int4" else 255
        with np.errstate(over="ignore"):
            top = lo + levels * scale
        if (scale < 0).any() or not np.isfinite(top).all():
            raise CodecError("quantisation parameters out of range (negative scale or values beyond float32)")
    expected = _expected_body(base, n, dtype.itemsize)
    if raw_len != expected:
        raise CodecError(f"header says {raw_len} body bytes, but {base} of shape {shape} needs {expected}")
    body: bytes | memoryview = buf[off:]
    if len(body) != stored:
        raise CodecError(f"payload truncated or padded: header says {stored} stored bytes, got {len(body)}")
    if stage == "zstd":
        body = _zstd_decompress(body, raw_len)
    elif stage == "lz4":
        try:
            body = lz4.block.decompress(bytes(body), uncompressed_size=raw_len)
        except lz4.block.LZ4BlockError as exc:
            raise CodecError(f"lz4 stage is corrupt: {exc}") from exc
    if len(body) != raw_len:
        raise CodecError(f"lossless stage produced {len(body)} bytes, header says {raw_len}")
    ax = None if axis < 0 else axis
    if base == "float32":
        return (
            np.frombuffer(body, dtype, n).reshape(shape).copy()
            if stage == ""
            else np.frombuffer(body, dtype, n).reshape(shape)
        )
    if base == "float16":
        return np.frombuffer(body, np.float16, n).reshape(shape).astype(dtype)
    if base in ("int8", "int8-ch"):
        return _dequantise(np.frombuffer(body, np.uint8, n), params, shape, ax).astype(dtype, copy=False)
    packed = np.frombuffer(body, np.uint8)
    q = np.empty(packed.size * 2, np.uint8)
    q[0::2] = packed & 0x0F
    q[1::2] = packed >> 4
    return _dequantise(q[:n], params, shape, ax).astype(dtype, copy=False)


def error_bound(x: np.ndarray, codec: str) -> float:
    """The largest absolute error a codec may introduce on ``x`` (half a quantisation step)."""
    c = Codec.parse(codec)
    if c.base == "float32" or x.dtype.kind != "f":
        return 0.0
    if c.base == "float16":
        return float(np.abs(x).max()) * 2**-11 + 6e-8
    ax = None if c.base == "int8" else _channel_axis(x)
    lo, hi = _ranges(x.astype(np.float32), ax)
    levels = 15 if c.base == "int4" else 255
    return float(((hi - lo) / levels).max()) / 2 * (1 + 1e-5) + 1e-7
