"""The ``splitpoint`` command line: a thin layer over the library, one sub-command per job.

Every sub-command that takes a model accepts an ONNX path or a zoo name. Errors caused by
input print one specific line and exit 2; nothing is half-written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import SplitPointError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Split ONNX inference between an edge device and a server, chosen from measurements.")
console = Console()
err = Console(stderr=True)


def _human_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@app.command()
def zoo(
    names: list[str] = typer.Argument(None, help="zoo models to write (default: list them)"),
    out: Path = typer.Option(Path("."), "-o", "--out", help="directory for the .onnx files"),
    width: float = typer.Option(1.0, help="channel width multiplier (1.0 = published architecture)"),
    resolution: Optional[int] = typer.Option(None, help="input resolution (default: the model's own)"),
    seed: int = typer.Option(0, help="weight seed"),
) -> None:
    """List the built-in models, or write them as ONNX files (seeded random weights, no download)."""
    from . import zoo as zoo_mod
    from .onnxio import save_model

    if not names:
        t = Table("name", "architecture", "params (published)", "GMACs (published)", "input")
        for e in zoo_mod.ZOO.values():
            t.add_row(e.name, e.summary, f"{e.params:,}" if e.params else "-", f"{e.gmacs}" if e.gmacs else "-",
                      f"{e.resolution}x{e.resolution}")
        console.print(t)
        return
    out.mkdir(parents=True, exist_ok=True)
    for n in names:
        model = zoo_mod.build(n, width=width, resolution=resolution, seed=seed)
        path = out / f"{n}.onnx"
        save_model(model, path)
        console.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {len(model.graph.node)} nodes)")


@app.command()
def cuts(
    model: str = typer.Argument(..., help="ONNX file or zoo name"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """List every candidate cut: crossing tensors, bytes per sample, head share of MACs and params."""
    from .partitioner import open_model

    h = open_model(model)
    cs = h.cuts()
    if as_json:
        json.dump({"model": str(h.path), "model_sha256": h.sha256, "compute_nodes": len(h.index.compute),
                   "cuts": [c.to_dict() for c in cs]}, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return
    t = Table(title=f"{h.name}: {len(cs)} candidate cuts (bytes per sample, derived from shapes)")
    for col in ("cut", "after node", "crossing tensors", "bytes/sample", "head MACs", "head params"):
        t.add_column(col, justify="right" if col in ("cut", "bytes/sample", "head MACs", "head params") else "left")
    for c in cs:
        crossing = ", ".join(f"{x.name}[{x.shape}]{' (raw input)' if x.source == 'input' else ''}" for x in c.crossing)
        t.add_row(str(c.index), c.last_node, crossing, _human_bytes(c.bytes_per_sample),
                  f"{100 * c.head_macs_share:.1f}%", f"{100 * c.head_params_share:.1f}%")
    console.print(t)


@app.command()
def split(
    model: str = typer.Argument(..., help="ONNX file or zoo name"),
    cut: str = typer.Option(..., "--cut", help="cut index (see `splitpoint cuts`) or comma-separated tensor names"),
    out: Path = typer.Option(..., "-o", "--out", help="plan directory to write"),
    force: bool = typer.Option(False, "--force", help="replace a non-empty output directory"),
    with_full: bool = typer.Option(False, "--with-full", help="ship the whole model too (edge fallback)"),
) -> None:
    """Write head.onnx, tail.onnx and plan.json for one cut."""
    from .partitioner import open_model, resolve_cut
    from .partitioner.split import write_plan

    h = open_model(model)
    c = resolve_cut(h.index, cut)
    plan = write_plan(h.index, c, out, h.name, h.sha256, force=force, include_full=with_full)
    console.print(f"plan {plan.plan_id[:12]} → {out}: cut {c.index if c.index is not None else cut} crosses "
                  f"{', '.join(t.name for t in plan.cut_tensors)} ({_human_bytes(c.bytes_per_sample)}/sample)")


def main() -> None:
    try:
        app()
    except SplitPointError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
