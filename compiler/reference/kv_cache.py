"""KV caches for generation and the op that attends over them.

``attnforge::cache_attention`` replaces a captured decoder's ``index_copy_`` cache update plus
the ``scaled_dot_product_attention`` over the whole static cache. It writes the new keys and
values into the cache buffers it is given (mutated in place, so the cache stays inside the
program) and attends over exactly the keys the site's cache layout keeps:

* a **full** group holds every position up to ``max_cache_len``; the op reads only the filled
  part ``[0, end)``, with offset causality (query at position ``p`` sees keys ``j <= p``);
* a **ring** group (StreamingLLM) holds ``sinks`` slots for the first positions plus
  ``R = window + 1`` rolling slots; position ``p >= sinks`` is written to slot
  ``sinks + (p - sinks) % R``. Query ``p`` sees keys ``j < sinks`` and ``p - window <= j <= p``:
  ``window`` means what it means in ``compiler.compile`` (``window:left`` keeps keys
  ``i - left .. i``), so a policy keeps the same keys in prefill and decode. Keys keep the rotary
  position they were written with; nothing is re-rotated.

A layout is one group per set of KV heads (DuoAttention: retrieval heads full, streaming
heads a ring), written ``0-1:full|2-3:sinks=4,window=16``; the op receives one cache tensor
per group. A full cache may carry a sparse **prefill** pattern (``0-1:full#topk:blocks=8,block=64``,
MInference / FlexPrefill): a prompt prefilled from position 0 in one call attends only the
pairs the pattern keeps (``attnforge::sparse_attention``); decode steps, and chunks that start
past 0, read the full cache exactly.

Query head ``h`` reads KV head ``h // (Hq // Hkv)``, grouped-query attention is native
(``enable_gqa``), nothing is repeated.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class CacheGroup:
    kv_heads: tuple  # KV head indices this group's cache holds
    sinks: int = 0
    window: Optional[int] = None  # keys before the current one (compile()'s window:left); None: a full cache
    prefill: str = ""  # a sparse pattern's text for a prompt's prefill (full caches only)

    @property
    def bounded(self) -> bool:
        return self.window is not None

    @property
    def ring(self) -> Optional[int]:
        """Rolling slots: the ``window`` previous keys and the current one (None: a full cache)."""
        return None if self.window is None else self.window + 1

    def slots(self, max_cache_len: int) -> int:
        return max_cache_len if self.window is None else self.sinks + self.ring

    @property
    def text(self) -> str:
        if len(self.kv_heads) == 1:
            heads = str(self.kv_heads[0])
        elif _contiguous(self.kv_heads):
            heads = f"{self.kv_heads[0]}-{self.kv_heads[-1]}"
        else:
            heads = ",".join(map(str, self.kv_heads))
        return f"{heads}:" + ("full" if self.window is None else f"sinks={self.sinks},window={self.window}")


def _contiguous(heads: tuple) -> bool:
    return list(heads) == list(range(heads[0], heads[0] + len(heads)))


def layout_text(groups: list[CacheGroup]) -> str:
    prefill = next((g.prefill for g in groups if g.prefill), "")
    return "|".join(g.text for g in groups) + (f"#{prefill}" if prefill else "")


@lru_cache(maxsize=256)
def parse_layout(text: str) -> tuple:
    text, _, prefill = text.partition("#")
    groups = []
    for part in text.split("|"):
        heads, kind = part.split(":", 1)
        if "-" in heads:
            lo, hi = heads.split("-")
            hs = tuple(range(int(lo), int(hi) + 1))
        else:
            hs = tuple(int(h) for h in heads.split(","))
        if kind == "full":
            groups.append(CacheGroup(hs, prefill=prefill))
        else:
            kv = dict(item.split("=") for item in kind.split(","))
            groups.append(CacheGroup(hs, int(kv["sinks"]), int(kv["window"])))
    return tuple(groups)


def ring_slot_positions(p0: int, sinks: int, window: int) -> Tensor:
    """The position each filled slot of a ring (``window`` rolling slots: ``CacheGroup.ring``)
    holds once positions ``[0, p0)`` were written."""
    filled = min(p0, sinks + window)
    s = torch.arange(filled)
    r = s - sinks
    latest = sinks + r + window * torch.div(p0 - 1 - sinks - r, window, rounding_mode="floor")
    return torch.where(s < sinks, s, latest)


def ring_slots(positions: Tensor, sinks: int, window: int) -> Tensor:
    return torch.where(positions < sinks, positions, sinks + (positions - sinks) % window)


def keep_mask(q_pos: Tensor, k_pos: Tensor, sinks: int, window: Optional[int]) -> Tensor:
    """[Sq, Sk] True where query position ``q_pos[i]`` attends key position ``k_pos[j]``; ``window``
    counts the current key (a ring's length)."""
    qp, kp = q_pos[:, None], k_pos[None, :]
    keep = kp <= qp
    if window is not None:
        keep &= (kp < sinks) | (kp > qp - window)
    return keep


def _attend(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Optional[Tensor] = None,
            causal: bool = False) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def _group_attention(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, kc: Tensor, vc: Tensor,
                     g: CacheGroup, scale: float, attend=_attend) -> Tensor:
    n = positions.numel()
    p0 = int(positions[0])
    end = p0 + n
    if g.window is None:
        kc.index_copy_(2, positions, k)
        vc.index_copy_(2, positions, v)
        keys, values = kc[:, :, :end], vc[:, :, :end]
        if g.prefill and p0 == 0 and n > 1:  # a prompt's sparse prefill; its keys are the new ones
            # By the op (registered by compiler.reference.sparse_ops, which the generator loads): kv_cache and
            # sparse_ops are independent modules of one layer.
            return torch.ops.attnforge.sparse_attention(q, k, v, None, scale, True, 0.0, g.prefill)
        if n == 1:  # one query at the newest position sees every filled key
            return attend(q, keys, values, scale)
        if p0 == 0:
            return attend(q, keys, values, scale, causal=True)
        return attend(q, keys, values, scale, keep_mask(positions, torch.arange(end, device=q.device), 0, None))
    s, w = g.sinks, g.ring
    if n == 1:
        slot = ring_slots(positions, s, w)
        kc.index_copy_(2, slot, k)
        vc.index_copy_(2, slot, v)
        filled = min(end, s + w)  # every filled slot is a kept key of the newest query
        return attend(q, kc[:, :, :filled], vc[:, :, :filled], scale)
    # A chunk of queries (prefill): the ring's history plus the new keys, each query its keep set.
    before = min(p0, s + w)
    if end <= s + w and p0 == 0:  # nothing has left the window yet: plain causal attention
        out = attend(q, k, v, scale, causal=True)
        kc[:, :, :n], vc[:, :, :n] = k, v
        return out
    hist_pos = ring_slot_positions(p0, s, w).to(positions.device)
    keys = torch.cat([kc[:, :, :before], k], dim=2)
    values = torch.cat([vc[:, :, :before], v], dim=2)
    k_pos = torch.cat([hist_pos, positions])
    out = attend(q, keys, values, scale, keep_mask(positions, k_pos, s, w))
    # Only the tokens the ring keeps are written, so no slot is written twice.
    kept = (positions < s) | (positions >= end - w)
    slot = ring_slots(positions[kept], s, w)
    kc.index_copy_(2, slot, k[:, :, kept])
    vc.index_copy_(2, slot, v[:, :, kept])
    return out


def cache_attention_eager(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, k_caches: list[Tensor],
                          v_caches: list[Tensor], layout: str, scale: float, attend=_attend) -> Tensor:
    """The op's implementation, which the torch backend calls directly: a decode step is a few
    small calls, and the custom-op dispatcher's Python layers cost as much as the attention.
    ``attend(q, k, v, scale, mask=None, causal=False)`` is the attention over the kept keys
    (SDPA here; the Triton backend passes its kernel)."""
    groups = parse_layout(layout)
    hq, hkv = q.shape[1], k.shape[1]
    if len(groups) == 1:
        return _group_attention(q, k, v, positions, k_caches[0], v_caches[0], groups[0], scale, attend)
    rep = hq // hkv
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    for g, kc, vc in zip(groups, k_caches, v_caches):
        kv = torch.tensor(g.kv_heads, device=q.device)
        qh = (kv[:, None] * rep + torch.arange(rep, device=q.device)).flatten()
        o = _group_attention(q.index_select(1, qh), k.index_select(1, kv), v.index_select(1, kv), positions,
                             kc, vc, g, scale, attend)
        out.index_copy_(1, qh, o)
    return out


@torch.library.custom_op("attnforge::cache_attention", mutates_args=("k_caches", "v_caches"))
def cache_attention(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, k_caches: list[Tensor],
                    v_caches: list[Tensor], layout: str, scale: float) -> Tensor:
    return cache_attention_eager(q, k, v, positions, k_caches, v_caches, layout, scale)


@cache_attention.register_fake
def _cache_attention_fake(q, k, v, positions, k_caches, v_caches, layout, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))

