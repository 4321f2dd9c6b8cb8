"""Head then tail reproduces the full model for every cut of every zoo model."""

from __future__ import annotations

import numpy as np
import pytest

from splitpoint.core import zoo
from splitpoint.core.graph.cuts import enumerate_cuts
from splitpoint.core.graph.extract import extract
from splitpoint.core.graph.index import GraphIndex
from splitpoint.core.runner import make_session

from .conftest import random_feeds


def run_split(head, tail, cut, feeds):
    hs, ts = make_session(head.SerializeToString()), make_session(tail.SerializeToString())
    h_out = dict(
        zip(
            [o.name for o in hs.get_outputs()],
            hs.run(None, {i.name: feeds[i.name] for i in hs.get_inputs()}),
            strict=True,
        )
    )
    cut_feeds = {c.name: (feeds[c.name] if c.source == "input" else h_out[c.name]) for c in cut.crossing}
    assert set(cut_feeds) == {i.name for i in ts.get_inputs()}
    t_out = dict(zip([o.name for o in ts.get_outputs()], ts.run(None, cut_feeds), strict=True))
    return {**{k: v for k, v in h_out.items() if k in cut.head_outputs}, **t_out}


@pytest.mark.parametrize("name", zoo.random_names())
def test_every_cut_equals_full_model(name, small_models):
    model = small_models[name]
    idx = GraphIndex.build(model)
    feeds = random_feeds(model, batch=2, seed=3)
    full = dict(zip(idx.outputs, make_session(model.SerializeToString()).run(None, feeds), strict=True))
    cuts = enumerate_cuts(idx)
    assert len(cuts) == len(idx.compute) - 1
    for cut in cuts:
        head, tail = extract(idx, cut)  # runs onnx.checker with full_check on both
        got = run_split(head, tail, cut, feeds)
        assert set(got) == set(full)
        for k, ref in full.items():
            scale = max(1.0, float(np.abs(ref).max()))
            np.testing.assert_allclose(
                got[k], ref, atol=1e-5 * scale, rtol=0, err_msg=f"{name} cut {cut.index} {k}"
            )


def test_chain_cuts_cross_one_tensor_and_residual_cuts_cross_two(small_models):
    chain = enumerate_cuts(GraphIndex.build(small_models["alexnet"]))
    assert all(len(c.crossing) == 1 for c in chain)
    res = enumerate_cuts(GraphIndex.build(small_models["resnet18"]))
    widths = {len(c.crossing) for c in res}
    assert widths == {1, 2}
    # bytes are those of the crossing tensors, per sample
    for c in res:
        assert c.bytes_per_sample == sum(t.bytes_per_sample for t in c.crossing)
    # MAC share grows monotonically along the order and ends below 100 %
    shares = [c.head_macs_share for c in res]
    assert shares == sorted(shares) and shares[-1] < 1.0


def test_raw_input_read_late_is_marked_crossing_and_counted(small_models):
    idx = GraphIndex.build(small_models["multitask"])
    cuts = enumerate_cuts(idx)
    early = cuts[0]
    meta = [c for c in early.crossing if c.name == "meta"]
    assert meta and meta[0].source == "input" and meta[0].bytes_per_sample == 16 * 4
    assert early.raw_input_crossing
    # once the metadata branch is in the head, the raw input no longer crosses
    assert not cuts[-1].raw_input_crossing
    # the auxiliary output is produced early: later cuts return it from the head
    assert any("fc_0" in c.head_outputs for c in cuts)


def test_parts_with_shared_weights_run_as_those_with_their_own(small_models):
    """The profiler's and the fidelity runs' parts: large weights as stubs, arrays read once per model."""
    from splitpoint.core.errors import SplitPointError
    from splitpoint.core.weights import is_stub

    model = small_models["resnet18"]
    idx = GraphIndex.build(model)
    feeds = random_feeds(model, batch=1, seed=4)
    cut = enumerate_cuts(idx)[len(idx.compute) // 2]
    head, tail = extract(idx, cut, check=False, shared_weights=True)
    stubs = [t for m in (head, tail) for t in m.graph.initializer if is_stub(t)]
    assert stubs and all(not t.raw_data for t in stubs)
    assert head.ByteSize() + tail.ByteSize() < sum(m.ByteSize() for m in extract(idx, cut)) / 10
    sessions = [make_session(m, weights=idx.weight_array) for m in (head, tail)]
    h_out = dict(zip([o.name for o in sessions[0].get_outputs()], sessions[0].run(None, feeds), strict=True))
    cut_feeds = {c.name: (feeds[c.name] if c.source == "input" else h_out[c.name]) for c in cut.crossing}
    got = sessions[1].run(None, cut_feeds)
    want = run_split(*extract(idx, cut), cut, feeds)
    for name, g in zip([o.name for o in sessions[1].get_outputs()], got, strict=True):
        np.testing.assert_allclose(g, want[name], rtol=1e-5, atol=1e-6)
    # the arrays are read once and shared, not copied per part
    name = stubs[0].name
    assert idx.weight_array(name) is idx.weight_array(name)
    with pytest.raises(SplitPointError, match="shared but no arrays"):
        make_session(head)
