"""attnforge::attention against SDPA, and survival through export save/load."""

import math

import pytest
import torch
import torch.nn.functional as F

import compiler  # noqa: F401
from compiler.ir.ops import attention_reference, causal_pairs

attention = torch.ops.attnforge.attention.default


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_matches_sdpa(hq, hkv, causal, mask):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, hq, 5, 8, generator=g)
    k = torch.randn(2, hkv, 9, 8, generator=g)
    v = torch.randn(2, hkv, 9, 16, generator=g)
    m = None
    if mask == "bool":
        m = torch.rand(2, 1, 5, 9, generator=g) > 0.3
        m[..., 0] = True  # SDPA gives NaN on fully masked rows; keep one key per row
    elif mask == "float":
        m = torch.randn(2, hq, 5, 9, generator=g)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal and m is None,
                                         scale=0.3, enable_gqa=hq != hkv)
    if causal and m is not None:
        pytest.skip("SDPA takes either a mask or is_causal")
    got = attention(q, k, v, m, 0.3, causal, 0.0)
    assert (got - ref).abs().max() <= 1e-5


def test_fully_masked_rows_are_zero_not_nan():
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    m = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    m[..., 1, :] = False
    out = attention(q, k, v, m, 0.5, False, 0.0)
    assert torch.isfinite(out).all() and out[:, :, 1].abs().max() == 0


def test_softcap():
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    s = torch.tanh((q @ k.transpose(-1, -2)) * 0.5 / 2.0) * 2.0
    ref = torch.softmax(s, -1) @ v
    assert (attention(q, k, v, None, 0.5, False, 2.0) - ref).abs().max() <= 1e-6


def test_causal_pairs():
    for sq, sk in [(5, 5), (3, 7), (7, 3)]:
        assert causal_pairs(sq, sk) == int(torch.ones(sq, sk).tril().sum())


def test_survives_export_save_load(tmp_path):
    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return attention(q, k, v, None, 0.25, True, 0.0)

    args = (torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8))
    ep = torch.export.export(M(), args)
    torch.export.save(ep, tmp_path / "m.pt2")
    back = torch.export.load(tmp_path / "m.pt2")
    assert any(n.target == attention for n in back.graph.nodes)
    assert torch.equal(back.module()(*args), attention_reference(*args, None, 0.25, True))
    assert not math.isnan(float(back.module()(*args).sum()))
