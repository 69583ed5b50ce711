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
