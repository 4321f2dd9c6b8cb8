"""What `splitpoint plan` shows: the front plot draws the user's constraints and keeps "nothing sent"
apart from the log bytes axis; the table marks what each row misses and folds candidates alike in
every figure into one row."""

from __future__ import annotations

import pytest
from rich.console import Console

from splitpoint.app.console import fold_alike, front_table
from splitpoint.core.plan import EDGE_ONLY, SERVER_ONLY, SPLIT
from splitpoint.partitioner.costmodel import CandidateInput, Link, evaluate
from splitpoint.partitioner.pareto import Constraints, front, pick

pytest.importorskip("matplotlib")

LTE = Link("lte", 5.85, 20.0, 70.0)


def ci(kind=SPLIT, cut=5, codec="int8", head=10.0, tail=5.0, up=10_000, mem=1 << 20, fid=1.0):
    return CandidateInput(kind, cut, codec, "float32", head, tail, 1.0, 0.5, up, 4_000, mem, fid)


def candidates():
    edge = CandidateInput(EDGE_ONLY, None, "float32", "float32", 300.0, 0, 0, 0, 0, 0, 100 << 20, 1.0)
    cands = [
        evaluate(edge, LTE),
        evaluate(ci(kind=SERVER_ONLY, cut=0, codec="float32", head=0, up=600_000, mem=0), LTE),
        evaluate(ci(kind=SERVER_ONLY, cut=0, codec="int4+zstd", head=0, up=20_000, mem=0, fid=0.25), LTE),
        # two cuts a fused node apart: equal in every objective, so both stay on the front
        evaluate(ci(cut=42, head=150.0, up=50_000, mem=30 << 20), LTE),
        evaluate(ci(cut=43, head=150.0, up=50_000, mem=30 << 20), LTE),
        evaluate(ci(cut=10, head=40.0, up=80_000, mem=10 << 20, fid=0.5), LTE),
        evaluate(ci(cut=20, head=90.0, up=200_000, mem=20 << 20, fid=0.99), LTE),
    ]
    return cands


CONS = Constraints(max_latency_ms=400.0, min_fidelity=0.99)


@pytest.fixture
def figure():
    import matplotlib.pyplot as plt

    from splitpoint.app.plots import front_figure

    cands = candidates()
    fig = front_figure(cands, front(cands), pick(cands, CONS), "test", CONS)
    yield fig
    plt.close(fig)


def _axes(fig):
    by_title = {ax.get_title().split(" (")[0]: ax for ax in fig.axes if ax.get_title()}
    zero = [ax for ax in fig.axes if [t.get_text() for t in ax.get_yticklabels()] == ["0 B"]]
    return by_title, zero


def _lines(ax, gid):
    return [ln for ln in ax.get_lines() if ln.get_gid() == gid]


def test_front_plot_draws_the_constraints_the_user_gave(figure):
    by_title, zero = _axes(figure)
    assert set(by_title) == {"throughput", "bytes sent", "fidelity"} and len(zero) == 1
    for ax in [*by_title.values(), *zero]:
        (line,) = _lines(ax, "max-latency")
        assert list(line.get_xdata()) == [400.0, 400.0]
    (fid,) = _lines(by_title["fidelity"], "min-fidelity")
    assert list(fid.get_ydata()) == [0.99, 0.99]
    assert not _lines(by_title["throughput"], "min-throughput")  # not given, not drawn
    assert "latency ≤ 400 ms, fidelity ≥ 0.99" in figure._suptitle.get_text()


def test_front_plot_keeps_nothing_sent_off_the_log_axis(figure):
    by_title, (zero,) = _axes(figure)
    bytes_ax = by_title["bytes sent"]
    assert bytes_ax.get_yscale() == "log"
    ys = [y for coll in bytes_ax.collections for _, y in coll.get_offsets()]
    assert ys and min(ys) >= 4_000  # every point is a real byte count: edge-only is not at 10^0
    zs = [(x, y) for coll in zero.collections for x, y in coll.get_offsets()]
    assert zs and all(y == 0 for _, y in zs)
    assert any(x == pytest.approx(300.0) for x, _ in zs)  # edge-only, at its latency, in the strip


def test_front_plot_tick_labels_do_not_overlap(figure):
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    shown = 0
    for ax in figure.axes:
        for labels, along in ((ax.get_xticklabels(which="both"), 0), (ax.get_yticklabels(which="both"), 1)):
            boxes = [t.get_window_extent(renderer) for t in labels if t.get_visible() and t.get_text()]
            boxes.sort(key=lambda bb: bb.get_points()[0][along])
            shown += len(boxes)
            for a, b in zip(boxes, boxes[1:], strict=False):
                assert not a.overlaps(b), (ax.get_title(), [t.get_text() for t in labels])
    by_title, _ = _axes(figure)
    assert len([t for t in by_title["throughput"].get_xticklabels() if t.get_text()]) >= 3
    assert shown >= 12


def _render(table) -> str:
    con = Console(record=True, width=220)
    con.print(table)
    return con.export_text()


def test_plan_table_marks_misses_and_folds_alike_candidates():
    cands = candidates()
    f = front(cands)
    p = pick(cands, CONS)
    labels = [c.label for c in f]
    assert "cut 42 int8" in labels and "cut 43 int8" in labels  # both on the front: equal objectives
    groups = fold_alike(f, p, CONS)
    assert len(groups) == len(f) - 1
    text = _render(front_table("front", f, p, CONS))
    assert text.count("cut 42 int8") == 1 and "cut 42 int8 (+1 alike: cut 43 int8)" in text
    assert "cut 43 int8 " not in text.replace("(+1 alike: cut 43 int8)", "")
    rows = {ln.split("│")[2].strip(): ln for ln in text.splitlines() if ln.startswith("│")}
    assert "✗ fidelity 0.250 < 0.99" in rows["server-only int4+zstd"]
    assert "✗ fidelity 0.500 < 0.99" in rows["cut 10 int8"]
    (starred,) = [ln for ln in rows.values() if "★" in ln]
    assert p.label == "cut 42 int8" and "cut 42 int8 (+1 alike" in starred and "✓" in starred
    slow = rows["server-only float32"]
    assert "✗ latency" in slow and "> 400 ms" in slow
    # without constraints there is nothing to mark
    assert "✗" not in _render(front_table("front", f, p)) and "constraints" not in _render(
        front_table("front", f, p)
    )


def test_the_fleet_view_says_how_long_ago_each_device_was_heard_from():
    """Figures that stop moving while the broker or a device is down must not look current."""
    from splitpoint.app.console import heard_s_ago, watch_table

    device = {"metrics": {"ts": 1000.0, "cpu_percent": 5.0}, "latency": {"ts": 1003.5, "total_ms": 40.0}}
    assert heard_s_ago(device, now=1010.0) == pytest.approx(6.5)
    assert heard_s_ago({"status": {"state": "online"}}, now=1010.0) is None  # nothing measured yet
    t = watch_table({"pi": {**device, "status": {"state": "online", "role": "edge"}}}, width=300)
    assert [c.header for c in t.columns][:2] == ["device", "heard\ns ago"]
    assert len(list(t.columns[1].cells)) == 1


def test_the_fleet_views_errors_count_the_requests_a_device_refused():
    """A server that refused 12 requests (unknown plan, malformed, busy) showed `errors 2`: its
    `rejected` count was in no column."""
    from splitpoint.app.console import _watch_row

    def errors(**metrics) -> str:
        return _watch_row({"metrics": metrics})["errors"]

    assert errors(requests=74, errors=2, rejected=12) == "14"
    assert errors(ok=3, errors=1) == "1"  # a device that does not count refusals apart
    assert errors(errors=1, rejected=-4) == "?"  # junk is not added up as if measured
    assert "host CPU %" in _watch_row({"metrics": {"cpu_percent": 5.0}})  # the host's, said so


def test_progress_on_a_log_file_is_a_line_now_and_then(monkeypatch):
    """rich draws a progress bar only on a terminal: a plan measuring fidelity for ten minutes into a log
    printed nothing. Not on a terminal, a line says where it is every PROGRESS_LINE_EVERY_S, and what ends
    sooner says nothing."""
    import io
    import time as _time

    import splitpoint.app.console as console

    log = io.StringIO()
    on = Console(file=log, force_terminal=False)
    with console.progress("fidelity", on=on) as note:
        note("cut 5", 0, 10)
        note("cut 7", 3)
    assert log.getvalue() == ""  # a second, not ten
    monkeypatch.setattr(console, "PROGRESS_LINE_EVERY_S", 0.05)
    with console.progress("fidelity", on=on) as note:
        note("cut 5", 0, 10)
        _time.sleep(0.06)
        note("cut 7", 3)
        note("cut 8", advance=1)
        _time.sleep(0.06)
        note("cut 9", advance=1)
    lines = log.getvalue().splitlines()
    assert [line.rsplit(" (", 1)[0] for line in lines] == ["fidelity cut 7 3/10", "fidelity cut 9 5/10"], (
        lines
    )
