"""Print the path of a tree that mirrors the installed ``splitpoint`` package with symlinks.

The layers live in top-level folders (core/, edge/, ...) mapped into ``splitpoint.*`` by setuptools'
package-dir. Import-linter and mypy find modules by walking directories, so they need the installed
layout; symlinks keep their messages pointing at the files in this repository.
"""

import shutil
import sys
import tomllib
from pathlib import Path

root = Path(__file__).resolve().parent.parent
out = Path(sys.argv[1]) if len(sys.argv) > 1 else root / "build" / "lint"
cfg = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
shutil.rmtree(out, ignore_errors=True)
dirs = cfg["package-dir"]


def folder(package: str) -> Path:
    """A package's folder: its own mapping, or its parent's folder and its name (setuptools' rule)."""
    if package in dirs:
        return root / dirs[package]
    parent, _, name = package.rpartition(".")
    return folder(parent) / name


for package in cfg["packages"]:
    src = folder(package)
    dst = out.joinpath(*package.split("."))
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.glob("*.py"):
        (dst / f.name).symlink_to(f)
print(out)
