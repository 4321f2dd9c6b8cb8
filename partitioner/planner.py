"""The planner: measurements in, a deployable plan out.

Inputs are measured (edge and server profiles, encoded sizes of real cut tensors, codec
throughput on each side, fidelity runs); the cost model combines them into predicted figures,
labelled as derived. Output fidelity is measured, never assumed. Measuring it for every
cut x codec would take minutes, so it is measured lazily and still exactly: an unmeasured
candidate counts with fidelity 1.0, its upper bound; the front members without a measurement
are measured and the front recomputed until every member is measured. A candidate off that
optimistic front is dominated whatever its true fidelity, so the final front is the true one.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx

from splitpoint.core.codecs import Codec, applied, applied_to, decode, encode, encoded_size
from splitpoint.core.errors import ProfileError, SplitPointError
from splitpoint.core.graph import GraphIndex, ModelHandle
from splitpoint.core.graph.extract import extract
from splitpoint.core.graph.memory import live_activation_peaks, weight_bytes_by_prefix
from splitpoint.core.plan import EDGE_ONLY, SERVER_ONLY, SPLIT
from splitpoint.core.quantize import quantize_head
from splitpoint.core.runner import Joined, make_session, run_batched
from splitpoint.profiles.schema import MeasuredProfile, NetworkProfile

from .costmodel import RUNTIME_NOT_MEASURED, Candidate, CandidateInput, Link, evaluate
from .fidelity import (
    FidelityReport,
    compare_outputs,
    measure,
    received_digest,
    task_report,
    warn_if_constant,
)
from .pareto import Constraints, front, infeasible, optimistic_key, pick
from .planset import fastest

DEFAULT_CODECS = [
    "float32",
    "float32+zstd",
    "float16",
    "float16+zstd",
    "int8",
    "int8+zstd",
    "int8-ch+zstd",
    "int4+zstd",
]
REPLY_OVERHEAD_BYTES = 128  # reply header per inference (wire format)


def link_of(net: NetworkProfile) -> Link:
    return Link(net.name, net.uplink_mbps, net.downlink_mbps, net.rtt_ms, net.jitter_ms, net.loss)


@dataclass
class Measurements:
    """Everything the cost model needs that does not depend on the link."""

    handle: ModelHandle
    edge: MeasuredProfile
    server: MeasuredProfile
    codecs: list[str]
    sizes: dict[str, dict[str, int]]  # tensor -> codec (or RAW) -> encoded bytes per sample (median)
    reply_bytes: dict[int, int]  # cut (0 = server-only) -> reply bytes
    samples: list[dict[str, np.ndarray]]
    reference: list[Joined] = field(default_factory=list)
    int8_heads: bool = False  # add candidates whose head runs with int8 (QDQ) weights
    fidelity: dict[tuple, float] = field(default_factory=dict)  # (cut, codec, head) -> score
    fidelity_reports: dict[tuple, dict] = field(default_factory=dict)
    truths: list | None = None  # what each sample shows (rendered task inputs), for task metrics


RAW = "raw"  # encoded_sizes' key for a tensor's own bytes (no codec is named so)


def codec_work(sizes: dict[str, dict[str, int]], idx: GraphIndex, names: Iterable[str], codec: str) -> int:
    """The bytes ``codec``'s measured speeds (per float32 byte) apply to, for tensors ``names``: a
    quantiser's or a float16 cast's work is per element, so a float16 tensor costs what a float32 one of
    as many elements does, not half (its int8 encode was predicted at 0.045 ms and took 0.2); a copy or a
    lossless compressor works on the tensor's own bytes (a float16 tensor under float32+lz4, or float16;
    an integer tensor, which every codec sends exact)."""
    total = 0
    for t in names:
        dtype = idx.info[t].dtype if t in idx.info else "float32"
        base = Codec.parse(applied_to(codec, [dtype])).base
        per_element = base != "float32" and not (base == "float16" and dtype == "float16")
        own = sizes[t][RAW]
        total += own * 4 // np.dtype(dtype).itemsize if per_element else own  # as float32, a float's
    return total


def encoded_sizes(
    handle: ModelHandle, samples: list[dict[str, np.ndarray]], codecs: list[str]
) -> dict[str, dict[str, int]]:
    """Encoded bytes of every tensor that crosses some cut, for every codec, on real samples. One
    sample's tensors are held at a time: all of them for 64 samples of a 416x416 detector took 9 GiB."""
    idx = handle.index
    names = list(dict.fromkeys([c.name for cut in handle.cuts() for c in cut.crossing] + idx.inputs))
    m = onnx.ModelProto()
    m.CopyFrom(handle.model)
    produced = [n for n in names if n not in idx.inputs]
    existing = {o.name for o in m.graph.output}
    m.graph.output.extend([idx.tensor(n).value_info() for n in produced if n not in existing])
    sess = make_session(m)
    out_names = [o.name for o in sess.get_outputs()]
    seen: dict[str, dict[str, list[int]]] = {n: {c: [] for c in [*codecs, RAW]} for n in names}
    replied = [o for o in idx.outputs if o not in seen]  # sent back raw: their own bytes only
    seen.update({o: {RAW: []} for o in replied})
    parsed = [(c, Codec.parse(c)) for c in codecs]
    for s in samples:
        vals = dict(zip(out_names, sess.run(out_names, s), strict=True))
        vals.update(s)
        for o in replied:
            seen[o][RAW].append(np.asarray(vals[o]).nbytes)
        for n in names:
            v = np.asarray(vals[n])
            # an index or mask tensor goes exact under every codec: sized once per lossless stage, not
            # once per codec (2,565 of a Swin-T's 3,493 crossing tensors are int64 or bool)
            memo: dict[Codec, int] = {}
            for name, c in parsed:
                a = applied(v, c)
                if a not in memo:
                    memo[a] = encoded_size(v, a)
                seen[n][name].append(memo[a])
            seen[n][RAW].append(v.nbytes)
        del vals
    return {n: {c: int(statistics.median(b)) for c, b in by.items()} for n, by in seen.items()}


def output_bytes(idx: GraphIndex, sizes: dict[str, dict[str, int]], outputs: Iterable[str]) -> int:
    """The model outputs' bytes per sample as the reply carries them: at their declared sizes, and as
    measured on the samples where no size is declared (a detector's kept boxes, a Resize to scales an
    input gives), which counted as 0 bytes (a 4 MiB reply left out of the latency)."""
    total = 0
    for o in outputs:
        declared = idx.tensor(o).bytes_per_sample()
        total += declared if declared is not None else sizes.get(o, {}).get(RAW, 0)
    return total


def _speed(profile: MeasuredProfile, codec: str, what: str, where: str) -> float:
    if codec not in profile.codecs:
        raise ProfileError(
            f"{where} profile has no throughput for codec {codec}; re-run `splitpoint profile`"
        )
    return getattr(profile.codecs[codec], what)


def input_types(idx: GraphIndex) -> list[str]:
    """The model inputs' element types, as a server-only candidate sends them."""
    return [idx.info[i].dtype if i in idx.info else "float32" for i in idx.read_inputs()]


def candidate_inputs(m: Measurements) -> list[CandidateInput]:
    h = m.handle
    idx = h.index
    out = []
    input_bytes = sum(m.sizes[i][RAW] for i in idx.inputs)  # as measured: a declared size may be unknown
    weights = weight_bytes_by_prefix(idx)
    # onnxruntime's int8 quantisers store float32 weights in a quarter of their bytes and leave weights of
    # other types as they are (a float16 model's "int8" head was claimed 30 % smaller and was no smaller)
    float32_weights = weight_bytes_by_prefix(idx, only=onnx.TensorProto.FLOAT)
    # the whole model's memory on the edge: the last cut's head, measured or derived; a model with no cut
    # (one compute node, or none) has its weights and largest live activations (derived)
    whole_mem = (
        m.edge.cuts[-1].head_memory_bytes
        if m.edge.cuts
        else (weights[-1] if weights else 0) + max(live_activation_peaks(idx), default=0)
    )
    heads = ["float32"] + (["int8"] if m.int8_heads else [])
    # int8 heads: edge time scaled by the measured int8/float32 ratio of the whole model on the
    # edge (derived), float32 weights a quarter of their size
    speedup = (m.edge.int8_whole.median_ms / m.edge.whole.median_ms) if m.edge.int8_whole else None

    def head_ms(ms: float, head: str) -> float:
        if head == "float32":
            return ms
        assert speedup is not None, "gather() refuses int8 heads without the edge's int8 timing"
        return ms * speedup

    def timing(source: str, head: str = "float32") -> str:
        return "scaled" if head != "float32" else ("measured" if source == "measured" else "interpolated")

    # the runtime's own time per request: measured on both sides, on one (the other counts none), or not
    sides = [bool(m.edge.runtime_ms.get("edge")), bool(m.server.runtime_ms.get("server"))]
    runtime_timing = (
        "measured"
        if all(sides)
        else f"measured on the {'edge' if sides[0] else 'server'} only (the other profiled without --runtime)"
        if any(sides)
        else RUNTIME_NOT_MEASURED
    )

    def head_mem(mem: int, k: int, head: str) -> int:
        if head == "float32" or not weights:
            return mem
        return max(0, mem - int(0.75 * float32_weights[k - 1]))

    def runtime(up_bytes: int) -> dict[str, Any]:
        """The runtime's own time per request on each side (the profiles' --runtime figures: a fixed
        part and one per MiB of cut tensor sent and received); 0 where a profile did not measure it."""
        mib = up_bytes / 2**20
        return {
            "runtime_timing": runtime_timing,
            "edge_runtime_ms": m.edge.runtime_ms.get("edge", 0.0)
            + m.edge.runtime_ms_per_mib.get("edge", 0.0) * mib,
            "server_runtime_ms": m.server.runtime_ms.get("server", 0.0)
            + m.server.runtime_ms_per_mib.get("server", 0.0) * mib,
        }

    for head in heads:
        # all on the edge: the model as it is (or quantised)
        out.append(
            CandidateInput(
                EDGE_ONLY,
                None,
                "-",
                head,
                head_ms(m.edge.whole.median_ms, head),
                0.0,
                0.0,
                0.0,
                0,
                0,
                head_mem(whole_mem, len(weights), head),
                m.fidelity.get((None, "-", head)),
                head_timing=timing("measured", head),
                runtime_timing="none: nothing is sent",
            )
        )
    seen: set[tuple] = set()

    def label(codec: str, dtypes: list[str], key: tuple) -> str | None:
        """The codec as it applies to tensors of these types: a quantising one sends integer tensors
        exact (token ids), so it is the lossless codec of the same stage; None where that candidate is
        listed already (an int64-only input read 'server-only int4+zstd', and again as int8+zstd)."""
        name = applied_to(codec, dtypes)
        if (*key, name) in seen:
            return None
        seen.add((*key, name))
        return name

    inputs = input_types(idx)

    def timed_as(codec: str, sent: str | None) -> str:
        """The codec whose measured speed applies: the one the tensors are sent with, where measured."""
        return sent if sent and sent in m.edge.codecs and sent in m.server.codecs else codec

    for codec in m.codecs:
        sent_as = label(codec, inputs, (SERVER_ONLY, 0))
        if sent_as is not None:
            timed = timed_as(codec, sent_as)
            work = codec_work(m.sizes, idx, idx.read_inputs(), codec)
            enc = work / _speed(m.edge, timed, "encode_mb_s", "edge") / 1e3
            dec = work / _speed(m.server, timed, "decode_mb_s", "server") / 1e3
            up = sum(m.sizes[i][codec] for i in idx.read_inputs())
            out.append(
                CandidateInput(
                    SERVER_ONLY,
                    0,
                    sent_as,
                    "float32",
                    0.0,
                    m.server.whole.median_ms,
                    enc,
                    dec,
                    up,
                    m.reply_bytes[0],
                    input_bytes,
                    m.fidelity.get((0, sent_as, "float32")),
                    **runtime(up),
                )
            )
        for cut in h.cuts():
            et, st = m.edge.cut(cut.k), m.server.cut(cut.k)
            work = codec_work(m.sizes, idx, [c.name for c in cut.crossing], codec)
            up = sum(m.sizes[c.name][codec] for c in cut.crossing)
            for head in heads:
                sent = label(codec, [c.dtype for c in cut.crossing], (SPLIT, cut.k, head))
                if sent is None:
                    continue
                enc = work / _speed(m.edge, timed_as(codec, sent), "encode_mb_s", "edge") / 1e3
                dec = work / _speed(m.server, timed_as(codec, sent), "decode_mb_s", "server") / 1e3
                out.append(
                    CandidateInput(
                        SPLIT,
                        cut.k,
                        sent,
                        head,
                        head_ms(et.head_ms, head),
                        st.tail_ms,
                        enc,
                        dec,
                        up,
                        m.reply_bytes[cut.k],
                        head_mem(et.head_memory_bytes, cut.k, head),
                        m.fidelity.get((cut.k, sent, head)),
                        **runtime(up),
                        head_timing=timing(et.source, head),
                        tail_timing=timing(st.source),
                    )
                )
    return out


def unmeasured_on_front(
    inputs: list[CandidateInput],
    links: list[Link],
    objectives: tuple[int, ...] | None = None,
    floor: float | None = None,
) -> set[tuple]:
    """(cut, head precision, codec) of the candidates on some link's optimistic front (over
    ``objectives``, of the candidates not measured below ``floor``) that have no measurement (cut 0 =
    server-only, None = edge-only)."""
    need: set[tuple] = set()
    inputs = [ci for ci in inputs if not _below(ci, floor)]
    for link in links:
        optimistic = [
            evaluate(ci if ci.fidelity is not None else replace(ci, fidelity=1.0), link) for ci in inputs
        ]
        for c in front(optimistic, objectives):
            original = next(
                ci
                for ci in inputs
                if ci.kind == c.inp.kind
                and ci.cut == c.inp.cut
                and ci.codec == c.inp.codec
                and ci.head_weights == c.inp.head_weights
            )
            if original.fidelity is None:
                need.add((c.inp.cut, c.inp.head_weights, c.inp.codec))
    return need


def _below(ci: CandidateInput, floor: float | None) -> bool:
    return floor is not None and ci.fidelity is not None and ci.fidelity < floor


def measure_fidelity(
    m: Measurements, wanted: set[tuple], note: Callable[[str, int, int], None] | None = None
) -> None:
    """Measure fidelity for the baselines and the ``wanted`` candidates: (cut, head precision) pairs
    measure every codec at that cut (a front often holds several, and the tail session and the quantised
    head are then built once), (cut, head precision, codec) triples that codec and those that decode to
    the same tensors (one base, another lossless stage): a pick needs one codec, and on a large model
    each codec's tail runs over every sample are most of planning's time."""
    h = m.handle
    full = h.whole_session()  # built once: the reference and the server-only runs share it
    if not m.reference:
        m.reference = run_batched(full, m.samples)
        warn_if_constant(m.reference, len(m.samples), h.given_sample is not None)
    m.fidelity[(None, "-", "float32")] = 1.0  # edge-only runs the unmodified model: identical outputs
    runs: dict[bytes, list[Joined]] = {}  # server-only: one full-model run per decoded input
    inputs = input_types(h.index)
    read = set(h.index.read_inputs())  # an input nothing reads stays on the edge, as it is
    for codec in m.codecs:
        if (0, codec, "float32") in m.fidelity:
            continue
        received = [
            {k: decode(encode(v, codec)) if k in read else v for k, v in s.items()} for s in m.samples
        ]
        digest = received_digest(received)
        if digest not in runs:
            runs[digest] = run_batched(full, received)
        _record(m, 0, codec, "float32", runs[digest])
        _also_as_sent(m, 0, codec, "float32", applied_to(codec, inputs))
    pairs: dict[tuple, set[str] | None] = {}
    for w in wanted:
        key = (w[0], w[1])
        if len(w) < 3 or (key in pairs and pairs[key] is None):
            pairs[key] = None  # every codec
        else:
            pairs[key] = (pairs.get(key) or set()) | {w[2]}
    by_index = {c.index: c for c in h.cuts()}
    for done_n, ((k, head), only) in enumerate(sorted(pairs.items(), key=lambda kv: _cut_order(kv[0]))):
        if note:
            note(f"fidelity at cut {k} ({head} head)", done_n, len(pairs))
        if k is None:  # edge-only with an int8 model
            if (None, "-", head) not in m.fidelity:
                q = make_session(quantize_head(h.model, m.samples, "static"))
                _record(m, None, "-", head, run_batched(q, m.samples))
            continue
        if k == 0:
            continue
        cut = by_index[k]
        # a candidate names the codec as it applies to what crosses (int8 over token ids is sent as the
        # lossless codec of its stage): measured under that name too, or a candidate whose name is no
        # codec asked for (float32+lz4 under --codecs int8+lz4) was never measured, and planning waited
        # for it in a loop that did not end
        sent = {c: applied_to(c, [t.dtype for t in cut.crossing]) for c in m.codecs}
        bases = None if only is None else {Codec.parse(c).base for c in only}
        todo = [
            c
            for c in m.codecs
            if (k, c, head) not in m.fidelity and (bases is None or Codec.parse(sent[c]).base in bases)
        ]
        if not todo:
            continue
        head_model = (
            quantize_head(extract(h.index, cut, check=False)[0], m.samples, "static")
            if head == "int8"
            else None
        )
        for codec, rep in measure(
            h,
            cut,
            todo,
            m.samples,
            head_model=head_model,
            head_weights=head,
            reference=m.reference,
            truths=m.truths,
        ).items():
            m.fidelity[(k, codec, head)] = rep.score
            m.fidelity_reports[(k, codec, head)] = rep.to_dict()
            _also_as_sent(m, k, codec, head, sent[codec])


def _also_as_sent(m: Measurements, cut: int, codec: str, head: str, sent: str) -> None:
    """The fidelity measured with ``codec`` recorded also under the name it is sent as, where they differ."""
    if sent != codec and (cut, sent, head) not in m.fidelity:
        m.fidelity[(cut, sent, head)] = m.fidelity[(cut, codec, head)]
        m.fidelity_reports[(cut, sent, head)] = {**m.fidelity_reports[(cut, codec, head)], "codec": sent}


def _cut_order(pair: tuple) -> tuple:
    """(cut, head precision) in cut order, the edge-only model (cut None) last."""
    return (pair[0] is None, pair[0] or 0, pair[1])


def _record(m: Measurements, cut, codec: str, head: str, outputs: list[Joined]) -> None:
    n = len(m.samples)
    rep = FidelityReport(
        cut,
        codec,
        head,
        n,
        compare_outputs(m.handle, m.reference, outputs, n),
        task_report(m.handle.task, m.reference, outputs, n, m.truths),
    )
    m.fidelity[(cut, codec, head)] = rep.score
    m.fidelity_reports[(cut, codec, head)] = rep.to_dict()


def gather(
    handle: ModelHandle,
    edge: MeasuredProfile,
    server: MeasuredProfile,
    samples: list[dict[str, np.ndarray]],
    codecs: list[str] | None = None,
    int8_heads: bool = False,
    truths: list | None = None,
) -> Measurements:
    edge.check_model(handle.sha256, "edge profile", handle.input_shapes)
    server.check_model(handle.sha256, "server profile", handle.input_shapes)
    if edge.role != "edge":
        raise ProfileError(f"the edge profile was measured in the {edge.role} role")
    if server.role != "server":
        raise ProfileError(f"the server profile was measured in the {server.role} role")
    every = [c.k for c in handle.cuts()]
    edge.check_cuts(every, "the edge profile")
    server.check_cuts(every, "the server profile")
    if int8_heads and edge.int8_whole is None:
        raise ProfileError(
            "int8 heads need the edge's int8 timing: profile the edge with `splitpoint profile --int8`"
        )
    codecs = codecs or DEFAULT_CODECS
    for c in codecs:
        Codec.parse(c)
    idx = handle.index
    sizes = encoded_sizes(handle, samples, codecs)
    reply = {0: output_bytes(idx, sizes, idx.outputs) + REPLY_OVERHEAD_BYTES}
    for cut in handle.cuts():
        tail_outputs = [o for o in idx.outputs if o not in cut.head_outputs]
        reply[cut.k] = output_bytes(idx, sizes, tail_outputs) + REPLY_OVERHEAD_BYTES
    return Measurements(
        handle,
        edge,
        server,
        codecs,
        sizes,
        reply,
        samples,
        int8_heads=int8_heads,
        truths=truths,
    )


def check_feasible(inputs: list[CandidateInput], links: list[Link], constraints: Constraints) -> None:
    """Refuse, before any fidelity is measured, constraints that no candidate can meet on some link
    whatever its fidelity (latency, memory, bytes, throughput)."""
    rest = constraints.without_fidelity()
    for link in links:
        cands = [evaluate(ci, link) for ci in inputs]
        if not any(not rest.violations(c) for c in cands):
            raise infeasible(cands, rest)


@dataclass
class Decision:
    link: Link
    candidates: list[Candidate]
    front: list[Candidate]  # over ``objectives``, of the candidates whose fidelity was measured
    pick: Candidate
    objectives: tuple[int, ...] = (0, 1, 2, 3, 4)  # indices into pareto.OBJECTIVE_NAMES
    unmeasured: int = 0  # (cut, head) pairs on an optimistic front left unmeasured (a budget ran out)


def unmeasured_pick(
    inputs: list[CandidateInput],
    links: list[Link],
    constraints: Constraints,
    floor: float | None,
    count: int = 1,
) -> set[tuple]:
    """(cut, head precision, codec) of each link's best candidate by the objective, among those that meet
    every constraint but fidelity and are not measured below ``floor``, where it is unmeasured; with
    ``count``, up to that many of the best, those ahead of the best measured one."""
    rest, key = constraints.without_fidelity(), optimistic_key(constraints)
    need: set[tuple] = set()
    for link in links:
        cands = [evaluate(ci, link) for ci in inputs if not _below(ci, floor)]
        ok = sorted((c for c in cands if not rest.violations(c)), key=key)
        for c in ok[:count]:
            if c.inp.fidelity is not None:
                break  # measured, at or above the floor: the pick here, whatever follows it
            need.add((c.inp.cut, c.inp.head_weights, c.inp.codec))
    return need


def decide(
    m: Measurements,
    networks: list[NetworkProfile],
    constraints: Constraints,
    note: Callable[[str, int, int], None] | None = None,
    front_budget: int | None = None,
) -> list[Decision]:
    """Per network, the front and the pick. Fidelity is measured lazily, first for the pick: each link's
    best candidate by the objective among those not measured below the floor, until it is measured;
    then for candidates on some link's optimistic front (unmeasured ones counted as lossless) over the
    objectives the constraints weigh, until no unmeasured one is left on it. So the pick, and the front
    (of the candidates that meet the floor, if one is given), are exact over those objectives. With
    ``front_budget`` the second part measures at most that many more (cut, head precision) pairs: the
    front is then of what was measured, and ``Decision.unmeasured`` says how many of its optimistic
    members' (cut, head precision) pairs were left. Each round measures just the codecs it needs at each
    cut. ``note(what, done, total)`` hears of each round of measurement (a progress bar)."""
    links = [link_of(n) for n in networks]
    check_feasible(candidate_inputs(m), links, constraints)
    measure_fidelity(m, set())  # the baselines
    objectives, floor = constraints.objectives(), constraints.min_fidelity
    if constraints.objective == "fidelity":
        floor = None  # fidelity is what is sought: the front weighs it, below the floor too
    # each round measures twice as many of the best as the last (up to 64 a link): where the best fall
    # below the floor one after another (a detector whose every lossy codec changes its count), rounds of
    # one each took minutes; the pick stays exact, the first measured at or above the floor in order
    count = 1
    while need := unmeasured_pick(candidate_inputs(m), links, constraints, floor, count):
        _measure_some(m, need, note)
        count = min(2 * count, 64)
    left, unmeasured = front_budget, 0
    while need := unmeasured_on_front(candidate_inputs(m), links, objectives, floor):
        if left is not None:  # the budget counts (cut, head precision) pairs: a tail session each
            cuts = sorted({(k, w) for k, w, _c in need}, key=_cut_order)
            if left <= 0:
                unmeasured = len(cuts)
                break
            kept = set(cuts[:left])
            need = {t for t in need if (t[0], t[1]) in kept}
            left -= min(left, len(cuts))
        _measure_some(m, need, note)
    inputs = candidate_inputs(m)
    decisions = []
    for link in links:
        cands = [evaluate(ci, link) for ci in inputs]
        measured = [c for c in cands if c.inp.fidelity is not None]
        shown = front([c for c in measured if not _below(c.inp, floor)], objectives)
        decisions.append(Decision(link, cands, shown, pick(measured, constraints), objectives, unmeasured))
    return decisions


def _measure_some(m: Measurements, need: set[tuple], note: Callable[[str, int, int], None] | None) -> None:
    """``measure_fidelity`` for ``need``, (cut, head precision, codec) triples, and an error where none of
    them is measured after it: the rounds that call it end when nothing is left to measure, and one that
    measured nothing would repeat for ever (as it did for a candidate recorded under another name)."""
    measure_fidelity(m, need, note)
    if not any((k, codec, head) in m.fidelity for k, head, codec in need):
        raise SplitPointError(
            "internal error: planning could not measure the fidelity of "
            + ", ".join(sorted(f"cut {k} {codec} ({head} head)" for k, head, codec in need))
        )


def best_of_kind(
    m: Measurements, decision: Decision, kind: str, min_fidelity: float = 0.0
) -> Candidate | None:
    """The candidate of ``kind`` (split, edge-only, server-only) with the lowest predicted latency on the
    decision's link among those whose measured fidelity reaches ``min_fidelity``, measuring fidelity
    where the lazy search left it unmeasured. For comparing the pick with the best of another kind."""
    ordered = sorted(
        (c for c in decision.candidates if c.inp.kind == kind and c.inp.head_weights == "float32"),
        key=lambda c: c.latency_ms,
    )
    for c in ordered:
        key = (c.inp.cut, c.inp.codec, c.inp.head_weights)
        if key not in m.fidelity:
            measure_fidelity(m, {(c.inp.cut, c.inp.head_weights, c.inp.codec)})
        fid = m.fidelity.get(key)
        if fid is not None and fid >= min_fidelity:
            return evaluate(replace(c.inp, fidelity=fid), decision.link)
    return None


def measure_winners(
    m: Measurements,
    links: list[Link],
    min_fidelity: float,
    note: Callable[[str, int, int], None] | None = None,
    rate_ips: float | None = None,
    allowed: Callable[[CandidateInput], bool] = lambda _c: True,
) -> list[CandidateInput]:
    """Measure fidelity until the candidate to run on every link (``planset.fastest`` at ``rate_ips``)
    among the ``allowed`` (the memory and bytes limits) is measured and meets ``min_fidelity`` (an
    unmeasured one counts as meeting it until measured): what a plan set needs."""
    measure_fidelity(m, set())
    while True:
        inputs = candidate_inputs(m)
        ok = [c for c in inputs if allowed(c) and (c.fidelity is None or c.fidelity >= min_fidelity)]
        if not ok:  # nothing within the limits: the set's search says so, in one line
            return inputs
        need = set()
        for link in links:
            w = fastest(ok, link, rate_ips)
            if w.fidelity is None:
                need.add((w.cut, w.head_weights, w.codec))
        if not need:
            return inputs
        measure_fidelity(m, need, note)
