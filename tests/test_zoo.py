"""The zoo's architectures match their publications and give usable activations."""

from __future__ import annotations

import os

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
    # the zoo lists its decoders too: a one-shot command given one says which commands take it
    with pytest.raises(ModelError, match="'gpt2' is a zoo decoder: `splitpoint split-decoder`"):
        zoo.resolve("gpt2")
    with pytest.raises(ModelError, match="'gpt2' is a zoo decoder: zoo.write"):
        zoo.build("gpt2")
    assert zoo.resolve(tmp_path / "x.onnx") == tmp_path / "x.onnx"


def test_a_build_killed_mid_write_leaves_nothing_the_next_build_keeps(tmp_path, monkeypatch):
    """A build killed by SIGTERM while it wrote left its temporary file (244 MB for AlexNet) in the cache
    for good; the next build removes those of dead writers of this host, and no live writer's."""
    import subprocess
    import sys

    from splitpoint.core.files import writer_tag

    monkeypatch.setenv("SPLITPOINT_CACHE", str(tmp_path))
    host = writer_tag().split("@", 1)[1]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = zoo.cache_dir()
    folder.mkdir(parents=True)
    left = folder / f".alexnet-w1-r224-s0.onnx.tmp-{dead.pid}@{host}-"
    busy = folder / f".alexnet-w1-r224-s0.onnx.tmp-{os.getppid()}@{host}-"  # a live writer's
    for f in (left, busy):
        f.write_bytes(b"half a model")
    path = zoo.zoo_path("mobilenetv2", width=0.25, resolution=32)
    assert path.is_file() and not left.exists() and busy.exists()
    assert sorted(p.name for p in folder.iterdir()) == sorted([path.name, busy.name])
