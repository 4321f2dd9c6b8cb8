"""What a cut-tensor codec does to a decoder split: greedy-token agreement and the KL divergence of the
next-token distribution, against the float split, over a set of prompts.

A decoder's error compounds: a token decoded differently changes every later input. Measuring free-running
generations would mix the codec's error with that divergence, so each codec is measured teacher-forced: the
float model decodes each prompt greedily, and the split with the codec is fed the same tokens, step by step,
with its own KV cache (the tail's cache holds what the quantised hidden states made of it, as it would in
deployment). At every generated position, ``agreement`` is whether the two greedy tokens are equal and
``kl`` is KL(float ‖ codec) of the next-token distributions, in nats; both with 95 % confidence intervals
(Wilson's for agreement, a bootstrap for the mean KL).

The head's outputs depend only on the tokens, so they are computed once per prompt and every codec's tail
run reuses them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from splitpoint.core.codecs import Codec, decode, encode
from splitpoint.core.errors import SplitPointError
from splitpoint.core.kvcache import DecoderSegment

from .taskmetrics import Metric, bootstrap_mean, wilson


@dataclass(frozen=True)
class DecoderFidelity:
    codec: str
    agreement: Metric  # share of positions whose greedy token equals the float split's
    kl: Metric  # mean KL(float || codec) of the next-token distribution, nats

    def to_dict(self) -> dict:
        return {"codec": self.codec, "agreement": asdict(self.agreement), "kl": asdict(self.kl)}


def kl_divergence(ref_logits: np.ndarray, got_logits: np.ndarray) -> np.ndarray:
    """KL(softmax(ref) || softmax(got)) along the last axis, in float64 (nats)."""
    a = np.asarray(ref_logits, np.float64)
    b = np.asarray(got_logits, np.float64)
    la = a - a.max(-1, keepdims=True)
    la -= np.log(np.exp(la).sum(-1, keepdims=True))
    lb = b - b.max(-1, keepdims=True)
    lb -= np.log(np.exp(lb).sum(-1, keepdims=True))
    return np.maximum((np.exp(la) * (la - lb)).sum(-1), 0.0)


def measure(
    head: onnx.ModelProto | bytes,
    tail: onnx.ModelProto | bytes,
    codecs: Sequence[str],
    prompts: Sequence[np.ndarray],
    new_tokens: int,
    threads: int = 1,
    test_head: onnx.ModelProto | bytes | None = None,
) -> dict[str, DecoderFidelity]:
    """Each codec's agreement and KL over ``prompts`` (int64 [1, n] token ids), ``new_tokens`` each.
    ``test_head`` (e.g. the head with 4-bit weights) replaces ``head`` on the measured side; the float
    ``head`` still makes the reference."""
    if new_tokens < 1 or not prompts:
        raise SplitPointError("decoder fidelity needs at least one prompt and one new token")
    parsed = [Codec.parse(c).name for c in codecs]
    h, t = DecoderSegment(head, threads), DecoderSegment(tail, threads)
    th = DecoderSegment(test_head, threads) if test_head is not None else None
    agree: dict[str, list[bool]] = {c: [] for c in parsed}
    kls: dict[str, list[float]] = {c: [] for c in parsed}
    for prompt in prompts:
        ids = np.asarray(prompt, np.int64).reshape(1, -1)
        hidden, ref = _reference(h, t, ids, new_tokens)
        if th is not None:  # the head under test, fed the reference's tokens
            past, hidden, x = th.empty_past(), [], ids
            for tok, _ in ref:
                hs, past = th.step(x, past)
                hidden.append(hs)
                x = np.array([[tok]], np.int64)
        for c in parsed:
            past = t.empty_past()
            for x, (tok, logits) in zip(hidden, ref, strict=True):
                out, past = t.step(decode(encode(x, c)), past)
                last = out[0, -1]
                agree[c].append(int(last.argmax()) == tok)
                kls[c].append(float(kl_divergence(logits, last)))
    return {
        c: DecoderFidelity(c, wilson(sum(agree[c]), len(agree[c])), bootstrap_mean(kls[c])) for c in parsed
    }


def _reference(
    h: DecoderSegment, t: DecoderSegment, ids: np.ndarray, new_tokens: int
) -> tuple[list[np.ndarray], list[tuple[int, np.ndarray]]]:
    """The float split's greedy decode: the hidden state the head sent at each step, and each step's
    greedy token and next-token logits."""
    hp, tp = h.empty_past(), t.empty_past()
    hidden, ref = [], []
    x = ids
    for _ in range(new_tokens):
        hs, hp = h.step(x, hp)
        out, tp = t.step(hs, tp)
        last = out[0, -1]
        tok = int(last.argmax())
        hidden.append(hs)
        ref.append((tok, last.copy()))
        x = np.array([[tok]], np.int64)
    return hidden, ref
