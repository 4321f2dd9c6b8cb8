"""Planning a chain of devices: measurements in, the front, the pick and the baselines out.

The measured parts (each device's profile of the model, encoded sizes of real cut tensors, codec speeds
measured on each device) become a ``ChainCosts``; ``chain.py`` finds the latency x throughput front
over it exactly; fidelity of each plan that matters is then measured by running the chain in this
process with every hop's codec, never assumed. Baselines come from the same search on sub-chains:
the whole model on one device (the edge, or a later device reached through the ones before it, which
only forward), and the best plan that uses two devices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from splitpoint.core.codecs import Codec, decode, encode
from splitpoint.core.errors import ProfileError, SplitPointError
from splitpoint.core.graph import ModelHandle
from splitpoint.core.graph.cuts import Cut
from splitpoint.core.graph.extract import extract_segments
from splitpoint.core.graph.memory import segment_activation_peaks, weight_bytes_by_prefix
from splitpoint.core.runner import Joined, StageRunner, join, make_session, run_batched, run_chain
from splitpoint.profiles.schema import MeasuredProfile, NetworkProfile

from .chain import ANY, BUSY, EMPTY, INF, ChainCosts, ChainPlan, chain_front, memory_shortfall, solve
from .fidelity import FidelityReport, compare_outputs, task_report, warn_if_constant
from .planner import RAW, REPLY_OVERHEAD_BYTES, codec_work, encoded_sizes, link_of, output_bytes

CHAIN_CODECS = ["float32", "float16", "int8", "int8+zstd"]


@dataclass
class ChainMeasurements:
    handle: ModelHandle
    devices: list[str]
    networks: list[NetworkProfile]
    costs: ChainCosts
    cuts: dict[int, Cut]  # position -> cut (positions 0 and n have none)
    samples: list[dict[str, np.ndarray]]
    truths: list | None = None
    reference: list[Joined] = field(default_factory=list)
    fidelity: dict[tuple, FidelityReport] = field(default_factory=dict)  # (positions, codecs) -> report
    pair_fidelity: dict[tuple[int, int], float] = field(default_factory=dict)  # (position, codec): one hop


def _segment_prefix(p: MeasuredProfile, n: int) -> np.ndarray:
    """Time to run the first k nodes on this device, for k = 0..n: the mean of the head's time and the
    whole model's minus the tail's (each measured at anchors, interpolated between: derived)."""
    whole = p.whole.median_ms
    out = np.zeros(n + 1)
    out[n] = whole
    for c in p.cuts:
        out[c.index] = max(0.0, (c.head_ms + whole - c.tail_ms) / 2)
    return np.maximum.accumulate(out)  # a prefix never takes less than a shorter one


def _speed(p: MeasuredProfile, codec: str, what: str, device: str) -> float:
    if codec not in p.codecs:
        raise ProfileError(f"the {device} profile has no {codec} throughput; re-run `splitpoint profile`")
    return float(getattr(p.codecs[codec], what))


def _codec_ms(
    profiles: dict, devices: list[str], codecs: list[str], work: np.ndarray, what: str
) -> np.ndarray:
    """(devices, positions, codecs): each device's time to encode (or decode) what crosses each
    position, at the codec speeds measured on it (``work``: positions x codecs, ``codec_work``'s bytes)."""
    speeds = [np.array([_speed(profiles[d], c, what, d) for c in codecs]) for d in devices]
    return np.stack([work / sp[None, :] / 1e3 for sp in speeds])


def numbered(chain: list[str] | tuple[str, ...]) -> list[str]:
    """Device names in plans and tables: a name that repeats is numbered (rpi4, rpi4-2), so that a
    chain of two devices of one kind reads "rpi4 -> cut 23 -> rpi4-2", not "pi -> ... -> pi"."""
    seen: dict[str, int] = {}
    out = []
    for d in chain:
        seen[d] = seen.get(d, 0) + 1
        out.append(d if seen[d] == 1 else f"{d}-{seen[d]}")
    return out


def gather_chain(
    handle: ModelHandle,
    devices: list[str],
    profiles: dict[str, MeasuredProfile],
    networks: list[NetworkProfile],
    samples: list[dict[str, np.ndarray]],
    codecs: list[str] | None = None,
    truths: list | None = None,
    memory_limits: list[float | None] | None = None,
    max_hop_bytes: float | None = None,
) -> ChainMeasurements:
    """Everything the chain's cost model needs, from each device's profile and real encoded sizes."""
    if len(devices) < 2:
        raise SplitPointError("a chain has at least two devices (edge, server)")
    if len(networks) != len(devices) - 1:
        raise SplitPointError(
            f"{len(devices)} devices need {len(devices) - 1} network profile(s), one per hop; "
            f"got {len(networks)}"
        )
    missing = sorted({d for d in devices if d not in profiles})
    if missing:
        raise ProfileError(
            f"no measured profile for device(s) {', '.join(missing)}: give --profile NAME=FILE"
        )
    for d in set(devices):
        profiles[d].check_model(handle.sha256, f"{d} profile", handle.input_shapes)
    codecs = list(codecs or CHAIN_CODECS)
    for c in codecs:
        Codec.parse(c)
    idx = handle.index
    n = len(idx.compute)
    cuts = {c.k: c for c in handle.cuts()}
    for d in set(devices):
        profiles[d].check_cuts(cuts, f"the {d} profile")
    positions = np.array([0, *sorted(cuts), n])
    sizes = encoded_sizes(handle, samples, codecs)
    raw = [sum(sizes[t][RAW] for t in idx.inputs)]  # measured: a declared size may be unknown
    raw += [sum(sizes[t.name][RAW] for t in cuts[k].crossing) for k in sorted(cuts)]
    held = np.array([*raw, 0], float)
    nbytes = np.zeros((len(positions), len(codecs)))
    work = np.zeros((len(positions), len(codecs)))
    for i, k in enumerate(positions):
        names = idx.read_inputs() if k == 0 else [] if k == n else [t.name for t in cuts[int(k)].crossing]
        for j, c in enumerate(codecs):
            nbytes[i, j] = sum(sizes[t][c] for t in names)
            work[i, j] = codec_work(sizes, idx, names, c)
    prefix = np.stack([_segment_prefix(profiles[d], n)[positions] for d in devices])
    # the runtime's own time per MiB of cut tensor, sent and received (measured with the runtime)
    mib = nbytes / 2**20
    send = np.array([profiles[d].runtime_ms_per_mib.get("edge", 0.0) for d in devices])[:, None, None] * mib
    recv = np.array([profiles[d].runtime_ms_per_mib.get("server", 0.0) for d in devices])[:, None, None] * mib
    enc = _codec_ms(profiles, devices, codecs, work, "encode_mb_s") + send
    dec = _codec_ms(profiles, devices, codecs, work, "decode_mb_s") + recv
    w = weight_bytes_by_prefix(idx)
    weights = np.array([0, *[w[k - 1] for k in positions[1:]]], float)
    reply = output_bytes(idx, sizes, idx.outputs) + REPLY_OVERHEAD_BYTES
    costs = ChainCosts(
        tuple(devices),
        tuple(link_of(net) for net in networks),
        tuple(codecs),
        positions,
        prefix,
        enc,
        dec,
        nbytes,
        weights,
        held,
        float(reply),
        tuple(memory_limits or ()),
        tuple(profiles[d].runtime_ms.get("edge" if j == 0 else "server", 0.0) for j, d in enumerate(devices)),
        max_hop_bytes,
        segment_activation_peaks(idx, [int(p) for p in positions]),
        # measured by each device's profile (0 in a profile from before it was measured)
        tuple(float(profiles[d].cost.get("memory_overhead_bytes", 0)) for d in devices),
    )
    return ChainMeasurements(handle, list(devices), list(networks), costs, cuts, samples, truths)


def chain_fidelity(m: ChainMeasurements, plan: ChainPlan) -> FidelityReport:
    """Run the chain in this process on the samples, each hop's tensors through its codec, against the
    unsplit model (cached per choice of positions and codecs)."""
    key = (tuple(int(m.costs.positions[i]) for i in plan.cuts), tuple(m.costs.codecs[k] for k in plan.codecs))
    if key in m.fidelity:
        return m.fidelity[key]
    h = m.handle
    if not m.reference:
        m.reference = run_batched(h.whole_session(), m.samples)
        warn_if_constant(m.reference, len(m.samples), h.given_sample is not None)
    cuts: list[Cut | None] = [None if p == 0 else m.cuts[p] for p in key[0]]
    segments = extract_segments(h.index, cuts, check=False, shared_weights=True)
    stages = [
        StageRunner.of_segment(
            s.receives if i else h.index.inputs,
            s.sends,
            s.produces,
            make_session(s.model, weights=h.index.weight_array) if s.model is not None else None,
        )
        for i, s in enumerate(segments)
    ]

    def hop(i: int, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {t: decode(encode(v, key[1][i])) for t, v in tensors.items()}

    per_sample = [run_chain(stages, s, hop, h.index.outputs) for s in m.samples]
    got = join(per_sample)
    n = len(m.samples)
    rep = FidelityReport(
        None,
        "+".join(key[1]),
        "float32",
        n,
        compare_outputs(h, m.reference, got, n),
        task_report(h.task, m.reference, got, n, m.truths),
    )
    m.fidelity[key] = rep
    return rep


@dataclass
class ChainConstraints:
    max_latency_ms: float | None = None
    min_throughput_ips: float | None = None
    min_fidelity: float | None = None
    objective: str = "latency"  # latency | throughput

    def shortfall(self, p: ChainPlan) -> float:
        """How far a plan misses the limits, each relative to its own (0: meets them all): the plans a
        refusal names as the closest (by the objective, it named three 10 % past --max-latency where one
        missed it by 2 %)."""
        out = 0.0
        if self.max_latency_ms is not None:
            out += max(0.0, p.latency_ms / self.max_latency_ms - 1.0)
        if self.min_throughput_ips is not None:
            out += max(0.0, self.min_throughput_ips / max(p.throughput_ips, 1e-12) - 1.0)
        if self.min_fidelity is not None:
            out += max(0.0, self.min_fidelity - (p.fidelity if p.fidelity is not None else 0.0))
        return out

    def misses(self, p: ChainPlan) -> list[str]:
        out = []
        if self.max_latency_ms is not None and p.latency_ms > self.max_latency_ms:
            out.append(f"latency {p.latency_ms:.1f} ms > {self.max_latency_ms:g} ms")
        if self.min_throughput_ips is not None and p.throughput_ips < self.min_throughput_ips:
            out.append(f"throughput {p.throughput_ips:.1f}/s < {self.min_throughput_ips:g}/s")
        if (
            self.min_fidelity is not None
            and (p.fidelity if p.fidelity is not None else 0.0) < self.min_fidelity
        ):
            out.append(f"fidelity {p.fidelity or 0.0:.3f} < {self.min_fidelity:g}")
        return out


@dataclass
class ChainDecision:
    front: list[ChainPlan]  # over the whole chain (every stage may be empty), fastest first
    pick: ChainPlan
    baselines: dict[str, ChainPlan]  # "all on DEVICE (stage j)", "best two-stage", "best on all N devices"
    devices_of: dict[int, list[str]] = field(default_factory=dict)  # id(plan) -> the devices it uses
    # False: the fidelity search ran out of runs and gave up whole codecs; the pick is the best it found
    exhaustive: bool = True


def _sub(costs: ChainCosts, upto: int) -> ChainCosts:
    """The chain cut short after device ``upto`` (a plan whose last stage is that device)."""
    return replace(
        costs,
        devices=costs.devices[: upto + 1],
        links=costs.links[:upto],
        prefix_ms=costs.prefix_ms[: upto + 1],
        enc_ms=costs.enc_ms[: upto + 1],
        dec_ms=costs.dec_ms[: upto + 1],
        memory_limit=costs.memory_limit[: upto + 1],
        overhead_ms=costs.overhead_ms[: upto + 1],
        memory_overhead=costs.memory_overhead[: upto + 1],
    )


def baselines(
    m: ChainMeasurements,
    allowed: np.ndarray | None = None,
    constraints: ChainConstraints | None = None,
    max_fidelity_runs: int = 8,
) -> dict[str, tuple[ChainPlan, int]]:
    """The plans a user would pick instead, each with the index of its last device: the whole model on
    one device (the ones before it forwarding the raw inputs); the best plan on exactly two devices, the
    edge and one other; and, over three or more, the best plan that keeps every device busy. "Best" is
    by the constraints' objective among the plans that meet them (fidelity measured in that order)."""
    constraints = constraints or ChainConstraints()
    out: dict[str, tuple[ChainPlan, int]] = {}
    d = len(m.devices)
    for j in range(d):
        sub = _sub(m.costs, j)
        modes = tuple([EMPTY] * j + [BUSY]) if j else (BUSY,)
        a = None if allowed is None else allowed[:j]
        plan = solve(sub, modes=modes, allowed=a)
        if plan is not None:
            out[f"all on {m.devices[j]} (stage {j})"] = (plan, j)
    pairs = [
        (p, j)
        for j in range(1, d)
        for p in chain_front(
            _sub(m.costs, j),
            tuple([BUSY] + [EMPTY] * (j - 1) + [BUSY]),
            None if allowed is None else allowed[:j],
        )
    ]
    if best := _best(m, pairs, constraints, max_fidelity_runs):
        out["best two-stage"] = best
    if d >= 3:
        busy = [(p, d - 1) for p in chain_front(m.costs, (BUSY,) * d, allowed)]
        if best := _best(m, busy, constraints, max_fidelity_runs):
            out[f"best on all {d} devices"] = best
    return out


def _best(
    m: ChainMeasurements, plans: list[tuple[ChainPlan, int]], constraints: ChainConstraints, runs: int
) -> tuple[ChainPlan, int] | None:
    """The first of ``plans`` in the objective's order that meets the constraints; else the first."""
    ordered = sorted(plans, key=lambda pj: _objective_key(constraints)(pj[0]))
    for p, j in ordered[:runs]:
        _with_fidelity(m, p)
        if not constraints.misses(p):
            return p, j
    return ordered[0] if ordered else None


def _objective_key(constraints: ChainConstraints) -> Callable[[ChainPlan], tuple[float, float]]:
    """Best first; a tie on the objective goes to the other figure (two plans of equal throughput: the
    faster one, which is on the front; the pick was a slower one the front dominated)."""
    if constraints.objective == "throughput":
        return lambda p: (-p.throughput_ips, p.latency_ms)
    return lambda p: (p.latency_ms, -p.throughput_ips)


def decide_chain(
    m: ChainMeasurements,
    constraints: ChainConstraints,
    note: Callable[[str, int, int], None] | None = None,
    max_fidelity_runs: int = 24,
) -> ChainDecision:
    """The latency x throughput front over the chain and its baselines (one device; two devices), and the
    pick: the best plan by the objective that meets the constraints.

    Fidelity is no figure the search can add up, so it is measured: the best plan within the latency and
    throughput limits is run, and if it falls below the floor, each of its lossy hops is run alone (its
    position and codec, every other hop exact); a pair that misses the floor alone is ruled out of every
    hop, with every codec at that position at least as lossy, and the search runs again. On the
    assumptions that a hop's error only grows with more lossy hops and with a lossier codec, no plan that
    meets the floor is ruled out, so the first that meets it is the best. (Measuring down the front instead
    missed plans that the front's lossy members dominate: offering one more codec made the pick 54 %
    slower.) Where every hop of a failing plan meets the floor alone, its lossiest pair goes. Past
    ``max_fidelity_runs`` whole codecs go instead, the lossiest first, until a plan meets the floor: the
    pick is then the best found, not shown to be the best (``ChainDecision.exhaustive``). Plans below the
    floor stay on the front, marked by their figure."""
    codecs = list(m.costs.codecs)
    hops = len(m.devices) - 1
    allowed = np.ones((hops, len(m.costs.positions), len(codecs)), bool)
    key = _objective_key(constraints)
    floor = constraints.min_fidelity
    lossiness = [_lossiness(c) for c in codecs]

    def as_lossy_as(level: int) -> list[int]:
        """The codecs at least as lossy as ``level``."""
        return [q for q in range(len(codecs)) if lossiness[q] >= level]

    runs = 0
    first_front: list[ChainPlan] | None = None
    pick: ChainPlan | None = None
    exhaustive = True
    tried: list[ChainPlan] = []

    def best_within() -> ChainPlan | None:
        """The best plan the search allows within the limits other than fidelity, measured."""
        nonlocal first_front, runs
        front = _fronts(m, allowed)
        if first_front is None:
            first_front = front
            if not front:
                raise SplitPointError(nothing_fits(m, allowed))
        within = [p for p in sorted(front, key=key) if not _misses_but_fidelity(constraints, p)]
        if not within:
            tried.extend(sorted(front, key=lambda p: (constraints.shortfall(p), key(p)))[:3])
            return None
        if note:
            note("chain fidelity", min(runs, max_fidelity_runs), max_fidelity_runs)
        _with_fidelity(m, within[0])
        runs += 1
        tried.append(within[0])
        return within[0]

    while runs < max_fidelity_runs:
        best = best_within()
        if best is None or not constraints.misses(best):
            pick = best
            break
        assert floor is not None  # only the floor is left to miss
        lossy = [(i, k) for i, k in zip(best.cuts, best.codecs, strict=True) if lossiness[k] > 0]
        out = []
        for i, k in lossy:
            runs += (i, k) not in m.pair_fidelity
            if _pair_fidelity(m, i, k) < floor:
                out.append((i, k))
        if not out and lossy:  # each hop meets the floor alone, together they do not
            out = [max(lossy, key=lambda ik: lossiness[ik[1]])]
        if not out:
            break  # lossless and still below the floor: nothing to rule out
        for i, k in out:
            allowed[:, i, as_lossy_as(lossiness[k])] = False
    else:  # out of runs: whole codecs go, the lossiest first, until a plan meets the floor
        exhaustive = False
        for level in sorted({v for v in lossiness if v > 0}, reverse=True):
            allowed[:, :, as_lossy_as(level)] = False
            best = best_within()
            if best is not None and not constraints.misses(best):
                pick = best
                break
    if pick is None:
        closest = sorted(
            {id(p): p for p in tried}.values(), key=lambda p: (constraints.shortfall(p), key(p))
        )[:3]
        parts = [f"{describe(m, p)} ({', '.join(constraints.misses(p)) or 'unmeasured'})" for p in closest]
        raise SplitPointError(
            "no plan over this chain meets the constraints"
            + ("; the closest: " + "; ".join(parts) if parts else "")
        )
    # one object per deployment: a baseline or the pick that is also on the front is the same plan
    same: dict[tuple, ChainPlan] = {}
    for p in first_front or []:
        same.setdefault((p.cuts, p.codecs), p)
    pick = same.setdefault((pick.cuts, pick.codecs), pick)
    base = {}
    for name, (plan, _j) in baselines(m, allowed, constraints).items():
        base[name] = same.setdefault((plan.cuts, plan.codecs), plan)
    front = pareto(list(same.values()))
    for p in [pick, *base.values(), *front[:max_fidelity_runs]]:  # every figure shown is measured
        _with_fidelity(m, p)
    return ChainDecision(front, pick, base, exhaustive=exhaustive)


def _fronts(m: ChainMeasurements, allowed: np.ndarray) -> list[ChainPlan]:
    """The latency x throughput front of the plans that end at each device in turn: the whole model on
    the edge, the edge and the next, ..., the whole chain (a plan that leaves the last devices nothing
    to run does not send to them: the whole chain's search cannot express it)."""
    out: list[ChainPlan] = []
    for j in range(len(m.devices)):
        out += chain_front(_sub(m.costs, j), (ANY,) * (j + 1), allowed[:j])
    return out


def _feasible(costs: ChainCosts, allowed: np.ndarray) -> bool:
    """Whether any plan, ending at any device, fits the memory and per-hop byte limits."""
    return any(
        solve(_sub(costs, j), INF, (ANY,) * (j + 1), allowed[:j]) is not None
        for j in range(len(costs.devices))
    )


def nothing_fits(m: ChainMeasurements, allowed: np.ndarray) -> str:
    """Why no plan fits the limits the search obeys exactly: the memory limits (what each device could
    hold), or --max-hop-bytes with them though either alone is met. Blaming the memory limits for the
    second sent users to raise a limit that was never the obstacle; the least per-hop bytes within the
    memory limits (searched over the byte counts a hop can carry) says what would do."""
    names = numbered(m.costs.devices)
    cap = m.costs.max_hop_bytes
    if cap is None or not _feasible(replace(m.costs, max_hop_bytes=None), allowed):
        return memory_shortfall(m.costs, names)
    reply = m.costs.reply_bytes
    sizes = np.unique(m.costs.bytes) + reply  # what a hop carries: its cut tensor up, the reply down
    sizes = sizes[sizes > cap]  # the largest fits with no cap: the search ends within the array
    lo, hi = 0, len(sizes) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if _feasible(replace(m.costs, max_hop_bytes=float(sizes[mid])), allowed):
            hi = mid
        else:
            lo = mid + 1
    need = int(sizes[lo])
    return (
        f"no plan over this chain fits --max-hop-bytes {cap:,.0f} within the memory limits (each alone is "
        f"met): within them every plan carries at least {need:,} bytes over one of its hops (its cut "
        f"tensor and the {reply:,.0f}-byte reply); raise --max-hop-bytes to {need:,} or a --memory limit"
    )


def _misses_but_fidelity(constraints: ChainConstraints, p: ChainPlan) -> bool:
    """Whether ``p`` misses a limit other than the fidelity floor (those need no measurement)."""
    return bool(replace(constraints, min_fidelity=None).misses(p))


def _pair_fidelity(m: ChainMeasurements, i: int, k: int) -> float:
    """The fidelity of the tensors crossing position ``i`` sent with codec ``k``, every other hop exact:
    a two-stage split at that cut (measured once per pair)."""
    if (i, k) not in m.pair_fidelity:
        one = ChainPlan((i,), (k,), 0.0, 0.0, [], [], [], [], [])
        m.pair_fidelity[(i, k)] = chain_fidelity(m, one).score
    return m.pair_fidelity[(i, k)]


def pareto(plans: list[ChainPlan]) -> list[ChainPlan]:
    """The plans no other beats on both latency and throughput, fastest first."""
    from .pareto import non_dominated

    if not plans:
        return []
    keep = non_dominated(np.array([[p.latency_ms, p.bottleneck_ms] for p in plans]))
    return sorted((plans[i] for i in keep), key=lambda p: p.latency_ms)


def _lossiness(codec: str) -> int:
    base = Codec.parse(codec).base
    return {"float32": 0, "float16": 1, "int8-ch": 2, "int8": 3, "int4": 4}.get(base, 5)


def _with_fidelity(m: ChainMeasurements, p: ChainPlan) -> None:
    rep = chain_fidelity(m, p)
    p.fidelity = rep.score
    p.extra["fidelity_report"] = rep.to_dict()


def describe(m: ChainMeasurements, p: ChainPlan) -> str:
    """A plan as a user reads it: where each device's segment ends and each hop's codec."""
    if not p.cuts:
        return f"all on {m.devices[0]}"
    parts = []
    for h, (i, k) in enumerate(zip(p.cuts, p.codecs, strict=True)):
        parts.append(f"{m.devices[h]}→cut {int(m.costs.positions[i])} {m.costs.codecs[k]}")
    return ", ".join(parts) + f"→{m.devices[len(p.cuts)]}"


def plan_dict(m: ChainMeasurements, p: ChainPlan) -> dict:
    """A chain plan's predicted figures, labelled derived, with the devices it uses in order."""
    used = list(m.devices[: len(p.cuts) + 1])
    segments = [
        (int(m.costs.positions[a]), int(m.costs.positions[b]))
        for a, b in zip([0, *p.cuts], [*p.cuts, len(m.costs.positions) - 1], strict=True)
    ]
    return {
        "label": describe(m, p),
        "devices": used,
        "cuts": [int(m.costs.positions[i]) for i in p.cuts],
        "codecs": [m.costs.codecs[k] for k in p.codecs],
        "busy_devices": sum(1 for a, b in segments if b > a),
        "latency_ms": p.latency_ms,
        "throughput_ips": p.throughput_ips,
        "bottleneck_ms": p.bottleneck_ms,
        "stage_ms": p.stage_ms,  # with the runtime's own time per request on each device (runtime_ms)
        # counted where a device sends or receives: on one device alone nothing is sent, and none counts
        "runtime_ms": list(m.costs.overhead_ms[: len(used)])
        if any(m.costs.overhead_ms) and len(used) > 1
        else None,
        "hop_up_ms": p.hop_up_ms,
        "hop_down_ms": p.hop_down_ms,
        "hop_bytes": p.hop_bytes,  # the cut tensor sent up each hop
        "reply_bytes": int(m.costs.reply_bytes) if len(used) > 1 else 0,  # back over every hop (none alone)
        "memory_bytes": p.memory_bytes,
        "fidelity": p.fidelity,
        "networks": [net.name for net in m.networks[: len(p.cuts)]],
        "derived": True,  # the prediction as a whole; ``labels`` says it of each figure
        "labels": {
            **dict.fromkeys(
                ("latency_ms", "throughput_ips", "bottleneck_ms", "stage_ms", "hop_up_ms", "hop_down_ms"),
                "derived",
            ),
            "runtime_ms": "not counted: one device sends nothing"
            if len(used) == 1
            else "measured (profile --runtime)"
            if any(m.costs.overhead_ms)
            else "not measured: none counted",
            "hop_bytes": "measured: the encoded cut tensor on the samples",
            "reply_bytes": "not counted: one device sends nothing"
            if len(used) == 1
            else "derived: the outputs at their declared sizes (measured on the samples where none is "
            "declared), and a 128-byte header",
            "memory_bytes": "derived from the profiles' measured memory",
            "fidelity": "measured" if p.fidelity is not None else "not measured",
        },
    }


def write_chain(
    m: ChainMeasurements,
    p: ChainPlan,
    out_dir,
    predicted: dict | None = None,
    front: list | None = None,
    include_full: bool = True,
    force: bool = False,
):
    """The plan directory for a chain plan (its stages' devices named in order)."""
    from splitpoint.core.plandir import write_plan

    positions = [int(m.costs.positions[i]) for i in p.cuts]
    cuts: list[Cut | None] = [None if k == 0 else m.cuts[k] for k in positions]
    return write_plan(
        m.handle,
        out_dir,
        cuts=cuts,
        codecs=[m.costs.codecs[k] for k in p.codecs],
        devices=list(m.devices[: len(p.cuts) + 1]),
        include_full=include_full,
        predicted=predicted or plan_dict(m, p),
        front=front or [],
        force=force,
    )
