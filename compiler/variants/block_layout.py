"""Sparse patterns as block layouts: which key blocks each query block reads, and which
(query, key) pairs inside those blocks are kept.

A ``BlockLayout`` is the contract every sparse executor implements (the PyTorch reference
here, the Triton kernel, the ONNX decomposition): ``kv_blocks[b, h, qb]`` lists the key
blocks query block ``qb`` reads (``-1`` pads the list), and ``pair_keep(i, j)`` refines a
kept block down to single pairs (a window edge, a diagonal, a grid neighbourhood). Causality
and the user's mask are applied on top by the executor.

Static patterns (window, block-sparse, neighbourhood) depend only on the shape and are cached;
content-selected ones (top-k, vertical-slash) are computed from q and k on every call, the way
MInference and FlexPrefill estimate them at prefill time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Optional

import torch
from torch import Tensor

from compiler.variants.registry import extend, spec_of
from compiler.variants.language import BlockSparse, Neighborhood, TopK, VerticalSlash, Window, resolve_right

PairKeep = Callable[[Tensor, Tensor], Tensor]  # (i [.., nqb, bs, 1], j [.., nqb, 1, K*bs]) -> bool


@dataclass
class BlockLayout:
    block: int
    sq: int
    sk: int
    kv_blocks: Tensor  # [Bl, Hl, nqb, K] int64, -1 = no block; Bl in {1, B}, Hl in {1, Hq}
    pair_keep: Optional[PairKeep] = None
    _keep_cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_q_blocks(self) -> int:
        return self.kv_blocks.shape[2]

    def kept_blocks(self) -> Tensor:
        """Key blocks read per (b, h, query block)."""
        return (self.kv_blocks >= 0).sum(-1)

    def computed_pairs(self) -> float:
        """(query, key) scores an executor computes per (b, h), averaged: kept blocks x block^2."""
        return float(self.kept_blocks().double().sum(-1).mean()) * self.block * self.block

    def positions(self) -> tuple[Tensor, Tensor]:
        """Query positions [nqb, bs, 1] and gathered key positions [Bl, Hl, nqb, 1, K*bs]."""
        bl, hl, nqb, nk = self.kv_blocks.shape
        bs = self.block
        dev = self.kv_blocks.device
        i = (torch.arange(nqb, device=dev).view(-1, 1) * bs + torch.arange(bs, device=dev)).view(nqb, bs, 1)
        j = (self.kv_blocks.clamp(min=0).unsqueeze(-1) * bs + torch.arange(bs, device=dev)).view(bl, hl, nqb, 1, nk * bs)
        return i, j

    def gathered_keep(self, causal: bool, blocks: slice = slice(None)) -> Tensor:
        """Which gathered pairs are attended, [Bl, Hl, n, bs | 1, K*bs], for query blocks ``blocks``."""
        i, j = self.positions()
        i, j = i[blocks], j[:, :, blocks]
        valid = (self.kv_blocks[:, :, blocks] >= 0).repeat_interleave(self.block, -1).unsqueeze(-2)
        keep = (j < self.sk) & valid
        if causal:
            keep = keep & (j <= i)
        if self.pair_keep is not None:
            keep = keep & self.pair_keep(i, j)
        return keep

    def whole_blocks_full(self, causal: bool) -> Tensor:
        """For a layout that keeps whole blocks (no ``pair_keep``): which listed blocks keep every
        pair, [Bl, Hl, nqb, K]. Only the key bound and causality cut into one, so a block is full
        when its last key is real and (causal) not after its first query: O(blocks), no pairs."""
        bs, kv = self.block, self.kv_blocks
        last_key = (kv + 1) * bs - 1
        first_query = (torch.arange(kv.shape[2], device=kv.device) * bs).view(1, 1, -1, 1)
        full = (kv >= 0) & (last_key < self.sk)
        return full & (last_key <= first_query) if causal else full

    def gathered_drop(self, causal: bool) -> Tensor:
        """Which gathered pairs are *not* attended, [Bl, Hl, nqb, bs, K*bs]. A static layout is
        reused across calls, so this is computed once per layout."""
        if causal not in self._keep_cache:
            self._keep_cache[causal] = ~self.gathered_keep(causal)
        return self._keep_cache[causal]

    def dense_keep(self, causal: bool, r0: int = 0, r1: Optional[int] = None) -> Tensor:
        """The layout as a dense [Bl, Hl, Sq, Sk] keep mask, or its query rows ``r0:r1``
        (calibration and test oracles only; measurement asks for a block of rows at a time)."""
        r1 = self.sq if r1 is None else r1
        bs = self.block
        qb0, qb1 = r0 // bs, -(-r1 // bs)
        blocks = self.kv_blocks[:, :, qb0:qb1]
        bl, hl, nqb, _ = blocks.shape
        nkb = -(-self.sk // bs)
        dev = self.kv_blocks.device
        bm = torch.zeros(bl, hl, nqb, nkb + 1, dtype=torch.bool, device=dev)
        bm.scatter_(-1, torch.where(blocks >= 0, blocks, nkb), True)
        keep = bm[..., :nkb].repeat_interleave(bs, -2).repeat_interleave(bs, -1)
        keep = keep[..., r0 - qb0 * bs: r1 - qb0 * bs, : self.sk]
        i = torch.arange(r0, r1, device=dev).view(1, 1, -1, 1)
        j = torch.arange(self.sk, device=dev).view(1, 1, 1, -1)
        if self.pair_keep is not None:
            keep = keep & self.pair_keep(i, j)
        if causal:
            keep = keep & (j <= i)
        return keep


def block_lists(bm: Tensor, width: Optional[int] = None) -> Tensor:
    """Boolean block mask [.., nqb, nkb] -> ascending kept-block lists padded with -1.

    ``width``: the list length when the caller knows a bound, which spares reading the
    longest list's length back from the device."""
    counts = bm.sum(-1, keepdim=True)
    k = width if width is not None else max(int(counts.max()) if counts.numel() else 0, 1)
    # Stable sort of "not kept" brings kept block ids to the front in ascending order.
    order = torch.sort((~bm).to(torch.int8), dim=-1, stable=True).indices[..., :k]
    return torch.where(torch.arange(k, device=bm.device) < counts, order, torch.full_like(order, -1))


def _causal_blocks(nqb: int, nkb: int, block: int, device=None) -> Tensor:
    qb = torch.arange(nqb, device=device).view(-1, 1)
    kb = torch.arange(nkb, device=device).view(1, -1)
    return kb * block <= qb * block + block - 1


# ---------------------------------------------------------------------------- static patterns


def _window_keep(left: int, right: int, sinks: int) -> PairKeep:
    def keep(i, j):
        return ((j >= i - left) & (j <= i + right)) | (j < sinks)

    return keep


def _blocksparse_keep(p: BlockSparse) -> PairKeep:
    def keep(i, j):
        qb, kb = i // p.block, j // p.block
        out = ((qb - kb).abs() <= p.local) | (kb < p.global_) | (qb < p.global_)
        if p.stride > 0:
            out = out | ((qb - kb) % p.stride == 0)
        return out

    return keep


def grid_of(p: Neighborhood, seq: int) -> tuple[int, int, int]:
    """(rows, cols, prefix) of the token grid, from the pattern or the sequence length."""
    if p.grid is not None:
        rows, cols = p.grid
        prefix = seq - rows * cols if p.prefix is None else p.prefix
        if prefix < 0 or prefix + rows * cols != seq:
            raise ValueError(f"grid {rows}x{cols} with {max(prefix, 0)} leading tokens does not cover "
                             f"a sequence of {seq} tokens")
        return rows, cols, prefix
    for prefix in ([p.prefix] if p.prefix is not None else [0, 1]):
        side = math.isqrt(max(seq - prefix, 0))
        if side > 1 and side * side == seq - prefix:
            return side, side, prefix
    raise ValueError(f"a sequence of {seq} tokens is not a square grid (with 0 or 1 leading tokens); "
                     "give grid=ROWSxCOLS and prefix=N")


def _neighborhood_keep(p: Neighborhood, seq: int) -> PairKeep:
    rows, cols, prefix = grid_of(p, seq)
    kh, kw = min(p.size[0], rows), min(p.size[1], cols)

    def keep(i, j):
        gi, gj = i - prefix, j - prefix
        qr, qc = gi.div(cols, rounding_mode="floor"), gi.remainder(cols)
        kr, kc = gj.div(cols, rounding_mode="floor"), gj.remainder(cols)
        # NATTEN's windows: a fixed-size window, shifted inward at the grid edges.
        r0 = (qr - kh // 2).clamp(0, rows - kh)
        c0 = (qc - kw // 2).clamp(0, cols - kw)
        inside = (kr >= r0) & (kr < r0 + kh) & (kc >= c0) & (kc < c0 + kw) & (gi >= 0) & (gj >= 0)
        return inside | (gi < 0) | (gj < 0)

    return keep


def _blocks_from_pairs(keep: PairKeep, sq: int, sk: int, block: int, causal: bool) -> Tensor:
    """Block mask [nqb, nkb] of a pair predicate, evaluated a few query blocks at a time."""
    nqb, nkb = -(-sq // block), -(-sk // block)
    j = torch.arange(nkb * block).view(1, -1)
    rows = []
    step = max(1, (1 << 22) // max(1, nkb * block * block))
    for q0 in range(0, nqb, step):
        q1 = min(nqb, q0 + step)
        i = torch.arange(q0 * block, q1 * block).view(-1, 1)
        k = keep(i, j) & (j < sk) & (i < sq)
        if causal:
            k = k & (j <= i)
        rows.append(k.view(q1 - q0, block, nkb, block).any(3).any(1))
    return torch.cat(rows)


def _window_blocks(left: int, right: int, sinks: int, sq: int, sk: int, block: int, causal: bool) -> Tensor:
    nqb, nkb = -(-sq // block), -(-sk // block)
    q0 = torch.arange(nqb).view(-1, 1) * block
    kb = torch.arange(nkb).view(1, -1)
    lo = (q0 - left).clamp(min=0) // block
    q_last = (q0 + block - 1).clamp(max=sq - 1)  # the last real query of the block, not padding
    hi = (q_last + (0 if causal else right)).clamp(max=sk - 1) // block
    bm = ((kb >= lo) & (kb <= hi)) | (kb * block < sinks)
    return bm & _causal_blocks(nqb, nkb, block) if causal else bm


def _window_mask(p: Window, sq: int, sk: int, causal: bool):
    right = resolve_right(p, causal)
    return _window_blocks(p.left, right, p.sinks, sq, sk, p.block, causal), _window_keep(p.left, right, p.sinks)


def _blocksparse_mask(p: BlockSparse, sq: int, sk: int, causal: bool):
    return _blocks_from_pairs(_blocksparse_keep(p), sq, sk, p.block, causal), None  # whole blocks


def _neighborhood_mask(p: Neighborhood, sq: int, sk: int, causal: bool):
    keep = _neighborhood_keep(p, sk)
    return _blocks_from_pairs(keep, sq, sk, p.block, causal), keep


def _neighborhood_legal(p: Neighborhood, site) -> "str | None":
    if site.causal:
        return "a 2-D neighborhood needs a bidirectional site; this one is causal"
    if site.seq_q != site.seq_k:
        return f"a 2-D neighborhood needs as many queries as keys ({site.seq_q} vs {site.seq_k})"
    try:
        grid_of(p, site.seq_k)
    except ValueError as e:
        return f"2-D neighborhood on a 1-D sequence: {e}"
    return None


@lru_cache(maxsize=64)
def static_layout(p, sq: int, sk: int, causal: bool) -> BlockLayout:
    spec = spec_of(p)
    if spec.block_mask is None:
        raise TypeError(f"{type(p).__name__} is not a static pattern")
    bm, keep = spec.block_mask(p, sq, sk, causal)
    return BlockLayout(p.block, sq, sk, block_lists(bm)[None, None], keep)


# ---------------------------------------------------------------------------- content-selected


def _pool_blocks(x: Tensor, block: int) -> Tensor:
    """Mean of each block of tokens: [B, H, S, D] -> [B, H, nb, D] (a partial last block averages
    only its real tokens)."""
    b, h, s, d = x.shape
    nb = -(-s // block)
    # Summed in fp32 as read: no fp32 copy of the whole tensor (it dominated selection on a GPU).
    xp = x if nb * block == s else torch.nn.functional.pad(x, (0, 0, 0, nb * block - s))
    counts = torch.full((nb,), float(block), device=x.device)
    counts[-1] = s - (nb - 1) * block
    return xp.reshape(b, h, nb, block, d).sum(3, dtype=torch.float32) / counts.view(1, 1, -1, 1)


def topk_layout(p: TopK, q: Tensor, k: Tensor, scale: float, causal: bool,
                kv_map: Optional[Tensor] = None) -> BlockLayout:
    """Per (b, h, query block): local and sink blocks, plus the top ``blocks`` key blocks by
    pooled score (or, with ``mass``, the fewest blocks holding that share of pooled softmax).
    ``kv_map``: as in ``topk_block_mask``. A fixed top-k has a known list width, so building
    it never reads a count back from the device."""
    width = topk_width(p, k.shape[2], causal) if p.mass <= 0 else None
    return BlockLayout(p.block, q.shape[2], k.shape[2], block_lists(topk_block_mask(p, q, k, scale, causal, kv_map),
                                                                    width))


def topk_width(p: TopK, sk: int, causal: bool) -> int:
    """A bound on the blocks ``topk_block_mask`` keeps per query block."""
    nkb = -(-sk // p.block)
    near = p.local + 1 if causal else 2 * p.local + 1
    return nkb if p.mass > 0 else min(nkb, p.blocks + near + p.sinks)


def topk_block_mask(p: TopK, q: Tensor, k: Tensor, scale: float, causal: bool,
                    kv_map: Optional[Tensor] = None) -> Tensor:
    """The blocks ``topk_layout`` keeps, [B, H, nqb, nkb] bool, on q's device. ``kv_map[h]``: the
    kv head of query head ``h`` when ``k`` has fewer heads (pooled first, then repeated: cheap)."""
    dev = q.device
    pq, pk = _pool_blocks(q, p.block), _pool_blocks(k, p.block)
    if kv_map is not None:
        pk = pk.index_select(1, kv_map.to(dev))
    scores = pq @ pk.transpose(-1, -2) * scale  # [B, H, nqb, nkb]
    nqb, nkb = scores.shape[-2:]
    qb = torch.arange(nqb, device=dev).view(-1, 1)
    kb = torch.arange(nkb, device=dev).view(1, -1)
    allowed = _causal_blocks(nqb, nkb, p.block, dev) if causal else torch.ones(nqb, nkb, dtype=torch.bool, device=dev)
    near = (kb <= qb) & (kb >= qb - p.local) if causal else (kb - qb).abs() <= p.local
    forced = (near | (kb < p.sinks)) & allowed
    cand = scores.masked_fill(~allowed | forced, float("-inf"))
    if p.mass > 0:
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
        covered = probs.masked_fill(~forced, 0.0).sum(-1, keepdim=True)
        probs = probs.masked_fill(forced, 0.0)
        srt, order = probs.sort(-1, descending=True)
        # A block is taken while the mass before it is still short of the target.
        before = srt.cumsum(-1) - srt + covered
        take = (before < p.mass) & (srt > 0)
        chosen = torch.zeros_like(take).scatter(-1, order, take)
    else:
        top = cand.topk(min(p.blocks, nkb), dim=-1)
        chosen = torch.zeros(cand.shape, dtype=torch.bool, device=dev).scatter(-1, top.indices,
                                                                               top.values > float("-inf"))
    return chosen | forced


def _lookup(table: Tensor, idx: Tensor) -> Tensor:
    """``table[b, h, idx[b, h, ...]]`` for a per-(b, h) table [B, H, N]."""
    shape = torch.broadcast_shapes(idx.shape, (*table.shape[:2], *[1] * (idx.dim() - 2)))
    idx = idx.expand(shape)
    return table.gather(-1, idx.reshape(*shape[:2], -1)).view(shape)


def vslash_layout(p: VerticalSlash, q: Tensor, k: Tensor, scale: float, causal: bool,
                  kv_map: Optional[Tensor] = None) -> BlockLayout:
    """MInference's vertical-slash estimate: score the last ``last`` queries against every key,
    keep the ``vertical`` key columns and ``slash`` diagonals with the most attention.
    ``kv_map``: as in ``topk_block_mask`` (None: ``k`` is at q's heads)."""
    if kv_map is not None:
        k = k.index_select(1, kv_map)
    b, h, sq, _ = q.shape
    sk = k.shape[2]
    last = min(p.last, sq)
    dev = q.device
    i = torch.arange(sq - last, sq, device=dev).view(-1, 1)
    j = torch.arange(sk, device=dev).view(1, -1)
    s = (q[:, :, -last:].float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(j > i, float("-inf"))
    probs = torch.softmax(s, -1).nan_to_num(0.0)  # [B, H, last, Sk]
    vert = probs.sum(-2)
    vert[..., : p.sinks] = float("inf")
    # The forced columns (sinks) and diagonals (local) are always kept, even past the counts.
    cols = vert.topk(min(max(p.vertical, min(p.sinks, sk)), sk), -1).indices  # [B, H, nv]
    ndiag = sq + sk - 1  # offset d = i - j, stored at d + sk - 1
    slash = torch.zeros(b, h, ndiag, device=dev).index_add_(-1, (i - j + sk - 1).flatten(), probs.flatten(2))
    d = torch.arange(ndiag, device=dev) - (sk - 1)
    near = (d >= 0) & (d < p.local) if causal else d.abs() < p.local
    slash[..., near] = float("inf")
    if causal:
        slash[..., d < 0] = float("-inf")
    top = slash.topk(min(max(p.slash, int(near.sum())), ndiag), -1)
    diags = torch.where(top.values > float("-inf"), top.indices - (sk - 1), torch.full_like(top.indices, sq + sk))

    col_keep = torch.zeros(b, h, sk, dtype=torch.bool, device=dev).scatter_(-1, cols, True)
    diag_keep = torch.zeros(b, h, ndiag + 1, dtype=torch.bool, device=dev)
    diag_keep.scatter_(-1, (diags + sk - 1).clamp(max=ndiag), True)
    diag_keep = diag_keep[..., :ndiag]

    nqb, nkb = -(-sq // p.block), -(-sk // p.block)
    bm = torch.zeros(b, h, nqb, nkb + 1, dtype=torch.bool, device=dev)
    col_blocks = torch.zeros(b, h, nkb + 1, dtype=torch.bool, device=dev).scatter_(-1, cols // p.block, True)
    bm |= col_blocks.unsqueeze(2)
    q0 = (torch.arange(nqb, device=dev) * p.block).view(1, 1, -1, 1)
    dd = diags.unsqueeze(2)  # [B, H, 1, ns]
    # Diagonal d meets query rows [q0, q1] at keys [q0 - d, q1 - d]; clipped to the real keys,
    # that span is at most one block long, so its two ends name every key block it touches.
    lo = (q0 - dd).clamp(min=0)
    hi = ((q0 + p.block - 1).clamp(max=sq - 1) - dd).clamp(max=sk - 1)
    hit = lo <= hi
    for end in (lo, hi):
        bm.scatter_(-1, torch.where(hit, end // p.block, torch.full_like(end, nkb)), True)
    bm = bm[..., :nkb]
    if causal:
        bm &= _causal_blocks(nqb, nkb, p.block, dev)

    def keep(ii, jj):
        cv = _lookup(col_keep, jj.clamp(0, sk - 1))
        dv = _lookup(diag_keep, (ii - jj + sk - 1).clamp(0, ndiag - 1))
        return cv | dv

    return BlockLayout(p.block, sq, sk, block_lists(bm), keep)


extend(Window, block_mask=_window_mask)
extend(BlockSparse, block_mask=_blocksparse_mask)
extend(Neighborhood, block_mask=_neighborhood_mask, legal_on=_neighborhood_legal)
extend(TopK, layout=topk_layout)
extend(VerticalSlash, layout=vslash_layout)
