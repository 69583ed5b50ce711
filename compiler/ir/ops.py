"""The attention op vocabulary.

``attnforge::attention`` is exact softmax attention with everything the discovery pass can
recover from a hand-written graph kept as attributes instead of tensors:

* ``scale``: the factor applied to ``q @ k^T``;
* ``is_causal``: top-left aligned causal masking (query ``i`` sees keys ``j <= i``), as in
  ``scaled_dot_product_attention``; recovered from mask construction, never a dense mask;
* ``mask``: optional boolean keep-mask (True = attend) or additive float bias, broadcastable
  to ``[B, Hq, Sq, Sk]``;
* grouped-query attention natively: ``k``/``v`` carry ``Hkv`` heads, ``Hq % Hkv == 0`` and
  query head ``h`` reads kv head ``h // (Hq // Hkv)``; nothing is repeated;
* ``softcap``: when > 0, scores become ``softcap * tanh(scores / softcap)`` (Gemma 2).

Rows whose keys are all masked produce zeros, never NaN. Scores and softmax run in fp32 (fp64
for fp64 inputs): ``softmax_dtype``.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def softmax_dtype(dt: torch.dtype) -> torch.dtype:
    """The precision the op computes scores and softmax in for inputs of dtype ``dt``."""
    return torch.float64 if dt == torch.float64 else torch.float32


# Bytes of fp32 scores one block of query rows may take. Exact attention larger than this runs
# a block of queries at a time (measurement, verification and the torch backend alike), so
# long context needs O(S * block) memory, not O(S^2). A test knob as much as a setting.
BLOCK_BYTES = int(os.environ.get("ATTNFORGE_BLOCK_BYTES", 64 << 20))


def query_block(b: int, hq: int, sk: int) -> int:
    """Query rows per block so that one block's fp32 scores fit ``BLOCK_BYTES``."""
    return max(1, BLOCK_BYTES // max(1, b * hq * sk * 4))


def mask_rows(mask: Optional[Tensor], r0: int, r1: int) -> Optional[Tensor]:
    """The rows ``r0:r1`` of a mask broadcastable to [.., Sq, Sk] (a key mask has one row)."""
    if mask is None or mask.dim() < 2 or mask.shape[-2] == 1:
        return mask
    return mask[..., r0:r1, :]


def _grouped(x: Tensor, hkv: int) -> Tensor:
    """[B, Hq, ...] -> [B, Hkv, rep, ...] as a view, so GQA broadcasts instead of repeating."""
    b, hq = x.shape[0], x.shape[1]
    return x.reshape(b, hkv, hq // hkv, *x.shape[2:])


def _grouped_mask(mask: Tensor, hq: int, hkv: int) -> Tensor:
    """Broadcast a [.., Sq, Sk] mask against grouped scores [B, Hkv, rep, Sq, Sk]."""
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    if mask.shape[1] == 1:
        return mask.unsqueeze(2)
    return mask.reshape(mask.shape[0], hkv, hq // hkv, *mask.shape[2:])


def _probabilities(q: Tensor, k: Tensor, mask: Optional[Tensor], scale: float, is_causal: bool, softcap: float,
                   row0: int) -> Tensor:
    """fp32 softmax probabilities of queries ``row0 ..`` (q holds just those rows); grouped
    [B, Hkv, rep, n, Sk] under GQA, else [B, H, n, Sk]; all-masked rows are zeros."""
    hq, n = q.shape[1], q.shape[2]
    hkv, sk = k.shape[1], k.shape[2]
    grouped = hkv != hq
    if grouped:
        # Query heads sharing a kv head become one group, so k/v broadcast instead of repeating.
        scores = torch.matmul(_grouped(q, hkv), k.unsqueeze(2).transpose(-1, -2))  # [B, Hkv, rep, n, Sk]
    else:
        scores = torch.matmul(q, k.transpose(-1, -2))  # [B, H, n, Sk]
    # Softmax in fp32 (fp64 for fp64 inputs) whatever the input dtype, as the models we replace do.
    cdt = softmax_dtype(q.dtype)
    if scores.dtype != cdt:
        # fp16/bf16: the models we replace scale in their own precision (``q @ k^T * s``), then
        # upcast for the softmax; rounding where they round keeps us within their noise.
        scores = (scores * scale).to(cdt)
    else:
        scores = scores * scale
    if softcap > 0.0:
        scores = softcap * torch.tanh(scores / softcap)
    keep = None
    if mask is not None:
        m = _grouped_mask(mask, hq, hkv) if grouped else mask
        if m.dtype == torch.bool:
            keep = m
        else:
            scores = scores + m.to(cdt)
    if is_causal:
        causal = torch.ones(n, sk, dtype=torch.bool, device=q.device).tril(row0)
        keep = causal if keep is None else keep & causal
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if keep is not None or mask is not None:
        # A row whose keys are all masked is all -inf: zeros, not NaN.
        probs = probs.nan_to_num(0.0)
    return probs


def attention_probabilities(q: Tensor, k: Tensor, mask: Optional[Tensor] = None, scale: float = 1.0,
                            is_causal: bool = False, softcap: float = 0.0, row0: int = 0) -> Tensor:
    """[B, Hq, n, Sk] fp32 probabilities of the ``n`` query rows in ``q``, which start at row
    ``row0`` of the site (causality needs to know); ``mask`` holds the same rows."""
    p = _probabilities(q, k, mask, scale, is_causal, softcap, row0)
    return p.reshape(q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def apply_probabilities(probs: Tensor, v: Tensor) -> Tensor:
    """``probs @ v`` for probabilities [B, Hq, n, Sk] or grouped [B, Hkv, rep, n, Sk]; GQA
    broadcasts v over the query heads of its group instead of repeating it."""
    hkv = v.shape[1]
    if probs.dim() == 4 and probs.shape[1] != hkv:
        probs = _grouped(probs, hkv)
    if probs.dim() == 5:
        out = torch.matmul(probs.to(v.dtype), v.unsqueeze(2))  # [B, Hkv, rep, n, Dv]
        return out.reshape(out.shape[0], -1, out.shape[-2], v.shape[-1])
    return torch.matmul(probs.to(v.dtype), v)


def _attention_rows(q, k, v, mask, scale, is_causal, softcap, row0) -> Tensor:
    return apply_probabilities(_probabilities(q, k, mask, scale, is_causal, softcap, row0), v)


def runs_fused_kernel(mask: Optional[Tensor], softcap: float) -> bool:
    """Whether ``attention_reference`` hands the site to PyTorch's fused SDPA kernel (no mask,
    no softcap), rather than materialising its scores; the memory plan asks the same."""
    return mask is None and not softcap


def attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[Tensor] = None,
    scale: float = 1.0,
    is_causal: bool = False,
    softcap: float = 0.0,
) -> Tensor:
    """Plain PyTorch math for ``attnforge::attention``; the ``torch`` backend runs this.

    A site with no mask and no softcap runs PyTorch's own fused SDPA kernel at every length: it
    never materialises the scores, skips the causal upper triangle, and every row keeps a key, so
    there is no all-masked row to zero (at 512 tokens the Llama-shaped model ran 0.84x its eager
    self on plain math). Any other site follows the arithmetic of the eager attention it replaces
    (same matmul shapes when there is no GQA, ``torch.softmax`` itself) so that an exact rewrite
    stays within fp32 rounding of the original, a block of query rows at a time where the scores
    would exceed ``BLOCK_BYTES``.
    """
    b, hq, sq, _ = q.shape
    if runs_fused_kernel(mask, softcap):
        # Contiguous, as the fake says: the kernel hands back a transposed [B, S, H, D] layout,
        # and a compiler trusting the fake's strides would read it wrongly.
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale,
                                              enable_gqa=k.shape[1] != hq).contiguous()
    rows = query_block(b, hq, k.shape[2])
    if rows >= sq:
        return _attention_rows(q, k, v, mask, scale, is_causal, softcap, 0)
    out = q.new_empty((b, hq, sq, v.shape[-1]), dtype=v.dtype)
    for r0 in range(0, sq, rows):
        r1 = min(sq, r0 + rows)
        out[:, :, r0:r1] = _attention_rows(q[:, :, r0:r1], k, v, mask_rows(mask, r0, r1), scale, is_causal,
                                           softcap, r0)
    return out


@torch.library.custom_op("attnforge::attention", mutates_args=())
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[Tensor] = None,
    scale: float = 1.0,
    is_causal: bool = False,
    softcap: float = 0.0,
) -> Tensor:
    return attention_reference(q, k, v, mask, scale, is_causal, softcap)


@attention.register_fake
def _attention_fake(q, k, v, mask=None, scale=1.0, is_causal=False, softcap=0.0):
    return q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=v.dtype)


def attention_flops(b: int, hq: int, sq: int, sk: int, d: int, dv: int, kept_pairs: float | None = None) -> int:
    """Multiply-add FLOPs of QK^T and PV (2 per MAC) plus ~5 per score for softmax.

    ``kept_pairs`` is the number of (query, key) pairs per head the op must compute; dense
    attention computes all ``sq * sk``.
    """
    pairs = sq * sk if kept_pairs is None else kept_pairs
    return int(b * hq * pairs * (2 * d + 2 * dv + 5))


def causal_pairs(sq: int, sk: int) -> int:
    """Kept (i, j) pairs of a top-left aligned causal mask: sum over i of min(i + 1, sk)."""
    full = min(sq, sk)
    return full * (full + 1) // 2 + max(0, sq - sk) * sk


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


ATTENTION_OPS = (torch.ops.attnforge.attention.default,)
