"""What every command shares: the Typer apps, the option types, and the checks of an option's value
made before any work."""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from pathlib import Path
from typing import Annotated

import typer

from splitpoint.core.errors import SplitPointError
from splitpoint.core.textfiles import dumps_strict

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Split ONNX inference between an edge device and a server, chosen from measurements.",
)
edge_app = typer.Typer(add_completion=False, no_args_is_help=True, help="The edge daemon.")
app.add_typer(edge_app, name="edge")

Model = Annotated[str, typer.Argument(help="ONNX file or zoo name")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no progress output (daemons, scripts)")]
Mqtt = Annotated[str | None, typer.Option("--mqtt", help="telemetry broker, mqtt://\\[user:pass@]host:port")]
MaxUnreadReplies = Annotated[
    int,
    typer.Option(
        help="replies held for one connection that does not read them (each up to a whole result); "
        "past it they are dropped"
    ),
]
MaxMessageMb = Annotated[
    float,
    typer.Option(
        help="refuse larger messages (a deploy carries the plan's files in one message: their sum must fit)"
    ),
]


def message_bytes(mb: float) -> int:
    """--max-message-mb in bytes; nan or inf is refused here (int() of it raised a traceback)."""
    if not math.isfinite(mb):
        raise SplitPointError(f"--max-message-mb must be a finite number of MiB, not {mb}")
    return int(mb * 2**20)


CurveServerKey = Annotated[
    Path | None, typer.Option(help="file with the server's CurveZMQ public key (z85): encrypt")
]
DeviceSecret = Annotated[
    Path | None, typer.Option(help="file with this device's CurveZMQ secret key (z85), for allow-lists")
]
FidelityInputs = Annotated[
    Path | None,
    typer.Option(
        help="folder of samples for fidelity: .npy or images (one input; an image is resized and scaled to "
        "0..1, a colour one normalised by ImageNet's mean and std: give .npy for any other preprocessing), "
        ".npz (an array per input)"
    ),
]
Drain = Annotated[
    float,
    typer.Option(
        help="on SIGTERM/Ctrl-C: seconds to answer the requests already taken (new ones are refused as "
        "unavailable at once; any still held then are answered unavailable)"
    ),
]
OneSample = Annotated[
    Path | None,
    typer.Option(
        "--inputs",
        help="folder of samples (.npy for one input, .npz with an array per input): the first is what the "
        "model runs on, instead of seeded random values (for integer inputs that must hold real values: "
        "a shape, an index)",
    ),
]
Shapes = Annotated[
    list[str] | None,
    typer.Option(
        "--input-shape",
        help="NAME:1x3x640x640 fixes an input's symbolic dimensions (repeatable; needed for non-batch ones; "
        "N as the first size keeps the batch free, e.g. NAME:Nx3x640x640; every other dimension needs a "
        "size)",
    ),
]

Scores = Annotated[
    list[str] | None,
    typer.Option(
        "--scores",
        help="NAME[:AXIS]: fidelity compares output NAME as class scores along AXIS (default -1, the last): "
        "the share of positions whose top-1 is unchanged, not cosine (a language model's [batch, tokens, "
        "vocab] logits; repeatable)",
    ),
]


def _print_json(obj: object) -> None:
    sys.stdout.write(dumps_strict(obj, indent=1, default=str) + "\n")


def require(module: str, option: str) -> None:
    """Fail before any work when an option needs a package that is missing or broken here."""
    try:
        __import__(module)
    except ImportError as exc:
        raise SplitPointError(
            f"{option} needs {module}, which does not import here ({exc}): pip install {module}"
        ) from exc


def _logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, format="%(asctime)s %(name)s %(message)s"
    )


# a daemon holds a descriptor per connection: below FEW_FILES clients can exhaust them; it asks for
# MANY_FILES where the hard limit allows (systemd's own default hard limit is 524288)
FEW_FILES, MANY_FILES = 1024, 65536


def _daemon_files() -> None:
    """Raise this process's open-file limit to its hard limit, as long-running servers do: at a soft
    limit of 64 (a shell's ``ulimit -n``), 100 local connections made libzmq abort the edge daemon
    (SIGABRT in its ipc listener) and a TCP server spin at 100 % CPU refusing new clients in silence.
    Said where even the hard limit is low."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = MANY_FILES if hard == resource.RLIM_INFINITY else min(hard, MANY_FILES)
    if want > soft:
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
    if soft < FEW_FILES:
        logging.getLogger("splitpoint").warning(
            "at most %d open files (ulimit -n, LimitNOFILE= in a systemd unit): each client connection "
            "takes one, and past the limit new connections go unanswered; raise it to %d or more",
            soft,
            FEW_FILES,
        )


def _check_plot_path(path: Path) -> None:
    """Before the work, not after the plan is written: a format matplotlib writes, in a directory."""
    from matplotlib.figure import Figure

    from splitpoint.core.files import cannot_write_in

    formats = Figure().canvas.get_supported_filetypes()
    if path.suffix.lstrip(".").lower() not in formats:
        raise typer.BadParameter(f"--plot {path}: name a file ending in .{', .'.join(sorted(formats))}")
    if (why := cannot_write_in(path.parent)) is not None:
        raise typer.BadParameter(f"--plot {path}: {why}")


def _server_keys(
    secret: Path | None, allow: list[Path] | None, next_key: Path | None, deploy: list[Path] | None = None
) -> dict:
    """A server's or a relay's CurveZMQ keys, read and checked, as ServerConfig takes them."""
    from splitpoint.core.curve import read_public, read_secret

    return {
        "curve_secret_key": read_secret(secret) if secret else None,
        "curve_allow": tuple(read_public(p, "client's public key") for p in allow or ()),
        "deploy_allow": tuple(read_public(p, "deploy key's public key") for p in deploy or ()),
        "next_curve_server_key": read_public(next_key, "next stage's public key") if next_key else None,
    }


def _curve_pair(secret: Path | None, server_key: Path | None) -> None:
    """A device's own key serves only a CurveZMQ connection, which the server's public key makes: alone,
    it was ignored and the traffic went in plain text."""
    if secret and not server_key:
        raise typer.BadParameter(
            "--curve-secret is this device's key for a CurveZMQ server; without --curve-server-key (the "
            "server's public key) the connection is not encrypted and the key is not used: give both"
        )


def _seconds(option: str, value: float, zero: str | None = None) -> float:
    """A duration given on the command line: finite, above 0 (or 0 where ``zero`` says what it means),
    and within a year (time.sleep and monotonic deadlines overflow on 1e12)."""
    if not math.isfinite(value) or value < 0 or (value == 0 and zero is None) or value > 365 * 86_400:
        what = "0 or more" + f" ({zero})" if zero else "above 0"
        raise typer.BadParameter(
            f"{option} must be a number of seconds, {what} and at most a year, not {value:g}"
        )
    return value


def _codec_list(codecs: str | None) -> list[str] | None:
    """--codecs: None where not given; an empty list is a mistake, not "the default set"."""
    if codecs is None:
        return None
    names = [c.strip() for c in codecs.split(",") if c.strip()]
    if not names:
        raise typer.BadParameter("--codecs is empty: name at least one codec (or leave it out)")
    return names
