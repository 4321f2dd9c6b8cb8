"""Measuring a model where it will run: the whole model, every node, and real segments.

Per-node sums miss what fusion, layout transforms and memory do at a segment's edges, so the
head and tail of a cut must be timed as the sub-models they will be. Timing every cut of a
large model on a slow device takes too long; instead we time a few real segments (anchors, as many
as the budget allows and at least one, spread evenly along the per-node cost curve, the first in the
middle) and interpolate the others along that curve between them. The benchmark checks the
interpolation against direct measurements of every cut.

A segment is timed back to back, warm, as a deployed edge runs its head request after request, and
so is the whole model it is compared with; the whole model timed just before and after each anchor is
the reference that cancels the machine's drift. Timing head, tail and whole model in turn, one call
each, measures each one with its caches full of the other two: MobileNetV2 ran 5-10 % slower so, and
that state is neither the reference's nor a deployed device's.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import psutil

from splitpoint.core.errors import ModelError, ProfileError, first_line
from splitpoint.core.graph import ModelHandle
from splitpoint.core.graph.cuts import Cut, cut_by_index
from splitpoint.core.graph.extract import extract
from splitpoint.core.graph.memory import live_activation_peaks, weight_bytes_by_prefix
from splitpoint.core.runner import make_session
from splitpoint.core.weights import is_stub

from .codeccache import cached_codec_speeds
from .cpulimit import lifted, sample_span_ms
from .facts import device_facts, temperature_c, throttled
from .ort_trace import cost_curve, node_times
from .schema import CodecSpeed, CutTiming, Emulation, MeasuredProfile, NodeTime, Stat


@dataclass
class ProfileSettings:
    role: str = "edge"
    threads: int = 1
    provider: str = "CPUExecutionProvider"
    warmup: int = 1
    repeats: int = 5
    segment_warmup: int = 1
    segment_repeats: int = 3
    profile_runs: int = 2
    int8: bool = False  # also time the statically quantised (QDQ int8) model
    budget: float = 30.0  # wall time for the segments, builds included, in multiples of one full inference
    anchors: int | None = None  # override the budget-derived number of measured cuts
    batch: int = 1
    fresh_codecs: bool = False  # measure codec speeds even where this device's are cached (codeccache)


def median_of_present(xs) -> float | None:
    """Median of the values that were measured (None where a stage did not run), or None."""
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def stat(samples_ms: list[float]) -> Stat:
    s = sorted(samples_ms)
    return Stat(
        median_ms=statistics.median(s),
        p90_ms=float(np.percentile(s, 90)),
        min_ms=s[0],
        max_ms=s[-1],
        runs=len(s),
    )


def timed(fn: Callable[[], object], min_ms: float = 0.0) -> float:
    """Milliseconds per call of ``fn``: one call, or as many back to back as fill ``min_ms`` (under
    a CPU quota, a few periods: a call shorter than the period's quota would otherwise run at the
    host's full speed after any pause, see ``cpulimit``)."""
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        total = (time.perf_counter() - t0) * 1e3
        if total >= min_ms:
            return total / n


def time_runs(fn: Callable[[], object], warmup: int, repeats: int, min_ms: float = 0.0) -> list[float]:
    """Milliseconds of each of ``repeats`` samples (``timed``), after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    return [timed(fn, min_ms) for _ in range(repeats)]


@contextlib.contextmanager
def _frozen_gc() -> Iterator[None]:
    """Collections inside skip every object that exists on entry (a model's index is large, and a full
    collection walked it before each segment: ~40 ms on ResNet-50)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _trim_heap() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def choose_anchors(cum: list[float], n: int, valid: list[int] | None = None) -> list[int]:
    """Cut indices (1-based) closest to evenly spaced fractions of the cumulative cost curve, among the
    ``valid`` ones (a position whose cut would send a sequence is none: it once was picked, and the
    profile died on it)."""
    total = cum[-1] if cum and cum[-1] > 0 else 1.0
    m = len(cum)
    pool = [k for k in valid if 1 <= k < m] if valid is not None else list(range(1, m))
    if not pool:
        return []
    chosen: list[int] = []
    for j in range(1, n + 1):
        target = total * j / (n + 1)
        k = min(pool, key=lambda i: abs(cum[i - 1] - target))
        if k not in chosen:
            chosen.append(k)
    return sorted(chosen)


def coverage_order(anchors: list[int]) -> list[int]:
    """Farthest-first order (middle, then quarters, ...): stopping early still leaves the
    measured anchors spread over the whole model."""
    if not anchors:
        return []
    lo, hi = 0, max(anchors) + 1
    order: list[int] = []
    rest = list(anchors)
    while rest:
        pick = max(rest, key=lambda a: min(abs(a - b) for b in [lo, hi, *order]))
        order.append(pick)
        rest.remove(pick)
    return order


def interpolate(x: float, xs: list[float], ys: list[float]) -> float:
    return float(np.interp(x, xs, ys))


def codec_speeds(
    repeats: int = 3, size: int = 2**18, seed: int = 0, min_total_ms: float = 0.0
) -> dict[str, CodecSpeed]:
    """Encode and decode throughput of every codec on a 1 MiB ReLU-like activation tensor, as a
    device sustains it when it encodes every request (under a CPU quota, give ``min_total_ms`` a
    few quota periods: ``timed``)."""
    from splitpoint.core.codecs import all_codecs, decode, encode

    rng = np.random.default_rng(seed)
    x = np.maximum(rng.standard_normal((1, 64, size // 4096, 64)), 0).astype(np.float32)
    out = {}
    for c in all_codecs():
        payload = encode(x, c)
        enc = statistics.median(time_runs(partial(encode, x, c), 1, repeats, min_total_ms))
        dec = statistics.median(time_runs(partial(decode, payload), 1, repeats, min_total_ms))
        out[c] = CodecSpeed(
            encode_mb_s=x.nbytes / enc / 1e3, decode_mb_s=x.nbytes / dec / 1e3, ratio=x.nbytes / len(payload)
        )
    return out


def int8_of(handle: ModelHandle) -> onnx.ModelProto:
    """The whole model statically quantised (QDQ, u8 activations, s8 weights), calibrated on 8 samples."""
    from splitpoint.core.quantize import quantize_head

    return quantize_head(handle.model, [handle.sample(1, 100 + i) for i in range(8)], "static", timing=True)


def profile_model(
    handle: ModelHandle,
    settings: ProfileSettings,
    emulation: Emulation | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    int8_model: onnx.ModelProto | None = None,
) -> MeasuredProfile:
    """``int8_model``: the static int8 model ``settings.int8`` times, made by the caller outside an
    emulated device's CPU limit (quantising is bookkeeping: under a 20x quota it took 100 s of a
    profile budgeted at 5 inferences); made here where not given."""
    t_start = time.perf_counter()
    if settings.int8:  # refused before any of the profile's time is spent, not at its end
        from splitpoint.core.quantize import refuse_quantized

        refuse_quantized(handle.model, "static")
    note = progress or (lambda *_: None)
    temp_before, throttle_before = temperature_c(), throttled()
    idx = handle.index
    cuts: list[Cut] = handle.cuts()
    feeds = handle.sample(settings.batch)
    clock = {"build_s": 0.0, "run_ms": 0.0}
    min_ms = sample_span_ms(emulation)  # a real device has one speed; a quota's bursts must not show

    @contextlib.contextmanager
    def running() -> Iterator[None]:
        """Count the block's wall time as time spent running the model."""
        t0 = time.perf_counter()
        yield
        clock["run_ms"] += (time.perf_counter() - t0) * 1e3

    def build(model: str | Path | bytes | onnx.ModelProto) -> ort.InferenceSession:
        t0 = time.perf_counter()
        s = make_session(model, settings.threads, settings.provider, weights=idx.weight_array)
        clock["build_s"] += time.perf_counter() - t0
        return s

    # 1: per-node times from onnxruntime's profiler: only their proportions are used. One session
    # serves both this and the whole model's timing: onnxruntime stops logging events at
    # end_profiling, after which the session runs as a plain one (a second build of the whole model
    # was a large share of the profiler's wall time).
    note("per-node profile", 0, 1)
    t0 = time.perf_counter()
    whole_sess = handle.whole_session(settings.threads, settings.provider, enable_profiling=True)
    clock["build_s"] += time.perf_counter() - t0

    def run_whole() -> list:
        return whole_sess.run(None, feeds)

    try:
        # proportions only, at the host's speed: under a CPU quota each node would show either its host
        # time or a whole period's stall (``lifted``)
        with running(), lifted(emulation):
            time_runs(run_whole, 1, settings.profile_runs)
    except BaseException as exc:  # a model that cannot run leaves no trace file behind
        with contextlib.suppress(Exception):
            os.unlink(whole_sess.end_profiling())
        note_values = handle.random_values_note() if type(exc).__module__.startswith("onnxruntime") else ""
        if note_values:  # the sample's values, not its shapes, may be what the model refuses
            raise ModelError(f"onnxruntime could not run the model: {first_line(exc)}{note_values}") from exc
        raise
    trace = whole_sess.end_profiling()
    try:
        per_node, unattributed, profiled_runs = node_times(trace, idx, skip_runs=1)
    except ValueError as exc:  # cut short where onnxruntime wrote it: a full disk, a file size limit
        raise ProfileError(
            f"onnxruntime's per-node trace {trace} is not complete JSON ({first_line(exc)}): is "
            f"{os.path.dirname(os.path.abspath(trace))} full, or a file size limit set (ulimit -f)?"
        ) from exc
    finally:
        os.unlink(trace)

    # 2: the whole model, with event logging off. The session stays open: one run before and after
    # each segment measurement is the reference that cancels the machine's drift.
    note("whole model", 0, 1)
    with running():  # warm already: the profiled runs were its warm-up
        samples = time_runs(run_whole, 0, settings.repeats, min_ms)
    host_ms = None
    if emulation is not None and emulation.quota_us:  # the slowdown the limit gave, against full speed
        with running(), lifted(emulation):
            # a warm-up first (the quota's last period still throttles the first run lifted) and 5 runs:
            # the median of 3 cold ones swung the recorded slowdown by up to 1.4x on a busy machine, so
            # that the warning below it stayed quiet where it should have spoken
            host_ms = statistics.median(time_runs(run_whole, 1, 5))
    curve, curve_source = cost_curve(idx, per_node, unattributed)
    cum: list[float] = list(np.cumsum(curve))
    total = cum[-1] if cum and cum[-1] > 0 else 1.0

    # 3: real head and tail sub-models at anchor cuts, farthest-first, until the budget is spent
    fixed = settings.repeats + 1 + settings.profile_runs
    per_anchor = settings.segment_warmup + settings.segment_repeats + 1
    n_anchor = (
        settings.anchors
        if settings.anchors is not None
        else int(max(2, (settings.budget - fixed) // per_anchor))
    )
    planned = coverage_order(
        choose_anchors(cum, min(n_anchor, len(cuts)), [c.k for c in cuts]) if cuts else []
    )
    weights = weight_bytes_by_prefix(handle.index)
    act_peaks = live_activation_peaks(handle.index)
    measured: dict[int, dict] = {}
    proc = psutil.Process()
    note("codec throughput", 0, len(planned))
    # before the segments, so that the budget counts it
    codecs, codecs_source = cached_codec_speeds(
        partial(codec_speeds, min_total_ms=min_ms), emulation, min_ms, settings.fresh_codecs
    )
    with running():
        w_prev = time_runs(run_whole, 0, 1, min_ms)[0]
    samples.append(w_prev)
    whole_ms = statistics.median(samples)
    last_cost = 0.0
    with _frozen_gc():
        for j, k in enumerate(planned):
            # the budget is wall time, session builds included: what the user waits for
            spent_ms = (time.perf_counter() - t_start) * 1e3
            if measured and (spent_ms + last_cost) / whole_ms > settings.budget:
                break  # the next segment would overrun the budget
            before = time.perf_counter()
            note(f"segment at cut {k}", j, len(planned))
            cut = cut_by_index(idx, k, cuts)
            head, tail = extract(idx, cut, check=False, shared_weights=True)
            # the head's weights are read before the RSS baseline and counted by their size: one copy of
            # them is what the edge holds (the arrays are shared with every session built from them)
            head_weights = sum(idx.weight_array(t.name).nbytes for t in head.graph.initializer if is_stub(t))
            _trim_heap()
            rss0 = proc.memory_info().rss
            hs = build(head)
            head_in = {i.name: feeds[i.name] for i in hs.get_inputs()}
            h_out = dict(zip([o.name for o in hs.get_outputs()], hs.run(None, head_in), strict=True))
            rss = max(proc.memory_info().rss, rss0) - rss0 + head_weights
            ts = build(tail)
            t_in = {c.name: (feeds[c.name] if c.source == "input" else h_out[c.name]) for c in cut.crossing}
            with running():  # each back to back, warm, as the edge and the server run them
                hs_ms = time_runs(
                    partial(hs.run, None, head_in), settings.segment_warmup, settings.segment_repeats, min_ms
                )
                ts_ms = time_runs(
                    partial(ts.run, None, t_in), settings.segment_warmup, settings.segment_repeats, min_ms
                )
                w_next = time_runs(run_whole, 0, 1, min_ms)[0]
            samples.append(w_next)
            h, t = stat(hs_ms), stat(ts_ms)
            # the split's total relative to the whole model timed just before and after it (the
            # running median joins them so one preempted reference run cannot skew the ratio)
            ratio = (h.median_ms + t.median_ms) / statistics.median(
                [w_prev, w_next, statistics.median(samples)]
            )
            measured[k] = {"head": h, "tail": t, "rss": rss, "ratio": ratio}
            w_prev = w_next
            whole_ms = statistics.median(samples)
            last_cost = (time.perf_counter() - before) * 1e3
            del hs, ts, head, tail  # one pair of sessions alive at a time
    anchors = sorted(measured)
    int8_whole = None
    if settings.int8:
        note("int8 model", len(planned), len(planned))
        qsess = build(int8_model if int8_model is not None else int8_of(handle))
        with running():
            int8_whole = stat(
                time_runs(lambda: qsess.run(None, feeds), settings.warmup, settings.repeats, min_ms)
            )
    whole = stat(samples)

    # Between anchors, interpolate the head's share h / (h + t) along the per-node cost curve; a
    # ratio of timings taken within a second of each other, it is free of the machine's drift. The
    # split's total is the whole model times the overhead ratio (two session calls and the layout
    # reorders at the boundary), interpolated between the anchors alike and held at the nearest
    # beyond them: one median for every cut put MobileNetV2's cut 10 at 1.0x the whole beside cut 9
    # measured at 1.20x (its head 28-33 % low).
    xs = [cum[k - 1] / total for k in anchors]
    shares = [
        measured[k]["head"].median_ms / (measured[k]["head"].median_ms + measured[k]["tail"].median_ms)
        for k in anchors
    ]
    # a split does at least the whole model's work: a ratio below 1 is the reference runs' noise
    ratios = [max(1.0, measured[k]["ratio"]) for k in anchors]
    # a session holds its weights once, its live activations and a part that does not grow with the head
    # (onnxruntime's arena and thread pools, 10-20 MiB): that part is what the anchors measure beyond the
    # other two. A ratio applied to the whole put AlexNet's head at 883 MiB where building it holds 234 MiB
    mem_overheads = [
        measured[k]["rss"] - weights[k - 1] - act_peaks[k - 1] * settings.batch
        for k in anchors
        if measured[k]["rss"] > 0
    ]
    mem_overhead = max(0, int(statistics.median(mem_overheads))) if mem_overheads else 0
    timings = []
    for cut in cuts:
        k = cut.k
        derived_mem = weights[k - 1] + act_peaks[k - 1] * settings.batch + mem_overhead
        mem_note = "derived: weights + live activations + the session overhead measured at the measured cuts"
        if k in measured:
            m = measured[k]
            timings.append(
                CutTiming(
                    index=k,
                    head_ms=m["head"].median_ms,
                    tail_ms=m["tail"].median_ms,
                    head_p90_ms=m["head"].p90_ms,
                    tail_p90_ms=m["tail"].p90_ms,
                    source="measured",
                    head_memory_bytes=m["rss"] if m["rss"] > 0 else derived_mem,
                    memory_source="measured: RSS delta of building and running the head, plus its weights"
                    if m["rss"] > 0
                    else mem_note,
                )
            )
        else:
            x = cum[k - 1] / total
            share = interpolate(x, [0.0, *xs, 1.0], [0.0, *shares, 1.0])
            overhead = interpolate(x, [0.0, *xs, 1.0], [ratios[0], *ratios, ratios[-1]]) if ratios else 1.0
            split_ms = whole.median_ms * overhead
            timings.append(
                CutTiming(
                    index=k,
                    head_ms=share * split_ms,
                    tail_ms=(1 - share) * split_ms,
                    source="derived",
                    head_memory_bytes=derived_mem,
                    memory_source=mem_note,
                )
            )
    # per-node times in this device's terms: measured out of the quota, scaled to the whole model's time
    # under it (an emulated device is the host, uniformly slower)
    node_scale = 1.0
    if emulation is not None and emulation.quota_us and profiled_runs:
        node_scale = whole.median_ms / max(statistics.median(profiled_runs), 1e-9)
    if emulation is not None and host_ms:
        emulation = emulation.model_copy(update={"measured_slowdown": whole.median_ms / host_ms})
    nodes = [
        NodeTime(
            name=idx.nodes[p].name or f"{idx.nodes[p].op_type}#{p}",
            op_type=idx.nodes[p].op_type,
            median_ms=per_node.get(p, 0.0) * node_scale,
        )
        for p in idx.compute
    ]
    return MeasuredProfile(
        role=settings.role,
        model_name=handle.name,
        model_sha256=handle.sha256,
        input_shapes=handle.input_shapes,
        device=device_facts(),
        settings=dict(settings.__dict__),
        emulation=emulation,
        whole=whole,
        int8_whole=int8_whole,
        nodes=nodes,
        unattributed_ms=unattributed * node_scale,
        cuts=timings,
        codecs=codecs,
        cost={
            "measured_cuts": anchors,
            "timed_run_ms": clock["run_ms"],
            "full_inference_equivalents": clock["run_ms"] / whole.median_ms,  # timed runs only
            "wall_inference_equivalents": (time.perf_counter() - t_start) * 1e3 / whole.median_ms,
            "session_build_s": clock["build_s"],
            "codecs_source": codecs_source,
            "wall_s": time.perf_counter() - t_start,
            "memory_overhead_bytes": mem_overhead,
            "profiled_run_ms": statistics.median(profiled_runs) if profiled_runs else None,
            # the anchors' median; a derived cut's is interpolated between the anchors' own
            "split_overhead_ratio": statistics.median(ratios) if ratios else 1.0,
            "split_overhead_ratios": {str(k): measured[k]["ratio"] for k in anchors},
            # what a derived cut's head share is interpolated along, between measured cuts
            "derived_curve": curve_source,
        },
        thermal={
            "before_c": temp_before,
            "after_c": temperature_c(),
            "throttled_before": throttle_before,
            "throttled_after": throttled(),
        },
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
