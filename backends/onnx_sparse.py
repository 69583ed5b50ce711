"""ONNX lowering of ``attnforge::sparse_attention`` that does only the kept work.

ORT's own windowed and block-sparse CPU kernels compute the dense product and then mask it,
so this lowering is a graph: it follows the ``BlockLayout`` contract of
``compiler.variants.block_layout`` step by step, with every size computed in the graph so dynamic
batch and sequence lengths keep working:

1. the pattern's block mask ``[Bl, Hl, nqb, nkb]`` (``Bl, Hl`` are 1 for static patterns;
   top-k pools q and k and selects blocks in the graph, so nothing goes back to the host);
2. ``TopK`` over the mask turns it into ascending lists of ``K`` kept key blocks per query
   block, ``K`` the largest count (as the reference pads its lists);
3. the kept key and value blocks are gathered, and scores, softmax and the value product run
   on ``[B, H, nqb, block, K * block]``: cost grows with the kept blocks, not ``Sq * Sk``;
4. pairs the blocks hold but the pattern, causality or the user's mask drop are set to
   ``-inf`` inside the gathered blocks; rows with nothing left give zeros.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from onnxscript import ir
from onnxscript import opset23 as op

from backends.onnx_attention import lower_attention
from backends.onnx_build import (NEG_INF, additive, arange, at_rank4, ceil_div, dim, ints, mask_dims4, nan_to_zero, pad_axis,
                                 scalar_int, scalar_like, static_dim, to_float32)
from compiler.variants.block_layout import _blocks_from_pairs, _neighborhood_keep, grid_of, static_layout, topk_width
from compiler.variants.dilated import Dilated
from compiler.ir.errors import BackendError
from compiler.variants.registry import spec_of
from compiler.reference.sparse_ops import head_groups
from compiler.variants.language import BlockSparse, Neighborhood, TopK, VerticalSlash, Window, parse_variant, resolve_right


def _block_grid(nqb, nkb):
    """Query-block ids [nqb, 1] and key-block ids [1, nkb]."""
    return op.Unsqueeze(arange(nqb), ints(1)), op.Unsqueeze(arange(nkb), ints(0))


def _causal_blocks(qb, kb, bs: int, sq):
    """Key blocks holding at least one key at or before some real query of the block."""
    q_last = op.Min(op.Add(op.Mul(qb, ints(bs)), ints(bs - 1)), op.Sub(sq, ints(1)))
    return op.LessOrEqual(op.Mul(kb, ints(bs)), q_last)


def _window(p: Window, causal: bool, qb, kb, sq, sk):
    right = resolve_right(p, causal)
    bs = p.block
    q0 = op.Mul(qb, ints(bs))
    lo = op.Div(op.Max(op.Sub(q0, ints(p.left)), ints(0)), ints(bs))
    q_last = op.Min(op.Add(q0, ints(bs - 1)), op.Sub(sq, ints(1)))
    hi = op.Div(op.Min(op.Add(q_last, ints(0 if causal else right)), op.Sub(sk, ints(1))), ints(bs))
    bm = op.And(op.GreaterOrEqual(kb, lo), op.LessOrEqual(kb, hi))
    bm = op.Or(bm, op.Less(op.Mul(kb, ints(bs)), ints(p.sinks)))

    def keep(i, j):
        band = op.And(op.GreaterOrEqual(j, op.Sub(i, ints(p.left))), op.LessOrEqual(j, op.Add(i, ints(right))))
        return op.Or(band, op.Less(j, ints(p.sinks)))

    return bm, keep


def _dilated(p: Dilated, causal: bool, qb, kb, sq, sk):
    """The window's band of blocks; inside it, keys at a multiple of ``dilation`` from the query."""
    bm, band = _window(p, causal, qb, kb, sq, sk)

    def keep(i, j):
        on_stride = op.Equal(op.Mod(op.Sub(i, j), ints(p.dilation)), ints(0))  # integer Mod: floor, as torch
        return op.Or(op.And(band(i, j), on_stride), op.Less(j, ints(p.sinks)))

    return bm, keep


def _blocksparse(p: BlockSparse, qb, kb):
    dist = op.Sub(qb, kb)
    bm = op.LessOrEqual(op.Abs(dist), ints(p.local))
    bm = op.Or(bm, op.Or(op.Less(kb, ints(p.global_)), op.Less(qb, ints(p.global_))))
    if p.stride > 0:
        bm = op.Or(bm, op.Equal(op.Mod(dist, ints(p.stride)), ints(0)))
    return bm, None


def _neighborhood(p: Neighborhood, sizes: tuple, causal: bool):
    sq, sk = sizes
    if sq is None or sk is None:
        raise BackendError("neighborhood attention needs a fixed sequence length to export (the grid comes from "
                           "it); capture the model with static shapes")
    rows, cols, prefix = grid_of(p, sk)
    kh, kw = min(p.size[0], rows), min(p.size[1], cols)
    # The grid is fixed, so the block mask is a constant, computed once by the reference code.
    bm = _blocks_from_pairs(_neighborhood_keep(p, sk), sq, sk, p.block, causal)
    bm = op.Constant(value=ir.tensor(bm.numpy()))

    def keep(i, j):
        gi, gj = op.Sub(i, ints(prefix)), op.Sub(j, ints(prefix))
        qr, qc = op.Div(op.Max(gi, ints(0)), ints(cols)), op.Mod(op.Max(gi, ints(0)), ints(cols))
        kr, kc = op.Div(op.Max(gj, ints(0)), ints(cols)), op.Mod(op.Max(gj, ints(0)), ints(cols))
        r0 = op.Clip(op.Sub(qr, ints(kh // 2)), ints(0), ints(rows - kh))
        c0 = op.Clip(op.Sub(qc, ints(kw // 2)), ints(0), ints(cols - kw))
        inside = op.And(op.And(op.GreaterOrEqual(kr, r0), op.Less(kr, op.Add(r0, ints(kh)))),
                        op.And(op.GreaterOrEqual(kc, c0), op.Less(kc, op.Add(c0, ints(kw)))))
        outside_grid = op.Or(op.Less(gi, ints(0)), op.Less(gj, ints(0)))
        return op.Or(inside, outside_grid)

    return bm, keep


def _pooled(x5, s, bs: int):
    """Mean of each block of tokens: [B, H, nb, bs, D] -> [B, H, nb, D] (real tokens only)."""
    nb = op.Shape(x5, start=2, end=3)
    counts = op.Min(op.Sub(s, op.Mul(arange(nb), ints(bs))), ints(bs))
    total = op.ReduceSum(to_float32(x5), ints(3), keepdims=0)
    return op.Div(total, op.Unsqueeze(op.Cast(counts, to=ir.DataType.FLOAT), ints(1)))


def _topk(p: TopK, causal: bool, qb, kb, q5, k5, sq, sk, nkb, scale: float):
    bs = p.block
    scores = op.Mul(op.MatMul(_pooled(q5, sq, bs), op.Transpose(_pooled(k5, sk, bs), perm=[0, 1, 3, 2])),
                    op.Constant(value_float=scale))  # [B, H, nqb, nkb]
    allowed = _causal_blocks(qb, kb, bs, sq) if causal else None
    if causal:
        near = op.And(op.LessOrEqual(kb, qb), op.GreaterOrEqual(kb, op.Sub(qb, ints(p.local))))
    else:
        near = op.LessOrEqual(op.Abs(op.Sub(kb, qb)), ints(p.local))
    forced = op.Or(near, op.Less(kb, ints(p.sinks)))
    if allowed is not None:
        forced = op.And(forced, allowed)
    ninf = op.Constant(value_float=NEG_INF)
    none = op.ConstantOfShape(op.Shape(scores), value=ir.tensor(np.array([False])))
    if p.mass > 0:
        masked = scores if allowed is None else op.Where(allowed, scores, ninf)
        probs = nan_to_zero(op.Softmax(masked, axis=-1))
        zero = op.Constant(value_float=0.0)
        covered = op.ReduceSum(op.Where(forced, probs, zero), ints(-1), keepdims=1)
        rest = op.Where(forced, zero, probs)
        srt, order = op.TopK(rest, nkb, axis=-1, largest=1, sorted=1)
        before = op.Add(op.Sub(op.CumSum(srt, ints(-1)), srt), covered)
        take = op.And(op.Less(before, op.Constant(value_float=p.mass)), op.Greater(srt, zero))
        chosen = op.ScatterElements(none, order, take, axis=-1)
    else:
        drop = op.Not(allowed) if allowed is not None else None
        drop = forced if drop is None else op.Or(drop, forced)
        cand = op.Where(drop, ninf, scores)
        top_v, top_i = op.TopK(cand, op.Min(ints(p.blocks), nkb), axis=-1, largest=1, sorted=1)
        chosen = op.ScatterElements(none, top_i, op.Greater(top_v, ninf), axis=-1)
    return op.Or(chosen, forced), None


def _vslash(p: VerticalSlash, causal: bool, qb, kb, q, k, sq, sk, nkb, scale: float):
    """MInference's estimate, as ``compiler.variants.block_layout.vslash_layout``: the last queries' scores
    pick key columns and diagonals; the block mask covers every block they touch."""
    bs = p.block
    ninf, inf = op.Constant(value_float=NEG_INF), op.Constant(value_float=float("inf"))
    last = op.Min(ints(p.last), sq)
    first = op.Sub(sq, last)
    i = op.Unsqueeze(op.Range(op.Squeeze(first), op.Squeeze(sq), scalar_int(1)), ints(1))  # [last, 1]
    j = op.Unsqueeze(arange(sk), ints(0))  # [1, Sk]
    qlast = op.Slice(q, first, sq, ints(2))
    s = op.Mul(op.MatMul(to_float32(qlast), op.Transpose(to_float32(k), perm=[0, 1, 3, 2])),
               op.Constant(value_float=scale))
    if causal:
        s = op.Where(op.Greater(j, i), ninf, s)
    probs = nan_to_zero(op.Softmax(s, axis=-1))  # [B, H, last, Sk]
    vert = op.Where(op.Less(arange(sk), ints(p.sinks)), inf, op.ReduceSum(probs, ints(-2), keepdims=0))
    # The forced columns (sinks) and diagonals (local) are always kept, even past the counts.
    n_vert = op.Min(op.Max(ints(p.vertical), op.Min(ints(p.sinks), sk)), sk)
    _, cols = op.TopK(vert, n_vert, axis=-1)  # [B, H, nv]

    ndiag = op.Sub(op.Add(sq, sk), ints(1))  # offset d = i - j stored at d + Sk - 1
    where = op.Add(op.Sub(i, j), op.Sub(sk, ints(1)))  # [last, Sk]
    flat_probs = op.Reshape(probs, ints(0, 0, -1))
    flat_where = op.Expand(op.Reshape(where, ints(1, 1, -1)), op.Shape(flat_probs))
    zeros = op.Expand(op.Constant(value_float=0.0), op.Concat(op.Shape(q, end=2), ndiag, axis=0))
    slash = op.ScatterElements(zeros, flat_where, flat_probs, axis=-1, reduction="add")
    d = op.Sub(arange(ndiag), op.Sub(sk, ints(1)))
    if causal:
        near = op.And(op.GreaterOrEqual(d, ints(0)), op.Less(d, ints(p.local)))
    else:
        near = op.Less(op.Abs(d), ints(p.local))
    slash = op.Where(near, inf, slash)
    if causal:
        slash = op.Where(op.Less(d, ints(0)), ninf, slash)
    n_near = op.Reshape(op.ReduceSum(op.Cast(near, to=ir.DataType.INT64), keepdims=1), ints(1))
    top_v, top_i = op.TopK(slash, op.Min(op.Max(ints(p.slash), n_near), ndiag), axis=-1)
    none_left = op.Add(sq, sk)
    diags = op.Where(op.Greater(top_v, ninf), op.Sub(top_i, op.Sub(sk, ints(1))), none_left)  # [B, H, ns]

    def flags(length, index):
        base = op.ConstantOfShape(op.Concat(op.Shape(q, end=2), length, axis=0), value=ir.tensor(np.array([False])))
        return op.ScatterElements(base, index, op.Expand(op.Constant(value=ir.tensor(np.array(True))),
                                                         op.Shape(index)), axis=-1)

    col_keep = flags(sk, cols)  # [B, H, Sk]
    diag_keep = flags(op.Add(ndiag, ints(1)), op.Min(op.Add(diags, op.Sub(sk, ints(1))), ndiag))
    col_blocks = flags(op.Add(nkb, ints(1)), op.Div(cols, ints(bs)))  # [B, H, nkb + 1]
    nqb = op.Shape(qb, start=0, end=1)
    bm = op.Expand(op.Unsqueeze(col_blocks, ints(2)), op.Concat(op.Shape(q, end=2), nqb, op.Add(nkb, ints(1)),
                                                              axis=0))
    q0 = op.Mul(qb, ints(bs))  # [nqb, 1]
    dd = op.Unsqueeze(diags, ints(2))  # [B, H, 1, ns]
    # Diagonal d meets the rows of a query block at keys [q0 - d, q1 - d]; clipped to real keys
    # that span is at most one block long, so its two ends name every key block it touches.
    lo = op.Max(op.Sub(q0, dd), ints(0))
    hi = op.Min(op.Sub(op.Min(op.Add(q0, ints(bs - 1)), op.Sub(sq, ints(1))), dd), op.Sub(sk, ints(1)))
    hit = op.LessOrEqual(lo, hi)
    true = op.Expand(op.Constant(value=ir.tensor(np.array(True))), op.Shape(lo))
    for end in (lo, hi):
        bm = op.ScatterElements(bm, op.Where(hit, op.Div(end, ints(bs)), op.Expand(nkb, op.Shape(lo))), true, axis=-1)
    bm = op.Slice(bm, ints(0), nkb, ints(-1))
    if causal:
        bm = op.And(bm, _causal_blocks(qb, kb, bs, sq))

    def keep(ii, jj):
        jj = op.Expand(jj, op.Concat(op.Shape(q, end=2), op.Shape(jj, start=2), axis=0))  # [B, H, nqb, 1, K*bs]
        cv = op.GatherElements(col_keep, op.Reshape(op.Clip(jj, ints(0), op.Sub(sk, ints(1))), ints(0, 0, -1)), axis=-1)
        cv = op.Reshape(cv, op.Shape(jj))
        off = op.Clip(op.Add(op.Sub(ii, jj), op.Sub(sk, ints(1))), ints(0), op.Sub(ndiag, ints(1)))
        dv = op.Reshape(op.GatherElements(diag_keep, op.Reshape(off, ints(0, 0, -1)), axis=-1), op.Shape(off))
        return op.Or(cv, dv)

    return bm, keep


@dataclass
class BlockGrid:
    """What a pattern's ONNX block mask may read: the inputs, their blocked views, the block ids
    and the sizes (graph values; ``sizes``: Sq, Sk as numbers where the exporter knows them)."""
    q: object
    k: object
    q5: object
    k5: object
    qb: object
    kb: object
    sq: object
    sk: object
    nkb: object
    sizes: tuple
    scale: float
    causal: bool


# Pattern class -> (pattern, BlockGrid) -> (block mask, pair_keep or None): this backend's lowering
# of each pattern in ``compiler.variants.registry`` (static masks are [nqb, nkb], content-selected ones
# [B, H, nqb, nkb]). A new pattern adds its entry here.
BLOCK_MASKS = {
    Window: lambda p, g: _window(p, g.causal, g.qb, g.kb, g.sq, g.sk),
    BlockSparse: lambda p, g: _blocksparse(p, g.qb, g.kb),
    Dilated: lambda p, g: _dilated(p, g.causal, g.qb, g.kb, g.sq, g.sk),
    Neighborhood: lambda p, g: _neighborhood(p, g.sizes, g.causal),
    TopK: lambda p, g: _topk(p, g.causal, g.qb, g.kb, g.q5, g.k5, g.sq, g.sk, g.nkb, g.scale),
    VerticalSlash: lambda p, g: _vslash(p, g.causal, g.qb, g.kb, g.q, g.k, g.sq, g.sk, g.nkb, g.scale),
}


def _gather_blocks(x5, idx, per_head: bool, b, h):
    """x5 [B, H, nb, bs, D] and kept-block lists idx [Bl, Hl, nqb, K] -> [B, H, nqb, K, bs, D]."""
    if not per_head:
        return op.Gather(x5, op.Squeeze(idx, ints(0, 1)), axis=2)
    shape = op.Concat(b, h, op.Shape(idx, start=2), axis=0)
    return op.GatherND(x5, op.Unsqueeze(op.Expand(idx, shape), ints(-1)), batch_dims=2)


def _mask_blocks(mask, idx, per_head: bool, b, h, nqb, nkb, sq, sk, bs: int):
    """The user's mask at the gathered pairs, broadcastable to [B, H, nqb, bs, K*bs]."""
    _, _, sqm, skm = mask_dims4(mask)
    mask = at_rank4(mask)
    if skm == 1 and sqm == 1:
        return op.Unsqueeze(mask, ints(2))
    # A padding or broadcast mask has one row for every query: gather its keys like k.
    if sqm == 1:
        mp = pad_axis(mask, 3, op.Sub(op.Mul(nkb, ints(bs)), sk), 4)
        mp = op.Reshape(mp, ints(0, 0, -1, bs))  # [Bm, Hm, nkb, bs]
        if per_head:
            mp = op.Expand(mp, op.Concat(b, h, nkb, ints(bs), axis=0))
            g = op.GatherND(mp, op.Unsqueeze(op.Expand(idx, op.Concat(b, h, op.Shape(idx, start=2), axis=0)),
                                            ints(-1)), batch_dims=2)
        else:
            g = op.Gather(mp, op.Squeeze(idx, ints(0, 1)), axis=2)  # [Bm, Hm, nqb, K, bs]
        return op.Reshape(g, ints(0, 0, 0, 1, -1))
    mp = pad_axis(pad_axis(mask, 2, op.Sub(op.Mul(nqb, ints(bs)), sq), 4), 3, op.Sub(op.Mul(nkb, ints(bs)), sk), 4)
    mp = op.Transpose(op.Reshape(mp, op.Concat(ints(0, 0), nqb, ints(bs), nkb, ints(bs), axis=0)),
                      perm=[0, 1, 2, 4, 3, 5])  # [Bm, Hm, nqb, nkb, bs_q, bs_k]
    mp = op.Expand(mp, op.Concat(b, h, nqb, nkb, ints(bs, bs), axis=0))
    full_idx = op.Expand(idx, op.Concat(b, h, op.Shape(idx, start=2), axis=0))
    g = op.GatherND(mp, op.Unsqueeze(full_idx, ints(-1)), batch_dims=3)  # [B, H, nqb, K, bs_q, bs_k]
    return op.Reshape(op.Transpose(g, perm=[0, 1, 2, 4, 3, 5]), ints(0, 0, 0, bs, -1))


@dataclass
class Gathered:
    """A layout applied to one site: query rows, kept key blocks and which gathered pairs count."""

    q5: object  # queries in blocks [B, H, nqb, bs, D]
    k: object  # keys [B, H, Sk, D] and values [B, H, Sk, Dv], as given
    v: object
    keep: object  # bool, broadcastable to [B, H, nqb, bs, K*bs]: pattern, causality, bool mask
    bias: object  # the float mask at the gathered pairs, or None
    idx: object  # the kept-block lists [Bl, Hl, nqb, K]
    blocks: object  # [B, H, Sk, F] -> [B, H, nkb, bs, F]
    take: object  # (blocks [B, H, nkb, bs, F], one of parts(n), or None for idx) -> [B, H, n, K*bs, F]
    parts: object  # n -> the kept-block lists cut into n groups of query blocks
    rows: object  # [B, H, Sq, F] -> [B, H, nqb, bs, F]
    flat: object  # [B, H, nqb, bs, F] -> [B, H, Sq, F]

    def gather(self, x):
        """[B, H, Sk, F] -> [B, H, nqb, K*bs, F]: the kept blocks of every query block."""
        return self.take(self.blocks(x), None)

    @cached_property
    def kg(self):
        return self.gather(self.k)

    @cached_property
    def vg(self):
        return self.gather(self.v)


def gather_layout(q, k, v, mask, pattern, scale: float, causal: bool, sizes: tuple) -> Gathered:
    """Build the pattern's block layout in the graph and gather what it keeps.

    ``k``, ``v`` are already at q's heads; ``sizes`` are (Sq, Sk) where the exporter knows them
    as numbers, else None.
    """
    bs = pattern.block
    b, h = dim(q, 0), dim(q, 1)
    sq, sk = dim(q, 2), dim(k, 2)
    nqb, nkb = ceil_div(sq, bs), ceil_div(sk, bs)

    def padded(x, n, s, known):
        # A length known to fill whole blocks needs no Pad (a copy of the whole tensor).
        return x if known is not None and known % bs == 0 else pad_axis(x, 2, op.Sub(op.Mul(n, ints(bs)), s), 4)

    def rows(x):
        return op.Reshape(padded(x, nqb, sq, sizes[0]), op.Concat(ints(0, 0, -1, bs), dim(x, 3), axis=0))

    def blocks(x):
        return op.Reshape(padded(x, nkb, sk, sizes[1]), op.Concat(ints(0, 0, -1, bs), dim(x, 3), axis=0))

    q5, k5 = rows(q), blocks(k)
    qb, kb = _block_grid(nqb, nkb)
    lowering = BLOCK_MASKS.get(type(pattern))
    if lowering is None:
        raise BackendError(f"no ONNX lowering for sparse pattern {type(pattern).__name__}")
    bm, pair_keep = lowering(pattern, BlockGrid(q, k, q5, k5, qb, kb, sq, sk, nkb, sizes, scale, causal))
    per_head = not spec_of(pattern).static
    if causal and not per_head:
        bm = op.And(bm, _causal_blocks(qb, kb, bs, sq))
    if not per_head:
        bm = op.Unsqueeze(bm, ints(0, 1))  # one layout for every (batch, head)

    # Ascending kept-block lists: kept blocks score -kb, dropped ones far below.
    kbf = op.Cast(kb, to=ir.DataType.FLOAT)
    key = op.Where(bm, op.Neg(kbf), op.Sub(op.Neg(kbf), op.Cast(op.Mul(nkb, ints(2)), to=ir.DataType.FLOAT)))
    count = op.ReduceMax(op.ReduceSum(op.Cast(bm, to=ir.DataType.INT64), ints(-1), keepdims=0), keepdims=1)
    kmax = op.Reshape(op.Max(count, ints(1)), ints(1))
    _, idx = op.TopK(key, kmax, axis=-1, largest=1, sorted=1)  # [Bl, Hl, nqb, K]
    valid = op.GatherElements(op.Expand(bm, op.Shape(key)), idx, axis=-1)

    def take(x5, lists=None):
        f = static_dim(x5, 4)
        shape = ints(0, 0, 0, -1, f) if f is not None else op.Concat(ints(0, 0, 0, -1), dim(x5, 4), axis=0)
        if lists is not None and not per_head:  # a static layout's lists of some query blocks, [n, K]
            gathered = op.Gather(x5, lists, axis=2)
        else:
            gathered = _gather_blocks(x5, idx if lists is None else lists, per_head, b, h)
        return op.Reshape(gathered, shape)

    def parts(n: int) -> list:
        # One Split for every group (the export pays per node); a static layout's lists squeezed once.
        if per_head:
            return op.Split(idx, axis=2, num_outputs=n)
        return op.Split(op.Squeeze(idx, ints(0, 1)), axis=0, num_outputs=n)

    def flat(x):
        return op.Slice(op.Reshape(x, op.Concat(ints(0, 0, -1), op.Shape(x, start=4), axis=0)), ints(0), sq, ints(2))

    # Absolute positions: queries [nqb, bs, 1], gathered keys [Bl, Hl, nqb, 1, K*bs].
    offs = arange(ints(bs))
    i = op.Unsqueeze(op.Add(op.Unsqueeze(op.Mul(arange(nqb), ints(bs)), ints(1)), offs), ints(2))
    j4 = op.Add(op.Unsqueeze(op.Mul(idx, ints(bs)), ints(-1)), offs)  # [Bl, Hl, nqb, K, bs]
    j = op.Reshape(j4, ints(0, 0, 0, 1, -1))
    keep = op.Reshape(op.And(op.Unsqueeze(valid, ints(-1)), op.Less(j4, sk)), ints(0, 0, 0, 1, -1))
    if causal:
        keep = op.And(keep, op.LessOrEqual(j, i))
    if pair_keep is not None:
        keep = op.And(keep, pair_keep(i, j))
    bias = None
    if mask is not None:
        m = _mask_blocks(mask, idx, per_head, b, h, nqb, nkb, sq, sk, bs)
        if mask.dtype == ir.DataType.BOOL:  # (values made while tracing carry no dtype yet)
            keep = op.And(keep, m)
        else:
            bias = to_float32(m)
    return Gathered(q5, k, v, keep, bias, idx, blocks, take, parts, rows, flat)


GROUP_SCORE_BYTES = 4 << 20  # scores of one group of query blocks: a few MiB stay in cache


def blocked_attention(q, k, v, mask, pattern, scale: float, causal: bool, softcap: float, sizes: tuple):
    """Sparse attention of one pattern over q [B, H, Sq, D] and k, v already at H heads.

    A static layout exported at a known length runs its query blocks in groups whose scores take
    about ``GROUP_SCORE_BYTES``: ORT runs each op over the whole tensor before the next, so whole
    [B, H, nqb, bs, K*bs] scores went to memory and back between the product, the mask, the
    softmax and the second product (the mask's Add alone was 20% of a window's run at 8k); a
    group's stay in cache. A content-selected layout is cut the same way where the number of blocks
    it keeps is known (a fixed top-k); one group when that or the length is not known."""
    g = gather_layout(q, k, v, mask, pattern, scale, causal, sizes)
    nqb, per = _groups(pattern, q, causal, sizes)
    if per >= nqb:
        out = _attend(g.q5, g.kg, g.vg, g.keep, g.bias, scale, softcap, v)
    else:
        # Dropped pairs and the user's mask as one additive term (at the keep mask's own shape),
        # sliced per group below: every term of it has a query-block axis.
        drop = additive(g.keep, op.Constant(value_float=0.0))  # float32, as the scores
        add = drop if g.bias is None else op.Add(drop, g.bias)
        # Split's num_outputs cuts ceil(nqb / n) blocks a part, the last one shorter: n parts of
        # at most ``per`` blocks, and none of them empty.
        part = -(-nqb // -(-nqb // per))
        n = -(-nqb // part)

        def split(x):  # one node per operand: the export's optimizer pays per node
            return op.Split(x, axis=2, num_outputs=n)

        k5, v5 = g.blocks(g.k), g.blocks(g.v)
        qs = split(to_float32(op.Mul(g.q5, scalar_like(scale, g.q5))))
        lists = g.parts(n)
        outs = [_attend(qg, g.take(k5, ig), g.take(v5, ig), None, ag, 1.0, softcap, v)
                for qg, ig, ag in zip(qs, lists, split(add))]
        out = op.Concat(*outs, axis=2)
    # Rows with nothing kept are NaN after the softmax: zeros, unless no row can be empty.
    return g.flat(out if _no_empty_rows(pattern, mask, causal, sizes) else nan_to_zero(out))


def _attend(q5, kg, vg, keep, bias, scale: float, softcap: float, like):
    """Attention of query blocks [B, H, n, bs, D] over their gathered keys [B, H, n, K*bs, D];
    ``keep`` (bool, or None) and ``bias`` (additive, or None) broadcast to the scores."""
    q5 = q5 if scale == 1.0 else op.Mul(q5, scalar_like(scale, q5))
    scores = op.MatMul(to_float32(q5), to_float32(op.Transpose(kg, perm=[0, 1, 2, 4, 3])))  # [B, H, n, bs, K*bs]
    if softcap > 0.0:
        cap = op.Constant(value_float=softcap)
        scores = op.Mul(op.Tanh(op.Div(scores, cap)), cap)
    # Dropped pairs as an additive 0 / -inf term built at the keep mask's own shape (one layout
    # for every batch and head with a static pattern): a broadcast Add over the scores is
    # vectorised and threaded, where ORT's broadcasting Where over them was the costliest node
    # (40% of a window's run time at 8k).
    if keep is not None:
        drop = additive(keep, scores)
        bias = drop if bias is None else op.Add(drop, bias)
    if bias is not None:
        scores = op.Add(scores, bias)
    probs = op.Softmax(scores, axis=-1)
    return op.MatMul(probs if like.dtype == ir.DataType.FLOAT else op.CastLike(probs, like), vg)


def _groups(pattern, q, causal: bool, sizes: tuple) -> tuple:
    """(query blocks, query blocks a group): one group where the length is unknown at export or
    how many blocks a query block keeps is known only per call (top-k by mass, vertical-slash)."""
    sq, sk = sizes
    bs = pattern.block
    if sq is None or sk is None:
        return 1, 1
    nqb = -(-sq // bs)
    if spec_of(pattern).static:
        width = static_layout(pattern, sq, sk, causal).kv_blocks.shape[-1]
    elif isinstance(pattern, TopK) and pattern.mass <= 0:
        width = topk_width(pattern, sk, causal)
    else:
        return nqb, nqb
    heads = (static_dim(q, 0) or 1) * (static_dim(q, 1) or 1)
    per_block = heads * bs * width * bs * 4
    return nqb, max(1, GROUP_SCORE_BYTES // per_block)


def _no_empty_rows(pattern, mask, causal: bool, sizes: tuple) -> bool:
    """Every query keeps at least its own key: a window (or dilated window) keeps ``j == i``,
    causality keeps it too, and without a user mask nothing else drops it, if every query has
    its key (``Sq <= Sk``, known at export)."""
    sq, sk = sizes
    return (mask is None and type(pattern) in (Window, Dilated) and sq is not None and sk is not None and sq <= sk
            and resolve_right(pattern, causal) >= 0 and pattern.left >= 0)


def _heads(x, index: list):
    return op.Gather(x, ints(*index), axis=1)


def _mask_heads(mask, heads: list):
    if mask is None or len(mask.shape) < 3 or static_dim(mask, len(mask.shape) - 3) == 1:
        return mask
    return op.Gather(mask, ints(*heads), axis=len(mask.shape) - 3)


def sparse_translation(q, k, v, mask=None, scale=1.0, is_causal=False, softcap=0.0, spec=""):
    """``attnforge::sparse_attention`` -> gathered block-sparse attention (per head group)."""
    pattern = parse_variant(spec).pattern
    hq, hkv = static_dim(q, 1), static_dim(k, 1)
    if hq is None or hkv is None:
        raise BackendError("sparse attention needs a fixed number of heads to export")
    kv_map = [h // (hq // hkv) for h in range(hq)]
    groups = head_groups(pattern, hq)
    sizes = (static_dim(q, 2), static_dim(k, 2))
    if len(groups) == 1 and groups[0][1] is not None:
        kr, vr = (k, v) if hkv == hq else (_heads(k, kv_map), _heads(v, kv_map))
        return blocked_attention(q, kr, vr, mask, groups[0][1], scale, is_causal, softcap, sizes)
    outs, order = [], []
    for heads, pat in groups:
        hs = [int(x) for x in heads]
        qh = _heads(q, hs)
        kh, vh = _heads(k, [kv_map[x] for x in hs]), _heads(v, [kv_map[x] for x in hs])
        mh = _mask_heads(mask, hs)
        if pat is None:
            outs.append(lower_attention(qh, kh, vh, mh, scale, is_causal, softcap, "attention"))
        else:
            outs.append(blocked_attention(qh, kh, vh, mh, pat, scale, is_causal, softcap, sizes))
        order += hs
    inverse = [order.index(x) for x in range(hq)]
    return op.Gather(op.Concat(*outs, axis=1), ints(*inverse), axis=1)
