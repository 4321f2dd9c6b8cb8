"""A decoder segment and its KV cache, as every side runs one: the edge's head, the server's tail, the
fidelity runs, the unsplit comparison. A segment takes one main input besides its past (``input_ids`` or a
hidden state) and gives one output besides its presents; each call's presents are the next call's past.

Names follow onnxruntime-genai: ``past_key_values.{i}.key``/``.value`` in, ``present.{i}.key``/``.value``
out, [batch, heads, length, head size]. Exported decoders also take ``attention_mask`` ([batch, past + new],
ones for one unpadded sequence) and ``position_ids`` ([batch, new], counting on from the past's length):
each side builds them from its own cache, so they never cross the network. A part that reads
``input_ids`` only for its shape (a tail recomputing the causal mask) gets zeros of that shape.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from .errors import SplitPointError
from .runner import make_session

PAST, PRESENT = "past_key_values.", "present."
STANDARD_INPUTS = ("attention_mask", "position_ids")
IDS = "input_ids"
_NP: dict[str, type[np.generic]] = {
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(bool)": np.bool_,  # an attention mask of booleans (transformers accepts one)
}


def as_past(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A call's presents, renamed as the next call's past."""
    return {PAST + k[len(PRESENT) :]: v for k, v in outputs.items() if k.startswith(PRESENT)}


def step_feeds(types: dict[str, str], past_len: int, new: int) -> dict[str, np.ndarray]:
    """The inputs a segment builds for itself (``types``: the standard inputs it takes and their onnxruntime
    types): the attention mask and positions of one unpadded sequence, and ``input_ids`` zeros when only
    their shape is read."""
    out: dict[str, np.ndarray] = {}
    for name, t in types.items():
        dtype = _NP.get(t, np.int64)
        if name == "attention_mask":
            out[name] = np.ones((1, past_len + new), dtype)
        elif name == "position_ids":
            out[name] = np.arange(past_len, past_len + new, dtype=dtype).reshape(1, new)
        else:
            out[name] = np.zeros((1, new), dtype)
    return out


class DecoderSegment:
    """One segment's session and the names it takes and gives."""

    def __init__(
        self, model: str | Path | bytes | onnx.ModelProto | ort.InferenceSession, threads: int = 0
    ) -> None:
        self.sess = (
            model
            if isinstance(model, ort.InferenceSession)
            else make_session(model, threads=threads, arena=False)
        )
        ins = self.sess.get_inputs()
        self.inputs = [i.name for i in ins]
        self.outputs = [o.name for o in self.sess.get_outputs()]
        rest = [n for n in self.inputs if not n.startswith(PAST) and n not in STANDARD_INPUTS]
        if len(rest) == 2 and IDS in rest:
            rest.remove(IDS)  # a later part reading the ids' shape only: the hidden state is its input
        main_out = [n for n in self.outputs if not n.startswith(PRESENT)]
        if len(rest) != 1 or len(main_out) != 1:
            raise SplitPointError(
                "a decoder segment takes one input besides its past, attention_mask and position_ids "
                f"(input_ids or a hidden state) and gives one output besides its presents; this one takes "
                f"{rest} and gives {main_out}"
            )
        self.main_in, self.main_out = rest[0], main_out[0]
        self._shapes = {i.name: i.shape for i in ins}
        self._types = {i.name: i.type for i in ins}
        self._own = {
            n: t for n, t in self._types.items() if n in STANDARD_INPUTS or (n == IDS and n != self.main_in)
        }

    def empty_past(self) -> dict[str, np.ndarray]:
        """The past of a sequence that has not started: every layer's key and value of length 0."""
        out: dict[str, np.ndarray] = {}
        for n in self.inputs:
            if not n.startswith(PAST):
                continue
            s = self._shapes[n]
            if len(s) != 4 or not (isinstance(s[1], int) and isinstance(s[3], int)):
                raise SplitPointError(
                    f"{n}: expected [batch, heads, length, head size] with fixed heads, not {s}"
                )
            out[n] = np.zeros((1, s[1], 0, s[3]), _NP.get(self._types[n], np.float32))
        return out

    def feeds(self, x: np.ndarray, past: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Everything one call takes: ``x`` (new tokens or their hidden state), the past, and the inputs
        built from the past's length."""
        past_len = next(iter(past.values())).shape[2] if past else 0
        want = _NP.get(self._types[self.main_in])
        if want is not None and x.dtype != want and np.issubdtype(x.dtype, np.integer):
            x = x.astype(want)  # token ids as the model declares them (int32 exports exist)
        return {self.main_in: x, **past, **step_feeds(self._own, past_len, int(x.shape[1]))}

    def step(self, x: np.ndarray, past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The segment on new tokens (or their hidden state): its output and the grown past."""
        res = dict(zip(self.outputs, self.sess.run(self.outputs, self.feeds(x, past)), strict=True))
        return res[self.main_out], as_past(res)


class CachedSegment(DecoderSegment):
    """A segment that keeps its own past between calls (one sequence at a time)."""

    def __init__(self, model: str | Path | bytes | onnx.ModelProto, threads: int = 0) -> None:
        super().__init__(model, threads)
        self.reset()

    def reset(self) -> None:
        self.past = self.empty_past()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out, self.past = self.step(x, self.past)
        return out
