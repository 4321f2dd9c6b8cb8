"""The shipped network and device profiles load, carry sources, and bad ones are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitpoint.core.errors import ProfileError
from splitpoint.profiles.schema import PACKAGE_DIR, load_device, load_network, network_names

REQUIRED_NETWORKS = {"3g", "lte", "lte-congested", "wifi-n", "wifi6", "5g", "ethernet"}


def test_required_network_profiles_ship_with_sources():
    assert set(network_names()) >= REQUIRED_NETWORKS
    for name in network_names():
        net = load_network(name)
        assert net.name == name
        text = (PACKAGE_DIR / "networks" / f"{name}.yaml").read_text()
        for field in ("uplink_mbps", "downlink_mbps", "rtt_ms", "jitter_ms", "loss"):
            line = next(x for x in text.splitlines() if x.startswith(field))
            assert "#" in line, f"{name}.{field} has no source comment"
    # slower links really are slower
    assert (
        load_network("3g").uplink_mbps < load_network("lte").uplink_mbps < load_network("wifi-n").uplink_mbps
    )
    assert load_network("lte-congested").uplink_mbps < load_network("lte").uplink_mbps


def test_transfer_time_is_derived_from_the_profile():
    lte = load_network("lte")
    # 1 MB up at 5.85 Mbit/s = 1367.5 ms, plus one RTT
    assert lte.transfer_ms(1e6) == pytest.approx(8e6 / 5.85e6 * 1e3 + lte.rtt_ms)


@pytest.mark.parametrize("name", ["rpi4", "rpi5", "jetson-orin-nano", "gpu-server"])
def test_device_profiles(name):
    d = load_device(name)
    assert d.cores >= 1 and d.memory_gb > 0 and d.thermal_limit_c > 30


@pytest.mark.parametrize(
    "body,message",
    [
        (
            "name: x\nuplink_mbps: -3\ndownlink_mbps: 1\nrtt_ms: 1\njitter_ms: 0\nloss: 0\n",
            "field 'uplink_mbps': Input should be greater than 0",
        ),
        (
            "name: x\nuplink_mbps: fast\ndownlink_mbps: 1\nrtt_ms: 1\njitter_ms: 0\nloss: 0\n",
            "field 'uplink_mbps'",
        ),
        (
            "name: x\nuplink_mbps: 1\ndownlink_mbps: 1\nrtt_ms: 1\njitter_ms: 0\nloss: 0.9\n",
            "field 'loss': Input should be less than or equal to 0.5",
        ),
        (
            "name: x\nuplink_mbps: 1\ndownlink_mbps: 1\njitter_ms: 0\nloss: 0\n",
            "field 'rtt_ms': Field required",
        ),
        (
            "name: x\nuplink_mbps: 1\ndownlink_mbps: 1\nrtt_ms: 1\njitter_ms: 0\nloss: 0\nbandwith: 3\n",
            "field 'bandwith': Extra inputs",
        ),
        ("name: [unclosed\n", "not valid YAML"),
        ("- a list\n", "expected a mapping"),
    ],
)
def test_bad_network_profile_names_field_and_file(tmp_path, body, message):
    p = tmp_path / "net.yaml"
    p.write_text(body)
    with pytest.raises(ProfileError) as e:
        load_network(p)
    assert message in str(e.value) and str(p) in str(e.value)


def test_unknown_profile_name_lists_known():
    with pytest.raises(ProfileError, match="no network profile named 'dialup'.*lte"):
        load_network("dialup")
    with pytest.raises(ProfileError, match="profile file not found"):
        load_network(Path("/nonexistent/x.yaml"))


@pytest.mark.parametrize(
    "text, words",
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"a": 1e999}', "past the largest number"),
        ('{"a": -1e999}', "past the largest number"),
        ('{"a": NaN}', "NaN is not a JSON value"),
    ],
)
def test_json_a_parser_would_take_as_infinite_or_too_deep_is_refused(text, words):
    """Python's json reads 1e999 as infinity (and the NaN/Infinity checks never see it), and a file of
    100,000 brackets is a RecursionError traceback."""
    from splitpoint.core.textfiles import load_json

    with pytest.raises(ValueError, match=words):
        load_json(text)
    assert load_json('{"a": 1e300, "b": -2.5e-300}') == {"a": 1e300, "b": -2.5e-300}


def test_yaml_nested_too_deeply_is_a_yaml_error():
    import yaml

    from splitpoint.core.textfiles import load_yaml

    with pytest.raises(yaml.YAMLError, match="nested too deeply"):
        load_yaml("[" * 100_000 + "]" * 100_000)


def test_a_profile_past_its_size_limit_is_refused_unread(tmp_path, monkeypatch):
    """A 300 MB profile was parsed whole; one past the limit is refused from its size (a sparse file of
    a gigabyte costs nothing to make and would cost a gigabyte to read)."""
    from splitpoint.profiles.schema import MAX_PROFILE_BYTES, load_measured

    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(MAX_PROFILE_BYTES + 1)
    with pytest.raises(ProfileError, match=f"{MAX_PROFILE_BYTES + 1:,} bytes is larger than any profile"):
        load_measured(big)
    (tmp_path / "d.json").mkdir()
    with pytest.raises(ProfileError, match="is a directory, not a profile file"):
        load_measured(tmp_path / "d.json")
