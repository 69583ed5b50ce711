"""``attnforge::cache_attention`` on the Triton backend: the cache writes stay in PyTorch (a few
``index_copy_``s into the same buffers), the attention over the kept keys runs in the Triton
attention kernel (``backends.triton_attention``): a decode step's one query per head takes the
split-key path with the query heads of a KV head packed into one tile, so the cache is read
once per KV head; a prefill chunk runs causal or with its keep mask."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from backends.triton_attention import attention
from compiler.reference.kv_cache import cache_attention_eager


def _attend(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Optional[Tensor] = None,
            causal: bool = False) -> Tensor:
    return attention(q, k, v, mask, scale, is_causal=causal)


def cache_attention_triton(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, k_caches: list[Tensor],
                           v_caches: list[Tensor], layout: str, scale: float) -> Tensor:
    return cache_attention_eager(q, k, v, positions, k_caches, v_caches, layout, scale, _attend)
