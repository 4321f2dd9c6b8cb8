"""Decoder-only transformers with a KV cache: cached decoding is exact, segments split between layers
decode the same tokens as the whole model, and the random weights carry the outlier channels and the
peaked next-token distribution the module documents."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from splitpoint.core.zoo.decoder import (
    DECODER_TINY,
    GPT2,
    build_decoder,
    empty_past,
    hidden_name,
    outlier_channels,
)

SPEC = DECODER_TINY


def _session(model) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _run(sess, feeds):
    """One call: its outputs by name, and the presents renamed as the next call's past."""
    names = [o.name for o in sess.get_outputs()]
    out = dict(zip(names, sess.run(None, feeds), strict=True))
    past = {k.replace("present.", "past_key_values."): v for k, v in out.items() if k.startswith("present.")}
    return out, past


@pytest.fixture(scope="module")
def whole():
    return _session(build_decoder(SPEC, "decoder-tiny"))


def _prompt(n=12, seed=1):
    return np.random.default_rng(seed).integers(0, SPEC.vocab, (1, n))


def _greedy(sess, ids, steps):
    past, tokens, last = empty_past(SPEC), [], None
    for _ in range(steps):
        out, past = _run(sess, {"input_ids": ids, **past})
        last = out["logits"][0, -1]
        tokens.append(int(last.argmax()))
        ids = np.array([[tokens[-1]]])
    return tokens, last


def test_gpt2_has_gpt2_smalls_parameter_count():
    assert GPT2.params() == 124_439_808
    m = build_decoder(SPEC)
    floats = sum(int(np.prod(t.dims)) for t in m.graph.initializer if t.data_type == 1 and len(t.dims) >= 1)
    assert floats == SPEC.params()


def test_cached_decoding_matches_recomputing_from_scratch(whole):
    prompt = _prompt()
    tokens, last = _greedy(whole, prompt, 40)
    full = np.concatenate([prompt, np.array([tokens[:-1]])], axis=1)
    out, _ = _run(whole, {"input_ids": full, **empty_past(SPEC)})
    assert np.abs(out["logits"][0, -1] - last).max() <= 1e-5
    assert len(set(tokens)) > 10  # not stuck repeating one token


@pytest.mark.parametrize("cut", range(1, SPEC.layers))
def test_a_split_between_layers_decodes_the_whole_models_tokens(whole, cut):
    head = _session(build_decoder(SPEC, layers=(0, cut)))
    tail = _session(build_decoder(SPEC, layers=(cut, SPEC.layers)))
    assert [i.name for i in head.get_inputs()] == ["input_ids"] + [
        f"past_key_values.{i}.{k}" for i in range(cut) for k in ("key", "value")
    ]
    assert tail.get_inputs()[0].name == hidden_name(cut - 1)
    ph, pt = empty_past(SPEC, layers=(0, cut)), empty_past(SPEC, layers=(cut, SPEC.layers))
    ids, split = _prompt(), []
    for _ in range(32):
        h, ph = _run(head, {"input_ids": ids, **ph})
        t, pt = _run(tail, {hidden_name(cut - 1): h[hidden_name(cut - 1)], **pt})
        split.append(int(t["logits"][0, -1].argmax()))
        ids = np.array([[split[-1]]])
    assert split == _greedy(whole, _prompt(), 32)[0]


def test_outlier_channels_and_a_peaked_next_token_distribution():
    m = build_decoder(SPEC)
    mid = hidden_name(SPEC.layers // 2 - 1)
    from onnx import helper

    m.graph.output.append(helper.make_tensor_value_info(mid, 1, None))
    sess = _session(m)
    logits, h = sess.run(["logits", mid], {"input_ids": _prompt(64, 5), **empty_past(SPEC)})
    oc = outlier_channels(SPEC)
    rest = np.setdiff1d(np.arange(SPEC.d_model), oc)
    ratio = np.median(np.abs(h[0][:, oc])) / np.median(np.abs(h[0][:, rest]))
    assert ratio >= 20, ratio
    p = np.exp(logits[0] - logits[0].max(-1, keepdims=True))
    top1 = (p.max(-1) / p.sum(-1)).mean()
    assert 0.3 <= top1 <= 0.7  # calibrated to 0.5 on another prompt
    assert top1 > 100 / SPEC.vocab


def test_a_segment_outside_the_model_is_refused():
    with pytest.raises(ValueError, match="not a segment"):
        build_decoder(SPEC, layers=(2, 2))
    with pytest.raises(ValueError, match="not a segment"):
        build_decoder(SPEC, layers=(0, SPEC.layers + 1))


def test_the_zoo_lists_and_writes_the_decoders(tmp_path):
    from splitpoint.core import zoo

    rows = {r[0]: r for r in zoo.listing()}
    assert rows["gpt2"][2] == "124,439,808" and "decoder-only" in rows["gpt2"][1]
    ((path, nodes),) = zoo.write(["decoder-tiny"], tmp_path)
    import onnx

    m = onnx.load(path)
    assert [i.name for i in m.graph.input][:2] == ["input_ids", "past_key_values.0.key"]
    assert [o.name for o in m.graph.output][:2] == ["logits", "present.0.key"]
    with pytest.raises(Exception, match="width and resolution do not apply"):
        zoo.write(["decoder-tiny"], tmp_path, width=0.5)
