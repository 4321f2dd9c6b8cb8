"""`splitpoint bench --trace`: traces checked before anything runs, and a short trace end to end (a
calibrated edge process, a real server, the link proxy reshaped live at the phase boundary)."""

from __future__ import annotations

import json

import pytest

from splitpoint.app.bench.trace import TraceBenchConfig, load_trace, run_trace_bench
from splitpoint.app.bench.tracereport import write_trace_report
from splitpoint.core.errors import SplitPointError

from .conftest import run_cli


def test_a_trace_cycles_its_phases_up_to_its_total(tmp_path):
    f = tmp_path / "t.yaml"
    f.write_text(
        "phases:\n  - {network: lte, seconds: 20}\n  - {network: wifi-n, seconds: 20}\ntotal_seconds: 50\n"
    )
    played = load_trace(f).played()
    assert [(p.network, p.seconds) for p in played] == [("lte", 20), ("wifi-n", 20), ("lte", 10)]
    f.write_text("- {network: 3g, seconds: 1}\n")  # a bare list of phases is a trace too
    assert [p.network for p in load_trace(f).played()] == ["3g"]


@pytest.mark.parametrize(
    "text, words",
    [
        ("phases: []\n", "phases"),
        ("phases:\n  - {network: no-such-net, seconds: 5}\n", "no-such-net"),
        ("phases:\n  - {network: lte, seconds: -1}\n", "seconds"),
        ("phases:\n  - {network: lte, secs: 5}\n", "secs"),
        ("phases: [\n", "not YAML"),
        ("7\n", "list of phases"),
    ],
)
def test_a_bad_trace_is_one_clear_error(tmp_path, text, words):
    f = tmp_path / "t.yaml"
    f.write_text(text)
    with pytest.raises(SplitPointError, match=words):
        load_trace(f)
    r = run_cli("bench", "--trace", str(f), "-o", str(tmp_path / "out"))
    assert r.returncode != 0 and "Traceback" not in r.stderr and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def traced(tmp_path_factory, small_resnet18):
    d = tmp_path_factory.mktemp("trace")
    device = d / "slow-board.yaml"
    device.write_text(
        "name: slow-board\nrole: edge\ncpu: test board\ncores: 1\nclock_ghz: 1.0\nmemory_gb: 1\n"
        "thermal_limit_c: 80\nreference_latency_ms:\n  mobilenetv2: 40\n"
    )
    trace = d / "trace.yaml"
    trace.write_text("phases:\n  - {network: 3g, seconds: 6}\n  - {network: ethernet, seconds: 6}\n")
    cfg = TraceBenchConfig(
        trace=trace,
        models=[str(small_resnet18)],
        device=str(device),
        rate=5,
        fixed_seconds=1.0,
        profile_budget=8,
        out=d / "out",
    )
    return write_trace_report(run_trace_bench(cfg), d / "out", "splitpoint bench --trace ..."), d / "out"


def test_every_request_of_a_trace_is_answered_once(traced):
    results, _ = traced
    (m,) = results["models"].values()
    for key in ("adaptive", "bits_only"):
        run = m[key]
        assert run["requests"] == 60 and run["lost"] == 0 and run["duplicates"] == 0
        assert sorted(r["i"] for r in run["rows"]) == list(range(60))
        assert [p["network"] for p in run["phases"]] == ["3g", "ethernet"]
        assert sum(p["requests"] for p in run["phases"]) == 60
        # the link changed once, on time, on the edge's clock
        (change,) = run["reshaped"]
        assert change["network"] == "ethernet" and 5.9 <= change["t"] <= 7.0


def test_the_trace_is_judged_against_the_fixed_members(traced):
    results, out = traced
    (m,) = results["models"].values()
    labels = [x["label"] for x in m["members"]]
    assert set(m["fixed"]) == {"3g", "ethernet"}
    for net in ("3g", "ethernet"):
        assert set(m["fixed"][net]) == set(labels)
        assert all(v["lost"] == 0 and v["median_ms"] > 0 for v in m["fixed"][net].values())
    # a fixed member that sends its cut tensor is slower over 3g than over ethernet
    sends = [x for x in labels if not x.startswith("edge-only")]
    for x in sends:
        assert m["fixed"]["3g"][x]["median_ms"] > m["fixed"]["ethernet"][x]["median_ms"]
    for row in m["adaptive"]["phases"]:
        assert row["best_fixed_median_ms"] == min(v["median_ms"] for v in m["fixed"][row["network"]].values())
    assert [t["target"] for t in m["targets"]][0] == "0 lost and 0 duplicate requests"
    assert m["targets"][0]["met"] is True
    saved = json.loads((out / "results.json").read_text())
    assert saved["models"].keys() == results["models"].keys()
    md = (out / "report.md").read_text()
    assert "| phase | network |" in md and "adaptive median" in md
    assert (out / saved["plots"][0]).stat().st_size > 10_000
