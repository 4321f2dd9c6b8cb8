"""Cut-tensor codecs, shared by the edge (encode) and the server (decode).

A codec name is a lossy-or-not base and an optional lossless stage: ``float32``, ``float16``,
``int8`` (affine, per tensor), ``int8-ch`` (affine, per channel), ``int4`` (4-bit packed,
per channel), ``int8-ol`` and ``int4-ol`` (``int8-ch`` and ``int4`` with the outlier columns of the
last axis sent exact: a decoder's hidden states, whose few large channels would otherwise take every
token's range), each
optionally ``+zstd`` or ``+lz4``. On a [batch, tokens, hidden] tensor "per channel" (axis 1) is per
token; a channel of fewer than 16 elements gets no pair of its own (the tensor shares one). Every
payload starts with a header that describes itself (codec, dtype, shape, scale/offset, body length), so
the receiver needs no side channel; decoding validates all of it, and caps what it allocates, before
touching the body. The byte layout is docs/protocol.md's "Tensor payloads".

Speed (benchmarks/bench_codecs.py): a payload is built in one preallocated buffer (the
quantiser writes straight into it), quantisation runs in cache-sized blocks, float32 <-> float16
goes through onnxruntime's vectorised Cast (numpy's half-float cast is an element loop, ~15x
slower), the zstd stage uses frame parameters tuned for quantised activations, and a decompressed
body lands in its final array without a copy.
"""

from __future__ import annotations

import math
import os
import struct
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import lz4.block
import numpy as np
import zstandard

from .errors import SplitPointError, unsupported_version
from .machine import usable_cores

MAGIC = b"SPT1"
VERSION = 1
# magic, version, base codec, lossless stage, dtype, ndim, channel axis, body bytes (raw), stored bytes
_HEAD = struct.Struct("<4sBBBBBbxQQ")
MAX_NDIM = 8
DEFAULT_MAX_BYTES = 256 * 2**20  # decoded tensors above this are refused unless the caller raises it

BASES = ("float32", "float16", "int8", "int8-ch", "int4", "int4-ol", "int8-ol")
OUTLIER_BASES = ("int4-ol", "int8-ol")
# *-ol: a column of the last axis is an outlier where its largest |value| is above this many times the
# median column's, at most one column in OUTLIER_SHARE (the largest first)
OUTLIER_RATIO, OUTLIER_SHARE = 8.0, 32
STAGES = ("", "zstd", "lz4")
# the tensor types a payload carries, in the order of their ids on the wire: what may cross a cut, and
# what a plan's tensors may be
DTYPES = (
    "float32",
    "float16",
    "float64",
    "int64",
    "int32",
    "int8",
    "uint8",
    "bool",
    "int16",
    "uint16",
    "uint32",
    "uint64",  # ids 8-11: PCM audio, depth images, counters (sent exact)
)
CARRIED_DTYPES = frozenset(DTYPES)
_NP_DTYPES = tuple(np.dtype(d) for d in DTYPES)
_DTYPE_IDS = {d: i for i, d in enumerate(_NP_DTYPES)}
_NO_PARAMS = np.zeros(0, np.float32)


class CodecError(SplitPointError):
    """A payload is malformed, truncated, lies about its content, or names an unknown codec."""

    code = "bad-tensor"  # the protocol's error code for it (docs/protocol.md)


class CodecTooLarge(CodecError):
    """A payload that would decode past the receiver's cap: well-formed, but over its size limits."""

    code = "too-large"


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


# -- threads ---------------------------------------------------------------------------------------
# The zstd stage works on independent 128 KiB chunks, so chunks can be (de)compressed side by side:
# python-zstandard releases the GIL. The calling thread always takes its share, and helper threads
# only pick up chunks it has not reached, so a busy or single-core machine degrades to the plain
# sequential loop, and a payload of one chunk (every tensor up to 128 KiB of body) never touches
# the pool. At most ``codec_threads()`` threads work on one payload, and the pool is shared by
# all callers, so concurrent encodes cannot oversubscribe a small device either.
THREADS_ENV = "SPLITPOINT_CODEC_THREADS"
_MAX_DEFAULT_THREADS = 4


def _default_threads() -> int:
    env = os.environ.get(THREADS_ENV, "").strip()
    if env:
        if env.isdigit() and int(env) >= 1:
            return int(env)
        warnings.warn(f"{THREADS_ENV}={env!r} is not a positive integer; ignored", stacklevel=2)
    return max(1, min(_MAX_DEFAULT_THREADS, usable_cores()))


_threads = _default_threads()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def codec_threads() -> int:
    """How many threads (the caller included) may work on one payload's zstd chunks."""
    return _threads


def set_threads(n: int | None) -> None:
    """Cap the threads per payload; ``None`` restores the default ($SPLITPOINT_CODEC_THREADS, else
    the CPUs this process may use, at most 4). 1 keeps every codec in the calling thread."""
    global _threads, _pool
    if n is not None and n < 1:
        raise ValueError(f"codec threads must be >= 1, not {n}")
    with _pool_lock:
        _threads = _default_threads() if n is None else n
        old = None
        if _pool is not None and _pool_size < _threads - 1:  # too small: a new one on next use
            old, _pool = _pool, None
    if old is not None:
        old.shutdown(wait=False)


def _helpers() -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None:
            _pool_size = max(1, _threads - 1)
            _pool = ThreadPoolExecutor(max_workers=_pool_size, thread_name_prefix="splitpoint-codec")
        return _pool


def _parallel(fn: Callable[[int], None], k: int) -> None:
    """``fn(0) … fn(k-1)``, the caller working through them with up to ``codec_threads() - 1`` helpers."""
    helpers = min(_threads - 1, k - 1)
    if helpers <= 0:
        for i in range(k):
            fn(i)
        return
    todo = iter(range(k))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            fn(i)

    futures = []
    try:
        pool = _helpers()
        for _ in range(helpers):
            futures.append(pool.submit(work))
    except RuntimeError:  # set_threads() retired that pool just now: the caller does it all
        pass
    try:
        work()
    finally:
        for f in futures:
            f.cancel()  # a helper that has not started yet has nothing left to do
        wait(futures)
    for f in futures:
        if not f.cancelled() and (exc := f.exception()) is not None:
            raise exc


# -- float32 <-> float16 -----------------------------------------------------------------------------
# numpy converts half floats one element at a time (~7 ns each); onnxruntime's Cast kernel is
# vectorised (MLAS: F16C on x86-64, NEON fcvt on aarch64) and rounds the same way (IEEE
# round-to-nearest-even, overflow to inf). One single-threaded session per direction, built on
# first use; below _ORT_MIN elements numpy's cast is faster than a session call.
_ORT_MIN = 2048
_casts: dict[str, Any] = {}
_cast_lock = threading.Lock()


def _cast_session(to: str) -> Any:
    s = _casts.get(to)
    if s is not None:
        return s
    with _cast_lock:
        if to not in _casts:
            try:
                import onnxruntime as ort
                from onnx import TensorProto, helper

                from .onnxio import BUILT_IR_VERSION

                src, dst = (
                    (TensorProto.FLOAT, TensorProto.FLOAT16)
                    if to == "float16"
                    else (TensorProto.FLOAT16, TensorProto.FLOAT)
                )
                graph = helper.make_graph(
                    [helper.make_node("Cast", ["x"], ["y"], to=dst)],
                    "cast",
                    [helper.make_tensor_value_info("x", src, None)],
                    [helper.make_tensor_value_info("y", dst, None)],
                )
                model = helper.make_model(
                    graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=BUILT_IR_VERSION
                )
                so = ort.SessionOptions()
                so.intra_op_num_threads = 1
                so.inter_op_num_threads = 1
                so.enable_cpu_mem_arena = False
                so.log_severity_level = 3
                so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                _casts[to] = ort.InferenceSession(
                    model.SerializeToString(), so, providers=["CPUExecutionProvider"]
                )
            except Exception:  # an onnxruntime build without the kernel: numpy casts instead
                _casts[to] = False
        return _casts[to]


def _to_float16(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.float32 and x.size >= _ORT_MIN and (s := _cast_session("float16")):
        return s.run(None, {"x": x})[0]
    with np.errstate(over="ignore"):  # past float16's range is ±inf, as onnxruntime's Cast gives it
        return x.astype(np.float16, copy=False)


# float16 rounds a value this large (or larger) to infinity: 65504 is its largest, 65536 the next power
F16_INFINITE = 65520.0


def _made_infinite(x: np.ndarray, half: np.ndarray) -> bool:
    """Whether a float16 cast made an infinity of a finite value: such a tensor goes exact, as one with
    an infinity goes exact under a quantiser. A float16 codec put ``inf`` where an activation passed
    65504, and the tail computed from it in silence. A pass over the halves' exponent bits, not over the
    float32 tensor: every float16 payload pays for it."""
    if x.dtype == np.float16 or not x.size:
        return False
    u = half.reshape(-1).view(np.uint16)
    if int(np.bitwise_and(u, 0x7FFF).max()) < 0x7C00:
        return False  # no infinity and no NaN: the common case
    # an infinity or NaN of the tensor's own stays what it was (an attention mask's -inf)
    return bool((np.isinf(half) & ~np.isinf(x.reshape(half.shape))).any())


def _from_float16(h: np.ndarray) -> np.ndarray:
    """float16 (any alignment, read-only is fine) to a new float32 array."""
    if h.size >= _ORT_MIN and (s := _cast_session("float32")):
        return s.run(None, {"x": h})[0]
    return h.astype(np.float32)


def _as_float32(x: np.ndarray, copy: bool = False) -> np.ndarray:
    """``x`` as float32 for a quantiser: a float16 tensor through onnxruntime's Cast (numpy's per-element
    half conversion took 0.65 ms of a 1 ms int8 encode of a 400 KB half tensor, 10x the float32 one)."""
    if x.dtype == np.float16:
        return _from_float16(x)
    with np.errstate(over="ignore"):  # a float64 past float32's range: infinite, and sent exact (_NotFinite)
        return x.astype(np.float32, copy=copy)


def _reset_after_fork() -> None:
    global _pool
    _pool = None
    _casts.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


# -- the zstd stage --------------------------------------------------------------------------------
ZSTD_CHUNK = 128 * 1024
# Frame parameters for quantised activations (measured in benchmarks/bench_codecs.py against level 1,
# negative levels and others): the fast strategy with a 256-entry hash table and 7-byte minimum
# matches skips the short, useless matches of noisy low bytes and leaves them to the Huffman
# literal coder, which is where these bodies compress. ~1.3x faster both ways than level 1, and
# smaller. Any zstd decoder reads these frames; other encoders may use any parameters.
ZSTD_PARAMS = zstandard.ZstdCompressionParameters(
    strategy=zstandard.STRATEGY_FAST, window_log=17, hash_log=8, min_match=7, target_length=0
)
# A frame declaring a larger window (never needed for a 128 KiB chunk; zstd levels up to 19 stay
# within it even without a content size) is refused rather than allocated for.
ZSTD_MAX_WINDOW = 2**23
_local = threading.local()


def _zc() -> zstandard.ZstdCompressor:
    if not hasattr(_local, "zc"):
        _local.zc = zstandard.ZstdCompressor(compression_params=ZSTD_PARAMS)
    return _local.zc


def _zd() -> zstandard.ZstdDecompressor:
    if not hasattr(_local, "zd"):
        _local.zd = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
    return _local.zd


def _chunks(n: int) -> list[tuple[int, int]]:
    return [(i, min(i + ZSTD_CHUNK, n)) for i in range(0, n, ZSTD_CHUNK)] or [(0, 0)]


def _zstd_frames(body: np.ndarray) -> list[bytes]:
    """One zstd frame per 128 KiB chunk of ``body`` (flat uint8)."""
    spans = _chunks(body.size)
    view = body.data
    frames: list[bytes] = [b""] * len(spans)

    def one(i: int) -> None:
        a, b = spans[i]
        frames[i] = _zc().compress(view[a:b])

    _parallel(one, len(spans))
    return frames


def _zstd_decompress_into(stored: bytes | memoryview, out: memoryview) -> None:
    """Decompress the chunk table and frames in ``stored`` into ``out`` (exactly ``raw_len`` bytes)."""
    raw_len = len(out)
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
    offs = [4 + 4 * n]
    for s in sizes:
        offs.append(offs[-1] + s)

    def one(i: int) -> None:
        a, b = spans[i]
        frame = stored[offs[i] : offs[i + 1]]
        try:  # one frame, bounded to its chunk's size before anything is allocated for more
            # python-zstandard allocates what a frame header declares and reads max_output_size only
            # when it declares nothing: a 100 KB frame claiming 4 GB of zeros was allocated in full
            declared = zstandard.frame_content_size(frame)
            if declared not in (-1, b - a):
                raise CodecError(
                    f"zstd stage is corrupt: chunk {i} declares {declared} bytes, expected {b - a}"
                )
            data = _zd().decompress(frame, max_output_size=b - a, allow_extra_data=False)
        except zstandard.ZstdError as exc:
            raise CodecError(f"zstd stage is corrupt: chunk {i}: {exc}") from exc
        if len(data) != b - a:
            raise CodecError(f"zstd stage is corrupt: chunk {i} gave {len(data)} bytes, expected {b - a}")
        out[a:b] = data

    _parallel(one, n)


# -- copies ----------------------------------------------------------------------------------------
# Copies: x86 cores stall a forward copy whose destination lies 1-64 bytes past its source modulo 4 KiB
# ("4K aliasing": each load seems to depend on the store just made), ~10x slower. Payload headers
# are 31+8n+4p bytes, so a payload and an array allocated alike often sit just so; the side this
# code allocates moves by _SLACK bytes out of the way.
_SLACK = 80  # a multiple of 16: arrays keep numpy's alignment
_PLACE_MIN = 32 * 1024  # smaller copies take microseconds either way


def _address(buf: bytearray | np.ndarray) -> int:
    return (buf if isinstance(buf, np.ndarray) else np.frombuffer(buf, np.uint8)).ctypes.data


def _aliased(dst: int, src: int) -> bool:
    return 0 < (dst - src) % 4096 <= 64


def _payload_buffer(size: int, at: int, src: np.ndarray) -> bytearray:
    """A zeroed ``size``-byte payload whose byte ``at`` (where ``src`` will be copied to) is placed
    for a fast copy."""
    if src.nbytes < _PLACE_MIN:
        return bytearray(size)
    buf = bytearray(size + _SLACK)
    if _aliased(_address(buf) + at, _address(src)):
        del buf[:_SLACK]  # O(1): a bytearray advances its start
    else:
        del buf[size:]
    return buf


# onnxruntime's own buffers are 64-byte aligned, and its kernels sum a tensor in an order that follows
# its address: a ReduceSum fed a decoded cut tensor 8 bytes off that (where a ZeroMQ frame's body lies)
# gave 1-2 ulp off the whole model's output, where the float32 codec is exact. Decoded tensors lie so too
ALIGN = 64


def _aligned_empty(nbytes: int, src: int | None = None) -> np.ndarray:
    """A new flat uint8 array of ``nbytes`` at an ALIGN-byte boundary, placed for a fast copy from
    address ``src`` where one is given."""
    raw = np.empty(nbytes + ALIGN + 2 * ALIGN, np.uint8)
    k = (-_address(raw)) % ALIGN
    if src is not None and nbytes >= _PLACE_MIN and _aliased(_address(raw) + k, src):
        k += 2 * ALIGN
    return raw[k : k + nbytes]


def aligned(a: np.ndarray) -> np.ndarray:
    """``a`` where it lies at an ALIGN-byte boundary (or holds no floats: integer sums have no order to
    differ in), else an aligned copy of it."""
    if a.size == 0 or a.dtype.kind != "f" or a.ctypes.data % ALIGN == 0:
        return a
    out = _aligned_empty(a.nbytes, a.ctypes.data).view(a.dtype).reshape(a.shape)
    np.copyto(out, a)
    return out


def _empty_for(nbytes: int, src: np.ndarray) -> np.ndarray:
    """A new flat uint8 array of ``nbytes`` that a copy from ``src`` fills at full speed, aligned as
    onnxruntime's own buffers are."""
    return _aligned_empty(nbytes, _address(src))


def _scratch(n: int, src: int) -> np.ndarray:
    """A float32 scratch of ``n`` elements (a block), this thread's own and kept, placed for a fast
    copy from address ``src``; blocks larger than _BLOCK (long rows) get a new one."""
    if 4 * n < _PLACE_MIN:
        return np.empty(n, np.float32)
    kept = getattr(_local, "scratch", None)
    if kept is None or kept[0].size < 4 * n + _SLACK:
        buf = np.empty(max(4 * n, 4 * _BLOCK) + _SLACK, np.uint8)
        kept = (buf, _address(buf))
        if n <= _BLOCK:
            _local.scratch = kept
    buf, at = kept
    k = _SLACK if _aliased(at, src) else 0
    return buf[k : k + 4 * n].view(np.float32)


def _copy_out(body: bytes | memoryview, nbytes: int) -> np.ndarray:
    """A new flat uint8 array holding the first ``nbytes`` of ``body``."""
    src = np.frombuffer(body, np.uint8, nbytes)
    out = _empty_for(nbytes, src)
    out[:] = src
    return out


# -- quantisers: vectorised, in blocks that stay in cache ----------------------------------------


class _NotFinite(Exception):
    """A quantiser met a range it cannot put on a grid: an infinity or NaN in the tensor (or a span
    beyond float32). ``encode`` sends such a tensor exactly instead."""


_BLOCK = 1 << 18  # elements per block: a 1 MiB float32 scratch (measured best of 16 Ki to 1 Mi)


def _ranges(x: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    if axis is None:
        return np.array([x.min()], np.float32), np.array([x.max()], np.float32)
    red = tuple(i for i in range(x.ndim) if i != axis)
    return x.min(axis=red).astype(np.float32, copy=False), x.max(axis=red).astype(np.float32, copy=False)


def _rows(shape: tuple, axis: int | None) -> tuple[int, int]:
    """The tensor as (rows, cols), one scale and offset per row: one row per tensor, or one per
    (outer index, channel) pair."""
    n = math.prod(shape)
    rows = 1 if axis is None else math.prod(shape[: axis + 1])
    return rows, n // rows if rows else 0  # an empty tensor (a batch of 0) has no rows


def _blocks(rows: int, cols: int) -> list[tuple[slice, slice]]:
    """(rows, cols) in pieces of about _BLOCK elements: whole rows, or pieces of a single row."""
    if rows * cols <= _BLOCK:
        return [(slice(None), slice(None))]
    if rows == 1:
        return [(slice(0, 1), slice(i, min(i + _BLOCK, cols))) for i in range(0, cols, _BLOCK)]
    step = max(1, _BLOCK // cols)
    return [(slice(i, min(i + step, rows)), slice(0, cols)) for i in range(0, rows, step)]


# a step smaller than float32's smallest normal number (a range of denormals, 4e-40 wide in a PP-OCR
# recogniser's channel) has no finite reciprocal: such a range, as one of width 0, is sent as its minimum
# (scale 1, every level 0), off by less than 1e-35, where its infinite reciprocal made NaNs on the grid
_NORMAL_SCALE = np.float32(np.finfo(np.float32).tiny)


def _quantise_into(x: np.ndarray, levels: int, axis: int | None, q: np.ndarray) -> np.ndarray:
    """Write ``trunc(x·r + (0.5 − lo·r))`` (flat uint8, x.size) into ``q``; return scales, offsets.

    ``x`` is float32. The float32 arithmetic is the documented rounding: one multiply, one add,
    truncation by the cast to uint8, which lands in [0, levels]. It runs in blocks whose float32
    scratch (1 MiB) stays in cache, and writes straight into ``q`` (a view of the payload), on the
    calling thread: handing blocks to another core cost more than it saved (measured)."""
    rows, cols = _rows(x.shape, axis)
    r: Any  # a float32 scalar per tensor, a column of them per channel
    a: Any
    if rows == 1:  # per tensor: float32 scalars, the same arithmetic with less overhead
        lo, hi = np.minimum.reduce(x, axis=None), np.maximum.reduce(x, axis=None)
        with np.errstate(over="ignore", invalid="ignore"):
            scale = (hi - lo) / np.float32(levels)
        if not (math.isfinite(scale) and math.isfinite(lo)):
            raise _NotFinite
        if scale < _NORMAL_SCALE:
            scale = np.float32(1.0)
        r = np.float32(1.0) / scale
        a = np.float32(0.5) - lo * r
        params = np.array([scale, lo], np.float32)
    else:  # per channel: one column of r and a per row
        lo_c, hi_c = _ranges(x, axis)
        with np.errstate(over="ignore", invalid="ignore"):
            scale_c = (hi_c - lo_c) / np.float32(levels)
        if not (np.isfinite(scale_c).all() and np.isfinite(lo_c).all()):
            raise _NotFinite
        scale_c[scale_c < _NORMAL_SCALE] = 1.0
        inv_c = np.float32(1.0) / scale_c
        reps = rows // scale_c.size
        a_c = np.float32(0.5) - lo_c * inv_c
        r = (inv_c if reps == 1 else np.tile(inv_c, reps)).reshape(-1, 1)
        a = (a_c if reps == 1 else np.tile(a_c, reps)).reshape(-1, 1)
        params = np.concatenate([scale_c, lo_c])
    if rows == 1 and x.size <= _BLOCK:  # one block: fewer calls
        t = _scratch(x.size, _address(x)).reshape(x.shape)
        np.multiply(x, r, out=t)
        np.add(t, a, out=t)
        np.copyto(q.reshape(x.shape), t, casting="unsafe")
        return params
    x2, q2 = x.reshape(rows, cols), q.reshape(rows, cols)
    base = _address(x)
    for rs, cs in _blocks(rows, cols):
        xb = x2[rs, cs]
        t = _scratch(xb.size, base + 4 * ((rs.start or 0) * cols + (cs.start or 0))).reshape(xb.shape)
        np.multiply(xb, r if rows == 1 else r[rs], out=t)
        np.add(t, a if rows == 1 else a[rs], out=t)
        np.copyto(q2[rs, cs], t, casting="unsafe")
    return params


def _dequantise(
    q: np.ndarray, scale: np.ndarray, lo: np.ndarray, shape: tuple, axis: int | None
) -> np.ndarray:
    """``q · scale + offset`` in float32 (q flat uint8 of the tensor's size) as a new array; ``scale``
    and ``lo`` hold one value per tensor or per channel."""
    rows, cols = _rows(shape, axis)
    out = _aligned_empty(4 * int(np.prod(shape, dtype=np.int64))).view(np.float32).reshape(shape)
    if rows == 1 and cols <= _BLOCK:  # one block: fewer calls
        np.copyto(out, q.reshape(shape))
        np.multiply(out, scale[0], out=out)
        np.add(out, lo[0], out=out)
        return out
    o2, q2 = out.reshape(rows, cols), q.reshape(rows, cols)
    if rows > 1:
        reps = rows // scale.size
        if reps > 1:
            scale, lo = np.tile(scale, reps), np.tile(lo, reps)
        scale, lo = scale.reshape(-1, 1), lo.reshape(-1, 1)
    for rs, cs in _blocks(rows, cols):
        ob = o2[rs, cs]
        np.copyto(ob, q2[rs, cs])
        np.multiply(ob, scale if rows == 1 else scale[rs], out=ob)
        np.add(ob, lo if rows == 1 else lo[rs], out=ob)
    return out


# elements each channel's scale and offset (8 bytes) must cover for a per-channel layout: fewer, and the
# parameters outweigh the body (a [1, 1024] feature vector at int4 sent a pair per element: 8.5 KiB, twice
# its float32, and lossless)
MIN_CHANNEL_ELEMENTS = 16


def _channel_axis(x: np.ndarray) -> int | None:
    """Axis 1 (a CNN's channels, a decoder's tokens) where each channel holds enough elements, else the
    whole tensor shares one pair."""
    if x.ndim < 2 or x.shape[1] == 0 or x.size // x.shape[1] < MIN_CHANNEL_ELEMENTS:
        return None
    return 1


def _expected_body(base: str, n: int, itemsize: int) -> int:
    return {
        "float32": n * itemsize,
        "float16": n * 2,
        "int8": n,
        "int8-ch": n,
        "int4": (n + 1) // 2,
        "int4-ol": (n + 1) // 2,
        "int8-ol": n,
    }[base]


def outlier_columns(x: np.ndarray) -> np.ndarray:
    """The columns of the last axis that ``int4-ol``/``int8-ol`` send exact (sorted u32 indices)."""
    if x.ndim == 0 or x.shape[-1] < 2 or x.size == 0:
        return np.zeros(0, np.uint32)
    peak = np.abs(x.reshape(-1, x.shape[-1])).max(axis=0)
    cap = max(1, x.shape[-1] // OUTLIER_SHARE)
    order = np.argsort(-peak, kind="stable")[:cap]
    with np.errstate(over="ignore", invalid="ignore"):  # a bar of inf keeps no finite column out
        big = order[peak[order] > OUTLIER_RATIO * np.median(peak)]
    return np.sort(big).astype(np.uint32)


_PACK_U16_MIN = 16384  # int4 elements: below, two strided calls beat five contiguous ones


def _quantised_body(x: np.ndarray, base: str, axis: int | None, out: np.ndarray) -> np.ndarray:
    """Write an int8/int8-ch/int4 body into ``out`` (flat uint8); return the parameters. (The *-ol
    bases arrive with their outlier columns zeroed.)"""
    x = _as_float32(x)
    if base in ("int8", "int8-ch", "int8-ol"):
        return _quantise_into(x, 255, axis, out)
    n = x.size  # int4: two values per byte, the first in the low nibble
    q = np.empty(n + n % 2, np.uint8)
    params = _quantise_into(x, 15, axis, q[:n])
    q[n:] = 0
    if n < _PACK_U16_MIN:  # two calls
        np.left_shift(q[1::2], 4, out=out)
        np.bitwise_or(out, q[0::2], out=out)
        return params
    # each pair as one little-endian u16 lo + 256·hi (both < 16): its low byte of v | v >> 4 is lo + 16·hi;
    # contiguous passes, where strided uint8 ones are ~5x slower
    v = q.view("<u2")
    t = np.right_shift(v, 4)
    np.bitwise_or(t, v, out=t)
    np.copyto(out, t, casting="unsafe")  # keeps the low byte
    return params


def encode(x: np.ndarray, codec: str | Codec) -> bytearray:
    """Encode one tensor into a payload (a ``bytearray``: send it as it is, or ``bytes()`` it).

    Non-float tensors (indices, masks) are always sent exactly, and so is a float tensor holding an
    infinity or a NaN that a quantising codec was asked for: an attention mask's -inf has no place on a
    quantisation grid, and the header says what the body is, so the receiver needs no warning."""
    c = codec if isinstance(codec, Codec) else Codec.parse(codec)
    try:
        return _encode(x, c)
    except _NotFinite:
        return _encode(x, Codec("float32", c.stage))


# a float tensor this small goes exact whatever was asked: a dynamically quantised model's scale, a
# temperature, a box count as float. Quantised, it saves at most a few bytes on a payload whose header is
# tens, and its error reaches every element the scale multiplies (float16 put 5e-4 on such a model's
# output, twice int8's on the tensors it scales)
SMALL_EXACT_ELEMENTS = 4


def applied(x: np.ndarray, codec: Codec) -> Codec:
    """The codec ``encode`` applies to ``x`` for its type: non-float, empty and tiny
    (``SMALL_EXACT_ELEMENTS``) tensors go exact (``float32``, the same lossless stage) whatever was asked.
    Two codecs that apply alike to a tensor encode it to the same bytes, so a caller sizing many codecs
    sizes each applied one once."""
    lossy = x.dtype.kind == "f" and x.size > SMALL_EXACT_ELEMENTS
    return codec if lossy else Codec("float32", codec.stage)


def applied_to(codec: str, dtypes: list[str]) -> str:
    """The codec as ``applied`` makes it for tensors of these types sent together, by name: where none is
    a float (token ids), the lossless codec of its stage, which is what goes on the wire."""
    c = Codec.parse(codec)
    return c.name if any(np.dtype(d).kind == "f" for d in dtypes) else Codec("float32", c.stage).name


def encoded_size(x: np.ndarray, codec: str | Codec) -> int:
    """``len(encode(x, codec))``, without encoding where the size follows from the shape alone (no
    entropy stage, no outlier columns, finite values): the planner sizes every tensor that crosses a
    cut on every sample for every codec, and encoding them all to count bytes took half its time."""
    c = codec if isinstance(codec, Codec) else Codec.parse(codec)
    x = np.asarray(x)
    if c.stage or c.base in OUTLIER_BASES or x.dtype not in _DTYPE_IDS:
        return len(encode(x, c))
    base, _, nparams, raw_len, _, at_body = _layout(x, c)
    if base not in ("float32", "float16") and not _finite_as_float32(x):
        return len(encode(x, c))  # a quantising codec sends such a tensor exactly: as float32
    if base == "float16" and x.dtype != np.float16:
        with np.errstate(invalid="ignore"):
            peak = np.max(np.abs(x), initial=0.0)
        if not peak < F16_INFINITE:  # past float16's range (or NaN): encode says how it goes
            return len(encode(x, c))
    return at_body + raw_len


def _finite_as_float32(x: np.ndarray) -> bool:
    """Whether a quantiser, which works in float32, sees only finite values and a finite span between
    them (a float64 past float32's range does not, nor [-3e38, 3e38], whose step overflows): where not,
    it sends the tensor exact (``_NotFinite``)."""
    if not x.size:
        return True
    with np.errstate(over="ignore", invalid="ignore"):
        y = x.astype(np.float32, copy=False)
        return bool(np.isfinite(y.max() - y.min()))  # NaN and infinities reach the difference too


def _layout(x: np.ndarray, c: Codec) -> tuple[str, int | None, int, int, int, int]:
    """(base, channel axis, parameters, body bytes, where the parameters start, where the body starts
    before any outlier columns) of ``x`` encoded with ``c``: fixed by its dtype and shape."""
    base = applied(x, c).base  # exact passthrough for non-floats
    axis = None if base in ("float32", "float16", "int8") else _channel_axis(x)
    nparams = 0 if base in ("float32", "float16") else 2 * (x.shape[axis] if axis is not None else 1)
    raw_len = _expected_body(base, x.size, x.itemsize)
    at_params = _HEAD.size + 8 * x.ndim + 4
    return base, axis, nparams, raw_len, at_params, at_params + 4 * nparams


def _encode(x: np.ndarray, c: Codec) -> bytearray:
    x = np.asarray(x, order="C")  # (ascontiguousarray would turn a scalar into 1-d)
    if not x.dtype.isnative:  # bodies are written in native order (little-endian on supported hosts)
        x = x.astype(x.dtype.newbyteorder("="))
    dtype_id = _DTYPE_IDS.get(x.dtype)
    if dtype_id is None:
        raise CodecError(f"cannot encode dtype {x.dtype}")
    base, axis, nparams, raw_len, at_params, at_body = _layout(x, c)
    outliers = b""
    if base in OUTLIER_BASES:  # the outlier columns go exact; the rest is quantised with them at 0
        if x.dtype == np.float16:  # one fast cast, not numpy's per-element half arithmetic in each pass
            x = _as_float32(x)
        cols = outlier_columns(x)
        outliers = struct.pack("<I", len(cols))
        if len(cols):
            with np.errstate(over="ignore"):  # a float64 past float32's range: not finite, sent exact
                exact = np.ascontiguousarray(x[..., cols], dtype="<f4")
            if not np.isfinite(exact).all():
                raise _NotFinite
            outliers += cols.astype("<u4").tobytes() + exact.tobytes()
            x = _as_float32(x, copy=True)
            x[..., cols] = 0
        at_body += len(outliers)
    frames: list[bytes] = []
    params = _NO_PARAMS
    if base in ("float32", "float16"):  # the body is the bytes of an array: copied once, or compressed
        half = _to_float16(x) if base == "float16" else x
        if base == "float16" and _made_infinite(x, half):
            raise _NotFinite
        body = half.reshape(-1).view(np.uint8)
        if c.stage == "":
            buf = _payload_buffer(at_body + raw_len, at_body, body)
            memoryview(buf)[at_body:] = body.data
    elif c.stage == "":  # the quantiser writes straight into the payload
        buf = bytearray(at_body + raw_len)
        params = _quantised_body(x, base, axis, np.frombuffer(buf, np.uint8, raw_len, at_body))
    else:
        body = np.empty(raw_len, np.uint8)
        params = _quantised_body(x, base, axis, body)
    if c.stage == "":
        stored = raw_len
    else:
        if c.stage == "zstd":
            frames = _zstd_frames(body)
            frames.insert(0, struct.pack(f"<I{len(frames)}I", len(frames), *map(len, frames)))
        else:
            frames = [lz4.block.compress(body.data, store_size=False)]
        stored = sum(map(len, frames))
        buf = bytearray(at_body + stored)
        mv = memoryview(buf)
        at = at_body
        for f in frames:
            mv[at : at + len(f)] = f
            at += len(f)
    _HEAD.pack_into(
        buf,
        0,
        MAGIC,
        VERSION,
        BASES.index(base),
        STAGES.index(c.stage),
        dtype_id,
        x.ndim,
        -1 if axis is None else axis,
        raw_len,
        stored,
    )
    struct.pack_into(f"<{x.ndim}QI", buf, _HEAD.size, *x.shape, nparams)
    if nparams:
        buf[at_params : at_params + 4 * nparams] = params.astype("<f4").tobytes()
    if outliers:
        buf[at_body - len(outliers) : at_body] = outliers
    return buf


def _float32(v: float) -> float | None:
    """``v`` rounded to float32 (struct rounds as a C cast does), or None where that overflows."""
    try:
        return struct.unpack("<f", struct.pack("<f", v))[0] if math.isfinite(v) else None
    except OverflowError:
        return None


def _check_params(buf: memoryview, off: int, nparams: int, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Scales and offsets at ``off``: finite, scales >= 0, and ``offset + levels · scale`` finite in float32
    arithmetic, or CodecError."""
    if nparams == 0:
        return _NO_PARAMS, _NO_PARAMS
    if nparams == 2:  # per tensor (the common case): plain floats, the same float32 checks, less overhead
        s, lo = struct.unpack_from("<2f", buf, off)
        if not (math.isfinite(s) and math.isfinite(lo)):
            raise CodecError("quantisation parameters are not finite")
        # levels · s is exact in a double (8 by 24 bits), so rounding it gives the float32 product, and a
        # double sum of two float32 values rounds to their float32 sum
        step = _float32(levels * s)
        if s < 0 or step is None or _float32(lo + step) is None:
            raise CodecError("quantisation parameters out of range (negative scale or values beyond float32)")
        return np.array([s], np.float32), np.array([lo], np.float32)
    params = np.frombuffer(buf, "<f4", nparams, off).astype(np.float32)
    if not np.isfinite(params).all():
        raise CodecError("quantisation parameters are not finite")
    scale, lo_c = params[: nparams // 2], params[nparams // 2 :]
    with np.errstate(over="ignore"):
        top = lo_c + levels * scale
    if (scale < 0).any() or not np.isfinite(top).all():
        raise CodecError("quantisation parameters out of range (negative scale or values beyond float32)")
    return scale, lo_c


def decode(
    payload: bytes | bytearray | memoryview, max_bytes: int = DEFAULT_MAX_BYTES, copy: bool = True
) -> np.ndarray:
    """Decode a payload, refusing anything inconsistent before allocating for it.

    The result never shares memory with ``payload``, unless ``copy`` is off: then a plain ``float32``
    payload comes back as a read-only view of its body (a server feeding the tensor straight to its
    session saves a copy of it: 0.5 ms of 4 MiB, measured). A ``float32+lz4`` result is read-only."""
    buf = memoryview(payload)
    if len(buf) < _HEAD.size:
        raise CodecError(f"payload truncated: {len(buf)} bytes, header needs {_HEAD.size}")
    magic, version, base_i, stage_i, dtype_i, ndim, axis, raw_len, stored = _HEAD.unpack_from(buf, 0)
    if magic != MAGIC:
        raise CodecError(f"not a SplitPoint tensor payload (magic {bytes(magic)!r})")
    if version != VERSION:
        raise CodecError(unsupported_version("tensor payload version", version, (VERSION,)))
    if base_i >= len(BASES) or stage_i >= len(STAGES) or dtype_i >= len(DTYPES):
        raise CodecError(f"unknown codec/dtype ids in header ({base_i}, {stage_i}, {dtype_i})")
    if ndim > MAX_NDIM:
        raise CodecError(f"header claims {ndim} dimensions (max {MAX_NDIM})")
    base, stage, dtype = BASES[base_i], STAGES[stage_i], _NP_DTYPES[dtype_i]
    off = _HEAD.size
    if len(buf) < off + 8 * ndim + 4:
        raise CodecError("payload truncated inside the shape")
    shape = struct.unpack_from(f"<{ndim}Q", buf, off)
    off += 8 * ndim
    n = math.prod(shape)  # at most 8 sizes under 2^64: exact, and an empty one needs no bytes
    if n * dtype.itemsize > max_bytes:
        raise CodecTooLarge(f"header claims shape {shape} ({dtype}), above the {max_bytes}-byte cap")
    if n == 0 and any(d > max_bytes for d in shape):  # empty, but no array can have such a dimension
        raise CodecError(f"header claims shape {shape}: an empty tensor with a dimension past any size")
    if base != "float32" and dtype.kind != "f":
        raise CodecError(f"codec {base} cannot carry dtype {dtype}")
    if not (-1 <= axis < max(ndim, 1)):
        raise CodecError(f"channel axis {axis} out of range for {ndim} dimensions")
    if axis != -1 and base in ("float32", "float16", "int8"):
        raise CodecError(f"codec {base} has no channels: its axis byte must be -1, not {axis}")
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
    scale, lo = _check_params(buf, off, nparams, 15 if base.startswith("int4") else 255)
    off += 4 * nparams
    cols = exact = None
    if base in OUTLIER_BASES:
        cols, exact, off = _read_outliers(buf, off, shape, n)
    expected = _expected_body(base, n, dtype.itemsize)
    if raw_len != expected:
        raise CodecError(f"header says {raw_len} body bytes, but {base} of shape {shape} needs {expected}")
    if stage == "" and stored != raw_len:
        raise CodecError(
            f"header says {stored} stored bytes; with no lossless stage the body is raw_len {raw_len}"
        )
    body: bytes | memoryview = buf[off:]
    if len(body) != stored:
        raise CodecError(f"payload truncated or padded: header says {stored} stored bytes, got {len(body)}")
    if stage == "zstd":
        if base == "float32":  # decompress straight into the result
            out = _aligned_empty(raw_len).view(dtype).reshape(shape)
            _zstd_decompress_into(body, out.reshape(-1).view(np.uint8).data)
            return _true_bools(out)
        raw = np.empty(raw_len, np.uint8)
        _zstd_decompress_into(body, raw.data)
        body = raw.data
    elif stage == "lz4":
        try:
            body = lz4.block.decompress(body, uncompressed_size=raw_len)
        except lz4.block.LZ4BlockError as exc:
            raise CodecError(f"lz4 stage is corrupt: {exc}") from exc
        if len(body) != raw_len:
            raise CodecError(f"lossless stage produced {len(body)} bytes, header says {raw_len}")
    if n == 0:  # an empty tensor (a batch of 0): its header checked, nothing to dequantise
        return np.empty(shape, dtype)
    ax = None if axis < 0 else axis
    if base == "float32":
        if stage == "":
            if not copy:  # a view where it lies aligned (a copy of a misaligned float tensor)
                return _true_bools(aligned(np.frombuffer(body, dtype, n).reshape(shape)))
            return _true_bools(_copy_out(body, raw_len).view(dtype).reshape(shape))
        # lz4's own (read-only) bytes, copied where they lie misaligned
        return _true_bools(aligned(np.frombuffer(body, dtype, n).reshape(shape)))
    if base == "float16":
        if dtype == np.float16:
            return _copy_out(body, raw_len).view(dtype).reshape(shape)
        h = np.frombuffer(body, np.float16, n).reshape(shape)
        return aligned(_from_float16(h) if dtype == np.float32 else h.astype(dtype))
    if base in ("int8", "int8-ch", "int8-ol"):
        q = np.frombuffer(body, np.uint8, n)
    else:
        q = _unpack_int4(np.frombuffer(body, np.uint8), n)
    out = _dequantise(q[:n], scale, lo, shape, ax)
    if cols is not None and len(cols):
        out[..., cols] = exact
    return aligned(_to_float16(out) if dtype == np.float16 else out.astype(dtype, copy=False))


def _true_bools(a: np.ndarray) -> np.ndarray:
    """A bool tensor whose bytes are 0 and 1 only, else CodecError: numpy and onnxruntime take any other
    byte as a bool that is neither (Not of byte 2 gave 3, "true"; a cast to int64 gave 2)."""
    if a.dtype == np.bool_ and a.size and int(a.view(np.uint8).max()) > 1:
        raise CodecError("a bool tensor holds bytes other than 0 and 1")
    return a


def _unpack_int4(packed: np.ndarray, n: int) -> np.ndarray:
    """Two values per byte, the first in the low nibble, as one uint8 per value (at least ``n``)."""
    if n < _PACK_U16_MIN:
        q = np.empty(packed.size * 2, np.uint8)
        np.bitwise_and(packed, 0x0F, out=q[0::2])
        np.right_shift(packed, 4, out=q[1::2])
    else:  # each byte b as the pair (b & 15, b >> 4), one u16 (b & 15) + 256·(b >> 4): contiguous passes
        t = np.empty(packed.size, "<u2")
        np.copyto(t, packed)
        hi = np.right_shift(t, 4)
        np.left_shift(hi, 8, out=hi)
        np.bitwise_and(t, 0x0F, out=t)
        np.bitwise_or(t, hi, out=t)
        q = t.view(np.uint8)
    return q


def _read_outliers(buf: memoryview, off: int, shape: tuple, n: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The *-ol bases' outlier section at ``off``: the columns (strictly increasing, inside the last axis) and
    their exact values (finite), and the offset after it; or CodecError."""
    if len(buf) < off + 4:
        raise CodecError("payload truncated inside the outlier section")
    (k,) = struct.unpack_from("<I", buf, off)
    last = shape[-1] if shape else 1
    if k > (last if shape else 0):  # an empty tensor may name columns: it sends no values for them
        raise CodecError(
            f"outlier section names {k} columns, more than the last axis's {last if shape else 0}"
        )
    count = (n // last) * k if k else 0
    if len(buf) < off + 4 + 4 * k + 4 * count:
        raise CodecError("payload truncated inside the outlier section")
    cols = np.frombuffer(buf, "<u4", k, off + 4).astype(np.intp)
    if k and (cols[-1] >= last or (k > 1 and (np.diff(cols) <= 0).any())):
        raise CodecError("outlier columns must be strictly increasing and inside the last axis")
    exact = np.frombuffer(buf, "<f4", count, off + 4 + 4 * k).astype(np.float32)
    if not np.isfinite(exact).all():
        raise CodecError("outlier values are not finite")
    return cols, exact.reshape(*shape[:-1], k) if k else exact, off + 4 + 4 * k + 4 * count


def error_bound(x: np.ndarray, codec: str) -> float:
    """The largest absolute error a codec may introduce on ``x`` (half a quantisation step)."""
    c = Codec.parse(codec)
    if c.base == "float32" or x.dtype.kind != "f" or (c.base != "float16" and not np.isfinite(x).all()):
        return 0.0  # sent exactly
    if c.base == "float16":
        return float(np.abs(x[np.isfinite(x)]).max(initial=0)) * 2**-11 + 6e-8  # non-finite ones exact
    ax = None if c.base == "int8" else _channel_axis(x)
    y = x.astype(np.float32)
    if c.base in OUTLIER_BASES and len(cols := outlier_columns(x)):  # they arrive exact
        y[..., cols] = 0
    lo, hi = _ranges(y, ax)
    levels = 15 if c.base.startswith("int4") else 255
    # float32 arithmetic on the grid (x·r + a near 255 is rounded to 2^-16 of a step, twice) and on the
    # way back (q·scale + offset, to a float32 ulp of the largest magnitude)
    big = np.float32(max(float(np.abs(lo).max()), float(np.abs(hi).max())))
    bound = float(((hi - lo) / levels).max()) / 2 * (1 + 2e-4) + 4 * float(np.spacing(big)) + 1e-7
    if x.dtype == np.float16:  # decoded back to float16: one more rounding, half its ulp at the largest
        bound += float(big) * 2**-11 + 6e-8
    return bound
