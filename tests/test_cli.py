"""The attnforge command: rewrite, inspect, and one-line errors on bad input."""

import json
import subprocess
import sys

import pytest
import torch

import compiler
from compiler.report.data import Report
from zoo import hf_model


def run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "compiler.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def gpt2_pt2(tmp_path_factory):
    z = hf_model("gpt2", "eager")
    ep = compiler.capture(z.model, (), example_kwargs=z.kwargs)
    path = tmp_path_factory.mktemp("m") / "gpt2.pt2"
    torch.export.save(ep, path)
    return path, z


def test_rewrite_and_inspect(gpt2_pt2, tmp_path):
    src, z = gpt2_pt2
    out, rep = tmp_path / "fused.pt2", tmp_path / "r.json"
    r = run("rewrite", str(src), "-o", str(out), "--policy", "fused", "--report", str(rep))
    assert r.returncode == 0, r.stderr
    d = json.loads(rep.read_text())
    assert d["totals"]["sites_found"] == 2 and d["totals"]["sites_rewritten"] == 2
    for key in ("model", "passes", "sites", "fidelity", "totals"):
        assert key in d
    assert {"name", "seconds", "nodes_before", "nodes_after"} <= set(d["passes"][0])
    assert {"id", "module", "variant", "causal", "num_heads", "num_kv_heads", "head_dim", "seq_q", "seq_k",
            "flops_before", "flops_after"} <= set(d["sites"][0])
    assert d["fidelity"]["max_abs_error"] <= 1e-5
    # The written program loads (after importing compiler) and matches the model.
    ep = torch.export.load(out)
    assert sum(n.target == torch.ops.attnforge.attention.default for n in ep.graph.nodes) == 2
    with torch.no_grad():
        ref = z.model(**z.kwargs, use_cache=False).last_hidden_state
    got = ep.module()(**z.kwargs, use_cache=False)
    got = got["last_hidden_state"] if isinstance(got, dict) else got[0]
    assert (ref - got).abs().max() <= 1e-5
    r = run("inspect", str(rep))
    assert r.returncode == 0 and "attn.1" in r.stdout and "attention_fusion" in r.stdout
    assert Report.load(rep).totals["sites_rewritten"] == 2


def _one_line_error(r, *needles):
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("attnforge: error:")
    for n in needles:
        assert n in lines[0], lines[0]


def test_not_a_pt2(tmp_path):
    bad = tmp_path / "x.pt2"
    bad.write_text("hello")
    out = tmp_path / "o.pt2"
    _one_line_error(run("rewrite", str(bad), "-o", str(out)), "not a .pt2 archive")
    assert not out.exists()


def test_wrong_suffix(tmp_path):
    bad = tmp_path / "x.txt"
    bad.write_bytes(b"\0")
    _one_line_error(run("rewrite", str(bad), "-o", str(tmp_path / "o.pt2")), "expected a .pt2", ".onnx")
    onnx_in = tmp_path / "x.onnx"
    onnx_in.write_bytes(b"\0")
    _one_line_error(run("rewrite", str(onnx_in), "-o", str(tmp_path / "o.pt2")), "name the output .onnx")


def test_truncated(gpt2_pt2, tmp_path):
    src, _ = gpt2_pt2
    cut = tmp_path / "cut.pt2"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    out = tmp_path / "o.pt2"
    _one_line_error(run("rewrite", str(cut), "-o", str(out)), "cut.pt2")
    assert not out.exists()


def test_no_attention(tmp_path):
    ep = torch.export.export(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Softmax(-1)), (torch.randn(2, 4),))
    src = tmp_path / "mlp.pt2"
    torch.export.save(ep, src)
    out = tmp_path / "o.pt2"
    _one_line_error(run("rewrite", str(src), "-o", str(out)), "no attention")
    assert not out.exists()


def test_unknown_policy(gpt2_pt2, tmp_path):
    src, _ = gpt2_pt2
    out = tmp_path / "o.pt2"
    _one_line_error(run("rewrite", str(src), "-o", str(out), "--policy", "magic"), "'magic'", "fused")
    assert not out.exists()


def test_inspect_bad_report(tmp_path):
    p = tmp_path / "r.json"
    p.write_text("{not json")
    _one_line_error(run("inspect", str(p)), "not a JSON report")
    p.write_text(json.dumps({"schema": "other"}))
    _one_line_error(run("inspect", str(p)), "not an attnforge report")
