"""The README's main command, at a small scale: profile, plan, serve, run over an emulated link,
telemetry through a real mosquitto, everything shut down afterwards."""

from __future__ import annotations

from splitpoint.app.demo import DemoConfig, run_demo


def test_demo_runs_end_to_end_and_cleans_up(tmp_path, mosquitto, small_resnet18):
    model = small_resnet18
    lines: list[str] = []
    s = run_demo(
        DemoConfig(
            model=str(model), network="lte", requests=20, budget=8, mqtt=mosquitto, workdir=tmp_path / "work"
        ),
        say=lambda *a: lines.append(" ".join(map(str, a))),
    )
    assert s["fallbacks"] == 0 and s["throughput_measured_ips"] > 0
    assert {"demo-edge", "demo-server"} <= set(s["telemetry_devices"])
    assert any("link proxy" in line for line in lines)  # the network profile was applied to real traffic
    stages = {name: (pred, meas) for name, pred, meas in s["stages"]}
    assert stages["end to end"][1] > 0 and stages["end to end"][0] > 0
    if s["pick"].startswith(("cut", "server-only")):
        # the lte link's RTT alone is 70 ms: a measured network stage below it means no emulation
        assert stages["network (up + RTT + down)"][1] >= 0.9 * 70
    assert (tmp_path / "work" / "plan" / "plan.json").is_file()
