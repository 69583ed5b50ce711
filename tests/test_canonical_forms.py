"""Spellings of the same attention math that the canonicalize pass reduces to one form.

Each module writes dense attention another way (einsum, in-place ops, masks added in another
view, a hand-written softmax, softcapping, per-head scales, learned queries, grouped 5-D views).
Each must be found, rewritten into ``attnforge::attention`` and equal the ORIGINAL module's eager
output; near misses (a max over the wrong axis, a floor division) must stay unmatched.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

import compiler
from compare import max_err

ATTN = torch.ops.attnforge.attention.default
B, H, S, D = 2, 4, 6, 8
SC = 1.0 / math.sqrt(D)
NEG_INF = float("-inf")


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _qkv(hkv=H, b=B):
    return tuple(torch.randn(b, h, S, D, generator=_g(i)) for i, h in enumerate((H, hkv, hkv)))


class QKV(nn.Module):
    """forward(q, k, v[, m]) -> ``fn(self, q, k, v[, m])``."""

    def __init__(self, fn, **state):
        super().__init__()
        self.fn = fn
        for k, v in state.items():
            setattr(self, k, v)

    def forward(self, q, k, v, m=None):
        return self.fn(self, q, k, v) if m is None else self.fn(self, q, k, v, m)


def einsum(s, q, k, v):
    a = torch.einsum("bhqd,bhkd->bhqk", q, k) * SC
    return torch.einsum("bhqk,bhkd->bqhd", a.softmax(-1), v)


def inplace_scale(s, q, k, v):
    a = q @ k.transpose(-1, -2)
    a /= math.sqrt(D)
    a += 0.0
    return a.softmax(-1) @ v


def inplace_mask(s, q, k, v):
    a = q @ k.transpose(-1, -2) * SC
    a.masked_fill_(torch.ones(S, S, dtype=torch.bool).triu(1), NEG_INF)
    return a.softmax(-1) @ v


def max_values_shift(s, q, k, v):
    a = q @ k.transpose(-1, -2) * SC
    e = (a - a.max(-1, keepdim=True).values).exp()
    return (e / e.sum(-1, keepdim=True)) @ v


def log_softmax_exp(s, q, k, v):
    return (q @ k.transpose(-1, -2) * SC).log_softmax(-1).exp() @ v


def times_reciprocal(s, q, k, v):
    e = (q @ k.transpose(-1, -2) * SC).exp()
    return (e * (1 / e.sum(-1, keepdim=True))) @ v


def transposed_product(s, q, k, v):
    p = (q @ k.transpose(-1, -2) * SC).softmax(-1)
    return (v.transpose(-1, -2) @ p.transpose(-1, -2)).transpose(-1, -2)


def mT_repeat_interleave(s, q, k, v):
    k, v = k.repeat_interleave(H // k.shape[1], 1), v.repeat_interleave(H // v.shape[1], 1)
    return torch.matmul(q, k.mT).mul(SC).softmax(-1) @ v


def gqa_5d(s, q, k, v):
    hkv = k.shape[1]
    qg = q.view(B, hkv, H // hkv, S, D)
    a = qg @ k.unsqueeze(2).transpose(-1, -2) * SC
    return (a.softmax(-1) @ v.unsqueeze(2)).reshape(B, H, S, D)


def mqa(s, q, k, v):
    return (q @ k.transpose(-1, -2) * SC).softmax(-1) @ v  # k/v carry one head, broadcast


def per_head_scale(s, q, k, v):
    a = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)
    a = a * s.logit_scale.clamp(max=math.log(100.0)).exp()
    return a.softmax(-1) @ v


def softcap(s, q, k, v, m):
    a = q @ k.transpose(-1, -2) * SC
    a = 2.0 * torch.tanh(a / 2.0) + m
    return a.softmax(-1) @ v


def bool_added(s, q, k, v, m):
    return (q @ k.transpose(-1, -2) * SC + m).softmax(-1) @ v


def scalar_added(s, q, k, v):
    return (q @ k.transpose(-1, -2) * SC + 3.0).softmax(-1) @ v


def mask_in_3d_view(s, q, k, v):
    a = (q @ k.transpose(-1, -2) * SC).view(B * H, S, S)
    a = a + torch.triu(torch.full((S, S), NEG_INF), 1)
    return a.view(B, H, S, S).softmax(-1) @ v


def bias_then_3d_softmax(s, q, k, v, m):
    a = (q @ k.transpose(-1, -2) * SC).view(B, H, S, S) + m
    return a.view(B * H, S, S).softmax(-1).view(B, H, S, S) @ v


def windowed_5d(s, q, k, v, m):
    nw = m.shape[0]
    a = (q @ k.transpose(-1, -2) * SC).view(-1, nw, H, S, S) + m.unsqueeze(1).unsqueeze(0)
    return a.view(-1, H, S, S).softmax(-1) @ v


def causal_iota(s, q, k, v):
    a = q @ k.transpose(-1, -2) * SC
    i = torch.arange(a.shape[-1], device=a.device)
    return a.masked_fill(i[None, :] > i[:, None], NEG_INF).softmax(-1) @ v


class LearnedQuery(nn.Module):
    """Perceiver-style cross-attention: the queries are a parameter expanded over the batch."""

    def __init__(self):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(3, H * D, generator=_g(7)))

    def forward(self, x):
        q = self.latents.view(1, 3, H, D).transpose(1, 2).expand(x.shape[0], -1, -1, -1)
        k = x.view(x.shape[0], S, H, D).transpose(1, 2)
        return (q @ k.transpose(-1, -2) * SC).softmax(-1) @ k


def _x():
    return (torch.randn(B, S, H * D, generator=_g(8)),)


CASES = {
    "einsum": (lambda: QKV(einsum), _qkv),
    "inplace_scale": (lambda: QKV(inplace_scale), _qkv),
    "inplace_mask": (lambda: QKV(inplace_mask), _qkv),
    "max_values_shift": (lambda: QKV(max_values_shift), _qkv),
    "log_softmax_exp": (lambda: QKV(log_softmax_exp), _qkv),
    "times_reciprocal": (lambda: QKV(times_reciprocal), _qkv),
    "transposed_product": (lambda: QKV(transposed_product), _qkv),
    "mT_repeat_interleave": (lambda: QKV(mT_repeat_interleave), lambda: _qkv(2)),
    "gqa_5d": (lambda: QKV(gqa_5d), lambda: _qkv(2)),
    "mqa": (lambda: QKV(mqa), lambda: _qkv(1)),
    "per_head_scale": (lambda: QKV(per_head_scale, logit_scale=nn.Parameter(torch.rand(H, 1, 1, generator=_g(5)) * 3)),
                       _qkv),
    "softcap": (lambda: QKV(softcap), lambda: (*_qkv(), torch.randn(B, 1, S, S, generator=_g(6)))),
    "bool_added": (lambda: QKV(bool_added), lambda: (*_qkv(), torch.rand(B, 1, S, S, generator=_g(6)) > 0.5)),
    "scalar_added": (lambda: QKV(scalar_added), _qkv),
    "mask_in_3d_view": (lambda: QKV(mask_in_3d_view), _qkv),
    "bias_then_3d_softmax": (lambda: QKV(bias_then_3d_softmax),
                             lambda: (*_qkv(), torch.randn(B, 1, S, S, generator=_g(6)))),
    "windowed_5d": (lambda: QKV(windowed_5d),
                    lambda: (*_qkv(b=2 * B), torch.randn(2, S, S, generator=_g(6)))),
    "learned_query": (LearnedQuery, _x),
}
EXPECT = {"inplace_mask": {"causal": True}, "mask_in_3d_view": {"causal": True}, "gqa_5d": {"num_kv_heads": 2},
          "mT_repeat_interleave": {"num_kv_heads": 2}, "mqa": {"num_kv_heads": 1}}


def _compile(model, inputs, **kw):
    cm = compiler.compile(model, inputs, show_progress=False, **kw)
    return cm, [n for n in cm.exported_program.graph.nodes if n.target == ATTN]


@pytest.mark.parametrize("name", list(CASES))
def test_form_is_found_and_exact(name):
    make, inputs = CASES[name]
    model, x = make(), inputs()
    cm, fused = _compile(model, x)
    sites = cm.report.sites
    assert [s.status for s in sites] == ["rewritten"], (cm.report.rejected, [s.reason for s in sites])
    assert len(fused) == 1
    for key, want in EXPECT.get(name, {}).items():
        assert getattr(sites[0], key) == want, key
    if name == "softcap":
        assert fused[0].args[6] == 2.0
    with torch.no_grad():
        assert max_err(model(*x), cm(*x)) <= 1e-5
        # Fresh inputs: the rewrite must hold beyond the example it was verified on.
        fresh = tuple(torch.randn_like(t) if t.is_floating_point() else ~t for t in x)
        assert max_err(model(*fresh), cm(*fresh)) <= 1e-5


def test_causal_iota_under_dynamic_shapes_is_causal():
    model, x = QKV(causal_iota), _qkv()
    dims = {0: Dim.AUTO, 2: Dim.AUTO}
    cm, fused = _compile(model, x, dynamic_shapes={"q": dims, "k": dims, "v": dims})
    (site,) = cm.report.sites
    assert site.status == "rewritten" and site.causal and site.mask_kind == "none"
    with torch.no_grad():
        for b, s in ((2, 6), (3, 9)):
            y = tuple(torch.randn(b, H, s, D, generator=_g(b + s + i)) for i in range(3))
            assert max_err(model(*y), cm(*y)) <= 1e-5


def test_canonicalize_is_a_reported_pass():
    cm, _ = _compile(QKV(einsum), _qkv())
    names = [p.name for p in cm.report.passes]
    assert names.index("canonicalize") < names.index("attention_discovery")
    rec = cm.report.passes[names.index("canonicalize")]
    assert rec.details.get("einsum_to_matmul") == 2


def amax_wrong_axis(s, q, k, v):
    a = q @ k.transpose(-1, -2) * SC
    e = (a - a.amax(-2, keepdim=True)).exp()
    return (e / e.sum(-1, keepdim=True)) @ v


def floor_div_scale(s, q, k, v):
    return torch.div(q @ k.transpose(-1, -2), 3.0, rounding_mode="floor").softmax(-1) @ v


def runtime_per_head_factor(s, q, k, v, m):
    return (q @ k.transpose(-1, -2) * m).softmax(-1) @ v


def tanh_with_mask_inside(s, q, k, v, m):
    a = q @ k.transpose(-1, -2) * SC
    return (2.0 * torch.tanh((a + m) / 2.0)).softmax(-1) @ v


NEAR_MISSES = {
    "amax_wrong_axis": (amax_wrong_axis, _qkv),
    "floor_div_scale": (floor_div_scale, _qkv),
    "runtime_per_head_factor": (runtime_per_head_factor, lambda: (*_qkv(), torch.rand(H, 1, 1) + 0.5)),
    "tanh_with_mask_inside": (tanh_with_mask_inside, lambda: (*_qkv(), torch.randn(B, 1, S, S))),
}


@pytest.mark.parametrize("name", list(NEAR_MISSES))
def test_near_miss_stays_unmatched(name):
    fn, inputs = NEAR_MISSES[name]
    model, x = QKV(fn), inputs()
    cm, fused = _compile(model, x)
    assert not fused and not cm.report.sites
    with torch.no_grad():
        assert max_err(model(*x), cm(*x)) == 0.0
