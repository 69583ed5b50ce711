"""One tiny module per hand-written attention form: found, rewritten to attnforge::attention, exact.

Every case runs on the captured training IR and on core ATen (``ep.run_decompositions()``).
Outputs are compared with the ORIGINAL module's eager output, not with the report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compiler
from compare import max_err

ATTN = torch.ops.attnforge.attention.default

B, H, S, D = 2, 4, 7, 8
E = H * D
HKV = 2
DEFAULT_SCALE = 1.0 / math.sqrt(D)
NEG_INF = float("-inf")


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _qkv(h_kv: int = H):
    q = torch.randn(B, H, S, D, generator=_g(1))
    k = torch.randn(B, h_kv, S, D, generator=_g(2))
    v = torch.randn(B, h_kv, S, D, generator=_g(3))
    return q, k, v


def _x():
    return (torch.randn(B, S, E, generator=_g(4)),)


def _pad_keep():
    """[B, 1, 1, S] bool keep-mask: the second batch row pads its last two keys."""
    keep = torch.ones(B, 1, 1, S, dtype=torch.bool)
    keep[1, ..., S - 2:] = False
    return keep


def _attention_mask():
    """[B, S] 0/1 int64 attention mask (1 = attend), second row padded at the end."""
    am = torch.ones(B, S, dtype=torch.long)
    am[1, S - 2:] = 0
    return am


def _split(x, h=H):
    return x.view(x.shape[0], x.shape[1], h, D).transpose(1, 2)


def _merge(o):
    return o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1)


# ----------------------------------------------------------------------------- modules


class _QKV(nn.Module):
    """Attention over given q, k, v [B, H, S, D]; subclasses define ``scores``/``finish``."""

    def forward(self, q, k, v):
        s = self.scores(q, k)
        p = torch.softmax(s, dim=-1)
        return p @ v


class ScaleDiv(_QKV):
    def scores(self, q, k):
        return (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])


class ScaleMul(_QKV):
    def scores(self, q, k):
        return torch.matmul(q, k.transpose(-1, -2)) * 0.3


class ScaleOnQ(_QKV):
    def scores(self, q, k):
        return (q * 0.3) @ k.transpose(-2, -1)


class ScaleSqrtBoth(_QKV):
    def scores(self, q, k):
        c = q.shape[-1] ** -0.25
        return (q * c) @ (k * c).transpose(-2, -1)


class ScaleFullTensor(_QKV):
    """GPT-2 eager: divide by a 0-d tensor built with torch.full."""

    def scores(self, q, k):
        w = torch.matmul(q, k.transpose(-1, -2))
        return w / torch.full([], k.size(-1) ** 0.5, dtype=w.dtype, device=w.device)


class AdditiveMaskInput(nn.Module):
    def forward(self, q, k, v, bias):
        s = q @ k.transpose(-2, -1) / math.sqrt(D) + bias
        return torch.softmax(s, -1) @ v


class MaskedFillBoolInf(nn.Module):
    def forward(self, q, k, v, keep):
        s = q @ k.transpose(-2, -1) * DEFAULT_SCALE
        s = s.masked_fill(~keep, float("-inf"))
        return torch.softmax(s, -1) @ v


class WhereFinfoMin(nn.Module):
    def forward(self, q, k, v, keep):
        s = q @ k.transpose(-2, -1) * DEFAULT_SCALE
        s = torch.where(keep, s, torch.finfo(s.dtype).min)
        return torch.softmax(s, -1) @ v


class SdpaBoolMask(nn.Module):
    def forward(self, q, k, v, keep):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


class CausalArange(nn.Module):
    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * DEFAULT_SCALE
        sq, sk = s.shape[-2], s.shape[-1]
        i = torch.arange(sq, device=s.device)[:, None]
        j = torch.arange(sk, device=s.device)[None, :]
        s = s.masked_fill(~(i >= j), float("-inf"))
        return torch.softmax(s, -1) @ v


class CausalArangeWhere(nn.Module):
    """Same causal keep-mask as CausalArange, applied as where(keep, s, -inf) (not negated)."""

    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * DEFAULT_SCALE
        i = torch.arange(s.shape[-2], device=s.device)[:, None]
        j = torch.arange(s.shape[-1], device=s.device)[None, :]
        s = torch.where(i >= j, s, float("-inf"))
        return torch.softmax(s, -1) @ v


class CausalTrilOnes(nn.Module):
    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * DEFAULT_SCALE
        m = torch.tril(torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool, device=s.device))
        s = s.masked_fill(~m, float("-inf"))
        return torch.softmax(s, -1) @ v


class CausalTriuAdd(nn.Module):
    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * DEFAULT_SCALE
        m = torch.triu(torch.full((s.shape[-2], s.shape[-1]), float("-inf"), device=s.device), diagonal=1)
        s = s + m
        return torch.softmax(s, -1) @ v


class CausalBufferSlice(nn.Module):
    """GPT-2 (old style): slice a registered tril buffer, masked_fill where it is 0."""

    def __init__(self, fill: str):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16))
        self.fill = fill

    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) / math.sqrt(D)
        sq, sk = s.shape[-2], s.shape[-1]
        causal = self.bias[:, :, sk - sq:sk, :sk]
        fill = torch.finfo(s.dtype).min if self.fill == "finfo" else float("-inf")
        s = s.masked_fill(causal == 0, fill)
        return torch.softmax(s, -1) @ v


class CausalPlusPaddingBool(nn.Module):
    """Causal from aranges AND an int 0/1 attention_mask input, combined into one keep-mask."""

    def forward(self, q, k, v, attention_mask):
        s = q @ k.transpose(-2, -1) * DEFAULT_SCALE
        sq, sk = s.shape[-2], s.shape[-1]
        causal = torch.arange(sq)[:, None] >= torch.arange(sk)[None, :]
        pad = attention_mask[:, None, None, :].bool()
        keep = causal[None, None] & pad
        s = torch.where(keep, s, torch.finfo(s.dtype).min)
        return torch.softmax(s, -1) @ v


class CausalPlusPaddingAdditive(nn.Module):
    """HF-style: additive padding bias from an int mask plus an in-graph causal masked_fill."""

    def forward(self, q, k, v, attention_mask):
        s = q @ k.transpose(-2, -1) * DEFAULT_SCALE
        sq, sk = s.shape[-2], s.shape[-1]
        causal = torch.tril(torch.ones(sq, sk, dtype=torch.bool))
        s = s.masked_fill(~causal, float("-inf"))
        bias = (1.0 - attention_mask[:, None, None, :].to(s.dtype)) * torch.finfo(s.dtype).min
        s = s + bias
        return torch.softmax(s, -1) @ v


class SoftmaxUpcast(nn.Module):
    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * DEFAULT_SCALE
        p = torch.softmax(s.float(), dim=-1).to(q.dtype)
        return p @ v


class SoftmaxDtypeArg(nn.Module):
    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * DEFAULT_SCALE
        p = F.softmax(s, dim=-1, dtype=torch.float32)
        return p @ v


class DropoutProbs(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.drop = nn.Dropout(p)

    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * DEFAULT_SCALE
        return self.drop(torch.softmax(s, -1)) @ v


class FunctionalDropoutZero(nn.Module):
    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * DEFAULT_SCALE
        return F.dropout(torch.softmax(s, -1), p=0.0, training=True) @ v


class RepeatKvExpand(nn.Module):
    """Llama repeat_kv: k[:, :, None].expand(B, Hkv, n_rep, S, D).reshape(B, Hq, S, D)."""

    def forward(self, q, k, v):
        b, hkv, s_, d = k.shape
        n_rep = q.shape[1] // hkv

        def rep(x):
            return x[:, :, None, :, :].expand(b, hkv, n_rep, s_, d).reshape(b, hkv * n_rep, s_, d)

        k, v = rep(k), rep(v)
        s = q @ k.transpose(-2, -1) * DEFAULT_SCALE
        return torch.softmax(s, -1) @ v


class RepeatInterleave(nn.Module):
    def forward(self, q, k, v):
        n_rep = q.shape[1] // k.shape[1]
        k = torch.repeat_interleave(k, n_rep, dim=1)
        v = torch.repeat_interleave(v, n_rep, dim=1)
        s = q @ k.transpose(-2, -1) * DEFAULT_SCALE
        return torch.softmax(s, -1) @ v


class LinearViewTranspose(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(E, E) for _ in range(4))

    def forward(self, x):
        b, s_, _ = x.shape
        q = self.q(x).view(b, s_, H, D).transpose(1, 2)
        k = self.k(x).view(b, s_, H, D).transpose(1, 2)
        v = self.v(x).view(b, s_, H, D).transpose(1, 2)
        sc = q @ k.transpose(-1, -2) / math.sqrt(D)
        o = torch.softmax(sc, -1) @ v
        return self.o(o.transpose(1, 2).reshape(b, s_, E))


class KPermutedAsKT(nn.Module):
    """k is produced directly as k^T [B, H, D, S] by permute(0, 2, 3, 1)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(E, 3 * E)

    def forward(self, x):
        b, s_, _ = x.shape
        q, k, v = self.qkv(x).split(E, dim=-1)
        q = q.view(b, s_, H, D).permute(0, 2, 1, 3)
        kt = k.view(b, s_, H, D).permute(0, 2, 3, 1)
        v = v.view(b, s_, H, D).permute(0, 2, 1, 3)
        sc = torch.matmul(q, kt) * DEFAULT_SCALE
        o = torch.matmul(torch.softmax(sc, -1), v)
        return o.permute(0, 2, 1, 3).reshape(b, s_, E)


class Bmm3D(nn.Module):
    def forward(self, q, k, v):
        b, h, s_, d = q.shape
        q3, k3, v3 = (t.reshape(b * h, s_, d) for t in (q, k, v))
        sc = torch.bmm(q3, k3.transpose(1, 2)) / math.sqrt(d)
        o = torch.bmm(torch.softmax(sc, -1), v3)
        return o.view(b, h, s_, d)


class BaddbmmBias(nn.Module):
    """Bloom-like: baddbmm(bias, q, k^T, beta=1, alpha=1/sqrt(D)) on [B*H, S, D] operands."""

    def forward(self, q, k, v, bias):
        b, h, s_, d = q.shape
        q3 = q.reshape(b * h, s_, d)
        kt = k.reshape(b * h, s_, d).transpose(1, 2)
        v3 = v.reshape(b * h, s_, d)
        sc = torch.baddbmm(bias, q3, kt, beta=1.0, alpha=1.0 / math.sqrt(d))
        o = torch.bmm(torch.softmax(sc, -1), v3)
        return o.view(b, h, s_, d)


class SdpaCausal(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class SdpaGqa(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


class SdpaScale(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, scale=0.3)


class HandSoftmax(nn.Module):
    def forward(self, q, k, v):
        s = q @ k.transpose(-2, -1) * DEFAULT_SCALE
        e = torch.exp(s - s.amax(-1, keepdim=True))
        p = e / e.sum(-1, keepdim=True)
        return p @ v


# ----------------------------------------------------------------------------- cases


@dataclass
class Case:
    name: str
    make: Callable[[], nn.Module]
    inputs: Callable[[], tuple]
    sites: int = 1
    causal: bool = False
    scale: Optional[float] = DEFAULT_SCALE  # None: do not check
    kv_heads: int = H
    mask: Optional[str] = "none"  # "none": mask arg must be None; "present": not None; None: unchecked


def _bias_input():
    bias = torch.zeros(B, 1, 1, S)
    bias[1, ..., S - 2:] = -10000.0
    return bias


CASES = [
    Case("scale-div", ScaleDiv, _qkv),
    Case("scale-mul", ScaleMul, _qkv, scale=0.3),
    Case("scale-on-q", ScaleOnQ, _qkv, scale=0.3),
    Case("scale-sqrt-q-and-k", ScaleSqrtBoth, _qkv),
    Case("scale-full-tensor", ScaleFullTensor, _qkv),
    Case("mask-additive-input", AdditiveMaskInput, lambda: (*_qkv(), _bias_input()), mask="present"),
    Case("mask-masked-fill-bool-inf", MaskedFillBoolInf, lambda: (*_qkv(), _pad_keep()), mask="present"),
    Case("mask-where-finfo-min", WhereFinfoMin, lambda: (*_qkv(), _pad_keep()), mask="present"),
    Case("mask-sdpa-bool", SdpaBoolMask, lambda: (*_qkv(), _pad_keep()), mask="present"),
    Case("causal-arange-masked-fill", CausalArange, _qkv, causal=True),
    Case("causal-arange-where", CausalArangeWhere, _qkv, causal=True),
    Case("causal-tril-ones-masked-fill", CausalTrilOnes, _qkv, causal=True),
    Case("causal-triu-inf-add", CausalTriuAdd, _qkv, causal=True),
    Case("causal-buffer-slice-finfo", lambda: CausalBufferSlice("finfo"), _qkv, causal=True),
    Case("causal-buffer-slice-inf", lambda: CausalBufferSlice("inf"), _qkv, causal=True),
    Case("causal+padding-bool", CausalPlusPaddingBool, lambda: (*_qkv(), _attention_mask()),
         causal=True, mask="present"),
    Case("causal+padding-additive", CausalPlusPaddingAdditive, lambda: (*_qkv(), _attention_mask()),
         causal=True, mask="present"),
    Case("softmax-upcast", SoftmaxUpcast, _qkv),
    Case("softmax-dtype-arg", SoftmaxDtypeArg, _qkv),
    Case("dropout-0.1-eval", lambda: DropoutProbs(0.1), _qkv),
    Case("dropout-module-p0", lambda: DropoutProbs(0.0), _qkv),
    Case("dropout-functional-p0", FunctionalDropoutZero, _qkv),
    Case("gqa-repeat-kv-expand", RepeatKvExpand, lambda: _qkv(HKV), kv_heads=HKV),
    Case("gqa-repeat-interleave", RepeatInterleave, lambda: _qkv(HKV), kv_heads=HKV),
    Case("layout-linear-view-transpose", LinearViewTranspose, _x),
    Case("layout-k-permuted-as-kT", KPermutedAsKT, _x),
    # 3-D [B*H, S, D] forms: the library may see (1, B*H) heads, so head counts are not checked.
    Case("layout-bmm-3d", Bmm3D, _qkv, kv_heads=None),
    Case("layout-baddbmm-bias", BaddbmmBias, lambda: (*_qkv(), torch.randn(B * H, S, S, generator=_g(5))),
         kv_heads=None, mask="present"),
    Case("layout-baddbmm-alibi-broadcast", BaddbmmBias,
         lambda: (*_qkv(), torch.randn(B * H, 1, S, generator=_g(5))), kv_heads=None, mask="present"),
    Case("sdpa-is-causal", SdpaCausal, _qkv, causal=True),
    Case("sdpa-enable-gqa", SdpaGqa, lambda: _qkv(HKV), kv_heads=HKV),
    Case("sdpa-scale", SdpaScale, _qkv, scale=0.3),
    Case("softmax-by-hand", HandSoftmax, _qkv),
]


def _params():
    out = []
    for c in CASES:
        for ir in ("training", "core"):
            out.append(pytest.param(c, ir, id=f"{c.name}-{ir}"))
    return out


def compile_case(model: nn.Module, inputs: tuple, ir: str):
    ep = compiler.capture(model, inputs)
    if ir == "core":
        ep = ep.run_decompositions()
    return compiler.compile_program(ep, inputs, {}, policy="fused", model_name=type(model).__name__)


@pytest.mark.parametrize("case,ir", _params())
def test_variant(case: Case, ir: str):
    torch.manual_seed(0)
    model = case.make().eval()
    inputs = case.inputs()
    with torch.no_grad():
        ref = model(*inputs)
    assert torch.isfinite(ref).all()

    cm = compile_case(model, inputs, ir)
    sites = cm.report.sites
    info = ([(s.id, s.status, getattr(s, "reason", "")) for s in sites], cm.report.rejected)

    # (a) exactly the expected number of rewritten sites, nothing else found
    assert len(sites) == case.sites, info
    assert sum(s.status == "rewritten" for s in sites) == case.sites, info

    # (b) output of the rewritten program against the original module, eagerly
    with torch.no_grad():
        got = cm(*inputs)
    assert max_err(ref, got) <= 1e-5

    # (c) fused nodes in the graph, and the dense softmax is gone
    fused = [n for n in cm.exported_program.graph.nodes if n.target == ATTN]
    assert len(fused) == case.sites
    assert not any("softmax" in str(n.target) for n in cm.exported_program.graph.nodes)

    # (d) structural facts from the fused node and the report
    for n, s in zip(fused, sites):
        q, k, v, mask, scale, is_causal, softcap = n.args
        assert is_causal is case.causal
        assert s.causal is case.causal
        assert softcap == 0.0
        if case.scale is not None:
            assert scale == pytest.approx(case.scale, rel=1e-6)
            assert s.scale == pytest.approx(case.scale, rel=1e-6)
        if case.kv_heads is not None:
            assert k.meta["val"].shape[1] == case.kv_heads
            assert v.meta["val"].shape[1] == case.kv_heads
            assert q.meta["val"].shape[1] == H
            assert s.num_kv_heads == case.kv_heads and s.num_heads == H
        if case.mask == "none":
            assert mask is None
            assert s.mask_kind == "none"
        elif case.mask == "present":
            assert isinstance(mask, torch.fx.Node)
            assert s.mask_kind != "none"


# ----------------------------------------------------------------------------- padding really matters


@pytest.mark.parametrize("ir", ["training", "core"])
@pytest.mark.parametrize("module", [CausalPlusPaddingBool, CausalPlusPaddingAdditive])
def test_causal_padding_mask_is_not_dropped(module, ir):
    """Rewritten causal+padding attention must still honour the padding: an input with a different
    padding pattern must give the module's output, and differ from the unpadded output."""
    torch.manual_seed(0)
    model = module().eval()
    q, k, v = _qkv()
    am = _attention_mask()
    cm = compile_case(model, (q, k, v, am), ir)
    assert [s.status for s in cm.report.sites] == ["rewritten"]
    am2 = torch.ones(B, S, dtype=torch.long)
    am2[0, S - 3:] = 0
    with torch.no_grad():
        for mask in (am, am2, torch.ones(B, S, dtype=torch.long)):
            assert max_err(model(q, k, v, mask), cm(q, k, v, mask)) <= 1e-5
        assert max_err(cm(q, k, v, am2), cm(q, k, v, torch.ones(B, S, dtype=torch.long))) > 1e-3


@pytest.mark.parametrize("ir", ["training", "core"])
def test_additive_bias_input_is_live(ir):
    """The additive bias stays an input of the fused op: new bias values change the output as in eager."""
    torch.manual_seed(0)
    model = AdditiveMaskInput().eval()
    q, k, v = _qkv()
    cm = compile_case(model, (q, k, v, _bias_input()), ir)
    other = torch.randn(B, 1, 1, S, generator=_g(9))
    with torch.no_grad():
        assert max_err(model(q, k, v, other), cm(q, k, v, other)) <= 1e-5
