"""Triton linear attention (``backends.triton_linear``) against the PyTorch reference.

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set before
triton is imported), so shapes stay tiny; they are chosen to cover what the kernels tile and
mask: lengths that are not multiples of the chunk, Sq != Sk, F larger than one F tile
(``taylor`` at D=16: F = 273), Dv over one Dv tile, key masks, GQA and the hybrid.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

pytest.importorskip("triton")
if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from backends.triton_linear import linear_attention, linear_terms  # noqa: E402
from compiler.reference.linear_ops import _linear_terms, linear_attention_reference  # noqa: E402
from compiler.variants.language import parse_variant  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
TOL = 1e-4  # relative to the largest reference value: fp32 sums of up to a few hundred terms


def spec(text: str) -> str:
    return parse_variant(text).text


def check(got, ref, tol=TOL):
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert torch.isfinite(got).all(), "Triton linear attention produced NaN/inf"
    size = float(ref.abs().max())
    assert size > 0, "a vacuous comparison: the reference is all zeros"
    err = float((got.float() - ref.float()).abs().max())
    assert err <= tol * size, f"max abs error {err:.3e} over output scale {size:.3e}"


def problem(seed, b=2, hq=2, hkv=2, sq=37, sk=37, d=16, dv=16, mask=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g)
    k = torch.randn(b, hkv, sk, d, generator=g)
    v = torch.randn(b, hkv, sk, dv, generator=g)
    m = None
    if mask == "bool":  # key padding [B, 1, 1, Sk]: the last batch drops its last keys
        m = torch.ones(b, 1, 1, sk, dtype=torch.bool)
        m[-1, ..., sk - 5:] = False
    elif mask == "additive":  # [B, 1, 1, Sk] bias, -inf = padded
        m = torch.randn(b, 1, 1, sk, generator=g)
        m[-1, ..., sk - 3:] = float("-inf")
    return [t.to(DEVICE) for t in (q, k, v)] + [None if m is None else m.to(DEVICE)]


def both(q, k, v, m, causal, text, scale=None):
    """(Triton, reference) outputs of one call."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = spec(text)
    return (linear_attention(q, k, v, m, scale, causal, s),
            linear_attention_reference(q, k, v, m, scale, causal, s))


# ----------------------------------------------------------------------------- linear terms

@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("sq,sk,nf,dv,chunk", [
    (37, 37, 16, 16, 16),  # one F tile, a partial last chunk
    (50, 50, 273, 24, 32),  # F over several tiles with a partial one, Dv not a power of two
    (20, 45, 40, 70, 16),  # more keys than queries; Dv over two tiles
    (45, 20, 16, 16, 32),  # more queries than keys
])
def test_terms_match_reference(causal, sq, sk, nf, dv, chunk):
    g = torch.Generator().manual_seed(sq * sk + nf)
    fq = torch.rand(2, 2, sq, nf, generator=g)
    fk = torch.rand(2, 2, sk, nf, generator=g)
    fk[1, :, sk - 4:] = 0.0  # key-weighted features of padded keys
    v = torch.randn(2, 2, sk, dv, generator=g)
    fq, fk, v = fq.to(DEVICE), fk.to(DEVICE), v.to(DEVICE)
    num, den = linear_terms(fq, fk, v, causal, chunk)
    ref_num, ref_den = _linear_terms(fq, fk, v, causal, chunk)
    check(num, ref_num)
    check(den, ref_den)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_terms_of_empty_sequences(causal):
    f = torch.rand(1, 1, 5, 16, device=DEVICE)
    empty = f[:, :, :0]
    num, den = linear_terms(empty, f, f, causal, 16)
    assert num.shape == (1, 1, 0, 16) and den.shape == (1, 1, 0, 1)
    num, den = linear_terms(f, empty, empty, causal, 16)
    assert num.shape == (1, 1, 5, 16) and not num.any() and not den.any()


# ----------------------------------------------------------------------------- full op

@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("text,seq", [
    ("linear:elu,chunk=16", 37),
    ("linear:relu,chunk=32", 50),
    ("linear:map=favor,features=32,chunk=16", 50),
    ("linear:map=taylor,chunk=32", 37),  # D=16: F = 273
])
def test_maps_match_reference(causal, text, seq):
    q, k, v, m = problem(1, sq=seq, sk=seq)
    check(*both(q, k, v, m, causal, text))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("sq,sk", [(20, 45), (45, 20)])
def test_uneven_query_and_key_lengths(causal, sq, sk):
    q, k, v, m = problem(2, sq=sq, sk=sk, dv=24)
    check(*both(q, k, v, m, causal, "linear:map=taylor,chunk=16"))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("mask", ["bool", "additive"])
def test_key_masks(causal, mask):
    q, k, v, m = problem(3, sq=37, sk=37, mask=mask)
    got, ref = both(q, k, v, m, causal, "linear:elu,chunk=16")
    check(got, ref)
    # A masked key must change nothing when its value changes.
    v2 = v.clone()
    v2[-1, :, -3:] += 100.0
    check(linear_attention(q, k, v2, m, 0.25, causal, spec("linear:elu,chunk=16")),
          linear_attention(q, k, v, m, 0.25, causal, spec("linear:elu,chunk=16")))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_grouped_query_heads(causal):
    q, k, v, m = problem(4, b=1, hq=2, hkv=1, sq=37, sk=37)
    check(*both(q, k, v, m, causal, "linear:map=favor,features=32,chunk=16"))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_hybrid_matches_reference(causal):
    q, k, v, m = problem(5, sq=37, sk=37, mask="bool")
    check(*both(q, k, v, m, causal, "hybrid:window=8,map=taylor,chunk=16"))


def test_output_takes_the_value_dtype():
    q, k, v, m = problem(6, b=1, hq=1, hkv=1, sq=20, sk=20)
    got, ref = both(q.half(), k.half(), v.half(), m, True, "linear:elu,chunk=16")
    assert got.dtype == torch.float16
    check(got.float(), ref.float(), tol=2e-3)  # fp32 results a rounding apart may round apart in fp16
