"""`splitpoint cuts` and `splitpoint split` as a user runs them, bad input included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from splitpoint.core import zoo
from splitpoint.core.errors import OutputExistsError, PlanError
from splitpoint.core.plan import Plan, write_dir_atomically
from splitpoint.core.runner import assemble, load_split, make_session

from .conftest import random_feeds, run_cli


@pytest.fixture(scope="module")
def small_resnet(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "r18.onnx"
    onnx.save_model(zoo.build("resnet18", width=0.25, resolution=32), str(path))
    return path


def test_cuts_json_lists_every_cut(small_resnet):
    proc = run_cli("cuts", str(small_resnet), "--json", check=True)
    data = json.loads(proc.stdout)
    cuts = data["cuts"]
    assert [c["index"] for c in cuts] == list(range(1, data["compute_nodes"]))
    for c in cuts:
        assert c["bytes_per_sample"] == sum(t["bytes_per_sample"] for t in c["crossing"])
        assert all(t["dtype"] == "float32" and t["shape"].startswith("N") for t in c["crossing"])
    table = run_cli("cuts", str(small_resnet), check=True).stdout
    assert "candidate cuts" in table and "maxpool_0" in table


def test_a_cut_carrying_many_tensors_shows_the_largest_and_counts_the_rest(tmp_path):
    """Six branches cross the cut after them: the table shows the three largest and counts the other
    three with their bytes (a transformer's cut carries dozens of shape tensors); --json has all six."""
    sizes = [64, 8, 32, 4, 16, 2]
    nodes = [helper.make_node("Slice", ["x", f"s{i}", f"e{i}"], [f"b{i}"]) for i in range(6)]
    nodes += [helper.make_node("ReduceSum", [f"b{i}"], [f"r{i}"], keepdims=0) for i in range(6)]
    nodes += [helper.make_node("Sum", [f"r{i}" for i in range(6)], ["y"])]
    inits = []
    for i, n in enumerate(sizes):
        inits += [helper.make_tensor(f"s{i}", TensorProto.INT64, [1], [0])]
        inits += [helper.make_tensor(f"e{i}", TensorProto.INT64, [1], [n])]
    g = helper.make_graph(
        nodes,
        "branches",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
        inits,
    )
    path = tmp_path / "branches.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    cuts = json.loads(run_cli("cuts", str(path), "--json", check=True).stdout)["cuts"]
    six = next(c for c in cuts if {t["name"] for t in c["crossing"]} == {f"b{i}" for i in range(6)})
    row = next(
        line
        for line in run_cli("cuts", str(path), check=True).stdout.splitlines()
        if line.strip("│ ").startswith(f"{six['index']} ")
    )
    cell = row.split("│")[3]
    assert "b0[64]" in cell and "b2[32]" in cell and "b4[16]" in cell, row
    assert "b1[" not in cell and "and 3 more (56 B in all; --json lists them)" in cell, row


def test_tensors_of_unknown_size_are_shown_first_and_not_summed_as_nothing():
    """A GRU's cut carried two tensors whose size shape inference could not follow (the largest, at run
    time) and three of a few bytes: the cell hid the two and said the rest came to "0 B in all"."""
    from splitpoint.app.console import _crossing_cell
    from splitpoint.core.graph.cuts import CrossingTensor

    crossing = [
        CrossingTensor("val_52", "4", "int64", 32, "head"),
        CrossingTensor("val_53", "1", "int64", 8, "head"),
        CrossingTensor("val_55", "1", "int64", 8, "head"),
        CrossingTensor("zeros", "2xbatchx24", "float32", None, "head"),
        CrossingTensor("val_51", "20xbatchx1x24", "float32", None, "head"),
    ]
    cell = _crossing_cell(crossing)
    assert cell.startswith("zeros[2xbatchx24], val_51[20xbatchx1x24], val_52[4]"), cell
    assert "and 2 more (16 B in all; --json lists them)" in cell, cell
    crossing[0] = CrossingTensor("val_52", "?", "float32", None, "head")
    crossing[1] = CrossingTensor("val_53", "?", "float32", None, "head")
    cell = _crossing_cell(crossing)  # four of unknown size: one of them among the rest
    assert "and 2 more (8 B and 1 of unknown size; --json lists them)" in cell, cell


def test_split_writes_a_verified_plan_that_reproduces_the_model(small_resnet, tmp_path):
    out = tmp_path / "plan"
    run_cli("split", str(small_resnet), "--cut", "bn_3,maxpool_0", "-o", str(out), check=True)
    plan, head, tail = load_split(out)
    assert {t.name for t in plan.cut_tensors} == {"bn_3", "maxpool_0"}
    assert set(plan.files) == {"head.onnx", "tail.onnx"} and len(plan.plan_id) == 64
    model = onnx.load(str(small_resnet))
    feeds = random_feeds(model, batch=2)
    sent, early = head.run(feeds)
    outs = assemble(plan, early, tail.run(sent))
    ref = make_session(str(small_resnet)).run(None, feeds)
    np.testing.assert_allclose(outs[0], ref[0], atol=1e-5)
    # tampering with a file is caught by the checksum
    with open(out / "tail.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(PlanError, match="checksum mismatch for tail.onnx"):
        Plan.load(out)


def test_zoo_names_are_accepted_wherever_a_model_is(tmp_path):
    proc = run_cli("cuts", "multitask", "--json", check=True)
    assert json.loads(proc.stdout)["cuts"][0]["raw_input_crossing"] is True


def _bad_models(tmp_path, small_resnet):
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n" * 20)
    data = small_resnet.read_bytes()
    trunc = tmp_path / "truncated.onnx"
    trunc.write_bytes(data[: len(data) // 2])

    def one_in_one_out(name: str, nodes: list) -> Path:
        g = helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        )
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(helper.make_model(g).SerializeToString())
        return path

    ghost = one_in_one_out("ghost", [helper.make_node("Relu", ["nope"], ["y"])])
    cycle = one_in_one_out(
        "cycle",
        [
            helper.make_node("Relu", ["b"], ["a"], name="n1"),
            helper.make_node("Relu", ["a"], ["b"], name="n2"),
            helper.make_node("Add", ["x", "a"], ["y"], name="after"),
        ],
    )
    invalid = one_in_one_out("invalid", [helper.make_node("Relu", ["x"], ["y"], name="r", alpha=2.0)])
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    return {
        "missing": (tmp_path / "missing.onnx", "model file not found"),
        "empty": (empty, "model file is empty"),
        "text": (text, "not (a valid ONNX file|an ONNX model)"),
        "truncated": (trunc, "not (a valid ONNX file|an ONNX model)"),
        # the checker calls these two an ordering problem, which loading mends: their causes, named
        "ghost": (ghost, "node Relu reads 'nope', which no node, graph input or initializer gives"),
        "cycle": (cycle, r"nodes 'n1' \(Relu\), 'n2' \(Relu\) read each other's outputs in a cycle"),
        "checker": (invalid, "fails the ONNX checker: .*alpha"),  # its whole report, not its first line
    }


@pytest.mark.parametrize("case", ["missing", "empty", "text", "truncated", "ghost", "cycle", "checker"])
def test_bad_model_files_get_a_specific_error_and_no_output(case, tmp_path, small_resnet):
    path, message = _bad_models(tmp_path, small_resnet)[case]
    out = tmp_path / "out"
    for args in (["cuts", str(path)], ["split", str(path), "--cut", "3", "-o", str(out)]):
        proc = run_cli(*args)
        assert proc.returncode == 2, proc.stderr
        assert "error:" in proc.stderr and "Traceback" not in proc.stderr
        import re

        assert re.search(message, proc.stderr), proc.stderr
    assert not out.exists()


def test_nodes_that_share_a_name_are_renamed_and_run(tmp_path):
    """onnxruntime refuses two compute nodes of one name (the checker does not: the cuts were listed, then
    the split failed), and a converter reuses one for Constants (silero-vad's OpenVINO export): a later
    one gets a name of its own, and the model cuts, splits and runs as it computes."""
    nodes = [
        helper.make_node(
            "Constant", [], ["c1"], name="anon", value=helper.make_tensor("v", TensorProto.FLOAT, [1], [2.0])
        ),
        helper.make_node(
            "Constant", [], ["c2"], name="anon", value=helper.make_tensor("v", TensorProto.FLOAT, [1], [3.0])
        ),
        helper.make_node("Mul", ["x", "c1"], ["a"], name="dup"),
        helper.make_node("Relu", ["a"], ["b"], name="dup"),
        helper.make_node("Add", ["b", "c2"], ["y"], name="dup__2"),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    path = tmp_path / "dup.onnx"
    path.write_bytes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    from splitpoint.core.graph import open_model

    h = open_model(path)
    assert len({n.name for n in h.model.graph.node}) == 5
    assert [n.name for n in h.model.graph.node if n.op_type != "Constant"] == ["dup", "dup__3", "dup__2"]
    proc = run_cli("split", str(path), "--cut", "1", "-o", str(tmp_path / "p"))
    assert proc.returncode == 0, proc.stderr
    x = np.array([[-1.0, 0.5, 2.0, -3.0]], np.float32)
    plan, head, tail = load_split(tmp_path / "p")
    sent, early = head.run({"x": x})
    np.testing.assert_allclose(assemble(plan, early, tail.run(sent))[0], np.maximum(2 * x, 0) + 3)


@pytest.mark.parametrize(
    "cut,message",
    [
        ("0", "cut index 0 does not exist: cuts are numbered 1..68"),
        ("69", "cut index 69 does not exist"),
        ("-4", "cut index -4 does not exist"),
        ("relu_999", "no tensor named 'relu_999'"),
        ("bn_3", "the tail also needs maxpool_0"),
    ],
)
def test_bad_cuts_are_refused(cut, message, small_resnet, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("split", str(small_resnet), "--cut", cut, "-o", str(out))
    assert proc.returncode == 2 and message in " ".join(proc.stderr.split()), proc.stderr
    assert not out.exists()


def test_existing_output_is_kept_without_force_and_replaced_with_it(small_resnet, tmp_path):
    """--force replaces an earlier plan, never a directory of the user's files: one holding the model the
    plan is cut from lost it (and everything beside it) before."""
    out = tmp_path / "plan"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    model = out / "model.onnx"
    model.write_bytes(small_resnet.read_bytes())
    proc = run_cli("split", str(small_resnet), "--cut", "4", "-o", str(out))
    assert proc.returncode == 2 and "not empty" in proc.stderr
    proc = run_cli("split", str(model), "--cut", "4", "-o", str(out), "--force")
    assert proc.returncode == 2 and "holds files that are not a plan's (keep.txt, model.onnx)" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "model.onnx"]
    plan = tmp_path / "plan2"
    run_cli("split", str(small_resnet), "--cut", "4", "-o", str(plan), check=True)
    run_cli("split", str(small_resnet), "--cut", "6", "-o", str(plan), "--force", check=True)
    assert sorted(p.name for p in plan.iterdir()) == ["head.onnx", "plan.json", "tail.onnx"]
    # a plan.json among them does not make the user's files the plan's: they went with the plan before
    (out / "plan.json").write_bytes((plan / "plan.json").read_bytes())
    (plan / "notes.txt").write_text("mine too")
    for where, theirs in ((out, "keep.txt, model.onnx"), (plan, "notes.txt")):
        before = sorted(p.name for p in where.iterdir())
        proc = run_cli("split", str(small_resnet), "--cut", "4", "-o", str(where), "--force")
        assert proc.returncode == 2 and f"not a plan's ({theirs})" in proc.stderr, proc.stderr
        assert sorted(p.name for p in where.iterdir()) == before
    (plan / "notes.txt").unlink()
    (plan / "plan.json").write_text("{damaged")
    proc = run_cli("split", str(small_resnet), "--cut", "4", "-o", str(plan), "--force")
    assert proc.returncode == 2 and "not a plan's (head.onnx, tail.onnx)" in proc.stderr, proc.stderr
    (plan / "plan.json").write_bytes((out / "plan.json").read_bytes())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    # readable as the umask says (a service's user reads plans another user wrote), not mkdtemp's 0700
    assert plan.stat().st_mode & 0o777 == 0o777 & ~_umask()
    proc = run_cli("split", str(small_resnet), "--cut", "4", "-o", ".", "--force")
    assert proc.returncode == 2 and "current directory" in proc.stderr


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_of_two_writers_of_one_new_plan_directory_one_is_told(small_resnet, tmp_path):
    """Both started on a missing directory: the second to finish used to replace the first's plan and
    report success; now it is refused and the first plan stands."""
    from splitpoint.core.errors import OutputExistsError
    from splitpoint.core.plan import write_dir_atomically

    out = tmp_path / "plan"

    def first(tmp):
        (tmp / "plan.json").write_text("first")
        (out / "plan.json").parent.mkdir()  # the other writer finishes meanwhile
        (out / "plan.json").write_text("second")

    with pytest.raises(OutputExistsError, match="written by another process meanwhile"):
        write_dir_atomically(out, first)
    assert (out / "plan.json").read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["plan"]


def test_sigterm_mid_write_leaves_no_temporary_directory(tmp_path):
    """A supervisor's SIGTERM unwinds like Ctrl-C: the temporary plan directory goes with it."""
    code = (
        "import os, signal, time\n"
        "from splitpoint.app.cli import _terminated\n"
        "from splitpoint.core.plan import write_dir_atomically\n"
        "signal.signal(signal.SIGTERM, _terminated)  # as main() does\n"
        "def write(tmp):\n"
        "    (tmp / 'head.onnx').write_bytes(b'partial')\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(10)\n"
        f"write_dir_atomically({str(tmp_path / 'plan')!r}, write)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_failure_mid_write_leaves_previous_content_intact(tmp_path):
    out = tmp_path / "plan"
    out.mkdir()
    (out / "plan.json").write_text("old")

    def write(tmp):
        (tmp / "head.onnx").write_bytes(b"partial")
        raise KeyboardInterrupt  # Ctrl-C halfway

    with pytest.raises(KeyboardInterrupt):
        write_dir_atomically(out, write, force=True)
    assert [p.name for p in out.iterdir()] == ["plan.json"] and (out / "plan.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["plan"]


def test_a_force_write_killed_between_its_renames_gets_its_old_plan_back(tmp_path):
    """SIGKILL after a --force write set the earlier plan aside and before its new one took the name:
    no plan at the target, the old one hidden for good and the new one's folder deleted as a leftover by
    the next server. The next write (or server start) puts the old plan back and removes the rest."""
    from splitpoint.core.files import writer_tag
    from splitpoint.core.plan import sweep_leftovers

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tag = f"{dead.pid}@{writer_tag().split('@', 1)[1]}"
    aside, new = tmp_path / f".plan.old-{tag}-", tmp_path / f".plan.tmp-{tag}-ab12ab12"
    for d, text in ((aside, "old"), (new, "new")):
        d.mkdir()
        (d / "plan.json").write_text(text)
    with pytest.raises(OutputExistsError, match="is not empty"):  # the old plan is back at the name
        write_dir_atomically(tmp_path / "plan", lambda t: (t / "plan.json").write_text("newer"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan"]
    assert (tmp_path / "plan" / "plan.json").read_text() == "old"
    write_dir_atomically(tmp_path / "plan", lambda t: (t / "plan.json").write_text("newer"), force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan"]
    # a server's sweep does the same for the plans it holds
    aside.mkdir()
    (aside / "plan.json").write_text("old")
    (tmp_path / "plan").rename(tmp_path / "elsewhere")
    sweep_leftovers(tmp_path)
    assert (tmp_path / "plan" / "plan.json").read_text() == "old" and not aside.exists()
    # a user's own hidden folders of such names are not a write's, whatever their age; nor is a set-aside
    # plan of a writer that still runs (this process's parent)
    mine = [tmp_path / ".plan.tmp-notes", tmp_path / ".plan.old-backup-2024"]
    live = tmp_path / f".plan.old-{os.getppid()}@{writer_tag().split('@', 1)[1]}-"
    for d in (*mine, live):
        d.mkdir()
        (d / "plan.json").write_text("mine")
        os.utime(d, (0, 0))
    write_dir_atomically(tmp_path / "plan", lambda t: (t / "plan.json").write_text("newest"), force=True)
    sweep_leftovers(tmp_path)
    assert all(d.is_dir() for d in (*mine, live))


def _fsync_spy(monkeypatch, watch: Path) -> list[tuple[int, bool]]:
    """Every fsync(2) the writes below make, as (the inode synced, whether ``watch`` existed then); the
    real call is made (a power cut cannot be staged here: what reaches the disk, and when, can be)."""
    synced: list[tuple[int, bool]] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append((os.fstat(fd).st_ino, watch.exists()))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return synced


def test_a_plan_and_its_rename_reach_the_disk_before_the_write_returns(tmp_path, monkeypatch):
    """An edge device that loses power just after a deploy keeps a whole plan, the old or the new: every
    file and folder of the new one is synced before the rename publishes it, and the rename before the
    old one is removed (unsynced, a power cut could leave the name on files whose data never landed)."""
    out = tmp_path / "plan"
    write_dir_atomically(out, lambda t: (t / "plan.json").write_text("old"))
    synced = _fsync_spy(monkeypatch, out / "weights.bin")

    def write(t: Path) -> None:
        (t / "plan.json").write_text("new")
        (t / "weights.bin").write_bytes(os.urandom(1 << 16))
        (t / "sub").mkdir()
        (t / "sub" / "tail.onnx").write_bytes(b"x" * 100)

    write_dir_atomically(out, write, force=True)
    inodes = {ino for ino, _ in synced}
    for p in (out, out / "sub", *out.rglob("*")):
        assert p.stat().st_ino in inodes, p
    # the folder that holds the plan, synced once the new plan has its name
    assert (tmp_path.stat().st_ino, True) in synced


def test_an_atomic_file_write_is_synced_unless_asked_not_to_be(tmp_path, monkeypatch):
    from splitpoint.core.files import atomic_write, atomic_write_text

    target = tmp_path / "profile.json"
    synced = _fsync_spy(monkeypatch, target)
    atomic_write_text(target, "{}")
    assert (target.stat().st_ino, False) in synced and (tmp_path.stat().st_ino, True) in synced
    synced.clear()
    atomic_write(tmp_path / "answer.npz", lambda f: f.write(b"x"), durable=False)  # one per request
    assert synced == [] and (tmp_path / "answer.npz").read_bytes() == b"x"


def test_a_failed_write_names_the_users_path_not_a_temporary_one(tmp_path):
    """A full disk's error names no file (write(2) has none), a read-only one named the temporary folder
    the write went to: 'error: No space left on device', with no word of where."""
    import errno

    def full(tmp):
        (tmp / "head.onnx").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    def readonly(tmp):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp / "head.onnx"))

    out = tmp_path / "plan"
    for write, kind in ((full, OSError), (readonly, PermissionError)):
        with pytest.raises(kind) as e:
            write_dir_atomically(out, write)
        assert e.value.filename == str(out) and e.value.errno in (errno.ENOSPC, errno.EACCES)
        assert list(tmp_path.iterdir()) == []
    from splitpoint.core.files import atomic_write

    with pytest.raises(OSError) as e:
        atomic_write(tmp_path / "p.json", lambda f: full(tmp_path))
    assert e.value.filename == str(tmp_path / "p.json")


def test_split_says_how_its_codec_applies_to_the_tensors_it_sends():
    """'sent as float32' for a float16 model's cut, which goes as float16; a quantising codec's name for
    token ids, which go exact."""
    from splitpoint.app.cli.models import _as_applied
    from splitpoint.core.plan import TensorSpec

    half = [TensorSpec(name="h", shape="1x8", dtype="float16")]
    ids = [
        TensorSpec(name="ids", shape="1x8", dtype="int64"),
        TensorSpec(name="x", shape="1x8", dtype="float32"),
    ]
    assert _as_applied("float32", half) == ": each tensor exact, in its own type (float16)"
    assert _as_applied("float32+zstd", [TensorSpec(name="x", shape="1", dtype="float32")]) == ""
    assert _as_applied("int8", ids) == "; int64 tensors go exact"
    assert _as_applied("int8", ids[1:]) == ""


def test_the_cuts_table_does_not_call_a_fixed_leading_dim_the_batch():
    """A static time-major input ([10 steps, 2, 16]) was titled "bytes per request of batch 10": a fixed
    leading dim may be a batch or not, and the rows are a whole request's either way."""
    from splitpoint.app.console import cuts_table

    assert (
        cuts_table("tm", [], 10).title
        == "tm: 0 candidate cuts (bytes per request, at the inputs' fixed shapes)"
    )
    assert (
        cuts_table("r", [], None).title == "r: 0 candidate cuts (bytes per sample, from the tensors' shapes)"
    )


def test_the_crossing_list_split_prints_is_a_cut_it_takes_back(tmp_path):
    """`split` lists a raw input the tail reads among what crosses ("crosses x, b"); given back as
    --cut x,b it was refused as "a graph input". A raw input crosses wherever the tail reads it: named,
    it is taken as the same cut; named alone, the error says what to name."""
    from splitpoint.core.errors import CutError
    from splitpoint.core.graph import open_model
    from splitpoint.core.graph.cuts import cut_by_tensors

    g = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["a"]),
            helper.make_node("Neg", ["a"], ["b"]),
            helper.make_node("Add", ["b", "x"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    h = open_model(str(path))
    alone = cut_by_tensors(h.index, ["b"])
    assert sorted(c.name for c in alone.crossing) == ["b", "x"]
    again = cut_by_tensors(h.index, [c.name for c in alone.crossing])
    assert again.index == alone.index and sorted(c.name for c in again.crossing) == ["b", "x"]
    with pytest.raises(CutError, match="'x' is a graph input: name tensors the head computes"):
        cut_by_tensors(h.index, ["x"])


def test_a_shared_file_changed_by_two_processes_at_once_keeps_both_changes(tmp_path):
    """Each write is atomic, but a read-change-write is not: two edge daemons on one plan directory lost
    each other's deploy records (204 of 400 kept). Under ``files.locked`` every change lands."""
    import multiprocessing

    target = tmp_path / "deployed.json"
    ctx = multiprocessing.get_context("spawn")
    both = ctx.Barrier(2)  # both started (and their imports done) before either writes
    procs = [ctx.Process(target=_add_records, args=(target, tag, 100, both)) for tag in "AB"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert len(json.loads(target.read_text())) == 200


def _add_records(target, tag: str, n: int, both) -> None:
    from splitpoint.core.files import atomic_write_text, locked

    both.wait(60)
    for i in range(n):
        with locked(target):
            records = json.loads(target.read_text()) if target.exists() else {}
            records[f"{tag}{i}"] = i
            atomic_write_text(target, json.dumps(records))


def test_a_set_aside_plan_left_behind_is_in_no_later_force_writes_way(tmp_path):
    """The earlier plan a --force write sets aside had one name per process: once one was left behind, every
    later --force write of that process (a server taking pushed plans) failed with 'Directory not empty'."""
    from splitpoint.core.files import writer_tag
    from splitpoint.core.plan import write_dir_atomically

    out = tmp_path / "out"
    left = tmp_path / f".out.old-{writer_tag()}-"
    left.mkdir()
    (left / "plan.json").write_text("{}")

    def write(d):
        (d / "plan.json").write_text('{"n": 1}')

    for _ in range(3):
        write_dir_atomically(out, write, force=True)
    assert (out / "plan.json").read_text() == '{"n": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == [left.name, "out"]  # a live writer's: kept


def test_a_plan_file_that_is_a_directory_is_named_so(small_resnet, tmp_path):
    """A head.onnx that is a directory was reported as missing, and a plan.json that is one as absent."""
    from splitpoint.core.plan import Plan

    plan = tmp_path / "p"
    run_cli("split", str(small_resnet), "--cut", "4", "-o", str(plan), check=True)
    (plan / "head.onnx").unlink()
    (plan / "head.onnx").mkdir()
    with pytest.raises(PlanError, match="file head.onnx is not a file in"):
        Plan.load(plan)
    (plan / "plan.json").rename(plan / "keep.json")
    (plan / "plan.json").mkdir()
    with pytest.raises(PlanError, match="plan.json is not a file"):
        Plan.load(plan)
    (plan / "plan.json").rmdir()
    (plan / "plan.json").symlink_to(plan / "gone.json")
    with pytest.raises(PlanError, match="plan.json is a symbolic link to nothing"):
        Plan.load(plan)
