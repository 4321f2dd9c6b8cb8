"""The ``splitpoint`` command's entry point, before anything heavy is imported.

Importing the CLI loads typer and rich, and a command then its own libraries (numpy, onnx and
onnxruntime: 0.3 s and more): Ctrl-C meanwhile printed a traceback from inside an import and killed the
process by the signal; here it ends as a later one does, "interrupted" and exit status 130."""

from __future__ import annotations

import sys


def interrupted(exc: BaseException) -> bool:
    """Whether a KeyboardInterrupt caused ``exc`` (onnxruntime's import turns one into ImportError)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def main() -> None:
    # what cannot be shown in the terminal's encoding (an ASCII-only one, a file name that is not UTF-8)
    # is escaped: a model called modèle printed to PYTHONIOENCODING=ascii died in the middle of a table
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    try:
        from splitpoint.app.cli import main as run
    except BaseException as exc:
        if interrupted(exc):
            sys.stderr.write("interrupted\n")
            sys.exit(130)
        raise
    run()
