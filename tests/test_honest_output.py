"""What a user reads: ONNX names, the HTML report, the plan command, the lowering verdict."""

import onnx
import pytest
import torch

import compiler
from compiler import cli
from compiler.report.data import Report
from compiler.report.html_parts import wrap
from compiler.report.html import render_html
from compiler.report.terminal import lowering_verdict, render_text


@pytest.fixture(scope="module")
def lm():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0,
                        eos_token_id=0, attn_implementation="eager")
    return tf.GPT2LMHeadModel(cfg).eval(), torch.randint(0, 100, (1, 8))


def test_onnx_keeps_the_models_names(lm, tmp_path, one_thread):
    model, ids = lm
    cm = compiler.compile(model, (ids,), backend="onnxruntime", show_progress=False)
    cm.save(tmp_path / "lm.onnx")
    m = onnx.load(tmp_path / "lm.onnx")
    assert [i.name for i in m.graph.input] == ["input_ids"]
    assert [o.name for o in m.graph.output] == ["logits"]
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    assert (cm(ids)["logits"] - ref).abs().max() <= 1e-4
    text = render_text(cm.report)
    assert "checked end to end against the original" in text and "tolerance" in text


def test_lowering_verdict():
    assert "agrees" in lowering_verdict({"tolerance_vs_torch": 1e-5, "matches_torch": True})
    assert "OVER" in lowering_verdict({"tolerance_vs_torch": 1e-5, "matches_torch": False})
    assert lowering_verdict({"max_abs_error_vs_torch": 1e-6}) == ""


def test_html_title_plan_and_unbroken_code(tmp_path, capsys, one_thread):
    from test_dynamic_shapes import TinyAttention

    x = torch.randn(2, 7, 16)
    torch.export.save(torch.export.export(TinyAttention().eval(), (x,)), tmp_path / "m-1.pt2")
    assert cli.main(["rewrite", str(tmp_path / "m-1.pt2"), "-o", str(tmp_path / "o.pt2"), "--report",
                     str(tmp_path / "r.json"), "-q"]) == 0
    r = Report.load(tmp_path / "r.json")
    assert r.model == "TinyAttention (m-1.pt2)"
    page = render_html(r)
    assert "<title>attnforge report: TinyAttention (m-1.pt2)</title>" in page
    assert 'id="plan"' in page and "peak live bytes" in page
    # Code breaks after dots and commas only, never at a hyphen.
    assert wrap("layers.0-3,x") == "<span class=nb>layers.</span><wbr><span class=nb>0-3,</span><wbr><span class=nb>x</span>"
    assert ".nb{white-space:nowrap}" in page


def test_plan_states_its_backend(tmp_path, capsys):
    from test_dynamic_shapes import TinyAttention

    # An unbounded dynamic length (Dim("s")) used to crash the typed lowering.
    ep = torch.export.export(TinyAttention().eval(), (torch.randn(2, 7, 16),),
                             dynamic_shapes=({1: torch.export.Dim("s")},))
    torch.export.save(ep, tmp_path / "m.pt2")
    assert cli.main(["plan", str(tmp_path / "m.pt2"), "--backend", "torch", "--json", str(tmp_path / "p.json")]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "for the torch backend" in first and "without running" in first
    assert '"s' in (tmp_path / "p.json").read_text() and "null" in (tmp_path / "p.json").read_text()


def test_demo_attention_maps_are_written(tmp_path, capsys, monkeypatch, one_thread):
    """demo --attention-maps writes the HTML page and says where (a tiny BERT stands in for MiniLM)."""
    import compiler.minilm
    from zoo import hf_model

    z = hf_model("bert", "eager")

    class Tiny:
        model = z.model

        def encode_inputs(self, sentences, max_length=128):
            return dict(z.kwargs)

    monkeypatch.setattr(compiler.minilm, "load_minilm", lambda *a: Tiny())
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", "--attention-maps"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {cli.DEMO_HTML} (with the attention maps)" in out
    assert "head 0" in (tmp_path / cli.DEMO_HTML).read_text() or "<img" in (tmp_path / cli.DEMO_HTML).read_text()
