"""PyTorch Inductor's attention patterns, rewritten as small modules of our own.

The math follows ``torch/_inductor/fx_passes/fuse_attention.py`` (``_sfdp_pattern_1`` .. ``30``)
and the cases of ``test/inductor/test_fused_attention.py`` (torch 2.13): the same scores,
scales, masks, casts, dropouts and permutes, at tiny sizes. Dropout runs as the model does in
``eval()`` (inactive). Used by ``tests/test_inductor_patterns.py`` and
``tools/bench_discovery_inductor.py`` (which also counts what Inductor fuses).

Each ``Pattern`` says whether attention must be found (``find``) and how many sites.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

B, H, S, D = 2, 2, 8, 16
INV_SCALE = math.sqrt(D)


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=_g(seed)).to(dtype)


def bhsd(dtype=torch.float32):
    """q, k, v as [B, H, S, D]."""
    return tuple(_rand(B, H, S, D, seed=i, dtype=dtype) for i in range(3))


def bshd(dtype=torch.float32):
    """q, k, v as [B, S, H, D] (the patterns permute them)."""
    return tuple(_rand(B, S, H, D, seed=i, dtype=dtype) for i in range(3))


def _perm(*xs):
    return tuple(x.permute(0, 2, 1, 3) for x in xs)


class Fn(nn.Module):
    """``forward(*inputs) = fn(self, *inputs)``; ``self.training`` drives dropout."""

    def __init__(self, fn: Callable, nargs: int):
        super().__init__()
        self.fn = fn
        self.nargs = nargs

    def forward(self, a, b, c, d=None):
        args = (a, b, c, d)[: self.nargs]
        return self.fn(self, *args)


@dataclass
class Pattern:
    name: str
    fn: Callable
    inputs: Callable[[], tuple]
    find: bool = True  # attention must be found and rewritten
    atol: float = 1e-5
    note: str = ""

    def module(self) -> nn.Module:
        return Fn(self.fn, len(self.inputs())).eval()


def _drop(m, x, p=0.4):
    return F.dropout(x, p=p, training=m.training)


# ----------------------------------------------------------------------------- _sfdp_pattern_N


def p1(m, q, k, v):
    return torch.matmul(q, k.transpose(-2, -1)).div(INV_SCALE).softmax(dim=-1).matmul(v)


def p2(m, q, k, v):
    return torch.matmul(q, k.transpose(-2, -1)).mul(1.0 / INV_SCALE).softmax(dim=-1).matmul(v)


def p3(m, q, k, v):
    return _drop(m, torch.matmul(q, k.transpose(-2, -1)).div(3.0).softmax(dim=-1)).matmul(v)


def p4(m, q, k, v):
    return _drop(m, torch.matmul(q, k.transpose(-2, -1)).mul(0.4).softmax(dim=-1), 0.2).matmul(v)


def p5(m, q, k, v, mask):
    return torch.softmax((q @ k.transpose(-2, -1) / INV_SCALE) + mask, dim=-1) @ v


def p5_causal(m, q, k, v):
    mask = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).tril(diagonal=0)
    mask = mask.masked_fill(torch.logical_not(mask), -float("inf"))
    return torch.softmax((q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))) + mask, dim=-1) @ v


def p5_bool_zeros(m, q, k, v):
    mask = torch.zeros(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).bool()
    return torch.softmax((q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))) + mask, dim=-1) @ v


def p6(m, q, k, v, mask):
    w = torch.softmax((q @ k.transpose(-2, -1) / INV_SCALE) + mask, dim=-1)
    return torch.dropout(w, 0.5, m.training) @ v


def _p7_to_10(m, query, key, value, scale_q: bool, dropout: bool):
    q, k, v = _perm(query, key, value)
    if scale_q:
        q = q / math.sqrt(q.size(-1))
        div = q @ k.transpose(-2, -1)
    else:
        div = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    w = torch.softmax(div.to(torch.float32), dim=-1)
    if dropout:
        w = torch.dropout(w, 1e-11, m.training)
    w = w.to(torch.float16)
    return w @ v.to(w.dtype)


def p7(m, q, k, v):
    return _p7_to_10(m, q, k, v, scale_q=False, dropout=True)


def p8(m, q, k, v):
    return _p7_to_10(m, q, k, v, scale_q=False, dropout=False)


def p9(m, q, k, v):
    return _p7_to_10(m, q, k, v, scale_q=True, dropout=True)


def p10(m, q, k, v):
    return _p7_to_10(m, q, k, v, scale_q=True, dropout=False)


def p11(m, query, key, value):
    q, k, v = _perm(query, key, value)
    return torch.matmul(q, k.transpose(-2, -1)).div(INV_SCALE).softmax(dim=-1).matmul(v)


def p12(m, query, key, value):
    q, k, v = _perm(query, key, value)
    return _drop(m, torch.matmul(q, k.transpose(-2, -1)).div(INV_SCALE).softmax(dim=-1)).matmul(v)


def p13(m, q, k, v):
    w = torch.bmm(q, k.transpose(1, 2)).softmax(dim=-1)
    return torch.bmm(_drop(m, w, 0.5), v)


def p14(m, query, key, value, mask):
    q, k, v = _perm(query, key, value)
    return (torch.matmul(q, k.transpose(-2, -1)).div(INV_SCALE) + mask).softmax(dim=-1).matmul(v)


def p14_causal(m, query, key, value):
    mask = torch.ones(query.size(1), key.size(1), dtype=torch.bool, device=query.device).tril(diagonal=0)
    mask = mask.masked_fill(torch.logical_not(mask), -float("inf"))
    q, k, v = _perm(query, key, value)
    return (torch.matmul(q, k.transpose(-2, -1)).div(3.0) + mask).softmax(dim=-1).matmul(v)


def _distilbert(m, query, key, value, mask, scale_q: bool, dropout: bool):
    q, k, v = _perm(query, key, value)
    bs, k_len = q.size(0), k.size(-2)
    if scale_q:
        q = q.div(INV_SCALE)
        scores = q @ k.transpose(-2, -1)
    else:
        scores = (q @ k.transpose(-2, -1)).div(INV_SCALE)
    fill = torch.full((), -float("inf"), dtype=query.dtype, device=query.device)
    masked = (mask == 0).view((bs, 1, 1, k_len)).expand_as(scores)
    w = torch.softmax(scores.masked_fill(masked, fill), dim=-1)
    return (_drop(m, w) if dropout else w) @ v


def p15(m, q, k, v, mask):
    return _distilbert(m, q, k, v, mask, scale_q=False, dropout=False)


def p15_tril_rows(m, query, key, value):
    """The test's form: the padding mask is rows of a ``[bs, k_len]`` lower triangle."""
    bs, k_len = query.size(0), key.size(1)
    mask = torch.ones(bs, k_len, dtype=torch.bool, device=query.device).tril(diagonal=0)
    return _distilbert(m, query, key, value, mask, scale_q=False, dropout=False)


def p16(m, query, key, value, mask):
    q, k, v = _perm(query, key, value)
    w = _drop(m, (torch.matmul(q, k.transpose(-2, -1)).div(INV_SCALE) + mask).softmax(dim=-1))
    return w.to(dtype=query.dtype).matmul(v)


def p16_fp32_mask(m, query, key, value):
    mask = m.fp32_mask  # Inductor draws it with randn in the pattern; a buffer keeps runs comparable
    q, k, v = _perm(query, key, value)
    return _drop(m, (torch.matmul(q, k.transpose(-2, -1)).div(3.0) + mask).softmax(dim=-1)).matmul(v)


def p17(m, q, k, v, mask):
    return _distilbert(m, q, k, v, mask, scale_q=False, dropout=True)


def p18(m, query, key, value, causal_mask):
    query, key, value = _perm(query, key, value)
    w = torch.matmul(query, key.permute(0, 1, 3, 2))
    w = w.div(torch.full([], INV_SCALE, dtype=w.dtype, device=w.device))
    fill = torch.full((), torch.finfo(query.dtype).min, dtype=query.dtype, device=query.device)
    w = torch.where(causal_mask, w, fill)
    return _drop(m, w.softmax(dim=-1), 0.0).matmul(value), key, value


def p19(m, query, key, value, causal_mask):
    w = torch.matmul(query, key.permute(0, 1, 3, 2))
    w = w.div(torch.full([], INV_SCALE, dtype=w.dtype, device=w.device))
    fill = torch.full((), torch.finfo(query.dtype).min, dtype=query.dtype, device=query.device)
    w = torch.where(causal_mask, w, fill)
    w = w + m.attn_mask
    w = w.softmax(dim=-1).type(value.dtype)
    return _drop(m, w).matmul(value)


def p20(m, q, k, v, mask):
    return _distilbert(m, q, k, v, mask, scale_q=True, dropout=True)


def _t5(m, query, key, value, mask, returns_kv: bool, dropout: bool, double_cast: bool = False):
    query, key, value = _perm(query, key, value)
    score = torch.matmul(query, key.permute(0, 1, 3, 2))
    if mask is not None:
        score = (score + mask).type_as(query)
    elif double_cast:
        score = score.float().type_as(query)
    w = score.float().softmax(dim=-1).type_as(query)
    out = (_drop(m, w) if dropout else w).matmul(value)
    return (out, key, value) if returns_kv else out


def p21(m, q, k, v, mask):
    return _t5(m, q, k, v, mask, returns_kv=False, dropout=False)


def p22(m, q, k, v, mask):
    return _t5(m, q, k, v, mask, returns_kv=True, dropout=False)


def p23(m, q, k, v):
    return _t5(m, q, k, v, None, returns_kv=True, dropout=False, double_cast=True)


def p24(m, query, key, value, mask):
    bs, n_head, seq_len, head_size = query.shape
    q = query.view(bs * n_head, -1, head_size)
    k = key.reshape(bs * n_head, -1, head_size)
    v = value.reshape(bs * n_head, -1, head_size)
    w = torch.bmm(q, k.transpose(1, 2))
    w = w.view(bs, n_head, seq_len, -1) + mask
    w = F.softmax(w.view(bs * n_head, seq_len, -1), dim=-1)
    return torch.bmm(w, v).view(bs, n_head, seq_len, head_size)


def p25(m, q, k, v, mask):
    return _t5(m, q, k, v, mask, returns_kv=False, dropout=True)


def p26(m, q, k, v, mask):
    return _t5(m, q, k, v, mask, returns_kv=True, dropout=True)


def p27(m, q, k, v):
    return _t5(m, q, k, v, None, returns_kv=True, dropout=True)


def p28(m, query, key, value):
    """Visformer: pattern 4 on non-contiguous q/k/v."""
    return p4(m, *(x.transpose(1, 2) for x in (query, key, value)))


def _p29_30(query, key, value, mask):
    q, k, v = _perm(query, key, value)
    s = 1.0 / math.sqrt(math.sqrt(q.size(-1)))
    q = torch.ops.aten.mul.Scalar(q, s)
    k = torch.ops.aten.mul.Scalar(k.transpose(-2, -1), s)
    w = q @ k
    if mask is not None:
        w = w + mask
    return torch.ops.aten._safe_softmax(w, -1) @ v


def p29(m, q, k, v, mask):
    return _p29_30(q, k, v, mask)


def p30(m, q, k, v):
    return _p29_30(q, k, v, None)


# ----------------------------------------------------------------------------- negative cases


def n_reuse(m, q, k, v):
    w = torch.matmul(q, k.transpose(-2, -1)).div(INV_SCALE).softmax(dim=-1)
    return w.matmul(v), w


def n_tensor_factor_div(m, q, k, v, factor):
    return torch.matmul(q, k.transpose(-2, -1)).div(factor.detach()).softmax(dim=-1).matmul(v)


def n_tensor_factor_mul(m, q, k, v, factor):
    return torch.matmul(q, k.transpose(-2, -1)).mul(factor.detach()).softmax(dim=-1).matmul(v)


def n_int_mask(m, q, k, v, mask):
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)) + mask, dim=-1) @ v


def n_scalar_mask(m, q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)) + 2.0, dim=-1) @ v


def _pad_mask():
    keep = torch.ones(B, S, dtype=torch.long)
    keep[1, S - 3:] = 0
    return keep


def _additive(shape=(B, 1, S, S)):
    return torch.randn(*shape, generator=_g(9))


def _causal_bool():
    return torch.ones(S, S, dtype=torch.bool).tril()


def _buffers(p: "Pattern") -> dict:
    if p.fn is p19:
        return {"attn_mask": _additive((B, 1, 1, S))}
    if p.fn is p16_fp32_mask:
        return {"fp32_mask": torch.randn(S, S, generator=_g(11)).tril(diagonal=0)}
    return {}


PATTERNS: list[Pattern] = [
    Pattern("p1_div", p1, bhsd),
    Pattern("p2_mul", p2, bhsd),
    Pattern("p3_dropout_div", p3, bhsd),
    Pattern("p4_dropout_mul", p4, bhsd),
    Pattern("p5_additive_mask", p5, lambda: (*bhsd(), _additive())),
    Pattern("p5_causal_from_tril", p5_causal, bhsd),
    Pattern("p5_bool_zeros_added", p5_bool_zeros, bhsd),
    Pattern("p6_mask_dropout", p6, lambda: (*bhsd(), _additive())),
    Pattern("p7_fp16_dropout", p7, lambda: bshd(torch.float16), atol=2e-3),
    Pattern("p8_fp16", p8, lambda: bshd(torch.float16), atol=2e-3),
    Pattern("p9_fp16_scaled_q_dropout", p9, lambda: bshd(torch.float16), atol=2e-3),
    Pattern("p10_fp16_scaled_q", p10, lambda: bshd(torch.float16), atol=2e-3),
    Pattern("p11_permuted", p11, bshd),
    Pattern("p12_permuted_dropout", p12, bshd),
    Pattern("p13_bmm", p13, lambda: tuple(_rand(4, S, D, seed=i) for i in range(3))),
    Pattern("p14_bert_mask", p14, lambda: (*bshd(), _additive())),
    Pattern("p14_causal_from_tril", p14_causal, bshd),
    Pattern("p15_distilbert", p15, lambda: (*bshd(), _pad_mask())),
    Pattern("p15_tril_rows", p15_tril_rows, bshd),
    Pattern("p16_bert_dropout", p16, lambda: (*bshd(), _additive())),
    Pattern("p16_fp32_mask", p16_fp32_mask, bshd),
    Pattern("p17_distilbert_dropout", p17, lambda: (*bshd(), _pad_mask())),
    Pattern("p18_gpt2_returns_kv", p18, lambda: (*bshd(), _causal_bool())),
    Pattern("p19_gpt2_where_plus_mask", p19, lambda: (*bhsd(), _causal_bool())),
    Pattern("p20_distilbert_scaled_q", p20, lambda: (*bshd(), _pad_mask())),
    Pattern("p21_t5", p21, lambda: (*bshd(), _additive())),
    Pattern("p22_t5_returns_kv", p22, lambda: (*bshd(), _additive())),
    Pattern("p23_t5_no_mask", p23, bshd),
    Pattern("p24_mbart_bmm", p24, lambda: (*bhsd(), _additive())),
    Pattern("p25_t5_dropout", p25, lambda: (*bshd(), _additive())),
    Pattern("p26_t5_dropout_returns_kv", p26, lambda: (*bshd(), _additive())),
    Pattern("p27_t5_no_mask_dropout", p27, bshd),
    Pattern("p28_visformer", p28, bshd),
    Pattern("p29_split_scale_safe_softmax", p29, lambda: (*bshd(), _additive())),
    Pattern("p30_split_scale_safe_softmax", p30, bshd),
]

NEGATIVE: list[Pattern] = [
    Pattern("neg_probabilities_returned", n_reuse, bhsd, find=False),
    Pattern("neg_input_tensor_factor_div", n_tensor_factor_div, lambda: (*bhsd(), torch.rand(H, 1, 1) + 0.5),
            find=False),
    Pattern("neg_input_tensor_factor_mul", n_tensor_factor_mul, lambda: (*bhsd(), torch.rand(H, 1, 1) + 0.5),
            find=False),
]

# Inductor's "unsupported mask" cases: exact attention its patterns cannot express. attnforge
# finds them (an int tensor is an additive bias; a scalar added to every score changes nothing).
BEYOND: list[Pattern] = [
    Pattern("inductor_refuses_int_mask", n_int_mask,
            lambda: (*bhsd(), torch.randn(B, H, S, S, generator=_g(12)).to(torch.int))),
    Pattern("inductor_refuses_scalar_mask", n_scalar_mask, bhsd),
]


def module_for(p: Pattern) -> nn.Module:
    mod = p.module()
    for name, t in _buffers(p).items():
        mod.register_buffer(name, t)
    return mod


def fresh_inputs(p: Pattern, seed: int = 100) -> tuple:
    """Other values of the same kind: new q/k/v, another padding, another bias or causal mask."""
    out = []
    for i, x in enumerate(p.inputs()):
        g = _g(seed + i)
        if x.dtype == torch.bool:
            out.append(torch.rand(x.shape, generator=g) > 0.3)
        elif x.is_floating_point():
            out.append(torch.randn(x.shape, generator=g).to(x.dtype))
        else:
            out.append(torch.randint(0, 2, x.shape, generator=g).to(x.dtype))
    return tuple(out)
