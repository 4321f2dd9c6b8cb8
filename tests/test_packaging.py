"""Once installed, everything lives under the `splitpoint` namespace."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_has_only_the_splitpoint_namespace(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(tmp_path.glob("splitpoint-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"splitpoint", next(t for t in top if t.endswith(".dist-info"))}
    # every module of every layer's folder, subpackages included: a folder missing from pyproject's
    # package list installs without its modules, and the CLI then fails on import
    sources = sorted(
        f"splitpoint/{py.relative_to(ROOT).as_posix()}"
        for layer in ("core", "profiles", "partitioner", "edge", "server", "app")
        for py in (ROOT / layer).rglob("*.py")
    )
    assert "splitpoint/app/cli/__init__.py" in sources
    assert [s for s in sources if s not in names] == []
    assert (
        "splitpoint/profiles/networks/lte.yaml" in names and "splitpoint/profiles/devices/rpi4.yaml" in names
    )
    entry = [n for n in names if n.endswith("entry_points.txt")][0]
    assert "splitpoint = splitpoint.app.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
