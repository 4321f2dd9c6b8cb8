"""The ``splitpoint`` command line: one sub-command per job, each a few lines of wiring.

A command parses its options, builds a validated config or job, calls one library function and prints
what it returns (``console.py`` builds the tables). Every model argument is an ONNX path or a zoo name.
Errors caused by input print one specific line and exit 2; nothing is half-written. The commands live
in one module per group (``models``, ``decoders``, ``profiling``, ``planning``, ``runtime``, ``fleet``,
``showcase``) over ``common``'s option types and checks; this module runs them.
"""

from __future__ import annotations

import inspect
import signal
import sys
from typing import Any, NoReturn

import typer
from rich.markup import escape
from typer.models import DefaultPlaceholder

from splitpoint.core.errors import SplitPointError, first_line, os_reason

from ..console import err
from ..launch import interrupted
from .common import app

# One module per group of commands: importing it registers them, and --help lists them in this order
# isort: off
from . import models, decoders, profiling, planning, runtime, fleet, showcase  # noqa: F401
# isort: on


def _one_paragraph_summaries(group: typer.Typer) -> None:
    """The command list shows each command's first paragraph as one: typer's rich mode keeps the line
    breaks of the docstring there, and `splitpoint --help` broke descriptions mid-sentence."""
    for info in group.registered_commands:
        doc = inspect.getdoc(info.callback) if info.callback is not None else None
        if info.short_help is None and info.help is None and doc:
            info.short_help = " ".join(doc.split("\n\n")[0].split())
    for sub in group.registered_groups:
        if sub.typer_instance is not None:
            _one_paragraph_summaries(sub.typer_instance)


class _FlagsWithoutType:
    """A flag's help shows no value to give: typer 0.29 printed `--force <bool>`, which reads as
    `--force true` (refused: the option takes no value)."""

    params: list

    def _untyped_flags(self) -> None:
        for param in self.params:
            if (
                getattr(param, "is_flag", False)
                and not getattr(param, "count", False)
                and param.metavar is None
            ):
                param.metavar = ""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None and option.metavar is None:
            option.metavar = ""
        return option


class _Command(_FlagsWithoutType, typer.core.TyperCommand):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._untyped_flags()


class _Group(_FlagsWithoutType, typer.core.TyperGroup):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._untyped_flags()


def _flags_show_no_type(group: typer.Typer) -> None:
    if group.info.cls in (None, typer.core.TyperGroup) or isinstance(group.info.cls, DefaultPlaceholder):
        group.info.cls = _Group
    for info in group.registered_commands:
        if info.cls in (None, typer.core.TyperCommand):
            info.cls = _Command
    for sub in group.registered_groups:
        if sub.typer_instance is not None:
            _flags_show_no_type(sub.typer_instance)


_one_paragraph_summaries(app)
_flags_show_no_type(app)


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _fail(message: str, code: int) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False, markup=True, soft_wrap=True)
    sys.exit(code)


def _takes_input_shape() -> bool:
    """Whether the command being run has --input-shape: a hint to use it is no help where it has not
    (split-decoder, generate)."""
    name = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    for info in app.registered_commands:
        callback = info.callback
        if callback is not None and name in (info.name, callback.__name__.replace("_", "-")):
            return "input_shape" in inspect.signature(callback).parameters
    return False


def main() -> None:
    """Run the CLI; every error a user can cause is one line on stderr and exit status 2 (a runtime
    failure that a supervisor should restart on is 1)."""
    # SIGTERM (a supervisor, `kill`, a timeout) unwinds like Ctrl-C: what a command was writing is
    # removed on the way out (a temporary plan directory was left behind); the daemons put their own
    # handler in place of this one to drain first
    signal.signal(signal.SIGTERM, _terminated)
    try:
        code = app(standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(getattr(exc, "exit_code", 0))
    except (typer.Abort, KeyboardInterrupt):
        err.print("interrupted")
        sys.exit(130)
    except typer.TyperException as exc:  # usage: a missing, unknown or malformed option
        ctx = getattr(exc, "ctx", None)
        where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        text = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        if not text:  # no arguments at all: the help was the answer
            sys.exit(getattr(exc, "exit_code", 2))
        _fail(escape(text.replace("\n", " ")) + where, 2)
    except SplitPointError as exc:
        _fail(escape(str(exc)).replace("\n", " "), exc.exit_code)
    except MemoryError as exc:  # numpy's names the size it wanted: an input shape this machine cannot hold
        _fail(
            escape(f"not enough memory: {first_line(exc) or 'an allocation failed'} (check --input-shape)"), 2
        )
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as exc:
        _fail(escape(f"{exc.strerror}: {exc.filename}"), 2)
    except OSError as exc:  # the machine's: a full disk, a read-only file system (writes go by temp + rename)
        _fail(escape(os_reason(exc)), 1)
    except Exception as exc:
        if interrupted(exc):  # Ctrl-C while a library was imported: its ImportError, not the interrupt
            err.print("interrupted")
            sys.exit(130)
        if not type(exc).__module__.startswith("onnxruntime"):
            raise
        # the model itself fails to run (an export that fixed a shape it traced, an input shape it cannot
        # take): onnxruntime's own words, on one line
        text = " ".join(str(exc).split())
        about_shapes = any(w in text.lower() for w in ("shape", "dimension", "dims", "size", "rank"))
        what = " at these input shapes (see --input-shape)" if about_shapes and _takes_input_shape() else ""
        _fail(escape(f"onnxruntime could not run the model{what}: {text}"), 2)
    if code == 130:  # typer answers Ctrl-C with this code, not with the exception
        err.print("interrupted")
    sys.exit(code if isinstance(code, int) else 0)
