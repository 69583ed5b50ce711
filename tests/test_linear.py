"""attnforge::linear_attention against its explicit quadratic form, computed independently.

For a feature map phi, linear attention is ``out_i = sum_j A_ij v_j / sum_j A_ij`` with
``A_ij = phi(q_i) . phi(k_j) * w_j`` (``w_j`` the key mask's weight: 0/1, or ``exp(bias)``),
restricted to ``j <= i`` on causal sites. The op computes it without the ``Sq x Sk`` matrix
(summaries, chunked prefix sums); here A is built explicitly.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import compiler  # noqa: F401  (registers torch.ops.attnforge.*)
from compiler.reference.linear_ops import linear_attention_reference, orthogonal_features
from compiler.ir.ops import attention_reference
from compiler.variants.language import parse_variant

LINEAR = torch.ops.attnforge.linear_attention.default
TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def spec(text: str) -> str:
    return parse_variant(text).text


def problem(seed, b=2, hq=4, hkv=2, sq=13, sk=13, d=8, dv=8, mask=None, qk_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g) * qk_scale
    k = torch.randn(b, hkv, sk, d, generator=g) * qk_scale
    v = torch.randn(b, hkv, sk, dv, generator=g)
    m = None
    if mask == "bool":  # key padding [B, 1, 1, Sk]; batch 0 keeps every key, the last pads some
        m = torch.ones(b, 1, 1, sk, dtype=torch.bool)
        m[-1, ..., sk - 4:] = False
    elif mask == "additive":  # [B, 1, 1, Sk] bias: weight exp(bias), -inf = padded
        m = torch.randn(b, 1, 1, sk, generator=g)
        m[-1, ..., sk - 3:] = float("-inf")
    elif mask == "additive-heads":  # [B, H, 1, Sk]
        m = torch.randn(b, hq, 1, sk, generator=g)
    return q, k, v, m


def key_weight(m, b, hq, sk):
    """[B, H, 1, Sk] multiplicative key weights of a key mask."""
    if m is None:
        return torch.ones(b, hq, 1, sk, dtype=torch.float64)
    w = m.double() if m.dtype == torch.bool else torch.exp(m.double())
    return w.expand(b, hq, 1, sk)


def expand_kv(x, hq):
    return x.repeat_interleave(hq // x.shape[1], 1)


def phi(x, name, scale):
    x = x.double() * math.sqrt(scale)
    if name == "elu":
        return torch.where(x > 0, x + 1.0, torch.exp(x))  # elu(x) + 1
    if name == "relu":
        return x.clamp(min=0)
    raise KeyError(name)


def kernel(q, k, name, scale, features=64, seed=0):
    """A_ij before masking: [B, H, Sq, Sk] in float64."""
    if name == "taylor":
        s = scale * (q.double() @ k.double().transpose(-1, -2))
        return 1.0 + s + s * s / 2.0
    if name == "favor":
        w = orthogonal_features(features, q.shape[-1], seed).double()

        def fmap(x):
            x = x.double() * math.sqrt(scale)
            return torch.exp(x @ w.T - (x * x).sum(-1, keepdim=True) / 2) / math.sqrt(features)

        return fmap(q) @ fmap(k).transpose(-1, -2)
    return phi(q, name, scale) @ phi(k, name, scale).transpose(-1, -2)


def normalize(a, v):
    return (a @ v.double()) / a.sum(-1, keepdim=True).clamp_min(1e-12)


def quadratic(q, k, v, m, scale, causal, name, **kw):
    b, hq, sq, _ = q.shape
    sk = k.shape[2]
    k, v = expand_kv(k, hq), expand_kv(v, hq)
    a = kernel(q, k, name, scale, **kw) * key_weight(m, b, hq, sk)
    if causal:
        a = a * torch.ones(sq, sk, dtype=torch.float64).tril()
    return normalize(a, v)


def hybrid_quadratic(q, k, v, m, scale, causal, window):
    """exp(s) inside the window (causal: i-W <= j <= i; else |i-j| <= W), 1+s+s^2/2 outside."""
    b, hq, sq, _ = q.shape
    sk = k.shape[2]
    k, v = expand_kv(k, hq), expand_kv(v, hq)
    s = scale * (q.double() @ k.double().transpose(-1, -2))
    i, j = torch.arange(sq).view(-1, 1), torch.arange(sk).view(1, -1)
    inside = ((i - window <= j) & (j <= i)) if causal else ((i - j).abs() <= window)
    a = torch.where(inside, torch.exp(s), 1.0 + s + s * s / 2.0) * key_weight(m, b, hq, sk)
    if causal:
        a = a * (j <= i)
    return normalize(a, v)


def check(got, ref, tol=TOL):
    assert torch.isfinite(got).all(), "linear attention produced NaN/inf"
    err = float((got.double() - ref).abs().max())
    assert err <= tol, f"max abs error {err:.3e}"


# ----------------------------------------------------------------------------- feature maps


@pytest.mark.parametrize("name", ["elu", "relu", "taylor"])
@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("mask", [None, "bool", "additive", "additive-heads"])
def test_matches_quadratic_form(name, chunk, causal, heads, mask):
    q, k, v, m = problem(1, 2, *heads, 13, 13, 8, 12, mask)
    scale = 1 / math.sqrt(8)
    got = LINEAR(q, k, v, m, scale, causal, spec(f"linear:{name},chunk={chunk}"))
    assert got.shape == (2, 4, 13, 12) and got.dtype == v.dtype
    check(got, quadratic(q, k, v, m, scale, causal, name))


@pytest.mark.parametrize("name", ["elu", "relu", "taylor"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk,chunk", [(5, 11, 3), (11, 5, 3), (1, 9, 4), (9, 1, 2), (40, 40, 7), (33, 17, 64)])
def test_uneven_lengths_and_chunks(name, causal, sq, sk, chunk):
    q, k, v, m = problem(2, 1, 2, 1, sq, sk, 16, 8, "additive")
    got = LINEAR(q, k, v, m, 0.3, causal, spec(f"linear:{name},chunk={chunk}"))
    check(got, quadratic(q, k, v, m, 0.3, causal, name))


@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask", [None, "bool", "additive"])
def test_favor_matches_its_random_feature_quadratic_form(chunk, causal, mask):
    """FAVOR+ with the library's projection equals the quadratic form of exp(Wx - |x|^2/2)/sqrt(F):
    the per-row / global max shifts used for stability cancel."""
    q, k, v, m = problem(3, 2, 4, 2, 17, 17, 8, 8, mask)
    scale = 1 / math.sqrt(8)
    got = LINEAR(q, k, v, m, scale, causal, spec(f"linear:favor,features=32,chunk={chunk},seed=3"))
    check(got, quadratic(q, k, v, m, scale, causal, "favor", features=32, seed=3))


@pytest.mark.parametrize("name", ["elu", "relu", "taylor", "favor"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads,mask", [((4, 4), None), ((4, 2), "bool"), ((6, 2), "additive-heads"), ((4, 1), "additive")])
@pytest.mark.parametrize("slab", [1, 4000, 9000])
def test_cpu_slabs_match_quadratic_form(monkeypatch, name, causal, heads, mask, slab):
    """On CPU the op works a slab of heads, and on causal sites a slab of rows, at a time (a few
    MiB each at scale; a few bytes here): the key sums carried between row slabs, each slab's GQA
    heads and mask rows, a last short slab, must give the whole quadratic form."""
    from compiler.reference import linear_ops

    calls = {"rows": 0, "slabs": 0}
    rows, whole = linear_ops._causal_rows, linear_ops._linear_attention
    monkeypatch.setattr(linear_ops, "SLAB_BYTES", slab)
    monkeypatch.setattr(linear_ops, "_causal_rows", lambda *a: (calls.__setitem__("rows", calls["rows"] + 1), rows(*a))[1])
    monkeypatch.setattr(linear_ops, "_linear_attention",
                        lambda *a: (calls.__setitem__("slabs", calls["slabs"] + 1), whole(*a))[1])
    q, k, v, m = problem(4, 2, *heads, 45, 45, 8, 8, mask)
    scale = 1 / math.sqrt(8)
    text = f"linear:{name},chunk=4" + (",features=16,seed=1" if name == "favor" else "")
    got = linear_attention_reference(q, k, v, m, scale, causal, spec(text))
    kw = {"features": 16, "seed": 1} if name == "favor" else {}
    check(got, quadratic(q, k, v, m, scale, causal, name, **kw))
    if slab == 1:  # one head a slab; rows split wherever the math allows (no shared key offset)
        rowwise = causal and name != "favor"
        assert calls["rows"] == (2 * heads[0] if rowwise else 0)
        assert calls["slabs"] == (0 if rowwise else 2 * heads[0])
    assert calls["rows"] + calls["slabs"] >= 2  # batch 2: never the whole problem at once


@pytest.mark.parametrize("name", ["elu", "relu", "taylor"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("slab", [1, 4000])
def test_cpu_slabs_reuse_scratch_holding_nan(monkeypatch, name, causal, slab):
    """The slab loop reuses its buffers: every buffer is NaN when first made, and each slab
    finds the last slab's values in it. Only what the op writes before reading may count, and
    the last, shorter slab and the GQA / mask slices must still give the quadratic form."""
    from compiler.reference import linear_ops

    made = []
    take = linear_ops.Scratch.take

    def poisoned(self, *a, **kw):
        buf, fresh = take(self, *a, **kw)
        if fresh:
            made.append(buf.fill_(float("nan")))
        return buf, fresh

    monkeypatch.setattr(linear_ops, "SLAB_BYTES", slab)
    monkeypatch.setattr(linear_ops.Scratch, "take", poisoned)
    q, k, v, m = problem(7, 2, 6, 2, 45, 45, 8, 8, "bool")
    got = linear_attention_reference(q, k, v, m, 0.3, causal, spec(f"linear:{name},chunk=4"))
    check(got, quadratic(q, k, v, m, 0.3, causal, name))
    assert made  # the loop ran on scratch buffers


@pytest.mark.parametrize("scale", [1e-4, 0.125, 1.0, 7.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_elu_features_in_one_pass(scale, dtype):
    """The elu map takes sqrt(scale) through elu's own scales: elu(c x) + 1 from plain math."""
    from compiler.reference.linear_ops import features

    x = (torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(2)) * 6).to(dtype)
    got, offset = features(x, parse_variant("linear:elu").pattern, scale, "row")
    xc = x.double() * math.sqrt(scale)
    want = torch.where(xc > 0, xc + 1, torch.exp(xc))
    assert got.dtype == torch.float32 and float(offset) == 0.0
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=1e-7)


def test_cpu_row_slabs_take_a_mask_broadcast_over_keys(monkeypatch):
    """A key mask of one value for every key ([B, 1, 1, 1]) is not sliced with the rows (it
    failed with a shape error)."""
    from compiler.reference import linear_ops

    monkeypatch.setattr(linear_ops, "SLAB_BYTES", 1)
    q, k, v, _ = problem(6, 2, 4, 2, 30, 30, 8, 8)
    m = torch.tensor([0.5, -1.0]).view(2, 1, 1, 1)
    got = linear_attention_reference(q, k, v, m, 0.3, True, spec("linear:elu,chunk=4"))
    check(got, quadratic(q, k, v, m, 0.3, True, "elu"))


@pytest.mark.parametrize("split,chunk", [(8, 4), (12, 5), (3, 64)])
def test_causal_sums_carried_across_row_slabs(split, chunk):
    """The chunked causal sums of rows [0, split) and then [split, S) with the first part's key
    sums carried, for several (batch, head) pairs at once, equal the quadratic form."""
    from compiler.reference.linear_ops import _causal_terms

    g = torch.Generator().manual_seed(5)
    fq, fk = torch.rand(2, 3, 21, 6, generator=g), torch.rand(2, 3, 21, 6, generator=g)
    v = torch.randn(2, 3, 21, 5, generator=g)
    a = (fq.double() @ fk.double().transpose(-1, -2)).tril()
    n1, d1, carry = _causal_terms(fq[:, :, :split], fk[:, :, :split], v[:, :, :split], chunk, want_carry=True)
    n2, d2, _ = _causal_terms(fq[:, :, split:], fk[:, :, split:], v[:, :, split:], chunk, carry)
    num, den = torch.cat([n1, n2], 2), torch.cat([d1, d2], 2)
    check(num.double(), a @ v.double())
    check(den.double(), a.sum(-1, keepdim=True))


def test_orthogonal_features_blocks_are_orthogonal():
    w = orthogonal_features(20, 8, 0).double()
    assert w.shape == (20, 8)
    for blk in (w[:8], w[8:16]):
        u = blk / blk.norm(dim=1, keepdim=True)
        assert torch.allclose(u @ u.T, torch.eye(8, dtype=torch.float64), atol=1e-5)
    assert torch.equal(orthogonal_features(20, 8, 0), orthogonal_features(20, 8, 0))
    assert not torch.equal(orthogonal_features(20, 8, 0), orthogonal_features(20, 8, 1))


@pytest.mark.parametrize("causal", [False, True])
def test_favor_error_shrinks_with_more_features(causal):
    """Performer's estimate of softmax attention improves with the number of random features."""
    scale = 1 / math.sqrt(8)
    errs = {}
    for f in (16, 1024):
        total = 0.0
        for seed in range(4):
            q, k, v, _ = problem(10 + seed, 1, 2, 2, 32, 32, 8, 8, None, qk_scale=0.7)
            exact = attention_reference(q, k, v, None, scale, causal)
            got = LINEAR(q, k, v, None, scale, causal, spec(f"linear:favor,features={f},seed={seed}"))
            assert torch.isfinite(got).all()
            total += float((got - exact).abs().mean())
        errs[f] = total / 4
    assert errs[1024] < 0.5 * errs[16], errs


@pytest.mark.parametrize("causal", [False, True])
def test_taylor_is_close_to_softmax_for_small_scores(causal):
    q, k, v, _ = problem(4, 1, 2, 2, 20, 20, 8, 8, None, qk_scale=0.3)
    got = LINEAR(q, k, v, None, 0.35, causal, spec("linear:taylor"))
    assert (got - attention_reference(q, k, v, None, 0.35, causal)).abs().max() < 1e-2


# ----------------------------------------------------------------------------- hybrid


@pytest.mark.parametrize("window", [1, 3, 8, 64])
@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads,mask", [((4, 4), None), ((4, 2), "bool"), ((4, 1), "additive"),
                                        ((2, 2), "additive-heads")])
def test_hybrid_taylor_matches_quadratic_form(window, chunk, causal, heads, mask):
    q, k, v, m = problem(5, 2, *heads, 23, 23, 8, 8, mask)
    scale = 1 / math.sqrt(8)
    got = LINEAR(q, k, v, m, scale, causal, spec(f"hybrid:window={window},map=taylor,chunk={chunk}"))
    check(got, hybrid_quadratic(q, k, v, m, scale, causal, window))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(5, 11), (11, 5), (20, 7), (1, 9)])
@pytest.mark.parametrize("window", [1, 3, 8])
def test_hybrid_uneven_lengths(causal, sq, sk, window):
    q, k, v, m = problem(2, 1, 2, 1, sq, sk, 8, 8, "additive")
    got = LINEAR(q, k, v, m, 0.3, causal, spec(f"hybrid:window={window},chunk=3"))
    check(got, hybrid_quadratic(q, k, v, m, 0.3, causal, window))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask", [None, "bool", "additive"])
def test_hybrid_covering_window_is_softmax(causal, mask):
    """A window wider than the sequence leaves nothing to the linear part: exact attention."""
    q, k, v, m = problem(6, 2, 4, 2, 19, 19, 8, 8, mask)
    exact = attention_reference(q, k, v, m, 0.35, causal)
    got = LINEAR(q, k, v, m, 0.35, causal, spec("hybrid:window=64,map=taylor"))
    check(got, exact.double(), tol=1e-5)
    # favor: the (all keys - window) linear remainder is zero only up to fp32 cancellation of
    # noisy random-feature sums (~3e-5 with 16 features, ~1e-6 with 256).
    got = LINEAR(q, k, v, m, 0.35, causal, spec("hybrid:window=64,map=favor,features=16"))
    check(got, exact.double(), tol=1e-4)
    got = LINEAR(q, k, v, m, 0.35, causal, spec("hybrid:window=64,map=favor,features=256"))
    check(got, exact.double(), tol=1e-5)


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("text", ["linear:elu", "linear:relu", "linear:taylor", "linear:favor",
                                  "hybrid:window=2,map=taylor"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_fully_masked_keys_give_zeros(text, causal, kind):
    q, k, v, _ = problem(7, 2, 2, 2, 9, 9)
    if kind == "bool":
        m = torch.ones(2, 1, 1, 9, dtype=torch.bool)
        m[1] = False
    else:
        m = torch.zeros(2, 1, 1, 9)
        m[1] = float("-inf")
    out = LINEAR(q, k, v, m, 0.35, causal, spec(text))
    assert torch.isfinite(out).all()
    assert out[1].abs().max() == 0
    assert out[0].abs().max() > 0


def test_query_dependent_mask_is_refused():
    q, k, v, _ = problem(8, 1, 2, 2, 5, 5)
    with pytest.raises(ValueError, match="key mask"):
        linear_attention_reference(q, k, v, torch.ones(1, 1, 5, 5, dtype=torch.bool), 0.35, False,
                                   spec("linear:elu"))


# ----------------------------------------------------------------------------- cost


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


@pytest.mark.parametrize("causal", [False, True])
def test_cost_is_linear_in_sequence_length(causal):
    s = spec("linear:elu,chunk=32")
    got = {}
    for n in (256, 512):
        q, k, v, _ = problem(n, 1, 2, 2, n, n, 16, 16)
        got[n] = _flops(lambda: linear_attention_reference(q, k, v, None, 0.25, causal, s))
    assert 1.8 <= got[512] / got[256] <= 2.2, got


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("text", ["linear:elu,chunk=3", "linear:favor,features=16", "hybrid:window=2,map=taylor"])
def test_survives_export_save_load(tmp_path, text):
    s = spec(text)

    class M(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return LINEAR(q, k, v, mask, 0.25, True, s)

    q, k, v, m = problem(9, 2, 4, 2, 11, 11, 8, 8, "additive")
    args = (q, k, v, m)
    ep = torch.export.export(M(), args)
    torch.export.save(ep, tmp_path / "m.pt2")
    back = torch.export.load(tmp_path / "m.pt2")
    nodes = [n for n in back.graph.nodes if n.target == LINEAR]
    assert len(nodes) == 1 and s in nodes[0].args
    got = back.module()(*args)
    assert torch.equal(got, linear_attention_reference(q, k, v, m, 0.25, True, s))
    assert torch.isfinite(got).all()
