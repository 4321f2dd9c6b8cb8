"""Print pip constraints that pin every direct dependency to its declared floor: ``name>=X`` (with or without
an upper bound) becomes ``name==X``, so the floors in pyproject.toml are installed and tested, not assumed."""

import re
import sys
import tomllib
from pathlib import Path

deps = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]["dependencies"]
for dep in deps:
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)\s*(,.*)?", dep)
    if m is None:
        sys.exit(f"{dep!r} declares no floor (name>=version): .ci/floors cannot test it")
    print(f"{m[1]}=={m[2]}")
