"""Cut-tensor codecs: throughput and ratio, before and after, side by side in one interleaved run.

Tensors: ReLU activations (half zeros) of 4 KiB (1x16x8x8), 392 KiB (1x32x56x56), 1 MiB (1x64x64x64,
the benchmark tensor) and 4 MiB (1x64x128x128), float32. MB/s are 10^6 bytes of float32 input per
second; "encode+decode" is one round trip (the median of encode and decode timed together).

Targets (issue 14), encode+decode at 392 KiB, 1 MiB and 4 MiB: int8+zstd >= 500 MB/s, float16 >= 1 GB/s,
int8 >= 2 GB/s. "Before" is core/codecs.py as of BASELINE_REV (read with git), measured in the same
run. The library options tried for the int8+zstd stage and for float16 are measured beside them
(blosc2 only where it is installed: it is not a dependency).

Run: python benchmarks/bench_codecs.py [--repeats N] [--baseline REV] [--out DIR]
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import arguments, verdict, write_results

from splitpoint.core import codecs

ROOT = Path(__file__).resolve().parents[1]
BASELINE_REV = "3498468"  # core/codecs.py before the codec speed work (numpy casts, zstd level 1)
SIZES = {
    "4 KiB": (1, 16, 8, 8),
    "392 KiB": (1, 32, 56, 56),
    "1 MiB": (1, 64, 64, 64),
    "4 MiB": (1, 64, 128, 128),
}
BENCH_SIZE = "1 MiB"
TARGETS = {"int8+zstd": 500.0, "float16": 1000.0, "int8": 2000.0}
TARGET_SIZES = ("392 KiB", "1 MiB", "4 MiB")
CHUNK = codecs.ZSTD_CHUNK

Pair = tuple[Callable[[np.ndarray], object], Callable[[object], object]]


def load_baseline(rev: str) -> types.ModuleType | None:
    """core/codecs.py at ``rev`` as a module of its own, or None where git or the revision is missing."""
    try:
        src = subprocess.run(
            ["git", "show", f"{rev}:core/codecs.py"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    src = src.replace("from .errors import", "from splitpoint.core.errors import")
    mod = types.ModuleType("splitpoint_codecs_baseline")
    sys.modules[mod.__name__] = mod  # dataclasses look their module up
    exec(compile(src, f"{rev}:core/codecs.py", "exec"), mod.__dict__)
    return mod


def relu(shape: tuple, seed: int = 0) -> np.ndarray:
    return np.maximum(np.random.default_rng(seed).standard_normal(shape), 0).astype(np.float32)


def nbytes(blob) -> int:
    """Bytes on the wire of what an option's encoder returned."""
    if isinstance(blob, int):  # a size carried beside the compressed bytes, as a header would
        return 0
    if isinstance(blob, list | tuple):
        return sum(nbytes(b) for b in blob)
    if hasattr(blob, "size") and callable(blob.size):  # python-zstandard's BufferWithSegmentsCollection
        return blob.size()
    return blob.nbytes if isinstance(blob, np.ndarray) else len(blob)


# -- the options tried ---------------------------------------------------------------------------------
def with_threads(n: int, fn: Callable) -> Callable:
    def run(arg):
        before = codecs.codec_threads()
        codecs.set_threads(n)
        try:
            return fn(arg)
        finally:
            codecs.set_threads(before)

    return run


def staged(compress: Callable, decompress: Callable) -> Pair:
    """This int8 quantiser, then a lossless stage over its payload: the work of int8+<stage>."""
    return (lambda x: compress(codecs.encode(x, "int8")), lambda b: codecs.decode(decompress(b)))


def chunked(compressor, decompressor) -> Pair:
    """The v1 zstd layout's work: independent 128 KiB frames, one after the other."""

    def comp(p):
        mv = memoryview(p)
        return [compressor.compress(mv[i : i + CHUNK]) for i in range(0, len(p), CHUNK)]

    return staged(comp, lambda frames: b"".join(decompressor.decompress(f) for f in frames))


def int8_zstd_options(threads: int) -> dict[str, tuple[str, str, Pair]]:
    """name -> (payload format, kept or dropped and why, (encode, decode)), each from float32 and back."""
    import lz4.block
    import lz4.frame
    import zstandard as zs

    zd = zs.ZstdDecompressor()
    tuned = zs.ZstdCompressor(compression_params=codecs.ZSTD_PARAMS)
    v1 = "v1 (chunk table)"
    opts: dict[str, tuple[str, str, Pair]] = {
        "zstd level 1 frames, 1 thread": (
            v1,
            "dropped: slower, larger",
            chunked(zs.ZstdCompressor(level=1), zd),
        ),
        "zstd level 3 frames, 1 thread": (v1, "dropped: slower", chunked(zs.ZstdCompressor(level=3), zd)),
        "zstd level -1 (fast mode) frames": (
            v1,
            "dropped: stores literals raw, so the ratio falls to lz4's",
            chunked(zs.ZstdCompressor(level=-1), zd),
        ),
        "zstd level -5 (fast mode) frames": (
            v1,
            "dropped: as level -1",
            chunked(zs.ZstdCompressor(level=-5), zd),
        ),
        "zstd tuned frames (fast, hashLog 8, minMatch 7), 1 thread": (
            v1,
            "kept: the new zstd stage",
            chunked(tuned, zd),
        ),
        f"python-zstandard ZstdCompressor(level=1, threads={threads}): one frame": (
            "change: one frame",
            "dropped: zstdmt's jobs are >= 512 KiB, so one job (no parallelism) at these sizes; one frame "
            "decodes on one thread",
            staged(zs.ZstdCompressor(level=1, threads=threads).compress, zd.decompress),
        ),
    }

    def multi_c(p):
        mv = memoryview(p)
        frames = [mv[i : i + CHUNK] for i in range(0, len(p), CHUNK)]
        return tuned.multi_compress_to_buffer(frames, threads=threads), len(p)

    def multi_d(blob):
        coll, n = blob
        sizes = np.array([min(CHUNK, n - i) for i in range(0, n, CHUNK)], np.uint64).tobytes()
        frames = [coll[i] for i in range(len(coll))]
        out = zd.multi_decompress_to_buffer(frames, decompressed_sizes=sizes, threads=threads)
        return b"".join(out[i].tobytes() for i in range(len(out)))

    opts[f"python-zstandard multi_compress_to_buffer / multi_decompress_to_buffer, {threads} threads"] = (
        v1,
        "dropped: starts its threads on every call; an experimental API",
        staged(multi_c, multi_d),
    )
    try:
        import blosc2
    except ImportError:
        blosc2 = None
    if blosc2 is not None:
        for label, codec, filt, why in (
            ("zstd clevel 1", blosc2.Codec.ZSTD, blosc2.Filter.NOFILTER, "no faster than zstd chunks"),
            ("zstd clevel 1 + bitshuffle", blosc2.Codec.ZSTD, blosc2.Filter.BITSHUFFLE, "bitshuffle: larger"),
            ("lz4 + bitshuffle", blosc2.Codec.LZ4, blosc2.Filter.BITSHUFFLE, "lz4's ratio"),
        ):
            kw = {"typesize": 1, "codec": codec, "clevel": 1, "filters": [filt], "nthreads": threads}
            opts[f"blosc2 {blosc2.__version__}: {label}, {threads} threads"] = (
                "change: a blosc2 chunk",
                f"dropped: every peer would need c-blosc2; {why}",
                staged(
                    lambda p, kw=kw: blosc2.compress2(p, **kw),
                    lambda b: blosc2.decompress2(b, nthreads=threads),
                ),
            )
    opts["lz4 block (int8+lz4)"] = (
        "v1 (lz4 stage)",
        "reference: the fast lossless stage",
        (  # a block carries no size: the payload header does
            lambda x: (lz4.block.compress(p := codecs.encode(x, "int8"), store_size=False), len(p)),
            lambda b: codecs.decode(lz4.block.decompress(b[0], uncompressed_size=b[1])),
        ),
    )
    opts["lz4 frame"] = (
        "change: lz4 frame",
        "dropped: frame headers and checksums cost time; the payload header already has the size",
        staged(lz4.frame.compress, lz4.frame.decompress),
    )
    return opts


def _against(by: dict, ref: dict | None, sizes: list[str]) -> str:
    """Where an option was faster than the shipped codec in this run, computed: a reason typed when the
    option was dropped is then checked by every run, not trusted."""
    if ref is None:
        return "–"
    faster = [
        f"{s} ({by[s]['roundtrip_mb_s'] / ref[s]['roundtrip_mb_s']:.2f}×)"
        for s in sizes
        if s in by and s in ref and by[s]["roundtrip_mb_s"] > ref[s]["roundtrip_mb_s"]
    ]
    return "slower at every size" if not faster else "**faster** at " + ", ".join(faster)


def float16_options(x: np.ndarray) -> dict[str, tuple[str, str, Pair]]:
    """name -> (payload format, kept or dropped and why, (to float16, back to float32))."""
    h = np.empty(x.shape, np.float16)
    f = np.empty(x.shape, np.float32)
    opts: dict[str, tuple[str, str, Pair]] = {
        "numpy astype": (
            "-",
            "dropped: an element loop",
            (lambda a: a.astype(np.float16), lambda b: b.astype(np.float32)),
        ),
        "numpy copyto into preallocated arrays": (
            "-",
            "dropped: the same element loop",
            (lambda a: np.copyto(h, a, casting="same_kind") or h, lambda b: np.copyto(f, b) or f),
        ),
    }
    enc, dec = codecs._cast_session("float16"), codecs._cast_session("float32")
    if enc and dec:
        opts["onnxruntime Cast, InferenceSession.run, 1 thread"] = (
            "-",
            "kept: vectorised kernels",
            (lambda a: enc.run(None, {"x": a})[0], lambda b: dec.run(None, {"x": b})[0]),
        )

        def bound(sess, out_dtype, out):
            def run(a):
                io = sess.io_binding()
                io.bind_input("x", "cpu", 0, a.dtype, a.shape, a.ctypes.data)
                io.bind_output("y", "cpu", 0, out_dtype, out.shape, out.ctypes.data)
                sess.run_with_iobinding(io)
                return out

            return run

        opts["onnxruntime Cast, IOBinding into preallocated arrays"] = (
            "-",
            "dropped: binding costs what the saved copy gains",
            (bound(enc, np.float16, h), bound(dec, np.float32, f)),
        )
    return opts


def shuffle_options(threads: int) -> dict[str, tuple[str, str, Pair]]:
    """Byte shuffle (blosc2) before zstd on float16 bodies, where it has bytes to regroup."""
    try:
        import blosc2
    except ImportError:
        return {}
    opts: dict[str, tuple[str, str, Pair]] = {}
    for label, filt, why in (
        ("byte shuffle + zstd clevel 1", blosc2.Filter.SHUFFLE, "the shuffle buys a little ratio for speed"),
        ("zstd clevel 1, no shuffle", None, "the same zstd in blosc2's container, for comparison"),
    ):
        kw = {"typesize": 2, "codec": blosc2.Codec.ZSTD, "clevel": 1, "nthreads": threads}
        kw["filters"] = [filt if filt is not None else blosc2.Filter.NOFILTER]

        def enc(x, kw=kw):
            return blosc2.compress2(codecs.encode(x, "float16"), **kw)

        opts[f"blosc2 {blosc2.__version__}: {label}, {threads} threads"] = (
            "change: a blosc2 chunk",
            f"dropped: every peer would need c-blosc2; {why}",
            (enc, lambda b: codecs.decode(blosc2.decompress2(b, nthreads=threads))),
        )
    return opts


def _mb(v: float | None) -> str:
    """A speed for the tables; a codec the baseline lacks has none before ("new")."""
    return "new" if v is None else f"{v:.0f}"


def busy_seconds() -> float | None:
    """CPU seconds every process on the machine has used since boot (Linux), or None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_seconds() -> float:
    t = os.times()
    return t.user + t.system


# -- measurement ---------------------------------------------------------------------------------------
def measure(items: dict, repeats: int, seed: int = 0) -> dict:
    """items: key -> (x, encode, decode). Each round times every item once, in an order shuffled anew
    each round, so that before and after share the machine's ups and downs; medians over rounds. Each
    timed round trip follows an untimed one of the same item: the steady state of a stream of
    same-shaped tensors, as an edge encodes them (and as a tight loop measures), rather than caches
    left cold by whatever item ran before."""
    enc: dict = {k: [] for k in items}
    dec: dict = {k: [] for k in items}
    both: dict = {k: [] for k in items}
    sizes: dict = {}
    keys = list(items)
    rng = random.Random(seed)
    for r in range(repeats + 1):  # round 0 warms up (sessions, pools, caches)
        if r:
            rng.shuffle(keys)
        for k in keys:
            x, e, d = items[k]
            d(e(x))  # warm
            t0 = time.perf_counter()
            blob = e(x)
            t1 = time.perf_counter()
            d(blob)
            t2 = time.perf_counter()
            if r:
                enc[k].append(t1 - t0)
                dec[k].append(t2 - t1)
                both[k].append(t2 - t0)
            else:
                sizes[k] = nbytes(blob)
    out = {}
    for k, (x, _, _) in items.items():
        out[k] = {
            "bytes": sizes[k],
            "ratio": x.nbytes / sizes[k],
            "encode_mb_s": x.nbytes / statistics.median(enc[k]) / 1e6,
            "decode_mb_s": x.nbytes / statistics.median(dec[k]) / 1e6,
            "roundtrip_mb_s": x.nbytes / statistics.median(both[k]) / 1e6,
        }
    return out


def main(argv: list[str] | None = None) -> None:
    ap = arguments(__doc__)
    ap.add_argument("--repeats", type=int, default=31)
    ap.add_argument("--baseline", default=BASELINE_REV, help="git revision whose core/codecs.py is 'before'")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--note", default="", help="a line about the machine to print under the load line")
    args = ap.parse_args(argv)

    load_before = os.getloadavg()[0]
    wall0, busy0, own0 = time.monotonic(), busy_seconds(), own_seconds()
    old = load_baseline(args.baseline)
    threads = codecs.codec_threads()
    tensors = {s: relu(shape) for s, shape in SIZES.items()}
    z_opts = int8_zstd_options(threads)
    f_opts = {s: float16_options(x) for s, x in tensors.items()}
    s_opts = shuffle_options(threads)
    items: dict = {}
    known_before = set(old.all_codecs()) if old is not None else set()  # codecs added since have no 'before'
    for s, x in tensors.items():
        for c in codecs.all_codecs():
            items[("codec", s, c, "after")] = (x, lambda a, c=c: codecs.encode(a, c), codecs.decode)
            if old is not None and c in known_before:
                items[("codec", s, c, "before")] = (x, lambda a, c=c: old.encode(a, c), old.decode)
        for c in TARGETS:  # the same code held to the calling thread
            if threads > 1 and s != "4 KiB":
                encode_1 = with_threads(1, lambda a, c=c: codecs.encode(a, c))
                items[("codec", s, c, "after, 1 thread")] = (x, encode_1, with_threads(1, codecs.decode))
        if s == "4 KiB":
            continue
        after_z = f"after: int8+zstd, {threads} threads (the codec)"
        items[("int8+zstd", s, after_z)] = items[("codec", s, "int8+zstd", "after")]
        items[("int8+zstd", s, "after: int8+zstd, 1 thread")] = (
            x,
            with_threads(1, lambda a: codecs.encode(a, "int8+zstd")),
            with_threads(1, codecs.decode),
        )
        if old is not None:
            items[("int8+zstd", s, "before: int8+zstd (level 1, thread pool)")] = items[
                ("codec", s, "int8+zstd", "before")
            ]
        for name, (_, _, (e, d)) in z_opts.items():
            items[("int8+zstd", s, name)] = (x, e, d)
        items[("float16", s, "after: float16 (the codec)")] = items[("codec", s, "float16", "after")]
        if old is not None:
            items[("float16", s, "before: float16 (numpy astype)")] = items[("codec", s, "float16", "before")]
        for name, (_, _, (e, d)) in f_opts[s].items():
            items[("float16", s, name)] = (x, e, d)
        if s_opts:
            items[("float16+zstd", s, "after: float16+zstd (the codec)")] = items[
                ("codec", s, "float16+zstd", "after")
            ]
            for name, (_, _, (e, d)) in s_opts.items():
                items[("float16+zstd", s, name)] = (x, e, d)
    res = measure(items, args.repeats)
    load_after = os.getloadavg()[0]
    busy1 = busy_seconds()
    cores = os.cpu_count() or 1
    # the share of the machine's CPU time that other processes used while this ran
    others = (
        None
        if busy0 is None or busy1 is None
        else max(0.0, (busy1 - busy0) - (own_seconds() - own0)) / ((time.monotonic() - wall0) * cores)
    )

    x1 = tensors[BENCH_SIZE]
    errors = {}
    for c in codecs.all_codecs():
        errors[c] = {
            "max_abs_error": float(np.abs(codecs.decode(codecs.encode(x1, c)) - x1).max()),
            "error_bound": codecs.error_bound(x1, c),
        }
    rows = [
        {"size": s, "codec": c, "impl": impl, **r, **(errors[c] if s == BENCH_SIZE else {})}
        for (kind, s, *rest), r in res.items()
        if kind == "codec"
        for c, impl in [rest]
    ]
    options = [
        {"target": kind, "size": s, "option": rest[0], **r}
        for (kind, s, *rest), r in res.items()
        if kind != "codec"
    ]

    def rt(s: str, c: str, impl: str) -> float | None:
        r = res.get(("codec", s, c, impl))
        return r["roundtrip_mb_s"] if r else None

    targets = []
    for c, goal in TARGETS.items():
        for s in TARGET_SIZES:
            after, before, one = rt(s, c, "after"), rt(s, c, "before"), rt(s, c, "after, 1 thread")
            targets.append(
                {
                    "codec": c,
                    "size": s,
                    "target_mb_s": goal,
                    "before_mb_s": before,
                    "after_mb_s": after,
                    "after_1_thread_mb_s": one,
                    "before_verdict": verdict(None if before is None else before >= goal),
                    "after_1_thread_verdict": verdict(None if one is None else one >= goal),
                    "verdict": verdict(None if after is None else after >= goal),
                }
            )
    loaded = load_before >= 0.5 if others is None else others >= 0.1
    md = [
        "# Cut-tensor codecs",
        "",
        "`python benchmarks/bench_codecs.py`: ReLU activations (float32, half zeros) of "
        + ", ".join(f"{s} ({'x'.join(map(str, SIZES[s]))})" for s in SIZES)
        + f"; median of {args.repeats} rounds, each timing every codec and option once in a shuffled order "
        "(before and after side by side, interleaved), each timed round trip right after an untimed one of "
        "the same item (steady state). MB/s are 10^6 bytes of float32 input per second; "
        f"encode+decode is one round trip. 'Before' is `core/codecs.py` at `{args.baseline}`"
        + ("" if old is not None else " (not found: no before figures)")
        + f"; codec threads now: {threads}.",
        "",
        "Machine load: "
        + ("" if others is None else f"other processes used {others:.0%} of the CPU time during the run; ")
        + f"1-minute load average {load_before:.2f} before it, {load_after:.2f} after ({cores} cores)"
        + (
            ": **the machine was loaded by other work during this run**, so absolute figures are low and "
            "noisy; compare before with after, which ran side by side."
            if loaded
            else ": idle apart from this benchmark."
        ),
        *([] if not args.note else ["", args.note]),
        "",
        "## Targets (encode+decode MB/s)",
        "",
        f"| codec | tensor | target | before | after, 1 thread | after, {threads} threads (as shipped) "
        "| after / before | verdict |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for t in targets:
        b, a, one = t["before_mb_s"], t["after_mb_s"], t["after_1_thread_mb_s"]
        md.append(
            f"| {t['codec']} | {t['size']} | ≥ {t['target_mb_s']:.0f} | "
            f"{b or 0:.0f} ({t['before_verdict']}) | "
            + (f"{one:.0f} ({t['after_1_thread_verdict']})" if one else "-")
            + f" | {a or 0:.0f} | {(a / b) if a and b else 0:.1f}x | **{t['verdict']}** |"
        )
    md += [
        "",
        "The verdict is the codec as shipped (threads per payload: the CPUs this process may use, at most "
        "4). Helper threads pay off on an idle machine and cost where other work holds the cores (a helper "
        "descheduled mid-block keeps the caller waiting): the 1-thread column is the same code held to "
        "the calling thread (`SPLITPOINT_CODEC_THREADS=1`).",
    ]
    md += [
        "",
        f"## Every codec on the {BENCH_SIZE} benchmark tensor",
        "",
        "| codec | ratio | bytes | encode MB/s before → after | decode MB/s before → after | "
        "encode+decode MB/s before → after | max abs error | bound |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def was(b: dict | None, key: str) -> str:
        return _mb(None if b is None else b[key])

    for c in codecs.all_codecs():
        a = res[("codec", BENCH_SIZE, c, "after")]
        b = res.get(("codec", BENCH_SIZE, c, "before"))
        e = errors[c]
        md.append(
            f"| {c} | {a['ratio']:.2f} | {a['bytes']:,} | {was(b, 'encode_mb_s')} → {a['encode_mb_s']:.0f} | "
            f"{was(b, 'decode_mb_s')} → {a['decode_mb_s']:.0f} | {was(b, 'roundtrip_mb_s')} → "
            f"**{a['roundtrip_mb_s']:.0f}** | {e['max_abs_error']:.4f} | {e['error_bound']:.4f} |"
        )
    md += [
        "",
        "## Every codec at every size (encode+decode MB/s, before → after)",
        "",
        "| codec | " + " | ".join(SIZES) + " |",
        "|---|" + "---:|" * len(SIZES),
    ]
    for c in codecs.all_codecs():
        cells = [f"{_mb(rt(s, c, 'before'))} → {_mb(rt(s, c, 'after'))}" for s in SIZES]
        md.append(f"| {c} | " + " | ".join(cells) + " |")

    notes = {k: v[:2] for opts in (z_opts, f_opts[BENCH_SIZE], s_opts) for k, v in opts.items()}
    sizes = [s for s in SIZES if s != "4 KiB"]
    for kind, title, what in (
        (
            "int8+zstd",
            "int8+zstd: the zstd stage and the libraries tried",
            "this int8 quantiser, then the option over its payload, and back",
        ),
        ("float16", "float16: the casts tried", "float32 to float16 and back"),
        (
            "float16+zstd",
            "float16+zstd: byte shuffle tried (no target)",
            "this float16 codec, then the option",
        ),
    ):
        if not any(o["target"] == kind for o in options):
            continue
        goal = TARGETS.get(kind)
        md += [
            "",
            f"## {title}",
            "",
            f"Each option runs the whole round trip ({what}), timed in its own rotation with the other "
            "options (so the shipped codec's figure here and in the targets table differ by the run's "
            "noise); encode+decode MB/s"
            + (f" against the target (≥ {goal:.0f}), the verdict computed per size." if goal else "."),
            "",
            f"| option | payload format | ratio ({BENCH_SIZE}) | "
            + " | ".join(sizes)
            + " | kept or dropped (why, when chosen) | this run against the shipped codec |",
            "|---|---|---:|" + "---:|" * len(sizes) + "---|---|",
        ]
        names = list(dict.fromkeys(o["option"] for o in options if o["target"] == kind))

        def speeds(name: str, kind: str = kind) -> dict:
            return {o["size"]: o for o in options if o["target"] == kind and o["option"] == name}

        shipped = next((n for n in names if "(the codec)" in n), None)
        for name in names:
            by = speeds(name)
            fmt, why = notes.get(
                name, ("v1", "the codec now" if name.startswith("after") else "the codec before")
            )
            cells = [
                f"{by[s]['roundtrip_mb_s']:.0f}"
                + (f" {verdict(by[s]['roundtrip_mb_s'] >= goal)}" if goal else "")
                for s in sizes
            ]
            ref = speeds(shipped) if shipped and name != shipped else None
            md.append(
                f"| {name} | {fmt} | {by[BENCH_SIZE]['ratio']:.2f} | "
                + " | ".join(cells)
                + f" | {why} | {_against(by, ref, sizes)} |"
            )
    md += [
        "",
        "## Carrying over to the Raspberry Pi",
        "",
        "The choices rest on libraries with aarch64 builds rather than on x86-specific code, so the ratios "
        "above should hold on a Pi's own measured speeds (`splitpoint profile` records them per device):",
        "",
        "- float16: onnxruntime's Cast (its aarch64 wheels; a Pi 4 needs onnxruntime 1.20.0) converts with "
        "the vector half-float instructions every ARMv8 core has, where numpy's cast is an element loop on "
        "every platform.",
        "- int8: numpy's own SIMD loops (NEON on aarch64) in fewer passes and without copies; the saving is "
        "memory traffic, which a Pi 4's narrower memory bus feels more.",
        "- zstd: python-zstandard's aarch64 wheels compile the same C; the tuned frame parameters change the "
        "work done (fewer match searches, a smaller table), not the instructions. Threads follow the CPUs "
        "the process may use (4 on a Pi; `SPLITPOINT_CODEC_THREADS` or `codecs.set_threads` changes it), "
        "the calling thread works too, and payloads of one 128 KiB chunk never use helper threads.",
        "- Copies: payloads and decoded arrays are placed so that no large copy writes 1-64 bytes past "
        "where it reads, modulo 4 KiB, which stalls x86 cores (4K aliasing); elsewhere it costs nothing.",
        "",
    ]
    write_results(
        "codecs",
        {
            "repeats": args.repeats,
            "baseline": args.baseline if old is not None else None,
            "threads": threads,
            "cpu_share_used_by_other_processes": others,
            "load_average_before": load_before,
            "load_average_after": load_after,
            "loaded": loaded,
            "note": args.note,
            "targets": targets,
            "rows": rows,
            "options": options,
        },
        "\n".join(md),
        out=args.out,
    )


if __name__ == "__main__":
    main()
