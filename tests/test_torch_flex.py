"""The torch backend's FlexAttention lowering against the eager sparse reference.

The lowering's meaning is its BlockMask: full blocks attend every real pair, partial blocks
the pairs their mask_mod keeps, other blocks nothing (that is what the compiled kernel runs).
On the hypothesis-generated layouts of test_sparse, that set must be the reference's pairs, and
FlexAttention's output must equal the reference op's.
"""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import compiler
from backends.torch_flex import FLEX_SPARSE, block_mask, flex_sparse
from compiler.reference.sparse_ops import head_groups, kv_head_map, layout_for, sparse_attention_reference, sparse_keep_mask
from compiler.variants.language import parse_variant
from test_sparse import SETTINGS, problems

pytestmark = pytest.mark.usefixtures("one_thread")


def _kernel_pairs(bm, b, hq, sq, sk):
    """The pairs a compiled FlexAttention kernel attends under ``bm``, as a dense mask."""
    bs = bm.BLOCK_SIZE[0]
    nqb, nkb = -(-sq // bs), -(-sk // bs)

    def blocks(num, idx):
        out = torch.zeros(*num.shape, nkb + 1, dtype=torch.bool)
        cols = torch.arange(idx.shape[-1])
        ids = torch.where(cols < num.unsqueeze(-1), idx.long(), nkb)
        return out.scatter_(-1, ids, True)[..., :nkb]

    def dense(x):
        x = x.expand(b, hq, nqb, nkb)
        return x.repeat_interleave(bs, -2).repeat_interleave(bs, -1)[..., :sq, :sk]

    full = dense(blocks(bm.full_kv_num_blocks, bm.full_kv_indices)) if bm.full_kv_num_blocks is not None else False
    partial = dense(blocks(bm.kv_num_blocks, bm.kv_indices))
    bi, h = torch.arange(b).view(-1, 1, 1, 1), torch.arange(hq).view(1, -1, 1, 1)
    i, j = torch.arange(sq).view(1, 1, -1, 1), torch.arange(sk).view(1, 1, 1, -1)
    mod = bm.mask_mod(bi, h, i, j).expand(b, hq, sq, sk)
    return full | (partial & mod)


def _standalone_pairs(layout, b, hq, sq, sk, causal, m):
    bm, _ = block_mask(layout, b, hq, sq, sk, causal, m, torch.device("cpu"), standalone=True)
    bi, h = torch.arange(b).view(-1, 1, 1, 1), torch.arange(hq).view(1, -1, 1, 1)
    i, j = torch.arange(sq).view(1, 1, -1, 1), torch.arange(sk).view(1, 1, 1, -1)
    return bm.mask_mod(bi, h, i, j).expand(b, hq, sq, sk)


def _reference_pairs(q, k, mask, scale, causal, text):
    keep = sparse_keep_mask(q, k, text, scale, causal)
    if mask is not None:
        m = mask.reshape(*[1] * (4 - mask.dim()), *mask.shape)
        keep = keep & (m if m.dtype == torch.bool else m > float("-inf"))
    return keep


def _check(p, text, softcap=0.0):
    text = parse_variant(text).text
    q, k, v, m, scale, causal = p["q"], p["k"], p["v"], p["mask"], p["scale"], p["causal"]
    b, hq, sq, _ = q.shape
    sk = k.shape[2]
    pattern = head_groups(parse_variant(text).pattern, hq)[0][1]
    layout = layout_for(pattern, q, k, scale, causal, kv_head_map(hq, k.shape[1]))
    want = _reference_pairs(q, k, m, scale, causal, text)
    for standalone in (True, False):  # eager's mask_mod, and the compiled kernel's (no block lookup)
        bm, _ = block_mask(layout, b, hq, sq, sk, causal, m, q.device, standalone=standalone)
        assert torch.equal(_kernel_pairs(bm, b, hq, sq, sk), want), (text, standalone)
        # Inference builds no q-side lists (a backward pass's; sorting them was 45% of a top-k call at 32k).
        assert bm.q_num_blocks is None and bm.full_q_num_blocks is None
    # Eager FlexAttention evaluates the mask_mod on every pair: standalone, it is the layout.
    assert torch.equal(_standalone_pairs(layout, b, hq, sq, sk, causal, m), want), text
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention warns that it is not compiled
        got = flex_sparse(q, k, v, m, scale, causal, softcap, text, compiled=False)
    ref = sparse_attention_reference(q, k, v, m, scale, causal, softcap, text)
    assert torch.isfinite(got).all() and float((got - ref).abs().max()) <= 1e-5, text


@settings(max_examples=25, **SETTINGS)
@given(p=problems(), left=st.integers(0, 20), right=st.one_of(st.none(), st.integers(0, 10)),
       sinks=st.integers(0, 5), block=st.sampled_from([4, 8, 16]), softcap=st.sampled_from([0.0, 5.0]))
def test_window_lowering(p, left, right, sinks, block, softcap):
    _check(p, f"window:{left},right={'auto' if right is None else right},sinks={sinks},block={block}", softcap)


@settings(max_examples=20, **SETTINGS)
@given(p=problems(), block=st.sampled_from([4, 8]), local=st.integers(0, 2), glob=st.integers(0, 2),
       stride=st.integers(0, 3))
def test_blocksparse_lowering(p, block, local, glob, stride):
    _check(p, f"blocksparse:block={block},local={local},global={glob},stride={stride}")


@settings(max_examples=20, **SETTINGS)
@given(p=problems(), blocks=st.integers(1, 3), block=st.sampled_from([4, 8]), local=st.integers(0, 1),
       sinks=st.integers(0, 1), mass=st.sampled_from([0.0, 0.6]))
def test_topk_lowering(p, blocks, block, local, sinks, mass):
    _check(p, f"topk:blocks={blocks},block={block},local={local},sinks={sinks},mass={mass}")


def test_head_mix_is_left_to_the_reference():
    q = torch.randn(1, 2, 8, 4)
    assert flex_sparse(q, q, q, None, 0.5, True, 0.0, parse_variant("heads[0]=window:2,block=4;heads[*]=fused").text,
                       compiled=False) is None


def test_torch_backend_runs_the_lowering_op():
    class Causal(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    q = torch.randn(1, 2, 64, 8)
    cm = compiler.compile(Causal(), (q, q, q), "window:16,block=16")
    assert FLEX_SPARSE in [n.target for n in cm._run.module.graph.nodes]
    # Small sites run the reference: the same numbers as the exported program.
    assert torch.equal(cm(q, q, q), cm.exported_program.module()(q, q, q))


@pytest.mark.parametrize("text", ["window:100,sinks:4,block=32", "topk:blocks=2,block=32"])
def test_compiled_flex_equals_reference(text):
    """Inductor's kernel itself (seconds to compile, once per shape)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 300, 32, generator=g) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    text = parse_variant(text).text
    got = flex_sparse(q, k, v, None, 0.2, True, 0.0, text, compiled=True)
    assert float((got - sparse_attention_reference(q, k, v, None, 0.2, True, 0.0, text)).abs().max()) <= 1e-5


def test_past_the_recompile_limit_the_bounded_reference_runs(monkeypatch):
    """Each layout is a recompile of flex_attention; past dynamo's limit torch would silently run
    flex's unfused fallback (the whole score matrix in memory). The op must instead say so once
    and run the bounded-memory reference, with the same numbers."""
    import backends.torch_flex as tf

    monkeypatch.setattr(tf, "RECOMPILE_LIMIT", 1)
    monkeypatch.setattr(tf, "_failed", None)
    monkeypatch.setenv("ATTNFORGE_FLEX", "1")
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=g) for _ in range(3))
    outs = []
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for text in ("window:8,block=16", "window:24,block=16", "window:40,sinks:4,block=16"):
            spec = parse_variant(text).text
            outs.append((FLEX_SPARSE(q, k, v, None, 0.25, True, 0.0, spec), spec))
    assert any("FlexAttention lowering unavailable" in str(w.message) for w in seen)
    assert tf._failed is not None and "recompile" in tf._failed.lower()
    for got, spec in outs:
        want = sparse_attention_reference(q, k, v, None, 0.25, True, 0.0, spec)
        assert float((got - want).abs().max()) <= 1e-5
