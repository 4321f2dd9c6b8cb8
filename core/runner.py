"""Running a plan's head and tail in onnxruntime and putting the outputs back together.

The one place that knows how a plan routes tensors (which inputs feed the head, which raw
inputs cross, which outputs come from the head): the edge daemon, the server, the fidelity
runs and the tests all compose a split model through it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from .errors import SplitPointError
from .plan import HEAD_FILE, TAIL_FILE, Plan

_WEIGHT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
}


def _shared_weights(model: onnx.ModelProto, so: ort.SessionOptions) -> tuple[bytes, list]:
    """The model's bytes without its weights, which go to onnxruntime as arrays instead: serialising an
    extracted head or tail with its weights costs as much as building its session, every time."""
    light = onnx.ModelProto()
    light.CopyFrom(model)
    names, values = [], []
    for init in light.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL or not (init.raw_data or init.float_data):
            continue  # external files and the odd typed field stay as they are
        if init.data_type not in _WEIGHT_TYPES or int(np.prod(init.dims, dtype=np.int64)) < 1024:
            continue  # shapes, indices, small constants stay inline: onnxruntime reads them for shapes
        names.append(init.name)
        values.append(ort.OrtValue.ortvalue_from_numpy(numpy_helper.to_array(init)))
        init.ClearField("raw_data")
        init.ClearField("float_data")
        init.data_location = onnx.TensorProto.EXTERNAL
        entry = init.external_data.add()
        entry.key, entry.value = "location", "splitpoint-shared"  # never read: the arrays below win
    if names:
        so.add_external_initializers(names, values)
    return light.SerializeToString(), values


def make_session(
    model: str | Path | bytes | onnx.ModelProto,
    threads: int = 0,
    provider: str = "CPUExecutionProvider",
    enable_profiling: bool = False,
    optimization: str = "all",
) -> ort.InferenceSession:
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.graph_optimization_level = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    so.enable_profiling = enable_profiling
    if enable_profiling:  # onnxruntime writes its trace into the working directory unless told otherwise
        import tempfile

        so.profile_file_prefix = str(Path(tempfile.gettempdir()) / f"splitpoint-ort-{os.getpid()}")
    so.log_severity_level = 3
    available = ort.get_available_providers()
    if provider not in available:
        raise SplitPointError(
            f"execution provider {provider} is not available here (available: {', '.join(available)})"
        )
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    if isinstance(model, onnx.ModelProto):
        src, keep = _shared_weights(model, so)
        sess = ort.InferenceSession(src, sess_options=so, providers=providers)
        sess._splitpoint_weights = keep  # the arrays must outlive the session
        return sess
    return ort.InferenceSession(
        model if isinstance(model, bytes) else str(model), sess_options=so, providers=providers
    )


class HeadRunner:
    """Edge side: runs the head and returns the tensors to send (raw inputs that cross included)
    plus the final outputs the head already produced."""

    def __init__(self, plan: Plan, session: ort.InferenceSession | None):
        """``session`` is None for a server-only plan: the raw inputs are what is sent."""
        self.plan = plan
        self.session = session
        self.head_inputs = [i.name for i in session.get_inputs()] if session else []
        self.head_outputs = [o.name for o in session.get_outputs()] if session else []

    def run(self, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        missing = [i.name for i in self.plan.inputs if i.name not in feeds]
        if missing:
            raise SplitPointError(f"missing model input(s): {', '.join(missing)}")
        produced = (
            dict(
                zip(
                    self.head_outputs,
                    self.session.run(self.head_outputs, {k: feeds[k] for k in self.head_inputs}),
                    strict=True,
                )
            )
            if self.session
            else {}
        )
        sent = {
            t.name: (feeds[t.name] if t.side == "input" else produced[t.name]) for t in self.plan.cut_tensors
        }
        early = {o.name: produced[o.name] for o in self.plan.outputs if o.side == "head"}
        return sent, early


# onnxruntime's tensor types as numpy dtypes (those a cut tensor can have)
ORT_DTYPES: dict[str, np.dtype] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(bool)": np.dtype(np.bool_),
}


class TailRunner:
    """Server side: runs the tail on the received cut tensors."""

    def __init__(self, plan: Plan, session: ort.InferenceSession):
        self.plan = plan
        self.session = session
        self.outputs = [o.name for o in session.get_outputs()]
        self.inputs = {i.name: i for i in session.get_inputs()}
        self.cut_names = frozenset(t.name for t in plan.cut_tensors)
        # per input: (dtype or None, shape with None for a free dimension), worked out once, not per request
        self.expect: dict[str, tuple[np.dtype | None, tuple[int | None, ...]]] = {
            i.name: (ORT_DTYPES.get(i.type), tuple(d if isinstance(d, int) else None for d in i.shape))
            for i in session.get_inputs()
        }

    def run(self, cut: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.outputs, self.session.run(self.outputs, cut), strict=True))


def assemble(plan: Plan, early: dict[str, np.ndarray], late: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Final outputs in the original model's order."""
    return [early[o.name] if o.side == "head" else late[o.name] for o in plan.outputs]


def load_split(plan_dir: str | Path, threads: int = 0) -> tuple[Plan, HeadRunner, TailRunner | None]:
    """Both halves of a plan in this process (tests, fidelity runs, the edge's local fallback)."""
    plan = Plan.load(plan_dir)
    d = Path(plan_dir)
    head = make_session(d / HEAD_FILE, threads) if HEAD_FILE in plan.files else None
    tail = TailRunner(plan, make_session(d / TAIL_FILE, threads)) if TAIL_FILE in plan.files else None
    return plan, HeadRunner(plan, head), tail


def check_models_load(plan_dir: Path, plan: Plan) -> None:
    """Build a session for every model a plan carries (then drop it): what onnxruntime refuses, a
    deploy refuses, before anything is served from it."""
    for name in plan.files:
        if name.endswith(".onnx") and (Path(plan_dir) / name).is_file():
            make_session(Path(plan_dir) / name, threads=1)


def run_samples(
    session: ort.InferenceSession, samples: list[dict[str, np.ndarray]]
) -> list[list[np.ndarray]]:
    """Each one-sample feed's outputs, as the model returns them for that sample alone: one run when every
    input's batch dimension is free (split back by rows), else one run per sample (exporters often fix
    the batch at 1, and some outputs carry no batch dimension at all, e.g. a time-major CRNN's)."""
    names = [i.name for i in session.get_inputs()]
    free = all(i.shape and not isinstance(i.shape[0], int) for i in session.get_inputs())
    rows = [s[names[0]].shape[0] if names and np.ndim(s[names[0]]) else 0 for s in samples]
    if len(samples) > 1 and free and all(rows):
        outs = session.run(None, {n: np.concatenate([s[n] for s in samples]) for n in names})
        if all(o.ndim and o.shape[0] == sum(rows) for o in outs):
            bounds = np.cumsum(rows)[:-1]
            split = [np.split(o, bounds) for o in outs]
            first = session.run(None, {n: samples[0][n] for n in names})
            # a time-major output whose length happens to equal the batch would split wrongly: check one
            if all(a.shape == parts[0].shape for a, parts in zip(first, split, strict=True)):
                return [[parts[k] for parts in split] for k in range(len(samples))]
    return [session.run(None, {n: s[n] for n in names}) for s in samples]


def join(per_sample: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Per-sample outputs joined along the first axis (stacked where an output is a scalar), to compare."""
    return [np.concatenate(col) if col[0].ndim else np.stack(col) for col in zip(*per_sample, strict=True)]


def run_batched(session: ort.InferenceSession, samples: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """The outputs for several one-sample feeds, joined (see ``run_samples`` and ``join``)."""
    return join(run_samples(session, samples))
