"""The deployable plan: what the edge runs, what the server runs, and how the two meet.

Both sides read the same ``plan.json`` through one strict model (``Plan``): every field is typed and
range-checked, unknown fields are refused, and the id is the sha256 of the plan's own canonical content
(files' checksums included), so a plan id names exactly one pair of models and one codec. A plan that
arrives over the network is checked completely in a temporary directory (checksums, then every model
loaded by the caller) before it is moved into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .config import explain_fields
from .errors import OutputExistsError, PlanError
from .onnxio import sha256_file

PLAN_FORMAT: Final = 1
PLAN_FILE = "plan.json"
HEAD_FILE = "head.onnx"  # what the edge runs
TAIL_FILE = "tail.onnx"  # what the server runs
FULL_FILE = "full.onnx"  # the unsplit model, for the edge's local fallback

# what a plan runs where
SPLIT: Final = "split"  # head on the edge, tail on the server
SERVER_ONLY: Final = "server-only"  # the raw inputs cross; the whole model runs on the server
EDGE_ONLY: Final = "edge-only"  # nothing crosses
KINDS = (SPLIT, SERVER_ONLY, EDGE_ONLY)
ROLES = ("edge", "server")  # who holds which files: see Plan.files_for
Kind = Literal["split", "server-only", "edge-only"]

MAX_PLAN_BYTES = 16 * 2**20  # plan.json is metadata: a larger one is refused before parsing
MAX_FILES = 64
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
DTYPES = ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, strict=True)


class TensorSpec(_Strict):
    """A model input or output, or a tensor that crosses the cut."""

    name: str = Field(min_length=1, max_length=1024)
    shape: str = Field(max_length=1024)  # e.g. "N x 64 x 28 x 28" written "Nx64x28x28"; "?" unknown
    dtype: str
    bytes_per_sample: int | None = Field(default=None, ge=0)
    # inputs: "head" | "tail" | "both"; outputs: "head" | "tail"; crossing: "head" | "input"
    side: Literal["head", "tail", "both", "input", ""] = ""

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v not in DTYPES:
            raise ValueError(f"dtype {v!r} is not one of {', '.join(DTYPES)}")
        return v


def plain_file_name(name: str) -> str:
    """A file name a plan may carry: no directories, no leading dot, no odd characters."""
    if not _FILE_NAME.match(name) or name in (".", ".."):
        raise PlanError(f"file name {name[:80]!r} is not a plain name (letters, digits, '.', '_', '-')")
    return name


class Plan(_Strict):
    model_name: str = Field(min_length=1, max_length=256)
    model_sha256: str = Field(pattern=_SHA256.pattern)
    cut_index: int | None = Field(ge=0)
    cut_tensors: list[TensorSpec] = Field(max_length=1024)
    inputs: list[TensorSpec] = Field(min_length=1, max_length=1024)
    outputs: list[TensorSpec] = Field(min_length=1, max_length=1024)
    files: dict[str, str] = Field(max_length=MAX_FILES)  # file name -> sha256
    codec: str = "float32"
    head_weights: Literal["float32", "int8"] = "float32"
    kind: Kind = SPLIT
    input_shapes: dict[str, list[int]] = Field(default_factory=dict)  # the model's inputs fixed to these
    predicted: dict[str, Any] = Field(default_factory=dict)  # labelled figures from the planner
    front: list[Any] = Field(default_factory=list)
    format_version: Literal[1] = PLAN_FORMAT
    plan_id: str = ""

    @field_validator("files")
    @classmethod
    def _files(cls, v: dict[str, str]) -> dict[str, str]:
        for name, digest in v.items():
            try:
                plain_file_name(name)
            except PlanError as exc:
                raise ValueError(str(exc)) from exc
            if not _SHA256.match(digest):
                raise ValueError(f"checksum of {name} is not a sha256 hex digest")
        return v

    @field_validator("codec")
    @classmethod
    def _codec(cls, v: str) -> str:
        from .codecs import Codec, CodecError

        try:
            return Codec.parse(v).name
        except CodecError as exc:
            raise ValueError(str(exc)) from exc

    @model_validator(mode="after")
    def _consistent(self) -> Plan:
        needs = {SPLIT: {HEAD_FILE, TAIL_FILE}, SERVER_ONLY: {TAIL_FILE}, EDGE_ONLY: {HEAD_FILE}}[self.kind]
        missing = needs - set(self.files)
        if missing:
            raise ValueError(f"a {self.kind} plan needs {', '.join(sorted(missing))} in files")
        if (self.kind == EDGE_ONLY) != (not self.cut_tensors):
            raise ValueError("an edge-only plan sends nothing; every other plan sends some tensors")
        names = [t.name for t in self.cut_tensors]
        if len(set(names)) != len(names):
            raise ValueError("cut tensor names repeat")
        return self

    def files_for(self, role: str | None, fallback: bool = True) -> set[str]:
        """The files a device in ``role`` holds (all of them for None): the edge its head, and the whole
        model when it may fall back; the server its tail. A model's external data goes with it."""
        if role is None:
            return set(self.files)
        if role not in ROLES:
            raise PlanError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
        models = {TAIL_FILE} if role == "server" else {HEAD_FILE} | ({FULL_FILE} if fallback else set())
        return {n for n in self.files if n in models or any(n.startswith(m + ".") for m in models)}

    def content_id(self) -> str:
        """sha256 (hex) of the canonical JSON of everything but ``plan_id``: keys sorted, no spaces."""
        d = self.model_dump(mode="json", exclude={"plan_id"})
        return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"

    @classmethod
    def parse(cls, data: bytes | str, where: str = "plan") -> Plan:
        """Parse and check plan.json's bytes: strict types, its id matching its content."""
        if len(data) > MAX_PLAN_BYTES:
            raise PlanError(f"{where}: {len(data)} bytes is larger than any plan ({MAX_PLAN_BYTES} at most)")
        try:
            raw = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise PlanError(f"{where}: not valid JSON ({str(exc)[:200]})") from exc
        if not isinstance(raw, dict):
            raise PlanError(f"{where}: expected a JSON object, found {type(raw).__name__}")
        if raw.get("format_version") != PLAN_FORMAT:
            raise PlanError(
                f"{where}: unsupported plan format_version {str(raw.get('format_version'))[:20]!r} "
                f"(this build reads {PLAN_FORMAT})"
            )
        try:
            plan = cls.model_validate(raw)
        except ValidationError as exc:
            raise PlanError(f"{where}: malformed plan: {explain_fields(exc)}") from exc
        if plan.plan_id != plan.content_id():
            raise PlanError(f"{where}: plan_id does not match the plan's content (edited or corrupt)")
        return plan

    @classmethod
    def load(cls, plan_dir: str | Path, verify: bool = True, role: str | None = None) -> Plan:
        """plan.json, checked; with ``verify``, every file ``role`` needs present and every file present
        matching its checksum (a device's directory holds only its role's files)."""
        p = Path(plan_dir) / PLAN_FILE
        if not p.is_file():
            raise PlanError(f"no {PLAN_FILE} in {plan_dir}")
        plan = cls.parse(p.read_bytes(), where=str(p))
        if verify:
            plan.verify(plan_dir, role)
        return plan

    def verify(self, plan_dir: str | Path, role: str | None = None) -> None:
        need = self.files_for(role, fallback=False)
        for name, digest in self.files.items():
            f = Path(plan_dir) / name
            if not f.is_file():
                if name not in need:
                    continue
                raise PlanError(f"plan {self.plan_id[:12]}: file {name} is missing from {plan_dir}")
            actual = sha256_file(f)
            if actual != digest:
                raise PlanError(
                    f"plan {self.plan_id[:12]}: checksum mismatch for {name} "
                    f"(expected {digest[:12]}…, found {actual[:12]}…)"
                )


def verify_pushed(files: dict[str, bytes], role: str | None = None) -> Plan:
    """A plan sent over the wire (plan.json plus the files ``role`` needs, or all it lists), checked
    against its own checksums before anything is written: the server and the edge daemon accept pushes
    alike."""
    if PLAN_FILE not in files:
        raise PlanError("pushed plan has no plan.json")
    for name in files:
        plain_file_name(name)
    plan = Plan.parse(files[PLAN_FILE], where="pushed plan")
    extra = set(files) - set(plan.files) - {PLAN_FILE}
    if extra:
        raise PlanError(f"pushed plan carries files it does not list: {sorted(extra)[:8]}")
    need = plan.files_for(role, fallback=False)
    for name, digest in plan.files.items():
        if name not in files:
            if name not in need:
                continue
            raise PlanError(f"pushed plan is missing {name}")
        if hashlib.sha256(files[name]).hexdigest() != digest:
            raise PlanError(f"pushed plan: checksum mismatch for {name}")
    return plan


T = TypeVar("T")


def install_pushed(
    files: dict[str, bytes], plans_dir: Path, load: Callable[[Path, Plan], T], role: str | None = None
) -> tuple[Plan, T, Path]:
    """Verify a pushed plan, write it to a temporary directory in ``plans_dir``, ``load`` it from there
    (build every session: a garbage model with a matching checksum fails here), and only then rename it
    to ``plans_dir/<first 16 hex of its id>``. Any failure leaves nothing behind and the previous content
    of that directory untouched. Returns the plan, what ``load`` returned and where the plan now is."""
    plan = verify_pushed(files, role)
    target = Path(plans_dir) / plan.plan_id[:16]
    loaded: list[T] = []

    def write(tmp: Path) -> None:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        try:
            loaded.append(load(tmp, plan))
        except PlanError:
            raise
        except Exception as exc:  # onnxruntime and onnx raise their own types for a bad model
            raise PlanError(
                f"pushed plan {plan.plan_id[:12]} does not load: {type(exc).__name__}: {exc}"
            ) from exc

    write_dir_atomically(target, write, force=True)
    return plan, loaded[0], target


def write_dir_atomically(target: str | Path, write: Callable[[Path], None], force: bool = False) -> Path:
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
