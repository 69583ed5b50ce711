"""Sparse and linear attention ops against independent references (plain loops and math)."""

import itertools
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import compiler  # noqa: F401
from compiler.reference.linear_ops import linear_attention_reference
from compiler.ir.ops import attention_reference
from compiler.reference.sparse_ops import sparse_attention_reference, sparse_computed_pairs, sparse_keep_mask
from compiler.variants.language import parse_variant
from oracles import oracle

sparse = torch.ops.attnforge.sparse_attention.default
linear = torch.ops.attnforge.linear_attention.default


def spec(text):
    return parse_variant(text).text


def window_keep(sq, sk, left, right, sinks):
    return torch.tensor([[(i - left <= j <= i + right) or j < sinks for j in range(sk)] for i in range(sq)])


def blocksparse_keep(sq, sk, b, local, glob, stride):
    def keep(i, j):
        qb, kb = i // b, j // b
        return abs(qb - kb) <= local or kb < glob or qb < glob or (stride > 0 and (qb - kb) % stride == 0)
    return torch.tensor([[keep(i, j) for j in range(sk)] for i in range(sq)])


def neighborhood_keep(rows, cols, prefix, kh, kw):
    n = prefix + rows * cols
    keep = torch.zeros(n, n, dtype=torch.bool)
    keep[:prefix, :] = True
    keep[:, :prefix] = True
    for t in range(rows * cols):
        r, c = divmod(t, cols)
        r0, c0 = min(max(r - kh // 2, 0), rows - kh), min(max(c - kw // 2, 0), cols - kw)
        for rr in range(r0, r0 + kh):
            for cc in range(c0, c0 + kw):
                keep[prefix + t, prefix + rr * cols + cc] = True
    return keep


def inputs(seed, b=2, hq=4, hkv=2, sq=13, sk=13, d=8, mask=None):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, s, d, generator=g) for h, s in ((hq, sq), (hkv, sk), (hkv, sk)))
    m = None
    if mask == "bool":
        m = torch.rand(b, 1, sq, sk, generator=g) > 0.4
        m[0, 0, 1] = False  # a row with every key masked
    elif mask == "additive":
        m = torch.randn(b, hq, sq, sk, generator=g)
    elif mask == "padding":
        m = torch.zeros(b, 1, 1, sk)
        m[-1, ..., sk - 4:] = float("-inf")
    return q, k, v, m


CASES = list(itertools.product([0, 1], [1, 2, 4], [False, True], [None, "bool", "additive", "padding"]))


@pytest.mark.parametrize("seed,hkv,causal,mask", CASES)
def test_window_and_sinks(seed, hkv, causal, mask):
    q, k, v, m = inputs(seed, hkv=hkv, sq=13, sk=15, mask=mask)
    for left, right, sinks in [(3, 1, 0), (4, 0, 2), (2, 5, 3)]:
        got = sparse(q, k, v, m, 0.4, causal, 0.0, spec(f"window:left={left},right={right},sinks={sinks},block=4"))
        want = oracle(q, k, v, window_keep(13, 15, left, right, sinks), m, 0.4, causal=causal)
        assert torch.isfinite(got).all()
        assert (got - want).abs().max() <= 1e-5


@pytest.mark.parametrize("seed,hkv,causal,mask", CASES[::3])
def test_static_block_sparse(seed, hkv, causal, mask):
    q, k, v, m = inputs(seed, hkv=hkv, sq=17, sk=17, mask=mask)
    for local, glob, stride in [(0, 1, 0), (1, 0, 3), (1, 1, 2)]:
        got = sparse(q, k, v, m, 0.4, causal, 0.0, spec(f"blocksparse:block=3,local={local},global={glob},stride={stride}"))
        want = oracle(q, k, v, blocksparse_keep(17, 17, 3, local, glob, stride), m, 0.4, causal=causal)
        assert (got - want).abs().max() <= 1e-5


@pytest.mark.parametrize("mask", [None, "padding", "bool"])
def test_neighborhood_on_a_grid_with_a_cls_token(mask):
    q, k, v, m = inputs(3, sq=21, sk=21, mask=mask)  # 1 + 4x5 grid
    got = sparse(q, k, v, m, 0.4, False, 0.0, spec("neighborhood:3x3,grid=4x5,prefix=1,block=4"))
    want = oracle(q, k, v, neighborhood_keep(4, 5, 1, 3, 3), m, 0.4, causal=False)
    assert (got - want).abs().max() <= 1e-5


@pytest.mark.parametrize("text", ["topk:blocks=2,block=4", "topk:mass=0.7,block=4,local=0",
                                  "vslash:vertical=3,slash=3,last=4,sinks=1,local=2,block=4"])
@pytest.mark.parametrize("seed,hkv,causal,mask", CASES[::4])
def test_content_selected_patterns_match_dense_over_their_selection(text, seed, hkv, causal, mask):
    q, k, v, m = inputs(seed, hkv=hkv, sq=14, sk=14, mask=mask)
    s = spec(text)
    keep = sparse_keep_mask(q, k, s, 0.4, causal)
    assert (sparse(q, k, v, m, 0.4, causal, 0.0, s) - oracle(q, k, v, keep, m, 0.4, causal=causal)).abs().max() <= 1e-5


def test_topk_selects_the_planted_block():
    q, k, v, _ = inputs(0, b=1, hq=1, hkv=1, sq=16, sk=16)
    k[0, 0, 8:12] = q[0, 0, 12:16].mean(0) * 8  # key block 2 strongly matches query block 3
    keep = sparse_keep_mask(q, k, spec("topk:blocks=1,block=4,local=0,sinks=0"), 1.0, True)
    assert keep[0, 0, 12:16, 8:12].all() and not keep[0, 0, 12:16, 4:8].any()


@pytest.mark.parametrize("text", ["window:64", "blocksparse:block=4,local=9", "topk:blocks=9,block=4",
                                  "vslash:vertical=20,slash=40,block=4", "heads[0]=fused; heads[*]=window:30,block=4"])
@pytest.mark.parametrize("causal", [False, True])
def test_patterns_covering_everything_are_exact(text, causal):
    q, k, v, m = inputs(5, sq=13, sk=13, mask="padding")
    got = sparse(q, k, v, m, 0.4, causal, 0.0, spec(text))
    assert (got - attention_reference(q, k, v, m, 0.4, causal)).abs().max() <= 1e-5


def test_head_mix_keeps_exact_heads_exact():
    q, k, v, m = inputs(6, hq=4, hkv=2)
    got = sparse(q, k, v, m, 0.4, True, 0.0, spec("heads[0,3]=fused; heads[*]=window:2,block=4"))
    exact = attention_reference(q, k, v, m, 0.4, True)
    windowed = oracle(q, k, v, window_keep(13, 13, 2, 0, 0), m, 0.4, causal=True)
    assert (got[:, [0, 3]] - exact[:, [0, 3]]).abs().max() <= 1e-5
    assert (got[:, [1, 2]] - windowed[:, [1, 2]]).abs().max() <= 1e-5


def test_reference_cost_grows_with_kept_blocks_not_seq_squared():
    def flops(fn, s):
        q, k, v = (torch.randn(1, 2, s, 16) for _ in range(3))
        with FlopCounterMode(display=False) as fc:
            fn(q, k, v)
        return fc.get_total_flops()

    text = spec("window:64,block=32")
    sp = [flops(lambda q, k, v: sparse_attention_reference(q, k, v, None, 0.25, True, 0.0, text), s) for s in (256, 512)]
    # Dense as a model writes it: every score materialised (a keep-all mask takes the math path).
    dense = [flops(lambda q, k, v: oracle(q, k, v, torch.ones(1, 1, q.shape[2], q.shape[2], dtype=torch.bool), None,
                                          0.25, causal=True), s) for s in (256, 512)]
    assert 1.7 <= sp[1] / sp[0] <= 2.3 and dense[1] / dense[0] >= 3.9
    assert sp[1] < dense[1] / 4
    q, k = torch.randn(1, 2, 512, 16), torch.randn(1, 2, 512, 16)
    pairs = sparse_computed_pairs(q, k, text, 0.25, True)
    kept = 2 * 2 * pairs * 16 * 2  # QK^T and PV: 2 FLOPs per MAC, 2 heads, D=16
    # Block lists are padded to the longest one in a batched matmul: a little more than kept.
    assert kept <= sp[1] <= 1.1 * kept


# ---------------------------------------------------------------------------- linear


def quadratic(q, k, v, mask, scale, causal, kernel):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    a = kernel(q, k)
    if mask is not None:
        a = a * (mask.float() if mask.dtype == torch.bool else torch.exp(mask))
    if causal:
        a = a * torch.ones(q.shape[2], k.shape[2]).tril()
    return (a @ v) / a.sum(-1, keepdim=True).clamp_min(1e-12)


KERNELS = {
    "elu": lambda s: lambda q, k: (torch.nn.functional.elu(q * math.sqrt(s)) + 1) @ (torch.nn.functional.elu(k * math.sqrt(s)) + 1).transpose(-1, -2),
    "relu": lambda s: lambda q, k: torch.relu(q * math.sqrt(s)) @ torch.relu(k * math.sqrt(s)).transpose(-1, -2),
    "taylor": lambda s: lambda q, k: 1 + s * (q @ k.transpose(-1, -2)) + (s * (q @ k.transpose(-1, -2))) ** 2 / 2,
}


@pytest.mark.parametrize("fmap,chunk,causal,hkv,mask", list(itertools.product(
    ["elu", "relu", "taylor"], [1, 3, 64], [False, True], [4, 2], [None, "bool", "additive"]))[::2])
def test_linear_equals_its_quadratic_form(fmap, chunk, causal, hkv, mask):
    q, k, v, _ = inputs(7, hkv=hkv, sq=11, sk=11)
    m = None
    if mask == "bool":
        m = torch.rand(2, 1, 1, 11) > 0.3
    elif mask == "additive":
        m = torch.randn(2, 1, 1, 11)
    got = linear(q, k, v, m, 0.3, causal, spec(f"linear:{fmap},chunk={chunk}"))
    assert torch.isfinite(got).all()
    assert (got - quadratic(q, k, v, m, 0.3, causal, KERNELS[fmap](0.3))).abs().max() <= 1e-4


@pytest.mark.parametrize("causal", [False, True])
def test_hybrid_is_exact_inside_the_window_and_taylor_outside(causal):
    q, k, v, _ = inputs(8, sq=16, sk=16)
    w = 3
    i, j = torch.arange(16).view(-1, 1), torch.arange(16).view(1, -1)
    inside = (j >= i - w) & (j <= i + (0 if causal else w))

    def kernel(q, k):
        s = 0.3 * (q @ k.transpose(-1, -2))
        return torch.where(inside, torch.exp(s), 1 + s + s * s / 2)

    got = linear(q, k, v, None, 0.3, causal, spec(f"hybrid:window={w},map=taylor"))
    assert (got - quadratic(q, k, v, None, 0.3, causal, kernel)).abs().max() <= 1e-4


def test_performer_error_shrinks_with_more_features():
    q, k, v, _ = inputs(9, b=1, hq=2, hkv=2, sq=32, sk=32, d=16)
    q, k = q * 0.5, k * 0.5
    exact = attention_reference(q, k, v, None, 0.25, False)

    def err(n):
        outs = [linear_attention_reference(q, k, v, None, 0.25, False, spec(f"linear:favor,features={n},seed={s}"))
                for s in range(4)]
        return sum(float((o - exact).pow(2).mean().sqrt()) for o in outs) / len(outs)

    assert err(1024) < 0.5 * err(16)


def test_linear_refuses_a_per_query_mask():
    q, k, v, _ = inputs(1)
    with pytest.raises(ValueError, match="key mask"):
        linear_attention_reference(q, k, v, torch.ones(2, 1, 13, 13, dtype=torch.bool), 0.3, False, spec("linear:elu"))


def test_sparse_and_linear_ops_survive_export_save_load(tmp_path):
    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return sparse(q, k, v, None, 0.3, True, 0.0, spec("window:3,sinks:1,block=4")) + \
                linear(q, k, v, None, 0.3, True, spec("linear:favor,features=8"))

    q, k, v, _ = inputs(2, hkv=4)
    ep = torch.export.export(M(), (q, k, v))
    torch.export.save(ep, tmp_path / "m.pt2")
    loaded = torch.export.load(tmp_path / "m.pt2")
    assert (loaded.module()(q, k, v) - M()(q, k, v)).abs().max() == 0
