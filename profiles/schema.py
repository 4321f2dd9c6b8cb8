"""Profile schemas: network links, reference devices, and measured model profiles.

Profiles are files people edit and copy between machines, so loading validates every field
(type, unit range, unknown keys) and names the file and the field on error. pydantic does
that work; the classes here only state the rules.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Final, Literal

from pydantic import ConfigDict, Field, ValidationError, model_validator

from splitpoint.core.config import MAX_BYTES, MAX_MS, Document, explain_fields
from splitpoint.core.errors import ProfileError
from splitpoint.core.files import atomic_write_text
from splitpoint.core.textfiles import load_json, load_yaml, read_document

PROFILE_FORMAT: Final = 1
PACKAGE_DIR = Path(__file__).resolve().parent


class _Strict(Document):
    model_config = ConfigDict(extra="forbid", frozen=False, defer_build=True)


class NetworkProfile(_Strict):
    """A link between the edge and the server. Bandwidths in Mbit/s (10^6 bit/s), times in ms."""

    name: str = Field(min_length=1)
    description: str = ""
    uplink_mbps: float = Field(gt=0, le=1e5)
    downlink_mbps: float = Field(gt=0, le=1e5)
    rtt_ms: float = Field(ge=0, le=1e4)
    jitter_ms: float = Field(ge=0, le=1e4)
    loss: float = Field(ge=0, le=0.5)

    def transfer_ms(self, up_bytes: float, down_bytes: float = 0.0) -> float:
        """One request/response: serialisation both ways plus one round trip (derived, not measured)."""
        return 8e-3 * up_bytes / self.uplink_mbps + 8e-3 * down_bytes / self.downlink_mbps + self.rtt_ms


class DeviceSpec(_Strict):
    """Reference facts for a device class (from datasheets), not a measurement."""

    name: str
    description: str = ""
    role: Literal["edge", "server"]
    cpu: str
    cores: int = Field(ge=1, le=1024)
    clock_ghz: float = Field(gt=0, le=10)
    memory_gb: float = Field(gt=0, le=1e5)
    thermal_limit_c: float = Field(ge=30, le=150)
    accelerator: str = "none"
    # a published latency per model: NaN calibrated the edge at the smallest CPU share, 0 or less at
    # an unlimited one, each with a note that blamed the machine
    reference_latency_ms: dict[str, Annotated[float, Field(gt=0, le=MAX_MS, allow_inf_nan=False)]] = Field(
        default_factory=dict
    )
    notes: str = ""


class Stat(_Strict):
    """Latency statistics of repeated runs, milliseconds."""

    median_ms: float = Field(ge=0, le=MAX_MS)
    p90_ms: float = Field(ge=0, le=MAX_MS)
    min_ms: float = Field(ge=0, le=MAX_MS)
    max_ms: float = Field(ge=0, le=MAX_MS)
    runs: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self):
        if not (self.min_ms <= self.median_ms <= self.max_ms + 1e-9 and self.median_ms <= self.p90_ms + 1e-9):
            raise ValueError("expected min <= median <= p90 and median <= max")
        return self


class NodeTime(_Strict):
    name: str
    op_type: str
    median_ms: float = Field(ge=0, le=MAX_MS)


class CutTiming(_Strict):
    """Head and tail latency at one cut. ``source`` says whether the segments were run
    ("measured") or interpolated between measured cuts along the per-node profile ("derived")."""

    index: int = Field(ge=1)
    head_ms: float = Field(ge=0, le=MAX_MS)
    tail_ms: float = Field(ge=0, le=MAX_MS)
    head_p90_ms: float | None = Field(None, ge=0, le=MAX_MS)
    tail_p90_ms: float | None = Field(None, ge=0, le=MAX_MS)
    source: Literal["measured", "derived"]
    head_memory_bytes: int = Field(ge=0, le=MAX_BYTES)
    memory_source: str


class CodecSpeed(_Strict):
    """Measured codec throughput on this machine, MB/s of float32 input (10^6 bytes/s)."""

    encode_mb_s: float = Field(gt=0, le=1e7)
    decode_mb_s: float = Field(gt=0, le=1e7)
    ratio: float = Field(gt=0, le=1e9)


class Emulation(_Strict):
    mechanism: str  # e.g. "cgroup-v1 cfs quota", "cgroup-v2 cpu.max", "cpu affinity"
    cpus: float | None = None
    period_us: int | None = None
    quota_us: int | None = None
    cores: list[int] | None = None
    detail: str = ""
    # the whole model's time under the limit over its time at this machine's full speed, measured by the
    # profile (a quota below the kernel's CFS slice is over-enforced: 0.5 CPU can run 2.6x slower)
    measured_slowdown: float | None = Field(None, gt=0)


class MeasuredProfile(_Strict):
    """What ``splitpoint profile`` measured for one model on one machine, in one role."""

    format_version: Literal[1] = PROFILE_FORMAT
    kind: Literal["splitpoint-profile"] = "splitpoint-profile"
    role: Literal["edge", "server"]
    model_name: str
    model_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    input_shapes: dict[str, list[int]] = Field(default_factory=dict)  # --input-shape it was measured at
    device: dict
    settings: dict
    emulation: Emulation | None = None
    whole: Stat
    int8_whole: Stat | None = None
    nodes: list[NodeTime]
    unattributed_ms: float = Field(ge=0, le=MAX_MS)
    cuts: list[CutTiming]
    codecs: dict[str, CodecSpeed] = Field(default_factory=dict)
    # the runtime's own time per request on this device, by role ("edge": the client that sends,
    # "server": a server or relay that receives), measured with a plan that computes nothing, under
    # the same CPU limit; absent: not measured, and the cost model counts none
    runtime_ms: dict[Literal["edge", "server"], Annotated[float, Field(ge=0, le=1e6)]] = Field(
        default_factory=dict
    )
    # and its time per MiB of cut tensor sent (as an edge) or received (as a server), measured alike
    runtime_ms_per_mib: dict[Literal["edge", "server"], Annotated[float, Field(ge=0, le=1e6)]] = Field(
        default_factory=dict
    )
    cost: dict
    thermal: dict
    created: str

    @model_validator(mode="after")
    def _consistent(self):
        idx = [c.index for c in self.cuts]
        if idx != sorted(set(idx)):
            raise ValueError("cuts must have unique indices in increasing order")
        if self.whole.median_ms <= 0:  # a run takes time: 0 ms planned a server that computes for free
            raise ValueError("whole.median_ms is 0: a model's run takes time; profile it again")
        return self

    def cut(self, index: int) -> CutTiming:
        # by bisection (the cuts are in increasing order, checked above): the planner asks once per
        # candidate, and a linear search over a transformer's 3,500 cuts took 25 s of one plan
        i = bisect.bisect_left(self.cuts, index, key=lambda c: c.index)
        if i < len(self.cuts) and self.cuts[i].index == index:
            return self.cuts[i]
        raise ProfileError(f"profile has no timing for cut {index}")

    def check_cuts(self, indices: Iterable[int], where: str = "profile") -> None:
        """Every cut of the model timed, and no other: a hand-edited profile's missing cut read as 0 ms
        in a chain's segments (68 of ResNet-18's 69 nodes on a slow edge cost nothing), and one past
        the model's end was an IndexError."""
        want, have = set(indices), {c.index for c in self.cuts}
        if want - have:
            raise ProfileError(f"{where} has no timing for cut {min(want - have)}; profile this model again")
        if have - want:
            raise ProfileError(
                f"{where} times cut {min(have - want)}, which this model does not have; profile it again"
            )

    def check_model(self, sha256: str, where: str = "profile", input_shapes: dict | None = None) -> None:
        if sha256 != self.model_sha256:
            raise ProfileError(
                f"{where} was measured on another model file (sha256 {self.model_sha256[:12]}…, "
                f"this model {sha256[:12]}…); profile this model first"
            )
        if input_shapes is not None and input_shapes != self.input_shapes:
            raise ProfileError(
                f"{where} was measured with input shapes {self.input_shapes or 'as in the file'}, not "
                f"{input_shapes or 'as in the file'}; profile with the same --input-shape"
            )

    def save(self, path: str | Path) -> None:
        """Atomic write: an interrupted save never leaves a partial profile."""
        atomic_write_text(path, self.model_dump_json(indent=1))


def _explain(exc: ValidationError, where: str) -> ProfileError:
    return ProfileError(f"{where}: {explain_fields(exc)}")


MAX_PROFILE_BYTES = 256 * 2**20  # a profile of 100,000 nodes is tens of MB


def _read(path: Path, parse) -> dict:
    data = read_document(path, "profile", MAX_PROFILE_BYTES, parse, ProfileError)
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _load_yaml(spec: str | Path, folder: str, cls):
    path = _named(spec, folder)
    try:
        return cls(**_read(path, load_yaml))
    except ValidationError as exc:
        raise _explain(exc, str(path)) from exc
    except TypeError as exc:  # a YAML list or scalar where a mapping belongs
        raise ProfileError(f"{path}: {exc}") from exc


def load_network(spec: str | Path) -> NetworkProfile:
    """A network profile by name (``lte``) or path."""
    return _load_yaml(spec, "networks", NetworkProfile)


def load_device(spec: str | Path) -> DeviceSpec:
    """Reference facts for a device class by name (``rpi4``) or path."""
    return _load_yaml(spec, "devices", DeviceSpec)


def load_measured(
    path: str | Path, model_sha256: str | None = None, input_shapes: dict | None = None
) -> MeasuredProfile:
    p = Path(path)
    try:
        prof = MeasuredProfile(**_read(p, load_json))
    except ValidationError as exc:
        raise _explain(exc, str(p)) from exc
    if model_sha256 is not None:
        prof.check_model(model_sha256, str(p), input_shapes)
    return prof


def _named(spec: str | Path, folder: str) -> Path:
    """A path, or a built-in profile's name: a name is a path only where a file of that name exists (a
    directory called ``lte`` in the working directory, e.g. a plan written with ``-o lte``, does not hide
    the built-in profile)."""
    p = Path(spec)
    if not str(spec).strip():
        raise ProfileError(f"no {folder[:-1]} profile given (an empty name)")
    candidate = PACKAGE_DIR / folder / f"{spec}.yaml"
    # a name has no folder in it: `./lte-wifi` is a path (missing, not the bundled trace), and
    # `../networks/lte` no way out of the bundled folder
    pathlike = "/" in str(spec) or os.sep in str(spec)
    if (
        pathlike
        or p.suffix in (".yaml", ".yml", ".json")
        or p.is_file()
        or (p.exists() and not candidate.exists())
    ):
        return p
    if candidate.exists():
        return candidate
    known = ", ".join(sorted(x.stem for x in (PACKAGE_DIR / folder).glob("*.yaml")))
    raise ProfileError(f"no {folder[:-1]} profile named {spec!r} (known: {known})")


def trace_path(spec: str | Path) -> Path:
    """A link trace (phases of network profiles, for ``bench --trace``) by name (``lte-wifi``) or path."""
    return _named(spec, "traces")


def network_names() -> list[str]:
    return sorted(x.stem for x in (PACKAGE_DIR / "networks").glob("*.yaml"))
