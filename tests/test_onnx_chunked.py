"""Exact attention on onnxruntime in blocks of query rows (``chunked``), the lowering a long
site gets because ORT's own fused kernels hold the whole [B, H, Sq, Sk] probability matrix."""

from __future__ import annotations

import pytest
import torch

from backends import onnx_attention
from backends.onnx_attention import FusedFeatures, choose_fused
from backends.onnx_export import export_onnx
from test_onnxruntime import MASKS, TOL, OneOp, _session
from test_onnxruntime import _inputs as _suite_inputs

SEQ = 150  # rows of 64 -> blocks of 64, 64 and 22: a short last block too


def _inputs(seq: int, mask, seed: int = 0, batch: int = 2):
    """The suite's inputs; ``batch=1`` keeps the first sequence (the GroupQueryAttention path)."""
    x = _suite_inputs(seq, mask, seed=seed)
    return x if batch == 2 else tuple(t[:batch] for t in x)


@pytest.fixture
def small_budget(monkeypatch):
    """A budget that makes a 150-row site (2 batches, 4 heads, fp32) take 64-row blocks."""
    monkeypatch.setattr(onnx_attention, "PROBS_BUDGET", 2 * 4 * 64 * SEQ * 4)


@pytest.fixture
def one_sequence_budget(monkeypatch):
    """``small_budget`` for a batch of one."""
    monkeypatch.setattr(onnx_attention, "PROBS_BUDGET", 1 * 4 * 64 * SEQ * 4)


def _run(mod: OneOp, mask, seed: int, batch: int = 2):
    ep = torch.export.export(mod, _inputs(SEQ, mask, batch=batch))
    ex = export_onnx(ep)
    sess = _session(ex.model)
    x = _inputs(SEQ, mask, seed=seed, batch=batch)  # fresh values, not the example's
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


def _nodes(ex, op_type: str) -> list:
    return [n for n in ex.model.graph.node if n.op_type == op_type]


def _shapes(ex) -> dict:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(ex.model)
    return {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in inferred.graph.value_info}


def test_chunked_reads_only_the_causal_prefix(small_budget):
    """Block [a, b) of a causal site reads keys [0, b): the blocks' probabilities together are
    the triangle plus the diagonal blocks, not three squares."""
    ex, _, _ = _run(OneOp("fused", 0.3, True), "full-bool", seed=0)
    attn = _nodes(ex, "Attention")
    assert len(attn) == 3
    shapes = _shapes(ex)
    assert [shapes[n.input[1]][2] for n in attn] == [64, 128, 150]


@pytest.mark.parametrize("softcap", [0.0, 2.0], ids=["plain", "softcap"])
def test_causal_blocks_of_one_sequence_go_through_gqa_with_a_past(one_sequence_budget, softcap):
    """One causal sequence: block [a, b) is GroupQueryAttention on rows [a, b) with keys [0, a) as
    its past (the block before's present cache), so the graph holds no causal mask at all; equal
    to the reference on fresh inputs."""
    ex, got, want = _run(OneOp("fused", 0.3, True, softcap=softcap), None, seed=5, batch=1)
    assert list(ex.lowerings.values()) == ["chunked"]
    gqa = _nodes(ex, "GroupQueryAttention")
    assert len(gqa) == 3 and not _nodes(ex, "Attention") and not _nodes(ex, "LessOrEqual")
    shapes = _shapes(ex)
    assert [shapes[n.input[0]][1] for n in gqa] == [64, 64, 22]  # the block's own rows
    assert gqa[0].input[3] == ""  # the first block has no past; each later one the last's present
    assert [n.input[3:5] for n in gqa[1:]] == [p.output[1:3] for p in gqa[:-1]]
    assert not torch.isnan(got).any()
    assert (got - want).abs().max().item() < TOL


@pytest.mark.parametrize("mask", MASKS[1:])
def test_gqa_blocks_take_the_user_mask_as_bias(one_sequence_budget, mask):
    """A causal sequence with a key or full mask (the full one leaves a row with no key: zeros)."""
    ex, got, want = _run(OneOp("fused", 0.3, True), mask, seed=6, batch=1)
    assert len(_nodes(ex, "GroupQueryAttention")) == 3 and not _nodes(ex, "LessOrEqual")
    assert not torch.isnan(got).any()
    assert (got - want).abs().max().item() < TOL


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


def _site(causal: bool, seq: int) -> FusedFeatures:
    return FusedFeatures(causal=causal, mask="none", softcap=False, grouped=False, square=True, dtype="float32",
                         head_dim=64, probs_bytes=8 * seq * seq * 4, batch=1)


@pytest.mark.parametrize("seq", [16384, 32768, 131072])
def test_causal_blocks_hold_equal_areas_within_the_budget(seq):
    """Causal blocks shrink as their key prefix grows, each holding at most the budget (8 heads,
    fp32: rows x keys <= 8 Mi), so the allocator sees one size again and again."""
    bounds = onnx_attention.chunk_bounds(_site(True, seq), seq, seq)
    area = onnx_attention.PROBS_BUDGET // (8 * 4)
    assert bounds[0][0] == 0 and bounds[-1][1] == seq
    assert all(b0 == a1 for (_, b0), (a1, _) in zip(bounds, bounds[1:]))
    rows = [b - a for a, b in bounds]
    assert all(r % 64 == 0 for r in rows[:-1]) and min(rows) >= 1
    assert all(r * b <= area for r, (_, b) in zip(rows, bounds) if r > 64)
    assert rows[:-1] == sorted(rows[:-1], reverse=True)
    # Fixed rows within the budget would take seq / (area // seq) blocks; equal areas take about
    # half as many (fewer saved at 128k, where the 64-row floor binds past the first half).
    assert len(bounds) < 0.66 * seq / (area // seq // 64 * 64)
    fill = sum(r * b for r, (_, b) in zip(rows, bounds)) / (len(bounds) * area)
    assert fill > 0.75


def test_bidirectional_blocks_are_equal():
    bounds = onnx_attention.chunk_bounds(_site(False, 16384), 16384, 16384)
    assert [b - a for a, b in bounds] == [512] * 32


def test_sessions_with_chunked_sites_run_without_ort_memory_pattern():
    from backends.onnxruntime_backend import OrtOptions

    assert OrtOptions().session_options(chunked=True).enable_mem_pattern is False
    assert OrtOptions().session_options(chunked=False).enable_mem_pattern is True
    assert OrtOptions(enable_mem_pattern=True).session_options(chunked=True).enable_mem_pattern is True
