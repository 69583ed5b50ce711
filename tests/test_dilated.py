"""Dilated windows (compiler/variants/dilated.py), the pattern added through the registry alone: its text form,
the PyTorch reference against a loop oracle (hypothesis), the ONNX and Triton lowerings, and a
whole model compiled with it against the same model under the dense keep mask."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import compiler
from compiler.ir.errors import PolicyError
from compiler.variants.language import parse_variant
from oracles import oracle
from test_sparse import SETTINGS, TOL, make_problem

SPARSE = torch.ops.attnforge.sparse_attention.default


def dilated_keep_loops(sq, sk, left, right, dilation, sinks, causal):
    """The pattern written as loops over every (query, key) pair, from its definition."""
    if right is None:
        right = 0 if causal else left
    keep = torch.zeros(sq, sk, dtype=torch.bool)
    for i in range(sq):
        for j in range(sk):
            kept = (i - left <= j <= i + right and (i - j) % dilation == 0) or j < sinks
            keep[i, j] = kept and (j <= i or not causal)
    return keep


def _text(left, right, dilation, sinks, block):
    return parse_variant(f"dilated:{left},{'' if right is None else f'right={right},'}dilation={dilation},"
                         f"sinks={sinks},block={block}").text


def test_text_form_and_errors():
    v = parse_variant("dilated:8,dilation=2")
    assert v.kind == "sparse" and v.text == "dilated:left=8,right=auto,dilation=2,sinks=0,block=64"
    assert parse_variant(v.text) == v
    with pytest.raises(PolicyError, match="dilation must be positive"):
        parse_variant("dilated:8,dilation=0")
    with pytest.raises(PolicyError, match="dilated"):  # the unknown-variant message lists it
        parse_variant("dilatd:8")


@settings(max_examples=60, **SETTINGS)
@given(sq=st.integers(1, 40), extra_k=st.integers(0, 9), left=st.integers(0, 30),
       right=st.one_of(st.none(), st.integers(0, 12)), dilation=st.integers(1, 6), sinks=st.integers(0, 4),
       block=st.sampled_from([4, 8, 16]), causal=st.booleans(),
       mask_kind=st.sampled_from(["none", "bool", "additive", "pad-bool"]), seed=st.integers(0, 5))
def test_reference_equals_loop_oracle(sq, extra_k, left, right, dilation, sinks, block, causal, mask_kind, seed):
    sk = sq if causal else sq + extra_k
    q, k, v, m = make_problem(seed, 2, 4, 2, sq, sk, 8, 8, mask_kind)
    keep = dilated_keep_loops(sq, sk, left, right, dilation, sinks, causal).expand(2, 4, sq, sk)
    got = SPARSE(q, k, v, m, 0.3, causal, 0.0, _text(left, right, dilation, sinks, block))
    assert torch.isfinite(got).all()
    assert float((got - oracle(q, k, v, keep, m, 0.3)).abs().max()) <= TOL


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("mask", [None, "full-bool"], ids=lambda m: m or "nomask")
def test_onnx_lowering(causal, mask):
    from test_onnxruntime import OneOp, _check_lengths

    spec = parse_variant("dilated:9,dilation=3,sinks=2,block=8").text
    assert _check_lengths(OneOp("sparse", 0.3, causal, spec=spec), mask) == "block-gather"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("text", ["dilated:20,dilation=3,sinks=2,block=16", "dilated:13,right=5,dilation=2,block=16"])
def test_triton_kernel(text, causal):
    pytest.importorskip("triton")
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("Triton kernels need a CUDA GPU or TRITON_INTERPRET=1")
    from backends import triton_ops  # noqa: F401  (registers attnforge_triton::*)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    p = parse_variant(text).pattern
    q, k, v, m = make_problem(3, 1, 2, 1, 37, 37, 32, 32, "additive")
    keep = dilated_keep_loops(37, 37, p.left, p.right, p.dilation, p.sinks, causal).expand(1, 2, 37, 37)
    got = torch.ops.attnforge_triton.sparse_attention.default(*(x.to(device) for x in (q, k, v, m)), 0.25, causal,
                                                             0.0, parse_variant(text).text)
    assert torch.isfinite(got).all()
    assert float((got.cpu() - oracle(q, k, v, keep, m, 0.25)).abs().max()) < 1e-4


class TinyDecoder(torch.nn.Module):
    """Two causal self-attention layers written with SDPA; ``keep`` replaces causality by a dense
    keep mask (the reference)."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(d, 3 * d) for _ in range(2))
        self.out = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(2))

    def forward(self, x, keep=None):
        b, s, d = x.shape
        for qkv, out in zip(self.qkv, self.out):
            q, k, v = qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            if keep is None:
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
            x = x + out(a.transpose(1, 2).reshape(b, s, d))
        return x


def test_whole_model_equals_dense_masked_reference():
    torch.manual_seed(0)
    model = TinyDecoder().eval()
    x = torch.randn(2, 40, 32)
    cm = compiler.compile(model, (x,), policy="dilated:8,dilation=2")
    text = parse_variant("dilated:8,dilation=2").text
    assert [(s.variant, s.status) for s in cm.report.sites] == [(text, "rewritten")] * 2
    assert sum(n.target == SPARSE for n in cm.exported_program.graph.nodes) == 2
    with torch.no_grad():
        ref = model(x, keep=dilated_keep_loops(40, 40, 8, None, 2, 0, True))
        dense = model(x)
    got = cm(x)
    assert float((got - ref).abs().max()) <= 1e-5
    assert float((got - dense).abs().max()) > 1e-2  # the pattern really drops keys
