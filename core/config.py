"""The base of every runtime configuration: validated once, at construction, with one-line errors.

Servers, edge daemons, the demo and the bench each take one frozen config object (the uvicorn pattern:
Config, then a Server that runs it, then a thin CLI that only fills the Config). pydantic checks types and
ranges; a failure names the option and what is wrong with it, never a traceback.
"""

from __future__ import annotations

import os
import types
import typing
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from .errors import ConfigError

C = TypeVar("C", bound="StrictConfig")

# the longest time a measurement may hold (a day) and the most bytes (a pebibyte), in the files people
# edit and the ones pushed between machines (profiles, plans, plan sets): past them a number is damage,
# not a measurement (a median of 1e300 ms planned without a word)
MAX_MS = 86_400_000.0
MAX_BYTES = 2**50


def _numeric(annotation: Any) -> bool:
    """Whether a field holds a number (int or float, optional or not) and not a bool."""
    args = (
        typing.get_args(annotation)
        if typing.get_origin(annotation) in (typing.Union, types.UnionType)
        else ()
    )
    kinds = set(args) if args else {annotation}
    return bool(kinds & {int, float}) and bool not in kinds


class Document(BaseModel):
    """A file a user may write or edit by hand (a profile, a network or device YAML, a trace): unknown
    keys are refused, and so is a boolean where a number belongs (pydantic's lax mode reads ``true`` as
    1.0, so ``uplink_mbps: true`` planned a 1 Mbit/s link without a word)."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, f in cls.model_fields.items():
                v = data.get(name)
                if isinstance(v, bool) and _numeric(f.annotation):
                    raise ValueError(f"{name} is {str(v).lower()}, a boolean where a number belongs")
        return data


class StrictConfig(BaseModel):
    # NaN compares false with every bound (a NaN limit passed gt=0 checks by failing them silently
    # elsewhere) and inf is no number of seconds or requests: an option takes a finite number
    model_config = ConfigDict(
        extra="forbid", frozen=True, arbitrary_types_allowed=True, allow_inf_nan=False, defer_build=True
    )
    label: ClassVar[str] = "configuration"  # what errors call it: "invalid serve options: --bind: ..."
    # fields whose option the CLI spells otherwise (a unit in the field's name, not the option's)
    options: ClassVar[dict[str, str]] = {}

    @classmethod
    def of(cls: type[C], **values: Any) -> C:
        """Construct, turning pydantic's report into a ConfigError that names each bad field."""
        try:
            return cls(**values)
        except ValidationError as exc:
            raise ConfigError(explain(exc, cls.label, cls.options)) from exc

    def with_(self: C, **changes: Any) -> C:
        """A copy with some values changed, validated again."""
        return type(self).of(**{**self.model_dump(), **changes})


def _issues(exc: ValidationError) -> list[tuple[str, str]]:
    """(field path, message) per problem, at most five, each message cut to a readable length."""
    out = []
    for e in exc.errors()[:5]:
        field = ".".join(str(x) for x in e["loc"]) or "(root)"
        got = e.get("input")
        if isinstance(got, os.PathLike):  # the path as the user typed it, not PosixPath('...')
            got = os.fspath(got)
        if isinstance(got, str) and "@" in got:  # a broker URL's password (scheme or not) is not shown
            from .telemetry import redact_url

            got = redact_url(got)
        shown = (
            f" (got {str(repr(got))[:60]})" if got is not None and not isinstance(got, dict | list) else ""
        )
        out.append((field, e["msg"].removeprefix("Value error, ")[:300] + shown))
    return out


def explain(exc: ValidationError, where: str, options: dict[str, str] | None = None) -> str:
    """Options, as the CLI spells them: ``invalid serve options: --bind: ...``."""
    names = options or {}
    return f"invalid {where} options: " + "; ".join(
        m if f == "(root)" else f"--{names.get(f, f.replace('_', '-'))}: {m}" for f, m in _issues(exc)
    )


def explain_fields(exc: ValidationError) -> str:
    """Fields of a document (plan.json, a profile): ``field 'files.x': ...``."""
    return "; ".join(m if f == "(root)" else f"field '{f}': {m}" for f, m in _issues(exc))
