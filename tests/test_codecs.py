"""Cut-tensor codecs: round trips within their bounds, and hostile payloads refused."""

from __future__ import annotations

import struct
import warnings

import numpy as np
import pytest

from splitpoint.core import codecs
from splitpoint.core.codecs import (
    _HEAD,
    Codec,
    CodecError,
    CodecTooLarge,
    all_codecs,
    decode,
    encode,
    encoded_size,
    error_bound,
)

RNG = np.random.default_rng(42)
TENSORS = {
    "nchw-relu": np.maximum(RNG.standard_normal((2, 16, 7, 9)), 0).astype(np.float32),
    "nc": RNG.standard_normal((3, 33)).astype(np.float32) * 5,
    "odd-1d": RNG.standard_normal(7).astype(np.float32),
    "constant": np.full((1, 4, 2, 2), 3.5, np.float32),
    "float16-in": RNG.standard_normal((1, 8, 4, 4)).astype(np.float16),
    "scalar": np.array(2.5, np.float32),
    "hidden-outliers": RNG.standard_normal((1, 16, 128)).astype(np.float32),
}
TENSORS["hidden-outliers"][..., [3, 40, 99]] *= [80, -60, 120]  # a decoder's few large channels


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
    rng = np.random.default_rng(0)
    pcm = rng.integers(-(2**15), 2**15, (1, 1600)).astype(np.int16)  # audio samples
    depth = rng.integers(0, 2**16, (1, 1, 8, 8)).astype(np.uint16)  # a depth camera's millimetres
    wide = [np.array([2**32 - 1, 7], np.uint32), np.array([2**64 - 1, 3], np.uint64)]
    for x in (np.arange(12, dtype=np.int64).reshape(3, 4), np.array([True, False, True]), pcm, depth, *wide):
        y = decode(encode(x, codec))
        assert y.dtype == x.dtype and np.array_equal(x, y)


@pytest.mark.parametrize("codec", all_codecs())
def test_masks_with_infinities_arrive_exactly(codec):
    """An attention mask (0 where a token is seen, -inf where it is padded or in the future) crosses a cut
    of most transformer exports; a quantising codec cannot put -inf on its grid, so the tensor goes exactly
    and the payload stays one a strict receiver accepts."""
    mask = np.triu(np.full((1, 1, 12, 12), -np.inf, np.float32), k=1)
    mask[..., 9:] = -np.inf  # three padded positions
    scores = RNG.standard_normal((1, 4, 12, 12)).astype(np.float32)
    scores[..., 9:] = -np.inf
    scores[0, 2, 3, 4] = np.nan
    for x in (mask, scores):
        y = decode(encode(x, codec))
        assert y.dtype == x.dtype and np.array_equal(~np.isfinite(y), ~np.isfinite(x)), codec
        if codec.startswith("float16"):  # half floats carry 0, -inf and NaN; the rest rounds
            assert np.array_equal(y[~np.isfinite(x)], x[~np.isfinite(x)], equal_nan=True)
            fin = np.isfinite(x)
            assert np.abs(y[fin] - x[fin]).max(initial=0) <= error_bound(x, codec)
        else:
            assert np.array_equal(y, x, equal_nan=True) and error_bound(x, codec) == 0.0, codec
    finite = np.where(np.isfinite(scores), scores, 0).astype(np.float32)
    if not codec.startswith(("float32", "float16")):  # a finite tensor is still quantised
        assert len(encode(finite, codec)) < len(encode(finite, "float32"))


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
    for codec in ("float32", "int8-ch+zstd", "int4+lz4", "int4-ol", "int8-ol+lz4"):
        p = bytes(encode(TENSORS["hidden-outliers"], codec))
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


@pytest.mark.parametrize("codec", ["float32", "float16", "int8", "int4"])
def test_a_body_must_be_exactly_raw_len_without_a_lossless_stage(codec):
    """``stored`` is checked against what follows, and without a stage against ``raw_len`` too: a short
    body (a buffer too small for the shape) and trailing bytes are both refused as malformed."""
    p = _payload(codec)
    raw_len = _HEAD.unpack_from(p, 0)[7]
    body_at = len(p) - raw_len
    with pytest.raises(CodecError, match="with no lossless stage the body is raw_len"):
        decode(_patch_header(bytearray(p[: body_at + 4]), stored=4))
    with pytest.raises(CodecError, match="with no lossless stage the body is raw_len"):
        decode(_patch_header(bytearray(p + b"\0" * 64), stored=raw_len + 64))


@pytest.mark.parametrize("codec", ["float32", "float16", "int8"])
def test_a_codec_without_channels_carries_axis_minus_one(codec):
    with pytest.raises(CodecError, match="its axis byte must be -1, not 1"):
        decode(_patch_header(_payload(codec), axis=1))


def test_an_empty_tensor_with_an_impossible_dimension_is_refused():
    """[0, 2^63, 1, 1] has no elements, so no byte cap stops it, but no array has such a dimension."""
    p = bytearray(encode(np.zeros((0, 1, 1, 1), np.float32), "float32"))
    struct.pack_into("<Q", p, _HEAD.size + 8, 2**63)
    with pytest.raises(CodecError, match="empty tensor with a dimension past any size"):
        decode(bytes(p))
    assert decode(encode(np.zeros((0, 5), np.float32), "int8")).shape == (0, 5)


@pytest.mark.parametrize("codec", all_codecs())
def test_an_empty_batch_round_trips_in_every_codec(codec):
    """A batch of 0 sent with a per-channel codec was a ZeroDivisionError (answered `internal`)."""
    x = np.zeros((0, 8, 4, 4), np.float32)
    y = decode(encode(x, codec))
    assert y.shape == x.shape and y.dtype == x.dtype


@pytest.mark.parametrize("codec", ["int8-ch", "int4"])
def test_an_empty_batch_with_channels_decodes_as_the_spec_writes_it(codec):
    """A client that writes a batch of 0 with its channel axis set (as protocol.md allows): the decoder
    divided by the number of rows, 0, and the server answered `internal`."""
    full = bytearray(encode(np.ones((2, 16, 8), np.float32), codec))
    f = list(_HEAD.unpack_from(full, 0))
    assert f[6] == 1  # the channel axis: 16 channels of 16 elements each
    params = bytes(full[_HEAD.size + 24 : _HEAD.size + 24 + 4 + 4 * 32])  # the count and 32 parameters
    f[7] = f[8] = 0  # no body
    empty = _HEAD.pack(*f) + struct.pack("<3Q", 0, 16, 8) + params
    y = decode(empty)
    assert y.shape == (0, 16, 8) and y.dtype == np.float32


@pytest.mark.parametrize("stage", ["float32", "float32+zstd", "float32+lz4"])
def test_a_bool_byte_other_than_0_or_1_is_refused(stage):
    """numpy and onnxruntime read byte 2 as a bool that is neither: Not of it gave 3, 'true'."""
    good = np.array([True, False, True, True] * 64)
    assert np.array_equal(decode(encode(good, stage)), good)
    raw = bytearray(encode(good, "float32"))
    raw[-4] = 2
    with pytest.raises(CodecError, match="bytes other than 0 and 1"):
        decode(bytes(raw))
    if stage != "float32":  # the same through a lossless stage: the bytes are checked after it
        bad = good.copy()
        bad.view(np.uint8)[0] = 255
        with pytest.raises(CodecError, match="bytes other than 0 and 1"):
            decode(encode(bad, stage))


def test_shape_claiming_huge_tensor_is_refused_before_allocating():
    p = _payload("float32")
    off = _HEAD.size
    struct.pack_into("<Q", p, off, 2**40)  # first dim
    with pytest.raises(CodecTooLarge, match="above the .*-byte cap") as e:
        decode(bytes(p))
    assert e.value.code == "too-large"  # well-formed, over the receiver's limit: not a malformed payload
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
    base += [bytes(encode(TENSORS["hidden-outliers"], c)) for c in ("int4-ol", "int8-ol")]
    for i in range(3000):
        p = bytearray(base[i % len(base)])
        for _ in range(rng.integers(1, 4)):
            p[rng.integers(0, len(p))] = rng.integers(0, 256)
        try:
            y = decode(bytes(p))
            assert isinstance(y, np.ndarray)
        except CodecError:
            pass


@pytest.mark.parametrize("ol, plain", [("int4-ol", "int4"), ("int8-ol", "int8-ch")])
def test_ol_codecs_send_the_outlier_columns_exact_and_the_rest_per_token(ol, plain):
    x = TENSORS["hidden-outliers"]
    assert codecs.outlier_columns(x).tolist() == [3, 40, 99]
    y = decode(encode(x, ol))
    assert np.array_equal(y[..., [3, 40, 99]], x[..., [3, 40, 99]])
    err_ol = np.abs(y - x).max()
    err_plain = np.abs(decode(encode(x, plain)) - x).max()
    assert err_ol * 10 < err_plain  # the outliers no longer set every token's step
    assert len(encode(x, ol)) == len(encode(x, plain)) + 4 + 3 * 4 + 16 * 3 * 4
    calm = RNG.standard_normal((1, 16, 128)).astype(np.float32)  # no outliers: nothing extra is sent
    assert codecs.outlier_columns(calm).size == 0
    assert len(encode(calm, ol)) == len(encode(calm, plain)) + 4


def _outlier_section_at(p: bytes | bytearray) -> int:
    ndim = _HEAD.unpack_from(p, 0)[5]
    (nparams,) = struct.unpack_from("<I", p, _HEAD.size + 8 * ndim)
    return _HEAD.size + 8 * ndim + 4 + 4 * nparams


@pytest.mark.parametrize(
    "patch,message",
    [
        (
            lambda p, at: struct.pack_into("<I", p, at, 129),
            "names 129 columns, more than the last axis's 128",
        ),
        (lambda p, at: struct.pack_into("<I", p, at + 4, 50), "strictly increasing"),
        (lambda p, at: struct.pack_into("<I", p, at + 12, 128), "inside the last axis"),
        (lambda p, at: struct.pack_into("<f", p, at + 16, float("inf")), "not finite"),
        (lambda p, at: struct.pack_into("<I", p, at, 100), "truncated inside the outlier section"),
    ],
)
@pytest.mark.parametrize("codec", ["int4-ol", "int8-ol+zstd"])
def test_a_lying_outlier_section_is_refused(patch, message, codec):
    p = bytearray(encode(TENSORS["hidden-outliers"], codec))
    patch(p, _outlier_section_at(p))
    with pytest.raises(CodecError, match=message):
        decode(bytes(p))


# -- the speed work: same bytes, same checks ------------------------------------------------------
def _zstd_payload_with(frames: list[bytes], x: np.ndarray) -> bytes:
    """An int8+zstd payload for ``x`` whose chunk table and frames are replaced by ``frames``."""
    p = bytearray(encode(x, "int8+zstd"))
    stored = _HEAD.unpack_from(p, 0)[8]
    head = p[: len(p) - stored]
    body = struct.pack(f"<I{len(frames)}I", len(frames), *map(len, frames)) + b"".join(frames)
    _HEAD.pack_into(head, 0, *_HEAD.unpack_from(head, 0)[:8], len(body))
    return bytes(head) + body


def test_float16_cast_matches_numpy_bit_for_bit():
    """Large tensors go through onnxruntime's Cast: the same rounding, infinities and subnormals as numpy
    (a finite value that float16 would make infinite sends the tensor exact)."""
    rng = np.random.default_rng(7)
    bits = rng.integers(0, 2**32, 1 << 16, dtype=np.uint64).astype(np.uint32)
    edges = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x477FE000, 0x477FEFFF, 0x33000000, 0x387FC000])
    x = np.concatenate([bits, edges.astype(np.uint32)]).view(np.float32)
    x = x[~np.isnan(x)]
    past = np.isfinite(x) & (np.abs(x) >= 65_520)  # 0x477FF000 and up: float16's infinity
    assert decode(encode(x.reshape(1, -1), "float16")).tobytes() == x.tobytes()
    x = x[~past].reshape(1, -1)
    with np.errstate(all="ignore"):
        want = x.astype(np.float16)
    y = decode(encode(x, "float16"))
    assert np.array_equal(y, want.astype(np.float32))
    assert bytes(encode(x, "float16"))[-want.nbytes :] == want.tobytes()
    h = (rng.standard_normal((1, 3, 64, 64)) * 100).astype(np.float16)
    assert np.array_equal(decode(encode(h, "float16")), h)


@pytest.mark.parametrize("codec", ["int8", "int8-ch+zstd", "int4", "int8-ol", "int4-ol+lz4"])
@pytest.mark.parametrize("shape", [(1, 32, 40, 40), (3, 7), (1, 100, 64)])
def test_quantised_half_tensor_is_the_float32_path_rounded(codec, shape):
    """A float16 cut tensor (a model converted to half inside) is quantised as its float32 values are and
    decoded to float16 with numpy's rounding, large ones through onnxruntime's Cast as the float16 codec's
    (numpy's per-element half conversion made such an int8 round trip 10x a float32 one's)."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(shape) * np.where(rng.random(shape) < 0.01, 50, 1)).astype(np.float16)
    y = decode(encode(x, codec))
    assert y.dtype == np.float16 and y.shape == x.shape
    want = decode(encode(x.astype(np.float32), codec)).astype(np.float16)
    assert np.array_equal(y.view(np.uint16), want.view(np.uint16))
    assert bytes(encode(x, codec))[_HEAD.size :] == bytes(encode(x.astype(np.float32), codec))[_HEAD.size :]


@pytest.mark.parametrize("codec", ["int8", "int8-ch", "int4", "int8-ch+zstd", "int4-ol"])
def test_a_range_of_denormals_is_sent_as_its_minimum_without_nans(codec):
    """A channel whose values are all denormal (a PP-OCR recogniser's spans 4e-40) has a step with no
    finite reciprocal: its grid filled with NaN, cast to uint8 with a RuntimeWarning in `plan`'s output."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    x[0, 2] = np.float32(3.9e-40) * rng.random((8, 8)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = decode(encode(x, codec))
        whole = np.full((1, 64), np.float32(1e-41))
        assert np.abs(decode(encode(whole, codec)) - whole).max() < 1e-35
    assert np.abs(y - x).max() <= error_bound(x, codec)
    if codec != "int8":  # per channel: that channel's own range
        assert np.abs(y[0, 2] - x[0, 2]).max() < 1e-35


def test_payloads_do_not_depend_on_threads():
    x = np.maximum(RNG.standard_normal((1, 16, 128, 128)), 0).astype(np.float32)  # 8 zstd chunks
    before = codecs.codec_threads()
    try:
        codecs.set_threads(1)
        one = bytes(encode(x, "int8+zstd"))
        codecs.set_threads(3)
        assert bytes(encode(x, "int8+zstd")) == one
        assert np.array_equal(decode(one), decode(encode(x, "int8")))
    finally:
        codecs.set_threads(before)
    with pytest.raises(ValueError):
        codecs.set_threads(0)


def test_small_payloads_never_start_threads(monkeypatch):
    def no_pool():
        raise AssertionError("a one-chunk payload used the thread pool")

    monkeypatch.setattr(codecs, "_helpers", no_pool)
    for shape in ((1, 16, 8, 8), (1, 32, 56, 56)):  # 4 KiB and 392 KiB of float32: one chunk of int8
        x = np.maximum(RNG.standard_normal(shape), 0).astype(np.float32)
        assert decode(encode(x, "int8+zstd")).shape == shape


def test_threads_follow_the_environment(monkeypatch):
    monkeypatch.setenv(codecs.THREADS_ENV, "3")
    assert codecs._default_threads() == 3
    monkeypatch.setenv(codecs.THREADS_ENV, "lots")
    with pytest.warns(UserWarning, match="not a positive integer"):
        assert 1 <= codecs._default_threads() <= 4


def test_corrupt_chunk_among_many_is_refused_with_threads():
    x = np.maximum(RNG.standard_normal((1, 16, 128, 128)), 0).astype(np.float32)
    p = bytearray(encode(x, "int8+zstd"))
    p[-200:-150] = b"\x00" * 50  # inside the last chunk's frame
    before = codecs.codec_threads()
    try:
        for n in (1, 2, 4):
            codecs.set_threads(n)
            with pytest.raises(CodecError, match="zstd stage is corrupt"):
                decode(bytes(p))
    finally:
        codecs.set_threads(before)


def test_zstd_chunk_is_exactly_one_frame():
    import zstandard

    x = np.maximum(RNG.standard_normal((1, 4, 8, 8)), 0).astype(np.float32)
    q = bytes(encode(x, "int8"))[-x.size :]
    frame = zstandard.ZstdCompressor().compress(q)
    assert np.array_equal(decode(_zstd_payload_with([frame], x)), decode(encode(x, "int8")))
    z = zstandard.ZstdCompressor()
    for frames in (
        [frame + b"junk"],
        [frame + frame],
        [z.compress(q[:100]) + z.compress(q[100:])],  # two frames that together make the chunk
        [frame + z.compress(b"")],  # a second, empty frame
        [frame[:-3]],
        [zstandard.ZstdCompressor().compress(q + q)],
    ):
        with pytest.raises(CodecError, match="zstd stage is corrupt"):
            decode(_zstd_payload_with(frames, x))


def test_zstd_frame_declaring_a_huge_window_is_refused():
    import zstandard

    x = np.maximum(RNG.standard_normal((1, 4, 8, 8)), 0).astype(np.float32)
    q = bytes(encode(x, "int8"))[-x.size :]
    params = zstandard.ZstdCompressionParameters(window_log=27, write_content_size=False)
    stream = zstandard.ZstdCompressor(compression_params=params).compressobj()  # size unknown: window kept
    frame = stream.compress(q) + stream.flush()
    assert zstandard.get_frame_parameters(frame).window_size == 2**27
    with pytest.raises(CodecError, match="zstd stage is corrupt"):
        decode(_zstd_payload_with([frame], x))


def test_zstd_frame_declaring_more_than_its_chunk_is_refused_before_decompressing():
    """A frame of zeros declaring 512 MiB compresses to ~16 KB: python-zstandard allocates what a frame
    declares, whatever max_output_size says, so the declared size is read and refused first (before,
    the refusal came after the allocation: 4 GB of RSS for a 122 KB request)."""
    import zstandard

    x = np.maximum(RNG.standard_normal((1, 4, 8, 8)), 0).astype(np.float32)
    huge = 512 * 2**20
    stream = zstandard.ZstdCompressor(write_content_size=True).compressobj(size=huge)
    zeros = bytes(2**20)
    frame = b"".join(stream.compress(zeros) for _ in range(huge // len(zeros))) + stream.flush()
    assert zstandard.frame_content_size(frame) == huge and len(frame) < 100_000
    with pytest.raises(CodecError, match=f"chunk 0 declares {huge} bytes, expected {x.size}"):
        decode(_zstd_payload_with([frame], x))


def test_decoded_arrays_are_fresh_and_writable():
    x = RNG.standard_normal((1, 32, 56, 56)).astype(np.float32)
    for codec in ("float32", "float32+zstd", "float16", "int8", "int8-ch+zstd", "int4"):
        p = bytes(encode(x, codec))
        y = decode(p)
        assert y.flags.writeable and y.flags.aligned and y.flags.c_contiguous, codec
        assert not np.shares_memory(y, np.frombuffer(p, np.uint8)), codec
    p = encode(x, "float32")
    y = decode(p)
    p[-4:] = b"\x00" * 4  # the payload is the caller's to reuse
    assert y.reshape(-1)[-1] == x.reshape(-1)[-1]


def test_big_endian_input_is_encoded_by_value():
    x = RNG.standard_normal((2, 3)).astype(">f4")
    for codec in ("float32", "float16", "int8+lz4"):
        y = decode(encode(x, codec))
        assert y.dtype == np.float32
        assert float(np.abs(y - x.astype(np.float32)).max()) <= error_bound(x.astype(np.float32), codec)


@pytest.mark.parametrize("codec", ["int8", "int8-ch", "int4", "int8-ol", "int4-ol"])
def test_a_float16_tensor_stays_within_the_bound_after_its_rounding_back_to_float16(codec):
    """A head's float16 output (a Cast) is quantised and decoded back to float16: that last rounding
    counts too (the bound left it out, and 134 of 201 such tensors were past it with int8)."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        x = (rng.random((2, 3, 4, 4)) * 2.34).astype(np.float16)
        y = decode(encode(x, codec))
        assert y.dtype == np.float16
        err = float(np.abs(y.astype(np.float64) - x.astype(np.float64)).max())
        assert err <= error_bound(x, codec), codec


@pytest.mark.parametrize("codec", all_codecs())
def test_empty_and_large_tensors_round_trip(codec):
    for x in (
        np.zeros((0, 3), np.float32),
        np.maximum(RNG.standard_normal((2, 8, 100, 100)), 0).astype(np.float32),  # 640 KB: blocks, chunks
        RNG.standard_normal((3, 70000)).astype(np.float32),
    ):
        y = decode(encode(x, codec))
        assert y.shape == x.shape and y.dtype == x.dtype
        if x.size:
            assert float(np.abs(y - x).max()) <= error_bound(x, codec), codec


def _placed(payload: bytes, body_at: int, offset: int) -> memoryview:
    """``payload`` in a buffer whose body (from byte ``body_at``) lies ``offset`` bytes past a 64-byte
    boundary: a ZeroMQ frame's body lies wherever its allocation put it (8 bytes past 16, in libzmq)."""
    raw = np.zeros(len(payload) + 256, np.uint8)
    start = (-(raw.ctypes.data + body_at)) % 64 + offset
    raw[start : start + len(payload)] = np.frombuffer(payload, np.uint8)
    return memoryview(raw[start : start + len(payload)]).toreadonly()


def test_decode_without_copy_views_a_float32_body_and_copies_everything_else():
    """A server feeds the view straight to its session: same values, read-only, sharing the payload, where
    the body lies as onnxruntime's own buffers do (64-byte aligned). Elsewhere it is an aligned copy: a
    ReduceSum of a cut tensor 8 bytes off summed in another order, 1-2 ulp off the whole model's output."""
    x = np.random.default_rng(3).standard_normal((2, 3, 5)).astype(np.float32)
    payload = bytes(encode(x, "float32"))
    body_at = len(payload) - x.nbytes
    aligned_frame = _placed(payload, body_at, 0)
    view = decode(aligned_frame, copy=False)
    np.testing.assert_array_equal(view, x)
    assert np.shares_memory(view, np.frombuffer(aligned_frame, np.uint8)) and not view.flags.writeable
    assert not np.shares_memory(decode(payload), np.frombuffer(payload, np.uint8))
    for offset in (4, 8, 16, 40):
        frame = _placed(payload, body_at, offset)
        got = decode(frame, copy=False)
        np.testing.assert_array_equal(got, x)
        assert got.ctypes.data % 64 == 0 and not np.shares_memory(got, np.frombuffer(frame, np.uint8))
    ints = np.arange(30, dtype=np.int64).reshape(2, 3, 5)  # integer sums have no order: viewed anywhere
    int_payload = bytes(encode(ints, "float32"))
    frame = _placed(int_payload, len(int_payload) - ints.nbytes, 8)
    assert np.shares_memory(decode(frame, copy=False), np.frombuffer(frame, np.uint8))
    lossy = bytes(encode(x, "int8"))
    np.testing.assert_array_equal(decode(lossy, copy=False), decode(lossy))


@pytest.mark.parametrize(
    "codec", ["float32", "float32+lz4", "float32+zstd", "float16", "int8", "int4", "int8-ch"]
)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("size", [30, 1000, 100_000])
def test_every_decoded_float_tensor_lies_at_a_64_byte_boundary(codec, dtype, size):
    """What a tail session is fed lies as onnxruntime's own tensors do, whatever the payload's place: the
    exact ones equal to what was sent, the quantised ones as fidelity measured them."""
    x = np.random.default_rng(3).standard_normal(size).astype(dtype)
    payload = bytes(encode(x, codec))
    want = decode(payload)
    for offset in (0, 8, 24):
        got = decode(_placed(payload, 0, offset))
        np.testing.assert_array_equal(got, want)
        assert got.dtype == dtype and got.ctypes.data % 64 == 0, (codec, size, offset)
    if Codec.parse(codec).lossless or (codec == "float16" and dtype == np.float16):
        np.testing.assert_array_equal(want, x)


@pytest.mark.parametrize("codec", all_codecs())
def test_the_size_the_planner_counts_is_the_payload_s_length(codec):
    """``encoded_size`` skips the encoding where the size follows from the shape: it must still be
    exactly what ``encode`` writes, or the planner sizes links with bytes no request sends."""
    rng = np.random.default_rng(3)
    f = rng.standard_normal((2, 5, 3, 4)).astype(np.float32)
    with_nan, with_inf = f.copy(), f.copy()
    with_nan[0, 1, 2, 3] = np.nan
    with_inf[1, 0, 0, 0] = -np.inf
    outliers = f.copy()
    outliers[..., 1] *= 80
    arrays = [
        f,
        with_nan,
        with_inf,
        outliers,
        f.astype(np.float16),
        f.astype(np.float64),
        f.astype(">f4"),
        np.float32(1.5),
        np.zeros((0, 3), np.float32),
        np.arange(7, dtype=np.float32),
        rng.integers(0, 9, (3, 4)).astype(np.int64),
        rng.integers(0, 2, (5,)).astype(bool),
        np.full((3, 300), 2.0, np.float32),  # constant: zero range
    ]
    for x in arrays:
        assert codecs.encoded_size(x, codec) == len(encode(x, codec)), (x.dtype, np.shape(x))
        # the planner sizes a tensor once per codec as applied to it (an int64 goes exact under all)
        c = codecs.Codec.parse(codec)
        assert encode(x, codecs.applied(np.asarray(x), c)) == encode(x, c), (x.dtype, np.shape(x))


@pytest.mark.parametrize("codec", ["float16", "float16+zstd", "float16+lz4"])
def test_float16_past_its_range_goes_exact_and_silent(codec):
    """A layer norm's sum of squares (a file-type classifier's, 109,030) is past float16's 65,504: the
    codec made it ±inf, and the tail computed from the infinity without a word. Such a tensor goes exact,
    as one with an infinity goes exact under a quantiser, with no numpy warning in the user's output; the
    size the planner counts is the size sent. An infinity of the tensor's own stays float16."""
    import warnings

    x = np.full((1, 64), 0.5, np.float32)
    x[0, :3] = [1.0, -109_029.8, 70_000.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        payload = encode(x, codec)
        assert decode(payload).tobytes() == x.tobytes()
        assert encoded_size(x, codec) == len(payload)
        at_edge = x.copy()
        at_edge[0, 1:3] = [65_519.0, -np.inf]  # rounds to 65,504; already infinite
        y = decode(encode(at_edge, codec))
    assert y.dtype == np.float32 and y[0, 1] == 65_504.0 and y[0, 2] == -np.inf
    assert len(encode(at_edge, codec)) < len(payload)  # float16 still: half the bytes, less the header
    big = np.full(64, 1e300)  # a float64 past float32's range: quantisers send it exact, silently
    wide = np.linspace(-3e38, 3e38, 64, dtype=np.float32)  # finite, but its span (the step) is not
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decode(encode(big, "int8-ol")).tobytes() == big.tobytes()
        for c in ("int8", "int4", "int8-ch"):
            assert decode(encode(wide, c)).tobytes() == wide.tobytes() and encoded_size(wide, c) == len(
                encode(wide, c)
            )
            assert decode(encode(big, c)).tobytes() == big.tobytes() and encoded_size(big, c) == len(
                encode(big, c)
            )


@pytest.mark.parametrize("codec", ["float16", "int8", "int4", "int8-ch", "int4-ol", "float16+lz4"])
def test_a_float_tensor_of_a_few_elements_goes_exact(codec):
    """A dynamically quantised model's activation scale crosses its cuts as a float32 scalar: rounded to
    float16 it put 5e-4 on every output it scales. Up to SMALL_EXACT_ELEMENTS the bytes go as they are
    (the header costs more than quantising would save); past it the codec asked applies."""
    scale = np.array(0.0123456789, np.float32)
    few = np.array([0.1, 3.3, -7.77, 1e-3], np.float32)
    for x in (scale, few):
        assert decode(encode(x, codec)).tobytes() == x.tobytes()
    more = np.array([0.1, 3.3, -7.77, 1e-3, 5.5], np.float32)
    assert decode(encode(more, codec)).tobytes() != more.tobytes()


@pytest.mark.parametrize("codec", ["int8-ch", "int4", "int4-ol", "int8-ol"])
def test_a_feature_vector_is_quantised_per_tensor_not_a_pair_per_element(codec):
    """A flattened [1, N] cut tensor: per channel along axis 1 sent a scale and an offset per element, so
    int4 came out at twice float32's size and lossless (a fidelity of 1.0 that measured nothing). Channels
    that hold fewer than 16 elements share one pair; a CNN's [1, C, H, W] keeps its pair per channel."""
    from splitpoint.core.codecs import MIN_CHANNEL_ELEMENTS

    x = np.random.default_rng(0).standard_normal((1, 1024)).astype(np.float32)
    sizes = {c: len(encode(x, c)) for c in ("float32", "int8", codec)}
    assert sizes[codec] < sizes["float32"] / 2, sizes
    if codec.startswith("int4"):
        assert sizes[codec] < sizes["int8"], sizes
    assert _HEAD.unpack_from(encode(x, codec), 0)[6] == -1
    assert 0 < np.abs(decode(encode(x, codec)) - x).max() <= error_bound(x, codec)
    fmap = np.random.default_rng(1).standard_normal((1, 8, 4, 4)).astype(np.float32)
    assert MIN_CHANNEL_ELEMENTS <= 4 * 4 and _HEAD.unpack_from(encode(fmap, codec), 0)[6] == 1


def test_an_empty_tensor_may_name_outlier_columns_and_sends_no_values_for_them():
    """protocol.md: the columns are strictly increasing and inside the last axis, then k x (elements / last)
    values: for a [0, 16] tensor, none. An encoder that names its columns on an empty batch was refused as
    "names 1 columns; the last axis has 16"."""
    from splitpoint.core.codecs import _DTYPE_IDS, BASES, MAGIC, VERSION

    def payload(cols: list[int]) -> bytes:
        head = bytearray(_HEAD.size)
        _HEAD.pack_into(
            head, 0, MAGIC, VERSION, BASES.index("int8-ol"), 0, _DTYPE_IDS[np.dtype("float32")], 2, -1, 0, 0
        )
        params = struct.pack("<2QI", 0, 16, 2) + np.array([1.0, 0.0], "<f4").tobytes()
        return bytes(head) + params + struct.pack("<I", len(cols)) + np.array(cols, "<u4").tobytes()

    for cols in ([], [3], [3, 7]):
        y = decode(payload(cols))
        assert y.shape == (0, 16) and y.dtype == np.float32
    with pytest.raises(CodecError, match="inside the last axis"):
        decode(payload([3, 16]))
    with pytest.raises(CodecError, match="17 columns, more than the last axis's 16"):
        decode(payload(list(range(17))))


def test_an_empty_shape_is_sized_as_the_zero_bytes_it_needs():
    """(2^62, 0) needs no bytes: it was refused as above the size cap (too-large), where its dimension, past
    any array's, makes it a malformed tensor (bad-tensor)."""
    p = bytearray(encode(np.zeros((3, 0), np.float32), "float32"))
    struct.pack_into("<Q", p, _HEAD.size, 2**62)
    with pytest.raises(CodecError, match="an empty tensor with a dimension past any size") as caught:
        decode(bytes(p))
    assert not isinstance(caught.value, CodecTooLarge)
    assert decode(encode(np.zeros((3, 0), np.float32), "float32")).shape == (3, 0)
