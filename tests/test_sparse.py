"""attnforge::sparse_attention against a dense masked oracle built from independent keep masks.

Every pattern's semantics is written out here again, from the variant language's definition,
with plain torch math or loops (not the library's layout code): which (query, key) pairs each
pattern keeps. The op must equal exact attention restricted to those pairs (combined with the
user's mask) within fp32 rounding, over random shapes, GQA, causal and bidirectional sites,
every mask form, and rows whose keys are all masked (zeros, never NaN).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import compiler
from compare import max_err
from compiler.driver.capture import hf_defaults
from compiler.ir.ops import attention_reference, causal_pairs
from compiler.reference.sparse_ops import sparse_attention_reference, sparse_computed_pairs, sparse_keep_mask
from compiler.variants.language import parse_variant
from oracles import oracle
from zoo import hf_model

SPARSE = torch.ops.attnforge.sparse_attention.default
TOL = 1e-5
HEADS = [(1, 1), (2, 2), (4, 4), (4, 2), (4, 1)]
MASK_KINDS = ["none", "bool", "additive", "pad-bool", "pad-1e30", "pad-inf"]
SETTINGS = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])


pytestmark = pytest.mark.usefixtures("one_thread")


def spec(text: str) -> str:
    return parse_variant(text).text


# ----------------------------------------------------------------------------- problems


def make_problem(seed, b, hq, hkv, sq, sk, d, dv, mask_kind):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g)
    k = torch.randn(b, hkv, sk, d, generator=g)
    v = torch.randn(b, hkv, sk, dv, generator=g)
    return q, k, v, make_mask(g, mask_kind, b, hq, sq, sk)


def make_mask(g, kind, b, hq, sq, sk):
    if kind == "none":
        return None
    if kind == "bool":  # [B, 1, Sq, Sk] keep mask, with one query row masked entirely
        m = torch.rand(b, 1, sq, sk, generator=g) > 0.3
        m[-1, 0, int(torch.randint(sq, (1,), generator=g))] = False
        return m
    if kind == "additive":  # [B, H, Sq, Sk] bias
        return torch.randn(b, hq, sq, sk, generator=g)
    # key padding [B, 1, 1, Sk]: the last batch row pads its last n keys (maybe all of them)
    n = int(torch.randint(0, sk + 1, (1,), generator=g))
    keep = torch.ones(b, 1, 1, sk, dtype=torch.bool)
    keep[-1, ..., sk - n:] = False
    if kind == "pad-bool":
        return keep
    fill = -1e30 if kind == "pad-1e30" else float("-inf")
    return torch.zeros(b, 1, 1, sk).masked_fill(~keep, fill)


def check_op(q, k, v, user, scale, causal, text, keep, softcap=0.0):
    s = spec(text)
    b, hq, sq, _ = q.shape
    keep = keep.expand(b, hq, sq, k.shape[2])
    got = SPARSE(q, k, v, user, scale, causal, softcap, s)
    ref = oracle(q, k, v, keep, user, scale, softcap=softcap)
    assert got.shape == ref.shape and got.dtype == v.dtype
    assert torch.isfinite(got).all(), "sparse attention produced NaN/inf"
    err = float((got - ref).abs().max()) if got.numel() else 0.0
    assert err <= TOL, f"{s}: max abs error {err:.3e} against the dense masked oracle"


# ----------------------------------------------------------------------------- independent keep masks


def _ij(sq, sk):
    return torch.arange(sq).view(-1, 1), torch.arange(sk).view(1, -1)


def causal_keep(sq, sk):
    i, j = _ij(sq, sk)
    return j <= i


def window_keep(sq, sk, left, right, sinks, causal):
    if right is None:
        right = 0 if causal else left
    i, j = _ij(sq, sk)
    keep = ((i - left <= j) & (j <= i + right)) | (j < sinks)
    return keep & (j <= i) if causal else keep


def blocksparse_keep(sq, sk, block, local, glob, stride, causal):
    i, j = _ij(sq, sk)
    qb, kb = i // block, j // block
    keep = ((qb - kb).abs() <= local) | (kb < glob) | (qb < glob)
    if stride > 0:
        keep = keep | ((qb - kb) % stride == 0)
    return keep & (j <= i) if causal else keep


def neighborhood_keep(kh, kw, rows, cols, prefix):
    """NATTEN-style 2-D windows, written as loops: a fixed KHxKW window shifted inward at edges."""
    n = prefix + rows * cols
    kh, kw = min(kh, rows), min(kw, cols)
    keep = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            if i < prefix or j < prefix:
                keep[i, j] = True
                continue
            r, c = divmod(i - prefix, cols)
            kr, kc = divmod(j - prefix, cols)
            r0 = min(max(r - kh // 2, 0), rows - kh)
            c0 = min(max(c - kw // 2, 0), cols - kw)
            keep[i, j] = r0 <= kr < r0 + kh and c0 <= kc < c0 + kw
    return keep


def _block_means(x, block):
    return [x[s:s + block].double().mean(0) for s in range(0, x.shape[0], block)]


def topk_keep(q, k, scale, causal, blocks, block, local, sinks, mass=0.0):
    """Top-k key blocks per (batch, q-head, query block) by pooled score, as loops."""
    b, hq, sq, _ = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    keep = torch.zeros(b, hq, sq, sk, dtype=torch.bool)
    for bi in range(b):
        for h in range(hq):
            kvh = h // (hq // hkv)
            pq, pk = _block_means(q[bi, h], block), _block_means(k[bi, kvh], block)
            for qb, mq in enumerate(pq):
                allowed = [kb for kb in range(len(pk)) if not causal or kb <= qb]
                score = {kb: float(mq @ pk[kb]) * scale for kb in allowed}
                near = (lambda kb: qb - local <= kb <= qb) if causal else (lambda kb: abs(kb - qb) <= local)
                forced = {kb for kb in allowed if near(kb) or kb < sinks}
                cand = sorted((kb for kb in allowed if kb not in forced), key=lambda kb: -score[kb])
                if mass > 0:
                    mx = max(score.values())
                    z = sum(math.exp(s - mx) for s in score.values())
                    prob = {kb: math.exp(s - mx) / z for kb, s in score.items()}
                    acc = sum(prob[kb] for kb in forced)
                    chosen = set()
                    for kb in cand:
                        if acc >= mass:
                            break
                        chosen.add(kb)
                        acc += prob[kb]
                else:
                    chosen = set(cand[:blocks])
                for kb in forced | chosen:
                    keep[bi, h, qb * block:(qb + 1) * block, kb * block:(kb + 1) * block] = True
    return keep & causal_keep(sq, sk) if causal else keep


def vslash_keep(q, k, scale, causal, vertical, slash, last, sinks, local):
    """MInference's estimate, as loops: the last ``last`` queries' softmax over all keys; keep the
    ``vertical`` heaviest key columns (the first ``sinks`` always) and the ``slash`` heaviest
    diagonals i - j (the ``local`` nearest always); a pair is kept on a kept column or diagonal."""
    b, hq, sq, _ = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    last = min(last, sq)
    keep = torch.zeros(b, hq, sq, sk, dtype=torch.bool)
    for bi in range(b):
        for h in range(hq):
            kk = k[bi, h // (hq // hkv)].double()
            col, diag = [0.0] * sk, {}
            for i in range(sq - last, sq):
                s = (q[bi, h, i].double() @ kk.T) * scale
                if causal:
                    s[i + 1:] = float("-inf")
                p = torch.softmax(s, 0).nan_to_num(0.0)
                for j in range(sk):
                    col[j] += float(p[j])
                    diag[i - j] = diag.get(i - j, 0.0) + float(p[j])
            cols = set(range(min(sinks, sk)))
            cols |= set(sorted((j for j in range(sk) if j not in cols), key=lambda j: -col[j])[:max(0, vertical - len(cols))])
            offsets = [dd for dd in range(-(sk - 1), sq) if not causal or dd >= 0]
            is_near = (lambda dd: 0 <= dd < local) if causal else (lambda dd: abs(dd) < local)
            diags = {dd for dd in offsets if is_near(dd)}
            rest = sorted((dd for dd in offsets if dd not in diags), key=lambda dd: -diag.get(dd, 0.0))
            diags |= set(rest[:max(0, slash - len(diags))])
            for i in range(sq):
                for j in range(sk):
                    keep[bi, h, i, j] = j in cols or (i - j) in diags
    return keep & causal_keep(sq, sk) if causal else keep


# ----------------------------------------------------------------------------- random problems


@st.composite
def problems(draw, square=False, causal=None, heads=HEADS):
    b = draw(st.integers(1, 2))
    hq, hkv = draw(st.sampled_from(heads))
    sq = draw(st.integers(1, 40))
    sk = sq if square else draw(st.one_of(st.just(sq), st.integers(1, 40)))
    d = draw(st.sampled_from([4, 8, 16]))
    dv = draw(st.sampled_from([d, 4, 12]))
    causal = draw(st.booleans()) if causal is None else causal
    mask_kind = draw(st.sampled_from(MASK_KINDS))
    scale = draw(st.sampled_from([1.0 / math.sqrt(d), 0.3, 1.0]))
    seed = draw(st.integers(0, 2**20))
    q, k, v, m = make_problem(seed, b, hq, hkv, sq, sk, d, dv, mask_kind)
    return dict(q=q, k=k, v=v, mask=m, scale=scale, causal=causal, mask_kind=mask_kind)


def _run(p, text, keep, softcap=0.0):
    q, k, v, m = p["q"], p["k"], p["v"], p["mask"]
    b, hq, sq, sk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    keep = keep.expand(b, hq, sq, sk)
    # The library's own keep mask (what its reports and calibration use) is the same set of pairs.
    lib = sparse_keep_mask(q, k, spec(text), p["scale"], p["causal"])
    assert torch.equal(lib, keep), f"{text}: sparse_keep_mask differs from the pattern's definition"
    check_op(q, k, v, m, p["scale"], p["causal"], text, keep, softcap)


@settings(max_examples=60, **SETTINGS)
@given(p=problems(), left=st.integers(0, 20), right=st.one_of(st.none(), st.integers(0, 10)),
       sinks=st.integers(0, 5), block=st.sampled_from([4, 8, 16, 64]), softcap=st.sampled_from([0.0, 0.0, 5.0]))
def test_window(p, left, right, sinks, block, softcap):
    text = f"window:{left},right={'auto' if right is None else right},sinks={sinks},block={block}"
    sq, sk = p["q"].shape[2], p["k"].shape[2]
    _run(p, text, window_keep(sq, sk, left, right, sinks, p["causal"]), softcap)


@settings(max_examples=50, **SETTINGS)
@given(p=problems(), block=st.sampled_from([4, 8, 16]), local=st.integers(0, 2), glob=st.integers(0, 2),
       stride=st.integers(0, 4))
def test_blocksparse(p, block, local, glob, stride):
    text = f"blocksparse:block={block},local={local},global={glob},stride={stride}"
    sq, sk = p["q"].shape[2], p["k"].shape[2]
    _run(p, text, blocksparse_keep(sq, sk, block, local, glob, stride, p["causal"]))


@st.composite
def grids(draw):
    rows, cols = draw(st.integers(2, 5)), draw(st.integers(2, 6))
    prefix = draw(st.integers(0, 2))
    assume(prefix + rows * cols <= 40)
    kh, kw = draw(st.sampled_from([1, 3, 5])), draw(st.sampled_from([1, 3, 5]))
    return rows, cols, prefix, kh, kw


@settings(max_examples=40, **SETTINGS)
@given(grid=grids(), b=st.integers(1, 2), heads=st.sampled_from(HEADS), mask_kind=st.sampled_from(MASK_KINDS),
       block=st.sampled_from([4, 8, 64]), seed=st.integers(0, 2**20))
def test_neighborhood(grid, b, heads, mask_kind, block, seed):
    rows, cols, prefix, kh, kw = grid
    n = prefix + rows * cols
    q, k, v, m = make_problem(seed, b, *heads, n, n, 8, 8, mask_kind)
    text = f"neighborhood:{kh}x{kw},grid={rows}x{cols},prefix={prefix},block={block}"
    p = dict(q=q, k=k, v=v, mask=m, scale=0.35, causal=False, mask_kind=mask_kind)
    _run(p, text, neighborhood_keep(kh, kw, rows, cols, prefix))


@pytest.mark.parametrize("seq,rows,prefix", [(16, 4, 0), (17, 4, 1), (26, 5, 1)])
def test_neighborhood_grid_inferred_from_sequence(seq, rows, prefix):
    q, k, v, _ = make_problem(3, 1, 2, 2, seq, seq, 8, 8, "none")
    p = dict(q=q, k=k, v=v, mask=None, scale=0.35, causal=False, mask_kind="none")
    _run(p, "neighborhood:3x3,block=8", neighborhood_keep(3, 3, rows, rows, prefix))


def test_neighborhood_shifts_window_inward_at_edges():
    """A 3x3 window at the corner of a 4x4 grid covers rows/cols 0-2, not a clipped 2x2."""
    keep = sparse_keep_mask(torch.zeros(1, 1, 16, 4), torch.zeros(1, 1, 16, 4),
                            spec("neighborhood:3x3,grid=4x4,prefix=0"), 1.0, False)[0, 0]
    corner = keep[0].view(4, 4)
    assert corner[:3, :3].all() and corner.sum() == 9
    assert keep[5].view(4, 4)[:3, :3].all() and keep[5].sum() == 9  # interior query (1, 1)


@settings(max_examples=40, **SETTINGS)
@given(p=problems(), blocks=st.integers(1, 4), block=st.sampled_from([4, 8]), local=st.integers(0, 2),
       sinks=st.integers(0, 2))
def test_topk(p, blocks, block, local, sinks):
    text = f"topk:blocks={blocks},block={block},local={local},sinks={sinks}"
    keep = topk_keep(p["q"], p["k"], p["scale"], p["causal"], blocks, block, local, sinks)
    _run(p, text, keep)


def _pooled_probs(q, k, scale, causal, block):
    """Softmax over allowed key blocks of the pooled scores, per (b, q-head, query block)."""
    hq, hkv = q.shape[1], k.shape[1]
    kk = k.repeat_interleave(hq // hkv, 1)
    out = []
    for x in (q, kk):
        n = -(-x.shape[2] // block)
        out.append(torch.stack([x[:, :, i * block:(i + 1) * block].double().mean(2) for i in range(n)], 2))
    s = out[0] @ out[1].transpose(-1, -2) * scale
    if causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(s, -1)


@settings(max_examples=25, **SETTINGS)
@given(p=problems(), mass=st.sampled_from([0.3, 0.6, 0.9]), block=st.sampled_from([4, 8]),
       local=st.integers(0, 1), sinks=st.integers(0, 1))
def test_topk_mass(p, mass, block, local, sinks):
    """Mass mode keeps blocks holding at least ``mass`` of the pooled softmax, and the op equals
    the dense oracle of the pairs it keeps."""
    text = f"topk:mass={mass},block={block},local={local},sinks={sinks}"
    q, k, v, m = p["q"], p["k"], p["v"], p["mask"]
    keep = sparse_keep_mask(q, k, spec(text), p["scale"], p["causal"])
    # every candidate the definition picks is picked (the library may pick more)
    want = topk_keep(q, k, p["scale"], p["causal"], 8, block, local, sinks, mass=mass)
    assert not (want & ~keep).any()
    chosen = _block_any(keep, block).double()
    probs = _pooled_probs(q, k, p["scale"], p["causal"], block)
    assert ((chosen * probs).sum(-1) >= mass - 1e-6).all()
    check_op(q, k, v, m, p["scale"], p["causal"], text, keep)


def test_topk_mass_counts_local_and_sink_blocks():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 5, 4, generator=g), torch.randn(1, 1, 5, 4, generator=g)
    # Two key blocks; pooled softmax for query block 0 is [0.479, 0.521]: its own (local) block
    # already holds 0.479 >= 0.3 of the mass, so no other block should be added.
    probs = _pooled_probs(q, k, 0.5, False, 4)
    assert probs[0, 0, 0, 0] >= 0.3 and probs[0, 0, 1, 1] >= 0.3
    keep = sparse_keep_mask(q, k, spec("topk:mass=0.3,block=4,local=0,sinks=0"), 0.5, False)
    want = topk_keep(q, k, 0.5, False, 8, 4, 0, 0, mass=0.3)
    assert not want[0, 0, 0, 4] and not want[0, 0, 4, 0]
    assert torch.equal(keep, want)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(2, 2), (4, 2), (4, 1)])
def test_topk_selects_planted_block(causal, heads):
    """One key block made very similar to one query block is chosen; unrelated ones are not."""
    hq, hkv = heads
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, hq, 24, 8, generator=g) * 0.1
    k = torch.randn(2, hkv, 24, 8, generator=g) * 0.1
    v = torch.randn(2, hkv, 24, 8, generator=g)
    u = torch.randn(8, generator=g)
    u = 4 * u / u.norm()
    k[:, :, 4:8] += u  # key block 1
    q[:, :, 16:20] += u  # query block 4
    s = spec("topk:blocks=1,block=4,local=0,sinks=0")
    keep = sparse_keep_mask(q, k, s, 0.35, causal)
    assert keep[..., 16:20, 4:8].all()  # planted block chosen for query block 4
    assert not keep[..., 16:20, 8:16].any()  # blocks 2 and 3 are not
    assert keep[..., 16:20, 16:20].any()  # its own (local) block is always kept
    got = SPARSE(q, k, v, None, 0.35, causal, 0.0, s)
    assert (got - oracle(q, k, v, keep, None, 0.35)).abs().max() <= TOL


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive", "pad-1e30"])
def test_topk_all_blocks_is_dense(causal, mask_kind):
    q, k, v, m = make_problem(7, 2, 4, 2, 29, 29, 8, 8, mask_kind)
    got = SPARSE(q, k, v, m, 0.35, causal, 0.0, spec("topk:blocks=64,block=4,local=0,sinks=0"))
    assert (got - attention_reference(q, k, v, m, 0.35, causal)).abs().max() <= TOL


@settings(max_examples=25, **SETTINGS)
@given(p=problems(), vertical=st.integers(1, 12), slash=st.integers(1, 12), last=st.integers(1, 40),
       block=st.sampled_from([4, 8, 16]), sinks=st.integers(0, 4), local=st.integers(0, 4))
def test_vslash_matches_keep_mask_oracle(p, vertical, slash, last, block, sinks, local):
    """Content-selected: the op equals the dense oracle built from the library's keep mask."""
    text = f"vslash:vertical={vertical},slash={slash},last={last},sinks={sinks},local={local},block={block}"
    q, k, v, m = p["q"], p["k"], p["v"], p["mask"]
    keep = sparse_keep_mask(q, k, spec(text), p["scale"], p["causal"])
    if p["causal"]:
        assert not (keep & ~causal_keep(q.shape[2], k.shape[2])).any()
    check_op(q, k, v, m, p["scale"], p["causal"], text, keep)




@pytest.mark.parametrize("shape,causal", [
    ((2, 4, 2, 24, 24), False), ((2, 4, 2, 24, 24), True), ((1, 2, 2, 32, 32), False), ((1, 2, 2, 33, 33), True),
    ((2, 4, 1, 16, 16), False), ((2, 4, 1, 17, 17), True), ((1, 2, 1, 17, 16), True),
    pytest.param((1, 2, 2, 33, 33), False), pytest.param((2, 4, 1, 17, 17), False),
])
@pytest.mark.parametrize("forced", [(1, 1), (5, 6)], ids=["few-forced", "forced-beyond-counts"])
def test_vslash_selection_matches_definition(shape, causal, forced):
    """Last-queries estimate (last >= Sq, so every column and diagonal has mass, no ties). The
    sink columns and local diagonals are kept even when they outnumber ``vertical``/``slash``."""
    b, hq, hkv, sq, sk = shape
    sinks, local = forced
    q, k, v, _ = make_problem(11, b, hq, hkv, sq, sk, 8, 8, "none")
    text = f"vslash:vertical=3,slash=4,last=64,sinks={sinks},local={local},block=8"
    keep = vslash_keep(q, k, 0.35, causal, vertical=3, slash=4, last=64, sinks=sinks, local=local)
    assert torch.equal(sparse_keep_mask(q, k, spec(text), 0.35, causal), keep)
    check_op(q, k, v, None, 0.35, causal, text, keep)


def test_vslash_diagonal_with_fewer_keys_than_block():
    # Sq=8, Sk=3, block=8, one slash and no verticals: diagonal d (1 <= d <= 4) starts at key -d
    # on row 0 and ends at key 7-d >= 3 on row 7, so neither end lands on a real key.
    g = torch.Generator().manual_seed(0)
    found = False
    for _ in range(20):
        q, k = torch.randn(1, 1, 8, 4, generator=g), torch.randn(1, 1, 3, 4, generator=g)
        keep = vslash_keep(q, k, 0.5, True, vertical=0, slash=1, last=8, sinks=0, local=0)
        got = sparse_keep_mask(q, k, spec("vslash:vertical=0,slash=1,last=8,sinks=0,local=0,block=8"), 0.5, True)
        found = found or not torch.equal(got, keep)
    assert not found


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "pad-1e30"])
def test_vslash_all_columns_is_dense(causal, mask_kind):
    q, k, v, m = make_problem(8, 2, 4, 2, 31, 31, 8, 8, mask_kind)
    got = SPARSE(q, k, v, m, 0.35, causal, 0.0, spec("vslash:vertical=64,slash=1,last=8,sinks=1,local=1,block=8"))
    assert (got - attention_reference(q, k, v, m, 0.35, causal)).abs().max() <= TOL


@settings(max_examples=30, **SETTINGS)
@given(p=problems(heads=[(2, 2), (2, 1), (4, 4), (4, 2), (4, 1)]))
def test_head_mix(p):
    """heads[0-1] exact, every other head windowed."""
    text = "heads[0-1]=fused; heads[*]=window:2,block=4"
    q, k = p["q"], p["k"]
    b, hq, sq, sk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    full = causal_keep(sq, sk) if p["causal"] else torch.ones(sq, sk, dtype=torch.bool)
    keep = torch.empty(b, hq, sq, sk, dtype=torch.bool)
    for h in range(hq):
        keep[:, h] = full if h < 2 else window_keep(sq, sk, 2, None, 0, p["causal"])
    _run(p, text, keep)


@pytest.mark.parametrize("causal", [False, True])
def test_head_mix_with_topk_and_window_groups(causal):
    q, k, v, m = make_problem(4, 2, 4, 2, 21, 21, 8, 8, "additive")
    text = "heads[1]=topk:blocks=1,block=4,local=0,sinks=1; heads[3]=fused; heads[*]=window:3,sinks=2,block=8"
    tk = topk_keep(q, k, 0.35, causal, 1, 4, 0, 1)
    keep = torch.empty(2, 4, 21, 21, dtype=torch.bool)
    keep[:, 0] = keep[:, 2] = window_keep(21, 21, 3, None, 2, causal)
    keep[:, 1] = tk[:, 1]
    keep[:, 3] = causal_keep(21, 21) if causal else True
    assert torch.equal(sparse_keep_mask(q, k, spec(text), 0.35, causal), keep)
    check_op(q, k, v, m, 0.35, causal, text, keep)


# ----------------------------------------------------------------------------- rows with nothing to attend


@pytest.mark.parametrize("text", ["window:2,block=4", "blocksparse:block=4,local=0,global=0",
                                  "heads[0]=fused; heads[*]=window:2,block=4"])
def test_fully_masked_rows_bool_give_zeros(text):
    q, k, v, _ = make_problem(1, 2, 2, 2, 13, 13, 8, 8, "none")
    keep = torch.ones(2, 1, 1, 13, dtype=torch.bool)
    keep[1, ..., 5:] = False  # batch 1: queries 8.. see no key in a window of 2
    keep[0] = False  # batch 0: every key padded
    out = SPARSE(q, k, v, keep, 0.35, False, 0.0, spec(text))
    assert torch.isfinite(out).all()
    assert out[0].abs().max() == 0
    assert out[1, 1:, 8:].abs().max() == 0  # windowed heads


@pytest.mark.parametrize("text", ["window:2,block=4", "blocksparse:block=4,local=0,global=0"])
def test_fully_masked_rows_additive_neg_inf_give_zeros(text):
    q, k, v, _ = make_problem(1, 2, 2, 2, 13, 13, 8, 8, "none")
    bias = torch.zeros(2, 1, 1, 13)
    bias[1, ..., 5:] = float("-inf")  # batch 1: queries 8.. have only -inf keys in their window
    out = SPARSE(q, k, v, bias, 0.35, False, 0.0, spec(text))
    keep = sparse_keep_mask(q, k, spec(text), 0.35, False)
    ref = oracle(q, k, v, keep, bias, 0.35)
    assert torch.isfinite(ref).all()
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------- covering patterns are exact


COVERING = ["window:64", "window:40,right=40,block=8", "window:0,sinks=40,block=16",
            "blocksparse:block=4,local=10,global=0", "blocksparse:block=8,local=0,global=5",
            "topk:blocks=64,block=8,local=0,sinks=0", "heads[0]=fused; heads[*]=window:64,block=16"]


@pytest.mark.parametrize("text", COVERING)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive", "pad-bool", "pad-1e30"])
def test_covering_pattern_is_dense(text, causal, heads, mask_kind):
    q, k, v, m = make_problem(2, 2, *heads, 37, 37, 8, 16, mask_kind)
    got = SPARSE(q, k, v, m, 0.35, causal, 0.0, spec(text))
    ref = attention_reference(q, k, v, m, 0.35, causal)
    assert torch.isfinite(got).all()
    assert (got - ref).abs().max() <= TOL


def test_covering_neighborhood_is_dense():
    q, k, v, m = make_problem(2, 2, 4, 2, 21, 21, 8, 8, "pad-bool")
    got = SPARSE(q, k, v, m, 0.35, False, 0.0, spec("neighborhood:9x9,grid=4x5,prefix=1,block=8"))
    assert (got - attention_reference(q, k, v, m, 0.35, False)).abs().max() <= TOL


@pytest.mark.parametrize("kind,impl,policy", [
    ("llama", "eager", "window:64"), ("gpt2", "eager", "window:64"), ("bert", "eager", "window:64"),
    ("vit", "eager", "window:64"), ("llama", "sdpa", "window:64"), ("bert", "sdpa", "window:64"),
    ("llama", "eager", "heads[0]=fused; heads[*]=window:64,block=8"), ("gpt2", "sdpa", "topk:blocks=8,block=4"),
    ("bert", "eager", "blocksparse:block=4,local=1"), ("vit", "sdpa", "neighborhood:5x5"),
])
def test_covering_pattern_on_zoo_model_is_exact(kind, impl, policy):
    """Seq 7 (ViT: 16 patches + CLS): a pattern covering the sequence gives the model's outputs."""
    z = hf_model(kind, impl)
    cm = compiler.compile(z.model, z.args, policy, example_kwargs=z.kwargs)
    assert [(s.variant, s.status) for s in cm.report.sites] == [(spec(policy), "rewritten")] * z.attention_blocks
    assert sum(n.target == SPARSE for n in cm.exported_program.graph.nodes) == z.attention_blocks
    with torch.no_grad():
        ref = z.model(*z.args, **hf_defaults(z.model, dict(z.kwargs)))
    assert max_err(ref, cm(*z.args, **z.kwargs)) <= TOL
    assert all(s.cosine_similarity == pytest.approx(1.0, abs=1e-6) for s in cm.report.sites)
    assert cm.report.fidelity.max_abs_error <= TOL


# ----------------------------------------------------------------------------- cost


def _block_any(keep: torch.Tensor, block: int) -> torch.Tensor:
    """[.., Sq, Sk] pairs -> [.., nqb, nkb] blocks holding at least one kept pair."""
    sq, sk = keep.shape[-2:]
    nqb, nkb = -(-sq // block), -(-sk // block)
    pad = torch.nn.functional.pad(keep, (0, nkb * block - sk, 0, nqb * block - sq))
    return pad.reshape(*keep.shape[:-2], nqb, block, nkb, block).any(-1).any(-2)


@settings(max_examples=40, **SETTINGS)
@given(seq=st.integers(1, 40), causal=st.booleans(), block=st.sampled_from([4, 8, 16]),
       kind=st.sampled_from(["window", "blocksparse", "topk"]), a=st.integers(0, 9), c=st.integers(0, 3))
def test_computed_pairs_are_kept_blocks_times_block_squared(seq, causal, block, kind, a, c):
    q, k, _, _ = make_problem(a, 2, 4, 2, seq, seq, 8, 8, "none")
    if kind == "window":
        text = f"window:{a},sinks={c},block={block}"
        keep = window_keep(seq, seq, a, None, c, causal)
    elif kind == "blocksparse":
        text = f"blocksparse:block={block},local={c % 2},global={c // 2},stride={a % 4}"
        keep = blocksparse_keep(seq, seq, block, c % 2, c // 2, a % 4, causal)
    else:
        text = f"topk:blocks={1 + a % 3},block={block},local={c % 2},sinks={c // 2}"
        keep = topk_keep(q, k, 0.35, causal, 1 + a % 3, block, c % 2, c // 2)
    kept_blocks = _block_any(keep, block).double().sum((-2, -1)).mean()
    got = sparse_computed_pairs(q, k, spec(text), 0.35, causal)
    assert got == pytest.approx(float(kept_blocks) * block * block)


def test_window_reads_no_block_without_kept_pairs_when_fewer_queries_than_keys():
    q, k, _, _ = make_problem(0, 1, 1, 1, 20, 40, 8, 8, "none")
    keep = window_keep(20, 40, 2, None, 0, False)
    got = sparse_computed_pairs(q, k, spec("window:2,block=16"), 0.35, False)
    assert got == float(_block_any(keep, 16).sum()) * 16 * 16  # 4 blocks; the layout reads 5


@pytest.mark.parametrize("causal", [False, True])
def test_computed_pairs_of_head_mix_average_over_heads(causal):
    q, k, _, _ = make_problem(0, 1, 4, 2, 24, 24, 8, 8, "none")
    text = "heads[0]=fused; heads[*]=window:4,block=8"
    windowed = float(_block_any(window_keep(24, 24, 4, None, 0, causal), 8).sum()) * 64
    exact = causal_pairs(24, 24) if causal else 24 * 24
    got = sparse_computed_pairs(q, k, spec(text), 0.35, causal)
    assert got == pytest.approx((exact + 3 * windowed) / 4)


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def test_reference_cost_scales_with_kept_blocks():
    """window:64 at block 32, causal: doubling the sequence doubles the sparse work (3 blocks
    per query block) while dense attention quadruples."""
    s = spec("window:64,block=32")
    b, h, d = 1, 2, 16
    sparse, dense = {}, {}
    for n in (256, 512):
        q, k, v, _ = make_problem(n, b, h, h, n, n, d, d, "none")
        sparse[n] = _flops(lambda: sparse_attention_reference(q, k, v, None, 0.25, True, 0.0, s))
        # Dense as a model writes it: every score materialised (a keep-all mask takes the math path).
        dense[n] = _flops(lambda: oracle(q, k, v, torch.ones(1, 1, n, n, dtype=torch.bool), None, 0.25, causal=True))
        # Every score the blocked reference computes is a kept block or a padding slot of one.
        pairs = sparse_computed_pairs(q, k, s, 0.25, True)
        blocks = _block_any(window_keep(n, n, 64, None, 0, True), 32)
        assert pairs == float(blocks.sum()) * 32 * 32
        per_pair = b * h * (2 * d + 2 * d)
        nqb, widest = n // 32, int(blocks.sum(-1).max())
        assert pairs * per_pair <= sparse[n] <= nqb * widest * 32 * 32 * per_pair
        assert sparse[n] < dense[n]
    assert 1.7 <= sparse[512] / sparse[256] <= 2.3
    assert dense[512] / dense[256] == pytest.approx(4.0, rel=0.05)


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("text", ["window:3,sinks=1,block=4", "topk:blocks=1,block=4",
                                  "heads[0-1]=fused; heads[*]=blocksparse:block=4,local=0"])
def test_survives_export_save_load(tmp_path, text):
    s = spec(text)

    class M(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return SPARSE(q, k, v, mask, 0.25, True, 0.0, s)

    q, k, v, m = make_problem(0, 2, 4, 2, 11, 11, 8, 8, "pad-bool")
    args = (q, k, v, m)
    ep = torch.export.export(M(), args)
    torch.export.save(ep, tmp_path / "m.pt2")
    back = torch.export.load(tmp_path / "m.pt2")
    nodes = [n for n in back.graph.nodes if n.target == SPARSE]
    assert len(nodes) == 1 and s in nodes[0].args
    got = back.module()(*args)
    assert torch.equal(got, sparse_attention_reference(q, k, v, m, 0.25, True, 0.0, s))
    assert torch.isfinite(got).all()
