"""The base of every runtime configuration: validated once, at construction, with one-line errors.

Servers, edge daemons, the demo and the bench each take one frozen config object (the uvicorn pattern:
Config, then a Server that runs it, then a thin CLI that only fills the Config). pydantic checks types and
ranges; a failure names the option and what is wrong with it, never a traceback.
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError

C = TypeVar("C", bound="StrictConfig")


class StrictConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)
    label: ClassVar[str] = "configuration"  # what errors call it: "invalid serve option --bind: ..."
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
        shown = (
            f" (got {str(repr(got))[:60]})" if got is not None and not isinstance(got, dict | list) else ""
        )
        out.append((field, e["msg"].removeprefix("Value error, ")[:300] + shown))
    return out


def explain(exc: ValidationError, where: str, options: dict[str, str] | None = None) -> str:
    """Options, as the CLI spells them: ``invalid serve option --bind: ...``."""
    names = options or {}
    return f"invalid {where} option " + "; ".join(
        f"--{names.get(f, f.replace('_', '-'))}: {m}" for f, m in _issues(exc)
    )


def explain_fields(exc: ValidationError) -> str:
    """Fields of a document (plan.json, a profile): ``field 'files.x': ...``."""
    return "; ".join(f"field '{f}': {m}" for f, m in _issues(exc))
