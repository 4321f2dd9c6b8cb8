"""Task fidelity: what a split does to the answer, beside what it does to the tensors.

A cut compressed to int8 changes the output tensors a little; whether that changes the recognised text,
the detected box or the class is the question a user has. Given the float model's outputs and the split
model's outputs for the same samples (each a list of arrays in the model's output order), ``evaluate``
decodes both as the package that ships the model does and compares the answers, each metric with a 95 %
confidence interval: Wilson's interval for proportions, a bootstrap percentile interval for means.

- ``text-recognition``: greedy CTC decoding over ddddocr's character set. ``agreement`` (primary):
  the share of samples whose split text equals the float text; ``cer``: the mean character error rate
  of the split text against the float text (edit distance / float length). With the rendered truth:
  ``accuracy`` (float text == truth), ``accuracy_nocase``, ``truth_cer``, ``split_accuracy``.
- ``text-detection``: boxes decoded as ddddocr does (YOLOX grids, score = objectness x class >= 0.1,
  class-agnostic NMS at IoU 0.45), in input pixels. ``top_box_iou`` (primary): the mean IoU of the
  highest-scoring split box with the highest-scoring float box (1 when both find nothing, 0 when only
  one does); ``count_agreement``: the share of samples with as many boxes. With the truth: ``recall``
  and ``precision`` of the float boxes (a truth box is found by one box at IoU >= 0.5, one to one),
  per sample then averaged, and ``split_recall``.
- ``orientation``: ``agreement`` (primary): top-1 classes equal; with the truth, ``accuracy`` and
  ``split_accuracy``.
- every task: ``output_rel_l2``, the mean relative L2 error of the first output (a tensor metric, to
  set beside the task ones).

Pure functions of arrays: no onnxruntime here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from splitpoint.core.errors import SplitPointError
from splitpoint.core.zoo import ZOO
from splitpoint.core.zoo.trained import TASKS

Z95 = 1.959963984540054  # two-sided 95 % normal quantile
BOOTSTRAP_RESAMPLES = 2000
DET_SIZE = 416
DET_STRIDES = (8, 16, 32)
DET_SCORE, DET_NMS = 0.1, 0.45  # ddddocr's thresholds
MATCH_IOU = 0.5
PRIMARY = {"text-recognition": "agreement", "text-detection": "top_box_iou", "orientation": "agreement"}


@dataclass(frozen=True)
class Metric:
    """A point estimate with its 95 % confidence interval over ``n`` samples."""

    value: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}] (n={self.n})"


@dataclass(frozen=True)
class TaskReport:
    task: str
    metrics: dict[str, Metric]
    primary: str  # the metric a planner should use as "task fidelity" (higher is better)

    @property
    def fidelity(self) -> Metric:
        return self.metrics[self.primary]

    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "primary": self.primary,
            "metrics": {k: asdict(v) for k, v in self.metrics.items()},
        }


# -- intervals -------------------------------------------------------------------------------------------
def wilson(successes: int, n: int, z: float = Z95) -> Metric:
    """A proportion with Wilson's score interval (sound at 0 % and 100 %, unlike p +- z se)."""
    if n <= 0:
        return Metric(math.nan, 0.0, 1.0, 0)
    if not 0 <= successes <= n:
        raise ValueError(f"{successes} successes out of {n}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return Metric(p, min(low, p), max(high, p), n)


def bootstrap_mean(
    values: Sequence[float] | np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> Metric:
    """A mean with the bootstrap percentile interval (seeded: the same values give the same interval)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    n = x.size
    if n == 0:
        return Metric(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n == 1 or np.all(x == x[0]):
        return Metric(mean, mean, mean, n)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    low, high = (float(v) for v in np.percentile(means, [2.5, 97.5]))
    return Metric(mean, min(low, mean), max(high, mean), n)


# -- recognition -----------------------------------------------------------------------------------------
def ctc_greedy(logits: np.ndarray, charset: Sequence[str]) -> str:
    """ddddocr's decoding: argmax per time step, collapse repeats, drop the blank (index 0).
    ``logits``: T x 1 x C (the model's layout), 1 x T x C or T x C."""
    a = np.asarray(logits)
    if a.ndim == 3:
        a = a[:, 0, :] if a.shape[1] == 1 else a[0]
    if a.ndim != 2:
        raise SplitPointError(f"recogniser output must be T x 1 x C, 1 x T x C or T x C, got {logits.shape}")
    if a.shape[-1] != len(charset):
        raise SplitPointError(
            f"recogniser output has {a.shape[-1]} classes, the character set {len(charset)}"
        )
    idx = a.argmax(axis=-1)
    keep = idx[(idx != 0) & np.concatenate([[True], idx[1:] != idx[:-1]])]
    return "".join(charset[int(k)] for k in keep)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def cer(hypothesis: str, reference: str) -> float:
    """Character error rate of ``hypothesis`` against ``reference`` (0 when both are empty)."""
    return edit_distance(hypothesis, reference) / max(len(reference), 1)


# -- detection -------------------------------------------------------------------------------------------
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    grids, strides = [], []
    for s in DET_STRIDES:
        g = size // s
        xv, yv = np.meshgrid(np.arange(g), np.arange(g))
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((g * g, 1), s))
    return np.concatenate(grids).astype(np.float64), np.concatenate(strides).astype(np.float64)


def detect_boxes(output: np.ndarray, size: int = DET_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """ddddocr's detector decoding (``demo_postprocess`` then class-agnostic NMS): boxes k x 4
    ``[x1, y1, x2, y2]`` in input pixels (clipped to the input), highest score first, and their scores."""
    p = np.asarray(output, dtype=np.float64).reshape(-1, np.asarray(output).shape[-1])
    grid, stride = _grid(size)
    if p.shape[0] != grid.shape[0]:
        raise SplitPointError(
            f"detector output has {p.shape[0]} anchors, a {size}px input has {grid.shape[0]}"
        )
    xy = (p[:, :2] + grid) * stride
    with np.errstate(over="ignore"):
        wh = np.exp(p[:, 2:4]) * stride
    scores = p[:, 4:5] * p[:, 5:]
    cls = scores.argmax(1)
    score = scores[np.arange(len(cls)), cls]
    ok = (score > DET_SCORE) & np.isfinite(wh).all(1) & np.isfinite(xy).all(1)
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], 1)[ok]
    score = score[ok]
    keep = _nms(boxes, score, DET_NMS)
    return np.clip(boxes[keep], 0, size), score[keep]


def _nms(boxes: np.ndarray, scores: np.ndarray, thr: float) -> list[int]:
    """ddddocr's NMS (areas with its +1 pixel convention)."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort(kind="stable")[::-1]
    keep = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        w = np.maximum(0.0, np.minimum(x2[i], x2[order[1:]]) - np.maximum(x1[i], x1[order[1:]]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[order[1:]]) - np.maximum(y1[i], y1[order[1:]]) + 1)
        inter = w * h
        overlap = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[1:][overlap <= thr]
    return keep


def box_iou(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def match_count(found: np.ndarray, truth: Sequence[Sequence[float]], thr: float = MATCH_IOU) -> int:
    """How many truth boxes a found box matches at IoU >= ``thr``, one to one, best pairs first."""
    pairs = sorted(
        ((box_iou(f, t), i, j) for i, f in enumerate(found) for j, t in enumerate(truth)), reverse=True
    )
    used_f: set[int] = set()
    used_t: set[int] = set()
    for iou, i, j in pairs:
        if iou < thr:
            break
        if i not in used_f and j not in used_t:
            used_f.add(i)
            used_t.add(j)
    return len(used_t)


# -- evaluate --------------------------------------------------------------------------------------------
def _task(name: str) -> str:
    if name in TASKS:
        return name
    e = ZOO.get(name)
    if e is not None and e.task:
        return e.task
    raise SplitPointError(f"no task metrics for {name!r}: one of {', '.join(TASKS)} or a trained zoo model")


def _rel_l2(ref: np.ndarray, got: np.ndarray) -> float:
    r, g = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    return float(np.linalg.norm(g - r) / max(float(np.linalg.norm(r)), 1e-12))


def evaluate(
    task: str,
    reference: list[list[np.ndarray]],
    split: list[list[np.ndarray]],
    truths: list | None = None,
) -> TaskReport:
    """Task metrics of the split model's outputs against the float model's, per sample, with 95 %
    intervals. ``task``: a task name or a trained zoo model's name. ``truths`` (optional, as
    ``datasets.Sample.truth``) adds how good the float model itself is on these inputs."""
    t = _task(task)
    n = len(reference)
    if n == 0 or len(split) != n or (truths is not None and len(truths) != n):
        raise SplitPointError(
            f"need as many split outputs and truths as reference outputs, and at least one "
            f"(got {n} reference, {len(split)} split, {'no' if truths is None else len(truths)} truths)"
        )
    m: dict[str, Metric] = {}
    if t == "text-recognition":
        from splitpoint.core.zoo.trained import charset

        cs = charset()
        ref = [ctc_greedy(r[0], cs) for r in reference]
        got = [ctc_greedy(s[0], cs) for s in split]
        m["agreement"] = wilson(sum(a == b for a, b in zip(ref, got, strict=True)), n)
        m["cer"] = bootstrap_mean([cer(b, a) for a, b in zip(ref, got, strict=True)])
        if truths is not None:
            tr = [str(x) for x in truths]
            m["accuracy"] = wilson(sum(a == b for a, b in zip(ref, tr, strict=True)), n)
            m["accuracy_nocase"] = wilson(
                sum(a.lower() == b.lower() for a, b in zip(ref, tr, strict=True)), n
            )
            m["truth_cer"] = bootstrap_mean([cer(a, b) for a, b in zip(ref, tr, strict=True)])
            m["split_accuracy"] = wilson(sum(a == b for a, b in zip(got, tr, strict=True)), n)
    elif t == "text-detection":
        ref_b = [detect_boxes(r[0])[0] for r in reference]
        got_b = [detect_boxes(s[0])[0] for s in split]
        ious = [
            (1.0 if len(a) == len(b) else 0.0) if not (len(a) and len(b)) else box_iou(a[0], b[0])
            for a, b in zip(ref_b, got_b, strict=True)
        ]
        m["top_box_iou"] = bootstrap_mean(ious)
        m["count_agreement"] = wilson(sum(len(a) == len(b) for a, b in zip(ref_b, got_b, strict=True)), n)
        if truths is not None:
            rec = [match_count(f, tb) / len(tb) for f, tb in zip(ref_b, truths, strict=True) if len(tb)]
            prec = [match_count(f, tb) / len(f) for f, tb in zip(ref_b, truths, strict=True) if len(f)]
            srec = [match_count(f, tb) / len(tb) for f, tb in zip(got_b, truths, strict=True) if len(tb)]
            m["recall"] = bootstrap_mean(rec)
            m["precision"] = bootstrap_mean(prec)
            m["split_recall"] = bootstrap_mean(srec)
    else:
        ref_c = [int(np.asarray(r[0]).reshape(-1).argmax()) for r in reference]
        got_c = [int(np.asarray(s[0]).reshape(-1).argmax()) for s in split]
        m["agreement"] = wilson(sum(a == b for a, b in zip(ref_c, got_c, strict=True)), n)
        if truths is not None:
            tr_c = [int(x) for x in truths]
            m["accuracy"] = wilson(sum(a == b for a, b in zip(ref_c, tr_c, strict=True)), n)
            m["split_accuracy"] = wilson(sum(a == b for a, b in zip(got_c, tr_c, strict=True)), n)
    m["output_rel_l2"] = bootstrap_mean([_rel_l2(r[0], s[0]) for r, s in zip(reference, split, strict=True)])
    return TaskReport(t, m, PRIMARY[t])
