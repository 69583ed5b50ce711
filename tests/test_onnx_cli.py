"""ONNX through the command line: .pt2 -> .onnx, .onnx -> .onnx, and the bad-input cases."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import compiler
from compiler.driver.onnx_program import example_feeds, rewrite_onnx
from test_cli import _one_line_error, run
from zoo import hf_model

TOL = 1e-4


class Positional(torch.nn.Module):
    """A Hugging Face model called positionally, without a cache (what the exporters want)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def _session(path_or_model):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    data = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory):
    z = hf_model("gpt2", "eager")
    d = tmp_path_factory.mktemp("onnx")
    ep = compiler.capture(z.model, (), example_kwargs=z.kwargs)
    torch.export.save(ep, d / "gpt2.pt2")
    args = (z.kwargs["input_ids"], z.kwargs["attention_mask"])
    files = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for dynamo in (True, False):
            path = d / f"gpt2-{'dynamo' if dynamo else 'legacy'}.onnx"
            torch.onnx.export(Positional(z.model), args, path, dynamo=dynamo,
                              input_names=["input_ids", "attention_mask"], output_names=["hidden"])
            files[dynamo] = path
    return z, d, files


def test_pt2_to_onnx(gpt2_files, tmp_path):
    z, d, _ = gpt2_files
    out, rep = tmp_path / "out.onnx", tmp_path / "r.json"
    r = run("rewrite", str(d / "gpt2.pt2"), "-o", str(out), "--policy", "topk:blocks=1,block=2", "--report", str(rep),
            "--threads", "1")
    assert r.returncode == 0, r.stderr
    onnx.checker.check_model(onnx.load(out), full_check=True)
    report = json.loads(rep.read_text())
    assert [s["lowering"] for s in report["sites"]] == ["block-gather", "block-gather"]
    assert report["lowering"]["max_abs_error_vs_torch"] < TOL
    # The file computes what the torch path's same variant computes.
    cm = compiler.compile(z.model, (), "topk:blocks=1,block=2", example_kwargs=z.kwargs, show_progress=False)
    want = cm(**z.kwargs).last_hidden_state
    sess = _session(out)
    got = sess.run(None, {i.name: z.kwargs[i.name].numpy() for i in sess.get_inputs()})[0]
    assert np.abs(got - want.numpy()).max() < TOL


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_onnx_to_onnx_fused(gpt2_files, tmp_path, dynamo):
    _, _, files = gpt2_files
    out, rep = tmp_path / "out.onnx", tmp_path / "r.json"
    r = run("rewrite", str(files[dynamo]), "-o", str(out), "--policy", "fused", "--report", str(rep))
    assert r.returncode == 0, r.stderr
    report = json.loads(rep.read_text())
    assert report["totals"]["sites_found"] == 2 and report["fidelity"]["passed"] is True
    model = onnx.load(out)
    assert sum(n.op_type == "Attention" for n in model.graph.node) == 2
    feeds = example_feeds(onnx.load(files[dynamo]))
    a = _session(files[dynamo]).run(None, feeds)[0]
    b = _session(out).run(None, feeds)[0]
    assert np.abs(a - b).max() < TOL


@pytest.mark.parametrize("policy", ["window:3,block=2", "heads[0]=fused;heads[*]=blocksparse:block=2,local=1,global=1"])
def test_onnx_variant_matches_torch_path(gpt2_files, policy):
    """The same variant, rewritten in the ONNX file or in the captured program, computes the same."""
    z, _, files = gpt2_files
    result = rewrite_onnx(onnx.load(files[True]), policy)
    assert all(s.lowering == "block-gather" for s in result.report.sites)
    assert all(s.cosine_similarity is not None and s.kept_mass is not None for s in result.report.sites)
    cm = compiler.compile(z.model, (), policy, example_kwargs=z.kwargs, show_progress=False)
    want = cm(**z.kwargs).last_hidden_state
    sess = _session(result.model)
    got = sess.run(None, {i.name: z.kwargs[i.name].numpy() for i in sess.get_inputs()})[0]
    assert np.abs(got - want.numpy()).max() < TOL


def test_corrupt_and_truncated_onnx(gpt2_files, tmp_path):
    _, _, files = gpt2_files
    out = tmp_path / "o.onnx"
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07garbage" * 10)
    _one_line_error(run("rewrite", str(junk), "-o", str(out)), "junk.onnx")
    cut = tmp_path / "cut.onnx"
    data = files[True].read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    _one_line_error(run("rewrite", str(cut), "-o", str(out)), "cut.onnx")
    assert not out.exists()


def test_opset_too_new(tmp_path):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])
    g = onnx.helper.make_graph([onnx.helper.make_node("Softmax", ["x"], ["y"])], "g", [x], [y])
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 27)], ir_version=10)
    path, out = tmp_path / "new.onnx", tmp_path / "o.onnx"
    onnx.save(m, path)
    _one_line_error(run("rewrite", str(path), "-o", str(out)), "opset 27", "opset_version<=26")
    assert not out.exists()


def test_onnx_without_attention(tmp_path):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])
    g = onnx.helper.make_graph([onnx.helper.make_node("Softmax", ["x"], ["y"])], "g", [x], [y])
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 18)], ir_version=10)
    path, out = tmp_path / "cls.onnx", tmp_path / "o.onnx"
    onnx.save(m, path)
    _one_line_error(run("rewrite", str(path), "-o", str(out)), "no attention")
    assert not out.exists()


@torch.library.custom_op("attnforge_test::double_it", mutates_args=())
def _double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_double.register_fake
def _(x):
    return torch.empty_like(x)


def test_op_with_no_translation_writes_nothing(tmp_path):
    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.ops.attnforge_test.double_it(torch.nn.functional.scaled_dot_product_attention(q, k, v))

    q = torch.randn(1, 2, 8, 8)
    ep = torch.export.export(M(), (q, q, q))
    src, out = tmp_path / "m.pt2", tmp_path / "o.onnx"
    torch.export.save(ep, src)
    # The op must be registered in the CLI's process too: run it in this process.
    from compiler.cli import main

    assert main(["rewrite", str(src), "-o", str(out), "-q"]) == 2
    assert not out.exists()
