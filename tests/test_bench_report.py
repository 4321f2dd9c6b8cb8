"""The bench report from saved results (no bench run): each target's verdict follows from a number,
the runtime overhead is quoted from benchmarks/bench_runtime.py's results when the bench made no
loopback runs, and the plots use axes one reads at a glance."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from splitpoint.app.bench import report

SAVED = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "bench" / "results.json"


@pytest.fixture(scope="module")
def saved():
    if not SAVED.is_file():
        pytest.skip("no saved bench results in this tree")
    results = json.loads(SAVED.read_text())
    results["runs"] = [r for r in results["runs"] if r["rows"][0]["model"] == "resnet18"]  # 4 cases
    return report.derive(results)


def _overhead(ts):
    return next(t for t in ts if t["target"].startswith("runtime overhead"))


def test_overhead_is_quoted_from_the_runtime_bench_with_its_verdict(saved, tmp_path):
    results = copy.deepcopy(saved)
    assert results["summary"]["runtime_overhead_ms_median"] is None  # the bench ran no loopback cases
    (tmp_path / "runtime.json").write_text(
        json.dumps(
            {"machine": {"cpu": "cpu X", "when": "then"}, "model": "resnet18", "median_overhead_ms": 2.1}
        )
    )
    (tmp_path / "runtime.md").write_text("# runtime\n")
    out = tmp_path / "bench"
    found = report.runtime_results(out)
    assert found == tmp_path / "runtime.json"
    results["targets"] = report.targets(results, report.load_runtime(found, out))
    oh = _overhead(results["targets"])
    assert (
        oh["ok"] is False and "2.10 ms" in oh["measured"] and "benchmarks/bench_runtime.py" in oh["measured"]
    )
    assert "cpu X" in oh["measured"] and "(../runtime.md)" in oh["measured"]
    md = report.markdown(results)
    assert "not measured here" not in md
    row = next(ln for ln in md.splitlines() if ln.startswith("| runtime overhead"))
    assert row.endswith("| **MISSED** |")
    tally = next(ln for ln in md.splitlines() if "targets met" in ln)
    assert "MISSED: " in tally and "runtime overhead ≤ 0.5 ms at loopback (median) (2.10 ms" in tally
    last = report.summary_lines(results, out)[-1]
    assert "MISSED: " in last and "runtime overhead ≤ 0.5 ms at loopback (median) (2.10 ms" in last


def test_each_verdict_follows_its_number(saved):
    results = copy.deepcopy(saved)
    ts = report.targets(results)  # no runtime results at all
    oh = _overhead(ts)
    assert oh["ok"] is None and "not measured" in oh["measured"] and "bench_runtime.py" in oh["measured"]
    assert "not measured: runtime overhead" in report._tally(ts)
    # the bench's own loopback figure, when there is one, is the one judged
    results["summary"]["runtime_overhead_ms_median"] = 0.3
    assert _overhead(report.targets(results))["ok"] is True
    results["summary"]["runtime_overhead_ms_median"] = 0.7
    assert _overhead(report.targets(results))["ok"] is False
    results["summary"]["prediction_error_median"] = 0.12
    pe = next(t for t in report.targets(results) if t["target"].startswith("median prediction"))
    assert pe["ok"] is False and pe["measured"].startswith("12.0 %")


def test_candidates_below_the_edge_s_quota_are_not_judged(saved):
    """A CFS quota runs a request that needs less CPU than one period's quota at the host's speed: a small
    model's all-on-edge run measured 2.3 ms against 19.5 predicted, counted as a 730 % prediction error,
    and as the best candidate every pick's regret was measured against."""
    results = copy.deepcopy(saved)
    results["edge_calibration"] |= {"cpus": 0.05, "mechanism": "cgroup-v1 cfs quota"}
    run = results["runs"][0]
    fast = min(run["rows"], key=lambda r: r["measured"].get("latency_ms_median") or 1e12)
    for r in run["rows"]:
        r["measured"]["edge_cpu_ms_per_request"] = 5.0
    fast["measured"]["edge_cpu_ms_per_request"] = 0.4  # under the 1 ms quota
    fast["measured"]["latency_ms_median"] = 0.01  # "faster" than anything: the host's speed
    derived = report.derive(results)
    assert fast["below_quota"] is True and derived["summary"]["unjudged_below_quota"] == 1
    case = next(c for c in derived["cases"] if c["network"] == run["network"])
    assert case["best"] != fast["candidate"] and case["fastest_any"] != fast["candidate"]
    pe = next(t for t in report.targets(derived) if t["target"].startswith("median prediction"))
    assert "1 candidates not judged" in pe["measured"] and "1 ms of CPU" in pe["measured"]
    md = report.markdown(derived)
    assert "(not judged: below the edge's quota, run at full speed)" in md
    # picked, it is shown with its figure, marked, not as '–' beside a "best" 58x slower
    for r in run["rows"]:
        r["is_pick"] = r is fast
    rows = [ln for ln in report.headline(report.derive(results)) if ln.startswith(f"| {fast['model']} |")]
    row = next(ln for ln in rows if f"| {run['network']} |" in ln)
    assert f"| {fast['candidate']} | 0.0 (not judged) |" in row, row
    assert any(ln.startswith("\n*Not judged*") for ln in report.headline(report.derive(results)))
    # every candidate below the quota: the best is shown, marked, and no regret is judged against it (it
    # read as "best measured of those judged" with nothing judged)
    results2 = copy.deepcopy(saved)
    results2["edge_calibration"] |= {"cpus": 0.05, "mechanism": "cgroup-v1 cfs quota"}
    run2 = results2["runs"][0]
    for r in run2["rows"]:
        r["measured"]["edge_cpu_ms_per_request"] = 0.4
    derived2 = report.derive(results2)
    case2 = next(c for c in derived2["cases"] if c["network"] == run2["network"])
    assert case2["best_unjudged"] is True and case2["regret"] is None
    row2 = next(
        ln for ln in report.headline(derived2) if f"| {run2['network']} |" in ln and case2["best"] in ln
    )
    assert f"| {case2['best']} (" in row2 and " (not judged)) |" in row2, row2
    # the burst the calibration measured after idle time is the threshold where it exceeds the quota:
    # a 2.75 ms edge run went through whole on a kernel that let 3 ms through
    results = copy.deepcopy(saved)
    results["edge_calibration"] |= {"cpus": 0.05, "mechanism": "cgroup-v1 cfs quota", "burst_ms": 3.0}
    run = results["runs"][0]
    for r in run["rows"]:
        r["measured"]["edge_cpu_ms_per_request"] = 5.0
    run["rows"][0]["measured"]["edge_cpu_ms_per_request"] = 2.75
    derived = report.derive(results)
    assert run["rows"][0]["below_quota"] is True and derived["summary"]["edge_quota_ms"] == 3.0


def test_a_pick_the_bench_measured_below_the_floor_misses_the_constraint(saved):
    """The planner measured the pick at 1.00 on its 8 inputs and the bench at 0.69 on its own requests: the
    headline called it the best "meeting the constraints" and counted its regret as met."""
    results = copy.deepcopy(saved)
    floor = results["config"]["min_fidelity"]
    before = report.derive(copy.deepcopy(results))["summary"]["regret_within_target_share"]
    run = results["runs"][0]
    pick = next(r for r in run["rows"] if r["is_pick"])
    pick["measured"]["agreement"] = 0.69
    derived = report.derive(results)
    case = next(c for c in derived["cases"] if c["network"] == run["network"] and c["model"] == pick["model"])
    assert case["pick_below_floor"] and case["pick_agreement"] == 0.69 and case["best"] != pick["candidate"]
    share = derived["summary"]["regret_within_target_share"]
    assert share < before or before == 0, (share, before)
    row = next(ln for ln in report.headline(derived) if f"| {run['network']} |" in ln)
    assert f"(**agreement measured 0.69 < {floor:g}**)" in row, row
    regret = next(t for t in report.targets(derived) if t["target"].startswith("regret"))
    assert "1 pick(s) the bench measured below the fidelity floor count as misses" in regret["measured"]


def test_the_whole_bench_time_is_judged_on_the_default_set_only(saved):
    """A run of one model on one network "met" the 15-minute target for the whole bench."""
    results = copy.deepcopy(saved)
    t = next(t for t in report.targets(results) if t["target"].startswith("whole bench"))
    assert t["ok"] is not None  # the committed run is of the default models and networks
    results["config"]["models"] = ["resnet18"]
    results["summary"]["bench_seconds"] = 60.0
    t = next(t for t in report.targets(results) if t["target"].startswith("whole bench"))
    assert t["ok"] is None and "this run had fewer" in t["measured"]
    results["targets"] = report.targets(results)
    md = report.markdown(results)
    assert "| **not judged** |" in md and "not judged: whole bench under 15 min" in md


def test_plots_read_at_a_glance(saved, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    figs: dict[str, Figure] = {}
    real_savefig = Figure.savefig

    def keep(self, path, *a, **k):
        figs[Path(path).name] = self
        return real_savefig(self, path, *a, **k)

    monkeypatch.setattr(Figure, "savefig", keep)
    files = report.plots(copy.deepcopy(saved), tmp_path)
    assert set(files) == set(figs) and all((tmp_path / f).stat().st_size > 1000 for f in files)

    lt = figs["latency_vs_throughput.png"]
    for ax in [a for a in lt.axes if a.has_data()]:
        assert len([t for t in ax.get_xticklabels() if t.get_text()]) >= 3, ax.get_title()
    bd = figs["latency_breakdown.png"]
    panels = [a for a in bd.axes if a.has_data()]
    assert panels and all(ax.get_yscale() == "linear" for ax in panels)
    assert all(ax.get_legend() is None for ax in panels) and bd.legends  # one legend, off the bars
    # a bar cut at the axis top says its real total
    cut = [
        (t.get_text(), ax.get_ylim()[1]) for ax in panels for t in ax.texts if t.get_text().endswith(" ms")
    ]
    assert cut and all(float(text[:-3].replace(",", "")) > top for text, top in cut)


def test_bench_results_say_when_and_on_which_code_they_ran():
    """Results that do not name their commit cannot be matched to a fix made after them."""
    import re

    from splitpoint.app.bench.provenance import line, provenance

    p = provenance()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", p["when"])
    assert re.fullmatch(r"[0-9a-f]{12}(\+dirty)?|splitpoint .+", p["commit"]), p["commit"]
    assert line(p) == f"{p['when']}, commit {p['commit']}"
    assert line({"cpu_model": "x"}) == ""  # results saved before runs named them


def test_the_report_gives_the_command_that_reproduces_the_run():
    """It printed the models, networks and device only: a run with --input-shape, --link proxy or
    --seconds could not be repeated from its report."""
    from splitpoint.app.bench.run import BenchConfig, bench_command

    cfg = BenchConfig(
        models=("my.onnx",), networks=("5g",), link="proxy", seconds=1, max_front=2,
        input_shapes=("x:1x3x224x224",), out="work/b",
    )  # fmt: skip
    assert bench_command(cfg) == (
        "splitpoint bench --models my.onnx --networks 5g --device rpi4 --link proxy --seconds 1 "
        "--max-front 2 --input-shape x:1x3x224x224 -o work/b"
    )
    plain = bench_command(BenchConfig(models=("resnet18",), networks=("lte",), out="o"))
    assert plain == "splitpoint bench --models resnet18 --networks lte --device rpi4 -o o"


def test_a_bench_outside_the_results_layout_is_not_graded_on_the_committed_runtime_run(saved, tmp_path):
    """A user's `bench -o work/b` found benchmarks/results/runtime.json in the source tree and graded its
    own report MISSED on that run, of another machine and date."""
    results = copy.deepcopy(saved)
    out = tmp_path / "work" / "b"
    assert report.runtime_results(out) is None
    oh = _overhead(report.targets(results, report.load_runtime(report.runtime_results(out), out)))
    assert oh["ok"] is None and "not measured by this bench" in oh["measured"]


_BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5:\n    pass\n"


def test_the_host_load_counts_the_benchmarks_own_processes_apart_from_the_rest(tmp_path):
    """A run's figures are this machine's with whatever else ran: a child of the benchmark (an edge, a
    server) is its own load, a process outside it is the host's, and the report calls a host busy."""
    import subprocess
    import sys
    import time

    from splitpoint.app.bench.hostload import HostLoad, sentence

    load = HostLoad()
    subprocess.run([sys.executable, "-c", _BURN], check=True)  # the benchmark's own: waited for
    done = tmp_path / "done"
    # outside the benchmark: started by a child that exits at once, so nothing of this process waits for it
    detached = f"{_BURN}open({str(done)!r}, 'w').close()\n"
    launcher = f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {detached!r}])\n"
    subprocess.run([sys.executable, "-c", launcher], check=True)
    deadline = time.monotonic() + 60
    while not done.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    m = load.measured()
    core_s = m["seconds"] * m["cores"]
    assert m["own_cpu_share"] * core_s >= 0.45, m
    assert m["other_cpu_share"] * core_s >= 0.45, m
    assert "A busy host" in sentence({**m, "other_cpu_share": 0.2}) and "busy" not in sentence(
        {**m, "other_cpu_share": 0.01, "steal_share": 0.0}
    )
    assert sentence(None) == ""  # results from before it was measured


def test_a_calibration_that_missed_its_aim_says_so_in_every_report():
    """A trace bench's edge ran MobileNetV2-int8 at 40.0 ms against the Pi's 33 ms (21 % off, the aim is
    5 %) and its report gave both figures with no verdict."""
    from splitpoint.app.bench.edgecpu import calibration_verdict

    cal = {"target_ms": 33.0, "measured_ms": 40.0, "mechanism": "cgroup-v1 cfs quota"}
    assert calibration_verdict(cal) == " (21 % off; the calibration aims within 5 %: **MISSED**)"
    assert "met" in calibration_verdict({**cal, "measured_ms": 33.9})
    assert calibration_verdict({**cal, "mechanism": "none"}) == ""  # no limit: the machine is the device


def test_the_next_share_tried_comes_from_the_tries_either_side_of_the_target():
    """Under a quota, time is a noisy function of the CPU share; stepping from the last try alone went
    0.11 -> 0.125 -> 0.18 and ended 26 % fast. Once tries bracket the target, the next share lies between
    the closest of them, where a power law through both puts the target."""
    from splitpoint.app.bench.edgecpu import next_share
    from splitpoint.profiles.cpulimit import MIN_CPUS

    # one try only: scaled by how far its time was off, within the shares a limit can set
    assert next_share(33.0, [(0.1, 66.0)]) == 0.2
    assert next_share(33.0, [(0.9, 60.0)]) == 1.0
    assert next_share(33.0, [(MIN_CPUS, 10.0)]) == MIN_CPUS
    # bracketed: 0.1 -> 66 ms and 0.2 -> 33/2 ms, time ~ share^-2: 33 ms at 0.1 * 2^(1/2)
    tries = [(0.1, 66.0), (0.4, 9.0), (0.05, 140.0), (0.2, 16.5)]
    assert next_share(33.0, tries) == pytest.approx(0.1414, abs=1e-4)
    # noise made more CPU read slower: the gap is halved instead
    assert next_share(33.0, [(0.12, 20.0), (0.14, 40.0)]) == 0.13


def test_the_printed_summary_never_shows_an_unjudged_figure_as_zero(saved, tmp_path):
    """Every candidate not judged leaves the prediction error and the regret share unknown: the console
    said "median prediction error 0.0 %; regret ≤ 1.05 in 0 % of cases" where report.md said "not
    measured"."""
    results = copy.deepcopy(saved)
    results["summary"]["prediction_error_median"] = None
    results["summary"]["regret_within_target_share"] = None
    line = report.summary_lines(results, tmp_path)[-2]
    assert "median prediction error not measured; regret ≤ 1.05 in no case judged" in line, line
    results["summary"]["prediction_error_median"] = 0.0
    results["summary"]["regret_within_target_share"] = 0.5
    line = report.summary_lines(results, tmp_path)[-2]
    assert "median prediction error 0.0 %; regret ≤ 1.05 in 50 % of cases" in line, line


def test_a_report_that_fails_half_written_leaves_the_last_one_whole(tmp_path):
    """A full disk mid-report left this run's new plots beside the last run's results.json and report.md,
    and a truncated results.json.tmp: all of a report's files are written before any replaces the last."""
    import errno

    from splitpoint.app.bench.outdir import staged

    (tmp_path / "results.json").write_text("last")
    (tmp_path / "plot.png").write_text("last plot")
    with pytest.raises(OSError) as e, staged(tmp_path) as stage:
        (stage / "plot.png").write_text("new plot")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert e.value.filename == str(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png", "results.json"]
    assert (tmp_path / "plot.png").read_text() == "last plot"
    with staged(tmp_path) as stage:
        for name in ("plot.png", "results.json", "report.md"):
            (stage / name).write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png", "report.md", "results.json"]
    assert all(p.read_text() == "new" for p in tmp_path.iterdir())
