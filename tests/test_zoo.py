"""The zoo's architectures match their publications and give usable activations."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from splitpoint.core import zoo
from splitpoint.core.errors import ModelError
from splitpoint.core.graph.flops import count_macs, count_params
from splitpoint.core.graph.index import GraphIndex
from splitpoint.core.runner import make_session

from .conftest import random_feeds


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenetv2", "alexnet"])
def test_full_size_matches_published_params_and_macs(name):
    e = zoo.ZOO[name]
    idx = GraphIndex.build(zoo.build(name))
    assert count_params(idx) == e.params  # torchvision's exact trainable-parameter count
    assert count_macs(idx) / 1e9 == pytest.approx(e.gmacs, rel=0.02)


@pytest.mark.parametrize("name", zoo.random_names())
def test_small_models_run_with_symbolic_batch_and_order_one_outputs(name, small_models):
    model = small_models[name]
    onnx.checker.check_model(model, full_check=True)
    for i in model.graph.input:
        assert i.type.tensor_type.shape.dim[0].dim_param == "N"
    sess = make_session(model.SerializeToString())
    for batch in (1, 3):
        outs = sess.run(None, random_feeds(model, batch=batch, seed=7))
        for o in outs:
            assert o.shape[0] == batch
            assert np.isfinite(o).all()
            # neither vanishing nor exploding on unseen random inputs
            assert 0.1 < float(o.std()) < 10.0, (name, float(o.std()))


def test_same_seed_same_bytes_other_seed_other_weights():
    a = zoo.build("resnet18", width=0.25, resolution=32, seed=1).SerializeToString()
    b = zoo.build("resnet18", width=0.25, resolution=32, seed=1).SerializeToString()
    c = zoo.build("resnet18", width=0.25, resolution=32, seed=2).SerializeToString()
    assert a == b and a != c


def test_multitask_has_two_inputs_three_outputs_and_tied_weights(small_models):
    m = small_models["multitask"]
    assert [i.name for i in m.graph.input] == ["image", "meta"]
    assert len(m.graph.output) == 3
    uses = {}
    for n in m.graph.node:
        if n.op_type == "Conv":
            uses[n.input[1]] = uses.get(n.input[1], 0) + 1
    assert max(uses.values()) == 2


def test_resolve_names_and_paths(tmp_path):
    assert zoo.resolve("mobilenetv2").exists()
    with pytest.raises(ModelError, match="neither a file nor a zoo model"):
        zoo.resolve("resnet19")
    with pytest.raises(ModelError, match="unknown zoo model"):
        zoo.build("vgg99")
    assert zoo.resolve(tmp_path / "x.onnx") == tmp_path / "x.onnx"
