"""Decoder-split fidelity: teacher-forced greedy agreement and next-token KL per codec."""

from __future__ import annotations

import numpy as np
import pytest

from splitpoint.core.errors import SplitPointError
from splitpoint.core.zoo.decoder import DECODER_TINY, build_decoder
from splitpoint.partitioner.decoderfidelity import kl_divergence, measure

SPEC = DECODER_TINY


def test_kl_divergence_is_zero_on_equal_and_matches_a_hand_computation():
    a = np.array([[1.0, 2.0, 3.0]])
    assert kl_divergence(a, a + 5)[0] == pytest.approx(0.0, abs=1e-12)  # a shift is the same distribution
    p = np.exp(a) / np.exp(a).sum()
    b = np.array([[3.0, 2.0, 1.0]])
    q = np.exp(b) / np.exp(b).sum()
    assert kl_divergence(a, b)[0] == pytest.approx(float((p * np.log(p / q)).sum()), rel=1e-9)


@pytest.fixture(scope="module")
def split():
    return build_decoder(SPEC, layers=(0, 2)), build_decoder(SPEC, layers=(2, SPEC.layers))


def test_float32_is_exact_and_outliers_kept_exact_beat_plain_int4(split):
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, SPEC.vocab, (1, 8)) for _ in range(3)]
    fid = measure(*split, ["float32", "int4", "int4-ol"], prompts, new_tokens=12)
    assert fid["float32"].agreement.value == 1.0 and fid["float32"].agreement.n == 36
    assert fid["float32"].kl.value == pytest.approx(0.0, abs=1e-9)
    assert fid["int4"].kl.value > 3 * fid["int4-ol"].kl.value
    assert fid["int4-ol"].agreement.value >= fid["int4"].agreement.value
    lo, hi = fid["int4"].kl.low, fid["int4"].kl.high
    assert lo <= fid["int4"].kl.value <= hi


def test_a_model_that_is_not_a_decoder_segment_is_refused(split):
    from splitpoint.core.zoo import build

    with pytest.raises(SplitPointError, match="one input besides its past"):
        measure(build("multitask"), split[1], ["float32"], [np.zeros((1, 4), np.int64)], 2)
    with pytest.raises(SplitPointError, match="at least one prompt"):
        measure(*split, ["float32"], [], 2)
