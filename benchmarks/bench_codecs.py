"""Codec throughput and ratio on a 1 MiB float32 activation tensor.

Target (issue 4): encode + decode of 1 MiB float32 with int8+zstd >= 500 MB/s of input.
Run: python benchmarks/bench_codecs.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_results

from splitpoint.core.codecs import all_codecs, decode, encode, error_bound


def _zstd_level1_mb_s(repeats: int = 31) -> float:
    import zstandard

    rng = np.random.default_rng(1)
    x = np.maximum(rng.standard_normal(2**18), 0)
    q = (x / x.max() * 255 + 0.5).astype(np.uint8).tobytes()
    c = zstandard.ZstdCompressor(level=1)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        c.compress(q)
        samples.append(time.perf_counter() - t0)
    return len(q) / statistics.median(samples) / 1e6


def main(repeats: int = 31) -> None:
    rng = np.random.default_rng(0)
    # a ReLU activation (half zeros), as cut tensors mostly are; 64 x 64 x 64 float32 = 1 MiB
    x = np.maximum(rng.standard_normal((1, 64, 64, 64)), 0).astype(np.float32)
    rows = []
    for c in all_codecs():
        p = encode(x, c)
        enc, dec, both = [], [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            q = encode(x, c)
            t1 = time.perf_counter()
            decode(q)
            t2 = time.perf_counter()
            enc.append(t1 - t0)
            dec.append(t2 - t1)
            both.append(t2 - t0)
        err = float(np.abs(decode(p) - x).max())
        rows.append(
            {
                "codec": c,
                "ratio": x.nbytes / len(p),
                "bytes": len(p),
                "encode_mb_s": x.nbytes / statistics.median(enc) / 1e6,
                "decode_mb_s": x.nbytes / statistics.median(dec) / 1e6,
                "roundtrip_mb_s": x.nbytes / statistics.median(both) / 1e6,
                "max_abs_error": err,
                "error_bound": error_bound(x, c),
            }
        )
    target = next(r for r in rows if r["codec"] == "int8+zstd")
    md = [
        "# Cut-tensor codecs",
        "",
        f"`python benchmarks/bench_codecs.py`: a 1 MiB float32 ReLU activation (1x64x64x64, half zeros), "
        f"median of "
        f"{repeats} runs; MB/s are 10^6 bytes of float32 input per second. Measured in one run.",
        "",
        "| codec | ratio | bytes | encode MB/s | decode MB/s | encode+decode MB/s | max abs error | bound |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        md.append(
            f"| {r['codec']} | {r['ratio']:.2f} | {r['bytes']:,} | {r['encode_mb_s']:.0f} | "
            f"{r['decode_mb_s']:.0f} | "
            f"{r['roundtrip_mb_s']:.0f} | {r['max_abs_error']:.4f} | {r['error_bound']:.4f} |"
        )
    zstd_alone = _zstd_level1_mb_s()
    md += [
        "",
        f"Target: int8+zstd encode+decode ≥ 500 MB/s — measured **{target['roundtrip_mb_s']:.0f} MB/s** "
        f"({'met' if target['roundtrip_mb_s'] >= 500 else 'MISSED'}).",
        "",
    ]
    if target["roundtrip_mb_s"] < 500:
        md += [
            f"Why: zstd level 1 alone compresses these quantised bytes at {zstd_alone:.0f} MB/s (single "
            f"thread, measured "
            "in this run), i.e. ≥ 1 ms per MiB of float32 input before quantisation and decoding; the zstd "
            "stage "
            "already compresses 128 KiB chunks in parallel (1.5× on these 2 cores). The int8 stage itself "
            "runs at "
            f"{next(r for r in rows if r['codec'] == 'int8')['roundtrip_mb_s']:.0f} MB/s; int8+lz4 is the "
            f"fast "
            "lossless option on this machine.",
            "",
        ]
    write_results("codecs", {"rows": rows}, "\n".join(md))


if __name__ == "__main__":
    main()
