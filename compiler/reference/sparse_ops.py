"""``attnforge::sparse_attention``: softmax attention over a sparse set of (query, key) pairs.

Same arguments as ``attnforge::attention`` plus ``spec``, the canonical text of a sparse
pattern (``compiler.variants.language``). The reference implementation gathers, for each query block,
only the key blocks its layout keeps and computes scores, softmax and the value product on
those: its cost grows with the kept blocks, not with ``Sq * Sk``. Pairs a kept block holds but
the pattern drops (a window edge, a diagonal) are masked inside the gathered block.

Head mixes run each head group with its own layout; exact groups run
``attention_reference`` on their heads.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from compiler.variants.block_layout import BlockLayout, static_layout
from compiler.ir.ops import attention_reference, causal_pairs
from compiler.variants.registry import spec_of
from compiler.variants.language import HeadMix, parse_variant


def kv_head_map(hq: int, hkv: int, device=None) -> Tensor:
    return torch.arange(hq, device=device) // (hq // hkv)


def layout_for(pattern, q: Tensor, k: Tensor, scale: float, causal: bool, kv_map: Tensor) -> BlockLayout:
    spec = spec_of(pattern)
    if not spec.static:  # content-selected: the pattern reads k at its own heads through kv_map
        return spec.layout(pattern, q, k, scale, causal, kv_map)
    return static_layout(pattern, q.shape[2], k.shape[2], causal)


def _mask_at(mask: Tensor, b: Tensor, h: Tensor, i: Tensor, j: Tensor, sq: int, sk: int) -> Tensor:
    """Values of a broadcastable [.., Sq, Sk] mask at gathered positions."""
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    bm, hm, sqm, skm = mask.shape
    return mask[
        b if bm > 1 else 0,
        h if hm > 1 else 0,
        i.clamp(max=sq - 1) if sqm > 1 else 0,
        j.clamp(max=sk - 1) if skm > 1 else 0,
    ]


def run_layout(q: Tensor, k: Tensor, v: Tensor, layout: BlockLayout, kv_map: Tensor, mask: Optional[Tensor],
               scale: float, causal: bool, softcap: float, head_ids: Tensor) -> Tensor:
    """Blocked attention over the kept key blocks only.

    ``kv_map[h]`` is the kv head of query head ``h`` (GQA without repeating k/v);
    ``head_ids[h]`` is the head's index in the site, for masks with a head axis.
    """
    b, hq, sq, d = q.shape
    sk, dv = k.shape[2], v.shape[-1]
    dev = q.device
    bs = layout.block
    nqb, nkb = -(-sq // bs), -(-sk // bs)
    qp = F.pad(q, (0, 0, 0, nqb * bs - sq)).view(b, hq, nqb, bs, d)
    kp = F.pad(k, (0, 0, 0, nkb * bs - sk)).view(b, k.shape[1], nkb, bs, d)
    vp = F.pad(v, (0, 0, 0, nkb * bs - sk)).view(b, v.shape[1], nkb, bs, dv)

    blocks = layout.kv_blocks.to(dev).expand(b, hq, nqb, -1)
    nk = blocks.shape[-1]
    idx = blocks.clamp(min=0)
    bi = torch.arange(b, device=dev).view(-1, 1, 1, 1)
    hi = kv_map.view(1, -1, 1, 1)
    drop = layout.gathered_drop(causal).to(dev)
    pos_i, pos_j = [x.to(dev) for x in layout.positions()] if mask is not None else (None, None)
    qs = qp * scale  # scaling q is cheaper than scaling the gathered scores (K times more)
    out = q.new_empty((b, hq, nqb, bs, dv), dtype=v.dtype)
    # A few query blocks at a time, so the gathered blocks and scores stay small and reused.
    step = max(1, (1 << 21) // max(1, b * hq * bs * nk * bs))
    for c0 in range(0, nqb, step):
        c = slice(c0, min(nqb, c0 + step))
        n = c.stop - c.start
        kg = kp[bi, hi, idx[:, :, c]].reshape(b, hq, n, nk * bs, d)
        vg = vp[bi, hi, idx[:, :, c]].reshape(b, hq, n, nk * bs, dv)
        scores = torch.matmul(qs[:, :, c], kg.transpose(-1, -2)).float()  # [B, H, n, bs, nk*bs]
        if softcap > 0.0:
            scores = softcap * torch.tanh(scores / softcap)
        dropped = drop[:, :, c]
        if mask is not None:
            m = _mask_at(mask, bi.unsqueeze(-1), head_ids.view(1, -1, 1, 1, 1), pos_i[c],
                         pos_j[:, :, c].expand(b, hq, -1, -1, -1), sq, sk)
            if m.dtype == torch.bool:
                dropped = dropped | ~m
            else:
                scores = scores + m.float()
        scores.masked_fill_(dropped, float("-inf"))
        oc = torch.matmul(torch.softmax(scores, -1).to(v.dtype), vg)
        # A query whose kept keys are all masked has an all -inf row, NaN after softmax: zeros,
        # as the dense op gives. Fixing the small output is cheaper than scanning the scores.
        out[:, :, c] = torch.where(oc.isnan(), 0.0, oc)
    return out.reshape(b, hq, nqb * bs, dv)[:, :, :sq]


def _slice_heads(mask: Optional[Tensor], heads: Tensor) -> Optional[Tensor]:
    if mask is None or mask.dim() < 3 or mask.shape[-3] == 1:
        return mask
    return mask.index_select(mask.dim() - 3, heads)


def head_groups(pattern, hq: int, device=None):
    """[(head index tensor on ``device``, pattern or None for exact)] covering every head once."""
    if not isinstance(pattern, HeadMix):
        return [(torch.arange(hq, device=device), pattern)]
    out, claimed = [], set()
    for heads, var in pattern.groups:
        if heads is not None:
            bad = [h for h in heads if h >= hq]
            if bad:
                raise ValueError(f"head mix names heads {bad}, but the site has {hq} heads")
            claimed |= set(heads)
    for heads, var in pattern.groups:
        hs = [h for h in range(hq) if h not in claimed] if heads is None else list(heads)
        if hs:
            out.append((torch.tensor(hs, device=device), var.pattern if var.kind == "sparse" else None))
    covered = sorted(int(h) for hs, _ in out for h in hs)
    if covered != list(range(hq)):
        missing = sorted(set(range(hq)) - set(covered))
        raise ValueError(f"head mix leaves heads {missing} without a variant; add heads[*]=...")
    return out


def sparse_attention_reference(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None, scale: float = 1.0,
                               is_causal: bool = False, softcap: float = 0.0, spec: str = "") -> Tensor:
    pattern = parse_variant(spec).pattern
    hq, hkv = q.shape[1], k.shape[1]
    kv_map = kv_head_map(hq, hkv, q.device)
    groups = head_groups(pattern, hq, q.device)
    if len(groups) == 1 and groups[0][1] is not None:
        layout = layout_for(groups[0][1], q, k, scale, is_causal, kv_map)
        return run_layout(q, k, v, layout, kv_map, mask, scale, is_causal, softcap, torch.arange(hq, device=q.device))
    out = q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=v.dtype)
    for heads, pat in groups:
        qh, kvh = q.index_select(1, heads), kv_map[heads]
        if pat is None:
            o = attention_reference(qh, k.index_select(1, kvh), v.index_select(1, kvh), _slice_heads(mask, heads),
                                    scale, is_causal, softcap)
        else:
            layout = layout_for(pat, qh, k, scale, is_causal, kvh)
            o = run_layout(qh, k, v, layout, kvh, mask, scale, is_causal, softcap, heads)
        out.index_copy_(1, heads, o)
    return out


@torch.library.custom_op("attnforge::sparse_attention", mutates_args=())
def sparse_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None, scale: float = 1.0,
                     is_causal: bool = False, softcap: float = 0.0, spec: str = "") -> Tensor:
    return sparse_attention_reference(q, k, v, mask, scale, is_causal, softcap, spec)


@sparse_attention.register_fake
def _sparse_attention_fake(q, k, v, mask=None, scale=1.0, is_causal=False, softcap=0.0, spec=""):
    return q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=v.dtype)


# ---------------------------------------------------------------------------- measuring


def sparse_keep_rows(q: Tensor, k: Tensor, spec: str, scale: float, causal: bool):
    """``rows(r0, r1)``: the pairs the op attends for queries ``r0:r1``, a dense
    [B, Hq, r1 - r0, Sk] mask (before the user's mask). Layouts are built once, rows on demand,
    so measuring a long site holds one block of rows at a time."""
    pattern = parse_variant(spec).pattern
    b, hq, sq, _ = q.shape
    sk = k.shape[2]
    dev = q.device
    kv_map = kv_head_map(hq, k.shape[1], dev)
    groups = [(heads, None if pat is None else layout_for(pat, q.index_select(1, heads), k, scale, causal,
                                                          kv_map[heads]))
              for heads, pat in head_groups(pattern, hq, dev)]

    def rows(r0: int, r1: int) -> Tensor:
        keep = torch.zeros(b, hq, r1 - r0, sk, dtype=torch.bool, device=dev)
        for heads, layout in groups:
            if layout is None:
                g = torch.ones(r1 - r0, sk, dtype=torch.bool, device=dev)
                keep[:, heads] = g.tril(r0) if causal else g
            else:
                keep[:, heads] = layout.dense_keep(causal, r0, r1).to(dev).expand(b, len(heads), r1 - r0, sk)
        return keep

    return rows


def sparse_keep_mask(q: Tensor, k: Tensor, spec: str, scale: float, causal: bool) -> Tensor:
    """The pairs the op attends as a dense [B, Hq, Sq, Sk] mask (before the user's mask)."""
    return sparse_keep_rows(q, k, spec, scale, causal)(0, q.shape[2])


def sparse_computed_pairs(q: Tensor, k: Tensor, spec: str, scale: float, causal: bool) -> float:
    """Scores the reference computes per (batch, head), averaged over both."""
    pattern = parse_variant(spec).pattern
    hq, sq, sk = q.shape[1], q.shape[2], k.shape[2]
    kv_map = kv_head_map(hq, k.shape[1], q.device)
    total = 0.0
    for heads, pat in head_groups(pattern, hq, q.device):
        if pat is None:
            pairs = float(causal_pairs(sq, sk) if causal else sq * sk)
        else:
            pairs = layout_for(pat, q.index_select(1, heads), k, scale, causal, kv_map[heads]).computed_pairs()
        total += pairs * len(heads)
    return total / hq


SPARSE_ATTENTION = torch.ops.attnforge.sparse_attention.default
