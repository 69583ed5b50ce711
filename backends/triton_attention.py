"""Triton attention forward: one kernel for dense, split-key (decode) and block-sparse work.

Every program owns one query tile of one (batch, query head) and walks key tiles with an
online softmax in fp32 (one pass over K/V, as FlashAttention). What varies is only which key
tiles it walks:

* dense: every tile up to the causal bound, or a slice of them when the key range is split
  across programs (``NUM_SPLITS > 1``, the flash-decoding path for one or a few queries over a
  long cache: each split writes its partial output and log-sum-exp, merged afterwards);
* sparse: the tiles a ``BlockLayout`` lists for this (batch, head, query block). A per-slot
  kind says whether the tile is *full* (every pair kept: no masking at all), *partial* (only
  bounds and causality to apply) or names a precomputed keep tile (a window edge, a diagonal,
  a grid neighbourhood). One kernel therefore serves every sparse pattern and per-head mixes.

For decode, the query heads that share a kv head are packed as the rows of one tile (when no
row's position matters: no causality, a key mask at most), so the cache is read once per kv
head.

The key/value head is ``h // GROUP`` (grouped-query attention without repeating K/V). Masks
are read through strides, so a broadcast mask ([Sq, Sk], [B, 1, 1, Sk], ...) is never
materialised. Rows that keep no key produce zeros, never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from backends.triton_schedule import SCHEDULER, KernelConfig, decode_splits, dense_candidates, make_key, num_sms

FULL_SLOT = -1  # slot kind: every pair of the tile is kept
PARTIAL_SLOT = -2  # slot kind: apply bounds and causality only; >= 0: also a keep tile
FULL: tl.constexpr = tl.constexpr(FULL_SLOT)
PARTIAL: tl.constexpr = tl.constexpr(PARTIAL_SLOT)
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


@triton.jit
def _tanh(x):
    # 1 - 2 / (e^{2x} + 1) saturates correctly at both ends (inf -> 1, 0 -> -1).
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _attention_fwd(
    Q, K, V, Mask, Out, Lse,
    KVBlocks, Counts, Kinds, Tiles, Order,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od, stride_os,
    stride_lb, stride_lh, stride_lm, stride_ls,
    stride_ib, stride_ih, stride_iq, stride_ik,
    stride_cb, stride_ch,
    stride_rb, stride_rh,
    HQ, SQ, SK, D, DV, scale, softcap,
    GROUP: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,  # 0 none, 1 boolean keep-mask, 2 additive bias
    SOFTCAP: tl.constexpr,
    SPARSE: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCKS_INNER: tl.constexpr,  # launch order: a head's query blocks side by side (K/V shared in L2)
):
    # int64: batch and head offsets can pass 2**31 elements.
    if BLOCKS_INNER:
        slot = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
    else:
        bh = tl.program_id(0).to(tl.int64)
        slot = tl.program_id(1)
    split = tl.program_id(2)
    b = bh // HQ
    h = bh % HQ
    hk = h // GROUP
    # Query blocks are launched heaviest first (the order array), so the long tail of work
    # starts early instead of last.
    qb = tl.load(Order + b * stride_rb + h * stride_rh + slot)
    start_m = qb * BLOCK_M

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < SQ

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    m_base = Mask + b * stride_mb + h * stride_mh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    if SPARSE:
        list_base = b * stride_ib + h * stride_ih + qb * stride_iq
        n_iter = tl.load(Counts + b * stride_cb + h * stride_ch + qb)
    else:
        hi = SK
        if CAUSAL:
            hi = tl.minimum(hi, start_m + BLOCK_M)  # top-left aligned: query i sees keys j <= i
        tiles = tl.cdiv(SK, BLOCK_N)
        per_split = tl.cdiv(tiles, NUM_SPLITS)
        lo = split * per_split * BLOCK_N
        hi = tl.minimum(hi, lo + per_split * BLOCK_N)
        n_iter = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N)

    for it in range(0, n_iter):
        if SPARSE:
            start_n = tl.load(KVBlocks + list_base + it * stride_ik) * BLOCK_N
            kind = tl.load(Kinds + list_base + it * stride_ik)
        else:
            start_n = lo + it * BLOCK_N
            ragged = start_n + BLOCK_N > SK
            if CAUSAL:
                ragged = ragged | (start_n + BLOCK_N - 1 > start_m)
            kind = tl.where(ragged, PARTIAL, FULL)
        offs_n = start_n + offs_n0
        col_ok = offs_n < SK
        k = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                    mask=col_ok[None, :] & (offs_d[:, None] < D), other=0.0)
        # Scores are kept in base 2 (times log2 e) so the softmax uses exp2, one multiply fewer.
        if SOFTCAP:
            s = (softcap * LOG2E) * _tanh(tl.dot(q, k, input_precision=PRECISION) * (scale / softcap))
        else:
            s = tl.dot(q, k, input_precision=PRECISION) * (scale * LOG2E)
        if MASK_KIND != 0:
            mvals = tl.load(m_base + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn,
                            mask=row_ok[:, None] & col_ok[None, :], other=0)
            if MASK_KIND == 1:
                s = tl.where(mvals != 0, s, float("-inf"))
            else:
                s = s + mvals.to(tl.float32) * LOG2E
        if kind != FULL:
            keep = col_ok[None, :] & row_ok[:, None]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None])
            if kind >= 0:
                tile = tl.load(Tiles + kind * BLOCK_M * BLOCK_N + offs_n0[None, :]
                               + tl.arange(0, BLOCK_M)[:, None] * BLOCK_N)
                keep = keep & (tile != 0)
            s = tl.where(keep, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing kept so far has m = -inf; shifting by 0 keeps exp() at 0, not NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=col_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = (Out + b * stride_ob + h * stride_oh + split * stride_os + offs_m[:, None] * stride_om
              + offs_dv[None, :] * stride_od)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    if NUM_SPLITS > 1:
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i))) / LOG2E)
        tl.store(Lse + b * stride_lb + h * stride_lh + split * stride_ls + offs_m * stride_lm, lse, mask=row_ok)


# ---------------------------------------------------------------------------- launchers


@dataclass
class SparseTables:
    """A block layout as the kernel reads it; [Bl, Hl, ...] with Bl in {1, B}, Hl in {1, Hq}."""

    block: int
    kv_blocks: Tensor  # int32 [Bl, Hl, nqb, K]: key block per slot (first ``counts`` valid)
    counts: Tensor  # int32 [Bl, Hl, nqb]
    kinds: Tensor  # int32 [Bl, Hl, nqb, K]: FULL, PARTIAL or a row of ``tiles``
    tiles: Tensor  # uint8 [T, block, block]: keep tiles of blocks only partly kept
    order: Tensor  # int32 [Bl, Hl, nqb]: query blocks, heaviest first


MAX_GRID_Y = 65535  # CUDA's limit on a launch grid's second dimension
PACK_ROWS = 64  # decode: the query heads of one kv head packed as the rows of one tile, up to this many


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(int(n)))


def _mask4(mask: Optional[Tensor], b: int, h: int, sq: int, sk: int) -> Optional[Tensor]:
    """A broadcastable mask as a [B, Hq, Sq, Sk] view (stride 0 where it broadcasts)."""
    if mask is None:
        return None
    m = mask.reshape(*[1] * (4 - mask.dim()), *mask.shape).expand(b, h, sq, sk)
    return m.view(torch.uint8) if m.dtype == torch.bool else m


def _strides4(x: Optional[Tensor]) -> tuple:
    return tuple(x.stride()) if x is not None else (0, 0, 0, 0)


def _b_h(x: Tensor, b: int, h: int) -> Tensor:
    return x.expand(b, h, *x.shape[2:])


def _launch(q, k, v, mask, scale, causal, softcap, config: KernelConfig, splits: int, tables: Optional[SparseTables]):
    b, hq, sq, d = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[-1]
    m4 = _mask4(mask, b, hq, sq, sk)
    mask_kind = 0 if m4 is None else (1 if m4.dtype == torch.uint8 else 2)
    nqb = triton.cdiv(sq, config.block_m)
    if splits > 1:
        out = torch.empty((b, hq, sq, dv, splits), dtype=torch.float32, device=q.device)
        lse = torch.empty((b, hq, sq, splits), dtype=torch.float32, device=q.device)
        so, sl = out.stride(), lse.stride()
        o_strides = (so[0], so[1], so[2], so[3], so[4])
        l_strides = (sl[0], sl[1], sl[2], sl[3])
    else:
        out = torch.empty((b, hq, sq, dv), dtype=v.dtype, device=q.device)
        lse = out  # not written
        so = out.stride()
        o_strides = (so[0], so[1], so[2], so[3], 0)
        l_strides = (0, 0, 0, 0)
    if tables is None:
        dummy = torch.zeros(1, dtype=torch.int32, device=q.device)
        blocks = counts = kinds = dummy.view(1, 1, 1, 1)
        tiles = dummy.view(torch.uint8)
        # Causal query blocks get heavier with their index: launch them last-first.
        order = torch.arange(nqb, dtype=torch.int32, device=q.device)
        order = (order.flip(0) if causal else order).view(1, 1, nqb).expand(b, hq, nqb)
        i_strides, c_strides = (0, 0, 0, 0), (0, 0)
    else:
        blocks, kinds = _b_h(tables.kv_blocks, b, hq), _b_h(tables.kinds, b, hq)
        counts, order, tiles = _b_h(tables.counts, b, hq), _b_h(tables.order, b, hq), tables.tiles
        i_strides, c_strides = tuple(blocks.stride()), tuple(counts.stride()[:2])
        assert kinds.stride() == blocks.stride(), "kinds must be laid out like kv_blocks"
    blocks_inner = config.blocks_inner and b * hq <= MAX_GRID_Y
    grid = (nqb, b * hq, splits) if blocks_inner else (b * hq, nqb, splits)
    _attention_fwd[grid](
        q, k, v, m4 if m4 is not None else q, out, lse,
        blocks, counts, kinds, tiles, order,
        *q.stride(), *k.stride(), *v.stride(), *_strides4(m4), *o_strides, *l_strides,
        *i_strides, *c_strides, *order.stride()[:2],
        hq, sq, sk, d, dv, float(scale), float(softcap),
        GROUP=hq // hkv, CAUSAL=bool(causal), MASK_KIND=mask_kind, SOFTCAP=softcap > 0.0,
        SPARSE=tables is not None, NUM_SPLITS=splits,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=_pow2(d), BLOCK_DV=_pow2(dv),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", BLOCKS_INNER=blocks_inner,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if splits == 1:
        return out
    return merge_splits(out, lse).to(v.dtype)


def merge_splits(out: Tensor, lse: Tensor) -> Tensor:
    """Combine per-split normalised outputs [.., Dv, S] by their log-sum-exps [.., S]."""
    top = lse.amax(-1, keepdim=True)
    top = torch.where(top == float("-inf"), torch.zeros_like(top), top)  # a row with no key at all
    w = torch.exp(lse - top)
    total = w.sum(-1, keepdim=True)
    return (out * w.unsqueeze(-2)).sum(-1) / torch.where(total == 0, torch.ones_like(total), total)


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be [batch, heads, seq, head_dim]")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"{q.shape[1]} query heads do not divide into {k.shape[1]} key/value heads")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")


def _packable(q: Tensor, k: Tensor, mask: Optional[Tensor], causal: bool) -> bool:
    """Grouped query heads can share one tile when a row's position does not matter: no causality
    and a mask (if any) that is the same for every head and query, a key mask."""
    group = q.shape[1] // k.shape[1]
    if group == 1 or causal or group * q.shape[2] > PACK_ROWS:
        return False
    if mask is None:
        return True
    shape = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    return shape[1] == 1 and shape[2] == 1


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None, scale: float = 1.0,
              is_causal: bool = False, softcap: float = 0.0, config: Optional[KernelConfig] = None,
              splits: Optional[int] = None, record: Optional[dict] = None) -> Tensor:
    """``attnforge::attention`` in one Triton kernel; the decode path (few queries, long keys)
    splits the key range when that fills the GPU better. ``config``/``splits`` override the
    scheduler (tests and benchmarks); ``record`` receives what was chosen."""
    _check(q, k, v)
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if _packable(q, k, mask, is_causal):
        # The query heads sharing a kv head become rows of one tile, so each K/V tile is read once
        # per kv head instead of once per query head: decode is bound by reading the cache.
        packed = attention(q.reshape(b, hkv, (hq // hkv) * sq, d), k, v, mask, scale, False, softcap, config,
                           splits, record)
        if record is not None:
            record["packed_heads"] = hq // hkv
        return packed.reshape(b, hq, sq, v.shape[-1])

    def pick_splits(c: KernelConfig) -> int:
        if splits is not None:
            return splits
        if is_causal:
            return 1  # top-left causal: a query's keys end at its own index, nothing long to split
        return decode_splits(b * hq * triton.cdiv(sq, c.block_m), triton.cdiv(sk, c.block_n), num_sms(q.device))

    def run(c: KernelConfig):
        return _launch(q, k, v, mask, scale, is_causal, softcap, c, pick_splits(c), None)

    source = "given"
    if config is None:
        extra = ("causal" if is_causal else "full") + ("" if mask is None else f"-mask{mask.dtype == torch.bool:d}")
        choice = SCHEDULER.choose(make_key("fused", "", q, k, v, extra), dense_candidates(max(d, v.shape[-1])), run)
        config, source = choice.config, choice.source
    if record is not None:
        record.update(config=config.text(), source=source, splits=pick_splits(config))
    return run(config)


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, tables: SparseTables, mask: Optional[Tensor] = None,
                     scale: float = 1.0, is_causal: bool = False, softcap: float = 0.0,
                     config: Optional[KernelConfig] = None) -> Tensor:
    """Attention over the key blocks ``tables`` lists, in the same kernel."""
    _check(q, k, v)
    config = config or KernelConfig(tables.block, tables.block)
    if config.block_m != tables.block or config.block_n != tables.block:
        raise ValueError(f"sparse tiles must equal the layout's block {tables.block}")
    return _launch(q, k, v, mask, scale, is_causal, softcap, config, 1, tables)
