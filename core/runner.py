"""Running a plan's stages in onnxruntime and putting the outputs back together.

The one place that knows how a plan routes tensors (which inputs feed the head, which raw inputs
cross, which tensors a relay passes through, which outputs come from which stage): the edge daemon,
the server, relays, the fidelity runs and the tests all compose a split model through it.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import glob
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import psutil
from onnx import numpy_helper

from .codecs import DTYPES
from .errors import ModelError, PlanError, SplitPointError
from .files import utf8_path
from .plan import FULL_FILE, HEAD_FILE, PAST_RE, TAIL_FILE, Plan, TensorSpec
from .subgraphs import node_inputs
from .weights import is_stub, shareable, stub


def _shared_weights(
    model: onnx.ModelProto, so: ort.SessionOptions, weights: Callable[[str], np.ndarray] | None
) -> tuple[bytes, list]:
    """The model's bytes without its large weights, which go to onnxruntime as arrays instead: stubs
    (``core/weights.py``) take theirs from ``weights``; inline ones are read out of a copy of the model
    (serialising an extracted head or tail with its weights costs as much as building its session)."""
    g = model.graph
    read = {t for n in g.node for t in node_inputs(n)} | {v.name for v in [*g.input, *g.output]}
    # a weight no node reads (nor the graph lists as an input or an output) is dropped before onnxruntime
    # is handed it: onnxruntime removes such an initializer, then fails to find it ("Failed to find
    # existing initializer"); an export carries some
    unread = [t.name for t in model.graph.initializer if t.name not in read]
    inline = any(shareable(t) for t in model.graph.initializer)
    light = model
    if inline or unread:
        light = onnx.ModelProto()
        light.CopyFrom(model)
    if unread:
        kept = [t for t in light.graph.initializer if t.name in read]
        del light.graph.initializer[:]
        light.graph.initializer.extend(kept)
    names, values = [], []
    for init in light.graph.initializer:
        if is_stub(init):
            if weights is None:
                raise SplitPointError(f"weight {init.name!r} is shared but no arrays were given for it")
            array = weights(init.name)
        elif shareable(init):  # there are some only when ``light`` is a copy
            array = numpy_helper.to_array(init)
            init.CopyFrom(stub(init))
        else:
            continue
        names.append(init.name)
        values.append(ort.OrtValue.ortvalue_from_numpy(array))
    if names:
        so.add_external_initializers(names, values)
    return light.SerializeToString(), values


def make_session(
    model: str | Path | bytes | onnx.ModelProto,
    threads: int = 0,
    provider: str = "CPUExecutionProvider",
    enable_profiling: bool = False,
    optimization: str = "all",
    weights: Callable[[str], np.ndarray] | None = None,
    prepack: bool = True,
    arena: bool = True,
) -> ort.InferenceSession:
    """``weights``: the arrays of a model part's shared weights by name (``GraphIndex.weight_array``).
    ``prepack=False`` for a session run once or twice (a split's trial run): onnxruntime's repacking
    of MatMul/Gemm/Conv weights pays off over many runs, and costs 0.5 s of a 0.8 s trial on AlexNet.
    ``arena=False`` where the outputs are kept (a decoder's KV caches): onnxruntime's CPU arena grows
    to the most they ever held and never gives it back, where plain allocations can be (``trim_heap``)."""
    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = arena
    # the pool's threads stop spinning when a run ends. A process holds several sessions that run in
    # turn (head and tail in the profiler, a plan set's members, the edge's fallback model, a server's
    # plans): a pool left spinning held the cores the next session's threads needed, and with as many
    # threads as cores the next run took 2-5x its time. Back-to-back runs of one session lose <2 %
    so.add_session_config_entry("session.force_spinning_stop", "1")
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
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
        _remove_traces_at_exit(so.profile_file_prefix)
    # fatal only: a failing run raises with onnxruntime's message, which callers report (one line on the
    # CLI, an error reply on a server); its logger printing the same message first, in colour, doubled it
    so.log_severity_level = 4
    available = ort.get_available_providers()
    if provider not in available:
        raise SplitPointError(
            f"execution provider {provider} is not available here (available: {', '.join(available)})"
        )
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    if isinstance(model, onnx.ModelProto):
        src, keep = _shared_weights(model, so, weights)
        try:
            sess = _session(src, so, providers)
        except Exception as exc:  # onnxruntime's own error types
            if _SUBGRAPH_INFERENCE not in str(exc):
                raise
            sess = _session(_sizes_left_to_the_run(src), so, providers)
            sess._splitpoint_sizes_open = True  # its inputs' sizes are the plan's to check (StageRunner)
        sess._splitpoint_weights = keep  # the arrays must outlive the session
        return sess
    try:
        return _session(model if isinstance(model, bytes) else utf8_path(model), so, providers)
    except Exception as exc:  # onnxruntime's own error types
        if _SUBGRAPH_INFERENCE not in str(exc):
            raise
        # the file as a model in memory (external data read in), whose sizes the branch above leaves open
        loaded = onnx.load_model_from_string(model) if isinstance(model, bytes) else onnx.load(str(model))
        return make_session(
            loaded, threads, provider, enable_profiling, optimization, weights, prepack, arena
        )


# onnxruntime's refusal of a model stamped with an opset newer than it runs: a paragraph whose reason
# comes last, after the C++ signature of the function that refused it
_OPSET_TOO_NEW = re.compile(
    r"Opset (\d+) is under development.*support for domain (\S+) is till opset (\d+)", re.S
)


# onnxruntime type-checks every branch of an If (and a Loop's body) at the sizes the graph declares: a branch
# the inputs never take may not check at them (silero-vad's 8 kHz branch, its LSTM given a rank-2 tensor
# once the input is fixed at 1x512 for 16 kHz), and the model ran only with its sizes left unknown
_SUBGRAPH_INFERENCE = "Graph attribute inferencing failed"


def _sizes_left_to_the_run(src: bytes) -> bytes:
    """``src`` (a model's bytes, weights outside) with its inputs' and outputs' sizes unnamed symbols of
    their own and no inferred shapes inside: onnxruntime then checks a branch's types, not its sizes, and
    the run meets the real ones (SplitPoint checks what it sends against the plan's shapes itself)."""
    m = onnx.load_model_from_string(src)
    g = m.graph
    weights = {t.name for t in g.initializer}
    for vi in [*g.input, *g.output]:
        if vi.name in weights or not vi.type.HasField("tensor_type"):
            continue
        for k, d in enumerate(vi.type.tensor_type.shape.dim):
            d.Clear()
            d.dim_param = f"{vi.name}__size{k}"
    del g.value_info[:]
    return m.SerializeToString()


def _session(src: str | bytes, so: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(src, sess_options=so, providers=providers)
    except Exception as exc:  # onnxruntime's own error types
        too_new = _OPSET_TOO_NEW.search(str(exc))
        if too_new is None:
            raise
        used, domain, top = too_new.groups()
        raise ModelError(
            f"the model is stamped with opset {used} of {domain}, and onnxruntime {ort.__version__} runs up "
            f"to opset {top}: export it at opset {top} or lower, or upgrade onnxruntime"
        ) from exc


@functools.cache
def _remove_traces_at_exit(prefix: str) -> None:
    """Remove this process's onnxruntime traces as it exits: a profiling session interrupted while it was
    built (Ctrl-C) writes its trace when it is destroyed, after every handler of the interruption ran."""

    def remove() -> None:
        gc.collect()  # a session still held by a cycle writes its trace now
        for f in glob.glob(glob.escape(prefix) + "_*.json"):  # onnxruntime's PREFIX_DATE.json: this pid's
            with contextlib.suppress(OSError):
                os.unlink(f)

    atexit.register(remove)


# onnxruntime's tensor types ("tensor(float)") as numpy dtypes, for every dtype a payload carries: the
# types a cut tensor, a model input or a model output can have
ORT_DTYPES: dict[str, np.dtype] = {
    f"tensor({onnx.TensorProto.DataType.Name(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(d))).lower()})": (
        np.dtype(d)
    )
    for d in DTYPES
}
_SPEC_DTYPES = {d: np.dtype(d) for d in DTYPES}

# dtype (None: any) and shape: a size, a symbol (the same symbol is the same size in every tensor of one
# request, as in ONNX: the batch shared by two cut tensors), or None (any size)
Expect = tuple[np.dtype | None, tuple[int | str | None, ...]]
# an output's expectation: as Expect, its shape None where the plan does not know it (any shape)
OutputExpect = tuple[np.dtype | None, tuple[int | str | None, ...] | None]


class StageRunner:
    """One stage of a plan: its segment run on what it received (the model's inputs, for stage 0), and
    what goes on: the tensors the next stage needs (computed here, or received and passed through) and
    the model outputs computed here. Edge, relays, server, fidelity runs and tests all route through it."""

    def __init__(self, plan: Plan, index: int, session: ort.InferenceSession | None):
        """``session`` is None for a stage that runs nothing (the edge of a server-only plan)."""
        self.plan, self.index, self.session = plan, index, session
        stage = plan.stages[index]
        self.stage = stage
        self.last = index == len(plan.stages) - 1
        self.run_inputs = [i.name for i in session.get_inputs()] if session else []
        self.run_outputs = [o.name for o in session.get_outputs()] if session else []
        self.sends = [t.name for t in stage.sends]
        self.produces = list(stage.produces)
        self.receives = [t.name for t in stage.receives] if index else [t.name for t in plan.inputs]
        self.cut_names = frozenset(self.receives)
        # per received tensor: (dtype or None, shape), worked out once, from the session where it reads
        # the tensor, else from the plan (a tensor passed through)
        by_session = {
            i.name: (
                ORT_DTYPES.get(i.type),
                tuple(d if isinstance(d, int | str) and d != "" else None for d in i.shape),
            )
            for i in (session.get_inputs() if session else [])
        }
        specs = {t.name: t for t in (stage.receives if index else plan.inputs)}
        self.expect: dict[str, Expect] = {
            n: by_session.get(n) or (_SPEC_DTYPES.get(specs[n].dtype), _spec_shape(specs[n].shape))
            for n in self.receives
        }
        if getattr(session, "_splitpoint_sizes_open", False):  # a session whose sizes were left open
            self.expect = {n: (dt, _spec_shape(specs[n].shape)) for n, (dt, _) in self.expect.items()}

    @classmethod
    def of_segment(
        cls, receives: list[str], sends: list[str], produces: list[str], session: ort.InferenceSession | None
    ) -> StageRunner:
        """A stage from an extracted segment, before any plan is written (fidelity runs of a chain)."""
        r = cls.__new__(cls)
        r.session, r.receives, r.sends, r.produces = session, list(receives), list(sends), list(produces)
        r.run_inputs = [i.name for i in session.get_inputs()] if session else []
        r.run_outputs = [o.name for o in session.get_outputs()] if session else []
        r.last = not sends
        return r

    def run(self, received: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(tensors for the next stage, model outputs computed here)."""
        missing = [n for n in self.receives if n not in received]
        if missing:
            what = "model input" if self.index == 0 else "tensor"
            raise SplitPointError(f"missing {what}(s): {', '.join(missing)}")
        produced = (
            dict(
                zip(
                    self.run_outputs,
                    self.session.run(self.run_outputs, {k: received[k] for k in self.run_inputs}),
                    strict=True,
                )
            )
            if self.session
            else {}
        )
        sends = {n: produced[n] if n in produced else received[n] for n in self.sends}
        outs = {n: produced[n] if n in produced else received[n] for n in self.produces}
        return sends, outs

    def check_inputs(self, feeds: dict[str, np.ndarray]) -> None:
        """Refuse model inputs this plan cannot take, naming the shapes it was planned at (a plan fixes
        them; onnxruntime's own words would name neither). A tensor the plan has no input for is refused
        by name, as onnxruntime refuses one: dropped in silence, a value given for a model input that has a
        default (an initializer of the same name, which a split keeps as a constant) changed nothing."""
        if not isinstance(feeds, Mapping):  # a list of arrays read as names: "unhashable type" from deep down
            raise SplitPointError(
                f"model inputs are a dict of input name to numpy array, not a {type(feeds).__name__} "
                f"(this plan's inputs: {', '.join(self.expect) or 'none'})"
            )
        unknown = [k for k in feeds if k not in self.expect]
        missing = [n for n in self.expect if n not in feeds]
        if missing and not unknown:  # here, not at the head's run: an edge-only plan runs no head
            raise SplitPointError(
                f"missing model input(s): {', '.join(missing)} (this plan's inputs: {', '.join(self.expect)})"
            )
        if unknown:
            raise SplitPointError(
                (f"missing model input(s): {', '.join(missing)}; " if missing else "")
                + f"not an input of this plan: {', '.join(map(repr, unknown))} (its inputs: "
                f"{', '.join(self.expect) or 'none'}; a model input with a default value, an initializer of "
                "the same name, keeps that default in a split)"
            )
        for name, (want, shape) in self.expect.items():
            if name in feeds:
                arr = np.asarray(feeds[name])
                wrong = mismatch(name, arr, (want, shape))
                if wrong is not None and not isinstance(feeds[name], np.ndarray | np.generic):
                    # a list that numpy reads as the input's type is taken, as onnxruntime takes it; one it
                    # reads as another was refused as "dtype float64", which did not say it was a list
                    raise SplitPointError(
                        f"model input {name}: a {type(feeds[name]).__name__}, not a numpy array"
                        + (f" (np.asarray(value, dtype=np.{want}))" if want is not None else "")
                    )
                if wrong is not None:
                    # the shapes it was planned with explain a shape refused, not a dtype
                    given = (
                        ""
                        if want is not None and arr.dtype != want
                        else " ".join(
                            f"--input-shape {k}:{'x'.join('N' if d < 0 else str(d) for d in v)}"
                            for k, v in self.plan.input_shapes.items()
                        )
                    )
                    raise SplitPointError(
                        f"model input {wrong}" + (f" (planned with {given})" if given else "")
                    )
        # each input fits, but two give one symbolic dimension (the batch) different sizes: a tensor that
        # skips the edge's segment crossed the link before the relay refused it ("bad-tensor")
        conflict = self.symbol_conflict(feeds)
        if conflict is not None:
            raise SplitPointError(f"model inputs disagree: {conflict}")

    def symbol_conflict(self, received: dict[str, np.ndarray]) -> str | None:
        """The first symbolic dimension that two received tensors give different sizes, said in words."""
        expect: dict[str, Expect] = getattr(self, "expect", {})  # a segment's runner (of_segment) has none
        return symbol_conflict(received, {name: shape for name, (_, shape) in expect.items()}, {})


def mismatch(name: str, arr: np.ndarray, expect: OutputExpect) -> str | None:
    """How ``arr`` differs from what a stage expects of tensor ``name`` (dtype, rank, a fixed size), in
    words; None where it fits."""
    want, shape = expect
    if want is not None and arr.dtype != want:
        if arr.dtype.newbyteorder("=") == want:  # onnxruntime would read its bytes in its own order
            return (
                f"{name}: dtype {arr.dtype}, {want} in the other byte order (convert with .astype('{want}'))"
            )
        return f"{name}: dtype {arr.dtype}, the plan expects {want}"
    got = arr.shape
    if shape is None:  # unknown: any shape
        return None
    if len(got) != len(shape) or any(type(d) is int and d != g for g, d in zip(got, shape, strict=True)):
        shown = ["?" if d is None else d for d in shape]
        what = f"rank {arr.ndim}" if len(got) != len(shape) else f"shape {list(got)}"
        return f"{name}: {what}, the plan expects shape {shown}"
    return None


def symbol_conflict(
    arrays: dict[str, np.ndarray], shapes: Mapping[str, tuple | None], seen: dict[str, tuple[int, str]]
) -> str | None:
    """The first symbolic dimension (the batch ``N``, a sequence length) that ``arrays`` give another size
    than an earlier tensor did, in words (None: none). ``seen`` (symbol: its size and the tensor that gave
    it) carries over from call to call: seeded with a request's inputs, it finds a result of batch 3
    for a request of batch 1."""
    for name, arr in arrays.items():
        shape = shapes.get(name)
        if not shape or len(shape) != np.ndim(arr):
            continue
        for size, d in zip(np.shape(arr), shape, strict=True):
            if type(d) is str:
                first, where = seen.setdefault(d, (int(size), name))
                if first != size:
                    return f"dimension {d} is {first} in tensor {where} but {size} in tensor {name}"
    return None


def stage_shapes(plan: Plan, stage: int) -> dict[str, tuple]:
    """What stage ``stage`` receives, by name, with the plan's shapes (sizes, symbols, None unknown; () a
    scalar; left out where the rank is unknown): the sizes a request gave its symbols (the batch ``N``)
    there, which the answer must give them too."""
    return {t.name: _spec_shape(t.shape) for t in plan.stages[stage].receives if t.shape != "?"}


def input_shapes(plan: Plan) -> dict[str, tuple]:
    """The plan's model inputs' shapes (sizes, symbols, None where unknown), by name."""
    return {i.name: _spec_shape(i.shape) for i in plan.inputs if i.shape and i.shape != "?"}


def output_expects(plan: Plan) -> dict[str, OutputExpect]:
    """What a server's result must be for each of the plan's outputs: its dtype, and its shape where the
    plan knows it (an unknown shape, "?", checks the dtype only). Built once per plan, not per reply."""
    return {
        o.name: (_SPEC_DTYPES.get(o.dtype), _spec_shape(o.shape) if o.shape != "?" else None)
        for o in plan.outputs
    }


def _spec_shape(shape: str) -> tuple[int | str | None, ...]:
    """A plan's shape string ("Nx64x28x28", "?" unknown) as a shape: sizes, symbols, None where unknown."""
    if not shape or shape == "?":
        return ()
    return tuple(int(d) if d.isdigit() else (None if d == "?" else d) for d in shape.split("x"))


class HeadRunner(StageRunner):
    """Stage 0 on the edge: ``run(feeds)`` returns (what is sent, the model outputs computed here)."""

    def __init__(self, plan: Plan, session: ort.InferenceSession | None):
        super().__init__(plan, 0, session)


class TailRunner(StageRunner):
    """The last stage: ``run(received)`` returns the model outputs it computes."""

    def __init__(self, plan: Plan, session: ort.InferenceSession):
        super().__init__(plan, len(plan.stages) - 1, session)
        self.inputs = {i.name: i for i in session.get_inputs()}

    def run(self, received: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # type: ignore[override]
        return super().run(received)[1]


def assemble(plan: Plan, early: dict[str, np.ndarray], late: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Final outputs in the original model's order (from wherever in the chain each was computed)."""
    got = {**late, **early}
    return [got[o.name] for o in plan.outputs]


def load_split(plan_dir: str | Path, threads: int = 0) -> tuple[Plan, HeadRunner, TailRunner | None]:
    """Both halves of a two-stage plan in this process (tests, fidelity runs)."""
    plan = Plan.load(plan_dir)
    d = Path(plan_dir)
    head = make_session(d / HEAD_FILE, threads) if HEAD_FILE in plan.files else None
    tail = TailRunner(plan, make_session(d / TAIL_FILE, threads)) if TAIL_FILE in plan.files else None
    return plan, HeadRunner(plan, head), tail


def load_stages(plan_dir: str | Path, threads: int = 0) -> tuple[Plan, list[StageRunner]]:
    """Every stage of a plan in this process (tests, fidelity runs of a chain)."""
    plan = Plan.load(plan_dir)
    d = Path(plan_dir)
    return plan, [
        StageRunner(plan, i, make_session(d / s.file, threads) if s.file else None)
        for i, s in enumerate(plan.stages)
    ]


def run_chain(
    stages: list[StageRunner],
    feeds: dict[str, np.ndarray],
    hop: Callable[[int, dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
    outputs: list[str] | None = None,
) -> list[np.ndarray]:
    """The whole chain in this process; ``hop(i, tensors)`` stands for what hop ``i`` does to what it
    carries (encode and decode with its codec); by default nothing. Returns the model's outputs (in
    the plan's order, or ``outputs``')."""
    received, outs = feeds, {}
    for i, st in enumerate(stages):
        sends, made = st.run(received)
        outs.update(made)
        received = hop(i, sends) if hop is not None and not st.last else sends
    names = outputs if outputs is not None else [o.name for o in stages[0].plan.outputs]
    return [outs[n] for n in names]


def _disagrees(arg: ort.NodeArg, spec: TensorSpec | None) -> str | None:
    """How a model's declared input or output contradicts the plan's tensor of that name (its type, its
    rank, a size both fix), in words; None where they agree or either leaves it open. A deploy whose
    plan.json said otherwise than its models was acknowledged, and its requests then refused."""
    if spec is None:
        return None
    have = ORT_DTYPES.get(arg.type)
    if have is not None and have != np.dtype(spec.dtype):
        return f"{arg.name} is {have} in the model and {spec.dtype} in plan.json"
    if spec.shape in ("", "?") or not isinstance(arg.shape, list):
        return None
    want = _spec_shape(spec.shape)
    if len(want) != len(arg.shape):
        return f"{arg.name} has rank {len(arg.shape)} in the model and shape {spec.shape} in plan.json"
    for k, (m, p) in enumerate(zip(arg.shape, want, strict=True)):
        if isinstance(m, int) and isinstance(p, int) and m != p:
            return f"{arg.name} has dimension {k} of {m} in the model and {p} in plan.json ({spec.shape})"
    return None


def stage_reads(plan: Plan, i: int) -> set[str]:
    """The tensors stage ``i``'s model may read: the edge's, the model's inputs; a later one's, only what
    the stage before sends it (a tail that read the raw input too was deployed, and every request failed
    on the missing key)."""
    received = {t.name for t in plan.stages[i].receives}
    return {t.name for t in plan.inputs} | received if i == 0 else received


def check_models_load(plan_dir: Path, plan: Plan) -> None:
    """Build a session for every model a plan carries (then drop it): what onnxruntime refuses, a
    deploy refuses, before anything is served from it. Each stage's model must also fit its place in the
    plan (``check_fits``): a deploy with the head's model in the tail's place loaded, was acknowledged,
    and then failed every request with `internal`."""
    check_stage_chain(plan)
    for name in plan.files:
        if name.endswith(".onnx") and (Path(plan_dir) / name).is_file():
            check_fits(plan, name, make_session(Path(plan_dir) / name, threads=1))


def check_stage_chain(plan: Plan) -> None:
    """What each stage takes is what the one before it sends, in name, dtype and shape."""
    for i in range(1, len(plan.stages)):
        got = {t.name: (t.dtype, t.shape) for t in plan.stages[i].receives}
        sent = {t.name: (t.dtype, t.shape) for t in plan.stages[i - 1].sends}
        if got != sent:
            wrong = sorted(n for n in set(got) | set(sent) if got.get(n) != sent.get(n))
            raise PlanError(
                f"stage {i} receives {', '.join(f'{n} {got.get(n, (None, None))}' for n in wrong[:4])}, but "
                f"stage {i - 1} sends {', '.join(f'{n} {sent.get(n, (None, None))}' for n in wrong[:4])}"
            )


def check_fits(plan: Plan, name: str, sess: ort.InferenceSession) -> None:
    """The model ``name`` of the plan, as a session, against its place in the plan: it reads only what
    its stage receives and the model's inputs, returns what its stage sends on and the outputs it
    produces, each in the dtype and shape the plan says. Run where a deploy is checked, and where a
    server or an edge starts from a plan directory (a tail with another dtype was served without a word,
    a head swapped for the tail started and failed every request)."""
    if plan.decoder is not None:  # a decoder segment reads and returns its KV cache, by layer
        _decoder_fits(plan, name, sess)
        return
    by_file = {st.file: (i, st) for i, st in enumerate(plan.stages) if st.file}
    reads = {i.name for i in sess.get_inputs()}
    gives = {o.name for o in sess.get_outputs()}
    # the plan's word on each tensor the model may read, and may return
    specs = {t.name: t for t in plan.inputs}
    outs = {t.name: t for t in plan.outputs}
    if name in by_file:
        i, st = by_file[name]
        specs |= {t.name: t for t in st.receives}
        outs |= {t.name: t for t in st.sends}
        may_read = stage_reads(plan, i)
        # what a stage passes on as it came (a raw model input the tail reads, a tensor an earlier
        # stage sent for a later one) is forwarded, not computed: its model need not return it
        must_give = {t.name for t in st.sends if t.name not in may_read} | set(st.produces)
        where = f"stage {i}'s model {name}"
    elif name == FULL_FILE:
        may_read, must_give, where = set(specs), set(outs), f"the whole model {name}"
    else:
        return
    for io, table in ((sess.get_inputs(), specs), (sess.get_outputs(), outs)):
        for arg in io:
            said = _disagrees(arg, table.get(arg.name))
            if said:
                raise PlanError(f"{name} does not fit the plan: {said}")
    extra, lacking = sorted(reads - may_read), sorted(must_give - gives)
    if extra or lacking:
        raise PlanError(
            f"{where} does not fit the plan: "
            + "; ".join(
                x
                for x in (
                    f"it reads {extra[:8]}, which the plan does not give it" if extra else "",
                    f"it lacks the outputs {lacking[:8]} the plan expects of it" if lacking else "",
                )
                if x
            )
        )


def _decoder_fits(plan: Plan, name: str, sess: ort.InferenceSession) -> None:
    """A decoder segment against the plan's ``decoder`` block: the layers whose cache it keeps, their
    heads and head size, and its output's width (the hidden state from the head, the vocabulary from the
    tail). A plan saying 8 heads or 6 layers was deployed and ignored; one whose head.onnx was the tail's
    failed in onnxruntime at the first prompt."""
    d = plan.decoder
    assert d is not None
    side = {HEAD_FILE: range(0, d.edge_layers), TAIL_FILE: range(d.edge_layers, d.layers)}.get(name)
    if name == FULL_FILE:
        side = range(0, d.layers)
    if side is None:
        return
    past = {}
    for i in sess.get_inputs():
        m = PAST_RE.match(i.name)
        if m:
            past[(int(m.group(1)), m.group(2))] = i.shape
    layers = sorted({k for k, _ in past})
    if layers != list(side):
        have = f"layers {layers[0]}..{layers[-1]}" if layers else "no layers"
        raise PlanError(
            f"{name} does not fit the plan: it keeps the KV cache of {have}, where plan.json gives it "
            f"layers {side.start}..{side.stop - 1} (of {d.layers})"
        )
    # plan.json's heads and head size are the first layer's (later layers may keep fewer: grouped heads)
    for kind in ("key", "value"):
        shape = past.get((0, kind))
        for pos, want, what in ((1, d.heads, "heads"), (3, d.head_dim, "head_dim")):
            if shape is not None and len(shape) == 4 and isinstance(shape[pos], int) and shape[pos] != want:
                raise PlanError(
                    f"{name} does not fit the plan: past_key_values.0.{kind} has {shape[pos]} {what}, "
                    f"plan.json says {want}"
                )
    want, what = (d.hidden, "hidden") if name == HEAD_FILE else (d.vocab, "vocab")
    for o in sess.get_outputs():
        width = o.shape[-1] if o.shape and not o.name.startswith("present.") else None
        if isinstance(width, int) and width != want:
            raise PlanError(
                f"{name} does not fit the plan: its output {o.name} is {width} wide, "
                f"plan.json's {what} is {want}"
            )


def run_samples(
    session: ort.InferenceSession, samples: list[dict[str, np.ndarray]]
) -> list[list[np.ndarray]]:
    """Each one-sample feed's outputs, as the model returns them for that sample alone: one run when every
    input's batch dimension is free (split back by rows), else one run per sample (exporters often fix
    the batch at 1, and some outputs carry no batch dimension at all, e.g. a time-major CRNN's)."""
    names = [i.name for i in session.get_inputs()]
    free = all(i.shape and not isinstance(i.shape[0], int) for i in session.get_inputs())
    rows = [_rows_of(s, names) for s in samples]
    if len(samples) > 1 and free and all(rows):
        try:
            outs = session.run(None, {n: np.concatenate([s[n] for s in samples]) for n in names})
        except Exception:  # onnxruntime's own type: a first axis that is not a batch after all
            outs = []
        if outs and all(o.ndim and o.shape[0] == sum(rows) for o in outs):
            bounds = np.cumsum(rows)[:-1]
            split = [np.split(o, bounds) for o in outs]
            # a time-major output whose length happens to equal the batch would split wrongly, and a model
            # whose rows are not independent (an If on a sum over the whole batch) answers a batch
            # otherwise than each sample alone, as the edge sends them: check the first and the last
            if all(
                _same_run(a, parts[k])
                for k in (0, len(samples) - 1)
                for a, parts in zip(session.run(None, {n: samples[k][n] for n in names}), split, strict=True)
            ):
                return [[parts[k] for parts in split] for k in range(len(samples))]
    return [session.run(None, {n: s[n] for n in names}) for s in samples]


def _rows_of(sample: dict[str, np.ndarray], names: list[str]) -> int:
    """The rows every input of a sample has along its first axis, 0 where they differ: a free first axis
    is not always the batch (a time-major LSTM's ``x[T, N, F]`` beside its ``sequence_lens[N]``), and
    joining such samples along it fed onnxruntime 8 samples' times against 8 samples' lengths."""
    counts = {int(sample[n].shape[0]) if np.ndim(sample[n]) else 0 for n in names}
    return counts.pop() if len(counts) == 1 else 0


def _same_run(alone: np.ndarray, in_batch: np.ndarray) -> bool:
    """Whether a sample's output in a batch is the one it gets alone, up to the last bits that another
    kernel blocking changes."""
    if alone.shape != in_batch.shape or alone.dtype != in_batch.dtype:
        return False
    if alone.dtype.kind not in "fc":
        return bool(np.array_equal(alone, in_batch))
    scale = float(np.max(np.abs(alone), initial=0.0)) if alone.size else 0.0
    return bool(np.allclose(alone, in_batch, rtol=1e-3, atol=1e-4 * scale + 1e-12, equal_nan=True))


class Ragged(list):
    """One output's per-sample arrays when their shapes differ from sample to sample (NonZero's indices,
    TopK with k an input, a detector's boxes): no array joins them, so they stay apart."""


Joined = np.ndarray | Ragged  # one output over several samples (``join``)


def join(per_sample: list[list[np.ndarray]]) -> list[Joined]:
    """Per-sample outputs joined along the first axis (stacked where an output is a scalar), to compare;
    an output whose shape differs between samples stays a ``Ragged`` list of them."""
    return [_join(col) for col in zip(*per_sample, strict=True)]


def _join(col: tuple[np.ndarray, ...]) -> Joined:
    if any(c.shape != col[0].shape for c in col):
        return Ragged(col)
    return np.concatenate(col) if col[0].ndim else np.stack(col)


def per_sample(joined: Joined, n: int) -> list[np.ndarray]:
    """``join``'s inverse for one output of ``n`` samples."""
    if isinstance(joined, Ragged):
        return list(joined)
    if not joined.ndim or joined.shape[0] % n:
        raise ValueError(f"an output of shape {list(joined.shape)} does not hold {n} samples")
    return np.split(joined, n)


def run_batched(session: ort.InferenceSession, samples: list[dict[str, np.ndarray]]) -> list[Joined]:
    """The outputs for several one-sample feeds, joined (see ``run_samples`` and ``join``)."""
    return join(run_samples(session, samples))


def available_memory() -> int:
    """Bytes this process may still take: the host's free memory, less where its own limits are lower
    (``ulimit -v``; a cgroup's ``memory.max``, as systemd's ``MemoryMax=`` and containers set). The
    host's figure alone let an edge under a 700 MB limit load a 233 MB fallback model and die of
    ``std::bad_alloc`` at start."""
    import resource

    free = psutil.virtual_memory().available
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        free = min(free, max(0, soft - psutil.Process().memory_info().vms))
    for limit, used in _cgroup_memory_files():
        try:
            cap, now = Path(limit).read_text().strip(), int(Path(used).read_text())
        except (OSError, ValueError):
            continue
        if cap.isdigit() and int(cap) < 1 << 60:  # "max", or v1's huge number for no limit
            free = min(free, max(0, int(cap) - now))
        break
    return free


def _cgroup_memory_files() -> list[tuple[str, str]]:
    """(limit, usage) files of this process's memory cgroup, as ``/proc/self/cgroup`` names it, then the
    mount's root; the first pair that can be read is the one."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    found = []
    for line in lines:
        if line.count(":") < 2:
            continue
        _, controllers, where = line.split(":", 2)
        if controllers == "":  # v2's single hierarchy
            base = Path("/sys/fs/cgroup") / where.lstrip("/")
            found.append((str(base / "memory.max"), str(base / "memory.current")))
        elif "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / where.lstrip("/")
            found.append((str(base / "memory.limit_in_bytes"), str(base / "memory.usage_in_bytes")))
    # a container's own cgroup shows as the root of its mount, whatever /proc/self/cgroup names
    found.append(("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"))
    found.append(
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")
    )
    return found
