"""Ordinary mistakes on the command line: one line on stderr, exit 2, nothing written, inputs untouched.

The CLI runs in-process (``compiler.cli.main(argv)``) on one tiny program per module, so the
whole table costs about what one compile does.
"""

import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from compiler import cli
from compiler.report.data import SCHEMA, Report
from test_dynamic_shapes import TinyAttention


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A read-only world: a tiny .pt2 (x: float32 2x7x16), an ONNX model, a report, a folder, a file."""
    root = tmp_path_factory.mktemp("cli")
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(0))
    torch.export.save(torch.export.export(TinyAttention().eval(), (x,)), root / "m.pt2")
    w = numpy_helper.from_array(np.ones((16, 16), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 7, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 7, 16])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, root / "m.onnx")
    onnx.save_model(model, root / "ext.onnx", save_as_external_data=True, size_threshold=0, location="ext.data")
    (root / "ext.data").unlink()
    Report(model="m", policy="fused", backend="torch").save(root / "r.json")
    (root / "folder.pt2").mkdir()
    (root / "file.txt").write_text("a file, not a folder")
    with zipfile.ZipFile(root / "m.pt2") as z, zipfile.ZipFile(root / "garbled.pt2", "w") as out:
        for info in z.infolist():  # a valid zip whose JSON members are no longer text
            data = z.read(info)
            out.writestr(info, b"\xff\xfe" + data[2:] if info.filename.endswith(".json") else data)
    return root


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(capsys, argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(capsys, root, argv, *needles, code=2):
    before = _snapshot(root)
    got, out, err = run_cli(capsys, argv)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert got == code, (got, err)
    assert len(lines) == 1 and lines[0].startswith("attnforge: error:"), err
    assert "Traceback" not in err and "internal error" not in err
    for n in needles:
        assert n in lines[0], lines[0]
    assert _snapshot(root) == before, "a file was created or changed"
    return lines[0]


RW = ["rewrite", "{d}/m.pt2"]
# (id, argv with {d} for the fixture folder, words the one line must contain)
CASES = [
    ("output folder missing", RW + ["-o", "{d}/nope/out.pt2"], "nope", "does not exist"),
    ("output is a folder", RW + ["-o", "{d}/folder.pt2"], "is a folder"),
    ("output under a file", RW + ["-o", "{d}/file.txt/out.pt2"], "file.txt is a file, not a folder"),
    ("output under /proc", RW + ["-o", "/proc/out.pt2"], "cannot write in /proc"),
    ("report under /proc", RW + ["-o", "{d}/out.pt2", "--report", "/proc/r.json"], "--report", "/proc"),
    ("report folder missing", RW + ["-o", "{d}/out.pt2", "--report", "{d}/no/r.json"], "--report", "does not exist"),
    ("output is the input", RW + ["-o", "{d}/m.pt2"], "-o", "refusing to write over an input"),
    ("report is the input", RW + ["-o", "{d}/out.pt2", "--report", "{d}/m.pt2"], "--report",
     "refusing to write over an input"),
    ("report is the output", RW + ["-o", "{d}/out.pt2", "--report", "{d}/out.pt2"], "name the same file"),
    ("report is the plan", RW + ["-o", "{d}/out.pt2", "--report", "{d}/out.pt2.plan.json"], "name the same file"),
    ("threads negative", RW + ["-o", "{d}/out.pt2", "--threads", "-1"], "--threads", "negative", "see attnforge"),
    ("missing -o", RW, "-o", "see attnforge rewrite --help"),
    ("unknown command", ["frobnicate"], "frobnicate", "see attnforge --help"),
    ("input missing", ["rewrite", "{d}/none.pt2", "-o", "{d}/out.pt2"], "no such file"),
    ("input is a folder", ["rewrite", "{d}/folder.pt2", "-o", "{d}/out.pt2"], "is a folder"),
    ("shape rank", RW + ["-o", "{d}/out.pt2", "--example-shape", "2x7"], "expects x as float32 2x7x16", "2x7 "),
    ("shape size", RW + ["-o", "{d}/out.pt2", "--example-shape", "2x8x16"], "x", "dim 1 is fixed at 7"),
    ("shape dtype", RW + ["-o", "{d}/out.pt2", "--example-shape", "2x7x16:int64"], "float32 2x7x16", "int64"),
    ("shape unknown name", RW + ["-o", "{d}/out.pt2", "--example-shape", "y=2x7x16"], "'y'", "inputs are x"),
    ("shape zero", RW + ["-o", "{d}/out.pt2", "--example-shape", "2x0"], "at least 1"),
    ("shape absurd", RW + ["-o", "{d}/out.pt2", "--example-shape", "100000x100000x100000"], "elements"),
    ("shape dtype unknown", RW + ["-o", "{d}/out.pt2", "--example-shape", "2x7x16:float33"], "float33"),
    ("shape text", RW + ["-o", "{d}/out.pt2", "--example-shape", "two"], "expected dims"),
    ("policy newline", RW + ["-o", "{d}/out.pt2", "--policy", "window:8\n4"], "one line"),
    ("policy overflow", RW + ["-o", "{d}/out.pt2", "--policy", "blocksparse=99999999999999999999"], "too large"),
    ("policy unknown", RW + ["-o", "{d}/out.pt2", "--policy", "nosuch"], "unknown attention variant"),
    ("pt2 garbled inside a valid zip", ["rewrite", "{d}/garbled.pt2", "-o", "{d}/out.pt2"], "garbled.pt2",
     "torch.export.load cannot read it"),
    ("onnx external data missing", ["rewrite", "{d}/ext.onnx", "-o", "{d}/out.onnx"], "ext.data"),
    ("onnx shape unknown name", ["rewrite", "{d}/m.onnx", "-o", "{d}/out.onnx", "--example-shape", "ids=2x7:int64"],
     "'ids'", "inputs are x"),
    ("onnx shape rank", ["rewrite", "{d}/m.onnx", "-o", "{d}/out.onnx", "--example-shape", "x=2x7"], "2x7x16"),
    ("onnx output is input", ["rewrite", "{d}/m.onnx", "-o", "{d}/m.onnx"], "refusing to write over an input"),
    ("plan json under /proc", ["plan", "{d}/m.pt2", "--json", "/proc/p.json"], "--json", "/proc"),
    ("plan json is the input", ["plan", "{d}/m.pt2", "--json", "{d}/m.pt2"], "refusing to write over an input"),
    ("plan garbled", ["plan", "{d}/garbled.pt2"], "cannot read it"),
    ("inspect html is the report", ["inspect", "{d}/r.json", "--html", "{d}/r.json"], "refusing to write"),
    ("inspect html folder missing", ["inspect", "{d}/r.json", "--html", "{d}/no/r.html"], "does not exist"),
    ("inspect not a report", ["inspect", "{d}/m.pt2"], "not a JSON report"),
    ("demo unknown policy", ["demo", "--policy", "nosuch"], "unknown attention variant"),
    ("demo report under /proc", ["demo", "--report", "/proc/r.json"], "/proc"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_one_clear_line(files, capsys, case):
    _, argv, *needles = case
    one_line_error(capsys, files, [a.replace("{d}", str(files)) for a in argv], *needles)


def _report_dict(files):
    return json.loads((files / "r.json").read_text())


BAD_REPORTS = [
    ("missing model", lambda d: d.pop("model"), "lacks the field 'model'"),
    ("null model", lambda d: d.update(model=None), "report.model should be a string"),
    ("string seconds", lambda d: d.update(compile_seconds="fast"), "compile_seconds should be a number"),
    ("null passes", lambda d: d.update(passes=None), "passes should be a list"),
    ("wrong list elements", lambda d: d.update(passes=[1]), "passes[0] should be an object"),
    ("wrong element field", lambda d: d.update(sites=[{"id": 3}]), "sites[0]"),
    ("null fidelity field", lambda d: d["fidelity"].update(checked_inputs=None), "fidelity.checked_inputs"),
    ("wrong schema", lambda d: d.update(schema="other/9"), "not an attnforge report"),
    ("null in a string list", lambda d: d["fidelity"].update(checked_inputs=[None]), "fidelity.checked_inputs"),
    ("damaged plan section", lambda d: d.update(plan={"segments": 1}), "malformed attnforge report"),
]


@pytest.mark.parametrize("case", BAD_REPORTS, ids=[c[0] for c in BAD_REPORTS])
def test_malformed_report(files, capsys, tmp_path, case):
    _, edit, needle = case
    d = _report_dict(files)
    edit(d)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    one_line_error(capsys, tmp_path, ["inspect", path, "--html", tmp_path / "r.html"], needle)


def test_demo_refuses_before_loading_the_model(capsys, monkeypatch):
    import compiler.minilm

    monkeypatch.setattr(compiler.minilm, "load_minilm", lambda *a: pytest.fail("loaded the model first"))
    assert run_cli(capsys, ["demo", "--policy", "nosuch"])[0] == 2


def test_rewrite_writes_all_or_nothing(files, capsys, tmp_path, monkeypatch):
    src = tmp_path / "m.pt2"
    shutil.copy(files / "m.pt2", src)
    out, rep = tmp_path / "out.pt2", tmp_path / "r.json"
    code, stdout, err = run_cli(capsys, ["rewrite", src, "-o", out, "--report", rep, "-q"])
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt2", "out.pt2", "out.pt2.plan.json", "r.json"]
    assert Report.load(rep).totals["sites_rewritten"] == 1
    for p in (out, rep, out.with_name("out.pt2.plan.json")):
        p.unlink()

    def full_disk(self, *a, **k):
        raise OSError(28, "No space left on device", str(rep))

    monkeypatch.setattr(Path, "write_text", full_disk)
    line = one_line_error(capsys, tmp_path, ["rewrite", src, "-o", out, "--report", rep, "-q"], "No space left")
    assert str(rep) in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt2"]


def test_example_shape_by_name_reaches_a_positional_input(files, capsys, tmp_path):
    out = tmp_path / "out.pt2"
    code, _, err = run_cli(capsys, ["rewrite", files / "m.pt2", "-o", out, "--example-shape", "x=2x7x16", "-q"])
    assert code == 0, err
    assert out.is_file()


# ---------------------------------------------------------------- generated damage

@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_pt2_bytes(files, capsys, tmp_path_factory, data):
    """Bytes flipped inside a member of a valid zip (headers, JSON, weights): one line or a clean run."""
    tmp = tmp_path_factory.mktemp("pt2")
    with zipfile.ZipFile(files / "m.pt2") as z:
        infos = z.infolist()
        victim = data.draw(st.sampled_from([i.filename for i in infos]))
        with zipfile.ZipFile(tmp / "bad.pt2", "w") as out:
            for info in infos:
                raw = bytearray(z.read(info))
                if info.filename == victim and raw:
                    for _ in range(data.draw(st.integers(1, 8))):
                        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
                out.writestr(info, bytes(raw))
    before = _snapshot(tmp)
    code, _, err = run_cli(capsys, ["plan", tmp / "bad.pt2", "--backend", "torch"])
    assert code in (0, 2), err
    assert "Traceback" not in err and "internal error" not in err
    if code == 2:
        assert len(err.strip().splitlines()) == 1
    assert _snapshot(tmp) == before


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_onnx_bytes(files, capsys, tmp_path_factory, data):
    tmp = tmp_path_factory.mktemp("onnx")
    raw = bytearray((files / "m.onnx").read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    (tmp / "bad.onnx").write_bytes(bytes(raw))
    before = _snapshot(tmp)
    code, _, err = run_cli(capsys, ["rewrite", tmp / "bad.onnx", "-o", tmp / "out.onnx", "-q"])
    assert code == 2, err  # the tiny model has no attention, so even an intact read ends in one line
    assert len(err.strip().splitlines()) == 1 and "internal error" not in err and "Traceback" not in err, err
    assert _snapshot(tmp) == before


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                     max_leaves=8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_malformed_report_json(files, capsys, tmp_path_factory, data):
    """A valid report with one field (top level, a pass, a site or the fidelity) replaced by any JSON."""
    tmp = tmp_path_factory.mktemp("rep")
    d = _report_dict(files)
    d["passes"] = [{"name": "p", "seconds": 0.1, "nodes_before": 3, "nodes_after": 2}]
    where = data.draw(st.sampled_from(["top", "pass", "fidelity"]))
    target = {"top": d, "pass": d["passes"][0], "fidelity": d["fidelity"]}[where]
    key = data.draw(st.sampled_from(sorted(target)) | st.text(max_size=6))
    target[key] = data.draw(_json)
    (tmp / "bad.json").write_text(json.dumps(d))
    before = _snapshot(tmp)
    code, _, err = run_cli(capsys, ["inspect", tmp / "bad.json"])
    assert code in (0, 2), err
    assert "internal error" not in err and "Traceback" not in err, err
    if code == 2:
        assert len(err.strip().splitlines()) == 1
    assert _snapshot(tmp) == before
