"""The torch backend's sparse attention at scale: a ``BlockLayout`` lowered to FlexAttention.

``compiler.reference.sparse_ops`` defines sparse attention by its eager reference (gather the kept key
blocks, mask, softmax). That reference is the oracle, but on CPU it pays for gathers, masks
over materialised tiles and eager op overhead, and reaches 0.1-0.5 of the ideal speedup. Here
the same layout becomes a FlexAttention ``BlockMask`` (the kept blocks per query block; the
pattern's pair predicate, causality and the user's mask as its ``mask_mod``; softcap and
additive masks as its ``score_mod``), run by ``flex_attention`` compiled with Inductor, which
skips the blocks the layout drops and fuses the rest into one kernel.

``attnforge_flex::sparse_attention`` takes the reference op's arguments; the torch backend
swaps it in for ``attnforge::sparse_attention``. Sites smaller than ``FLEX_MIN_PAIRS`` (a
compile costs seconds, a small site microseconds), head mixes and anything FlexAttention
cannot take run the reference. ``ATTNFORGE_FLEX=0`` turns the lowering off, ``=1`` forces it
at every size (tests).
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from typing import Optional

import torch
from torch import Tensor

from compiler.variants.block_layout import BlockLayout
from compiler.reference.sparse_ops import head_groups, kv_head_map, layout_for, sparse_attention_reference
from compiler.variants.language import parse_variant
from compiler.ir.errors import first_line

FLEX_MIN_PAIRS = 1 << 22  # (query, key) pairs per head below which the reference is faster
_compiled = None
RECOMPILE_LIMIT = 64  # distinct (layout, shape) pairs compiled per process before the reference takes over
_failed: Optional[str] = None


def _mode() -> str:
    return os.environ.get("ATTNFORGE_FLEX", "auto")


def block_mask(layout: BlockLayout, b: int, hq: int, sq: int, sk: int, causal: bool, mask: Optional[Tensor],
               device, standalone: bool = True) -> tuple:
    """(BlockMask, score_mod or None) computing ``layout`` with causality and a boolean mask.

    ``standalone``: the mask_mod alone gives the layout's pairs, as eager FlexAttention (which
    evaluates it on every pair) needs. The compiled kernel evaluates it only inside the listed
    partial blocks, where block membership is already known: there (``standalone=False``) it is
    the closed-form pair predicate, with no per-pair block-table lookup (a gather the kernel
    cannot vectorize; it cost 20-25% of a window's run time at 8k)."""
    from torch.nn.attention.flex_attention import BlockMask

    bs = layout.block
    kvb = layout.kv_blocks.to(device)
    nkb = -(-sk // bs)
    listed = kvb >= 0
    # Which listed blocks keep every pair: FlexAttention runs those without the mask_mod. A
    # whole-block layout (top-k, block-sparse) needs no pairs for that: per call it costs
    # O(blocks), not O(kept pairs).
    if layout.pair_keep is None:
        full = layout.whole_blocks_full(causal).to(device)
    else:
        pairs = layout.gathered_keep(causal).to(device).expand(*kvb.shape[:3], bs, kvb.shape[-1] * bs)
        full = listed & pairs.reshape(*kvb.shape[:3], bs, -1, bs).all(-1).all(-2)
    if mask is not None:
        full = torch.zeros_like(full)
    if sq % bs:
        full[:, :, -1] = False
    if sk % bs:
        full = full & (kvb != nkb - 1)
    partial = listed & ~full

    def lists(sel):
        # Kept block ids first (ascending), a column per key block as FlexAttention wants.
        ids = torch.where(sel, kvb, torch.full_like(kvb, nkb))
        ids = torch.nn.functional.pad(ids.sort(-1).values, (0, max(0, nkb - ids.shape[-1])), value=nkb)
        return sel.sum(-1).to(torch.int32), ids[..., :nkb].clamp(max=nkb - 1).to(torch.int32)

    table = None
    if standalone:
        table = torch.zeros(*kvb.shape[:3], nkb + 1, dtype=torch.bool, device=device)
        table.scatter_(-1, torch.where(listed, kvb, nkb), True)
        table = table[..., :nkb].contiguous()
    pair_keep = layout.pair_keep
    keep_mask = bias = None
    if mask is not None:
        m = mask.reshape(*[1] * (4 - mask.dim()), *mask.shape)
        if m.dtype == torch.bool:
            keep_mask = m
        else:
            bias = m

    def at(m: Tensor, bi, h, i, j):
        return m[bi if m.shape[0] > 1 else 0, h if m.shape[1] > 1 else 0, i if m.shape[2] > 1 else 0,
                 j if m.shape[3] > 1 else 0]

    def mask_mod(bi, h, i, j):
        keep = j < sk
        if table is not None:
            keep = keep & at(table, bi, h, i // bs, j // bs)
        if causal:
            keep = keep & (j <= i)
        if pair_keep is not None:
            keep = keep & pair_keep(i, j)
        if keep_mask is not None:
            keep = keep & at(keep_mask, bi, h, i, j)
        if bias is not None:
            # -inf in an additive mask drops the pair, so a row with nothing left gives zeros.
            keep = keep & (at(bias, bi, h, i, j) > float("-inf"))
        return keep

    num, idx = lists(partial)
    fnum, fidx = lists(full)
    # The q-side lists serve only the backward pass (four sorts of [nkb, nqb], ~25 ms a call at 16k).
    bm = BlockMask.from_kv_blocks(num, idx, fnum, fidx, BLOCK_SIZE=bs, mask_mod=mask_mod, seq_lengths=(sq, sk),
                                  compute_q_blocks=False)
    return bm, bias


def _score_mod(bias: Optional[Tensor], softcap: float):
    if bias is None and softcap <= 0.0:
        return None

    def score_mod(score, bi, h, i, j):
        if softcap > 0.0:
            score = softcap * torch.tanh(score / softcap)
        if bias is not None:
            score = score + bias[bi if bias.shape[0] > 1 else 0, h if bias.shape[1] > 1 else 0,
                                 i if bias.shape[2] > 1 else 0, j].float()
        return score

    return score_mod


@contextmanager
def _serial(device):
    """One CPU thread for the per-call selection (pooled scores, top-k, block lists): its ops
    are small, and waking the intra-op pool for each costs more than the op. On a 2-core machine
    shared with other work it was 0.6 s per call with 2 threads and 16 ms with one."""
    n = torch.get_num_threads()
    if device.type != "cpu" or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def flex_sparse(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float, is_causal: bool,
                softcap: float, spec: str, compiled: bool = True) -> Optional[Tensor]:
    """The sparse op through FlexAttention, or None when this site is not one it takes."""
    from torch.nn.attention.flex_attention import flex_attention

    groups = head_groups(parse_variant(spec).pattern, q.shape[1], q.device)
    if len(groups) != 1 or groups[0][1] is None:
        return None  # head mixes: the reference
    b, hq, sq, _ = q.shape
    sk = k.shape[2]
    with _serial(q.device):
        layout = layout_for(groups[0][1], q, k, scale, is_causal, kv_head_map(hq, k.shape[1], q.device))
        key = ("flex", is_causal, compiled, str(q.device))
        if mask is None and key in layout._keep_cache:  # a static layout is reused across calls
            bm, bias = layout._keep_cache[key], None
        else:
            bm, bias = block_mask(layout, b, hq, sq, sk, is_causal, mask, q.device, standalone=not compiled)
            if mask is None:
                layout._keep_cache[key] = bm
    fn = flex_attention
    if compiled:
        global _compiled
        if _compiled is None:
            _compiled = torch.compile(flex_attention, dynamic=False)
        fn = _compiled
    dtype = v.dtype
    # Every site layout (its mask_mod) and shape is a recompile of the one flex_attention frame.
    # Past dynamo's limit it would silently run flex's unfused fallback, which materialises the
    # whole score matrix (the memory blow-up this lowering exists to avoid): allow a model's worth
    # of recompiles, and past that fail loudly, so the caller runs the bounded-memory reference.
    # The op is inference-only; no_grad keeps grad mode from being one more recompile reason.
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT,
                                                     fail_on_recompile_limit_hit=True):
        out = fn(q, k, v.to(q.dtype), score_mod=_score_mod(bias, softcap), block_mask=bm, scale=scale,
                 enable_gqa=k.shape[1] != hq)
    return out.to(dtype)


def wants_flex(q: Tensor, k: Tensor, v: Tensor) -> bool:
    mode = _mode()
    if mode == "0" or _failed is not None:
        return False
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16) or q.dtype != k.dtype:
        return False
    return mode == "1" or q.shape[2] * k.shape[2] >= FLEX_MIN_PAIRS


@torch.library.custom_op("attnforge_flex::sparse_attention", mutates_args=())
def sparse_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None, scale: float = 1.0,
                     is_causal: bool = False, softcap: float = 0.0, spec: str = "") -> Tensor:
    global _failed
    if wants_flex(q, k, v):
        try:
            out = flex_sparse(q, k, v, mask, scale, is_causal, softcap, spec)
            if out is not None:
                return out
        except Exception as e:  # noqa: BLE001 - no compiler, an unsupported shape: the reference is exact
            _failed = f"{type(e).__name__}: {first_line(e)}"
            warnings.warn(f"attnforge: FlexAttention lowering unavailable ({_failed}); sparse attention runs "
                          "the PyTorch reference", stacklevel=2)
    return sparse_attention_reference(q, k, v, mask, scale, is_causal, softcap, spec)


@sparse_attention.register_fake
def _fake(q, k, v, mask=None, scale=1.0, is_causal=False, softcap=0.0, spec=""):
    return q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=v.dtype)


FLEX_SPARSE = torch.ops.attnforge_flex.sparse_attention.default
