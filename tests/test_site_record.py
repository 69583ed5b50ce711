"""One site record for both front ends (compiler/driver/site_record.py): the same model through the
PyTorch path and through its ONNX export gives the same record (costs, notes, measured fields) for every site."""

from __future__ import annotations

import onnx
import pytest
import torch

import compiler
from compiler.driver.onnx_program import rewrite_onnx
from test_onnx_site_contract import _Decoder


def test_both_front_ends_record_a_site_alike(tmp_path, one_thread):
    torch.manual_seed(0)
    model = _Decoder().eval()
    args = (torch.randn(1, 8, 16), torch.randn(1, 8, 16))
    path = tmp_path / "dec.onnx"
    torch.onnx.export(model, args, str(path), dynamo=False, input_names=["x", "mem"])
    policy = "window:2,block=2"
    cm = compiler.compile(model, args, policy)
    rw = rewrite_onnx(onnx.load(path), policy, feeds={"x": args[0].numpy(), "mem": args[1].numpy()})
    assert len(cm.report.sites) == len(rw.report.sites) == 4
    for t, o in zip(cm.report.sites, rw.report.sites):
        assert (o.status, o.variant, o.layer) == (t.status, t.variant, t.layer)
        assert (o.flops_before, o.flops_exact, o.flops_after) == (t.flops_before, t.flops_exact, t.flops_after)
        assert o.density == pytest.approx(t.density)
        assert o.over_exact == t.over_exact and o.notes == t.notes
        # Both measure the variant against exact attention on the site's inputs (which each path
        # records its own way, so the numbers are close, not equal).
        assert o.cosine_similarity is not None and t.cosine_similarity is not None
        assert o.kept_mass is not None and t.kept_mass is not None
