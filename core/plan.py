"""The deployable plan: which device runs which segment of the model, and how the segments meet.

A plan is a chain of *stages*, one per device in order: stage 0 on the edge, the last on the server,
relays in between. Each stage runs its segment of the model (or nothing, and forwards what it
receives), sends the tensors that cross its cut to the next stage with its own codec, and returns
the model outputs it computes with the reply. The two-stage plan (edge, server) is the chain of
two; format 1 files, which described exactly that pair, are read as one and keep their ids.

Every device reads the same ``plan.json`` through one strict model (``Plan``): every field is typed
and range-checked, unknown fields are refused, and the id is the sha256 of the plan's own canonical
content (files' checksums included), so a plan id names exactly one set of models and codecs. A plan
that arrives over the network is checked completely in a temporary directory (checksums, then every
model loaded by the caller) before it is moved into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .codecs import DTYPES
from .config import MAX_BYTES, explain_fields
from .errors import ConfigError, OutputExistsError, PlanError, SplitPointError, unsupported_version
from .files import (
    cannot_write_in,
    current_umask,
    name_too_long,
    naming,
    read_at_most,
    sync_dir,
    sync_tree,
    writer_gone,
    writer_tag,
)
from .onnxio import sha256_file
from .textfiles import DuplicateKeyError, load_json

log = logging.getLogger("splitpoint.plan")

PLAN_FORMAT: Final = 2
READS_FORMATS = (1, 2)  # format 1: the two-stage plan before chains, converted on reading
PLAN_FILE = "plan.json"
HEAD_FILE = "head.onnx"  # what the edge (stage 0) runs
TAIL_FILE = "tail.onnx"  # what the server (the last stage) runs
FULL_FILE = "full.onnx"  # the unsplit model, for the edge's local fallback
MAX_STAGES = 17  # 16 hops, as far as PipeEdge goes


def stage_file(i: int, n: int) -> str:
    """The file of stage ``i`` of ``n``: head.onnx first, tail.onnx last, stageI.onnx between."""
    return HEAD_FILE if i == 0 else TAIL_FILE if i == n - 1 else f"stage{i}.onnx"


# what a plan runs where (by its first stage)
SPLIT: Final = "split"  # the edge runs the first segment, later stages the rest
SERVER_ONLY: Final = "server-only"  # the raw inputs cross; the edge runs nothing
EDGE_ONLY: Final = "edge-only"  # one stage: nothing crosses
KINDS = (SPLIT, SERVER_ONLY, EDGE_ONLY)
ROLES = ("edge", "server")  # and "stage-I" for stage I of a chain: see Plan.files_for
Kind = Literal["split", "server-only", "edge-only"]

MAX_PLAN_BYTES = 16 * 2**20  # plan.json is metadata: a larger one is refused before parsing
MAX_FILES = 64  # files a plan lists (and a deploy carries besides plan.json)
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, strict=True, defer_build=True)


class TensorSpec(_Strict):
    """A model input or output, or a tensor that crosses a cut."""

    name: str = Field(min_length=1, max_length=1024)
    shape: str = Field(max_length=1024)  # e.g. "N x 64 x 28 x 28" written "Nx64x28x28"; "?" unknown
    dtype: str
    bytes_per_sample: int | None = Field(default=None, ge=0, le=MAX_BYTES)
    # inputs: "head" | "tail" | "both"; outputs: "head" | "tail"; crossing: "head" | "input"
    side: Literal["head", "tail", "both", "input", ""] = ""

    @field_validator("shape")
    @classmethod
    def _shape(cls, v: str) -> str:
        # sizes are counts (a symbol such as N or max_len stands for one): a negative or a 20-digit size
        # was taken and reached the fit check only
        for part in v.split("x"):
            if re.fullmatch(r"[-+]?\d+", part.strip()) and not 0 <= int(part) <= 2**40:
                raise ValueError(f"shape {v[:80]!r} has a size of {part[:24]}: sizes are 0 to 2^40")
        return v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v not in DTYPES:
            raise ValueError(f"dtype {v!r} is not one of {', '.join(DTYPES)}")
        return v


def plain_file_name(name: str) -> str:
    """A file name a plan may carry: no directories, no leading dot, no odd characters."""
    if not _FILE_NAME.match(name) or name in (".", ".."):
        raise PlanError(
            f"file name {name[:80]!r} is not a plain name (1 to 128 letters, digits, '.', '_', '-'; not "
            "starting with '.', '_' or '-')"
        )
    return name


def _codec_name(v: str) -> str:
    from .codecs import Codec, CodecError

    try:
        return Codec.parse(v).name
    except CodecError as exc:
        raise ValueError(str(exc)) from exc


class Stage(_Strict):
    """One device's part: the segment it runs, what it receives, sends and returns."""

    file: str | None = None  # its segment; None: it runs nothing and forwards what it receives
    device: str = Field("", max_length=256)  # the device profile it was planned for ("" if none was named)
    weights: Literal["float32", "int8", "int4"] = "float32"  # int4: MatMulNBits (decoder heads)
    # the cut (prefix index) it ends at; None for the last stage, or a cut named by tensors that is no prefix
    end: int | None = Field(default=None, ge=0, le=2**31)
    receives: list[TensorSpec] = Field(default_factory=list, max_length=1024)  # the previous stage's sends
    sends: list[TensorSpec] = Field(default_factory=list, max_length=1024)  # to the next stage
    codec: str = "float32"  # for what it sends
    produces: list[str] = Field(default_factory=list, max_length=1024)  # model outputs computed here

    @field_validator("codec")
    @classmethod
    def _codec(cls, v: str) -> str:
        return _codec_name(v)


# a decoder part's cache inputs, as onnxruntime-genai names them: the layer index and key or value
PAST_RE = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


class DecoderInfo(_Strict):
    """A decoder-only transformer split between layers: the edge runs the first ``edge_layers`` (with the
    embedding), the server the rest (with the output head). Each side keeps the KV cache of its own
    layers, per sequence: the server in a session (docs/protocol.md, "Decoder sessions")."""

    layers: int = Field(ge=2, le=1024)
    edge_layers: int = Field(ge=1, le=1023)
    heads: int = Field(ge=1, le=1024)
    head_dim: int = Field(ge=1, le=65536)
    hidden: int = Field(ge=1, le=1 << 20)
    vocab: int = Field(ge=2, le=1 << 24)
    max_len: int = Field(ge=1, le=1 << 20)  # positions the model has: prompt + generated tokens

    @model_validator(mode="after")
    def _split(self) -> DecoderInfo:
        if not self.edge_layers < self.layers:
            raise ValueError(
                f"edge_layers {self.edge_layers} must leave the server at least one of {self.layers}"
            )
        return self


class Plan(_Strict):
    model_name: str = Field(min_length=1, max_length=256)
    model_sha256: str = Field(pattern=_SHA256.pattern)
    inputs: list[TensorSpec] = Field(min_length=1, max_length=1024)
    outputs: list[TensorSpec] = Field(min_length=1, max_length=1024)
    stages: list[Stage] = Field(min_length=1, max_length=MAX_STAGES)
    files: dict[str, str] = Field(max_length=MAX_FILES)  # file name -> sha256
    kind: Kind = SPLIT
    input_shapes: dict[str, list[int]] = Field(default_factory=dict)  # the model's inputs fixed to these
    predicted: dict[str, Any] = Field(default_factory=dict)  # labelled figures from the planner
    front: list[Any] = Field(default_factory=list)
    decoder: DecoderInfo | None = None  # a decoder split: the server holds a KV-cache session per sequence
    format_version: Literal[2] = PLAN_FORMAT
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

    @model_validator(mode="after")
    def _consistent(self) -> Plan:
        st, n = self.stages, len(self.stages)
        kind = EDGE_ONLY if n == 1 else SPLIT if st[0].file else SERVER_ONLY
        if self.kind != kind:
            raise ValueError(f"a plan whose stages are as given is {kind}, not {self.kind}")
        if st[0].receives:
            raise ValueError("stage 0 reads the model's inputs: it receives nothing")
        if st[-1].sends or st[-1].end is not None:
            raise ValueError("the last stage sends nothing on and ends at no cut")
        if n > 1 and not st[-1].file:
            raise ValueError("the last stage must run a segment")
        if n == 1 and not st[0].file:
            raise ValueError("a one-stage plan must run the model")
        seen_files: set[str] = set()
        for i, s in enumerate(st):
            if s.file is not None:
                if s.file not in self.files:
                    raise ValueError(f"stage {i} runs {s.file}, which files does not list")
                if s.file in seen_files:
                    raise ValueError(f"two stages run {s.file}")
                seen_files.add(s.file)
            if i < n - 1:
                if not s.sends:
                    raise ValueError(f"stage {i} sends nothing to stage {i + 1}")
                names = [t.name for t in s.sends]
                if len(set(names)) != len(names):
                    raise ValueError(f"stage {i}: sent tensor names repeat")
                if names != [t.name for t in st[i + 1].receives]:
                    raise ValueError(f"stage {i + 1} must receive exactly what stage {i} sends, in order")
        ends = [s.end for s in st[:-1]]
        if any(b < a for a, b in zip(ends, ends[1:], strict=False) if a is not None and b is not None):
            raise ValueError("the stages' cuts must not go backwards")
        if self.decoder is not None and (n != 2 or self.kind != SPLIT):
            raise ValueError("a decoder plan has two stages, the edge's layers and the server's")
        produced = [o for s in st for o in s.produces]
        if sorted(produced) != sorted(o.name for o in self.outputs):
            raise ValueError("the stages must produce every model output exactly once")
        return self

    # -- the first hop, as the edge sees it (the whole plan when there are two stages) -----------
    @property
    def cut_index(self) -> int | None:
        return self.stages[0].end

    @property
    def cut_tensors(self) -> list[TensorSpec]:
        return self.stages[0].sends

    @property
    def codec(self) -> str:
        return self.stages[0].codec

    @property
    def head_weights(self) -> str:
        return self.stages[0].weights

    @property
    def hops(self) -> int:
        return len(self.stages) - 1

    def stage_of(self, role: str) -> int | None:
        """The stage a device in ``role`` runs: edge 0, server the last, "stage-I" stage I (None: none)."""
        if role == "edge":
            return 0
        if role == "server":
            return len(self.stages) - 1 if len(self.stages) > 1 else None
        if role.startswith("stage-") and role[6:].isdigit():
            i = int(role[6:])
            if 0 <= i < len(self.stages):
                return i
            raise PlanError(f"plan {self.plan_id[:12]} has stages 0 to {len(self.stages) - 1}, not {i}")
        raise PlanError(f"unknown role {role!r}; one of {', '.join(ROLES)} or stage-I")

    def files_for(self, role: str | None, fallback: bool = True) -> set[str]:
        """The files a device in ``role`` holds (all of them for None): its stage's segment, and on the
        edge the whole model when it may fall back. A model's external data goes with it."""
        if role is None:
            return set(self.files)
        i = self.stage_of(role)
        models = set() if i is None or self.stages[i].file is None else {self.stages[i].file}
        if role == "edge" and fallback:
            models.add(FULL_FILE)
        return {n for n in self.files if n in models or any(n.startswith(f"{m}.") for m in models)}

    def content_id(self) -> str:
        """sha256 (hex) of the canonical JSON of everything but ``plan_id``: keys sorted, no spaces."""
        # a plan without a decoder hashes as it did before the field existed: its id does not change
        skip = {"plan_id"} | ({"decoder"} if self.decoder is None else set())
        return _canonical_id(self.model_dump(mode="json", exclude=skip))

    def to_json(self) -> str:
        # no "decoder": null: the file hashes to its id by protocol.md's recipe, field for field
        return self.model_dump_json(indent=2, exclude={"decoder"} if self.decoder is None else None) + "\n"

    @classmethod
    def parse(cls, data: bytes | str, where: str = "plan") -> Plan:
        """Parse and check plan.json's bytes: strict types, its id matching its content."""
        raw = json_object(data, where, "plan")
        version = raw.get("format_version")
        if type(version) is not int or version not in READS_FORMATS:  # not 2.0, not True
            raise PlanError(f"{where}: {unsupported_version('plan format_version', version, READS_FORMATS)}")
        if version == 1:  # its id covers its own content: checked as written, then converted
            if raw.get("plan_id") != _canonical_id({k: v for k, v in raw.items() if k != "plan_id"}):
                raise PlanError(f"{where}: plan_id does not match the plan's content (edited or corrupt)")
            try:
                raw = from_format_1(raw)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise PlanError(f"{where}: malformed format-1 plan: {exc}") from exc
        try:
            plan = cls.model_validate(raw)
        except ValidationError as exc:
            raise PlanError(f"{where}: malformed plan: {explain_fields(exc)}") from exc
        # the recipe applied to the file as written (a client that kept a "decoder": null) holds too
        if (
            version == PLAN_FORMAT
            and plan.plan_id != plan.content_id()
            and plan.plan_id != _canonical_id({k: v for k, v in raw.items() if k != "plan_id"})
        ):
            raise PlanError(f"{where}: plan_id does not match the plan's content (edited or corrupt)")
        return plan

    @classmethod
    def load(cls, plan_dir: str | Path, verify: bool = True, role: str | None = None) -> Plan:
        """plan.json, checked; with ``verify``, every file ``role`` needs present and every file present
        matching its checksum (a device's directory holds only its role's files)."""
        p = Path(plan_dir) / PLAN_FILE
        if not p.is_file():
            if (Path(plan_dir) / "planset.json").is_file():
                raise PlanError(
                    f"{plan_dir} is a plan set, not one plan: the adaptive client "
                    "(splitpoint.edge.adaptive.AdaptiveClient) runs a set; give one member's directory "
                    "to run that plan alone"
                )
            if Path(plan_dir).is_file():
                raise PlanError(f"{plan_dir} is a file: give the plan's directory")
            if not Path(plan_dir).exists():
                raise PlanError(f"{plan_dir} does not exist: give a plan's directory (one `plan -o` wrote)")
            try:  # a subfolder this user cannot enter (an SD card's lost+found) is no plan of theirs
                inside = sorted(
                    d.name
                    for d in Path(plan_dir).iterdir()
                    if not d.name.startswith(".") and os.access(d, os.X_OK) and (d / PLAN_FILE).is_file()
                )
            except OSError:
                inside = []
            if inside:
                raise PlanError(
                    f"{plan_dir} is a folder of plans, not one plan: give one of them, e.g. "
                    f"{Path(plan_dir) / inside[0]} ({len(inside)} in all)"
                )
            if p.is_symlink() and not p.exists():
                raise PlanError(f"{p} is a symbolic link to nothing")
            if os.path.lexists(p):
                raise PlanError(f"{p} is not a file")
            raise PlanError(f"no {PLAN_FILE} in {plan_dir}")
        plan = cls.parse(read_plan_file(p, "plan"), where=str(p))
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
                how = (
                    "is a symbolic link to nothing in"
                    if f.is_symlink() and not f.exists()
                    else "is not a file in"  # a directory, say
                    if os.path.lexists(f)
                    else "is missing from"
                )
                raise PlanError(f"plan {self.plan_id[:12]}: file {name} {how} {plan_dir}")
            actual = sha256_file(f)
            if actual != digest:
                raise PlanError(
                    f"plan {self.plan_id[:12]}: checksum mismatch for {name} "
                    f"(expected {digest[:12]}…, found {actual[:12]}…)"
                )


def read_plan_file(path: Path, what: str) -> bytes:
    """A plan file's bytes, refused past MAX_PLAN_BYTES before more than that is read."""
    data, size = read_at_most(path, MAX_PLAN_BYTES)
    if size > MAX_PLAN_BYTES:
        raise PlanError(f"{path}: {size} bytes is larger than any {what} ({MAX_PLAN_BYTES} at most)")
    return data


def json_object(data: bytes | str, where: str, what: str) -> dict:
    """A plan file's bytes as a JSON object, refused with a clear error before any field is read."""
    if len(data) > MAX_PLAN_BYTES:
        raise PlanError(f"{where}: {len(data)} bytes is larger than any {what} ({MAX_PLAN_BYTES} at most)")
    try:
        raw = load_json(data)
    except (ValueError, RecursionError, DuplicateKeyError) as exc:  # ValueError: also a 5,000-digit int
        raise PlanError(f"{where}: not valid JSON ({str(exc)[:200]})") from exc
    if not isinstance(raw, dict):
        raise PlanError(f"{where}: expected a JSON object, found {type(raw).__name__}")
    return raw


def _canonical_id(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def from_format_1(raw: dict) -> dict:
    """A format-1 plan (edge and server, one cut) as the two-stage chain it describes; its id is kept."""
    kind, crossing, outputs = raw["kind"], raw.get("cut_tensors", []), raw.get("outputs", [])
    codec, weights = raw.get("codec", "float32"), raw.get("head_weights", "float32")
    head_out = [o["name"] for o in outputs if o.get("side") == "head"]
    tail_out = [o["name"] for o in outputs if o.get("side") != "head"]
    if kind == EDGE_ONLY:
        stages = [{"file": HEAD_FILE, "weights": weights, "produces": [o["name"] for o in outputs]}]
    else:
        first = {
            "file": HEAD_FILE if kind == SPLIT else None,
            "weights": weights if kind == SPLIT else "float32",
            "end": raw.get("cut_index"),
            "sends": crossing,
            "codec": codec,
            "produces": head_out if kind == SPLIT else [],
        }
        last = {
            "file": TAIL_FILE,
            "receives": crossing,
            "produces": tail_out if kind == SPLIT else head_out + tail_out,
        }
        stages = [first, last]
    keep: tuple[str, ...] = ("model_name", "model_sha256", "inputs", "outputs", "files", "kind")
    keep += ("input_shapes", "predicted", "front")
    return {
        **{k: raw[k] for k in keep if k in raw},
        "stages": stages,
        "format_version": PLAN_FORMAT,
        "plan_id": raw.get("plan_id", ""),
    }


def verify_pushed(files: dict[str, bytes], role: str | None = None, fallback: bool = False) -> Plan:
    """A plan sent over the wire (plan.json plus the files ``role`` needs, or all it lists), checked
    against its own checksums before anything is written: the server and the edge daemon accept pushes
    alike. An edge that falls back locally needs the plan's full model too."""
    if PLAN_FILE not in files:
        raise PlanError("pushed plan has no plan.json")
    for name in files:
        plain_file_name(name)
    plan = Plan.parse(files[PLAN_FILE], where="pushed plan")
    extra = set(files) - set(plan.files) - {PLAN_FILE}
    if extra:
        raise PlanError(f"pushed plan carries files it does not list: {sorted(extra)[:8]}")
    need = plan.files_for(role, fallback=fallback)
    # the device's own segment first: a push meant for another stage lacks it, and says so, whatever
    # else it lacks (an edge given a server's push reported its missing full.onnx, no hint)
    for name in sorted(need, key=lambda n: (not _pushed_for_another(plan, role, n), n)):
        if name not in files:
            raise PlanError(f"pushed plan is missing {name}{_pushed_for_another(plan, role, name)}")
    for name, digest in plan.files.items():
        if name in files and hashlib.sha256(files[name]).hexdigest() != digest:
            raise PlanError(f"pushed plan: checksum mismatch for {name}")
    return plan


def _pushed_for_another(plan: Plan, role: str | None, name: str) -> str:
    """Why a push lacks this device's own segment: it was meant for another stage (a relay's endpoint
    given as --server, a relay of stage 1 given as --relay 2=...), which "missing stage1.onnx" alone
    did not tell."""
    i = plan.stage_of(role) if role else None
    if i is None or plan.stages[i].file != name:
        return ""
    how = {"edge": "--edge ENDPOINT", "server": "--server ENDPOINT"}.get(str(role), f"--relay {i}=ENDPOINT")
    whose = {"edge": " (the edge's)", "server": " (the server's)"}.get(str(role), "")
    return (
        f", the segment of stage {i}{whose}, which this device runs: the plan was pushed to it for "
        f"another stage (deploy it here with `splitpoint deploy PLAN_DIR {how}`)"
    )


T = TypeVar("T")
# where install_pushed puts a plan: the first 16 hex digits of its id (a sweep of pushed plans touches
# only folders so named)
PUSHED_NAME = re.compile(r"[0-9a-f]{16}")


def install_pushed(
    files: dict[str, bytes],
    plans_dir: Path,
    load: Callable[[Path, Plan], T],
    role: str | None = None,
    fallback: bool = False,
) -> tuple[Plan, T, Path]:
    """Verify a pushed plan, write it to a temporary directory in ``plans_dir``, ``load`` it from there
    (build every session: a garbage model with a matching checksum fails here), and only then rename it
    to ``plans_dir/<first 16 hex of its id>``. Any failure leaves nothing behind and the previous content
    of that directory untouched. Returns the plan, what ``load`` returned and where the plan now is.
    ``fallback``: an edge that falls back locally, which needs the full model the plan lists."""
    plan = verify_pushed(files, role, fallback)
    target = Path(plans_dir) / plan.plan_id[:16]  # a PUSHED_NAME
    loaded: list[T] = []

    def write(tmp: Path) -> None:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        try:
            loaded.append(load(tmp, plan))
        except PlanError:
            raise
        except Exception as exc:  # onnxruntime and onnx raise their own types for a bad model
            # the reason goes back to the pusher: without the receiver's directories in it
            why = str(exc).replace(f"{tmp}/", "").replace(str(tmp), "").replace(str(Path(plans_dir)), "")
            # nor any other path of the receiver's (onnxruntime names where external data resolved to)
            why = re.sub(r"(?<![\w.])/[^\s\"',:;)]+", "<path>", why)
            raise PlanError(
                f"pushed plan {plan.plan_id[:12]} does not load: {type(exc).__name__}: {why}"
            ) from exc

    write_dir_atomically(target, write, force=True)
    return plan, loaded[0], target


LEFTOVER_AGE_S = 600.0  # a writer's temporary directory this old is no write in progress


def _locked_plan(plan_dir: str | Path, exclusive: bool) -> int | None:
    """A descriptor of ``plan_dir``'s plan.json holding a lock on it: shared (waiting for an exclusive
    one), or exclusive and taken without waiting; None where it cannot be had."""
    try:
        fd = os.open(Path(plan_dir) / PLAN_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB if exclusive else fcntl.LOCK_SH)
    except (OSError, ImportError):
        os.close(fd)
        return None
    return fd


def hold_plan(plan_dir: str | Path) -> int | None:
    """Mark a plan directory as in use by this process for as long as the returned descriptor stays open
    (a shared lock on its plan.json; None where it cannot be taken): a sweep of pushed plans leaves it
    alone, whichever process or record put it there, and the lock goes with the process."""
    return _locked_plan(plan_dir, exclusive=False)


def release_plan(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


@contextlib.contextmanager
def unused_plan(plan_dir: Path) -> Iterator[bool]:
    """Whether no process holds ``plan_dir`` (``hold_plan``), kept so while the block runs: an exclusive
    lock, taken without waiting, that a process starting on the plan waits for."""
    fd = _locked_plan(plan_dir, exclusive=True)
    try:
        yield fd is not None
    finally:
        release_plan(fd)


def sweep_leftovers(plans_dir: Path, now: float | None = None, only: str | None = None) -> list[str]:
    """Remove the temporary directories of plan writes that never finished (a server killed while it
    loaded a pushed plan, a ``plan`` killed while it wrote) from ``plans_dir``; the names removed. Those
    whose writer, a process of this host, is gone, and any untouched for ``LEFTOVER_AGE_S``: a younger one
    of a live (or another host's) writer may be at work. A server restarted at once after a crash kept
    77 MB of a half-written tail. The earlier plan a ``--force`` write had set aside (``.NAME.old-…``)
    goes back in place where that write was killed before its new plan took the name; ``only``: the
    leftovers of writes to ``plans_dir/only`` alone."""
    now = time.time() if now is None else now
    gone: list[str] = []
    try:
        found = sorted(
            (
                (d, m)
                for d in Path(plans_dir).iterdir()
                if (m := _LEFTOVER_RE.match(d.name)) and (only is None or m[1] == only)
            ),
            key=lambda dm: dm[1][3] is None,  # an old plan goes back before a new one's files go
        )
    except OSError:
        return gone
    for d, m in found:
        try:
            # a writer of this host is asked whether it lives, whatever its folder's age (an earlier plan
            # set aside keeps its old time through the rename); only age tells of another's
            dead = writer_gone(d.name)
            stale = dead if dead is not None else now - d.stat().st_mtime > LEFTOVER_AGE_S
            if not (d.is_dir() and not d.is_symlink() and stale):
                continue
            if m[3] == "old":
                if not any((d / f).is_file() for f in _PLAN_MARKERS):
                    continue  # not a plan set aside: not ours to move or remove
                home = d.parent / m[1]
                if not os.path.lexists(home):
                    os.replace(d, home)
                    log.warning("restored %s: the plan a write that never finished had set aside", home)
                    continue
            shutil.rmtree(d)
            gone.append(d.name)
            log.info("removed %s: a plan's files, left by a write that never finished", d)
        except OSError:
            continue
    return gone


# what plan writes leave, by the names they make and nothing else (a user's own ``.plan.tmp-notes`` is not
# theirs): a temporary directory (``.NAME.tmp-PID@HOST-`` and mkdtemp's 8 characters, or an older
# ``.NAME.tmp-`` and 8) or the earlier plan a --force write set aside (``.NAME.old-PID@HOST-`` and 8 hex
# characters, older ``.NAME.old-PID@HOST-`` and ``.NAME.old-PID``)
_LEFTOVER_RE = re.compile(
    r"^\.(.+)\.(?:(tmp)-(?:\d+@[A-Za-z0-9]+-)?[a-z0-9_]{8}|(old)-\d+(?:@[A-Za-z0-9]+-(?:[0-9a-f]{8})?)?)$"
)


# what --force may replace: a directory a plan or a plan set was written to, or an empty one
_PLAN_MARKERS = ("plan.json", "planset.json")


def _not_the_plan_s(target: Path, held: list[str]) -> list[str]:
    """What in a directory --force would replace is not the plan's own: anything but plan.json and the
    files it lists (or planset.json and its members' directories). A directory that held a plan.json was
    taken whole: the model it was cut from, the profiles and a user's notes beside it went with it."""
    markers = [m for m in _PLAN_MARKERS if m in held]
    if not markers:
        return held
    ours = set(markers)
    for marker in markers:
        try:
            data, size = read_at_most(target / marker, MAX_PLAN_BYTES)
            if size > MAX_PLAN_BYTES:
                continue
            doc: Any = load_json(data)
            names = (
                list(doc["files"])
                if marker == PLAN_FILE
                else [m["dir"] for m in doc["members"] if isinstance(m, dict)]
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # a damaged one lists nothing: what is beside it is nobody's to delete
        ours |= {n for n in names if isinstance(n, str)}
    return [n for n in held if n not in ours]


def check_target(target: str | Path, force: bool = False) -> Path:
    """Refuse an output directory that ``write_dir_atomically`` would refuse, before the work that fills it:
    a plan of a large model is minutes of measurement to lose to a name already taken."""
    target = Path(target)
    if not target.name or target.resolve() in (Path.cwd(), *Path.cwd().parents):
        raise OutputExistsError(
            f"output directory {str(target) or '(empty)'!r} is the current directory or holds it: "
            "give a directory of its own"
        )
    if target.exists():
        if not target.is_dir():
            raise OutputExistsError(f"output path {target} exists and is not a directory")
        held = sorted(x.name for x in target.iterdir())
        if held and not force:
            raise OutputExistsError(f"output directory {target} is not empty (use --force to replace it)")
        foreign = _not_the_plan_s(target, held) if held else []
        if foreign:
            raise OutputExistsError(
                f"output directory {target} holds files that are not a plan's ({', '.join(foreign[:3])}"
                f"{', …' if len(foreign) > 3 else ''}): --force replaces an earlier plan only, and would "
                "delete them; choose another directory"
            )
    for parent in reversed([target.parent, *target.parent.parents]):
        if parent.exists() and not parent.is_dir():
            raise OutputExistsError(f"{parent} is a file, so {target} cannot be a directory in it")
    # the temporary directory beside it: ".NAME.tmp-PID@HOST-" and mkdtemp's 8 characters
    why = cannot_write_in(target.parent) or name_too_long(target, len(f"..tmp-{writer_tag()}-") + 8)
    if why is not None:  # before the work, and not in the words of the temporary directory it names
        raise ConfigError(f"output directory {target} cannot be written: {why}")
    return target


def write_dir_atomically(target: str | Path, write: Callable[[Path], None], force: bool = False) -> Path:
    """Run ``write(tmpdir)`` and move the result to ``target`` in one rename.

    A failure, Ctrl-C or SIGTERM leaves the previous content (or nothing) in place, never half a plan; so
    does a power cut (the files and the rename are synced to disk before the earlier plan is removed).
    ``force`` replaces an earlier plan (or plan set) only: a directory holding anything else (the model
    the plan is cut from, a user's files) is refused, not deleted. Without it, a directory that another
    process wrote meanwhile is refused too, not replaced: of two writers one is told.
    """
    target = Path(target)
    if target.name and target.parent.is_dir():  # what a killed write of this target left: its old plan back
        sweep_leftovers(target.parent, only=target.name)
    target = check_target(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{writer_tag()}-", dir=target.parent))
    except OSError as exc:
        raise naming(exc, target, target.parent / f".{target.name}.") from exc
    old = None
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp's 0700 would keep the plan from a service's user
        sync_tree(tmp)  # on disk before it is published: a power cut after the rename finds every file whole
        if target.exists() and force:
            # its own name each time: one left behind (a write killed mid-way) was in the way of every later
            # --force of this process, and another process's set-aside plan is never taken for this one's
            old = target.parent / f".{target.name}.old-{writer_tag()}-{secrets.token_hex(4)}"
            try:
                os.replace(target, old)
            except FileNotFoundError:  # another writer took it away meanwhile: nothing of it to set aside
                old = None
        try:
            os.rename(tmp, target)  # over a missing or empty directory only
        except OSError as exc:
            if target.is_dir() and any(target.iterdir()):
                raise OutputExistsError(
                    f"output directory {target} was written by another process meanwhile; nothing replaced"
                ) from exc
            raise
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not target.exists():
            os.replace(old, target)
        if isinstance(exc, OSError) and not isinstance(exc, SplitPointError):
            raise naming(exc, target, tmp) from exc
        raise
    sync_dir(target.parent)  # the rename itself, before the earlier plan goes
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target
