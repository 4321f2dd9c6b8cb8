"""The deployable plan: what the edge runs, what the server runs, and how the two meet.

Both sides read the same ``plan.json``; its id is the sha256 of its own canonical content
(files' checksums included), so a plan id names exactly one pair of models and one codec.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import OutputExistsError, PlanError
from .onnxio import sha256_file

PLAN_FORMAT = 1
PLAN_FILE = "plan.json"
HEAD_FILE = "head.onnx"  # what the edge runs
TAIL_FILE = "tail.onnx"  # what the server runs
FULL_FILE = "full.onnx"  # the unsplit model, for the edge's local fallback

# what a plan runs where
SPLIT = "split"  # head on the edge, tail on the server
SERVER_ONLY = "server-only"  # the raw inputs cross; the whole model runs on the server
EDGE_ONLY = "edge-only"  # nothing crosses
KINDS = (SPLIT, SERVER_ONLY, EDGE_ONLY)


@dataclass
class TensorSpec:
    name: str
    shape: str
    dtype: str
    bytes_per_sample: int | None = None
    side: str = ""  # inputs: "head" | "tail" | "both"; outputs: "head" | "tail"; crossing: "head" | "input"


@dataclass
class Plan:
    model_name: str
    model_sha256: str
    cut_index: int | None
    cut_tensors: list[TensorSpec]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    files: dict[str, str]  # file name -> sha256
    codec: str = "float32"
    head_weights: str = "float32"
    kind: str = "split"  # split | server-only (raw inputs cross) | edge-only (nothing crosses)
    predicted: dict = field(default_factory=dict)  # labelled figures from the planner
    front: list = field(default_factory=list)
    format_version: int = PLAN_FORMAT
    plan_id: str = ""

    def content_id(self) -> str:
        d = asdict(self)
        d.pop("plan_id")
        return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict, where: str = "plan") -> Plan:
        if not isinstance(d, dict):
            raise PlanError(f"{where}: expected a JSON object")
        if d.get("format_version") != PLAN_FORMAT:
            raise PlanError(
                f"{where}: unsupported plan format_version {d.get('format_version')!r} (this build reads "
                f"{PLAN_FORMAT})"
            )
        try:
            d = dict(d)
            for key in ("cut_tensors", "inputs", "outputs"):
                d[key] = [TensorSpec(**t) for t in d[key]]
            plan = cls(**d)
        except (TypeError, KeyError) as exc:
            raise PlanError(f"{where}: malformed plan ({exc})") from exc
        if plan.plan_id != plan.content_id():
            raise PlanError(f"{where}: plan_id does not match the plan's content (edited or corrupt)")
        return plan

    @classmethod
    def load(cls, plan_dir: str | Path, verify: bool = True) -> Plan:
        p = Path(plan_dir) / PLAN_FILE
        if not p.is_file():
            raise PlanError(f"no {PLAN_FILE} in {plan_dir}")
        try:
            d = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PlanError(f"{p}: not valid JSON ({exc})") from exc
        plan = cls.from_dict(d, where=str(p))
        if verify:
            plan.verify(plan_dir)
        return plan

    def verify(self, plan_dir: str | Path) -> None:
        for name, digest in self.files.items():
            f = Path(plan_dir) / name
            if not f.is_file():
                raise PlanError(f"plan {self.plan_id[:12]}: file {name} is missing from {plan_dir}")
            actual = sha256_file(f)
            if actual != digest:
                raise PlanError(
                    f"plan {self.plan_id[:12]}: checksum mismatch for {name} "
                    f"(expected {digest[:12]}…, found {actual[:12]}…)"
                )


def verify_pushed(files: dict[str, bytes]) -> Plan:
    """A plan sent over the wire (plan.json plus the files it lists), checked against its own
    checksums before anything is written: the server and the edge daemon accept pushes alike."""
    if PLAN_FILE not in files:
        raise PlanError("pushed plan has no plan.json")
    try:
        plan = Plan.from_dict(json.loads(files[PLAN_FILE]), where="pushed plan")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PlanError(f"pushed plan.json is not valid JSON: {exc}") from exc
    extra = set(files) - set(plan.files) - {PLAN_FILE}
    if extra:
        raise PlanError(f"pushed plan carries files it does not list: {sorted(extra)}")
    for name, digest in plan.files.items():
        if name not in files:
            raise PlanError(f"pushed plan is missing {name}")
        if hashlib.sha256(files[name]).hexdigest() != digest:
            raise PlanError(f"pushed plan: checksum mismatch for {name}")
    return plan


def write_files_atomically(target: str | Path, files: dict[str, bytes]) -> Path:
    def write(tmp: Path) -> None:
        for name, data in files.items():
            (tmp / name).write_bytes(data)

    return write_dir_atomically(target, write, force=True)


def write_dir_atomically(target: str | Path, write, force: bool = False) -> Path:
    """Run ``write(tmpdir)`` and move the result to ``target`` in one rename.

    A failure or Ctrl-C leaves the previous content (or nothing) in place, never half a plan.
    """
    target = Path(target)
    if target.exists():
        if not target.is_dir():
            raise OutputExistsError(f"output path {target} exists and is not a directory")
        if any(target.iterdir()) and not force:
            raise OutputExistsError(f"output directory {target} is not empty (use --force to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old = None
    try:
        write(tmp)
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not target.exists():
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target
