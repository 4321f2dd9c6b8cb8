"""The chain partitioner: the dynamic programme against brute force, its constraints, and planning a
real model over three devices from measured profiles down to a plan that runs."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from splitpoint.core.errors import SplitPointError
from splitpoint.core.graph import open_model
from splitpoint.core.graph.extract import extract_segments
from splitpoint.core.graph.index import GraphIndex
from splitpoint.core.graph.memory import live_activation_peaks
from splitpoint.core.runner import load_stages, make_session, run_chain
from splitpoint.partitioner.chain import ANY, BUSY, EMPTY, ChainCosts, chain_front, evaluate_chain, solve
from splitpoint.partitioner.chainplan import (
    ChainConstraints,
    decide_chain,
    describe,
    gather_chain,
    plan_dict,
    write_chain,
)
from splitpoint.partitioner.costmodel import Link
from splitpoint.profiles.profiler import ProfileSettings, profile_model
from splitpoint.profiles.schema import load_network

from .conftest import run_cli


def random_costs(m: int, c: int, d: int, seed: int, memory=(), overhead: bool = False) -> ChainCosts:
    r = np.random.default_rng(seed)
    prefix = np.stack(
        [np.concatenate([[0], np.cumsum(r.uniform(0.1, 3, m - 1) * s)]) for s in r.uniform(0.2, 5, d)]
    )
    links = tuple(Link(f"l{h}", r.uniform(5, 100), r.uniform(5, 100), r.uniform(1, 30)) for h in range(d - 1))
    return ChainCosts(
        tuple(f"d{j}" for j in range(d)),
        links,
        tuple(f"c{k}" for k in range(c)),
        np.arange(m),
        prefix,
        r.uniform(0, 1, (d, m, c)),
        r.uniform(0, 1, (d, m, c)),
        r.uniform(1e3, 5e5, (m, c)).astype(int),
        np.cumsum(r.uniform(0, 1e5, m)),
        r.uniform(0, 1e5, m),
        4000.0,
        memory,
        tuple(r.uniform(0, 5, d)) if overhead else (),
    )


def every_plan(costs: ChainCosts):
    m, c, d = len(costs.positions), len(costs.codecs), len(costs.devices)
    for cuts in itertools.combinations_with_replacement(range(m), d - 1):
        if cuts[-1] >= m - 1:
            continue  # the last device runs something
        for codecs in itertools.product(range(c), repeat=d - 1):
            yield evaluate_chain(costs, cuts, codecs)


@pytest.fixture(params=[64, 2], ids=["one-block", "blocks-of-2"])
def blocks(request, monkeypatch):
    """The DP's middle step reads its band in blocks of positions: one block, and many small ones."""
    from splitpoint.partitioner import chain

    monkeypatch.setattr(chain, "ROWS_PER_BLOCK", request.param)


@pytest.mark.parametrize("seed", range(12))
def test_the_front_is_exactly_the_brute_force_front(seed, blocks):
    d = 2 + seed % 3  # two to four devices
    costs = random_costs(7, 2, d, seed, overhead=seed % 2 == 1)  # with a runtime cost per device or not
    pts = {(round(p.latency_ms, 9), round(p.bottleneck_ms, 9)) for p in every_plan(costs)}
    brute = sorted(p for p in pts if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in pts))
    front = chain_front(costs)
    assert sorted((round(p.latency_ms, 9), round(p.bottleneck_ms, 9)) for p in front) == brute
    # the first point is the fastest plan, the last the highest throughput
    assert front[0].latency_ms == pytest.approx(min(p[0] for p in pts))
    assert front[-1].bottleneck_ms == pytest.approx(min(p[1] for p in pts))


def test_limits_modes_memory_and_codecs_are_respected(blocks):
    costs = random_costs(9, 3, 3, 7, memory=(None, 2.5e5, None))
    allowed = np.array([[True, False, True], [False, True, False]])
    every = [
        p
        for p in every_plan(costs)
        if all(allowed[h, k] for h, k in enumerate(p.codecs)) and p.memory_bytes[1] <= 2.5e5
    ]
    for limit in (np.inf, np.median([p.bottleneck_ms for p in every])):
        got = solve(costs, limit, allowed=allowed)
        ok = [p for p in every if p.bottleneck_ms < limit]
        assert got is not None and got.bottleneck_ms < limit
        assert got.latency_ms == pytest.approx(min(p.latency_ms for p in ok))
        assert got.memory_bytes[1] <= 2.5e5 and all(allowed[h, k] for h, k in enumerate(got.codecs))
    # the middle device forwarding only, then required to work
    empty = solve(costs, modes=(ANY, EMPTY, ANY), allowed=allowed)
    busy = solve(costs, modes=(BUSY, BUSY, BUSY), allowed=allowed)
    assert empty is not None and empty.cuts[0] == empty.cuts[1]
    if busy is not None:
        assert 0 < busy.cuts[0] < busy.cuts[1]
    assert solve(costs, limit=1e-6) is None  # nothing is that fast


def test_a_bytes_limit_per_hop_is_obeyed_exactly(blocks):
    from dataclasses import replace

    costs = random_costs(8, 3, 3, 11)
    cap = float(np.median(costs.bytes))
    capped = replace(costs, max_hop_bytes=cap)
    both = costs.reply_bytes  # the reply crosses every hop too: the limit is on both ways
    ok = [p for p in every_plan(costs) if max(p.hop_bytes) + both <= cap]
    for limit in (np.inf, np.median([p.bottleneck_ms for p in ok])):
        got = solve(capped, limit)
        fits = [p for p in ok if p.bottleneck_ms < limit]
        assert got is not None and max(got.hop_bytes) + both <= cap
        assert got.latency_ms == pytest.approx(min(p.latency_ms for p in fits))
    assert all(max(p.hop_bytes) + both <= cap for p in chain_front(capped))
    assert solve(replace(costs, max_hop_bytes=0)) is None  # every hop carries something


def test_a_chain_needs_a_link_per_hop():
    c = random_costs(5, 2, 3, 0)
    with pytest.raises(ValueError, match="3 devices need 2 links"):
        ChainCosts(c.devices, c.links[:1], *[getattr(c, f) for f in list(c.__dataclass_fields__)[2:]])


@pytest.fixture(scope="module")
def measured(small_resnet18):
    """A small ResNet-18 profiled as a slow device (a third of a CPU) and as a server."""
    from splitpoint.profiles.cpulimit import cpu_limit

    h = open_model(small_resnet18)
    h.cuts()  # bookkeeping at full speed, as `profile` does
    with cpu_limit(0.34) as em:
        slow = profile_model(h, ProfileSettings(role="edge", threads=1, budget=6), em)
    fast = profile_model(h, ProfileSettings(role="server", threads=1, budget=6))
    return h, slow, fast


def test_a_real_model_is_planned_over_three_devices_and_the_plan_runs(measured, tmp_path):
    h, slow, fast = measured
    samples, truths, _ = h.fidelity_samples(4)
    m = gather_chain(
        h,
        ["pi", "pi", "server"],
        {"pi": slow, "server": fast},
        [load_network("wifi-n"), load_network("ethernet")],
        samples,
    )
    d = decide_chain(m, ChainConstraints(min_fidelity=0.99, objective="throughput"))
    # the pick meets the floor and is the highest-throughput plan that does
    assert d.pick.fidelity >= 0.99
    measured_ok = [p for p in d.front if p.fidelity is not None and p.fidelity >= 0.99]
    assert d.pick.throughput_ips >= max(p.throughput_ips for p in measured_ok) - 1e-9
    assert {"all on pi (stage 0)", "all on server (stage 2)", "best two-stage"} <= set(d.baselines)
    assert not d.baselines["all on pi (stage 0)"].cuts  # the edge alone: no hop
    for name, p in d.baselines.items():
        assert p.fidelity is not None, name
    # nothing on the front is beaten on both latency and throughput by anything the search saw
    for p in d.front:
        for q in [*d.front, *d.baselines.values()]:
            assert not (q.latency_ms < p.latency_ms and q.bottleneck_ms < p.bottleneck_ms)
    info = plan_dict(m, d.pick)
    assert info["derived"] and info["devices"][0] == "pi" and len(info["stage_ms"]) == len(info["devices"])
    # the plan written runs as the unsplit model (its codecs are lossy: close)
    plan = write_chain(m, d.pick, tmp_path / "p")
    assert [s.device for s in plan.stages] == info["devices"]
    _, stages = load_stages(tmp_path / "p")
    ref = make_session(h.path).run(None, samples[0])[0]
    got = run_chain(stages, samples[0])[0]
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max() + 1e-3
    assert describe(m, d.pick)


def _slower(p, f: float):
    """A profile of a device ``f`` times slower: every time times f, every codec speed over f."""
    d = p.model_dump()
    for k in ("median_ms", "p90_ms", "min_ms", "max_ms"):
        d["whole"][k] *= f
    for c in d["cuts"]:
        for k in ("head_ms", "tail_ms", "head_p90_ms", "tail_p90_ms"):
            if c.get(k) is not None:
                c[k] *= f
    for c in d["codecs"].values():
        c["encode_mb_s"] /= f
        c["decode_mb_s"] /= f
    return type(p).model_validate({**d, "role": "edge"})


def _pi_and_relay(fast):
    """A Pi-class edge and a relay ten times faster, made from the server's profile: 80 and 8 ms for the
    whole model, whatever the host. As 100x and 10x the server's time they followed the host's speed:
    on a host where the server ran the model in 0.3 ms the edge ran it alone in 30 ms, faster than any
    plan that sends the input over LTE, and the searches these tests are about had nothing to search."""
    f = 80.0 / fast.whole.median_ms
    return _slower(fast, f), _slower(fast, f / 10)


class _Oracle:
    """Fidelity by rule, for the search's own exactness (the real chain's fidelity is tested above): a
    hop with int4 anywhere, or int8 past the middle of the model, misses the floor; a plan meets it when
    every hop does."""

    def __init__(self, m):
        self.half = len(m.costs.positions) // 2
        self.names = m.costs.codecs

    def ok(self, i: int, k: int) -> bool:
        c = self.names[k]
        return not (c.startswith("int4") or (c.startswith("int8") and i >= self.half))

    def __call__(self, m, plan):
        score = 1.0 if all(self.ok(i, k) for i, k in zip(plan.cuts, plan.codecs, strict=True)) else 0.5
        return type("Rep", (), {"score": score, "to_dict": lambda self: {"score": score}})()


def _every_plan(costs):
    """Every plan over the chain and over each chain it starts (the plans that end early)."""
    from itertools import combinations_with_replacement, product

    from splitpoint.partitioner.chain import evaluate_chain
    from splitpoint.partitioner.chainplan import _sub

    out = [evaluate_chain(_sub(costs, 0), (), ())]
    positions, codecs = range(len(costs.positions)), range(len(costs.codecs))
    for j in range(1, len(costs.devices)):
        for cuts in combinations_with_replacement(positions, j):
            for ks in product(codecs, repeat=j):
                out.append(evaluate_chain(_sub(costs, j), cuts, ks))
    return out


@pytest.mark.parametrize("objective", ["latency", "throughput"])
def test_the_pick_at_a_fidelity_floor_is_the_best_of_every_plan_that_meets_it(
    measured, objective, monkeypatch
):
    """The pick was sought down the latency x throughput front only: a plan that meets the floor but is
    beaten on both figures by plans below it was never looked at, and offering int4 besides int8 made the
    pick 54 % slower (the front filled with int4 plans that all missed the floor)."""
    from splitpoint.partitioner import chainplan

    h, _, fast = measured
    samples, truths, _ = h.fidelity_samples(2)
    # plans that send the input at 4 bits are fast
    pi, relay = _pi_and_relay(fast)
    key = (
        (lambda p: (p.latency_ms, -p.throughput_ips))
        if objective == "latency"
        else (lambda p: (-p.throughput_ips, p.latency_ms))
    )
    picks = {}
    for codecs in (["float16", "int8"], ["float16", "int8", "int4", "int4+zstd"]):
        m = gather_chain(
            h,
            ["pi", "relay", "server"],
            {"pi": pi, "relay": relay, "server": fast},
            [load_network("wifi-n"), load_network("lte")],
            samples,
            codecs,
            truths,
        )
        oracle = _Oracle(m)
        monkeypatch.setattr(chainplan, "chain_fidelity", oracle)
        # runs enough for the search to finish: its exactness, not its budget (tested below), is the point;
        # the plans the profiles make fast differ from run to run, and so does the number of runs
        d = decide_chain(m, ChainConstraints(min_fidelity=0.99, objective=objective), max_fidelity_runs=1000)
        assert d.exhaustive
        fit = [p for p in _every_plan(m.costs) if oracle(m, p).score >= 0.99]
        best = min(fit, key=key)
        assert d.pick.fidelity == 1.0 and key(d.pick)[0] == pytest.approx(key(best)[0]), (
            describe(m, d.pick),
            describe(m, best),
        )
        picks[len(codecs)] = key(d.pick)[0]
    assert picks[4] <= picks[2] + 1e-9, picks


def test_a_search_that_runs_out_of_fidelity_runs_falls_back_to_fewer_codecs_and_says_so(
    measured, monkeypatch
):
    """Random-weight MobileNetV2 misses a 0.99 floor at almost every lossy (cut, codec): ruling them out a
    few at a time ran out of its 24 runs and refused the chain, though plans with exact hops meet it."""
    from splitpoint.partitioner import chainplan

    h, _, fast = measured
    samples, truths, _ = h.fidelity_samples(2)
    pi, relay = _pi_and_relay(fast)
    m = gather_chain(
        h,
        ["pi", "relay", "server"],
        {"pi": pi, "relay": relay, "server": fast},
        [load_network("wifi-n"), load_network("lte")],
        samples,
        ["float32", "float16", "int8", "int4"],
        truths,
    )
    exact = {k for k, c in enumerate(m.costs.codecs) if c == "float32"}

    def only_exact(m, plan):
        score = 1.0 if set(plan.codecs) <= exact else 0.5
        return type("Rep", (), {"score": score, "to_dict": lambda self: {"score": score}})()

    monkeypatch.setattr(chainplan, "chain_fidelity", only_exact)
    d = decide_chain(m, ChainConstraints(min_fidelity=0.99), max_fidelity_runs=3)
    assert d.pick.fidelity == 1.0 and set(d.pick.codecs) <= exact and d.exhaustive is False
    assert decide_chain(m, ChainConstraints(min_fidelity=0.99), max_fidelity_runs=1000).exhaustive


def test_an_impossible_constraint_is_refused_with_the_closest_plans(measured):
    h, slow, fast = measured
    samples, _, _ = h.fidelity_samples(2)
    m = gather_chain(h, ["pi", "server"], {"pi": slow, "server": fast}, [load_network("lte")], samples)
    with pytest.raises(SplitPointError, match="no plan over this chain meets the constraints; the closest"):
        decide_chain(m, ChainConstraints(max_latency_ms=0.001))


def test_no_plan_within_the_memory_limits_says_what_each_device_could_hold(measured):
    """Limits that together hold less than the model's weights: the refusal gives the weights and, per
    limited device, the most weight any segment it could take holds (checked against every segment), so
    that which --memory to raise is read off the message."""
    h, slow, fast = measured
    samples, _, _ = h.fidelity_samples(2)
    nets = [load_network("lte"), load_network("lte")]
    free = gather_chain(h, ["pi", "pi", "server"], {"pi": slow, "server": fast}, nets, samples)
    w = free.costs.weights
    limits = [(w[-1] - w[0]) / 4] * 3  # three quarters of the weights at most: nothing fits
    m = gather_chain(
        h, ["pi", "pi", "server"], {"pi": slow, "server": fast}, nets, samples, memory_limits=limits
    )
    with pytest.raises(SplitPointError) as caught:
        decide_chain(m, ChainConstraints())
    msg = str(caught.value)
    assert f"the model's weights are {(w[-1] - w[0]) / 2**20:.1f} MiB" in msg, msg
    a, peak, pos = m.costs.act, m.costs.act_peak, range(len(w))
    overhead = m.costs.memory_overhead
    assert len(overhead) == 3 and all(o > 0 for o in overhead)  # measured by the profiles
    for j, name, ends in ((0, "pi", "first"), (1, "pi-2", "any"), (2, "server", "last")):
        fits = [
            w[k] - w[i]
            for i in pos
            for k in pos
            if i <= k
            and w[k] - w[i] + max(a[i], a[k], peak[i, k]) + (overhead[j] if i < k else 0) <= limits[j]
            and (ends != "first" or i == 0)
            and (ends != "last" or k == len(w) - 1)
        ]
        said = f"holds at most {max(fits) / 2**20:.1f} MiB" if fits else "holds no segment"
        assert f"{name} (limit {limits[j] / 2**20:.1f} MiB) {said}" in msg, (name, msg)


def test_a_hop_limit_the_memory_limits_make_impossible_is_named_with_what_would_do(measured):
    """Memory limits that some plan meets, and a per-hop byte limit that some plan meets, but no plan
    both: the refusal blamed the memory limits alone ("raise a --memory limit"), though they were met. It
    names the hop limit and the fewest bytes a plan within the memory limits sends over its largest hop
    (checked against every plan)."""
    h, slow, fast = measured
    samples, _, _ = h.fidelity_samples(2)
    nets = [load_network("lte"), load_network("lte")]
    devices, profiles = ["pi", "pi", "server"], {"pi": slow, "server": fast}
    w = gather_chain(h, devices, profiles, nets, samples).costs.weights
    limits = [(w[-1] - w[0]) / 3, (w[-1] - w[0]) / 3, None]  # the model fits no pi alone
    m = gather_chain(h, devices, profiles, nets, samples, memory_limits=limits, max_hop_bytes=100)
    within = [
        p
        for p in _every_plan(m.costs)
        if all(lim is None or b <= lim for b, lim in zip(p.memory_bytes, limits, strict=False))
    ]
    assert within and all(p.hop_bytes for p in within)  # met alone, and never without a hop
    need = min(max(p.hop_bytes) for p in within) + int(m.costs.reply_bytes)
    with pytest.raises(SplitPointError) as caught:
        decide_chain(m, ChainConstraints())
    msg = " ".join(str(caught.value).split())
    assert "no plan over this chain fits --max-hop-bytes 100 within the memory limits" in msg, msg
    assert f"every plan carries at least {need:,} bytes over one of its hops (its cut tensor and" in msg, msg
    capped = gather_chain(h, devices, profiles, nets, samples, memory_limits=limits, max_hop_bytes=need)
    assert decide_chain(capped, ChainConstraints()).pick.hop_bytes  # the figure it names does


def test_a_segments_memory_counts_the_activations_inside_it_and_the_session(measured):
    """A device's memory was its segment's weights and the larger tensor at its ends: a ResNet stem's
    segment holds its 64x112x112 convolution output (3.2 MB beside 0.6 MB crossing in and 0.8 MB out) and
    a session's own 10-20 MiB. Checked against each segment built on its own: its live activations (the
    head's derivation, run on the segment's graph) are held, and at most what passes over it besides."""
    h, slow, fast = measured
    samples, _, _ = h.fidelity_samples(2)
    m = gather_chain(h, ["pi", "server"], {"pi": slow, "server": fast}, [load_network("lte")], samples)
    c = m.costs
    pos = [int(p) for p in c.positions]
    rng = np.random.default_rng(0)
    pairs = {(0, 1), (0, len(pos) - 1)}
    pairs |= {tuple(sorted(int(p) for p in rng.choice(len(pos), 2, replace=False))) for _ in range(6)}
    for i, k in sorted(pairs):
        cuts = [None if pos[i] == 0 else m.cuts[pos[i]]]
        cuts += [m.cuts[pos[k]]] if pos[k] < pos[-1] else []
        seg = extract_segments(h.index, cuts, check=False)[1].model
        own = live_activation_peaks(GraphIndex.build(seg))[-1]
        assert own <= c.act_peak[i, k] <= own + c.act[i] + c.act[k], (i, k, own, c.act_peak[i, k])
    plan = evaluate_chain(c, (1,), (0,))
    stem = c.weights[1] + max(c.act_peak[0, 1], c.act[0], c.act[1]) + c.memory_overhead[0]
    assert plan.memory_bytes[0] == int(stem) and c.act_peak[0, 1] > max(c.act[0], c.act[1])
    assert c.memory_overhead[0] == slow.cost["memory_overhead_bytes"] > 0


def test_plan_chain_from_the_command_line(measured, tmp_path):
    h, slow, fast = measured
    slow.save(tmp_path / "pi.json")
    fast.save(tmp_path / "srv.json")
    args = ["plan-chain", str(h.path), "--devices", "pi,pi,srv"]
    args += ["--profile", f"pi={tmp_path / 'pi.json'}", "--profile", f"srv={tmp_path / 'srv.json'}"]
    args += ["--networks", "wifi-n,ethernet", "--random", "2"]
    proc = run_cli(*args, "-o", str(tmp_path / "plan"))
    assert proc.returncode == 0, proc.stderr
    assert "best two-stage" in proc.stdout and "pick:" in proc.stdout
    # the pick's row is starred, not marked with the arrow the plans' labels are written with
    assert "★" in proc.stdout and "│ →" not in proc.stdout, proc.stdout
    # the baseline "all on srv" sends the input on over both hops: what its cut 0 means is said
    assert "all on srv" in proc.stdout and "pi→cut 0 " in proc.stdout, proc.stdout
    assert "cut 0: that device runs none of the model and sends the input on" in proc.stdout
    # two devices of one kind read apart: "pi -> ... -> pi-2", "all on pi-2", never "pi" for both
    assert "pi-2" in proc.stdout and "all on pi (stage 1)" not in proc.stdout
    assert "measured on 2 random inputs (the user's model)" in " ".join(proc.stdout.split())
    # the second pi by the name the plans give it (refused before: only "pi", which means both), and
    # every limit the pick was chosen under recorded with it
    named = run_cli(*args, "--memory", "pi-2=64", "--max-hop-bytes", "10000000", "-o", str(tmp_path / "p2"))
    assert named.returncode == 0, named.stderr
    limits = json.loads((tmp_path / "p2" / "plan.json").read_text())["predicted"]["constraints"]
    assert limits["memory_mib"] == {"pi-2": 64.0} and limits["max_hop_bytes"] == 10_000_000
    bad = run_cli(*args[:-4], "--networks", "wifi-n", "--random", "2")
    assert bad.returncode == 2 and "3 devices need 2 network profile(s)" in bad.stderr
    missing = run_cli(*args[:6], *args[8:])  # no profile for srv
    assert missing.returncode == 2 and "no measured profile for srv" in missing.stderr
    # a metered hop: every plan shown carries at most that many bytes over each hop
    free = json.loads(run_cli(*args, "--json").stdout)
    sent = [b for p in free["front"] for b in p["hop_bytes"] if b > 0]
    # the smallest hop on the front; where the front keeps everything on the first device (the slow
    # device's profile came out fast on a busy machine), half the input, which sending it raw exceeds
    cap = (min(sent) if sent else h.index.info[h.index.inputs[0]].bytes_per_sample() // 2) + free["pick"][
        "reply_bytes"
    ]
    # rows that miss a constraint given are marked (a front member below --min-fidelity read as any other)
    lats = sorted({round(p["latency_ms"], 3) for p in free["front"]})
    if len(lats) > 1:
        limit = (lats[-1] + lats[-2]) / 2  # the slowest front member misses it, the pick does not
        marked = run_cli(*args, "--max-latency", f"{limit:.3f}", "-o", str(tmp_path / "marked"))
        assert marked.returncode == 0, marked.stderr
        assert "✗" in marked.stdout and "misses a constraint given" in marked.stdout, marked.stdout
    capped = run_cli(*args, "--json", "--max-hop-bytes", str(cap))
    assert capped.returncode == 0, capped.stderr
    out = json.loads(capped.stdout)
    assert all(b + p["reply_bytes"] <= cap for p in [out["pick"], *out["front"]] for b in p["hop_bytes"])


def test_the_whole_model_on_one_device_obeys_that_devices_memory():
    """The baseline "all on the edge" is a one-device problem: a memory limit the whole model passes
    rules it out there as it does in the chain's own search."""
    from splitpoint.partitioner.chainplan import _sub

    free = random_costs(9, 3, 3, 11)
    whole = evaluate_chain(_sub(free, 0), (), ()).memory_bytes[0]
    assert solve(_sub(free, 0), modes=(BUSY,)) is not None
    tight = random_costs(9, 3, 3, 11, memory=(whole / 2, None, None))
    assert solve(_sub(tight, 0), modes=(BUSY,)) is None
    roomy = random_costs(9, 3, 3, 11, memory=(whole * 2, None, None))
    assert solve(_sub(roomy, 0), modes=(BUSY,)) is not None


def test_the_model_on_one_device_pays_no_runtime_for_sending():
    """The whole model on the first device sends nothing, yet its stage counted the runtime's own time per
    request (measured for sending): a split read 1.3x the throughput of the edge alone, which was
    2.8x the split's."""
    alone = random_costs(6, 2, 1, 5, overhead=True)
    assert alone.overhead_ms[0] > 0
    p = evaluate_chain(alone, (), ())
    assert p.stage_ms == [pytest.approx(float(alone.prefix_ms[0, -1]))]
    assert solve(alone).bottleneck_ms == pytest.approx(float(alone.prefix_ms[0, -1]))
    two = random_costs(6, 2, 2, 5, overhead=True)  # with a hop, each device pays it
    q = evaluate_chain(two, (2,), (0,))
    assert q.stage_ms[0] == pytest.approx(
        float(two.prefix_ms[0, 2] + two.enc_ms[0, 2, 0]) + two.overhead_ms[0]
    )


@pytest.mark.parametrize("seed", range(6))
def test_a_refusal_names_first_the_plan_that_misses_the_limit_by_least(seed):
    """The closest plans a refusal names were the best by the objective: by throughput under
    --max-latency, plans well past the limit came first where the fastest missed it by 5 %."""
    from dataclasses import replace

    from splitpoint.partitioner.chainplan import ChainMeasurements, _fronts, describe

    costs = replace(random_costs(8, 2, 3, seed), codecs=("float32", "int8"))
    m = ChainMeasurements(None, list(costs.devices), [], costs, {}, [])  # type: ignore[arg-type]
    fastest = min(_fronts(m, np.ones((2, 8, 2), bool)), key=lambda p: p.latency_ms)
    with pytest.raises(SplitPointError) as caught:  # refused before any fidelity is measured
        decide_chain(m, ChainConstraints(max_latency_ms=fastest.latency_ms * 0.95, objective="throughput"))
    assert str(caught.value).split("the closest: ")[1].startswith(f"{describe(m, fastest)} (latency")
