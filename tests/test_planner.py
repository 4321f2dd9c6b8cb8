"""The planner end to end: measured profiles in, an exact front and a deployable plan out."""

from __future__ import annotations

import json

import numpy as np
import pytest

from splitpoint.core.errors import ProfileError, SplitPointError
from splitpoint.core.graph import open_model
from splitpoint.core.plan import EDGE_ONLY, SERVER_ONLY, Plan
from splitpoint.core.runner import assemble, load_split, make_session
from splitpoint.core.samples import load_inputs
from splitpoint.partitioner.costmodel import RUNTIME_NOT_MEASURED, evaluate
from splitpoint.partitioner.pareto import Constraints, InfeasibleError, front
from splitpoint.partitioner.planner import candidate_inputs, decide, gather, link_of, measure_fidelity
from splitpoint.profiles.profiler import ProfileSettings, profile_model
from splitpoint.profiles.schema import load_network

from .conftest import run_cli

NETS = ["3g", "wifi-n", "ethernet"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, small_resnet18):
    d = tmp_path_factory.mktemp("plan")
    path = small_resnet18
    h = open_model(path)
    edge = profile_model(h, ProfileSettings(role="edge", threads=1))
    server = profile_model(h, ProfileSettings(role="server", threads=1))
    edge.save(d / "edge.json")
    server.save(d / "server.json")
    return d, path, h, edge, server


def test_lazy_fidelity_front_equals_exhaustive_front(setup):
    _, _, h, edge, server = setup
    samples = load_inputs(h.model, random=6)
    nets = [load_network(n) for n in NETS]
    lazy = gather(h, edge, server, samples)
    cons = Constraints()
    decisions = decide(lazy, nets, cons)
    full = gather(h, edge, server, samples)
    measure_fidelity(full, {(c.index, "float32") for c in h.cuts()})
    inputs = candidate_inputs(full)
    assert all(ci.fidelity is not None for ci in inputs)
    for d, net in zip(decisions, nets, strict=True):
        exhaustive = front([evaluate(ci, link_of(net)) for ci in inputs], cons.objectives())
        assert sorted(c.label for c in d.front) == sorted(c.label for c in exhaustive)
        kinds = {c.inp.kind for c in d.candidates}
        assert {EDGE_ONLY, SERVER_ONLY} <= kinds  # the baselines are always candidates
    # lazy measurement did less work than measuring everything
    assert len({k[0] for k in lazy.fidelity}) < len({k[0] for k in full.fidelity})


def test_a_memory_constraint_searches_the_memory_front_too(setup):
    """Edge memory joins the searched objectives when a constraint names it: the lazy front then equals
    the exhaustive front over all four objectives it weighs, and holds the shallow, small-memory cuts."""
    _, _, h, edge, server = setup
    samples = load_inputs(h.model, random=6)
    net = load_network("wifi-n")
    budget = int(
        np.median([ci.edge_memory_bytes for ci in candidate_inputs(gather(h, edge, server, samples))])
    )
    cons = Constraints(max_edge_memory_bytes=budget)
    assert cons.objectives() == (0, 2, 3, 4) and Constraints().objectives() == (0, 3, 4)
    d = decide(gather(h, edge, server, samples), [net], cons)[0]
    full = gather(h, edge, server, samples)
    measure_fidelity(full, {(c.index, "float32") for c in h.cuts()})
    exhaustive = front([evaluate(ci, link_of(net)) for ci in candidate_inputs(full)], cons.objectives())
    assert sorted(c.label for c in d.front) == sorted(c.label for c in exhaustive)
    assert d.pick.inp.edge_memory_bytes <= budget


def test_with_a_fidelity_floor_the_front_is_of_the_candidates_that_meet_it(setup):
    """A floor makes fidelity a constraint: the lazy front equals the exhaustive front over latency and
    bytes of every candidate measured at or above the floor, and holds none below it."""
    _, _, h, edge, server = setup
    samples = load_inputs(h.model, random=6)
    nets = [load_network(n) for n in NETS]
    full = gather(h, edge, server, samples)
    measure_fidelity(full, {(c.index, "float32") for c in h.cuts()})
    scores = sorted({ci.fidelity for ci in candidate_inputs(full) if ci.fidelity is not None})
    floor = scores[len(scores) // 2]  # a floor half the candidates miss
    cons = Constraints(min_fidelity=floor)
    assert cons.objectives() == (0, 3)
    lazy = gather(h, edge, server, samples)
    decisions = decide(lazy, nets, cons)
    for d, net in zip(decisions, nets, strict=True):
        ok = [evaluate(ci, link_of(net)) for ci in candidate_inputs(full) if ci.fidelity >= floor]
        assert sorted(c.label for c in d.front) == sorted(c.label for c in front(ok, (0, 3)))
        assert all(c.inp.fidelity >= floor for c in d.front) and d.pick.inp.fidelity >= floor
    assert len({k[0] for k in lazy.fidelity}) < len({k[0] for k in full.fidelity})


def test_a_front_budget_measures_less_and_keeps_the_pick(setup):
    """With no budget for the front the planner still finds the same pick (measured first, in the
    objective's order), measures no cut the exact search would not, and counts what it left: exactly
    the optimistic front members still unmeasured."""
    from splitpoint.partitioner.planner import unmeasured_on_front

    _, _, h, edge, server = setup
    samples = load_inputs(h.model, random=6)
    nets = [load_network(n) for n in ("3g", "5g", "ethernet")]
    cons = Constraints()
    exact, lean = gather(h, edge, server, samples), gather(h, edge, server, samples)
    full = decide(exact, nets, cons)
    cheap = decide(lean, nets, cons, front_budget=0)
    assert [d.pick.label for d in cheap] == [d.pick.label for d in full]
    assert all(d.unmeasured == 0 for d in full)
    assert {k[0] for k in lean.fidelity} <= {k[0] for k in exact.fidelity}
    left = unmeasured_on_front(candidate_inputs(lean), [link_of(n) for n in nets], cons.objectives())
    assert cheap[0].unmeasured == len({(k, w) for k, w, _codec in left})  # cuts (with head precision)
    assert all(c.inp.fidelity is not None for d in cheap for c in d.front)


def test_lossy_codecs_measure_below_lossless(setup):
    _, _, h, edge, server = setup
    m = gather(h, edge, server, load_inputs(h.model, random=6))
    measure_fidelity(m, {(10, "float32")})
    assert m.fidelity[(10, "float32", "float32")] == 1.0
    rep = m.fidelity_reports[(10, "int4+zstd", "float32")]["outputs"][0]
    assert rep["snr_db"] < m.fidelity_reports[(10, "int8", "float32")]["outputs"][0]["snr_db"] < 300


def test_one_codec_asked_measures_it_and_its_lossless_twins_only(setup):
    """A pick needs one codec's fidelity: the tail runs for it alone, and the codecs that differ from it
    only by a lossless stage get the same (measured) figure; the rest stay unmeasured until asked."""
    _, _, h, edge, server = setup
    m = gather(h, edge, server, load_inputs(h.model, random=6))
    measure_fidelity(m, {(10, "float32", "int8+zstd")})
    at10 = {c for (k, c, _w) in m.fidelity if k == 10}
    assert at10 == {c for c in m.codecs if c.split("+")[0] == "int8"}
    assert m.fidelity[(10, "int8", "float32")] == m.fidelity[(10, "int8+zstd", "float32")]
    # the server-only baselines: one full-model run per base, its stages sharing the figure
    twins = [c for c in m.codecs if c.startswith("int8+")]
    assert twins
    for c in twins:
        assert m.fidelity[(0, c, "float32")] == m.fidelity[(0, "int8", "float32")]
        assert m.fidelity_reports[(0, c, "float32")]["codec"] == c
    # asking for the whole cut later measures the rest
    measure_fidelity(m, {(10, "float32")})
    assert {c for (k, c, _w) in m.fidelity if k == 10} == set(m.codecs)


def test_constraints_steer_the_pick(setup):
    _, _, h, edge, server = setup
    m = gather(h, edge, server, load_inputs(h.model, random=6))
    nets = [load_network("3g")]
    fast = decide(m, nets, Constraints())[0].pick
    strict = decide(m, nets, Constraints(min_fidelity=1.0))[0].pick
    assert strict.inp.fidelity == 1.0 and strict.latency_ms >= fast.latency_ms
    # a budget that fits only the input buffer: nothing of the model can run on the edge
    budget = 3 * 64 * 64 * 4
    tiny = decide(m, nets, Constraints(max_edge_memory_bytes=budget))[0]
    assert tiny.pick.inp.kind == SERVER_ONLY and tiny.pick.inp.edge_memory_bytes <= budget


def test_profiles_for_another_model_or_role_are_refused(setup):
    _, _, h, edge, server = setup
    other = open_model("mobilenetv2")
    with pytest.raises(ProfileError, match="edge profile was measured on another model"):
        gather(other, edge, server, [])
    with pytest.raises(ProfileError, match="measured in the server role"):
        gather(h, server, server, [])
    d, path = setup[0], setup[1]  # swapped on the command line: the file given in the other's place is named
    profiles = ["--edge-profile", str(d / "server.json"), "--server-profile", str(d / "edge.json")]
    r = run_cli("plan", str(path), *profiles, "--network", "lte")
    said = " ".join(r.stderr.split())
    assert (
        r.returncode == 2
        and f"{d / 'server.json'} was measured in the server role, and is given as --edge-profile" in said
    ), said


def _plan(d, model, network: str, *args: str, check: bool = False):
    """`splitpoint plan` over the module's measured profiles."""
    profiles = ["--edge-profile", str(d / "edge.json"), "--server-profile", str(d / "server.json")]
    return run_cli("plan", str(model), *profiles, "--network", network, *args, check=check)


def test_plan_cli_writes_a_runnable_plan_with_its_predictions(setup):
    d, path, h, _, _ = setup
    out, png = d / "plan-wifi", d / "front.png"
    proc = _plan(
        d,
        path,
        "wifi-n",
        "--min-fidelity",
        "0.9",
        "-o",
        str(out),
        "--plot",
        str(png),
        "--random",
        "4",
        "--scores",
        f"{h.index.outputs[0]}:-1",  # a classifier's own rule, said as the plan records it
        check=True,
    )
    assert "Pareto front" in proc.stdout and "pick (latency)" in proc.stdout
    assert png.stat().st_size > 10_000
    plan = Plan.load(out)
    assert plan.predicted["derived"] is True and plan.predicted["fidelity"] >= 0.9
    said = f"top-1 at every position along axis -1 for {h.index.outputs[0]}"
    assert said in plan.predicted["fidelity_measure"], plan.predicted["fidelity_measure"]
    assert plan.front and plan.predicted["link"] == "wifi-n"
    _, head, tail = load_split(out)
    feeds = {"input": np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)}
    sent, early = head.run(feeds)
    late = tail.run(sent) if tail else {}
    got = assemble(plan, early, late)
    ref = make_session(path).run(None, feeds)
    np.testing.assert_allclose(got[0], ref[0], atol=1e-4)


def test_a_lossy_pick_made_without_a_fidelity_floor_is_pointed_out(setup):
    """Memory for the input only, on 3G: the fastest plan sends the input at 4 bits, and with no
    --min-fidelity nothing stops it. The user reads that beside the pick, with the option that does."""
    d, path, *_ = setup
    common = ("--edge-memory", "0.05", "--random", "6")
    loose = _plan(d, path, "3g", *common, check=True).stdout
    pick = next(line for line in loose.splitlines() if line.startswith("pick ("))
    fid = float(pick.rsplit("fidelity ", 1)[1].split()[0])
    assert "server-only int4" in pick and fid < 0.99, loose
    assert "no --min-fidelity was given" in loose and "give --min-fidelity 0.99" in loose
    strict = _plan(d, path, "3g", *common, "--min-fidelity", "0.99", check=True).stdout
    pick = next(line for line in strict.splitlines() if line.startswith("pick ("))
    assert float(pick.rsplit("fidelity ", 1)[1].split()[0]) >= 0.99, strict
    assert "no --min-fidelity was given" not in strict
    # 6 of 6 agreeing bounds agreement at 0.61 only: a lossy pick's floor of 0.99 is no measured fact
    assert "float32" in pick or (
        "measured on 6 inputs" in strict and "bounds it only at ≥ 0.61" in strict and "381 samples" in strict
    ), strict


def test_a_fallback_model_past_the_edge_memory_limit_is_pointed_out(setup, tmp_path):
    """--edge-memory judged the pick's head alone: --with-full shipped a whole model past the limit
    without a word."""
    d, path, *_ = setup
    common = ("--edge-memory", "0.05", "--random", "4")
    said = _plan(d, path, "3g", *common, "--with-full", "-o", str(tmp_path / "p"), check=True).stdout
    assert "the whole model shipped for fallback (--with-full) takes" in said, said
    assert "past --edge-memory" in said
    alone = _plan(d, path, "3g", *common, "-o", str(tmp_path / "q"), check=True).stdout
    assert "shipped for fallback" not in alone


def test_plan_cli_infeasible_names_closest(setup):
    d, path, _, _, _ = setup
    out = d / "never"
    proc = _plan(
        d,
        path,
        "3g",
        "--max-latency",
        "0.01",
        "-o",
        str(out),
        "--random",
        "4",
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no candidate meets the constraints" in proc.stderr and "ms > 0.01 ms" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_impossible_latency_is_refused_before_fidelity_is_measured(setup):
    _, _, h, edge, server = setup
    m = gather(h, edge, server, load_inputs(h.model, random=2), codecs=["float32", "int8"])
    with pytest.raises(InfeasibleError):
        decide(m, [load_network("lte")], Constraints(max_latency_ms=0.001, min_fidelity=0.99))
    assert m.fidelity == {}  # nothing was measured: the latency limit alone rules every candidate out


def test_baseline_plans_run(setup):
    d, path, h, _, _ = setup
    from splitpoint.core.plandir import write_plan

    feeds = {"input": np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32)}
    ref = make_session(path).run(None, feeds)[0]
    for kind in ("server-only", "edge-only"):
        plan = write_plan(h, d / kind, kind=kind, codec="int8")
        _, head, tail = load_split(d / kind)
        sent, early = head.run(feeds)
        got = assemble(plan, early, tail.run(sent) if tail else {})
        np.testing.assert_allclose(got[0], ref, atol=1e-5)
        assert (kind == "edge-only") == (tail is None)


def test_fidelity_cli_reads_npy_and_images_and_quantises_the_head(setup, tmp_path):
    from PIL import Image

    d, path, _, _, _ = setup
    rng = np.random.default_rng(0)
    for k in range(3):
        np.save(tmp_path / f"x{k}.npy", rng.standard_normal((3, 64, 64)).astype(np.float32))
        Image.fromarray(rng.integers(0, 255, (80, 90, 3), dtype=np.uint8)).save(tmp_path / f"img{k}.png")
    proc = run_cli(
        "fidelity",
        str(path),
        "--cut",
        "20",
        "--codec",
        "int8",
        "--inputs",
        str(tmp_path),
        "--quantize-head-weights",
        "static",
        "--json",
        check=True,
    )
    rep = json.loads(proc.stdout)
    assert rep["samples"] == 6 and rep["head_weights"] == "int8-static"
    out = rep["outputs"][0]
    assert 0.9 < out["cosine"] < 1.0 and out["top1_agreement"] is not None
    exact = json.loads(
        run_cli(
            "fidelity", str(path), "--cut", "20", "--codec", "float32", "--random", "3", "--json", check=True
        ).stdout
    )
    assert exact["outputs"][0]["cosine"] == pytest.approx(1.0) and exact["score"] == 1.0
    assert exact["inputs"] == "3 random inputs (the user's model)" and exact["task"] is None
    bad = run_cli("fidelity", str(path), "--cut", "20", "--codec", "int3")
    assert bad.returncode == 2 and "unknown codec 'int3'" in bad.stderr


def test_int8_heads_are_candidates_with_measured_fidelity(setup, tmp_path):
    d, path, h, _, server = setup
    edge8 = profile_model(h, ProfileSettings(role="edge", threads=1, int8=True))
    assert edge8.int8_whole is not None and edge8.int8_whole.median_ms > 0
    with pytest.raises(ProfileError, match="profile the edge with `splitpoint profile --int8`"):
        gather(
            h,
            profile_model(h, ProfileSettings(role="edge", threads=1, budget=8)),
            server,
            [],
            int8_heads=True,
        )
    m = gather(h, edge8, server, load_inputs(h.model, random=4), codecs=["float32", "int8"], int8_heads=True)
    # an edge-memory limit makes memory one of the front's objectives, where an int8 head always gains
    # (it may not gain time on a small model on a busy machine)
    dec = decide(m, [load_network("3g")], Constraints(max_edge_memory_bytes=2**40))[0]
    int8 = [c for c in dec.candidates if c.inp.head_weights == "int8"]
    assert int8 and any(c.inp.kind == EDGE_ONLY for c in int8)
    ratio = edge8.int8_whole.median_ms / edge8.whole.median_ms
    for c in int8:
        twin = next(
            x
            for x in dec.candidates
            if x.inp.head_weights == "float32"
            and x.inp.kind == c.inp.kind
            and x.inp.cut == c.inp.cut
            and x.inp.codec == c.inp.codec
        )
        assert c.inp.head_ms == pytest.approx(twin.inp.head_ms * ratio)  # derived from the measured ratio
        assert c.inp.edge_memory_bytes < twin.inp.edge_memory_bytes
    measured = [k for k in m.fidelity if k[2] == "int8"]
    assert measured, "an int8 candidate reached the front and was measured"
    for c in dec.front:
        assert c.inp.fidelity is not None
    # the edge-only int8 model really is quantised: its outputs differ from the float model's, a little
    measure_fidelity(m, {(None, "int8")})
    out = m.fidelity_reports[(None, "-", "int8")]["outputs"][0]
    assert 10 < out["snr_db"] < 300 and out["cosine"] > 0.9


def test_the_runtime_s_own_time_per_request_bounds_a_plan_s_throughput(setup):
    """Profiles measured with --runtime carry the runtime's own time per request on each side; the two-device
    plan counted none of it, and a tiny model measured at 243/s was predicted at 5,255/s."""
    _, _, h, edge, server = setup
    samples = load_inputs(h.model, random=2)
    plain = {(c.kind, c.cut, c.codec): c for c in candidate_inputs(gather(h, edge, server, samples))}
    edge = edge.model_copy(update={"runtime_ms": {"edge": 3.0}, "runtime_ms_per_mib": {"edge": 8.0}})
    server = server.model_copy(update={"runtime_ms": {"server": 1.0}, "runtime_ms_per_mib": {"server": 4.0}})
    counted = candidate_inputs(gather(h, edge, server, samples))
    net = link_of(load_network("ethernet"))
    for ci in counted:
        if ci.kind == "edge-only":
            assert ci.edge_runtime_ms == 0.0  # nothing of the runtime's on the way
            continue
        mib = ci.up_bytes / 2**20
        assert ci.edge_runtime_ms == pytest.approx(3.0 + 8.0 * mib)
        assert ci.server_runtime_ms == pytest.approx(1.0 + 4.0 * mib)
        c, before = evaluate(ci, net), evaluate(plain[(ci.kind, ci.cut, ci.codec)], net)
        assert c.throughput_ips <= 1000.0 / (ci.head_ms + ci.encode_ms + ci.edge_runtime_ms) + 1e-6
        assert c.latency_ms == pytest.approx(before.latency_ms + ci.edge_runtime_ms + ci.server_runtime_ms)


def test_a_front_budget_bounds_the_fidelity_runs_and_keeps_the_pick(setup):
    """A model of thousands of cuts measured fidelity for every front member: minutes of tail runs (a
    Swin-T's plan took 6.5). A front budget caps them; the pick is still measured and is the same, and
    the decision counts what the front left unmeasured, which `plan --front-budget` says."""
    d, path, h, edge, server = setup
    samples = load_inputs(h.model, random=4)
    nets = [load_network(n) for n in NETS]
    cons = Constraints(objective="throughput")  # a front of several here (of one by latency)
    exact = decide(gather(h, edge, server, samples), nets, cons)
    capped = decide(gather(h, edge, server, samples), nets, cons, front_budget=0)
    assert [c.pick.label for c in capped] == [c.pick.label for c in exact]
    assert any(c.unmeasured for c in capped) and not any(c.unmeasured for c in exact)
    assert sum(len(c.front) for c in capped) < sum(len(c.front) for c in exact)
    said = _plan(  # on 5G alone: its front is the one of several here
        d, path, "5g", "--objective", "throughput", "--random", "4", "--front-budget", "0", check=True
    ).stdout
    assert "left unmeasured (--front-budget): the front is of the candidates measured" in " ".join(
        said.split()
    )


def _slower(profile, factor: float):
    """The same profile on a device ``factor`` times slower (its model timings scaled)."""
    d = profile.model_dump()
    for stat in (d["whole"], *d["cuts"]):
        for k in [k for k in stat if k.endswith("_ms") and stat[k] is not None]:
            stat[k] *= factor
    return type(profile).model_validate(d)


def test_a_front_budget_keeps_the_pick_when_fidelity_is_the_objective(setup, tmp_path):
    """`--objective fidelity --front-budget 0` counted every unmeasured candidate as fidelity 0 while it
    chose what to measure for the pick: none was measured, and the pick was whatever else had been (the
    edge-only baseline, on a link where a faster cut loses nothing)."""
    _, _, h, edge, server = setup
    samples = load_inputs(h.model, random=4)
    (tmp_path / "slow.yaml").write_text(
        "name: slow\nuplink_mbps: 0.5\ndownlink_mbps: 16\nrtt_ms: 1\njitter_ms: 0\nloss: 0\n"
    )
    nets = [load_network(n) for n in (*NETS, str(tmp_path / "slow.yaml"))]
    # this millisecond model as an edge that takes a tenth of a second runs it: an early cut then beats
    # both baselines on a slow link
    slow_edge = _slower(edge, 300.0)
    cons = Constraints(objective="fidelity")
    exact = decide(gather(h, slow_edge, server, samples), nets, cons)
    capped = decide(gather(h, slow_edge, server, samples), nets, cons, front_budget=0)
    assert any(c.pick.inp.kind == "split" for c in exact)  # the case that went wrong
    assert [c.pick.label for c in capped] == [c.pick.label for c in exact]
    assert [c.pick.inp.fidelity for c in capped] == [c.pick.inp.fidelity for c in exact]


def _fastest_within(m, net, **limits):
    """The latency pick of `plan` under the limits, on one network."""
    return decide(m, [net], Constraints(min_fidelity=0.0, **limits))[0].pick


def test_a_plan_set_under_limits_is_chosen_among_every_candidate_within_them(setup, tmp_path):
    """`plan --set` measured the candidates it would run without the memory or bytes limit, then applied
    the limit to those alone: what was left was server-only, slower on the set's own link than `plan`'s
    pick under the same limit (a cut within it). And `--max-bytes` limits what `plan` does: the cut
    tensor and the reply, not the cut tensor alone."""
    from splitpoint.partitioner.costmodel import traffic_bytes
    from splitpoint.partitioner.job import set_members
    from splitpoint.partitioner.planset import fastest

    _, _, h, edge, server = setup
    samples = load_inputs(h.model, random=4)
    (tmp_path / "slow.yaml").write_text(
        "name: slow\nuplink_mbps: 2\ndownlink_mbps: 16\nrtt_ms: 1\njitter_ms: 0\nloss: 0\n"
    )
    # this edge on Wi-Fi; and as one that takes a tenth of a second, on a slow link, where cuts win
    for e, net in (
        (edge, load_network("wifi-n")),
        (_slower(edge, 300.0), load_network(str(tmp_path / "slow.yaml"))),
    ):
        link = link_of(net)
        m = gather(h, e, server, samples)
        splits = [c for c in candidate_inputs(m) if c.kind == "split"]
        for limits in (
            {"max_edge_memory_bytes": sorted(c.edge_memory_bytes for c in splits)[len(splits) // 3]},
            {"max_bytes": sorted(traffic_bytes(c) for c in splits)[3]},
        ):
            mem, most = limits.get("max_edge_memory_bytes"), limits.get("max_bytes")
            members, _ = set_members(m, link, "adaptive", 0.0, edge_memory_bytes=mem, max_bytes=most)
            for mb in members:
                assert mem is None or mb.inp.edge_memory_bytes <= mem
                assert most is None or traffic_bytes(mb.inp) <= most, (limits, mb.label)
            here = fastest([mb.inp for mb in members], link)
            best = _fastest_within(m, net, **limits)
            # (a set is chosen on a sweep of 61 bandwidths: within a few per cent of the pick between them)
            assert evaluate(here, link).latency_ms <= best.latency_ms * 1.05, (limits, here, best.label)
    # limits nothing meets: one line, as before the limits chose what is measured (a traceback after)
    with pytest.raises(SplitPointError, match="no plan set: .* within the memory and bytes limits"):
        set_members(m, link, "adaptive", 0.0, edge_memory_bytes=1, max_bytes=1)


def test_a_plan_labels_each_figure_measured_or_derived(setup):
    """plan.json and `plan --json` said `"derived": true` of a whole candidate, beside a measured
    fidelity and byte count, and could not tell a head timed at an anchor cut from one interpolated."""
    _, _, h, edge, server = setup
    m = gather(h, edge, server, load_inputs(h.model, random=4))
    net = load_network("wifi-n")
    d = decide(m, [net], Constraints())[0]
    sources = {(c.index, p.role): c.source for p in (edge, server) for c in p.cuts}
    seen = set()
    for c in d.candidates:
        labels = c.to_dict()["labels"]
        assert labels["latency_ms"] == labels["throughput_ips"] == "derived"
        assert labels["fidelity"] == ("measured" if c.inp.fidelity is not None else "not measured")
        if c.inp.kind == "split":
            for side, p in (("head_ms", "edge"), ("tail_ms", "server")):
                want = "measured" if sources[(c.inp.cut, p)] == "measured" else "interpolated"
                assert labels[side] == want
                seen.add(want)
        else:
            assert labels["head_ms"] == labels["tail_ms"] == "measured"
        # these profiles were made without --runtime: the 0 counted is said to be no measurement
        if c.inp.kind != "edge-only":
            assert labels["edge_runtime_ms"] == labels["server_runtime_ms"] == RUNTIME_NOT_MEASURED
    assert seen == {"measured", "interpolated"}


def test_an_output_whose_size_follows_an_input_s_values_is_costed_as_measured(tmp_path):
    """A Resize to scales an input gives declares no output size: the reply counted 0 bytes (a 4 MiB
    output left out of every candidate's latency); it is measured on the samples, as the cut tensors are."""
    import onnx

    from splitpoint.partitioner.planner import REPLY_OVERHEAD_BYTES, encoded_sizes, output_bytes

    from .graphs import resized_by_input_model

    m = resized_by_input_model(3)
    path = tmp_path / "resize.onnx"
    onnx.save(m, path)
    h = open_model(path)
    rng = np.random.default_rng(0)
    samples = [
        {"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32), "s": np.array(s, np.float32)}
        for s in ([3, 3], [7, 7], [3, 3])
    ]
    assert h.index.tensor("y").bytes_per_sample() is None  # nothing declared to count
    sizes = encoded_sizes(h, samples, ["float32"])
    assert output_bytes(h.index, sizes, h.index.outputs) == 3 * 32 * 32 * 4  # the median sample's
    # as the planner counts every candidate's reply: the server-only one's, and each cut's
    edge = profile_model(h, ProfileSettings(role="edge", threads=1, budget=5))
    server = profile_model(h, ProfileSettings(role="server", threads=1, budget=5))
    m = gather(h, edge, server, samples, ["float32"])
    assert set(m.reply_bytes.values()) == {3 * 32 * 32 * 4 + REPLY_OVERHEAD_BYTES}, m.reply_bytes


def test_a_half_cut_tensor_costs_codec_time_per_element_not_per_byte(tmp_path):
    """Codec speeds are measured on float32 tensors, in float32 bytes per second, and a quantiser's work is
    per element: a model converted to float16 inside (float32 at its edges) sends a half tensor whose int8
    encode was predicted at half a float32 one's and measured at twice (4x off). Its time is derived from
    its elements, as the float32 tensor of the same shape beside it, while its bytes stay its own."""
    import onnx
    from onnx import TensorProto, helper

    w = np.random.default_rng(0).standard_normal((8, 8, 3, 3)).astype(np.float16) * np.float16(0.2)
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),  # float32 crosses cut 1
        helper.make_node("Cast", ["a"], ["h"], to=TensorProto.FLOAT16),
        helper.make_node("Conv", ["h", "w"], ["c"], pads=[1, 1, 1, 1]),  # float16 crosses cut 3
        helper.make_node("Cast", ["c"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Relu", ["f"], ["y"]),
    ]
    g = helper.make_graph(
        nodes,
        "half-inside",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 32, 32])],
        [onnx.numpy_helper.from_array(w, "w")],
    )
    path = tmp_path / "half.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    h = open_model(path)
    crossing = {c.k: [t.name for t in c.crossing] for c in h.cuts()}
    assert crossing[1] == ["a"] and crossing[3] == ["c"], crossing
    edge = profile_model(h, ProfileSettings(role="edge", threads=1, budget=5))
    server = profile_model(h, ProfileSettings(role="server", threads=1, budget=5))
    m = gather(h, edge, server, load_inputs(h.model, random=2), ["int8", "float32+lz4", "float16"])
    assert m.sizes["c"]["raw"] * 2 == m.sizes["a"]["raw"] == 8 * 32 * 32 * 4  # its own bytes: half
    by = {(c.cut, c.codec): c for c in candidate_inputs(m) if c.kind == "split"}
    elements = 8 * 32 * 32
    for k in (1, 3):
        want = elements * 4 / 1e3
        assert by[k, "int8"].encode_ms == pytest.approx(want / edge.codecs["int8"].encode_mb_s)
        assert by[k, "int8"].decode_ms == pytest.approx(want / server.codecs["int8"].decode_mb_s)
    # a copy or a lossless compressor works on the tensor's own bytes: the half tensor's are half
    for k, size in ((1, 4), (3, 2)):
        for codec in ("float32+lz4", "float16"):
            speed = edge.codecs[codec].encode_mb_s
            own = elements * size if codec != "float16" or k == 3 else elements * 4  # a cast per element
            assert by[k, codec].encode_ms == pytest.approx(own / 1e3 / speed), (k, codec)
    # and so in a chain's costs, whose memory counts the half tensor's own bytes
    from splitpoint.partitioner.chainplan import gather_chain

    nets = [load_network("wifi-n")]
    codecs = ["int8", "float32+lz4"]
    chain = gather_chain(h, ["edge", "server"], {"edge": edge, "server": server}, nets, m.samples, codecs)
    at = {int(p): i for i, p in enumerate(chain.costs.positions)}
    for k in (1, 3):
        assert chain.costs.enc_ms[0][at[k], 0] == pytest.approx(want / edge.codecs["int8"].encode_mb_s)
        assert chain.costs.enc_ms[0][at[k], 1] == pytest.approx(by[k, "float32+lz4"].encode_ms)
    assert chain.costs.act[at[3]] * 2 == chain.costs.act[at[1]] == 8 * 32 * 32 * 4


def test_an_int8_head_saves_three_quarters_of_its_float32_weights_only(tmp_path):
    """onnxruntime's int8 quantiser leaves float16 weights as they are: a head holding both kinds saves a
    quarter's worth of its float32 ones alone (all of its weight bytes were taken off at 0.75)."""
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w32 = rng.standard_normal((64, 64)).astype(np.float32) * 0.1
    w16 = (rng.standard_normal((64, 64)) * 0.1).astype(np.float16)
    nodes = [
        helper.make_node("MatMul", ["x", "w32"], ["a"]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Cast", ["r"], ["h"], to=TensorProto.FLOAT16),
        helper.make_node("MatMul", ["h", "w16"], ["m"]),
        helper.make_node("Cast", ["m"], ["y"], to=TensorProto.FLOAT),
    ]
    g = helper.make_graph(
        nodes,
        "two-kinds",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [onnx.numpy_helper.from_array(w32, "w32"), onnx.numpy_helper.from_array(w16, "w16")],
    )
    path = tmp_path / "two.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    h = open_model(path)
    edge = profile_model(h, ProfileSettings(role="edge", threads=1, budget=5, int8=True))
    server = profile_model(h, ProfileSettings(role="server", threads=1, budget=5))
    m = gather(h, edge, server, load_inputs(h.model, random=2), ["float32"], int8_heads=True)
    mem = {
        (c.kind, c.head_weights): c.edge_memory_bytes for c in candidate_inputs(m) if c.kind == "edge-only"
    }
    assert mem[("edge-only", "float32")] - mem[("edge-only", "int8")] == int(0.75 * w32.nbytes)


@pytest.mark.parametrize("codecs", [["int8"], ["int8+lz4"], ["float16+lz4"]])
def test_token_ids_under_only_quantising_codecs_are_planned_as_sent(tmp_path, codecs):
    """A quantising codec sends token ids exact, as the lossless codec of its stage, and the candidates are
    named so (server-only float32+lz4 under int8+lz4): their fidelity was recorded under the codec asked
    for, the name no candidate looked up, and `plan --codecs int8+lz4` (and the demo, on such a model)
    measured the same candidates again in a loop that did not end."""
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["e"]),  # int64 ids cross cut 0 (server-only)
        helper.make_node("ArgMax", ["e"], ["top"], axis=2, keepdims=0),  # int64 crosses the next cut
        helper.make_node("Gather", ["emb", "top"], ["g"]),
        helper.make_node("MatMul", ["g", "w"], ["y"]),
    ]
    g = helper.make_graph(
        nodes,
        "ids",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 8])],
        [
            onnx.numpy_helper.from_array(rng.standard_normal((100, 100)).astype(np.float32), "emb"),
            onnx.numpy_helper.from_array(rng.standard_normal((100, 8)).astype(np.float32), "w"),
        ],
    )
    path = tmp_path / "ids.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    h = open_model(path)
    edge = profile_model(h, ProfileSettings(role="edge", threads=1, budget=5))
    server = profile_model(h, ProfileSettings(role="server", threads=1, budget=5))
    samples = load_inputs(h.model, random=4)
    m = gather(h, edge, server, samples, codecs)
    d = decide(m, [load_network("wifi-n")], Constraints())[0]
    assert d.pick is not None
    lossless = "float32" + codecs[0][len(codecs[0].split("+")[0]) :]
    by_name = {(c.inp.kind, c.inp.cut, c.inp.codec): c for c in d.candidates}
    assert by_name[("server-only", 0, lossless)].inp.fidelity == 1.0  # sent exact: measured so
    assert m.fidelity_reports[(0, lossless, "float32")]["codec"] == lossless  # its report says so too
    ids_cut = next(c.index for c in h.cuts() if [t.name for t in c.crossing] == ["top"])
    measure_fidelity(m, {(ids_cut, "float32", lossless)})  # as a front that holds it asks
    assert m.fidelity[(ids_cut, lossless, "float32")] == 1.0


def test_float32_weight_bytes_count_a_weight_computed_from_float32_ones(tmp_path):
    """A weight computed from an initializer (a transposed W: onnxruntime folds it and then quantises the
    result) is a float32 weight an int8 head holds in a quarter: counting literal constants alone left
    it out of the saving; a float16 one stays out."""
    import onnx
    from onnx import TensorProto, helper

    from splitpoint.core.graph.memory import weight_bytes_by_prefix

    nodes = [
        helper.make_node("Transpose", ["W"], ["Wt"]),
        helper.make_node("MatMul", ["x", "Wt"], ["a"]),
        helper.make_node("Cast", ["a"], ["h"], to=TensorProto.FLOAT16),
        helper.make_node("Transpose", ["H"], ["Ht"]),
        helper.make_node("MatMul", ["h", "Ht"], ["y"]),
    ]
    g = helper.make_graph(
        nodes,
        "computed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 64])],
        [
            onnx.numpy_helper.from_array(np.ones((64, 64), np.float32), "W"),
            onnx.numpy_helper.from_array(np.ones((64, 64), np.float16), "H"),
        ],
    )
    path = tmp_path / "computed.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    idx = open_model(path).index
    assert weight_bytes_by_prefix(idx)[-1] == 64 * 64 * 4 + 64 * 64 * 2
    assert weight_bytes_by_prefix(idx, only=TensorProto.FLOAT)[-1] == 64 * 64 * 4
    assert weight_bytes_by_prefix(idx, only=TensorProto.FLOAT16)[-1] == 64 * 64 * 2
    # an int8 weight behind a DequantizeLinear is a float32 constant of int8 bytes: no float32 weight
    q = helper.make_graph(
        [
            helper.make_node("DequantizeLinear", ["Wq", "sc", "zp"], ["W"]),
            helper.make_node("MatMul", ["x", "W"], ["y"]),
        ],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [
            onnx.numpy_helper.from_array(np.ones((64, 64), np.int8), "Wq"),
            onnx.numpy_helper.from_array(np.array(0.1, np.float32), "sc"),
            onnx.numpy_helper.from_array(np.array(0, np.int8), "zp"),
        ],
    )
    onnx.save(helper.make_model(q, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "qdq.onnx")
    idx = open_model(tmp_path / "qdq.onnx").index
    assert weight_bytes_by_prefix(idx, only=TensorProto.FLOAT)[-1] == 0
    assert weight_bytes_by_prefix(idx, only=TensorProto.INT8)[-1] == weight_bytes_by_prefix(idx)[-1] == 4096
