"""``splitpoint profile`` as a library call: a validated job in, a saved profile out."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from splitpoint.core.config import StrictConfig
from splitpoint.core.files import ATOMIC_EXTRA, cannot_write_in, name_too_long
from splitpoint.core.graph import open_model
from splitpoint.core.graph.shapes import parse_input_shapes
from splitpoint.core.machine import usable_cores

from .cpulimit import MIN_CPUS, cpu_limit
from .profiler import ProfileSettings, int8_of, profile_model
from .schema import MeasuredProfile


class ProfileJob(StrictConfig):
    label: ClassVar[str] = "profile"
    options: ClassVar[dict[str, str]] = {"slowdown": "emulate-slowdown", "out": "out"}
    model: str  # ONNX path or zoo name
    role: Literal["edge", "server"] = "edge"
    out: Path | None = None  # default profiles/measured/MODEL-ROLE.json
    threads: int = Field(1, ge=0, le=1024)
    provider: str = "CPUExecutionProvider"
    budget: float = Field(30.0, gt=0, le=10_000)  # wall time, in multiples of one inference
    cpus: float | None = Field(None, gt=0, le=1024)  # emulate a smaller device: a real CPU limit
    slowdown: float | None = Field(None, ge=1, le=1000)  # or: a device this many times slower
    int8: bool = False  # also time the int8 (static QDQ) model
    input_shapes: tuple[str, ...] = ()  # NAME:1x3x640x640, for inputs with symbolic dimensions
    fresh_codecs: bool = False  # measure codec speeds again even where this device's are cached
    inputs: Path | None = None  # a folder of samples: the first is run instead of seeded random values

    @field_validator("out")
    @classmethod
    def _a_file(cls, v: Path | None) -> Path | None:  # before the profile's minutes, not after them
        if v is not None and (not v.name or v.is_dir()):
            raise ValueError(f"{str(v) or '(empty)'!r} is a directory: give the profile's file name")
        if v is not None and (why := _not_a_profile(v)) is not None:  # first: what is there, then rights
            raise ValueError(f"{why}; give another file name")
        if v is not None and (why := cannot_write_in(v.parent) or name_too_long(v, ATOMIC_EXTRA)) is not None:
            raise ValueError(f"cannot be written: {why}")  # the path follows, as given
        return v

    @model_validator(mode="after")
    def _one_limit(self) -> ProfileJob:
        if self.cpus is not None and self.slowdown is not None:
            raise ValueError("give --cpus or --emulate-slowdown, not both")
        have = os.cpu_count() or 1
        if self.cpus is not None and self.cpus > have:
            raise ValueError(
                f"--cpus {self.cpus:g} is more than this machine's {have} CPUs: it emulates a smaller device"
            )

        limit = self.cpu_limit
        if limit is not None and limit < MIN_CPUS:  # refused now, not warned about after the profile
            asked = (
                f"--cpus {self.cpus:g}" if self.cpus is not None else f"--emulate-slowdown {self.slowdown:g}"
            )
            raise ValueError(
                f"{asked} asks for {limit:g} CPUs, less than a CFS quota can give ({MIN_CPUS:g}: 1 ms in "
                "the longest period, 100 ms)"
            )
        return self

    @property
    def cpu_limit(self) -> float | None:
        """The CPUs to limit the process to: a slowdown divides the CPUs the profile's threads use
        (--threads 0, onnxruntime's default, uses every core this process may run on)."""
        if self.slowdown is not None:
            return (self.threads or usable_cores()) / self.slowdown
        return self.cpus


_PROFILE_KIND = re.compile(rb'"kind"\s*:\s*"splitpoint-profile"')


def _not_a_profile(path: Path) -> str | None:
    """Why an existing file at ``-o`` is not one to replace (``-o model.onnx`` overwrote the model being
    profiled with its profile): anything but an empty file or a profile, known by its ``kind`` near the
    start, as every profile is written."""
    if not os.path.lexists(path):
        return None
    if path.is_symlink():
        return "is a symbolic link: the profile would replace the link, not the file it names"
    if not path.is_file():  # a device, a pipe: the rename would replace it
        return "exists and is not a regular file: a profile replaces an earlier profile only"
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"exists and cannot be read ({exc.strerror}), so it cannot be told for a profile"
    if not head or _PROFILE_KIND.search(head):
        return None
    return "exists and is not a profile: a profile replaces an earlier profile only"


def run_profile(
    job: ProfileJob, progress: Callable[[str, int, int], None] | None = None
) -> tuple[MeasuredProfile, Path]:
    """Profile under the job's CPU limit (undone afterwards) and save atomically."""
    handle = open_model(job.model, parse_input_shapes(job.input_shapes))
    if job.inputs is not None:
        handle.take_sample_from(job.inputs)
    out = job.out or Path("profiles") / "measured" / f"{handle.name}-{job.role}.json"
    settings = ProfileSettings(
        role=job.role,
        threads=job.threads,
        provider=job.provider,
        budget=job.budget,
        int8=job.int8,
        fresh_codecs=job.fresh_codecs,
    )
    # the graph's cuts are bookkeeping, no device's work: worked out at this machine's speed first. Under
    # a tight quota this memory-heavy Python ran 20-40x slower than the share (a 9 ms enumeration took
    # 0.36 s of CPU at 0.1 CPU here, and did not finish in 5 min at 0.02)
    handle.cuts()
    int8_model = None
    if job.int8:  # quantising too (refused for a model quantised already): the device need not make it
        if progress is not None:
            progress("int8 model (quantising)", 0, 1)
        int8_model = int8_of(handle)
    with cpu_limit(job.cpu_limit) as emulation:
        prof = profile_model(handle, settings, emulation, progress=progress, int8_model=int8_model)
    prof.save(out)
    return prof, out
