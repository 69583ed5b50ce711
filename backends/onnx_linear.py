"""ONNX lowering of ``attnforge::linear_attention`` in standard ops.

The same arithmetic as ``compiler.reference.linear_ops``: feature maps, then the ``phi(K)^T V`` summary
(bidirectional) or chunked prefix sums with an exclusive ``CumSum`` over chunk states (causal),
so the graph has no loop and every size stays dynamic. The hybrid adds the exact window through
the sparse lowering's gathered layout and shares one normalizer with the linear part. ORT's com.microsoft
``LinearAttention`` has no feature map or normalizer inside; with the maps applied outside,
its plain update is the ``num`` half of what this graph computes in two matmuls, so the
standard-op form is kept: it runs on every execution provider.
"""

from __future__ import annotations

import math

from onnxscript import ir
from onnxscript import opset23 as op

from backends.onnx_build import at_rank4, ceil_div, mask_dims4, dim, ints, pad_axis, static_dim, to_float32
from compiler.ir.errors import BackendError
from backends.onnx_sparse import gather_layout
from compiler.reference.linear_ops import _EPS, _hybrid_window, orthogonal_features
from compiler.variants.registry import feature
from compiler.variants.language import Hybrid, parse_variant


def _ones_column(x):
    """Ones of x's shape with a last axis of 1: [..., F] -> [..., 1]."""
    return op.Expand(op.Constant(value_float=1.0), op.Concat(op.Shape(x, end=-1), ints(1), axis=0))


def _features(x, p, scale: float, stabilize: str, head_dim):
    """(phi, log_offset or None), as ``compiler.reference.linear_ops.features``."""
    x = op.Mul(to_float32(x), op.Constant(value_float=math.sqrt(scale)))
    if p.map == "elu":
        # elu(x) + 1 = relu(x) + exp(x - relu(x)): ORT's Elu is the slow one (13 of 82 ms at 16k
        # tokens, 8 heads; its Relu, Sub and Exp took 5 ms together).
        r = op.Relu(x)
        return op.Add(op.Exp(op.Sub(x, r)), r), None
    if p.map == "relu":
        return op.Relu(x), None
    if p.map == "taylor":
        ones = _ones_column(x)
        outer = op.Mul(op.Unsqueeze(x, ints(-1)), op.Unsqueeze(x, ints(-2)))
        second = op.Div(op.Reshape(outer, ints(0, 0, 0, -1)), op.Constant(value_float=math.sqrt(2.0)))
        return op.Concat(ones, x, second, axis=-1), None
    if head_dim is None:
        raise BackendError("favor features need a fixed head size to export")
    w = orthogonal_features(p.features, head_dim, p.seed)
    proj = op.Constant(value=ir.tensor(w.T.contiguous().numpy()))  # [D, F]
    h = op.Sub(op.MatMul(x, proj),
               op.Div(op.ReduceSum(op.Mul(x, x), ints(-1), keepdims=1), op.Constant(value_float=2.0)))
    off = op.ReduceMax(h, ints(-1) if stabilize == "row" else ints(-2, -1), keepdims=1)
    return op.Div(op.Exp(op.Sub(h, off)), op.Constant(value_float=math.sqrt(p.features))), off


def _key_weights(mask):
    """A key mask as per-key weights [B|1, H|1, Sk, 1]."""
    rows = mask_dims4(mask)[2]
    mask = at_rank4(mask)
    if rows != 1:
        raise BackendError("linear attention can only apply a key mask (one row for every query); this site's "
                           "mask has a row per query")
    if mask.dtype == ir.DataType.BOOL:
        w = op.Cast(mask, to=ir.DataType.FLOAT)
    else:
        w = op.Exp(op.Min(to_float32(mask), op.Constant(value_float=80.0)))
    return op.Transpose(w, perm=[0, 1, 3, 2])


def _terms(fq, fk, v, causal: bool, chunk: int, sizes: tuple = (None, None)):
    """(numerator [B,H,Sq,Dv], denominator [B,H,Sq,1]) of sum_j phi(q_i).phi(k_j) v_j; ``sizes``:
    (Sq, Sk) where the export knows them as numbers, else None."""
    if not causal:
        kv = op.MatMul(op.Transpose(fk, perm=[0, 1, 3, 2]), v)
        z = op.ReduceSum(fk, ints(-2), keepdims=1)
        return op.MatMul(fq, kv), op.ReduceSum(op.Mul(fq, z), ints(-1), keepdims=1)
    sq, sk = dim(fq, 2), dim(fk, 2)
    # Equal lengths known at export to fill whole chunks need no Pad (a copy of each operand).
    whole = None not in sizes and sizes[0] == sizes[1] and sizes[0] % chunk == 0
    length = None if whole else op.Mul(ceil_div(op.Max(sq, sk), chunk), ints(chunk))

    def chunks(x, s):  # padded rows have zero features, so they add nothing
        x = x if whole else pad_axis(x, 2, op.Sub(length, s), 4)
        return op.Reshape(x, op.Concat(ints(0, 0, -1, chunk), dim(x, 3), axis=0))

    # A ones column on v carries the normalizer through the same products (its sums are the
    # denominator): no separate row sums of the [C, C] chunk scores or of q times the key sums.
    dv = dim(v, 3)
    cq, ck, cv = chunks(fq, sq), chunks(fk, sk), chunks(op.Concat(v, _ones_column(v), axis=-1), sk)
    kv = op.MatMul(op.Transpose(ck, perm=[0, 1, 2, 4, 3]), cv)  # [B, H, n, F, Dv + 1]
    state = op.CumSum(kv, ints(2), exclusive=1)  # what earlier chunks contribute
    intra = op.Trilu(op.MatMul(cq, op.Transpose(ck, perm=[0, 1, 2, 4, 3])), upper=0)  # causal inside a chunk
    out = op.Add(op.MatMul(intra, cv), op.MatMul(cq, state))  # [B, H, n, C, Dv + 1]
    out = op.Reshape(out, op.Concat(ints(0, 0, -1), op.Add(dv, ints(1)), axis=0))
    if not whole:
        out = op.Slice(out, ints(0), sq, ints(2))
    return op.Slice(out, ints(0), dv, ints(3)), op.Slice(out, dv, op.Add(dv, ints(1)), ints(3))


def linear_translation(q, k, v, mask=None, scale=1.0, is_causal=False, spec=""):
    """``attnforge::linear_attention`` -> feature maps and summaries in standard ops."""
    p = parse_variant(spec).pattern
    hq, hkv = static_dim(q, 1), static_dim(k, 1)
    if hq is None or hkv is None:
        raise BackendError("linear attention needs a fixed number of heads to export")
    sizes = static_dim(q, 2), static_dim(k, 2)
    head_dim = static_dim(q, 3)
    w = None if mask is None else _key_weights(mask)
    n = _head_groups(p, hq, sizes, static_dim(v, 3), is_causal, mask, static_dim(q, 0) or 1)
    per = hq // n

    def kv_heads(x, first: int):  # the KV heads of query heads [first, first + per), in order
        return op.Gather(x, ints(*[h // (hq // hkv) for h in range(first, first + per)]), axis=1)

    if n == 1:
        if hkv != hq:
            k, v = kv_heads(k, 0), kv_heads(v, 0)
        return _linear(q, k, v, w, p, scale, is_causal, sizes, head_dim, mask)
    # One chain of nodes per group of heads, so a group's intermediates stay in cache.
    qs = op.Split(q, axis=1, num_outputs=n)
    if hkv == hq:
        ks, vs = op.Split(k, axis=1, num_outputs=n), op.Split(v, axis=1, num_outputs=n)
    else:
        ks, vs = [kv_heads(k, i * per) for i in range(n)], [kv_heads(v, i * per) for i in range(n)]
    ws = [w] * n if w is None or mask_dims4(mask)[1] == 1 else op.Split(w, axis=1, num_outputs=n)
    outs = [_linear(*args, p, scale, is_causal, sizes, head_dim) for args in zip(qs, ks, vs, ws)]
    return op.Concat(*outs, axis=1)


GROUP_BYTES = 4 << 20  # a group's [B, heads, S, Dv + 1] fp32 sums: a few MiB stay in cache


def _head_groups(p, hq: int, sizes: tuple, dv, causal: bool, mask, batch: int) -> int:
    """How many groups of heads a causal site's chunked sums run in, each its own chain of nodes.

    ORT runs each node over the whole tensor before the next, so every [B, H, S, F] intermediate
    of the chunk products (a dozen of them, 34 MB each at 16k tokens, 8 heads) went to memory
    and back; per head they stay in cache and the MatMuls run twice as fast (16k tokens, 8
    heads: 61 -> 48 ms a call). Groups hold whole heads, equal in number (one Split), with
    about ``GROUP_BYTES`` each (a batch of unknown size counted as 1). One group where a length,
    the value size or the mask's heads are not known at export, on bidirectional sites (their
    sums are one [F, Dv] summary a head) and on the hybrid (its exact window runs on the whole
    gathered layout)."""
    s = max(sizes) if None not in sizes else None
    mask_heads = 1 if mask is None else mask_dims4(mask)[1]
    if not causal or s is None or dv is None or mask_heads is None or feature(p, "exact_window") is not None:
        return 1
    per = max(1, GROUP_BYTES // (batch * s * (dv + 1) * 4))
    return hq // max(d for d in range(1, hq + 1) if hq % d == 0 and d <= per)


def _linear(q, k, v, w, p, scale: float, causal: bool, sizes: tuple, head_dim, mask=None):
    """Linear attention of these heads: ``w`` the key weights (or None); ``mask`` only for the hybrid's window."""
    fq, oq = _features(q, p, scale, "row", head_dim)
    fk, ok = _features(k, p, scale, "all", head_dim)
    if w is not None:
        fk = op.Mul(fk, w)
    vf = to_float32(v)
    num, den = _terms(fq, fk, vf, causal, p.chunk, sizes)
    if feature(p, "exact_window") is not None:
        num, den = _hybrid(p, q, k, vf, mask, fq, oq, fk, ok, num, den, scale, causal, sizes)
    return op.CastLike(op.Div(num, op.Max(den, op.Constant(value_float=_EPS))), v)


def _hybrid(p: Hybrid, q, k, vf, mask, fq, oq, fkw, ok, lin_num, lin_den, scale: float, causal: bool, sizes: tuple):
    """Exact softmax inside the window, the linear estimate outside it, one normalizer, as
    ``compiler.reference.linear_ops._hybrid``: everything is divided by ``exp(m_i)``, the row max of the
    window's scores, and the linear part is rescaled by ``exp(offset_q + offset_k - m_i)``."""
    g = gather_layout(q, k, vf, mask, _hybrid_window(p, causal), scale, causal, sizes)
    zero, ninf = op.Constant(value_float=0.0), op.Constant(value_float=float("-inf"))
    scores = op.MatMul(op.Mul(to_float32(g.q5), op.Constant(value_float=scale)),
                       op.Transpose(to_float32(g.kg), perm=[0, 1, 2, 4, 3]))  # [B, H, nqb, bs, K*bs]
    if g.bias is not None:
        scores = op.Add(scores, g.bias)
    scores = op.Where(g.keep, scores, ninf)
    m = op.Max(op.ReduceMax(scores, ints(-1), keepdims=1), op.Constant(value_float=-1e30))  # empty rows stay finite
    e = op.Exp(op.Sub(scores, m))
    ex_num, ex_den = op.MatMul(e, g.vg), op.ReduceSum(e, ints(-1), keepdims=1)
    # The linear terms of the window's own pairs, to take them out of the all-keys sums.
    kern = op.Where(g.keep, op.MatMul(g.rows(fq), op.Transpose(g.gather(fkw), perm=[0, 1, 2, 4, 3])), zero)
    band_num, band_den = op.MatMul(kern, g.vg), op.ReduceSum(kern, ints(-1), keepdims=1)
    log_factor = op.Neg(g.flat(m))
    for off in (oq, ok):
        if off is not None:
            log_factor = op.Add(log_factor, off)
    factor = op.Exp(op.Min(log_factor, op.Constant(value_float=80.0)))
    num = op.Add(g.flat(ex_num), op.Mul(factor, op.Sub(lin_num, g.flat(band_num))))
    den = op.Add(g.flat(ex_den), op.Mul(factor, op.Max(op.Sub(lin_den, g.flat(band_den)), zero)))
    return num, den
