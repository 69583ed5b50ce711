"""Exact attention on onnxruntime in blocks of query rows (``chunked``), the lowering a long
site gets because ORT's own fused kernels hold the whole [B, H, Sq, Sk] probability matrix."""

from __future__ import annotations

import pytest
import torch

from backends import onnx_attention
from backends.onnx_attention import FusedFeatures, choose_fused
from backends.onnx_export import export_onnx
from test_onnxruntime import MASKS, TOL, OneOp, _inputs, _session

SEQ = 150  # rows of 64 -> blocks of 64, 64 and 22: a short last block too


@pytest.fixture
def small_budget(monkeypatch):
    """A budget that makes a 150-row site (2 batches, 4 heads, fp32) take 64-row blocks."""
    monkeypatch.setattr(onnx_attention, "PROBS_BUDGET", 2 * 4 * 64 * SEQ * 4)


def _run(mod: OneOp, mask, seed: int):
    ep = torch.export.export(mod, _inputs(SEQ, mask))
    ex = export_onnx(ep)
    sess = _session(ex.model)
    x = _inputs(SEQ, mask, seed=seed)  # fresh values, not the example's
    got = torch.from_numpy(sess.run(None, {a.name: t.numpy() for a, t in zip(sess.get_inputs(), x)})[0])
    return ex, got, mod.reference(*x)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("mask", MASKS, ids=lambda m: m or "nomask")
def test_chunked_equals_reference(small_budget, causal, mask):
    ex, got, want = _run(OneOp("fused", 0.3, causal), mask, seed=3)
    assert list(ex.lowerings.values()) == ["chunked"]
    assert not torch.isnan(got).any()
    assert (got - want).abs().max().item() < TOL


def test_chunked_softcap_and_gqa(small_budget):
    ex, got, want = _run(OneOp("fused", 0.25, True, softcap=2.0), "full-bool", seed=4)
    assert list(ex.lowerings.values()) == ["chunked"]
    assert (got - want).abs().max().item() < TOL


def test_chunked_reads_only_the_causal_prefix(small_budget):
    """Block [a, b) of a causal site reads keys [0, b): the blocks' probabilities together are
    the triangle plus the diagonal blocks, not three squares."""
    ex, _, _ = _run(OneOp("fused", 0.3, True), None, seed=0)
    import onnx

    attn = [n for n in ex.model.graph.node if n.op_type == "Attention"]
    assert len(attn) == 3
    inferred = onnx.shape_inference.infer_shapes(ex.model)
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in inferred.graph.value_info}
    key_lengths = [shapes[n.input[1]][2] for n in attn]
    assert key_lengths == [64, 128, 150]


def test_only_sites_over_the_budget_are_chunked():
    base = dict(causal=True, mask="none", softcap=False, grouped=True, square=True, dtype="float32", head_dim=64)
    big = FusedFeatures(**base, probs_bytes=onnx_attention.PROBS_BUDGET + 1)
    small = FusedFeatures(**base, probs_bytes=onnx_attention.PROBS_BUDGET)
    dynamic = FusedFeatures(**base, probs_bytes=None)
    assert choose_fused(big, "CPUExecutionProvider") == "chunked"
    assert choose_fused(small, "CPUExecutionProvider") == "gqa"
    assert choose_fused(dynamic, "CPUExecutionProvider") == "gqa"
    # A causal site whose query and key lengths differ cannot be cut into causal prefixes.
    cross = FusedFeatures(**{**base, "square": False}, probs_bytes=onnx_attention.PROBS_BUDGET + 1)
    assert choose_fused(cross, "CPUExecutionProvider") == "attention"


def test_default_budget_chunks_a_16k_site_into_512_rows():
    f = FusedFeatures(causal=True, mask="none", softcap=False, grouped=False, square=True, dtype="float32",
                      head_dim=64, probs_bytes=8 * 16384 * 16384 * 4)
    assert onnx_attention.chunk_rows(f, 16384) == 512
