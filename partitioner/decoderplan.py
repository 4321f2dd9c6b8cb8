"""Planning a decoder split: where to cut between layers, how to send the hidden states and in what
precision to keep the edge's weights, from time to first token (TTFT) and time per output token (TPOT).

Every generated token is one round trip, so on a slow link TPOT is dominated by the RTT whatever the cut,
and a cut's worth is the edge compute it saves against the bytes and round trips it costs.

Measured (``measure``): on each side, the time of three blocks of the model, in prefill (the prompt, no
past) and in a decode step (one token on a past of the mid-generation length): the embedding with layer
0, a middle layer (timed as the middle layers together, ``middle_layers``), the last layer with the output
head; the codecs' encoded sizes and encode times on
real hidden states. Derived (``evaluate``, pure): a cut after ``k`` layers costs the edge block 0 plus
``k - 1`` middle layers, the server ``L - k - 1`` middle layers plus the last block, and

    TTFT = edge prefill + encode + uplink(prefill bytes) + RTT + server prefill + downlink(reply) + runtime
    TPOT = edge step    + encode + uplink(step bytes)    + RTT + server step    + downlink(reply) + runtime

where *runtime* is the runtime's own time per step, measured apart (``overhead_ms``).

Edge memory = the edge's weights (as stored) + its KV cache at ``max_len`` positions.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import onnx

from splitpoint.core.codecs import encode
from splitpoint.core.decoders import Decoder, exact_codec, hidden_codec
from splitpoint.core.kvcache import DecoderSegment
from splitpoint.core.onnxio import model_bytes
from splitpoint.profiles.profiler import time_runs

from .costmodel import Link, downlink_ms, uplink_ms

MIDDLE_BLOCK_BYTES = 512 * 2**20  # past any CPU's cache, and what a machine that plans a decoder can hold
REPLY_BYTES = 160  # a step's result: header (~100 bytes) and one int64 token payload


@dataclass(frozen=True)
class BlockTimes:
    """Median ms of one block, prefill and decode step (measured)."""

    prefill_ms: float
    step_ms: float


@dataclass(frozen=True)
class SideTimes:
    first: BlockTimes  # embedding + layer 0
    middle: BlockTimes  # one layer (the middle layers timed together, per layer)
    last: BlockTimes  # last layer + output head

    def head(self, k: int) -> BlockTimes:
        return BlockTimes(
            self.first.prefill_ms + (k - 1) * self.middle.prefill_ms,
            self.first.step_ms + (k - 1) * self.middle.step_ms,
        )

    def tail(self, k: int, layers: int) -> BlockTimes:
        n = layers - k - 1
        return BlockTimes(
            n * self.middle.prefill_ms + self.last.prefill_ms, n * self.middle.step_ms + self.last.step_ms
        )


class DecoderShape(Protocol):
    """What the cost model reads of the architecture (a zoo spec or an opened ``Decoder``)."""

    @property
    def layers(self) -> int: ...
    @property
    def heads(self) -> int: ...  # of the KV cache
    @property
    def head_dim(self) -> int: ...
    @property
    def n_ctx(self) -> int: ...


def kv_bytes(spec: DecoderShape, first: int, last: int) -> int:
    """Bytes one position adds to the KV cache of layers [first, last): each layer's own heads, head size
    and dtype where the model says (an exported decoder with grouped or per-layer heads, or float16),
    else every layer as the first, in float32."""
    per_layer = getattr(spec, "kv_bytes_by_layer", None)
    if per_layer:
        return int(sum(per_layer[first:last]))
    return (last - first) * 2 * spec.heads * spec.head_dim * 4


@dataclass(frozen=True)
class DecoderMeasurements:
    spec: DecoderShape
    prompt_tokens: int
    context: int  # the past length decode steps were measured at
    edge: dict[str, SideTimes]  # by edge weight precision
    server: SideTimes
    sizes: dict[str, tuple[int, int]]  # codec -> (prefill bytes, step bytes), encoded real hidden states
    encode_ms: dict[str, tuple[float, float]]  # codec -> (prefill, step), on the edge
    weight_bytes: dict[str, tuple[int, int, int]]  # precision -> (block 0, middle layer, last block) stored
    # the runtime's own time per step (client, wire, server session) beyond model, codec and link, prefill
    # and decode step, measured apart (e.g. a model that computes next to nothing over loopback); 0 if not
    overhead_ms: tuple[float, float] = (0.0, 0.0)


@dataclass(frozen=True)
class DecoderCandidate:
    edge_layers: int
    codec: str
    head_weights: str
    ttft_ms: float
    tpot_ms: float
    prefill_bytes: int
    step_bytes: int
    edge_memory_bytes: int
    breakdown: dict

    @property
    def label(self) -> str:
        w = " int4-edge" if self.head_weights == "int4" else ""
        n = self.edge_layers
        return f"{n} layer{'s' if n > 1 else ''} on the edge, {self.codec}{w}"

    def to_dict(self) -> dict:
        return {**asdict(self), "label": self.label, "labels": {"ttft_ms": "derived", "tpot_ms": "derived"}}


def evaluate(m: DecoderMeasurements, k: int, codec: str, weights: str, link: Link) -> DecoderCandidate:
    """One candidate's TTFT, TPOT, bytes and edge memory (derived from ``m``; pure)."""
    L = m.spec.layers
    head, tail = m.edge[weights].head(k), m.server.tail(k, L)
    pre_b, step_b = m.sizes[codec]
    enc_pre, enc_step = m.encode_ms[codec]
    rtt, down = link.rtt_ms, downlink_ms(REPLY_BYTES, link)
    up_pre, up_step = uplink_ms(pre_b, link), uplink_ms(step_b, link)
    over_pre, over_step = m.overhead_ms
    ttft = head.prefill_ms + enc_pre + up_pre + rtt + tail.prefill_ms + down + over_pre
    tpot = head.step_ms + enc_step + up_step + rtt + tail.step_ms + down + over_step
    w0, wm, _ = m.weight_bytes[weights]
    kv = kv_bytes(m.spec, 0, k) * m.spec.n_ctx
    return DecoderCandidate(
        k,
        codec,
        weights,
        ttft,
        tpot,
        pre_b,
        step_b,
        w0 + (k - 1) * wm + kv,
        {
            "edge_prefill_ms": head.prefill_ms,
            "edge_step_ms": head.step_ms,
            "encode_prefill_ms": enc_pre,
            "encode_step_ms": enc_step,
            "uplink_prefill_ms": up_pre,
            "uplink_step_ms": up_step,
            "rtt_ms": rtt,
            "server_prefill_ms": tail.prefill_ms,
            "server_step_ms": tail.step_ms,
            "downlink_ms": down,
            "runtime_prefill_ms": over_pre,
            "runtime_step_ms": over_step,
        },
    )


def candidates(m: DecoderMeasurements, link: Link) -> list[DecoderCandidate]:
    """Every split: cut after 1 .. L-1 layers x codec x edge weight precision."""
    return [evaluate(m, k, c, w, link) for k in range(1, m.spec.layers) for c in m.sizes for w in m.edge]


def baselines(m: DecoderMeasurements, link: Link) -> dict[str, dict]:
    """What a user would run instead (derived alike): the whole model on the edge (no network), and the
    whole model on the server with the token ids sent (8 bytes a token, one round trip per token)."""
    L, out = m.spec.layers, {}
    kv = kv_bytes(m.spec, 0, L) * m.spec.n_ctx
    for w, side in m.edge.items():
        pre = side.first.prefill_ms + (L - 2) * side.middle.prefill_ms + side.last.prefill_ms
        step = side.first.step_ms + (L - 2) * side.middle.step_ms + side.last.step_ms
        w0, wm, wl = m.weight_bytes[w]
        out[f"edge-only{' int4' if w == 'int4' else ''}"] = {
            "ttft_ms": pre,
            "tpot_ms": step,
            "edge_memory_bytes": w0 + (L - 2) * wm + wl + kv,
        }
    s = m.server
    pre = s.first.prefill_ms + (L - 2) * s.middle.prefill_ms + s.last.prefill_ms
    step = s.first.step_ms + (L - 2) * s.middle.step_ms + s.last.step_ms
    rtt, down = link.rtt_ms, downlink_ms(REPLY_BYTES, link)
    # over the same client and server as a split: the runtime's own time per step counts alike
    over_pre, over_step = m.overhead_ms
    out["server-only"] = {
        "ttft_ms": pre + uplink_ms(8 * m.prompt_tokens + 64, link) + rtt + down + over_pre,
        "tpot_ms": step + uplink_ms(72, link) + rtt + down + over_step,
        "edge_memory_bytes": 0,
    }
    return out


def faster_baselines(
    best: DecoderCandidate,
    base: dict[str, dict],
    max_ttft: float | None = None,
    max_tpot: float | None = None,
    edge_memory: int | None = None,
    objective: str = "tpot",
) -> list[str]:
    """The baselines within the same limits that beat ``best`` on the objective (derived alike): a split
    pays where the edge cannot hold the whole model or the link is fast, and a user should hear when
    neither holds."""
    key = (lambda t, p: (p, t)) if objective == "tpot" else (lambda t, p: (t, p))
    mine = key(best.ttft_ms, best.tpot_ms)
    return [
        name
        for name, b in base.items()
        if (max_ttft is None or b["ttft_ms"] <= max_ttft)
        and (max_tpot is None or b["tpot_ms"] <= max_tpot)
        and (edge_memory is None or b["edge_memory_bytes"] <= edge_memory)
        and key(b["ttft_ms"], b["tpot_ms"]) < mine
    ]


def ranked(
    cands: Sequence[DecoderCandidate],
    max_ttft: float | None = None,
    max_tpot: float | None = None,
    edge_memory: int | None = None,
    objective: str = "tpot",
) -> list[DecoderCandidate]:
    """The candidates within the limits, least TPOT (or TTFT) first."""
    ok = [
        c
        for c in cands
        if (max_ttft is None or c.ttft_ms <= max_ttft)
        and (max_tpot is None or c.tpot_ms <= max_tpot)
        and (edge_memory is None or c.edge_memory_bytes <= edge_memory)
    ]
    key = (lambda c: (c.tpot_ms, c.ttft_ms)) if objective == "tpot" else (lambda c: (c.ttft_ms, c.tpot_ms))
    return sorted(ok, key=key)


def pick(
    cands: Sequence[DecoderCandidate],
    max_ttft: float | None = None,
    max_tpot: float | None = None,
    edge_memory: int | None = None,
    objective: str = "tpot",
) -> DecoderCandidate | None:
    """The candidate with the least TPOT (or TTFT) among those within the limits; None if none is."""
    r = ranked(cands, max_ttft, max_tpot, edge_memory, objective)
    return r[0] if r else None


# -- measuring -----------------------------------------------------------------------------------------
def _time(sess, feeds: dict, repeats: int, min_ms: float = 0.0) -> float:
    """Median ms per run; under a CPU quota each sample spans ``min_ms`` (several periods), or a run
    shorter than one period's quota would go at the host's full speed after a pause."""
    return statistics.median(time_runs(lambda: sess.run(None, feeds), 1, repeats, min_ms))


def _block_times(
    model, dec: Decoder, first: int, p: int, ctx: int, reps: int, threads: int, min_ms: float = 0.0
) -> BlockTimes:
    seg = DecoderSegment(model, threads)
    rng = np.random.default_rng(0)
    x_pre: np.ndarray
    if first == 0:
        x_pre = rng.integers(0, dec.vocab, (1, p)).astype(dec.ids_dtype)
    else:
        x_pre = rng.standard_normal((1, p, dec.d_model)).astype(dec.hidden_dtype)
    x_step = x_pre[:, :1]

    def past(n: int) -> dict[str, np.ndarray]:
        return {
            k: (rng.standard_normal((1, v.shape[1], n, v.shape[3])) * 0.5).astype(v.dtype)
            for k, v in seg.empty_past().items()
        }

    pre = _time(seg.sess, seg.feeds(x_pre, past(0)), reps, min_ms)
    step = _time(seg.sess, seg.feeds(x_step, past(ctx)), reps * 3, min_ms)
    return BlockTimes(pre, step)


def measure_side(
    dec: Decoder,
    weights: str,
    prompt_tokens: int,
    context: int,
    repeats: int,
    threads: int,
    min_ms: float = 0.0,
) -> tuple[SideTimes, tuple[int, int, int]]:
    """The three blocks' times on this machine (under whatever CPU limit it runs), and their stored sizes."""
    from splitpoint.core.quantize import quantize_matmul_weights

    L = dec.layers

    def block(first: int, last: int) -> tuple[onnx.ModelProto, int]:
        model = dec.part(first, last)
        if weights == "int4":
            model = quantize_matmul_weights(model)
        return model, len(model_bytes(model))

    def timed(model: onnx.ModelProto, first: int) -> BlockTimes:
        return _block_times(model, dec, first, prompt_tokens, context, repeats, threads, min_ms)

    first_model, first_size = block(0, 1)
    layer_model, layer_size = block(1, 2)
    last_model, last_size = block(L - 1, L)
    n = middle_layers(L, layer_size)
    whole = timed(layer_model if n == 1 else block(1, 1 + n)[0], 1)
    middle = BlockTimes(whole.prefill_ms / n, whole.step_ms / n)
    return SideTimes(timed(first_model, 0), middle, timed(last_model, L - 1)), (
        first_size,
        layer_size,
        last_size,
    )


def middle_layers(layers: int, layer_bytes: int) -> int:
    """How many middle layers to time together for one layer's time: all of them, up to
    ``MIDDLE_BLOCK_BYTES`` of weights. One layer run again and again keeps its weights in the cache, which
    a run of many layers streams past: timed alone, gpt2's layers made every split slower than predicted
    on a 2-core Xeon (benchmarks/results/decoder.md, its earlier version)."""
    return max(1, min(layers - 2, MIDDLE_BLOCK_BYTES // max(layer_bytes, 1)))


def measure_codecs(
    dec: Decoder,
    seed: int,
    codecs: Sequence[str],
    prompt_tokens: int,
    repeats: int,
    min_ms: float = 0.0,
) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[float, float]]]:
    """Encoded bytes and encode ms of a real hidden state (after layer 0), prefill and one token."""
    seg = DecoderSegment(dec.part(0, 1), 1)
    ids = np.random.default_rng(seed + 11).integers(0, dec.vocab, (1, prompt_tokens)).astype(dec.ids_dtype)
    h = seg.step(ids, seg.empty_past())[0]
    one = np.ascontiguousarray(h[:, -1:])
    sizes, times = {}, {}
    for c in codecs:
        sizes[c] = (len(encode(h, c)), len(encode(one, c)))
        times[c] = (_encode_ms(h, c, repeats, min_ms), _encode_ms(one, c, repeats, min_ms))
    return sizes, times


def _encode_ms(x: np.ndarray, codec: str, repeats: int, min_ms: float) -> float:
    return statistics.median(time_runs(lambda: encode(x, codec), 0, repeats, min_ms))


def measure(
    dec: Decoder,
    *,
    seed: int = 0,
    codecs: Sequence[str] = ("float32", "float16", "int8-ol", "int4-ol"),
    head_weights: Sequence[str] = ("float32", "int4"),
    prompt_tokens: int = 32,
    new_tokens: int = 64,
    edge_cpus: float | None = None,
    repeats: int = 5,
    server_threads: int = 0,
) -> DecoderMeasurements:
    """Everything ``evaluate`` needs, measured on this machine: the server's blocks at full speed, the
    edge's under ``edge_cpus`` (a real CPU limit on this process while it measures, as ``profile
    --cpus`` does), one onnxruntime thread, as a small device runs."""
    from splitpoint.core.errors import SplitPointError
    from splitpoint.core.quantize import float_matmul_weights
    from splitpoint.profiles.cpulimit import cpu_limit, sample_span_ms

    if dec.layers < 3:
        raise SplitPointError(
            f"the decoder planner measures three blocks: {dec.name} has {dec.layers} layers"
        )
    if prompt_tokens + new_tokens > dec.n_ctx:
        raise SplitPointError(
            f"--prompt-tokens {prompt_tokens} + --new-tokens {new_tokens} pass {dec.name}'s "
            f"{dec.n_ctx} positions"
        )
    context = prompt_tokens + new_tokens // 2
    codecs = list(dict.fromkeys(hidden_codec(dec, c) for c in codecs))  # once each, by what they send
    if "int4" in head_weights and not float_matmul_weights(dec.part(0, 1)):
        # weights already 4-bit (onnxruntime-genai's int4 export): its int4 candidates were its float32
        # ones again, listed twice
        if list(head_weights) == ["int4"]:
            raise SplitPointError(
                f"{dec.name}'s layers have no float MatMul weights to quantise to 4 bits (already "
                "quantised?): plan with its weights as they are"
            )
        head_weights = [w for w in head_weights if w != "int4"]
    server, _ = measure_side(dec, "float32", prompt_tokens, context, repeats, server_threads)
    edge, weight_bytes = {}, {}
    with cpu_limit(edge_cpus) as emulation:
        span = sample_span_ms(emulation)
        for w in head_weights:
            edge[w], weight_bytes[w] = measure_side(dec, w, prompt_tokens, context, repeats, 1, span)
        sizes, enc = measure_codecs(dec, seed, codecs, prompt_tokens, repeats, span)
    return DecoderMeasurements(dec, prompt_tokens, context, edge, server, sizes, enc, weight_bytes)


def pick_at_floor(
    dec: Decoder, order: Sequence[DecoderCandidate], min_agreement: float, seed: int = 0, tries: int = 12
) -> tuple[DecoderCandidate | None, dict | None, list[dict]]:
    """The first of ``order`` whose measured greedy agreement reaches ``min_agreement``, its fidelity, and
    every measurement made. The fastest ``tries``, then the fastest lossless one (float32 hidden states,
    float32 edge weights: the whole model's tokens exactly), so a floor below 1 is met where any split
    can meet it without measuring every candidate."""
    exact = exact_codec(dec)
    lossless = next((c for c in order if c.codec == exact and c.head_weights == "float32"), None)
    queue = list(order[:tries])
    if lossless is not None and lossless not in queue:
        queue.append(lossless)
    tried = []
    for c in queue:
        f = pick_fidelity(dec, c, seed)
        tried.append({"candidate": c.label, **f})
        if f["agreement"]["value"] >= min_agreement:
            return c, f, tried
    return None, None, tried


def pick_fidelity(
    dec: Decoder, c: DecoderCandidate, seed: int = 0, prompts: int = 4, new_tokens: int = 16
) -> dict:
    """The candidate's measured greedy agreement and next-token KL against the float model (random
    prompts, teacher-forced: ``decoderfidelity``)."""
    from splitpoint.core.quantize import quantize_matmul_weights

    from .decoderfidelity import measure as fidelity

    head, tail = dec.part(0, c.edge_layers), dec.part(c.edge_layers, dec.layers)
    test = quantize_matmul_weights(head) if c.head_weights == "int4" else None
    rng = np.random.default_rng(seed + 5)
    n = max(1, min(16, dec.n_ctx - new_tokens))
    ps = [rng.integers(0, dec.vocab, (1, n)).astype(dec.ids_dtype) for _ in range(prompts)]
    f = fidelity(head, tail, [c.codec], ps, new_tokens, test_head=test)[c.codec]
    return {**f.to_dict(), "label": "measured", "prompts": prompts, "new_tokens": new_tokens}
