"""Sparse patterns as the Triton kernel's tables: kept key blocks per (batch, head, query
block), a kind per kept block (full, partial, or which keep tile), and the launch order.

The tables come from the same ``BlockLayout`` every sparse executor implements, so the kernel
keeps exactly the pairs of the PyTorch reference. Classifying each kept block once, here,
lets the kernel skip all masking work on full blocks, which are most of them.

Static patterns are built once per shape and device. Content-selected top-k is built on the
inputs' device with a fixed list width, so selection never waits on the host; vertical-slash
reads its list width back once per call.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from backends.triton_attention import FULL_SLOT as FULL, PARTIAL_SLOT as PARTIAL, SparseTables
from compiler.variants.block_layout import BlockLayout, _causal_blocks, block_lists, static_layout
from compiler.variants.registry import spec_of
from compiler.reference.sparse_ops import head_groups, kv_head_map, layout_for
from compiler.variants.language import parse_variant


PAIR_BUDGET = 1 << 25  # gathered pairs classified at once


def tables_from_layout(layout: BlockLayout, causal: bool) -> SparseTables:
    kv = layout.kv_blocks
    valid = kv >= 0
    if layout.pair_keep is None:
        kinds, tiles = _whole_block_kinds(layout, causal), None
    else:
        kinds, tiles = _pair_kinds(layout, causal)
    kinds = torch.where(valid, kinds, FULL).to(torch.int32)
    if tiles is None:
        tiles = torch.ones(1, layout.block, layout.block, dtype=torch.bool, device=kv.device)
    counts = valid.sum(-1).to(torch.int32)
    # Heaviest first: query blocks with the most kept blocks start earliest.
    order = torch.sort(counts, dim=-1, descending=True, stable=True).indices.to(torch.int32)
    return SparseTables(layout.block, kv.clamp(min=0).to(torch.int32).contiguous(), counts.contiguous(),
                        kinds.contiguous(), tiles.to(torch.uint8).contiguous(), order.contiguous())


def _whole_block_kinds(layout: BlockLayout, causal: bool) -> Tensor:
    """Kinds of a layout that keeps whole blocks: only the key bound and causality cut into one,
    so a block is full when its last key is real and (causal) not after its first query."""
    return torch.where(layout.whole_blocks_full(causal), FULL, PARTIAL)


def _pair_kinds(layout: BlockLayout, causal: bool) -> tuple[Tensor, Tensor]:
    """Kinds of a layout that keeps single pairs (window edges, diagonals, grid windows), with the
    distinct keep tiles they name; evaluated a few query blocks at a time to bound memory."""
    bs, sq, sk = layout.block, layout.sq, layout.sk
    kv = layout.kv_blocks
    bl, hl, nqb, nk = kv.shape
    kinds = torch.empty(bl, hl, nqb, nk, dtype=torch.int64, device=kv.device)
    found: list[Tensor] = []
    step = max(1, PAIR_BUDGET // max(1, bl * hl * bs * nk * bs))
    for q0 in range(0, nqb, step):
        c = slice(q0, min(nqb, q0 + step))
        n = c.stop - c.start
        keep = layout.gathered_keep(causal, c).expand(bl, hl, n, bs, nk * bs)
        keep = keep.reshape(bl, hl, n, bs, nk, bs).transpose(3, 4)  # [.., K, bs, bs]
        i = (torch.arange(c.start * bs, c.stop * bs, device=kv.device)).view(1, 1, n, 1, bs, 1)
        j = ((kv[:, :, c].clamp(min=0) * bs).unsqueeze(-1) + torch.arange(bs, device=kv.device)).unsqueeze(-2)
        pad_row = i >= sq  # padding queries are never stored: any value will do
        builtin = j < sk
        if causal:
            builtin = builtin & (j <= i)
        full = (keep | pad_row).all(-1).all(-1)
        plain = ((keep == builtin) | pad_row).all(-1).all(-1)
        kc = torch.where(full, FULL, PARTIAL)
        needs_tile = (kv[:, :, c] >= 0) & ~plain
        if bool(needs_tile.any()):
            wanted, which = torch.unique((keep | pad_row)[needs_tile], dim=0, return_inverse=True)
            kc[needs_tile] = which + sum(len(t) for t in found)
            found.append(wanted)
        kinds[:, :, c] = kc
    if not found:
        return kinds, None
    # Chunks found some tiles twice; keep one copy of each.
    tiles, remap = torch.unique(torch.cat(found), dim=0, return_inverse=True)
    kinds = torch.where(kinds >= 0, remap[kinds.clamp(min=0)], kinds)
    return kinds, tiles


@lru_cache(maxsize=64)
def _static_tables(pattern, sq: int, sk: int, causal: bool, device: str) -> SparseTables:
    layout = static_layout(pattern, sq, sk, causal)
    return _to(tables_from_layout(layout, causal), torch.device(device))


def _to(t: SparseTables, device: torch.device) -> SparseTables:
    return SparseTables(t.block, *(x.to(device) for x in (t.kv_blocks, t.counts, t.kinds, t.tiles, t.order)))


def _dense_layout(block: int, sq: int, sk: int, causal: bool, device) -> BlockLayout:
    nqb, nkb = -(-sq // block), -(-sk // block)
    bm = _causal_blocks(nqb, nkb, block, device) if causal else torch.ones(nqb, nkb, dtype=torch.bool, device=device)
    return BlockLayout(block, sq, sk, block_lists(bm, nkb)[None, None])


def pattern_tables(pattern, q: Tensor, k: Tensor, scale: float, causal: bool, kv_map: Tensor) -> SparseTables:
    """Tables of one pattern for the heads of ``q`` (``kv_map[h]``: their kv heads in ``k``)."""
    if pattern is None:
        raise ValueError("an exact head group has no block size of its own")
    if not spec_of(pattern).static:  # content-selected: chosen on the device from q and k
        return tables_from_layout(layout_for(pattern, q, k, scale, causal, kv_map), causal)
    return _static_tables(pattern, q.shape[2], k.shape[2], causal, str(q.device))


def _widen(x: Tensor, k: int, fill: int) -> Tensor:
    return torch.nn.functional.pad(x, (0, k - x.shape[-1]), value=fill)


def merge_heads(parts: list[tuple[Tensor, SparseTables]], b: int, hq: int) -> SparseTables:
    """One table set for all heads from per-group tables (same block size)."""
    block = parts[0][1].block
    nk = max(t.kv_blocks.shape[-1] for _, t in parts)
    nqb = parts[0][1].counts.shape[-1]
    dev = parts[0][1].kv_blocks.device
    bl = max(t.kv_blocks.shape[0] for _, t in parts)
    kv = torch.zeros(bl, hq, nqb, nk, dtype=torch.int32, device=dev)
    kinds = torch.full((bl, hq, nqb, nk), FULL, dtype=torch.int32, device=dev)
    counts = torch.zeros(bl, hq, nqb, dtype=torch.int32, device=dev)
    order = torch.zeros(bl, hq, nqb, dtype=torch.int32, device=dev)
    tiles, offset = [], 0
    for heads, t in parts:
        n = len(heads)
        tk = t.kinds
        kv[:, heads] = _widen(t.kv_blocks, nk, 0).expand(bl, n, nqb, nk)
        kinds[:, heads] = _widen(torch.where(tk >= 0, tk + offset, tk), nk, FULL).expand(bl, n, nqb, nk)
        counts[:, heads] = t.counts.expand(bl, n, nqb)
        order[:, heads] = t.order.expand(bl, n, nqb)
        tiles.append(t.tiles)
        offset += t.tiles.shape[0]
    return SparseTables(block, kv, counts, kinds, torch.cat(tiles), order)


def sparse_tables(spec: str, q: Tensor, k: Tensor, scale: float, causal: bool) -> list:
    """[(head indices or None for all, tables)] for a sparse spec: one entry when every group
    shares a block size (one launch serves the mix), else one per group."""
    pattern = parse_variant(spec).pattern
    b, hq, sq, _ = q.shape
    sk = k.shape[2]
    kv_map = kv_head_map(hq, k.shape[1], q.device)
    groups = head_groups(pattern, hq, q.device)
    blocks = {pat.block for _, pat in groups if pat is not None}
    if len(groups) == 1:
        return [(None, pattern_tables(groups[0][1], q, k, scale, causal, kv_map))]
    if len(blocks) == 1:
        block = blocks.pop()
        parts = []
        for heads, pat in groups:
            if pat is None:
                t = tables_from_layout(_dense_layout(block, sq, sk, causal, q.device), causal)
            else:
                t = pattern_tables(pat, q.index_select(1, heads), k, scale, causal, kv_map[heads])
            parts.append((heads, t))
        return [(None, merge_heads(parts, b, hq))]
    out = []
    for heads, pat in groups:
        qh = q.index_select(1, heads)
        out.append((heads, None if pat is None else pattern_tables(pat, qh, k, scale, causal, kv_map[heads])))
    return out
