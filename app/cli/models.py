"""Model files in, model files out: the zoo, the cuts of a graph, a split into plan files, and
the fidelity of a split against the whole model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from splitpoint.core.errors import SplitPointError

from ..console import console, cuts_table, fidelity_table, human_bytes, table
from .common import Model, OneSample, Scores, Shapes, _print_json, app


@app.command()
def zoo(
    names: Annotated[
        list[str] | None, typer.Argument(help="zoo models to write (default: list them)")
    ] = None,
    out: Annotated[Path, typer.Option("-o", "--out", help="directory for the .onnx files")] = Path("."),
    width: Annotated[
        float, typer.Option(help="channel width multiplier (1.0 = published architecture)")
    ] = 1.0,
    resolution: Annotated[
        int | None, typer.Option(help="input resolution (default: the model's own)")
    ] = None,
    seed: Annotated[int, typer.Option(help="weight seed")] = 0,
) -> None:
    """List the built-in models, or write them as ONNX files (seeded weights, no download)."""
    from splitpoint.core import zoo as zoo_mod

    if not names:
        cols = ["name", "architecture", "params (published)", "GMACs (published)", "input"]
        console.print(table(None, cols, zoo_mod.listing(), 2))
        return
    for path, nodes in zoo_mod.write(names, out, width=width, resolution=resolution, seed=seed):
        console.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {nodes} nodes)")


@app.command()
def cuts(
    model: Model,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    input_shape: Shapes = None,
) -> None:
    """List every candidate cut: crossing tensors, bytes per sample, head share of MACs and params."""
    from splitpoint.core.graph import open_model
    from splitpoint.core.graph.shapes import parse_input_shapes

    h = open_model(model, parse_input_shapes(input_shape))
    if as_json:
        _print_json(
            {
                "model": str(h.path),
                "model_sha256": h.sha256,
                "compute_nodes": len(h.index.compute),
                # a batch the inputs fix: above 1, each cut's bytes_per_sample is a whole request's
                "fixed_batch": h.fixed_batch,
                "cuts": [c.to_dict() for c in h.cuts()],
            }
        )
    else:
        console.print(cuts_table(h.name, h.cuts(), h.fixed_batch))


@app.command()
def split(
    model: Model,
    cut: Annotated[
        list[str],
        typer.Option(
            help="cut index (see `splitpoint cuts`) or comma-separated tensor names; repeat it for a chain "
            "of devices, one cut index per hop, in increasing order"
        ),
    ],
    out: Annotated[Path, typer.Option("-o", "--out", help="plan directory to write")],
    codec: Annotated[
        list[str] | None, typer.Option(help="codec of each hop, in order (one for all, or one per cut)")
    ] = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="replace an earlier plan in the output directory (never other files)"),
    ] = False,
    with_full: Annotated[
        bool, typer.Option("--with-full", help="ship the whole model too (edge fallback)")
    ] = False,
    input_shape: Shapes = None,
    inputs: OneSample = None,
) -> None:
    """Write plan.json and one model per stage: head.onnx and tail.onnx for one cut; with several cuts,
    stage1.onnx, stage2.onnx, ... for the relays between."""
    from splitpoint.core.codecs import Codec
    from splitpoint.core.graph import open_model, resolve_cut
    from splitpoint.core.graph.shapes import parse_input_shapes
    from splitpoint.core.plan import check_target
    from splitpoint.core.plandir import write_plan

    codecs = list(codec or ["float32"])
    for name in codecs:  # before the model is opened, and one line (a pydantic traceback before)
        Codec.parse(name)
    check_target(out, force)
    h = open_model(model, parse_input_shapes(input_shape))
    if inputs is not None:
        h.take_sample_from(inputs)
    cuts = [resolve_cut(h.index, c) for c in cut]
    if len(codecs) == 1:
        codecs *= len(cuts)
    if len(codecs) != len(cuts):
        raise SplitPointError(f"--codec: give one codec, or one per --cut ({len(cuts)}); got {len(codecs)}")
    ends = [c.index if c.index is not None else -1 for c in cuts]
    if len(cuts) > 1 and (-1 in ends or ends != sorted(ends) or len(set(ends)) != len(ends)):
        got = ", ".join(cut)
        raise SplitPointError(f"--cut: a chain's cuts are cut indices in increasing order; got {got}")
    plan = write_plan(h, out, cuts=list(cuts), codecs=codecs, force=force, include_full=with_full)
    for i, (c, spec) in enumerate(zip(cuts, cut, strict=True)):
        crossing = escape(", ".join(t.name for t in plan.stages[i].sends))
        where = c.index if c.index is not None else escape(spec)
        hop = f"hop {i + 1}: " if len(cuts) > 1 else ""
        console.print(
            f"{hop}cut {where} crosses {crossing} ({human_bytes(c.bytes_per_sample)}/sample uncompressed, "
            f"sent as {plan.stages[i].codec}{_as_applied(plan.stages[i].codec, plan.stages[i].sends)})"
        )
    console.print(
        f"plan {plan.plan_id[:12]} → {escape(str(out))} "
        f"({len(plan.stages)} stage{'s' if len(plan.stages) != 1 else ''})"
    )


def _as_applied(codec: str, sends: list) -> str:
    """How a codec applies to these tensors, where its name alone misleads: 'float32' sends each tensor
    exact in its own type (a float16 model's as float16), and a quantising codec sends integer tensors
    (token ids) exact."""
    from splitpoint.core.codecs import Codec, applied_to

    types = sorted({t.dtype for t in sends})
    if Codec.parse(codec).lossless:
        return "" if types == ["float32"] else f": each tensor exact, in its own type ({', '.join(types)})"
    exact = [d for d in types if applied_to(codec, [d]) != codec]
    return f"; {', '.join(exact)} tensors go exact" if exact else ""


@app.command()
def fidelity(
    model: Model,
    cut: Annotated[str, typer.Option(help="cut index or comma-separated tensor names")],
    codec: Annotated[str, typer.Option(help="cut-tensor codec, e.g. int8+zstd")] = "int8",
    quantize_head: Annotated[
        str | None,
        typer.Option("--quantize-head-weights", help="static (QDQ, calibrated on the inputs) or dynamic"),
    ] = None,
    inputs: Annotated[
        Path | None,
        typer.Option(help="folder of samples: .npy or images (one input), .npz (an array per input)"),
    ] = None,
    random: Annotated[
        int | None,
        typer.Option(
            help="samples when no --inputs: seeded random (8), or rendered task inputs for a trained zoo "
            "model (64), as plan measures"
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    input_shape: Shapes = None,
    scores: Scores = None,
) -> None:
    """Measure the split model with a codec (and an int8 head) against the float model."""
    from splitpoint.partitioner.fidelity import measure_one

    if random is not None and random < 1:
        raise typer.BadParameter(f"--random must be at least 1 sample, not {random}")
    rep = measure_one(model, cut, codec, quantize_head, inputs, random, input_shape, scores)
    if as_json:
        _print_json(rep.to_dict())
        return
    where = rep.cut if rep.cut is not None else cut
    # "float32" names the unquantised head, whatever its weights' own type (a float16 export's stay float16)
    head = "head weights as in the model" if rep.head_weights == "float32" else f"head {rep.head_weights}"
    title = escape(f"{model} cut {where}, codec {codec}, {head}: measured on {rep.inputs}")
    console.print(fidelity_table(title, rep))
    if any(o.top1_agreement is None and o.exact_agreement is None for o in rep.outputs):
        console.print(
            "top-1 -: not class scores (a row per sample), or the unsplit model's top-1 is one class on "
            "every random input, where agreeing with it says nothing; the cosine tells there"
        )
    if rep.task is not None:  # the figure plan would use for this cut and codec, beside the tensor ones
        metrics = rep.task["metrics"]
        said = ", ".join(
            f"{k.replace('_', ' ')}{' (primary)' if k == rep.task['primary'] else ''} {m['value']:.3f} "
            f"[{m['low']:.3f}, {m['high']:.3f}]"
            for k, m in metrics.items()
        )
        console.print(f"{rep.task['task']} with the unsplit model, 95 % intervals (measured): {said}")
