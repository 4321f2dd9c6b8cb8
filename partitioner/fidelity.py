"""Measured fidelity: the split model with a codec (and optionally an int8 head) against the
unsplit float model, on the same inputs. Never assumed from the codec's nominal precision."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from splitpoint.core.codecs import decode, encode
from splitpoint.core.errors import ModelError
from splitpoint.core.graph import ModelHandle
from splitpoint.core.graph.cuts import Cut
from splitpoint.core.graph.extract import extract
from splitpoint.core.graph.index import TensorInfo
from splitpoint.core.runner import Joined, Ragged, join, make_session, per_sample, run_batched, run_samples

SNR_CAP_DB = 300.0  # an exact match has infinite SNR; JSON needs a number
# samples over which a float model's top-1 that is one class on all of them makes top-1 uninformative
ONE_CLASS_MIN_SAMPLES = 8

log = logging.getLogger("splitpoint.fidelity")


@dataclass
class OutputFidelity:
    name: str
    top1_agreement: float | None  # for (N, classes) outputs
    # None for integer outputs: the cosine of a row of ids or of one class index is 1 whatever changed
    cosine: float | None
    max_abs_error: float  # over the samples whose split output has the float one's shape
    snr_db: float
    # samples whose split output has another shape than the float one (an output that follows the data)
    shape_mismatches: int = 0
    # integer and boolean outputs (token ids, class indices, masks): the share of elements equal, which is
    # what such an output's user compares; no top-1 (the position of the largest id means nothing)
    exact_agreement: float | None = None

    @property
    def primary(self) -> float:
        """This output's agreement with the float model: equal elements for an integer output, top-1 for
        class scores, else cosine similarity."""
        if self.exact_agreement is not None:
            return self.exact_agreement
        if self.top1_agreement is not None:
            return self.top1_agreement
        return self.cosine if self.cosine is not None else 0.0


@dataclass
class FidelityReport:
    cut: int | None
    codec: str
    head_weights: str
    samples: int
    outputs: list[OutputFidelity]
    task: dict | None = None  # taskmetrics.TaskReport.to_dict() for a model with a task (trained zoo entries)
    inputs: str | None = None  # what the samples were, and the model's weights ("8 random inputs (…)")

    @property
    def score(self) -> float:
        """One number for the planner: the task's primary metric where the model has a task (text
        agreement, top-box IoU, top-1 agreement on rendered inputs), else the worst output's agreement
        (``OutputFidelity.primary``). The worst of all outputs: a classifier's perfect top-1 once hid a
        second output's cosine of 0.88 and an integer output's wrong ids."""
        if self.task is not None:
            return float(self.task["metrics"][self.task["primary"]]["value"])
        return min(o.primary for o in self.outputs)

    def to_dict(self) -> dict:
        return {**asdict(self), "score": self.score}


# what makes a [batch, N] output features, not class scores: an embedding (BERT's tanh pooler, a
# layer-normalised or L2-normalised vector), whose largest element means nothing and moves with the
# smallest error. Seen through ops that only reshape or retype. Not in it, as they also end classifiers:
# a pool or a mean (SqueezeNet's logits, a keyword spotter's frames averaged), a ReLU or a batch norm, a
# division (a temperature), a slice or a gather (a language model's last position)
FEATURE_OPS = {
    "Tanh",
    "Gelu",
    "FastGelu",
    "LayerNormalization",
    "SimplifiedLayerNormalization",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "LpNormalization",
}
_PASS_THROUGH = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Cast"}


def feature_outputs(idx) -> set[str]:
    """The model's outputs a feature op makes (``FEATURE_OPS``): compared by cosine, not by their top-1,
    unless ``--scores`` names them."""
    out = set()
    for name in idx.outputs:
        t, seen = name, 0
        while t in idx.producer and seen < 16:
            node = idx.nodes[idx.producer[t]]
            if node.op_type not in _PASS_THROUGH or not node.input:
                if node.op_type in FEATURE_OPS:
                    out.add(name)
                break
            t, seen = node.input[0], seen + 1
    return out


# an output holding an infinity or NaN (the model's own, or a codec's) measures as such (cosine 0, error
# inf, the SNR floor), said in the table: numpy's warnings about it were printed into the plan's output
@np.errstate(all="ignore")
def compare(
    name: str,
    ref: Joined,
    got: Joined,
    n: int = 1,
    axis: int | None = None,
    scores: bool = True,
    rows_per_sample: int = 1,
    random_inputs: bool = True,
) -> OutputFidelity:
    """One output of ``n`` samples, split against float. An output whose shape follows the data (NonZero,
    TopK with k an input) is compared sample by sample, and a sample whose split shape differs from the
    float one counts as wholly wrong: nothing of it lines up. ``axis``: the output holds class scores
    along it (``--scores``), and top-1 is the share of positions whose largest score is the same one.
    ``scores``: a [batch, N] output may be class scores (False: features, compared by cosine), where it
    has ``rows_per_sample`` rows per sample (a model's fixed batch). ``random_inputs``: the samples are
    seeded random ones, on which a float model answering one class throughout says nothing (a user's own
    samples of one class are what that user asks about: top-1 stays)."""
    if isinstance(ref, Ragged) or isinstance(got, Ragged) or ref.shape != got.shape:
        # a float output whose shape follows the data (detections) is never a batch of score rows
        score_rows = scores and not isinstance(ref, Ragged)
        return _compare_samples(
            name, per_sample(ref, n), per_sample(got, n), axis, score_rows, rows_per_sample
        )
    exact = _discrete(ref)
    if ref.size == 0:  # empty in both, shapes equal: nothing can differ
        if exact:
            return OutputFidelity(name, None, None, 0.0, SNR_CAP_DB, exact_agreement=1.0)
        return OutputFidelity(name, None, 1.0, 0.0, SNR_CAP_DB)
    equal = float(np.mean(ref == got)) if exact else None
    ref = ref.astype(np.float64)
    got = got.astype(np.float64)
    rows = ref.shape[0] if ref.ndim else 1
    r, g = ref.reshape(rows, -1), got.reshape(rows, -1)
    if axis is not None and not exact and ref.ndim:
        if not -ref.ndim <= axis < ref.ndim:
            raise ModelError(f"--scores {name}:{axis}: {name} has {ref.ndim} dimensions at run time")
        top1: float | None = float(np.mean(ref.argmax(axis) == got.argmax(axis)))
    else:
        # a row per sample: a detector's [N, 4] boxes, equal in shape on every sample (none found, or NMS
        # at its cap), have rows that are not samples, and their largest element is a coordinate
        classes = scores and ref.ndim == 2 and ref.shape[1] > 1 and rows == n * rows_per_sample and not exact
        ref_top = r.argmax(1)
        # the float model's top-1 one class on every one of many random samples (a random-weight network's,
        # or a trained one's on noise): agreeing with it says nothing of the split (a 3 dB split of
        # EfficientNet-B0 scored 1.000 so, and was picked), and its cosine does. Over a few samples one
        # class is chance, and top-1 still tells
        if classes and random_inputs and n >= ONE_CLASS_MIN_SAMPLES and ref_top.min() == ref_top.max():
            classes = False
        top1 = float(np.mean(ref_top == g.argmax(1))) if classes else None
    # what equal infinities (a mask's -inf in both) or NaNs in both (the float model's own, which the split
    # reproduces) share counts as agreement, not as a NaN cosine; an infinity or NaN of the split's own
    # agrees with nothing (0)
    same = ((r == g) & ~np.isfinite(r)) | (np.isnan(r) & np.isnan(g))
    if same.any():
        r, g = np.where(same, 0.0, r), np.where(same, 0.0, g)
    cr, cg, share = r, g, 1.0  # the rows a cosine is taken of, and the share of the samples they are
    if r.shape[1] == 1 and rows > 1:
        # one value per row (a voice detector's speech probability, [N] or [N, 1]) has no direction of its
        # own, and its cosine is 1 whatever the error but a sign: compared over the samples, as a vector
        # (int4 at 21.5 dB SNR read 1.00000 and flipped 2 of 48 decisions), of which a sample the split
        # made infinite or NaN is left out, as a row that agrees with nothing (not the whole output)
        ok = np.isfinite(r[:, 0]) & np.isfinite(g[:, 0])
        cr, cg, share = r[ok].reshape(1, -1), g[ok].reshape(1, -1), float(ok.mean())
    rn, gn = np.linalg.norm(cr, axis=1), np.linalg.norm(cg, axis=1)
    denom = rn * gn
    # a row of zeros against one that is not has no direction in common: 0 (it read as 1, and an int8
    # head that rounded a softmax of a thousand classes to all zeros measured fidelity 1.000). Where the
    # float row is the zero one, a split row of mere rounding noise (1 % of the output's typical row)
    # still agrees: a codec's zero point may not land on 0 exactly
    cos = np.where(denom > 0, (cr * cg).sum(1) / np.where(denom > 0, denom, 1), 0.0)
    cos[~np.isfinite(cos)] = 0.0
    typical = float(np.median(rn[rn > 0])) if (rn > 0).any() else 0.0
    cos[(rn == 0) & (gn <= 0.01 * typical)] = 1.0
    cos[(cr == cg).all(axis=1)] = 1.0  # equal rows (zeros in both included): exactly 1, not a rounding of it
    noise = _noise(r, g)
    signal = float((r[np.isfinite(r)] ** 2).sum())
    worst = float(np.abs(r - g).max())
    return OutputFidelity(
        name,
        top1,
        None if exact else float(cos.mean()) * share,
        worst if not np.isnan(worst) else float("inf"),
        _snr(signal, noise),
        exact_agreement=equal,
    )


Rule = tuple[int | None, bool, int]  # compare()'s axis, scores and rows_per_sample for one output


def comparison_rules(handle: ModelHandle) -> list[Rule]:
    """How each output of the model (in order) is compared: the axis its user named (``--scores``),
    whether it may be class scores (not features), and its rows per sample (the model's fixed batch)."""
    features = feature_outputs(handle.index)
    k = handle.fixed_batch or 1
    return [(handle.score_axes.get(name), name not in features, k) for name in handle.index.outputs]


def compare_outputs(
    handle: ModelHandle, refs: Sequence[Joined], gots: Sequence[Joined], n: int
) -> list[OutputFidelity]:
    """Every output of the model, split against float, each by the rule its user named (``--scores``)
    or the default one: the one place the planner, the chain planner and ``fidelity`` compare outputs
    (the bench's edge runner gets the same ``comparison_rules``)."""
    random_inputs = handle.given_sample is None and handle.task is None
    return [
        compare(name, r, g, n, *rule, random_inputs=random_inputs)
        for name, r, g, rule in zip(handle.index.outputs, refs, gots, comparison_rules(handle), strict=True)
    ]


def _discrete(a: np.ndarray) -> bool:
    """Integers and booleans: compared element by element, not as scores."""
    return bool(np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_)


def _noise(r: np.ndarray, g: np.ndarray) -> float:
    """The squared error's sum, where equal infinities differ by nothing (inf - inf is NaN)."""
    return float((np.where(r == g, 0.0, r - g) ** 2).sum())


def _snr(signal: float, noise: float) -> float:
    """In dB, capped both ways: an error that is infinite or NaN (the split made an infinity the float
    model did not) is the floor, where ``min`` with a NaN returned the cap and read as perfect."""
    if noise == 0:
        return SNR_CAP_DB
    if not np.isfinite(noise):
        return -SNR_CAP_DB
    return float(np.clip(10 * np.log10(max(signal, 1e-30) / noise), -SNR_CAP_DB, SNR_CAP_DB))


@np.errstate(all="ignore")  # as compare(): infinities measure as such, unwarned
def _compare_samples(
    name: str,
    refs: list[np.ndarray],
    gots: list[np.ndarray],
    axis: int | None = None,
    rows: bool = False,
    rows_per_sample: int = 1,
) -> OutputFidelity:
    """``rows``: the float output has a row of scores per sample (a joined [batch, classes]), which a split
    of another shape failed to keep."""
    if len(refs) != len(gots):
        raise ValueError(f"output {name}: {len(refs)} float samples against {len(gots)} split ones")
    cosines: list[float] = []
    exact = bool(refs) and all(_discrete(r) for r in refs)
    equal: list[float] | None = [] if exact else None
    # an output whose shape follows the data is detections or the like, never a batch of score rows (the
    # argmax of an NMS's [N, 4] boxes picked a coordinate): top-1 there only where --scores names it
    scores = axis is not None or (rows and all(r.ndim == 2 and r.shape[1] > 1 for r in refs))
    top1: list[float] | None = [] if not exact and scores else None
    worst, signal, noise, mismatched = 0.0, 0.0, 0.0, 0
    for ref, got in zip(refs, gots, strict=True):
        r, g = ref.astype(np.float64), got.astype(np.float64)
        signal += float((r[np.isfinite(r)] ** 2).sum())
        if r.shape != g.shape:
            noise += float((r**2).sum() + (g**2).sum())
            if not exact:
                cosines.append(0.0)
            for acc in (top1, equal):
                if acc is not None:
                    acc.append(0.0)
            mismatched += 1
            continue
        one = compare(name, ref, got, axis=axis, rows_per_sample=rows_per_sample)
        noise += _noise(r, g)
        if one.cosine is not None:
            cosines.append(one.cosine)
        if top1 is not None:  # empty in both (no detection either way): nothing differs
            top1.append(one.top1_agreement if one.top1_agreement is not None else float(r.size == 0))
        if equal is not None:
            equal.append(one.exact_agreement if one.exact_agreement is not None else 0.0)
        worst = max(worst, one.max_abs_error)
    return OutputFidelity(
        name,
        float(np.mean(top1)) if top1 else None,
        None if exact else float(np.mean(cosines)) if cosines else 1.0,
        worst,
        _snr(signal, noise),
        mismatched,
        float(np.mean(equal)) if equal else None,
    )


def task_report(
    task: str | None,
    reference: Sequence[Joined],
    split: Sequence[Joined],
    n: int,
    truths: list | None,
) -> dict | None:
    """Task metrics (with 95 % intervals) of a split's outputs against the float model's, per sample."""
    if task is None:
        return None
    from .taskmetrics import evaluate

    def samples(outs: Sequence[Joined]) -> list[list[np.ndarray]]:
        parts = [per_sample(o, n) for o in outs]
        return [[p[k] for p in parts] for k in range(n)]

    return evaluate(task, samples(reference), samples(split), truths).to_dict()


def received_digest(received: list[dict[str, np.ndarray]]) -> bytes:
    """What a receiver decodes from every sample, as one digest: codecs whose payloads decode to
    identical tensors (one base, another lossless stage) share one run of what follows."""
    return hashlib.sha256(
        b"".join(np.ascontiguousarray(r[name]).tobytes() for r in received for name in sorted(r))
    ).digest()


def _score_spec(spec: str, outputs: Sequence[str]) -> tuple[str, str]:
    """``NAME[:AXIS]`` as (name, axis text): an output's own name may hold a colon (tf2onnx's
    ``logits:0``), so the whole spec is a name first."""
    if spec in outputs or ":" not in spec:
        return spec, "-1"
    name, _, axis = spec.rpartition(":")
    return name, axis


def scores_for(handle: ModelHandle, specs: Sequence[str]) -> list[str]:
    """The ``--scores`` specs that name an output of this model: a bench applies each to the models that
    have that output."""
    return [s for s in specs if _score_spec(s, handle.index.outputs)[0] in handle.index.outputs]


def set_score_axes(handle: ModelHandle, specs: Sequence[str] | None) -> None:
    """``--scores NAME[:AXIS]`` (repeatable): outputs whose top-1 along AXIS (default the last) is what a
    user compares, a language model's [batch, tokens, vocab] logits or a segmenter's [batch, classes, H, W]
    masks. Cosine hid them: int4 scored 0.997 on a token model while 15 % of its tokens changed. No rule
    can tell such an output from a detector's [1, 84, 8400], whose largest value along any axis means
    nothing, so the user says which. Refused before any work: an output the model lacks, an integer one,
    an axis past its rank, or the batch's axis."""
    axes: dict[str, int] = {}
    for spec in specs or ():
        name, axis_text = _score_spec(spec, handle.index.outputs)
        if name not in handle.index.outputs:
            raise ModelError(
                f"--scores {spec}: the model has no output {name!r} (its outputs: "
                f"{', '.join(handle.index.outputs[:8])})"
            )
        try:
            axis = int(axis_text)
        except ValueError:
            raise ModelError(f"--scores {spec}: the axis must be an integer, e.g. {name}:-1") from None
        try:  # a type inference left open is found by a trial run, as a cut's is
            info: TensorInfo | None = handle.index.tensor(name)
        except ModelError:
            info = handle.index.info.get(name)
        rank = len(info.dims) if info is not None and info.dims is not None else None
        if axis == 0:
            raise ModelError(f"--scores {spec}: axis 0 is the batch's; name the class axis, e.g. {name}:-1")
        if info is not None and (np.issubdtype(np.dtype(info.dtype), np.integer) or info.dtype == "bool"):
            raise ModelError(f"--scores {spec}: {name} is {info.dtype}, compared element by element already")
        if rank is not None and rank < 2:
            raise ModelError(f"--scores {spec}: {name} has {rank} dimension(s): no axis beside the batch's")
        if rank is not None and not (-rank <= axis < rank and axis % rank != 0):
            raise ModelError(
                f"--scores {spec}: {name} has {rank} dimensions; the class axis is one of 1 to {rank - 1} "
                "(or -1 for the last), not the batch's"
            )
        axes[name] = axis
    handle.score_axes = axes


def warn_if_constant(reference: Sequence[Joined], n: int, given: bool = False) -> bool:
    """Whether the unsplit model answered the same on every sample, said once as a warning: any split then
    scores perfect (an audio front end whose seeded random lengths masked every frame answered zeros, and
    an int8 split read as exact where real audio put an error of 4.9 on it). ``given``: the samples are the
    user's own (``--inputs``), which the way out is then about."""
    if n < 2:
        return False
    for ref in reference:
        rows = per_sample(ref, n)
        if len(rows) != n or any(
            r.shape != rows[0].shape or not np.array_equal(r, rows[0]) for r in rows[1:]
        ):
            return False
    way_out = (
        "the samples given are alike as far as the model tells: give samples that differ"
        if given
        else "on seeded random inputs: give --inputs with real values: lengths, masks, ids"
    )
    log.warning(
        "the unsplit model gives the same outputs on all %d samples: every split then agrees with it, so "
        "this fidelity says little (%s)",
        n,
        way_out,
    )
    return True


def measure(
    handle: ModelHandle,
    cut: Cut,
    codecs: list[str],
    samples: list[dict[str, np.ndarray]],
    head_model: onnx.ModelProto | None = None,
    head_weights: str = "float32",
    reference: list[Joined] | None = None,
    truths: list | None = None,
) -> dict[str, FidelityReport]:
    """Fidelity of each codec at one cut. Each sample is encoded on its own, as the edge does."""
    if reference is None:
        reference = run_batched(handle.whole_session(), samples)
        warn_if_constant(reference, len(samples), handle.given_sample is not None)
    head, tail = extract(handle.index, cut, check=False, shared_weights=True)
    weights = handle.index.weight_array
    hs = make_session(head_model or head, weights=weights)
    ts = make_session(tail, weights=weights)
    head_names = [o.name for o in hs.get_outputs()]
    head_runs = run_samples(hs, samples)
    h_out = dict(zip(head_names, join(head_runs), strict=True))
    tail_names = [o.name for o in ts.get_outputs()]
    n = len(samples)
    # per sample, as the edge sends them: never joined and split again (a scalar would gain a dimension)
    head_by_name = [dict(zip(head_names, run, strict=True)) for run in head_runs]
    per_sample = [
        {c.name: (samples[k] if c.source == "input" else head_by_name[k])[c.name] for c in cut.crossing}
        for k in range(n)
    ]
    reports = {}
    runs: dict[bytes, dict] = {}  # codecs that decode to identical tensors share one tail run
    for codec in codecs:
        received = [{name: decode(encode(t, codec)) for name, t in s.items()} for s in per_sample]
        digest = received_digest(received)
        if digest not in runs:
            runs[digest] = dict(zip(tail_names, run_batched(ts, received), strict=True))
        late = runs[digest]
        got = [h_out[name] if name in cut.head_outputs else late[name] for name in handle.index.outputs]
        outs = compare_outputs(handle, reference, got, n)
        task = task_report(handle.task, reference, got, n, truths)
        reports[codec] = FidelityReport(cut.index, codec, head_weights, n, outs, task)
    return reports


def measure_one(
    model: str,
    cut_spec: str,
    codec: str,
    quantize: str | None = None,
    inputs: Path | None = None,
    random: int | None = None,
    input_shapes: list[str] | None = None,
    scores: list[str] | None = None,
) -> FidelityReport:
    """``splitpoint fidelity``: one cut, one codec, optionally an int8 head, against the float model. Its
    samples are those ``plan`` measures on (a trained zoo model's rendered task inputs, with their task
    metrics), so that the two commands agree."""
    from splitpoint.core import zoo
    from splitpoint.core.codecs import Codec
    from splitpoint.core.graph import open_model, resolve_cut
    from splitpoint.core.graph.shapes import parse_input_shapes
    from splitpoint.core.quantize import quantize_head
    from splitpoint.core.samples import sample_shapes

    Codec.parse(codec)
    shapes = parse_input_shapes(input_shapes)
    if inputs is not None:  # the samples' own sizes, where the model leaves them open and none was given
        try:
            declared = onnx.load(zoo.resolve(model), load_external_data=False)
        except Exception:  # noqa: BLE001 - open_model names what is wrong with the file
            declared = None
        if declared is not None:
            shapes = {**sample_shapes(declared, inputs), **shapes}
    handle = open_model(model, shapes)
    set_score_axes(handle, scores)
    cut = resolve_cut(handle.index, cut_spec)
    n = random or (64 if handle.task else 8)  # plan's own defaults
    samples, truths, measured_on = handle.fidelity_samples(n, inputs)
    with handle.sample_runs():
        head_model = (
            quantize_head(extract(handle.index, cut, check=False)[0], samples, quantize) if quantize else None
        )
        weights = f"int8-{quantize}" if quantize else "float32"
        rep = measure(
            handle, cut, [codec], samples, head_model=head_model, head_weights=weights, truths=truths
        )
    rep[codec].inputs = measured_on
    return rep[codec]
