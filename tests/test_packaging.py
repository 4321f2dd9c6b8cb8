"""Once installed, everything lives under the `splitpoint` namespace."""

from __future__ import annotations

import os
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
    # the trace the docs' `bench --trace lte-wifi` names, `python -m splitpoint`, the license it declares
    assert "splitpoint/profiles/traces/lte-wifi.yaml" in names and "splitpoint/__main__.py" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    entry = [n for n in names if n.endswith("entry_points.txt")][0]
    assert "splitpoint = splitpoint.app.launch:main" in zipfile.ZipFile(wheel).read(entry).decode()
    _installed_in_another_repository_names_no_commit_of_it(wheel, tmp_path)


def _installed_in_another_repository_names_no_commit_of_it(wheel: Path, tmp_path: Path) -> None:
    """A user's environment inside their own git project: git, asked from site-packages, found that
    project, and bench reports gave its commit as SplitPoint's."""
    project = tmp_path / "project"
    site = project / ".venv" / "site-packages"
    site.mkdir(parents=True)
    zipfile.ZipFile(wheel).extractall(site)
    git = ["git", "-C", str(project), "-c", "user.name=u", "-c", "user.email=u@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    (project / "notes.txt").write_text("a user's project\n")
    subprocess.run([*git, "add", "notes.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "first"], check=True)
    theirs = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout
    code = "from splitpoint.app.bench.provenance import provenance; print(provenance()['commit'])"
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith("splitpoint ") and theirs.strip() not in r.stdout, r.stdout


def test_the_sdist_holds_the_license_docs_and_a_test_suite_that_runs(tmp_path):
    """It held the test files without their package, conftest and data (19 collection errors), and none
    of the docs the README links to."""
    import shutil
    import tarfile

    # from the tracked files alone: setuptools adds whatever an old build's egg-info lists beside them
    files = (
        subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True)
        .stdout.decode()
        .split("\0")
    )
    tree = tmp_path / "tree"
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (tree / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, tree / f)
    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "-o", str(tmp_path), str(tree)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    sdist = next(tmp_path.glob("splitpoint-*.tar.gz"))
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
        t.extractall(tmp_path / "src", filter="data")
    tracked = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "tests", "docs", "benchmarks", "LICENSE"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert tracked and [f for f in tracked if f not in names] == []
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    src = next((tmp_path / "src").iterdir())
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=src,
    )
    summary = r.stdout.strip().splitlines()[-1]
    assert r.returncode == 0 and "collected" in summary and "error" not in summary, r.stdout[-2000:]
