"""Cut-tensor codecs: round trips within their bounds, and hostile payloads refused."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from splitpoint.core.codecs import _HEAD, CodecError, all_codecs, decode, encode, error_bound

RNG = np.random.default_rng(42)
TENSORS = {
    "nchw-relu": np.maximum(RNG.standard_normal((2, 16, 7, 9)), 0).astype(np.float32),
    "nc": RNG.standard_normal((3, 33)).astype(np.float32) * 5,
    "odd-1d": RNG.standard_normal(7).astype(np.float32),
    "constant": np.full((1, 4, 2, 2), 3.5, np.float32),
    "float16-in": RNG.standard_normal((1, 8, 4, 4)).astype(np.float16),
    "scalar": np.array(2.5, np.float32),
}


@pytest.mark.parametrize("codec", all_codecs())
@pytest.mark.parametrize("name", list(TENSORS))
def test_round_trip_within_error_bound(codec, name):
    x = TENSORS[name]
    y = decode(encode(x, codec))
    assert y.shape == x.shape and y.dtype == x.dtype
    err = float(np.abs(y.astype(np.float64) - x.astype(np.float64)).max()) if x.size else 0.0
    bound = error_bound(x, codec)
    if x.dtype == np.float16:
        bound += float(np.abs(x).max()) * 2**-10  # the float16 output itself rounds
    assert err <= bound, (codec, name, err, bound)
    if codec.startswith("float32"):
        assert np.array_equal(y, x)


@pytest.mark.parametrize("codec", ["int8+zstd", "int4", "float16+lz4"])
def test_non_float_tensors_pass_exactly(codec):
    for x in (np.arange(12, dtype=np.int64).reshape(3, 4), np.array([True, False, True])):
        y = decode(encode(x, codec))
        assert y.dtype == x.dtype and np.array_equal(x, y)


def test_compression_ratios_are_what_the_codec_promises():
    x = TENSORS["nchw-relu"]
    raw = len(encode(x, "float32"))
    assert len(encode(x, "float16")) < raw / 1.9
    assert len(encode(x, "int8")) < raw / 3.5
    assert len(encode(x, "int4")) < raw / 6
    assert len(encode(x, "int8+zstd")) < len(encode(x, "int8"))  # half the ReLU output is zero


def test_unknown_codec_is_named():
    with pytest.raises(CodecError, match="unknown codec 'int3'"):
        encode(TENSORS["nc"], "int3")


def _payload(codec="int8-ch+zstd"):
    return bytearray(encode(TENSORS["nchw-relu"], codec))


def test_truncation_anywhere_is_refused():
    for codec in ("float32", "int8-ch+zstd", "int4+lz4"):
        p = bytes(_payload(codec))
        for cut in range(len(p)):
            with pytest.raises(CodecError):
                decode(p[:cut])


def _patch_header(p: bytearray, **fields) -> bytes:
    names = ["magic", "version", "base", "stage", "dtype", "ndim", "axis", "raw_len", "stored"]
    vals = dict(zip(names, _HEAD.unpack_from(p, 0), strict=True))
    vals.update(fields)
    _HEAD.pack_into(p, 0, *[vals[n] for n in names])
    return bytes(p)


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"magic": b"XXXX"}, "not a SplitPoint tensor payload"),
        ({"version": 9}, "unsupported tensor payload version 9"),
        ({"base": 77}, "unknown codec/dtype ids"),
        ({"dtype": 3}, "cannot carry dtype int64"),
        ({"ndim": 40}, "claims 40 dimensions"),
        ({"raw_len": 10}, "header says 10 body bytes"),
        ({"stored": 5}, "truncated or padded"),
        ({"axis": 5}, "channel axis 5 out of range"),
    ],
)
def test_lying_headers_are_refused(fields, message):
    with pytest.raises(CodecError, match=message):
        decode(_patch_header(_payload(), **fields))


def test_shape_claiming_huge_tensor_is_refused_before_allocating():
    p = _payload("float32")
    off = _HEAD.size
    struct.pack_into("<Q", p, off, 2**40)  # first dim
    with pytest.raises(CodecError, match="above the .*-byte cap"):
        decode(bytes(p))
    with pytest.raises(CodecError, match="cap"):
        decode(encode(np.zeros((64, 1024), np.float32), "float32"), max_bytes=1024)


def test_corrupt_lossless_stage_and_bad_parameters():
    p = _payload("int8+zstd")
    p[-8:] = b"\xff" * 8
    with pytest.raises(CodecError, match="zstd stage is corrupt|lossless stage produced"):
        decode(bytes(p))
    p = _payload("int8+lz4")
    stored = _HEAD.unpack_from(p, 0)[8]
    p[len(p) - stored : len(p) - stored + 4] = b"\xff" * 4  # first token: literal run far past the end
    with pytest.raises(CodecError, match="lz4 stage is corrupt|lossless stage produced"):
        decode(bytes(p))
    p = _payload("int8")
    params_at = _HEAD.size + 8 * 4 + 4
    struct.pack_into("<f", p, params_at, float("nan"))
    with pytest.raises(CodecError, match="not finite"):
        decode(bytes(p))
    p = _payload("int8-ch")
    struct.pack_into("<I", p, _HEAD.size + 8 * 4, 3)
    with pytest.raises(CodecError, match="quantisation parameters"):
        decode(bytes(p))


def test_fuzzed_payloads_raise_codec_error_or_decode():
    rng = np.random.default_rng(0)
    base = [bytes(_payload(c)) for c in ("float32", "int8-ch+zstd", "int4+lz4", "float16")]
    for i in range(3000):
        p = bytearray(base[i % len(base)])
        for _ in range(rng.integers(1, 4)):
            p[rng.integers(0, len(p))] = rng.integers(0, 256)
        try:
            y = decode(bytes(p))
            assert isinstance(y, np.ndarray)
        except CodecError:
            pass
