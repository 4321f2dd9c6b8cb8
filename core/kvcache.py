"""A decoder segment and its KV cache, as every side runs one: the edge's head, the fidelity runs, the
unsplit comparison. A segment takes one input besides its past (``input_ids`` or a hidden state) and gives
one output besides its presents; each call's presents are the next call's past.

Names follow onnxruntime-genai: ``past_key_values.{i}.key``/``.value`` in, ``present.{i}.key``/``.value``
out, [batch, heads, length, head size].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from .errors import SplitPointError
from .runner import make_session

PAST, PRESENT = "past_key_values.", "present."


def as_past(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A call's presents, renamed as the next call's past."""
    return {PAST + k[len(PRESENT) :]: v for k, v in outputs.items() if k.startswith(PRESENT)}


class DecoderSegment:
    """One segment's session and the names it takes and gives."""

    def __init__(self, model: str | Path | bytes | onnx.ModelProto, threads: int = 0) -> None:
        self.sess = make_session(model, threads=threads)
        self.inputs = [i.name for i in self.sess.get_inputs()]
        self.outputs = [o.name for o in self.sess.get_outputs()]
        main_in = [n for n in self.inputs if not n.startswith(PAST)]
        main_out = [n for n in self.outputs if not n.startswith(PRESENT)]
        if len(main_in) != 1 or len(main_out) != 1:
            raise SplitPointError(
                "a decoder segment takes one input besides its past (input_ids or a hidden state) and gives "
                f"one output besides its presents; this one takes {main_in} and gives {main_out}"
            )
        self.main_in, self.main_out = main_in[0], main_out[0]
        self._shapes = {i.name: i.shape for i in self.sess.get_inputs()}

    def empty_past(self) -> dict[str, np.ndarray]:
        """The past of a sequence that has not started: every layer's key and value of length 0."""
        out = {}
        for n in self.inputs:
            if not n.startswith(PAST):
                continue
            s = self._shapes[n]
            if len(s) != 4 or not (isinstance(s[1], int) and isinstance(s[3], int)):
                raise SplitPointError(
                    f"{n}: expected [batch, heads, length, head size] with fixed heads, not {s}"
                )
            out[n] = np.zeros((1, s[1], 0, s[3]), np.float32)
        return out

    def step(self, x: np.ndarray, past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The segment on new tokens (or their hidden state): its output and the grown past."""
        res = dict(zip(self.outputs, self.sess.run(self.outputs, {self.main_in: x, **past}), strict=True))
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
