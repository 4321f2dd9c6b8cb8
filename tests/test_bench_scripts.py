"""The benchmark scripts' reports: every verdict follows from the figures, misses stated as plainly
as hits, and the command that reproduces a table stands beside it. No timing here: the figures
are made up."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def scripts():
    sys.path.insert(0, str(BENCH))
    try:
        import bench_cutting
        import bench_profiler

        yield bench_profiler, bench_cutting
    finally:
        sys.path.remove(str(BENCH))


FACTS = {"cpu": "test cpu", "cores": 2, "onnxruntime": "x", "when": "now"}


def _profiler_row(model, whole_ms, cost, wall_s, build_s, err, cached_wall_s=None, cli_s=None):
    cached = {} if cached_wall_s is None else {"codecs_cached_wall_s": cached_wall_s}
    cli = {} if cli_s is None else {"cli_wall_s": cli_s, "cli_whole_ms": whole_ms}
    return {
        **cached,
        **cli,
        "codecs_cached_whole_ms": whole_ms,
        "model": model,
        "cuts": 10,
        "measured_cuts": 2,
        "checked_cuts": 8,
        "whole_ms": whole_ms,
        "cost_full_equiv": cost,
        "timed_run_ms": cost * whole_ms,
        "wall_s": wall_s,
        "session_build_s": build_s,
        "median_err_head": err,
        "median_err_tail": err,
        "median_err_all": err,
        "p90_err_all": 2 * err,
        "raw_median_err_all": err,
        "raw_p90_err_all": 2 * err,
    }


def test_profiler_verdicts_follow_the_figures(scripts):
    bench_profiler, _ = scripts
    rows = [
        # 20 timed runs of 100 ms; wall 2.5 s = 25 inferences, 2.0 s with codecs cached, the command
        # 2.9 s: all met
        _profiler_row("good", 100.0, 20.0, 2.5, 0.3, 0.05, 2.0, 2.9),
        # 30.5 timed (over), wall 1.2 s of 10 ms = 120 inferences (over), 80 cached (over), the command 150
        # (over), error 12 %
        _profiler_row("bad", 10.0, 30.5, 1.2, 0.3, 0.12, 0.8, 1.5),
    ]
    details = {r["model"]: [{"whole_now_ms": r["whole_ms"]}] for r in rows}
    md = bench_profiler.markdown(rows, details, dict(bench_profiler.DEFAULT_SETTINGS), FACTS, False)
    lines = {ln for ln in md.splitlines() if ln.startswith("| good |") or ln.startswith("| bad |")}
    verdict_lines = [ln for ln in lines if "**met**" in ln or "**MISSED**" in ln]
    assert sum("| good |" in ln and "**met**" in ln for ln in verdict_lines) == 5
    assert sum("| bad |" in ln and "**MISSED**" in ln for ln in verdict_lines) == 5
    assert "**5 of 10 met.**" in md
    assert "29.0 × (2.9 s)" in md and "bad cost of the command (150.0 × (1.5 s))" in md
    assert "80.0 × (0.8 s)" in md and "20.0 × (2.0 s)" in md  # a later profile, codec speeds cached
    assert "bad cost in timed runs (30.5 ×)" in md and "bad median error (12.0 % over 8 cuts)" in md
    assert "120.0 × (1.2 s)" in md  # wall clock incl. session builds, in full inferences
    assert "meet both" not in md


def test_profiler_verdict_without_checked_cuts_is_not_measured(scripts):
    bench_profiler, _ = scripts
    row = _profiler_row("m", 10.0, 20.0, 0.2, 0.05, 0.0)
    row.update(checked_cuts=0, raw_median_err_all=None, raw_p90_err_all=None, median_err_all=None)
    md = bench_profiler.markdown([row], {"m": []}, dict(bench_profiler.DEFAULT_SETTINGS), FACTS, True)
    assert "**not measured**" in md and "--report-only" in md


def _cut_row(model, kind, nodes, list_s, split_s):
    return {
        "model": model,
        "kind": kind,
        "nodes": nodes,
        "cuts": nodes - 1,
        "load_s": 0.1 if kind == "zoo" else None,
        "index_s": list_s / 2,
        "enumerate_s": list_s / 2,
        "list_all_cuts_s": list_s,
        "split_cut": nodes // 2,
        "split_s": split_s,
        "plan_bytes": 10**6,
        "us_per_cut": 1e6 * list_s / 2 / (nodes - 1),
    }


def test_cutting_report_measures_real_graphs_and_labels_synthetic_ones(scripts):
    _, bench_cutting = scripts
    rows = [
        _cut_row("resnet50", "zoo", 175, 0.2, 0.6),
        _cut_row("alexnet", "zoo", 19, 1.2, 2.5),
        _cut_row("deep-residual-144", "synthetic", 1011, 0.1, 0.03),
    ]
    md = bench_cutting.markdown(rows, FACTS)
    real, synthetic = md.split("## Scaling check on synthetic graphs")
    assert "| resnet50 |" in real and "| deep-residual" not in real
    assert "| deep-residual-144 |" in synthetic and "not a real model" in synthetic
    alexnet = next(ln for ln in real.splitlines() if ln.startswith("| alexnet |"))
    assert alexnet.count("MISSED") == 2
    assert "**2 of 4 met**" in real and "alexnet list all cuts 1200 ms" in real
    # the command that reproduces each table is printed beside it
    assert "Reproduce: `python benchmarks/bench_cutting.py --models resnet50,alexnet --no-synthetic`" in real
    assert "Reproduce: `python benchmarks/bench_cutting.py --models ''`" in synthetic


def test_real_models_report_states_each_failure_and_counts_only_whole_passes():
    """A model with one failed step does not count as passed, and the step and its error are listed."""
    sys.path.insert(0, str(BENCH))
    try:
        import check_real_models
    finally:
        sys.path.remove(str(BENCH))
    steps = [{"step": f"s{i}", "ok": True} for i in range(8)]
    good = {"model": "a", "package": "p==1", "why": "w", "cuts": 3, "pick": "edge-only"}
    good["steps"] = [*steps, {"step": "serve split", "ok": True, "rel_err": 1e-7}]
    bad = {
        **good,
        "model": "b",
        "steps": [*steps, {"step": "serve split", "ok": False, "error": "shape (1,)"}],
    }
    md = check_real_models.report([good, bad])
    assert "**1 of 2 models passed every step.**" in md
    assert "- b, serve split: shape (1,)" in md
    assert "| a | `p==1` | w | 3 | 9 of 9 | edge-only | 1.0e-07 |" in md
    assert "| b | `p==1` | w | 3 | 8 of 9 | edge-only | - |" in md
