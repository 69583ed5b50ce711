"""compile() checks the program a backend actually runs, not only the reference ops it lowered:
the torch backend's FlexAttention sites and the onnxruntime export against the verified program's
outputs on the example inputs, failing in one line when they disagree."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import compiler
from backends import torch_flex
from compiler.ir.errors import VerificationError


class Causal(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


ARGS = tuple(torch.randn(1, 2, 96, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))


@pytest.fixture
def flex_everywhere(monkeypatch):
    monkeypatch.setenv("ATTNFORGE_FLEX", "1")  # FlexAttention even on a small site


def test_torch_backend_reports_and_checks_its_flex_sites(flex_everywhere):
    cm = compiler.compile(Causal(), ARGS, "window:16,sinks:2,block=16", "torch")
    low = cm.report.lowering
    assert low["format"] == "torch" and low["matches_torch"] is True
    assert low["max_abs_error_vs_torch"] <= low["tolerance_vs_torch"]
    assert [s.lowering for s in cm.report.sites] == ["flex"]


def test_a_wrong_flex_lowering_fails_compile(flex_everywhere, monkeypatch):
    right = torch_flex.flex_sparse
    monkeypatch.setattr(torch_flex, "flex_sparse", lambda *a, **kw: right(*a, **kw) * 1.01)
    with pytest.raises(VerificationError, match="torch backend's program disagrees with the verified program"):
        compiler.compile(Causal(), ARGS, "window:16,sinks:2,block=16", "torch")


def test_a_wrong_onnx_lowering_fails_compile(monkeypatch):
    from onnxscript import opset23 as op

    from backends import onnx_export

    right = onnx_export.sparse_translation

    def off_by_one_percent(q, k, v, mask=None, scale=1.0, is_causal=False, softcap=0.0, spec=""):
        return op.Mul(right(q, k, v, mask, scale, is_causal, softcap, spec), op.CastLike(op.Constant(value_float=1.01), q))

    monkeypatch.setattr(onnx_export, "sparse_translation", off_by_one_percent)
    with pytest.raises(VerificationError, match="onnxruntime backend's program disagrees"):
        compiler.compile(Causal(), ARGS, "window:16,sinks:2,block=16", "onnxruntime")


def test_nothing_lowered_nothing_rerun():
    """A fused program on the torch backend runs the verified ops themselves: no lowering section."""
    cm = compiler.compile(Causal(), ARGS, "fused", "torch")
    assert cm.report.lowering is None


def test_a_wrong_exact_onnx_lowering_fails_compile(monkeypatch):
    # An exact rewrite on onnxruntime is checked end to end as onnxruntime runs it; when that
    # differs from the original, the torch program runs to say whose fault it is: here the lowering's.
    from onnxscript import opset23 as op

    from backends import onnx_attention

    right = onnx_attention.lower_attention

    def off_by_one_percent(q, *rest):
        return op.Mul(right(q, *rest), op.CastLike(op.Constant(value_float=1.01), q))

    monkeypatch.setattr(onnx_attention, "lower_attention", off_by_one_percent)
    with pytest.raises(VerificationError, match="onnxruntime backend's program disagrees with the verified program"):
        compiler.compile(Causal(), ARGS, "fused", "onnxruntime")


def test_a_broken_pass_under_onnxruntime_is_left_out(monkeypatch):
    # The onnxruntime program fails its end-to-end check, and so does the torch program it was
    # exported from: compile() starts again checking the torch program first, which leaves the pass out.
    import passes.layout
    from test_soundness import QuantizedProjection, _double_output, _qkv

    monkeypatch.setattr(passes.layout, "layout_cleanup", _double_output)
    m, args = QuantizedProjection(), _qkv()
    cm = compiler.compile(m, args, "fused", "onnxruntime", backend_options={"intra_op_num_threads": 1})
    (cleanup,) = [p for p in cm.report.passes if p.name == "layout_cleanup"]
    assert "left_out" in cleanup.details
    assert [s.status for s in cm.report.sites] == ["rewritten"]
    assert cm.report.lowering["checked_against"] == "the torch program" and cm.report.lowering["matches_torch"]
    with torch.no_grad():
        assert (m(*args) - cm(*args)).abs().max() <= 1e-5


def test_an_exact_onnx_program_is_checked_end_to_end_against_the_original():
    cm = compiler.compile(Causal(), ARGS, "fused", "onnxruntime", backend_options={"intra_op_num_threads": 1})
    low, fid = cm.report.lowering, cm.report.fidelity
    assert low["checked_against"] == "the original" and low["max_abs_error_vs_torch"] is None
    assert fid.passed is True and fid.checked_inputs[0] == "example inputs (onnxruntime program)"
    assert fid.max_abs_error == (Causal()(*ARGS) - cm(*ARGS)).abs().max().item()


def test_attention_maps_on_onnxruntime_come_from_the_torch_program():
    # The maps need each site's inputs, recorded in a run of the torch program; the onnxruntime
    # program is then checked against that program (it crashed with a KeyError before).
    cm = compiler.compile(Causal(), ARGS, "fused", "onnxruntime", attention_maps=True,
                          backend_options={"intra_op_num_threads": 1})
    (site,) = cm.report.sites
    assert site.attention_map is not None and cm.report.lowering["checked_against"] == "the torch program"
    assert cm.report.lowering["matches_torch"] is True
    assert (Causal()(*ARGS) - cm(*ARGS)).abs().max() <= 1e-5
