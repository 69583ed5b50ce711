"""Softmaxes that are not attention are left alone; real attention next to them is still found.

Every case runs on the captured training IR and on core ATen (``ep.run_decompositions()``).
Outputs are compared with the ORIGINAL module's eager output.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compiler
from compare import max_err

ATTN = torch.ops.attnforge.attention.default
SOFTMAX_TARGETS = {"aten.softmax.int", "aten._softmax.default", "aten._safe_softmax.default"}

B, H, S, D = 2, 4, 7, 8
E = H * D
IRS = ["training", "core"]


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _qkv():
    return tuple(torch.randn(B, H, S, D, generator=_g(i)) for i in (1, 2, 3))


def _x():
    return (torch.randn(B, S, E, generator=_g(4)),)


# ----------------------------------------------------------------------------- modules


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(E, 10)

    def forward(self, x):
        return torch.softmax(self.head(x), dim=-1)


class MoERouter(nn.Module):
    """Softmax over gate logits, top-2 experts, weighted sum of the expert outputs."""

    def __init__(self, n_experts: int = 4, top_k: int = 2):
        super().__init__()
        self.gate = nn.Linear(E, n_experts, bias=False)
        self.experts = nn.ModuleList(nn.Linear(E, E) for _ in range(n_experts))
        self.top_k = top_k

    def forward(self, x):
        probs = F.softmax(self.gate(x), dim=-1)  # [B, S, n_experts]
        w, idx = torch.topk(probs, self.top_k, dim=-1)  # [B, S, k]
        w = w / w.sum(-1, keepdim=True)
        outs = torch.stack([e(x) for e in self.experts], dim=-2)  # [B, S, n_experts, E]
        picked = torch.gather(outs, -2, idx[..., None].expand(*idx.shape, E))  # [B, S, k, E]
        return (w[..., None] * picked).sum(-2)


class WeightSoftmax(nn.Module):
    """A learned token-mixing matrix: softmax(self.w) @ x."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(S, S))

    def forward(self, x):
        return torch.softmax(self.w, -1) @ x


class SoftmaxNonLastAxis(nn.Module):
    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) / math.sqrt(D)
        return torch.softmax(s, dim=-2) @ v


class ProbsTimesWeight(nn.Module):
    """softmax(q @ k^T) @ W with W a parameter, not values."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(S, D))

    def forward(self, q, k):
        s = q @ k.transpose(-2, -1) / math.sqrt(D)
        return torch.softmax(s, -1) @ self.w


class ProbsSummed(nn.Module):
    """softmax(q @ k^T) consumed by a reduction (attention received per key), not a matmul."""

    def forward(self, q, k):
        s = q @ k.transpose(-2, -1) / math.sqrt(D)
        return torch.softmax(s, -1).sum(dim=-2)


class AttentionReturningProbs(nn.Module):
    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) / math.sqrt(D)
        p = torch.softmax(s, -1)
        return p @ v, p


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(E, 3 * E)
        self.o = nn.Linear(E, E)

    def forward(self, x):
        b, s_, _ = x.shape
        q, k, v = (t.view(b, s_, H, D).transpose(1, 2) for t in self.qkv(x).split(E, -1))
        p = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D), -1)
        return x + self.o((p @ v).transpose(1, 2).reshape(b, s_, E))


class TwoBlocksAndClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.head = nn.Linear(E, 5)

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return torch.softmax(self.head(x.mean(1)), dim=-1)


# ----------------------------------------------------------------------------- helpers


def _softmaxes(ep) -> int:
    return sum(str(n.target) in SOFTMAX_TARGETS for n in ep.graph.nodes)


def _run(model: nn.Module, inputs: tuple, ir: str):
    torch.manual_seed(0)
    model.eval()
    with torch.no_grad():
        ref = model(*inputs)
    ep = compiler.capture(model, inputs)
    if ir == "core":
        ep = ep.run_decompositions()
    before = _softmaxes(ep)
    cm = compiler.compile_program(ep, inputs, {}, policy="fused", model_name=type(model).__name__)
    with torch.no_grad():
        got = cm(*inputs)
    assert max_err(ref, got) <= 1e-5
    return cm, before


NEGATIVE = [
    pytest.param(Classifier, _x, id="classifier-head"),
    pytest.param(MoERouter, _x, id="moe-router-topk"),
    pytest.param(WeightSoftmax, _x, id="softmax-of-weight-matmul-x"),
    pytest.param(SoftmaxNonLastAxis, _qkv, id="softmax-non-last-axis"),
    pytest.param(ProbsTimesWeight, lambda: _qkv()[:2], id="probs-times-parameter"),
    pytest.param(ProbsSummed, lambda: _qkv()[:2], id="probs-summed"),
]


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("ir", IRS)
@pytest.mark.parametrize("make,inputs", NEGATIVE)
def test_not_attention_is_left_alone(make, inputs, ir):
    torch.manual_seed(0)
    model = make()
    cm, before = _run(model, inputs(), ir)
    assert cm.report.sites == [], [(s.id, s.status) for s in cm.report.sites]
    assert not any(n.target == ATTN for n in cm.exported_program.graph.nodes)
    # the softmax itself is still there, untouched
    assert _softmaxes(cm.exported_program) == before
    # every softmax the program had was looked at and turned down with a reason
    assert len(cm.report.rejected) == before
    assert all(r["reason"] for r in cm.report.rejected)


@pytest.mark.parametrize("ir", IRS)
def test_attention_with_returned_probabilities_is_not_rewritten(ir):
    torch.manual_seed(0)
    cm, before = _run(AttentionReturningProbs(), _qkv(), ir)
    assert not any(s.status == "rewritten" for s in cm.report.sites)
    assert not any(n.target == ATTN for n in cm.exported_program.graph.nodes)
    assert _softmaxes(cm.exported_program) == before == 1
    if not cm.report.sites:
        assert len(cm.report.rejected) == 1


@pytest.mark.parametrize("ir", IRS)
def test_two_attention_blocks_and_a_classifier(ir):
    torch.manual_seed(0)
    model = TwoBlocksAndClassifier()
    cm, before = _run(model, _x(), ir)
    assert before == 3
    sites = cm.report.sites
    assert len(sites) == 2, cm.report.rejected
    assert all(s.status == "rewritten" for s in sites), [(s.id, s.status, s.reason) for s in sites]
    assert all(s.num_heads == H and s.num_kv_heads == H and s.head_dim == D and not s.causal for s in sites)
    assert all(s.scale == pytest.approx(1 / math.sqrt(D)) for s in sites)
    assert sorted(s.module for s in sites) == ["blocks.0", "blocks.1"]
    fused = [n for n in cm.exported_program.graph.nodes if n.target == ATTN]
    assert len(fused) == 2
    # only the classifier softmax is left, and it is reported as not attention
    assert _softmaxes(cm.exported_program) == 1
    assert len(cm.report.rejected) == 1
